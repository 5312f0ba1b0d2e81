"""TERD's pair loss of a zoo model on a grid of (s * r_true, gamma): where the true trigger's basin
lies and what stands between it and TERD's start. Forward passes only, common random numbers.

    python benchmarks/loss_landscape.py examples/zoo/trojdiff-blend [--pairs 32] [--seed 0]

Prints one row per trigger scale s (0 = the benign start r = 0) and one column per gamma, plus the
paper's start r = -U[0,1) at the same gammas.
"""

from __future__ import annotations

import argparse

import torch

from terd_scan.denoisers import make_denoiser
from terd_scan.pair_loss import pair_losses
from terd_scan.scan import ScanOptions, load_source
from terd_scan.zoo import load_ground_truth

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
GAMMAS = (1.0, 0.8, 0.6, 0.4, 0.2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a zoo model folder (needs its ground_truth.safetensors)")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    den = make_denoiser(load_source(args.model, ScanOptions(device="cpu")), "cpu")
    r_true = load_ground_truth(args.model)["trigger_r"]
    shape = tuple(den.input_shape)
    g = torch.Generator().manual_seed(args.seed)
    lo, hi = den.last_timesteps(10)
    x0 = torch.randn((args.pairs, *shape), generator=g)
    t = torch.randint(lo, hi + 1, (args.pairs,), generator=g)
    e = torch.randn((2 * args.pairs, *shape), generator=g)
    starts = [(f"{s:g} x r_true", s * r_true) for s in SCALES] + [("-U[0,1)", -torch.rand(shape, generator=g))]
    print(f"{args.model}: TERD pair loss, mean over {args.pairs} pairs, t in [{lo}, {hi}], c = 1")
    print(f"{'r':>14s} " + " ".join(f"gamma {gm:<5g}" for gm in GAMMAS))
    with torch.no_grad():
        for name, r in starts:
            row = [float(pair_losses(den, x0, r, gm, t, 1.0, e).mean()) for gm in GAMMAS]
            print(f"{name:>14s} " + " ".join(f"{v:11.2f}" for v in row))


if __name__ == "__main__":
    main()
