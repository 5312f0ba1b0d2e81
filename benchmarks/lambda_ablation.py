"""Ablation of TERD's L1 weight lambda (objective L - lambda ||r||_1) on the pixel zoo: the paper's
run alone (every search off), one preset's iterations, at each lambda.

    python benchmarks/lambda_ablation.py [--preset standard] [--lambdas 5e-05,0.001,0.002] [--model NAME ...]

Why: on the BadDiffusion models the default preset misses (baddiffusion-box-p05-corner, the stop
glyphs) the pair loss at the last timesteps is higher at the true trigger than at r = 0, so stage 1
decays r from its start -U[0,1) toward 0 (standard, seed 0, p05-corner: cosine to the trigger 0.87
after 60 iterations, 0.35 after 600). The loss along the trigger also grows far more slowly than on
a benign model (p05-corner's trigger: 5.5 against 21.6 on benign-a, 2.3 at r = 0), and lambda is the
term that trades the loss against |r|: at the paper's 5e-5 it is negligible at 16 px (lambda
sqrt(768) = 0.0014 against a mean slope of the loss along the trigger of (5.5 - 2.3) / ||r_true|| = 0.12). Each lambda is judged
against thresholds made the shipped way (mu + 3 sigma of M_r and V_r over the calibration benign
models, seed 0) from its own runs. Reversions are cached in benchmarks/cache/ as for quality.py.
Writes benchmarks/results/lambda-ablation-<preset>.{json,md} (other --lambdas: lambda-ablation-<preset>-<l1>-<l2>...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from start_ablation import thresholds, write_results  # noqa: E402
from zoo_scans import ZOO_DIR, reverse_zoo_model, zoo_models  # noqa: E402

DEFAULT_LAMBDAS = "5e-05,0.001,0.002"
PAPER_RUN_ONLY = {"patch_search": False, "narrow_search": False, "canvas_search": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--lambdas", default=DEFAULT_LAMBDAS)
    ap.add_argument("--model", action="append", default=[], help="only these zoo models (calibration benign always run)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-calibration", action="store_true", help="skip the calibration benign models not named "
                                                                  "(to fill the cache from several processes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lambdas = [float(x) for x in args.lambdas.split(",")]
    rows: dict[str, dict[float, dict]] = {}
    for m in zoo_models(ZOO_DIR):
        side = json.loads((m / "terd-zoo.json").read_text())
        calibration_benign = side.get("label") == "benign" and side.get("split") == "calibration"
        if args.model and m.name not in args.model and (args.no_calibration or not calibration_benign):
            continue
        for lam in lambdas:
            row = reverse_zoo_model(m, args.preset, seed=0, overrides={**PAPER_RUN_ONLY, "l1_weight": lam})
            rows.setdefault(m.name, {})[lam] = row
            cos = row.get("r_cosine")
            print(f"lambda {lam:<8g} {m.name:32s} M_r {row['mean_kl']:.5f}  V_r {row['var_kl']:.3g}"
                  + (f"  r cos {cos:+.2f}" if cos is not None else ""), flush=True)
    if args.no_calibration:
        return
    th = {lam: thresholds([r[lam] for r in rows.values() if r[lam]["label"] == "benign" and r[lam]["split"] == "calibration"])
          for lam in lambdas}
    table = []
    for name, by_lam in sorted(rows.items()):
        first = by_lam[lambdas[0]]
        entry = {"model": name, "label": first["label"], "split": first["split"], "attack": first["attack"], "runs": {}}
        for lam, row in by_lam.items():
            entry["runs"][f"{lam:g}"] = {"score": max(row["mean_kl"] / th[lam]["mean_kl"], row["var_kl"] / th[lam]["var_kl"]),
                                         "mean_kl": row["mean_kl"], "var_kl": row["var_kl"], "r_cosine": row.get("r_cosine")}
        table.append(entry)
    summary = {}
    for lam in lambdas:
        key = f"{lam:g}"
        bad = [e["runs"][key]["score"] for e in table if e["label"] == "backdoored"]
        good = [e["runs"][key]["score"] for e in table if e["label"] == "benign" and e["split"] == "holdout"]
        summary[key] = {"thresholds": th[lam], "tpr": f"{sum(s > 1 for s in bad)}/{len(bad)}",
                        "holdout_tnr": f"{sum(s <= 1 for s in good)}/{len(good)}"}
    command = (f"python benchmarks/lambda_ablation.py --preset {args.preset} --lambdas {args.lambdas}"
               + "".join(f" --model {m}" for m in args.model))
    lines = [f"Command: `{command}`", "",
             "The paper's run alone (patch, narrow and canvas searches off), seed 0. Score = max(M_r / th_M, V_r / th_V); "
             "each lambda's thresholds are mu + 3 sigma over the calibration benign models reversed with it.", "",
             "| lambda | threshold M_r | threshold V_r | TPR (backdoored listed) | TNR (holdout benign listed) |",
             "|---|---|---|---|---|"]
    for key, s in summary.items():
        lines.append(f"| {key} | {s['thresholds']['mean_kl']:.4g} | {s['thresholds']['var_kl']:.3g} | {s['tpr']} | {s['holdout_tnr']} |")
    keys = [f"{lam:g}" for lam in lambdas]
    lines += ["", "| model | split | label | " + " | ".join(f"score @ {k}" for k in keys) + " | "
              + " | ".join(f"r cos @ {k}" for k in keys) + " |", "|---|---|---|" + "---|" * (2 * len(keys))]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for e in table:
        lines.append(f"| {e['model']} | {e['split']} | {e['label']} | "
                     + " | ".join(f"{e['runs'][k]['score']:.2f}" for k in keys) + " | "
                     + " | ".join(fmt(e['runs'][k]['r_cosine']) for k in keys) + " |")
    # the default lambdas keep the committed name; other sets get their own file beside it
    suffix = "" if args.lambdas == DEFAULT_LAMBDAS else "-" + args.lambdas.replace(",", "-")
    write_results(f"lambda-ablation-{args.preset}{suffix}", command, summary, table, lines)


if __name__ == "__main__":
    main()
