"""examples/ci/pre-upload.sh blocks `hf upload` unless the scan says clean (a fake `hf` records calls)."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli_model import CHEAP, reference

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "ci" / "pre-upload.sh"


@pytest.fixture
def fake_path(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "hf.log"
    hf = bin_dir / "hf"
    hf.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    hf.chmod(hf.stat().st_mode | stat.S_IEXEC)
    # terd-scan from this interpreter's environment; one intra-op thread, as conftest gives each xdist
    # worker: beside the other worker a two-thread scan stalls on this 2-core box
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    return env, log


@pytest.mark.parametrize("kind, expected_exit, uploaded", [("lenient", 0, True), ("strict", 1, False)])
def test_upload_only_when_clean(model_dirs, tmp_path, fake_path, kind, expected_exit, uploaded):
    env, log = fake_path
    ref = reference(tmp_path / f"{kind}.json", *((1e6, 1e6) if kind == "lenient" else (0.0, 0.0)))
    # the strict reference (thresholds 0) forces a KL verdict; the basin gate is off so it alone decides
    proc = subprocess.run(["bash", str(SCRIPT), model_dirs["pipeline"], "org/model", "--reference", ref, "-q", *CHEAP,
                           "--no-basin-gate"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expected_exit, proc.stderr
    assert log.exists() == uploaded
    if uploaded:
        assert log.read_text().split()[:2] == ["upload", "org/model"]


def test_scan_error_blocks_upload(tmp_path, fake_path):
    env, log = fake_path
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "missing"), "org/model"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not log.exists()
