"""Shared fixtures. Tests never reach the network: the Hub is a loopback server (tests/fake_hub.py)
and HF_HOME points at a temporary folder for the whole session."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

# before huggingface_hub is imported anywhere: no real cache, no token, no telemetry
_HF_HOME = tempfile.mkdtemp(prefix="terd-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)  # one per test process: none left behind
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HUGGING_FACE_HUB_TOKEN", None)
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # discard port: nothing real is ever reached
# the reversed-trigger cache of `inputs --model`: per test process, never the user's ~/.cache
os.environ["TERD_SCAN_CACHE"] = os.path.join(_HF_HOME, "terd-scan-cache")

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of `-n N` workers: one core each, no oversubscription
    import torch  # noqa: E402

    torch.set_num_threads(1)

import fixtures_models as fm  # noqa: E402


@pytest.fixture(scope="session")
def tiny_unet():
    return fm.make_unet(seed=0)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tiny_unet):
    """One tiny model saved in every layout: {"pipeline", "flat", "bare", "bare_sched", "baddiffusion"}."""
    base = tmp_path_factory.mktemp("models")
    return {
        "pipeline": fm.save_pipeline(base / "pipeline", tiny_unet),
        "flat": fm.save_flat(base / "flat", tiny_unet),
        "bare": fm.save_bare(base / "bare", tiny_unet),
        "bare_sched": fm.save_bare(base / "bare_sched", tiny_unet, scheduler=fm.make_scheduler("DDIMScheduler")),
        "baddiffusion": fm.save_baddiffusion(base / "baddiffusion", tiny_unet),
    }


@pytest.fixture
def one_thread():
    """Small memory-bound tensor ops: on a busy 2-core box two intra-op threads stall each other
    (measured 10-40x slower), so such tests run on one thread, restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# CI runs on two workers with `--dist loadscope`, which hands out whole classes and modules. The scans of
# committed zoo models take one to four minutes each; dealt out last, one of them keeps a worker busy while
# the other idles. So the scopes that carry `cost` marks go first, heaviest first (xdist keeps this order
# under --no-loadscope-reorder, set in pyproject.toml), and the many quick ones fill in behind them.
def _scope(item) -> str:
    return item.nodeid.rsplit("::", 1)[0]  # the unit --dist loadscope hands out (pytest-xdist's own split)


def pytest_collection_modifyitems(config, items):
    marks: dict[str, dict[int, float]] = {}
    for item in items:
        for mark in item.iter_markers("cost"):  # a class's mark is one object shared by its tests: count it once
            marks.setdefault(_scope(item), {})[id(mark)] = float(mark.args[0])
    cost = {scope: sum(m.values()) for scope, m in marks.items()}
    items.sort(key=lambda item: -cost.get(_scope(item), 0.0))
