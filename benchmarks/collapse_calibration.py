"""The sample-collapse search (terd_scan/collapse_search.py) on zoo models: its end-point spread ratio at
each radius, for the benign models (which must stay above COLLAPSE_KEEP_RATIO) and for backdoored ones
(with the end point's cosine to the true trigger and its samples' MSE to the attack's target). One
thread per process; `--jobs` processes side by side.

    python benchmarks/collapse_calibration.py --model benign-a --model baddiffusion-stop-corner [--jobs 2]
        [--set collapse_iterations=75] [--seed 0] [--out benchmarks/results/collapse-search.json]

Writes the table as JSON and Markdown (same stem) and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_scans import cosine  # noqa: E402

ZOO = Path(__file__).resolve().parent.parent / "examples" / "zoo"


def _one(job: tuple) -> dict:
    name, overrides, seed = job
    torch.set_num_threads(1)
    from terd_scan.collapse_search import COLLAPSE_SEED_OFFSET, EVAL_NOISES, ddpm_samples, search_collapse
    from terd_scan.denoisers import make_denoiser
    from terd_scan.presets import settings_for
    from terd_scan.scan import ScanOptions, load_source
    from terd_scan.zoo import load_ground_truth

    s = settings_for("standard", **overrides)
    den = make_denoiser(load_source(str(ZOO / name), ScanOptions(device="cpu", preview_steps=0)), "cpu")
    out = search_collapse(den, s.collapse_radii, s.collapse_iterations, s.collapse_noises, s.collapse_steps,
                          seed + COLLAPSE_SEED_OFFSET)
    gt = load_ground_truth(ZOO / name)
    row = {"model": name, "label": gt["label"], "split": gt.get("split"), **out.to_dict()}
    if gt["label"] == "backdoored":
        row["cosine"] = round(cosine(out.r, gt["trigger_r"]), 3)
        with torch.no_grad():
            x = ddpm_samples(den, torch.randn((EVAL_NOISES, *den.input_shape)) + out.r, s.collapse_steps, 7)
        row["target_mse"] = round(float((x - gt["target_image"]).pow(2).mean()), 4)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--set", action="append", default=[], help="a standard-preset override, name=value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        k, v = item.split("=", 1)
        overrides[k] = tuple(float(x) for x in v.split(",")) if "," in v else (int(v) if v.isdigit() else float(v))
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(_one, [(m, overrides, args.seed) for m in args.model]))
    lines = ["| model | label | split | ratio per radius | ratio | kept | cosine | target MSE | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['label']} | {r['split']} | "
                     f"{', '.join(f'{v:.3f}' for v in r['ratios'])} (rms {', '.join(map(str, r['radii_rms']))}) | "
                     f"{r['ratio']:.3f} | {r['kept']} | {r.get('cosine', '-')} | {r.get('target_mse', '-')} | "
                     f"{r['seconds']:.0f} |")
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps({"command": "python benchmarks/collapse_calibration.py " + " ".join(argv or sys.argv[1:]),
                                   "rows": rows}, indent=1))
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
