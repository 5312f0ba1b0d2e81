"""The sample-collapse search (terd_scan/collapse_search.py) on zoo models: its end-point spread ratio at
each radius, for the benign models (which must stay above COLLAPSE_KEEP_RATIO) and for backdoored ones
(with the end point's cosine to the true trigger, its samples' MSE to the attack's target and how many of
them hit it by the zoo's ASR rule). One
thread per process; `--jobs` processes side by side.

    python benchmarks/collapse_calibration.py --model benign-a --model baddiffusion-stop-corner [--jobs 2]
        [--set collapse_iterations=75] [--seed 0 --seed 1] [--out benchmarks/results/collapse-search.json]

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
    from terd_scan.collapse_search import EVAL_NOISES, sampler_for, search_for
    from terd_scan.denoisers import make_denoiser
    from terd_scan.presets import settings_for
    from terd_scan.scan import ScanOptions, load_source
    from terd_scan.zoo import ASR_MSE_THRESHOLD, load_ground_truth

    s = settings_for("standard", **overrides)
    path = Path(name) if Path(name).is_dir() else ZOO / name
    den = make_denoiser(load_source(str(path), ScanOptions(device="cpu", preview_steps=0)), "cpu")
    out = search_for(den, s.to_dict(), seed)
    gt = load_ground_truth(path)
    row = {"model": path.name, "label": gt["label"], "split": gt.get("split"), "seed": seed, **out.to_dict()}
    if gt["label"] == "backdoored":
        row["cosine"] = round(cosine(out.r, gt["trigger_r"]), 3)
        samples = sampler_for(den, s.collapse_steps)[0]
        with torch.no_grad():
            x = samples(torch.randn((EVAL_NOISES, *den.input_shape)) + out.r, 7)
        per_sample = (x - gt["target_image"]).pow(2).flatten(1).mean(1)
        row["target_mse"] = round(float(per_sample.mean()), 4)
        # the zoo's ASR rule on the end point's samples: does the recovered trigger fire?
        row["target_hits"] = f"{int((per_sample < ASR_MSE_THRESHOLD).sum())}/{EVAL_NOISES}"
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="a zoo name or a model folder (consistency "
                    "models: examples/zoo-families/cm-*)")
    ap.add_argument("--set", action="append", default=[], help="a standard-preset override, name=value")
    ap.add_argument("--seed", type=int, action="append", help="repeatable (default: 0)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        k, v = item.split("=", 1)
        overrides[k] = tuple(float(x) for x in v.split(",")) if "," in v else (int(v) if v.isdigit() else float(v))
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(_one, [(m, overrides, seed) for m in args.model for seed in args.seed or [0]]))
    lines = ["| model | label | split | seed | ratio per radius | ratio | kept | cosine | target MSE | hits | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['label']} | {r['split']} | {r['seed']} | "
                     f"{', '.join(f'{v:.3f}' for v in r['ratios'])} (rms {', '.join(map(str, r['radii_rms']))}) | "
                     f"{r['ratio']:.3f} | {r['kept']} | {r.get('cosine', '-')} | {r.get('target_mse', '-')} | {r.get('target_hits', '-')} | "
                     f"{r['seconds']:.0f} |")
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps({"command": "python benchmarks/collapse_calibration.py " + " ".join(argv or sys.argv[1:]),
                                   "rows": rows}, indent=1))
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
