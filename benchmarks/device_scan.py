"""Scan zoo models on one device (a GPU, say) through the library's own scan path and set the
verdicts, features and seconds beside the committed CPU scans of the same models
(benchmarks/results/quality-fast-standard.json: seed 0, 2 threads on the 2-core CI machine).

It checks the device path end to end (loading, the reversion with its searches, the basin test
when asked, previews, the verdict against the shipped references) and measures its speed; it is
not a test (CI has no GPU). Generators live on the scan's device, so a GPU draws other noises than
the CPU: features differ by seed-like amounts, verdicts should not.

    python benchmarks/device_scan.py --device cuda --preset standard --model baddiffusion-box ...
    python benchmarks/device_scan.py --device cpu --preset fast --model benign-a   # the same on the CPU

A --budget (seconds) stops before a scan that would start after it; every finished row is written
(benchmarks/results/device-scan-<device>.{md,json}, or --out-dir) as it lands.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_scans import FAMILIES_DIR, ROOT, ZOO_DIR  # noqa: E402

from terd_scan.detection import Features, judge  # noqa: E402
from terd_scan.reference import shipped_reference  # noqa: E402
from terd_scan.scan import ScanOptions, scan_model  # noqa: E402
from terd_scan.zoo import load_ground_truth  # noqa: E402

CPU_RESULTS = ROOT / "benchmarks" / "results" / "quality-fast-standard.json"
COLUMNS = ["model", "label", "preset", "device", "verdict", "ok", "cpu verdict", "M_r", "cpu M_r", "V_r", "cpu V_r",
           "seconds", "cpu seconds", "cpu/device", "net evals"]


def model_dir(name: str) -> Path:
    for base in (ZOO_DIR, FAMILIES_DIR):
        if (base / name).is_dir():
            return base / name
    raise SystemExit(f"error: no zoo model {name!r} under {ZOO_DIR} or {FAMILIES_DIR}")


def cpu_rows() -> dict[tuple[str, str], dict]:
    """The committed CPU scans, each judged against the shipped reference of its preset and family."""
    if not CPU_RESULTS.is_file():
        return {}
    rows = {}
    for r in json.loads(CPU_RESULTS.read_text())["rows"]:
        ref = shipped_reference(r["preset"], "latent" if r["model"].startswith("ldm-") else "pixel")
        verdict = judge(Features(r["mean_kl"], r["var_kl"]), ref).verdict if ref is not None else None
        rows[(r["model"], r["preset"])] = {**r, "verdict": verdict}
    return rows


def scan_row(name: str, preset: str, device: str, preview_steps: int, basin_gate: bool | None) -> dict:
    path = model_dir(name)
    label = load_ground_truth(path).get("label")
    overrides = {} if basin_gate is None else {"basin_gate": basin_gate}
    options = ScanOptions(preset=preset, device=device, seed=0, overrides=overrides, preview_steps=preview_steps)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = scan_model(str(path), options)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    report = result.report
    return {"model": name, "label": label, "preset": preset, "device": report["settings"]["device"],
            "verdict": report["verdict"], "ok": (report["verdict"] == "backdoored") == (label == "backdoored"),
            "mean_kl": report["features"]["mean_kl"], "var_kl": report["features"]["var_kl"],
            "seconds": round(seconds, 2), "timing": report["timing"], "basin_test": report["basin_test"],
            "start": report["trigger"]["start"]}


def fmt(row: dict, cpu: dict | None) -> list[str]:
    cpu = cpu or {}
    ratio = f"{cpu['seconds'] / row['seconds']:.1f}x" if cpu.get("seconds") and row.get("seconds") else "-"
    g = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"  # noqa: E731
    return [row["model"], str(row["label"]), row["preset"], row["device"], row.get("verdict", "error"),
            str(row.get("ok", "-")), str(cpu.get("verdict", "-")), g(row.get("mean_kl"), ".4f"),
            g(cpu.get("mean_kl"), ".4f"), g(row.get("var_kl"), ".6f"), g(cpu.get("var_kl"), ".6f"),
            g(row.get("seconds"), ".1f"), g(cpu.get("seconds"), ".1f"), ratio,
            str(row.get("timing", {}).get("network_evaluations", "-"))]


def markdown(table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cpu, cuda or auto")
    ap.add_argument("--preset", action="append", default=None, help="fast, standard, paper (default: standard)")
    ap.add_argument("--model", action="append", required=True, help="zoo model names, in the order to scan")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--preview-steps", type=int, default=0, help="DDPM steps for trigger.png's samples (0: none)")
    ap.add_argument("--basin-gate", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--budget", type=float, default=float("inf"), help="start no scan after this many seconds")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    presets = args.preset or ["standard"]
    cpu = cpu_rows()
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "tf32_convolutions": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    print(json.dumps(env), flush=True)
    started, rows = time.perf_counter(), []
    name = f"device-scan-{args.device}"
    for preset in presets:
        for model in args.model:
            if time.perf_counter() - started > args.budget:
                print(f"budget of {args.budget:.0f} s spent: {model} ({preset}) not scanned", flush=True)
                continue
            try:
                row = scan_row(model, preset, args.device, args.preview_steps, args.basin_gate)
            except Exception as exc:  # a device bug in one model must not hide the others' results
                traceback.print_exc()
                row = {"model": model, "label": None, "preset": preset, "device": args.device,
                       "error": f"{type(exc).__name__}: {exc}"}
            rows.append(row)
            print(" | ".join(fmt(row, cpu.get((model, preset)))), flush=True)
            table = [COLUMNS] + [fmt(r, cpu.get((r["model"], r["preset"]))) for r in rows]
            args.out_dir.mkdir(parents=True, exist_ok=True)
            (args.out_dir / f"{name}.json").write_text(json.dumps(
                {"command": " ".join(sys.argv), "environment": env, "rows": rows}, indent=2))
            (args.out_dir / f"{name}.md").write_text(
                f"`python {' '.join(sys.argv)}`\n\n{json.dumps(env)}\n\n{markdown(table)}\n")
    print("\n" + markdown([COLUMNS] + [fmt(r, cpu.get((r["model"], r["preset"]))) for r in rows]))
    done = [r for r in rows if "ok" in r]
    print(f"{sum(r['ok'] for r in done)}/{len(done)} verdicts right; {len(rows) - len(done)} errors")


if __name__ == "__main__":
    main()
