"""Would TERD work on a consistency model if its pair loss were not 1/sigma^2 weak? On a CM the
pair loss is 0.5 ||f(x1) - f(x2)||^2 / sigma^2 (denoisers.py, ConsistencyDenoiser): this measures
TERD's pair loss (pair_loss.pair_losses) times sigma_t^2, the spread of the consistency function over
two noises of N(r, 1), along s * r_true and s * (the paper's start), then descends r on it with Adam from
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
from terd_scan.pair_loss import common_pairs, pair_losses
from terd_scan.scan import ScanOptions, load_source
from terd_scan.zoo import load_ground_truth

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
BATCH = 16


def rescaled_loss(den: ConsistencyDenoiser, r: torch.Tensor, pairs) -> torch.Tensor:
    """TERD's pair loss of each pair times sigma_t^2, i.e. 0.5 ||f(x1) - f(x2)||^2 (gamma 1; the two noises
    share the pair's x0)."""
    x0, t, e = pairs
    return pair_losses(den, x0, r, 1.0, t, 1.0, e) * den.sigmas[t] ** 2


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
        # common pairs for every point of the landscape
        landscape = common_pairs(den, args.pairs, 10, torch.Generator().manual_seed(args.seed + 1))
        print(f"\n{path}: sigma^2-rescaled pair loss (mean over {args.pairs} pairs, last 10 grid sigmas)")
        print("| direction | " + " | ".join(f"s = {s:g}" for s in SCALES) + " |")
        print("|---|" + "---|" * len(SCALES))
        with torch.no_grad():
            for name, d in (("s x r_true", r_true), ("s x start", start)):
                row = [float(rescaled_loss(den, s * d, landscape).mean()) for s in SCALES]
                print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        r = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([r], lr=args.lr)
        g = torch.Generator().manual_seed(args.seed + 2)
        print(f"\nAdam descent from the start, lr {args.lr:g}, batch {BATCH} pairs")
        print("| iteration | loss | rms r | cosine to r_true | M_r | V_r |")
        print("|---|---|---|---|---|---|")
        for i in range(args.iterations + 1):
            loss = rescaled_loss(den, r, common_pairs(den, BATCH, 10, g)).mean()
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
