"""Does TERD's loss see the true trigger? For each backdoored pixel zoo model: TERD's pair loss (the
last `timestep_window` training steps, c = 1, x0 ~ N(0, I)) and the preset's stage-1 objective
L - lambda ||r||_1 along the straight line from the benign noise (r = 0, gamma = 1) to the true trigger
(r_true, gamma_true): r = s r_true, gamma = 1 + s (gamma_true - 1) for s = 0, 0.1, ..., 1.2. Forward
passes only, the same noise pairs at every s.

A reversion can only hold a trigger where the objective has a basin there. `basin` says whether it
does on this line: the lowest objective near the trigger (s in 0.7..1.2) lies at least 2% below the
highest point between r = 0 and it (the patch search's BASIN_RATIO; the barrier is the difference, in
loss units). Without one the objective rises all the way to
the trigger, a descent started at the trigger slides back toward r = 0, and the KL of what the
reversion returns says nothing about this backdoor: a miss there is the loss's, not the search's.
One line is not the whole landscape (a curved path could hold a basin the line misses); it is the
cheapest check that the trigger is a minimum at all.

    python benchmarks/trigger_line.py --preset standard [--model NAME ...] [--pairs 64] [--seed 3]

Beside each model: its scores under the committed quality results (benchmarks/results/
quality-fast-standard.json, > 1 flags) and its true attack success rate from the sidecar. Writes
benchmarks/results/trigger-line-<preset>.{json,md} after a run over every model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_scans import ROOT, ZOO_DIR, zoo_models  # noqa: E402

from terd_scan.denoisers import make_denoiser  # noqa: E402
from terd_scan.pair_loss import common_pairs, pair_losses  # noqa: E402
from terd_scan.patch_search import BASIN_RATIO  # noqa: E402
from terd_scan.presets import settings_for  # noqa: E402
from terd_scan.scan import ScanOptions, load_source  # noqa: E402
from terd_scan.zoo import load_ground_truth  # noqa: E402

SCALES = [round(0.1 * k, 1) for k in range(13)]  # 0 .. 1.2
NEAR = 0.7  # "near the trigger": s >= NEAR
QUALITY = ROOT / "benchmarks" / "results" / "quality-fast-standard.json"


def line_profile(denoiser, r_true: torch.Tensor, gamma_true: torch.Tensor, l1_weight: float, pairs: int,
                 window: int, generator: torch.Generator) -> dict:
    """The loss and the objective along s r_true (see the module docstring), and the basin test."""
    x0, t, e = common_pairs(denoiser, pairs, window, generator)
    losses, objective = [], []
    with torch.no_grad():
        for s in SCALES:
            r, gamma = s * r_true, 1.0 + s * (gamma_true - 1.0)
            loss = float(pair_losses(denoiser, x0, r, gamma, t, 1.0, e).mean())
            losses.append(round(loss, 4))
            objective.append(round(loss - l1_weight * float(r.abs().sum()), 4))
    near = [k for k, s in enumerate(SCALES) if s >= NEAR]
    k_min = min(near, key=lambda k: objective[k])
    peak = max(objective[:k_min + 1])
    return {"scales": SCALES, "loss": losses, "objective": objective, "near_min_scale": SCALES[k_min],
            "barrier": round(peak - objective[k_min], 4), "basin": objective[k_min] < BASIN_RATIO * peak,
            "trigger_below_zero": losses[SCALES.index(1.0)] < losses[0]}


def committed_scores() -> dict[str, dict]:
    if not QUALITY.is_file():
        return {}
    return {m["model"]: m["scores"] for m in json.loads(QUALITY.read_text())["by_model"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="standard", help="whose lambda and timestep window (default standard)")
    ap.add_argument("--model", action="append", help="only these zoo models (default: every backdoored pixel zoo model)")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    settings = settings_for(args.preset)
    scores = committed_scores()
    rows = []
    for model_dir in zoo_models(ZOO_DIR):
        if args.model and model_dir.name not in args.model:
            continue
        truth = load_ground_truth(model_dir)
        if truth.get("label") != "backdoored":
            continue
        denoiser = make_denoiser(load_source(str(model_dir), ScanOptions(device="cpu")), "cpu")
        prof = line_profile(denoiser, truth["trigger_r"], truth["trigger_gamma"], settings.l1_weight, args.pairs,
                            settings.timestep_window, torch.Generator().manual_seed(args.seed))
        row = {"model": model_dir.name, "split": truth.get("split"), "attack": truth.get("attack"),
               "true_asr": (truth.get("measured") or {}).get("asr"), "scores": scores.get(model_dir.name, {}), **prof}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("scales", "objective")}), flush=True)
    if args.model:
        return
    out = ROOT / "benchmarks" / "results" / f"trigger-line-{args.preset}"
    command = f"python benchmarks/trigger_line.py --preset {args.preset}"
    out.with_suffix(".json").write_text(json.dumps({"command": command, "lambda": settings.l1_weight,
                                                     "pairs": args.pairs, "seed": args.seed, "rows": rows}, indent=1))
    lines = [f"Command: `{command}`", "",
             f"TERD's pair loss L (last {settings.timestep_window} steps, c = 1, {args.pairs} common pairs) and the "
             f"objective O = L - {settings.l1_weight:g} ||r||_1 along r = s r_true, gamma = 1 + s (gamma_true - 1). "
             f"basin: the lowest O at s >= {NEAR} lies at least {1 - BASIN_RATIO:.0%} below the highest O between s = 0 and "
             "it (barrier: the difference). "
             "Scores: the committed quality results (> 1 flags).", "",
             "| model | split | attack | ASR true | L at 0 / 0.5 / 1 | O at 0 / 0.5 / 1 | barrier | basin | L(trigger) < L(0) | fast | standard |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    k5, k1 = SCALES.index(0.5), SCALES.index(1.0)
    for row in rows:
        sc = row["scores"]
        fmt = lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        lines.append(f"| {row['model']} | {row['split']} | {row['attack']} | {fmt(row['true_asr'])} | "
                     f"{row['loss'][0]:.2f} / {row['loss'][k5]:.2f} / {row['loss'][k1]:.2f} | "
                     f"{row['objective'][0]:.2f} / {row['objective'][k5]:.2f} / {row['objective'][k1]:.2f} | "
                     f"{row['barrier']:.2f} | {'yes' if row['basin'] else 'no'} | {'yes' if row['trigger_below_zero'] else 'no'} | "
                     f"{fmt(sc.get('fast'))} | {fmt(sc.get('standard'))} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
