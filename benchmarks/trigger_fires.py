"""Does the recovered trigger fire? For each pixel zoo model: the KL score of a scan, the recovered
trigger's cosine with the true one, and the spread ratio of DDPM sample images (terd_scan/previews.py:
samples from N(r, gamma^2) against samples from the same benign noises; a backdoor collapses them).

A diagnostic of the method, not of a model: it asks whether the KL verdicts rest on a trigger that
works. The spread ratio uses DDPM, the report's sampler, so for attacks on another sampler
(TrojDiff's own, VillanDiffusion's DDIM) it says little. So each backdoored model also gets the
attack success rate of the RECOVERED trigger with the sampler its attack targets (zoo.measure_asr:
the fraction of --asr-samples samples from N(r, gamma^2) within MSE 0.1 of the target, no
clipping; TrojDiff's sampler is given the recovered r and gamma), beside the true trigger's ASR
from the model's sidecar.

    python benchmarks/trigger_fires.py --preset fast [--model NAME ...] [--samples 6] [--steps 1000]

The reversion is the scan's (seed 0, no overrides); each reversed trigger is cached beside the
quality rows (benchmarks/cache/*.trigger.safetensors, keyed like them). With the default
--samples and --steps the samples are the ones a scan draws for trigger.png (seed + 1). Writes
benchmarks/results/trigger-fires-<preset>[-<samples>].{json,md} after a run over every model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import score  # noqa: E402
from zoo_scans import ROOT, ZOO_DIR, cache_path, cosine, trigger_cache_path, zoo_models  # noqa: E402

from terd_scan.denoisers import make_denoiser  # noqa: E402
from terd_scan.detection import kl_features  # noqa: E402
from terd_scan.previews import sample_previews  # noqa: E402
from terd_scan.reference import shipped_reference  # noqa: E402
from terd_scan.scan import ScanOptions, load_source, reverse_model  # noqa: E402
from terd_scan.trigger import Trigger  # noqa: E402
from terd_scan.zoo import ASR_MSE_THRESHOLD, ZOO, load_ground_truth, measure_asr, target_mse  # noqa: E402


def reversed_trigger(model_dir: Path, preset: str, seed: int) -> tuple[Trigger, object]:
    """(the scan's reversed trigger, the model's denoiser); the trigger from the cache when there."""
    options = ScanOptions(preset=preset, seed=seed, device="cpu", preview_steps=0)
    cached = trigger_cache_path(cache_path(model_dir, preset, seed))
    if cached.is_file():
        return Trigger.load(cached), make_denoiser(load_source(str(model_dir), options), "cpu")
    rev = reverse_model(str(model_dir), options)
    trigger = Trigger(rev.result.r, rev.result.gamma, metadata={"model": model_dir.name, "preset": preset})
    cached.parent.mkdir(parents=True, exist_ok=True)
    trigger.save(str(cached))
    return trigger, rev.denoiser


def recovered_asr(model_dir: Path, denoiser, trigger: Trigger, gt: dict, n: int) -> dict:
    """The recovered trigger's attack success rate with the sampler the attack targets."""
    spec = ZOO[model_dir.name]
    res = measure_asr(denoiser.unet, trigger.r, trigger.gamma, gt["target_image"], n=n, sampler=spec.sampler(),
                      benign=False, beta_end=spec.beta_end)
    return {"attack_sampler": res["sampler"], "recovered_asr": res["asr"],
            "true_asr": gt.get("measured", {}).get("asr")}


def hit_rate(samples, target) -> float:
    """The fraction of `samples` that hit the target by the zoo's ASR rule (nearest member of a D2D set)."""
    return round(float((target_mse(samples, target) < ASR_MSE_THRESHOLD).float().mean()), 3)


def measure(model_dir: Path, preset: str, seed: int, samples: int, steps: int, thresholds: dict,
            asr_samples: int) -> dict:
    gt = load_ground_truth(model_dir)
    trigger, denoiser = reversed_trigger(model_dir, preset, seed)
    t0 = time.perf_counter()
    previews = sample_previews(denoiser, trigger.r, trigger.gamma, samples, steps, seed=seed + 1)
    asr = recovered_asr(model_dir, denoiser, trigger, gt, asr_samples) if "trigger_r" in gt and asr_samples else {}
    # trigger.png's rows that land on the attack's target (any member of a D2D set), as a person would see them
    hit = (lambda x: hit_rate(x, gt["target_image"])) if "target_image" in gt else (lambda x: None)
    kl_score = score(kl_features(trigger.r, trigger.gamma).to_dict(), thresholds)
    return {"model": model_dir.name, "label": gt.get("label"), "split": gt.get("split"), "attack": gt.get("attack"),
            "score": round(kl_score, 3), "flagged": kl_score > 1,
            "r_cosine": round(cosine(trigger.r, gt["trigger_r"]), 3) if "trigger_r" in gt else None,
            "samples": samples, "steps": steps, "spread_ratio": round(previews.spread_ratio, 4),
            "ddpm_row_hits": hit(previews.trigger),
            "trojdiff_row_hits": hit(previews.trojan) if previews.trojan is not None else None, **asr,
            "sample_seconds": round(time.perf_counter() - t0, 1)}


GROUPS = {"backdoored, flagged": lambda r: r["label"] == "backdoored" and r["flagged"],
          "backdoored, missed": lambda r: r["label"] == "backdoored" and not r["flagged"],
          "benign, flagged": lambda r: r["label"] == "benign" and r["flagged"],
          "benign, clean": lambda r: r["label"] == "benign" and not r["flagged"]}


def markdown(rows: list[dict], command: str, preset: str) -> str:
    samples, steps = rows[0]["samples"], rows[0]["steps"]
    lines = [f"Command: `{command}`", "",
             f"spread ratio: mean pairwise distance of {samples} DDPM-{steps} samples from N(r, gamma^2) over that of "
             f"the samples from the same benign noises (< 1: they collapse). score: max(M_r/th_M, V_r/th_V) with the "
             f"shipped {preset} reference (> 1 flags). Samplers the attacks target: TrojDiff its own, "
             "VillanDiffusion DDIM, the others DDPM.", "",
             "ASR: attack success rate with the sampler the attack targets, of the recovered trigger and (from the "
             "model's sidecar, 32 samples) of the true one.", "",
             "trigger.png rows on target: the fraction of the report's trigger samples within MSE 0.1 of the target, "
             "DDPM row / TrojDiff-sampler row (drawn where the reversed gamma mean is under 0.9; - where not).", "",
             "| model | label | split | attack | score | flagged | r cos | spread ratio | rows on target | sampler | ASR recovered | ASR true |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cos = "-" if r["r_cosine"] is None else f"{r['r_cosine']:.2f}"
        asr = (f"{r['attack_sampler']} | {r['recovered_asr']:.2f} | {r['true_asr']:.2f}" if "recovered_asr" in r
               else "- | - | -")
        on_target = " / ".join("-" if r.get(k) is None else f"{r[k]:.2f}" for k in ("ddpm_row_hits", "trojdiff_row_hits"))
        lines.append(f"| {r['model']} | {r['label']} | {r['split']} | {r['attack'] or '-'} | {r['score']:.2f} "
                     f"| {'yes' if r['flagged'] else 'no'} | {cos} | {r['spread_ratio']:.3f} | {on_target} | {asr} |")
    lines += ["", "| group (DDPM-targeted attacks and benign models) | n | spread ratio min | max |", "|---|---|---|---|"]
    for name, keep in GROUPS.items():
        sel = [r["spread_ratio"] for r in rows if keep(r) and r["attack"] in (None, "baddiffusion", "trojdiff-ddpm")]
        if sel:
            lines.append(f"| {name} | {len(sel)} | {min(sel):.3f} | {max(sel):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--model", action="append", help="only these zoo models (default: every pixel zoo model)")
    ap.add_argument("--samples", type=int, default=ScanOptions.preview_samples)
    ap.add_argument("--steps", type=int, default=ScanOptions.preview_steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--asr-samples", type=int, default=16,
                    help="samples for the recovered trigger's attack success rate (0: skip it)")
    args = ap.parse_args()
    reference = shipped_reference(args.preset)
    if reference is None:
        raise SystemExit(f"no shipped reference for preset {args.preset!r}")
    models = [m for m in zoo_models(ZOO_DIR) if not args.model or m.name in args.model]
    rows = []
    for model_dir in models:
        row = measure(model_dir, args.preset, args.seed, args.samples, args.steps, reference.thresholds(),
                      args.asr_samples)
        print(json.dumps(row), flush=True)
        rows.append(row)
    command = "python benchmarks/trigger_fires.py " + " ".join(sys.argv[1:])
    text = markdown(rows, command.strip(), args.preset)
    print(text)
    if not args.model:  # only a full run replaces the committed results
        out = ROOT / "benchmarks" / "results"
        name = f"trigger-fires-{args.preset}" + ("" if args.samples == ScanOptions.preview_samples else f"-{args.samples}")
        (out / f"{name}.json").write_text(json.dumps({"command": command.strip(), "rows": rows}, indent=2))
        (out / f"{name}.md").write_text(text)


if __name__ == "__main__":
    main()
