"""Every bad input of the loader's table (tests/test_safety.py CASES), through the real CLI:
exit code 2, one line on stderr naming the cause, no traceback, no artefacts, no code run.
Plus a Hub scan through the CLI (loopback stand-in) and an unreachable Hub."""

import json
import os

import pytest
from typer.testing import CliRunner

from terd_scan.cli import app
from test_cli_model import CHEAP
from test_hub import TOKEN, cache, hub, repo_folders, unets  # noqa: F401  (fixtures)
from test_safety import CASES, unreadable_weights

FLAGS = {"allow_pickle": lambda v: ["--allow-pickle"] if v else [], "config": lambda v: ["--config", str(v)],
         "revision": lambda v: ["--revision", str(v)]}


@pytest.mark.parametrize("builder, exc_type, needle", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_through_cli(tmp_path, tiny_unet, builder, exc_type, needle, monkeypatch):
    if builder is unreadable_weights and os.geteuid() == 0:
        pytest.skip("running as root: permissions do not stop reads")
    monkeypatch.chdir(tmp_path)
    source, kwargs = builder(tmp_path, tiny_unet)
    args = ["model", str(source), "--out", str(tmp_path / "out"), *CHEAP]
    for key, value in kwargs.items():
        args += FLAGS[key](value)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, (res.exit_code, res.output)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in res.output, err
    assert err.startswith("error:") and needle in err, err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "pwned").exists()


def test_hub_scan_records_repo_revision_and_commit(hub, tmp_path):  # noqa: F811
    lenient = tmp_path / "ref.json"
    lenient.write_text(json.dumps({"format": "terd-scan-reference", "name": "lenient", "settings": {},
                                   "models": [{"mean_kl": 1e6, "var_kl": 1e6}] * 2}))
    res = CliRunner().invoke(app, ["model", "org/tiny@v1.0", "-f", "json", "--out", str(tmp_path / "o"),
                                   "--reference", str(lenient), *CHEAP])
    assert res.exit_code == 0, res.output
    src = json.loads(res.stdout)["source"]
    assert (src["kind"], src["repo_id"], src["requested_revision"]) == ("hub", "org/tiny", "v1.0")
    assert src["resolved_commit"] == hub.sha_v1
    assert all(len(f["sha256"]) == 64 for f in src["files"])


def test_private_hub_repo_through_cli(hub, tmp_path):  # noqa: F811
    res = CliRunner().invoke(app, ["model", "org/private", "--out", str(tmp_path / "o"), *CHEAP])
    assert res.exit_code == 2 and "--token" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_unreachable_hub_through_cli(hub, tmp_path):  # noqa: F811
    hub.stop()
    res = CliRunner().invoke(app, ["model", "org/tiny", "--out", str(tmp_path / "o"), *CHEAP])
    assert res.exit_code == 2, res.output
    assert "cannot reach" in res.stderr.lower() and len(res.stderr.strip().splitlines()) == 1


def test_a_device_out_of_memory_at_one_pair_is_a_one_line_error(model_dirs, tmp_path, monkeypatch):
    """The reversion halves its micro-batch while a GPU runs out; when even one noise pair does not fit the
    error reaches the CLI, which says so and how to get past it (exit 2, nothing written), for `model` and
    for `inputs --model`."""
    import torch

    import terd_scan.scan as scan

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(scan, "reverse_trigger", out_of_memory)
    res = CliRunner().invoke(app, ["model", str(model_dirs["pipeline"]), "--out", str(tmp_path / "out"), *CHEAP])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "out of device memory (CUDA out of memory" in err and "--device cpu" in err
    assert not (tmp_path / "out").exists()
    noises = tmp_path / "noises"
    noises.mkdir()
    torch.save({"x": torch.randn(2, 3, 8, 8)}, noises / "n.pt")
    monkeypatch.setenv("TERD_SCAN_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(app, ["inputs", str(noises), "--model", str(model_dirs["pipeline"]), "--device", "cpu",
                                   "--stage1-iterations", "2", "--stage2-iterations", "1"])
    assert res.exit_code == 2 and "out of device memory while reversing" in res.stderr, res.output
