"""Detection quality per attack family: TPR, TNR and AUROC with 95% intervals, input-detection
rates with the reversed trigger, trigger recovery error, and cost, for each preset. Calibration
and holdout models are reported apart (the holdout rows are the ones that count).

    python benchmarks/quality.py --preset fast --preset standard [--zoo DIR ...] [--model NAME ...] [--no-cache]
    python benchmarks/quality.py --preset standard --set l1_weight=0.002 [--shard 1/2]

--set KEY=VALUE (repeatable) tries a reversion setting over the whole zoo before a preset takes it:
the rows are cached under the changed settings, and as the shipped reference does not hold for
them, each model is judged against thresholds made the shipped way (mu + 3 sigma) from the run's
own calibration benign models of its reference family (seed 0 only, where the shipped reference
also has seed 1). Verdict settings (basin_gate, basin_pairs, basin_min_barrier) leave the reversion
alone: their rows share the cache and the shipped reference judges them. --shard K/N reverses only every N-th model from the K-th and writes no results:
N processes fill the cache side by side, then one run without --shard reads it.

Models: every zoo model under examples/zoo plus any --zoo DIR (a folder of zoo models built with
`python -m terd_scan.zoo build NAME --out DIR`, or examples/zoo-families for the latent models).
Reversions are cached in benchmarks/cache/.
Family: "benign", or the attack name, with "-eta<k>" for adaptive triggers scaled by k; latent
diffusion models get a "latent:" prefix and are judged with the latent reference, as a scan would;
score-SDE VE models get a "ve:" prefix (ranked against VE benign models) and DDIM-repo checkpoints
(ckpt.pth + config.yml, scanned with --allow-pickle) a "ddim-repo:" prefix; both are judged with the pixel
reference, as a scan judges them. Models of kinds that get no verdict (consistency models) are skipped.
Score for the AUROC: max(M_r / threshold_M, V_r / threshold_V) against the shipped reference of
the preset (and model family), so score > 1 is exactly the "backdoored" verdict.
With several presets it also prints, per model, each preset's score and verdict and whether the
cheaper presets agree with the first one given (e.g. `--preset paper --preset standard`).
Writes benchmarks/results/quality-<presets>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import auroc, auroc_interval, wilson  # noqa: E402
from start_ablation import thresholds as own_thresholds  # noqa: E402
from zoo_scans import (ROOT, VERDICT_SETTINGS, ZOO_DIR, bad_input, collapse_zoo_model, reverse_zoo_model,  # noqa: E402
                       zoo_models)

from terd_scan.collapse_search import COLLAPSE_KEEP_RATIO  # noqa: E402

from terd_scan.basin_test import BasinOutcome  # noqa: E402
from terd_scan.detection import trigger_held  # noqa: E402
from terd_scan.presets import ReversionSettings, settings_for  # noqa: E402
from terd_scan.reference import shipped_reference  # noqa: E402

SPLITS = ("holdout", "calibration", "all")


# sidecar "family" -> the shipped reference family a scan of it is judged with (scan.reference_family;
# others: no verdict), and the prefix of its rows, so each model kind is ranked against its own benign models
REFERENCE_FAMILY = {None: "pixel", "latent-diffusion": "latent", "score-sde-ve": "pixel", "ddim-repo": "pixel"}
ROW_PREFIX = {None: "", "latent-diffusion": "latent:", "score-sde-ve": "ve:", "ddim-repo": "ddim-repo:"}


def family(row: dict) -> str:
    prefix = ROW_PREFIX.get(row.get("model_family"), "")
    if row["label"] != "backdoored":
        return prefix + "benign"
    scale = float(row.get("trigger_scale") or 1.0)
    return prefix + row["attack"] + (f"-eta{scale:g}" if scale != 1.0 else "")


def kl_score(row: dict, thresholds: dict) -> float:
    """max(M_r / th_M, V_r / th_V): > 1 is a KL over the thresholds."""
    return max(row["mean_kl"] / thresholds["mean_kl"], row["var_kl"] / thresholds["var_kl"])


def no_basin(row: dict) -> bool:
    """The row was judged by the basin test (terd_scan/basin_test.py, settings basin_gate) and failed it."""
    basin = row.get("basin")
    return not trigger_held(None if basin is None else BasinOutcome(**basin))


def score(row: dict, thresholds: dict) -> float:
    """The verdict's score (> 1 flags): the KL score, at most 1 where the reversed trigger failed the basin
    test, since a KL over the thresholds does not flag it then."""
    value = kl_score(row, thresholds)
    return min(value, 1.0) if no_basin(row) else value


# model kinds the sample-collapse search covers (pixel-space DDPM-family: the zoo's DDPMs and DDIM-repo checkpoints)
COLLAPSE_KINDS = (None, "ddim-repo")


def with_collapse(row: dict, outcome: dict) -> dict:
    """A row the KL route found clean, judged by the sample-collapse search as a scan judges it: score
    max(KL score, keep ratio / spread ratio), > 1 exactly when the search keeps a collapse; a kept collapse's
    end point is the scan's trigger, so its recovery error and input-detection rates replace the row's."""
    row = {**row, "collapse": outcome}
    if outcome.get("ran"):
        row["score"] = max(row["score"], COLLAPSE_KEEP_RATIO / max(outcome["ratio"], 1e-12))
        if outcome["kept"]:
            row.update({k: outcome[k] for k in ("r_cosine", "r_l2", "input_tpr", "input_tnr") if k in outcome})
    row["seconds"] += outcome.get("seconds", 0.0)
    row["network_evaluations"] += outcome.get("network_evaluations", 0)
    return row


def is_benign(fam: str) -> bool:
    return fam.rpartition(":")[2] == "benign"


def benign_of(fam: str) -> str:
    """The benign family an attack family is compared with: same model kind ("latent:" or none)."""
    kind, sep, _ = fam.rpartition(":")
    return kind + sep + "benign"


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (preset, split, family) with rates, intervals and means."""
    out = []
    for preset in sorted({r["preset"] for r in rows}):
        for split in SPLITS:
            sel = [r for r in rows if r["preset"] == preset and (split == "all" or r["split"] == split)]
            for fam in sorted({r["family"] for r in sel}, key=lambda f: (":" in f, not is_benign(f), f)):
                benign_scores = [r["score"] for r in sel if r["family"] == benign_of(fam)]
                group = [r for r in sel if r["family"] == fam]
                flagged = sum(r["score"] > 1 for r in group)
                line = {"preset": preset, "split": split, "family": fam, "n": len(group),
                        "seconds_mean": sum(r["seconds"] for r in group) / len(group),
                        "network_evaluations_mean": sum(r["network_evaluations"] for r in group) / len(group)}
                if is_benign(fam):
                    line["tnr"] = (len(group) - flagged) / len(group)
                    line["tnr_ci95"] = wilson(len(group) - flagged, len(group))
                else:
                    scores = [r["score"] for r in group]
                    line["tpr"] = flagged / len(group)
                    line["tpr_ci95"] = wilson(flagged, len(group))
                    line["auroc"] = auroc(scores, benign_scores)
                    line["auroc_ci95"] = auroc_interval(scores, benign_scores)
                    line["n_benign_for_auroc"] = len(benign_scores)
                    for key in ("r_cosine", "r_l2", "input_tpr", "input_tnr"):
                        vals = [r[key] for r in group if key in r]
                        line[key + "_mean"] = sum(vals) / len(vals) if vals else float("nan")
                out.append(line)
    return out


def verdicts_by_model(rows: list[dict]) -> list[dict]:
    """One line per model: each preset's score, and whether each preset's verdict is the first preset's."""
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by_preset = {r["preset"]: r for r in rows if r["model"] == model}
        first = next(iter(by_preset.values()))
        line = {"model": model, "split": first["split"], "family": first["family"],
                "scores": {p: by_preset[p]["score"] for p in presets if p in by_preset},
                # the KL scores over the thresholds that the basin test cleared (their trigger is not held)
                "cleared_by_basin_test": {p: by_preset[p]["kl_score"] for p in presets if p in by_preset
                                          and no_basin(by_preset[p]) and by_preset[p].get("kl_score", 0) > 1},
                # the sample-collapse search's spread ratio where it ran (the KL route found the model clean)
                "collapse_ratio": {p: by_preset[p]["collapse"]["ratio"] for p in presets if p in by_preset
                                   and by_preset[p].get("collapse", {}).get("ran")}}
        base = presets[0]
        if base in by_preset:
            flag = by_preset[base]["score"] > 1
            line["agrees_with_" + base] = {p: (by_preset[p]["score"] > 1) == flag for p in presets[1:] if p in by_preset}
        out.append(line)
    return out


def verdict_markdown(lines: list[dict], presets: list[str]) -> str:
    head = ["model", "split", "family"] + [f"{p} score" for p in presets] + \
        [f"{p} = {presets[0]}" for p in presets[1:]]
    out = [f"Per model: score (> 1 flags) and whether the verdict matches `{presets[0]}`; \"not held (KL x)\": a KL "
           "score x over the thresholds that does not flag the model, since TERD's objective does not hold its reversed "
           "trigger (the basin test); \"collapse x\": the KL route found the model clean and the sample-collapse search "
           f"ended at spread ratio x, the score then max(KL score, {COLLAPSE_KEEP_RATIO:g} / x).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ln in lines:
        agree = ln.get("agrees_with_" + presets[0], {})
        out.append("| " + " | ".join(
            [ln["model"], ln["split"], ln["family"]]
            + [_score_cell(ln, p) for p in presets]
            + [("yes" if agree[p] else "NO") if p in agree else "-" for p in presets[1:]]) + " |")
    return "\n".join(out) + "\n"


def _score_cell(line: dict, preset: str) -> str:
    if preset not in line["scores"]:
        return "-"
    cleared = line.get("cleared_by_basin_test", {})
    collapse = line.get("collapse_ratio", {})
    return (f"{line['scores'][preset]:.2f}" + (f" not held (KL {cleared[preset]:.2f})" if preset in cleared else "")
            + (f" collapse {collapse[preset]:.3g}" if preset in collapse else ""))


def _ci(v: tuple[float, float]) -> str:
    return f"[{v[0]:.2f}, {v[1]:.2f}]"


def markdown(summary: list[dict], command: str, own_thresholds: bool = False) -> str:
    head = ["preset", "split", "family", "n", "TPR [95% CI]", "TNR [95% CI]", "AUROC [95% CI]",
            "r cos", "r L2", "input TPR/TNR", "s/scan", "net evals"]
    lines = [f"Command: `{command}`", "",
             "TPR/TNR: Wilson 95% intervals; AUROC: bootstrap 95% interval against the benign models "
             "of the same split; score = max(M_r/th_M, V_r/th_V) with "
             + ("thresholds mu + 3 sigma over this run's calibration benign models (seed 0) of the model's reference family."
                if own_thresholds else "the shipped reference."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        bd = not is_benign(s["family"])
        lines.append("| " + " | ".join([
            s["preset"], s["split"], s["family"], str(s["n"]),
            f"{s['tpr']:.2f} {_ci(s['tpr_ci95'])}" if bd else "-",
            "-" if bd else f"{s['tnr']:.2f} {_ci(s['tnr_ci95'])}",
            f"{s['auroc']:.2f} {_ci(s['auroc_ci95'])}" if bd and s["n_benign_for_auroc"] else "-",
            f"{s['r_cosine_mean']:.2f}" if bd else "-", f"{s['r_l2_mean']:.1f}" if bd else "-",
            f"{s['input_tpr_mean']:.2f}/{s['input_tnr_mean']:.2f}" if bd else "-",
            f"{s['seconds_mean']:.0f}", f"{s['network_evaluations_mean']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def parse_overrides(pairs: list[str]) -> dict:
    """KEY=VALUE pairs -> reversion-setting overrides, each value of the setting's own type."""
    defaults = ReversionSettings().to_dict()
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in defaults:
            bad_input(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(defaults))}")
        out[key] = _setting_value(key, value, defaults[key])
    return out


def _setting_value(key: str, value: str, default):
    """VALUE read as the type of the setting's default: a bool from on/off words, a tuple from a
    comma-separated list of numbers, else int or float."""
    try:
        if isinstance(default, bool):
            words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
            return words[value.lower()]
        if isinstance(default, tuple):
            return tuple(float(v) for v in value.split(","))
        return type(default)(value)
    except (KeyError, ValueError):
        bad_input(f"--set {key}={value}: not a valid {type(default).__name__} (default {default!r})")


def parse_shard(text: str) -> tuple[int, int]:
    """K/N with 1 <= K <= N -> (K, N)."""
    k, sep, n = text.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        bad_input(f"--shard {text!r}: expected K/N with 1 <= K <= N, e.g. 1/2")
    return int(k), int(n)


def _name_part(value) -> str:
    """An override's value as it goes into a results file name: 0.002, 600, True, 0.8,0.5."""
    if isinstance(value, tuple):
        return ",".join(_name_part(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def changes_reversion(overrides: dict) -> bool:
    """Whether the overrides change the reversion (and so its features), not only the verdict's basin test."""
    return any(k not in VERDICT_SETTINGS for k in overrides)


def reference_thresholds(preset: str, ref_family: str, overrides: dict, rows: list[dict]) -> dict:
    """The shipped reference's thresholds, or with reversion overrides (which it does not hold for) mu + 3 sigma
    over this run's calibration benign rows of the family. Verdict settings (the basin test) leave the features,
    so the shipped reference holds for them."""
    if changes_reversion(overrides):
        benign = [r for r in rows if r["label"] == "benign" and r["split"] == "calibration"]
        if len(benign) < 2:
            bad_input(f"--set needs at least 2 calibration benign {ref_family} models among the models run")
        return own_thresholds(benign)
    reference = shipped_reference(preset, ref_family)
    if reference is None:
        bad_input(f"no shipped {ref_family} reference for preset {preset!r}: build it with "
                 f"benchmarks/build_reference.py --family {ref_family} --preset {preset}")
    return reference.thresholds()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", default=None)
    ap.add_argument("--zoo", action="append", default=[], help="extra folder of zoo models (repeatable)")
    ap.add_argument("--model", action="append", default=[], help="only this zoo model (repeatable)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a reversion setting for every model (repeatable)")
    ap.add_argument("--shard", default=None, metavar="K/N", help="only fill the cache for every N-th model from the K-th")
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.set)
    torch.set_num_threads(args.threads)
    presets = args.preset or ["fast", "standard"]
    models = zoo_models(ZOO_DIR) + [m for d in args.zoo for m in zoo_models(Path(d))]
    if args.model:
        unknown = set(args.model) - {m.name for m in models}
        if unknown:
            bad_input(f"unknown zoo model(s): {', '.join(sorted(unknown))}")
        models = [m for m in models if m.name in args.model]
    kinds = {m: json.loads((m / "terd-zoo.json").read_text()).get("family") for m in models}
    for m in [m for m in models if kinds[m] not in REFERENCE_FAMILY]:
        print(f"skipped {m.name}: {kinds[m]} models get no verdict", flush=True)
    models = [m for m in models if kinds[m] in REFERENCE_FAMILY]
    def reverse(m: Path, preset: str) -> dict:
        return reverse_zoo_model(m, preset, overrides=overrides, use_cache=not args.no_cache)

    if args.shard:
        k, n = parse_shard(args.shard)
        for preset in presets:
            collapse = settings_for(preset, **overrides).collapse_search and not changes_reversion(overrides)
            for m in models[k - 1::n]:
                row = reverse(m, preset)
                print(f"{preset:9s} {row['model']:28s} M_r {row['mean_kl']:.5f} V_r {row['var_kl']:.3g}", flush=True)
                if collapse and kinds[m] in COLLAPSE_KINDS and score(
                        row, reference_thresholds(preset, REFERENCE_FAMILY[kinds[m]], overrides, [])) <= 1:
                    out = collapse_zoo_model(m, preset, overrides=overrides, use_cache=not args.no_cache)
                    print(f"{preset:9s} {row['model']:28s} collapse ratio {out.get('ratio')} kept {out.get('kept')}",
                          flush=True)
        return
    rows = []
    for preset in presets:
        reversed_rows = [reverse(m, preset) for m in models]
        thresholds = {}
        for ref_family in sorted({REFERENCE_FAMILY[kinds[m]] for m in models}):
            thresholds[ref_family] = reference_thresholds(preset, ref_family, overrides, [
                r for m, r in zip(models, reversed_rows) if REFERENCE_FAMILY[kinds[m]] == ref_family])
        for m, row in zip(models, reversed_rows):
            th = thresholds[REFERENCE_FAMILY[kinds[m]]]
            row = {**row, "family": family(row), "score": score(row, th), "kl_score": kl_score(row, th), "thresholds": th}
            if row["score"] <= 1 and kinds[m] in COLLAPSE_KINDS and settings_for(preset, **overrides).collapse_search:
                row = with_collapse(row, collapse_zoo_model(m, preset, overrides=overrides, use_cache=not args.no_cache))
            rows.append(row)
            print(f"{preset:9s} {row['model']:28s} {row['split']:12s} {row['family']:22s} "
                  f"score {row['score']:.2f} -> {'backdoored' if row['score'] > 1 else 'clean'}", flush=True)
    summary = summarise(rows)
    command = "python benchmarks/quality.py " + " ".join(f"--preset {p}" for p in presets) + \
        "".join(f" --set {kv}" for kv in args.set) + \
        "".join(f" --zoo {d}" for d in args.zoo) + "".join(f" --model {m}" for m in args.model)
    md = markdown(summary, command, own_thresholds=changes_reversion(overrides))
    if len(presets) > 1:
        md += "\n" + verdict_markdown(verdicts_by_model(rows), presets)
    print("\n" + md)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    name = "quality-" + "-".join(presets) + "".join(f"-{k}-{_name_part(v)}" for k, v in overrides.items())
    (out / f"{name}.json").write_text(json.dumps({"command": command, "summary": summary, "by_model": verdicts_by_model(rows), "rows": [
        {k: v for k, v in r.items() if k != "settings"} for r in rows]}, indent=2) + "\n")
    (out / f"{name}.md").write_text(md)


if __name__ == "__main__":
    main()
