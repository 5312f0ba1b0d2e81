"""What a scan costs at real model sizes: seconds per stage-1 and stage-2 iteration of TERD's
reversion, peak memory, and the time of one paper-style run (standard's 600 + 60 iterations), for
the zoo's 16 px UNet and the DDPM-CIFAR10 (32 px, 35.7 M parameters) and DDPM-256 (113.7 M)
architectures, with random weights (the cost does not depend on them; the verdict would be
meaningless, so none is given). The model is written as a DDPMPipeline folder and loaded through
terd-scan's own loader and denoiser; the reversion is the library's, searches off.

    python benchmarks/bench_scale.py --device cuda --config zoo-16 --config cifar10-32 --config ddpm-256
    python benchmarks/bench_scale.py --device cpu --config cifar10-32 --stage1 3 --stage2 1
    python benchmarks/bench_scale.py --device cuda --config cifar10-32 --full   # + a whole standard scan

A whole standard scan is one paper-style run plus the searches and the runs they seed (on the zoo,
standard scans took 54k-93k network evaluations where the paper-style run alone takes 17k), so
`--full` times it, and `--budget` (seconds) stops before a config that would start after it.
Results: benchmarks/results/bench-scale-<device>.{md,json} (or --out-dir).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import terd_scan.reversion as reversion  # noqa: E402
from terd_scan.denoisers import make_denoiser  # noqa: E402
sys.path.insert(0, str(ROOT / "benchmarks"))
from device_scan import markdown  # noqa: E402  (the same table writer)
from terd_scan.memory_plan import MemoryPlan, memory_plan  # noqa: E402
from terd_scan.presets import settings_for  # noqa: E402
from terd_scan.reversion import reverse_trigger  # noqa: E402
from terd_scan.scan import ScanOptions, load_source, scan_model  # noqa: E402

# UNet2DModel configurations (ECOSYSTEM.md: the DDPM-CIFAR10 one from its config.json, the 256 px one
# from google/ddpm-cat-256's); zoo-16 is terd_scan.zoo.make_unet's.
CONFIGS = {
    "zoo-16": dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                   attention_head_dim=None),
    "cifar10-32": dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                       norm_eps=1e-6, norm_num_groups=32),
    "ddpm-256": dict(sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
                     down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                       "DownBlock2D"),
                     up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
                     attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                     norm_eps=1e-6, norm_num_groups=32),
}
SEARCHES_OFF = dict(patch_search=False, narrow_search=False, canvas_search=False, dip_search=False, basin_gate=False)


def write_model(config: str, folder: Path) -> int:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(in_channels=3, out_channels=3, **CONFIGS[config])
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              clip_sample=False, variance_type="fixed_small")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in unet.parameters())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB; the process's peak RSS


def measure(config: str, device: str, stage1: int, stage2: int, full: bool, micro_batch: int | None = None) -> dict:
    if not micro_batch:
        return _measure(config, device, stage1, stage2, full)

    def forced(shape, batch_size, device):  # another chunk size, the sampler checkpointed as memory_plan says
        return MemoryPlan(min(micro_batch, batch_size), memory_plan(shape, batch_size, device).checkpointed_sampler)

    reversion.memory_plan = forced
    try:
        return _measure(config, device, stage1, stage2, full)
    finally:
        reversion.memory_plan = memory_plan


def _measure(config: str, device: str, stage1: int, stage2: int, full: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / config
        parameters = write_model(config, folder)
        denoiser = make_denoiser(load_source(str(folder), ScanOptions(device=device)), device)
        standard = settings_for("standard")
        warm = settings_for("standard", stage1_iterations=1, stage2_iterations=1, **SEARCHES_OFF)
        reverse_trigger(denoiser, warm, seed=0)  # CUDA context, cuDNN plans, allocator
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timed = settings_for("standard", stage1_iterations=stage1, stage2_iterations=stage2, **SEARCHES_OFF)
        sync(device)
        result = reverse_trigger(denoiser, timed, seed=0)
        sync(device)
        s1 = result.seconds["stage1"] / stage1
        s2 = result.seconds["stage2"] / stage2
        row = {"config": config, "device": device, "memory_plan": result.memory, "parameters": parameters, "input": list(denoiser.input_shape),
               "batch_size": standard.batch_size, "sampler_steps": standard.sampler_steps,
               "stage1_iterations_timed": stage1, "stage2_iterations_timed": stage2,
               "seconds_per_stage1_iteration": s1, "seconds_per_stage2_iteration": s2,
               "paper_style_run_seconds": standard.stage1_iterations * s1 + standard.stage2_iterations * s2,
               "peak_memory_gib": peak_memory_gib(device)}
        if full:
            sync(device)
            t0 = time.perf_counter()
            report = scan_model(str(folder), ScanOptions(device=device, preview_steps=0)).report
            sync(device)
            row.update(full_scan_seconds=time.perf_counter() - t0,
                       full_scan_network_evaluations=report["timing"]["network_evaluations"],
                       full_scan_peak_memory_gib=peak_memory_gib(device))
        return row


COLUMNS = ["config", "device", "params (M)", "input", "micro-batch", "checkpointed", "s / stage-1 it",
           "s / stage-2 it", "600+60 run (s)", "peak GiB", "full standard scan (s)", "net evals"]


def fmt(row: dict) -> list[str]:
    if "error" in row:
        return [row["config"], row["device"], "-", "-", "-", "-", "-", "-", "-", "-", row["error"][:60], "-"]
    full = row.get("full_scan_seconds")
    return [row["config"], row["device"], f"{row['parameters'] / 1e6:.2f}", "x".join(map(str, row["input"])),
            str(row["memory_plan"]["micro_batch"]), str(row["memory_plan"]["checkpointed_sampler"]),
            f"{row['seconds_per_stage1_iteration']:.4f}", f"{row['seconds_per_stage2_iteration']:.4f}",
            f"{row['paper_style_run_seconds']:.1f}", f"{row['peak_memory_gib']:.2f}",
            f"{full:.1f}" if full is not None else "-", str(row.get("full_scan_network_evaluations", "-"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", action="append", choices=sorted(CONFIGS), default=None)
    ap.add_argument("--stage1", type=int, default=20, help="stage-1 iterations timed")
    ap.add_argument("--stage2", type=int, default=3, help="stage-2 iterations timed")
    ap.add_argument("--full", action="store_true", help="also time a whole standard scan of each config")
    ap.add_argument("--micro-batch", type=int, default=None, help="noise pairs per gradient pass (default: memory_plan's)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--budget", type=float, default=float("inf"), help="start no config after this many seconds")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "tf32_convolutions": torch.backends.cudnn.allow_tf32}
    print(json.dumps(env), flush=True)
    started, rows = time.perf_counter(), []
    for config in args.config or ["zoo-16", "cifar10-32"]:
        if time.perf_counter() - started > args.budget:
            print(f"budget of {args.budget:.0f} s spent: {config} not measured", flush=True)
            continue
        try:
            row = measure(config, args.device, args.stage1, args.stage2, args.full, args.micro_batch)
        except Exception as exc:  # e.g. out of memory at 256 px: the row says so, the others still run
            row = {"config": config, "device": args.device, "error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        print(" | ".join(fmt(row)), flush=True)
        table = markdown([COLUMNS] + [fmt(r) for r in rows])
        args.out_dir.mkdir(parents=True, exist_ok=True)
        name = f"bench-scale-{args.device}"
        (args.out_dir / f"{name}.json").write_text(json.dumps(
            {"command": "python " + " ".join(sys.argv), "environment": env, "rows": rows}, indent=2))
        (args.out_dir / f"{name}.md").write_text(
            f"`python {' '.join(sys.argv)}`\n\n{json.dumps(env)}\n\n{table}\n")
    print("\n" + "\n".join((args.out_dir / f"bench-scale-{args.device}.md").read_text().splitlines()[4:]))


if __name__ == "__main__":
    main()
