"""benchmarks/bench_scale.py: a model of a named architecture, written and loaded through terd-scan, timed per
stage; a forced micro-batch reaches the reversion and is undone afterwards."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_scale  # noqa: E402

import terd_scan.reversion as reversion  # noqa: E402
from terd_scan.memory_plan import memory_plan  # noqa: E402


def test_the_zoo_architecture_is_timed_through_the_scan_path():
    row = bench_scale.measure("zoo-16", "cpu", stage1=2, stage2=1, full=False)
    assert row["parameters"] == 177427 and row["input"] == [3, 16, 16]
    assert row["memory_plan"] == {"micro_batch": 16, "checkpointed_sampler": False, "halvings": 0}
    assert row["seconds_per_stage1_iteration"] > 0 and row["seconds_per_stage2_iteration"] > 0
    assert row["paper_style_run_seconds"] == 600 * row["seconds_per_stage1_iteration"] + 60 * row[
        "seconds_per_stage2_iteration"]
    assert len(bench_scale.fmt(row)) == len(bench_scale.COLUMNS)


def test_a_forced_micro_batch_is_used_and_then_undone():
    row = bench_scale.measure("zoo-16", "cpu", stage1=2, stage2=1, full=False, micro_batch=4)
    assert row["memory_plan"]["micro_batch"] == 4 and not row["memory_plan"]["checkpointed_sampler"]
    assert reversion.memory_plan is memory_plan


def test_the_architectures_are_the_published_sizes():
    from diffusers import UNet2DModel

    sizes = {name: sum(p.numel() for p in UNet2DModel(in_channels=3, out_channels=3, **cfg).parameters())
             for name, cfg in bench_scale.CONFIGS.items() if name != "ddpm-256"}
    assert sizes["cifar10-32"] == 35_746_307  # google/ddpm-cifar10-32 (ECOSYSTEM.md: 35.75 M)
