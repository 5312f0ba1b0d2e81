"""benchmarks/device_scan.py: device scans set beside the committed CPU scans; a failing scan is a row, not a crash."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import device_scan  # noqa: E402


def test_the_committed_cpu_rows_are_judged_by_their_shipped_reference():
    rows = device_scan.cpu_rows()
    assert rows[("baddiffusion-box", "standard")]["verdict"] == "backdoored"
    assert rows[("benign-a", "standard")]["verdict"] == "clean"
    assert rows[("ldm-benign", "fast")]["verdict"] == "clean"  # judged by the latent reference
    assert rows[("ldm-baddiffusion-box", "standard")]["verdict"] == "backdoored"


def test_an_unknown_model_is_a_one_line_error():
    with pytest.raises(SystemExit, match="no zoo model 'nope'"):
        device_scan.model_dir("nope")


def test_a_scan_that_fails_on_the_device_becomes_an_error_row_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_scan_row(name, preset, device, preview_steps, basin_gate):
        calls.append(name)
        if name == "benign-a":
            raise RuntimeError("CUDA error: device-side assert")
        return {"model": name, "label": "backdoored", "preset": preset, "device": device, "verdict": "backdoored",
                "ok": True, "mean_kl": 0.3, "var_kl": 0.01, "seconds": 10.0, "timing": {"network_evaluations": 5}}

    monkeypatch.setattr(device_scan, "scan_row", fake_scan_row)
    monkeypatch.setattr(sys, "argv", ["device_scan.py", "--device", "cpu", "--preset", "standard", "--model", "benign-a",
                                      "--model", "baddiffusion-box", "--out-dir", str(tmp_path)])
    device_scan.main()
    assert calls == ["benign-a", "baddiffusion-box"]
    rows = json.loads((tmp_path / "device-scan-cpu.json").read_text())["rows"]
    assert rows[0]["error"] == "RuntimeError: CUDA error: device-side assert" and "ok" not in rows[0]
    assert rows[1]["ok"]
    table = (tmp_path / "device-scan-cpu.md").read_text()
    assert "| benign-a" in table and "error" in table
    out = capsys.readouterr().out
    assert "1/1 verdicts right; 1 errors" in out
    cpu_seconds = device_scan.cpu_rows()[("baddiffusion-box", "standard")]["seconds"]
    assert f"{cpu_seconds / 10.0:.1f}x" in out  # the CPU/device ratio


def test_the_budget_stops_before_a_scan_not_inside_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(device_scan, "scan_row", lambda *a: pytest.fail("no scan after the budget"))
    monkeypatch.setattr(sys, "argv", ["device_scan.py", "--device", "cpu", "--model", "benign-a", "--budget", "-1",
                                      "--out-dir", str(tmp_path)])
    device_scan.main()
    assert "benign-a (standard) not scanned" in capsys.readouterr().out
