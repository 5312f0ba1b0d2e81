"""Scan every zoo model with each preset and print, per model and preset: M_r, V_r, the verdict
against the shipped reference, whether it is right, trigger recovery (cosine and L2 to the true
r), seconds and network evaluations. Where a preset runs the sample-collapse search, a model the KL route finds
clean is judged by it too, as a scan judges it (its outcome cached beside the rows). Holdout models (never used for calibration or tuning) are
reported separately. Results are cached in benchmarks/cache/ and written to benchmarks/results/.

    python benchmarks/bench_scan.py --preset fast --preset standard [--preset paper] [--no-cache]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_scan import markdown  # noqa: E402
from zoo_scans import ROOT, collapse_zoo_model, reverse_zoo_model, zoo_models  # noqa: E402

from terd_scan.basin_test import BasinOutcome  # noqa: E402
from terd_scan.detection import BACKDOORED, Features, judge  # noqa: E402
from terd_scan.presets import settings_for  # noqa: E402
from terd_scan.reference import shipped_reference  # noqa: E402

COLUMNS = ["model", "label", "split", "preset", "M_r", "V_r", "verdict", "ok", "r_cos", "r_L2", "seconds", "net evals"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", default=None)
    ap.add_argument("--model", action="append", default=None, help="only these zoo models")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-cache", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    presets = args.preset or ["fast", "standard"]
    models = [m for m in zoo_models() if not args.model or m.name in args.model]
    rows = []
    for preset in presets:
        ref = shipped_reference(preset)
        for m in models:
            row = reverse_zoo_model(m, preset, use_cache=not args.no_cache)
            if ref is not None:
                row["verdict"] = judge(Features(row["mean_kl"], row["var_kl"]), ref, _basin(row)).verdict
                if row["verdict"] != BACKDOORED and settings_for(preset).collapse_search:  # the scan's second route
                    row["collapse"] = collapse_zoo_model(m, preset, use_cache=not args.no_cache)
                    if row["collapse"].get("kept"):
                        row["verdict"] = BACKDOORED
                        row.update({k: row["collapse"][k] for k in ("r_cosine", "r_l2") if k in row["collapse"]})
                    row["seconds"] += row["collapse"].get("seconds", 0.0)
                    row["network_evaluations"] += row["collapse"].get("network_evaluations", 0)
                row["ok"] = (row["verdict"] == "backdoored") == (row["label"] == "backdoored")
            rows.append(row)
            print(_fmt(row), flush=True)
    md = markdown([COLUMNS] + [_fmt(r).split(" | ") for r in rows])
    print("\n" + md)
    for preset in presets:
        for split in ("calibration", "holdout"):
            sel = [r for r in rows if r["preset"] == preset and r["split"] == split and "ok" in r]
            if sel:
                print(f"{preset:9s} {split:12s}: {sum(r['ok'] for r in sel)}/{len(sel)} right; "
                      f"mean {sum(r['seconds'] for r in sel) / len(sel):.1f} s per scan")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    name = "scan-" + "-".join(presets)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / f"{name}.md").write_text(f"Command: python benchmarks/bench_scan.py {' '.join('--preset ' + p for p in presets)}"
                                    f"\n\n" + md + "\n")


def _basin(row: dict) -> BasinOutcome | None:
    """The row's basin test (the preset's verdict condition, kept in the cached row), or None when it was off."""
    summary = row.get("basin")
    return None if summary is None else BasinOutcome(**summary)


def _fmt(r: dict) -> str:
    vals = [r["model"], r["label"], r["split"], r["preset"], f"{r['mean_kl']:.4f}", f"{r['var_kl']:.5f}",
            r.get("verdict", "-"), {True: "yes", False: "NO"}.get(r.get("ok"), "-"),
            f"{r['r_cosine']:.3f}" if "r_cosine" in r else "-", f"{r['r_l2']:.2f}" if "r_l2" in r else "-",
            f"{r['seconds']:.1f}", str(r["network_evaluations"])]
    return " | ".join(vals)


if __name__ == "__main__":
    main()
