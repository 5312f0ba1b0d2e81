"""Ablation of where trigger reversion starts: the paper's r = -U[0,1) against the same draw
centred, U[-0.5, 0.5) (ReversionSettings.centred_start), on the pixel zoo, one preset.

    python benchmarks/start_ablation.py --preset fast [--model NAME ...] [--no-cache]

The preset's other settings as they are, but for the canvas search, off for both starts (it was
added because of what this ablation shows: it proposes a start at a constant canvas).

Why: on benign models that hold a false positive (benign-n, benign-p) the reversed r keeps much of
the start, its per-channel mean above all; a centred start has none. The question is whether the
backdoored models are still found without that offset. Each start is judged against thresholds
made the shipped way (mu + 3 sigma of M_r and V_r over the calibration benign models) from its own
runs, seed 0 only, so the table compares the two starts on equal terms; the shipped references
(seeds 0 and 1) are not used. Reversions are cached in benchmarks/cache/ as for quality.py.
Also reports each backdoored model's cosine of the true trigger with the paper's seed-0 start.
Writes benchmarks/results/start-ablation-<preset>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_scans import ROOT, ZOO_DIR, reverse_zoo_model, zoo_models  # noqa: E402

from terd_scan.reference import Reference  # noqa: E402
from terd_scan.zoo import load_ground_truth  # noqa: E402

# the canvas search off in both: it is the remedy for what this ablation shows (canvas_search.py)
STARTS = {"paper": {"canvas_search": False}, "centred": {"centred_start": True, "canvas_search": False}}


def thresholds(rows: list[dict]) -> dict:
    """mu + 3 sigma (sample sigma) of each feature over the calibration benign rows, computed as the
    shipped references compute theirs."""
    return Reference(name="calibration benign rows", settings={}, models=rows).thresholds()


def write_results(name: str, command: str, summary: dict, table: list[dict], lines: list[str]) -> None:
    """Print the Markdown lines and write benchmarks/results/<name>.{json,md}."""
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / name
    # not with_suffix: a name may hold dots (lambda-ablation-standard-0.004-0.008)
    out.parent.joinpath(name + ".json").write_text(json.dumps({"command": command, "summary": summary, "models": table},
                                                              indent=2) + "\n")
    out.parent.joinpath(name + ".md").write_text(text)


def start_cosine(model_dir: Path, shape: tuple) -> float | None:
    """Cosine of the true trigger r with the paper's seed-0 start -U[0,1) (None for benign models)."""
    gt = load_ground_truth(model_dir)
    if "trigger_r" not in gt:
        return None
    r0 = -torch.rand(shape, generator=torch.Generator().manual_seed(0))
    return float(torch.nn.functional.cosine_similarity(gt["trigger_r"].flatten(), r0.flatten(), dim=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--model", action="append", default=[], help="only these zoo models (calibration benign always run)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-cache", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = zoo_models(ZOO_DIR)
    rows: dict[str, dict[str, dict]] = {}
    for start, overrides in STARTS.items():
        for m in models:
            side = json.loads((m / "terd-zoo.json").read_text())
            calibration_benign = side.get("label") == "benign" and side.get("split") == "calibration"
            if args.model and m.name not in args.model and not calibration_benign:
                continue
            row = reverse_zoo_model(m, args.preset, seed=0, overrides=overrides, use_cache=not args.no_cache)
            rows.setdefault(m.name, {})[start] = row
            print(f"{start:8s} {m.name:32s} M_r {row['mean_kl']:.5f}  V_r {row['var_kl']:.3g}", flush=True)
    th = {start: thresholds([r[start] for r in rows.values()
                             if r[start]["label"] == "benign" and r[start]["split"] == "calibration"])
          for start in STARTS}
    table = []
    for name, by_start in sorted(rows.items()):
        first = by_start["paper"]
        entry = {"model": name, "label": first["label"], "split": first["split"], "attack": first["attack"]}
        for start, row in by_start.items():
            entry[f"{start}_score"] = max(row["mean_kl"] / th[start]["mean_kl"], row["var_kl"] / th[start]["var_kl"])
            entry[f"{start}_features"] = {"mean_kl": row["mean_kl"], "var_kl": row["var_kl"]}
            entry[f"{start}_r_cosine"] = row.get("r_cosine")
        entry["trigger_start_cosine"] = start_cosine(ZOO_DIR / name, (3, 16, 16))
        table.append(entry)
    summary = {}
    for start in STARTS:
        bad = [e[f"{start}_score"] for e in table if e["label"] == "backdoored"]
        good = [e[f"{start}_score"] for e in table if e["label"] == "benign" and e["split"] == "holdout"]
        summary[start] = {"thresholds": th[start], "tpr": f"{sum(s > 1 for s in bad)}/{len(bad)}",
                          "holdout_tnr": f"{sum(s <= 1 for s in good)}/{len(good)}"}
    command = "python benchmarks/start_ablation.py --preset " + args.preset + "".join(f" --model {m}" for m in args.model)
    lines = [f"Command: `{command}`", "",
             "Score = max(M_r / th_M, V_r / th_V); each start's thresholds are mu + 3 sigma over the calibration "
             "benign models reversed from that start (seed 0).", "",
             "| start | threshold M_r | threshold V_r | TPR (all backdoored) | TNR (holdout benign) |", "|---|---|---|---|---|"]
    for start, s in summary.items():
        lines.append(f"| {start} | {s['thresholds']['mean_kl']:.4g} | {s['thresholds']['var_kl']:.3g} | {s['tpr']} | {s['holdout_tnr']} |")
    lines += ["", "| model | split | label | paper score | centred score | r cos (paper) | r cos (centred) | cos(trigger, start) |",
              "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for e in table:
        lines.append(f"| {e['model']} | {e['split']} | {e['label']} | {e['paper_score']:.2f} | {e['centred_score']:.2f} | "
                     f"{fmt(e['paper_r_cosine'])} | {fmt(e['centred_r_cosine'])} | {fmt(e['trigger_start_cosine'])} |")
    write_results(f"start-ablation-{args.preset}", command, summary, table, lines)


if __name__ == "__main__":
    main()
