"""Rebuild the shipped benign references (terd_scan/references/<preset>.json) from the zoo's
calibration-split benign models. Holdout models are never used here.

    python benchmarks/build_reference.py --preset standard --preset fast
    python benchmarks/build_reference.py --family latent --preset standard --preset fast

--family latent builds terd_scan/references/latent-<preset>.json, the reference latent diffusion
models are judged with, from the calibration-split latent benign models in examples/zoo-families
(python -m terd_scan.zoo_latent build).

Each benign model is reversed with several seeds (--seeds, default 0,1), so the thresholds
cover the scan's own seed-to-seed spread as well as the spread between benign models.
--model NAME (repeatable) limits the reference to some calibration benign models (the `paper`
reference: `--preset paper --seeds 0` over the first seven, each reversion is ~15 min here).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_scans import FAMILIES_DIR, ROOT, ZOO_DIR, reverse_zoo_model, zoo_models  # noqa: E402

from terd_scan.reference import FAMILY_PREFIX, Reference  # noqa: E402

# per reference family: where its zoo lives, its sidecar "family" value, how its reference is named,
# and the note the reference carries
FAMILY_ZOO = {
    "pixel": (ZOO_DIR, None, "zoo-16px",
              "benign models of the terd-scan zoo (examples/zoo, split=calibration): tiny 16 px DDPMs on "
              "procedural images; calibrate your own model family with 'terd-scan calibrate'"),
    "latent": (FAMILIES_DIR, "latent-diffusion", "zoo-latent-4x8x8",
               "benign latent-diffusion models of the terd-scan zoo (examples/zoo-families, split=calibration): "
               "tiny DDPMs on 4 x 8 x 8 AutoencoderKL latents of 16 px procedural images; calibrate your own "
               "model family with 'terd-scan calibrate'"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", required=True)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds per benign model")
    ap.add_argument("--model", action="append", default=[], help="only these calibration benign models")
    ap.add_argument("--family", choices=sorted(FAMILY_ZOO), default="pixel")
    ap.add_argument("--no-cache", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    zoo_dir, family_tag, ref_name, note = FAMILY_ZOO[args.family]
    benign = [m for m in zoo_models(zoo_dir) if _split(m) == ("benign", "calibration", family_tag)]
    if args.model:
        unknown = set(args.model) - {m.name for m in benign}
        if unknown:
            sys.exit(f"not a calibration benign zoo model: {', '.join(sorted(unknown))}")
        benign = [m for m in benign if m.name in args.model]
    for preset in args.preset:
        seeds = [int(x) for x in args.seeds.split(",")]
        rows = [reverse_zoo_model(m, preset, seed=seed, use_cache=not args.no_cache) for m in benign for seed in seeds]
        settings = {k: v for k, v in rows[0]["settings"].items() if k not in ("seed", "device")}
        ref = Reference(
            name=f"{ref_name}-{preset}", settings=settings, origin=f"shipped:{FAMILY_PREFIX[args.family]}{preset}",
            models=[{"name": r["model"], "seed": r["seed"], "weights_fingerprint": r["weights_fingerprint"],
                     "mean_kl": r["mean_kl"], "var_kl": r["var_kl"]} for r in rows],
            created_by=f"python benchmarks/build_reference.py --family {args.family} --preset {preset} --seeds {args.seeds}"
                       + "".join(f" --model {m.name}" for m in benign if args.model),
            notes=[note])
        out = ROOT / "terd_scan" / "references" / f"{FAMILY_PREFIX[args.family]}{preset}.json"
        out.parent.mkdir(exist_ok=True)
        ref.save(out)
        th = ref.thresholds()
        print(f"{preset}: {len(benign)} benign models x {len(seeds)} seeds -> mean_kl <= {th['mean_kl']:.4g}, var_kl <= {th['var_kl']:.4g}"
              f"  ({out.relative_to(ROOT)})")


def _split(model_dir: Path) -> tuple[str, str, str | None]:
    import json

    side = json.loads((model_dir / "terd-zoo.json").read_text())
    return side.get("label"), side.get("split"), side.get("family")


if __name__ == "__main__":
    main()
