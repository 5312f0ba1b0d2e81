"""Write a folder of starting noises to try `terd-scan inputs` on.

Benign noises are N(0, I); poisoned noises carry a TRUE trigger, r + gamma * eps, taken from
  --zoo-model examples/zoo/<name>   a zoo model's ground_truth.safetensors ("trigger_r", "trigger_gamma")
  --trigger-file PATH               a terd-scan trigger.safetensors (or a zoo ground_truth.safetensors)
  --synthetic box|patch|blend|weak  a known synthetic trigger (the default: box, shape from --shape)

Layout (every format `inputs` reads; the format is read from the bytes, not the extension):
  OUT/trigger.safetensors      the true trigger, in terd-scan's trigger format
  OUT/labels.json              ground truth per (file, key, index)
  OUT/noises/benign/           only N(0, I) noises                          -> exit code 0
  OUT/noises/mixed/            benign and poisoned noises, several formats  -> exit code 1
      single.safetensors (C,H,W)   batch.safetensors (N,C,H,W)   multi.safetensors (keys)
      noises.npy   noises.npz (keys)   noises.pt (dict)

Usage: python examples/make_noise_dir.py OUT [--zoo-model DIR | --trigger-file F | --synthetic KIND]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from terd_scan.input_detection import (  # noqa: E402
    SYNTHETIC_TRIGGERS, ground_truth_trigger, sample_trigger_noises, synthetic_trigger,
)
from terd_scan.trigger import Trigger  # noqa: E402


def load_trigger(args) -> tuple[Trigger, str]:
    if args.zoo_model:
        gt = Path(args.zoo_model) / "ground_truth.safetensors"
        if not gt.is_file():
            sys.exit(f"error: {gt} not found (is {args.zoo_model} a backdoored zoo model? "
                     "build the zoo with 'python -m terd_scan.zoo build --out examples/zoo')")
        trig = ground_truth_trigger(gt)
        trig.metadata = {"source": f"zoo ground truth: {args.zoo_model}"}
        return trig, f"true trigger of zoo model {args.zoo_model}"
    if args.trigger_file:
        with safe_open(args.trigger_file, framework="pt") as f:
            keys = set(f.keys())
        if {"trigger_r", "trigger_gamma"} <= keys:
            return ground_truth_trigger(args.trigger_file), f"ground truth {args.trigger_file}"
        return Trigger.load(args.trigger_file), f"trigger file {args.trigger_file}"
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 3:
        sys.exit("error: --shape must be C,H,W (e.g. 3,16,16)")
    return synthetic_trigger(args.synthetic, shape), f"synthetic {args.synthetic} trigger {shape}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder (created)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--zoo-model", metavar="DIR", help="examples/zoo/<name> of a backdoored zoo model")
    src.add_argument("--trigger-file", metavar="PATH", help="trigger.safetensors or ground_truth.safetensors")
    src.add_argument("--synthetic", choices=SYNTHETIC_TRIGGERS, default="box", help="synthetic trigger kind")
    p.add_argument("--shape", default="3,16,16", help="C,H,W for --synthetic (default 3,16,16 like the zoo)")
    p.add_argument("--n", type=int, default=8, help="noises per batch tensor (default 8)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    trig, what = load_trigger(args)
    gen = torch.Generator().manual_seed(args.seed)
    n = max(1, args.n)
    shape = trig.shape

    def benign(k):
        return torch.randn((k, *shape), generator=gen)

    def poisoned(k):
        return sample_trigger_noises(trig, k, gen).float()

    out = args.out
    ben_dir, mix_dir = out / "noises" / "benign", out / "noises" / "mixed"
    ben_dir.mkdir(parents=True, exist_ok=True)
    mix_dir.mkdir(parents=True, exist_ok=True)
    trig.save(out / "trigger.safetensors")
    labels: list[dict] = []

    def label(file, key, batch_labels):
        labels.extend({"file": file, "key": key, "index": i, "label": lab} for i, lab in enumerate(batch_labels))

    # benign/: every format, N(0, I) only
    save_file({"noise": benign(1)[0].contiguous()}, ben_dir / "single.safetensors")
    label("benign/single.safetensors", "noise", ["benign"])
    save_file({"noises": benign(n)}, ben_dir / "batch.safetensors")
    label("benign/batch.safetensors", "noises", ["benign"] * n)
    np.save(ben_dir / "noises.npy", benign(n).numpy())
    label("benign/noises.npy", None, ["benign"] * n)
    np.savez(ben_dir / "noises.npz", a=benign(n).numpy(), b=benign(1)[0].numpy())
    label("benign/noises.npz", "a", ["benign"] * n)
    label("benign/noises.npz", "b", ["benign"])
    torch.save({"noises": benign(n)}, ben_dir / "noises.pt")
    label("benign/noises.pt", "noises", ["benign"] * n)

    # mixed/: poisoned noises hidden among benign ones
    save_file({"noise": poisoned(1)[0].contiguous()}, mix_dir / "single.safetensors")
    label("mixed/single.safetensors", "noise", ["poisoned"])
    half = n // 2
    batch = torch.cat([benign(n - half), poisoned(half)])
    save_file({"noises": batch}, mix_dir / "batch.safetensors")
    label("mixed/batch.safetensors", "noises", ["benign"] * (n - half) + ["poisoned"] * half)
    save_file({"clean": benign(n), "triggered": poisoned(n)}, mix_dir / "multi.safetensors")
    label("mixed/multi.safetensors", "clean", ["benign"] * n)
    label("mixed/multi.safetensors", "triggered", ["poisoned"] * n)
    np.save(mix_dir / "noises.npy", poisoned(n).numpy())
    label("mixed/noises.npy", None, ["poisoned"] * n)
    np.savez(mix_dir / "noises.npz", benign=benign(n).numpy(), poisoned=poisoned(n).numpy())
    label("mixed/noises.npz", "benign", ["benign"] * n)
    label("mixed/noises.npz", "poisoned", ["poisoned"] * n)
    torch.save({"x": torch.cat([poisoned(1), benign(n - 1)])}, mix_dir / "noises.pt")
    label("mixed/noises.pt", "x", ["poisoned"] + ["benign"] * (n - 1))

    (out / "labels.json").write_text(json.dumps({"trigger": what, "labels": labels}, indent=1) + "\n")
    n_p = sum(x["label"] == "poisoned" for x in labels)
    print(f"wrote {len(labels)} noises ({n_p} poisoned, {len(labels) - n_p} benign) under {out / 'noises'}")
    print(f"poisoned noises carry the {what}; labels in {out / 'labels.json'}")
    t = out / "trigger.safetensors"
    print("\nscan them:")
    print(f"  terd-scan inputs {ben_dir} --trigger {t}                    # exit 0: no poisoned noise")
    print(f"  terd-scan inputs {mix_dir} --trigger {t}                    # exit 1: poisoned noises")
    print(f"  terd-scan inputs {out / 'noises'} --recursive --trigger {t} --format json --out {out / 'report.json'}")
    if args.zoo_model:
        print("\nwith the trigger REVERSED from the model instead of the true one:")
        print(f"  terd-scan model {args.zoo_model} --out {out / 'scan'}")
        print(f"  terd-scan inputs {out / 'noises'} --recursive --trigger {out / 'scan' / 'trigger.safetensors'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
