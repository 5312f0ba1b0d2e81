"""CLI helpers shared by the model-family tests (test_families, test_latent, test_consistency)."""

from __future__ import annotations

import json

# a scan that exercises every stage in about a second: not a detection setting
CLI_CHEAP = ["--stage1-iterations", "5", "--stage2-iterations", "1", "--preview-steps", "5", "--batch-size", "2",
             "--sampler-steps", "2", "--refine-iterations", "3", "--collapse-iterations", "2", "--device", "cpu", "-f", "json",
             "--no-patch-search"]

# the scan a committed zoo model's verdict is tested with: the fast preset as benchmarks/quality.py measured it
ZOO_SCAN = ["--preset", "fast", "--preview-steps", "0", "--device", "cpu", "--seed", "0", "-f", "json"]


def cli(*args):
    """Invoke `terd-scan` in-process; arguments may be paths."""
    from typer.testing import CliRunner

    from terd_scan.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def lenient_reference(tmp_path) -> str:
    """A reference no cheap scan crosses, for tests of the report rather than of the verdict."""
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"format": "terd-scan-reference", "name": "t", "settings": {},
                               "models": [{"mean_kl": 1e6, "var_kl": 1e6}, {"mean_kl": 1e6, "var_kl": 1e6}]}))
    return str(ref)
