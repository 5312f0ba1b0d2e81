"""Would TERD work on a consistency model if its pair loss were not 1/sigma^2 weak? On a CM the
pair loss is 0.5 ||f(x1) - f(x2)||^2 / sigma^2 (denoisers.py, ConsistencyDenoiser): this measures
the sigma^2-rescaled loss 0.5 ||f(x1) - f(x2)||^2 (the spread of the consistency function over two
noises of N(r, 1)) along s * r_true and s * (the paper's start), then descends r on it with Adam from
the paper's start and prints r's KL features on the way. Where the benign CM's loss also falls as r
grows, the descent pushes its r outward like the backdoored one's, and the KL features of r cannot
tell them apart (what this found on the zoo pair: see the README, "Consistency models").

    python benchmarks/cm_loss_scale.py examples/zoo-families/cm-benign examples/zoo-families/cm-baddiffusion-box \
        --trigger-from examples/zoo-families/cm-baddiffusion-box [--iterations 200] [--lr 0.02] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from terd_scan.denoisers import ConsistencyDenoiser, make_denoiser
from terd_scan.detection import kl_features
from terd_scan.scan import ScanOptions, load_source
from terd_scan.zoo import load_ground_truth

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
BATCH = 16


def spread_loss(den: ConsistencyDenoiser, r: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """0.5 ||f(x1) - f(x2)||^2 per pair, x = sigma_t (z + r) in VE units (the VP-view pair loss times sigma^2)."""
    b = t.shape[0]
    sigma = torch.cat([den.sigmas[t], den.sigmas[t]])
    f = den.consistency(sigma.view(-1, 1, 1, 1) * (z + r), sigma)
    return 0.5 * (f[:b] - f[b:]).pow(2).flatten(1).sum(1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="consistency-model folders")
    ap.add_argument("--trigger-from", required=True, help="a zoo model whose ground_truth.safetensors holds r_true")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    r_true = load_ground_truth(args.trigger_from)["trigger_r"]
    shape = tuple(r_true.shape)
    start = -torch.rand(shape, generator=torch.Generator().manual_seed(args.seed))  # the paper's start
    for path in args.models:
        den = make_denoiser(load_source(path, ScanOptions(device="cpu")), "cpu")
        if not isinstance(den, ConsistencyDenoiser):
            raise SystemExit(f"{path}: not a consistency model")
        lo, hi = den.last_timesteps(10)
        g = torch.Generator().manual_seed(args.seed + 1)  # common pairs for every point of the landscape
        t = torch.randint(lo, hi + 1, (args.pairs,), generator=g)
        z = torch.randn((2 * args.pairs, *shape), generator=g)
        print(f"\n{path}: sigma^2-rescaled pair loss (mean over {args.pairs} pairs, last 10 grid sigmas)")
        print("| direction | " + " | ".join(f"s = {s:g}" for s in SCALES) + " |")
        print("|---|" + "---|" * len(SCALES))
        with torch.no_grad():
            for name, d in (("s x r_true", r_true), ("s x start", start)):
                row = [float(spread_loss(den, s * d, t, z).mean()) for s in SCALES]
                print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        r = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([r], lr=args.lr)
        g = torch.Generator().manual_seed(args.seed + 2)
        print(f"\nAdam descent from the start, lr {args.lr:g}, batch {BATCH} pairs")
        print("| iteration | loss | rms r | cosine to r_true | M_r | V_r |")
        print("|---|---|---|---|---|---|")
        for i in range(args.iterations + 1):
            ti = torch.randint(lo, hi + 1, (BATCH,), generator=g)
            zi = torch.randn((2 * BATCH, *shape), generator=g)
            loss = spread_loss(den, r, ti, zi).mean()
            if i % max(args.iterations // 4, 1) == 0:
                rd = r.detach()
                f = kl_features(rd, torch.ones_like(rd))
                cos = float(torch.nn.functional.cosine_similarity(rd.flatten(), r_true.flatten(), 0))
                print(f"| {i} | {float(loss.detach()):.2f} | {float(rd.pow(2).mean().sqrt()):.3f} | {cos:.3f} | "
                      f"{f.mean_kl:.3f} | {f.var_kl:.4f} |")
            if i < args.iterations:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()


if __name__ == "__main__":
    main()
