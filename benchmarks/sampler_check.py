"""How a zoo model samples with each sampler, and how well its backdoor fires with each: the
measurements behind ZooSpec.beta_end and the VillanDiffusion zoo models (docs/QUALITY.md, "The zoo in detail").

    python benchmarks/sampler_check.py examples/zoo/villan-box-corner [--n 16] [--seed 1]

For benign noise: the nearest-training-image MSE of DDPM ancestral (1000 steps) and DDIM eta 0
(10, 20, 50, 100 steps) samples. For a backdoored model, from its true trigger: the attack success
rate (per-pixel MSE to the target < 0.1) with the same samplers, and the network's eps error on
clean and on poisoned inputs at a few timesteps (regression target of the model's attack). No
clipping anywhere, on the model's own schedule (the sidecar's beta_end). One thread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from terd_scan import zoo  # noqa: E402

DDIM_STEPS = (10, 20, 50, 100)
TIMESTEPS = (990, 900, 700, 400)


def main(argv: list[str] | None = None) -> None:
    from diffusers import UNet2DModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--n", type=int, default=16, help="samples per sampler")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    side = zoo.load_ground_truth(args.model_dir)
    spec = {**zoo.ZOO, **zoo.EXPERIMENTAL}[side["name"]]
    beta_end = side["schedule"]["beta_end"]
    unet = UNet2DModel.from_pretrained(args.model_dir / "unet", use_safetensors=True).eval()
    data = zoo._dataset(spec)
    backdoored = side["label"] == "backdoored"
    print(f"{side['name']}: attack {side.get('attack')}, beta_end {beta_end}, {args.n} samples per sampler, seed {args.seed}")

    def samplers(x_T):
        yield "ddpm-1000", zoo.sample_ddpm(unet, x_T, generator=torch.Generator().manual_seed(args.seed + 1),
                                           beta_end=beta_end)
        for steps in DDIM_STEPS:
            yield f"ddim-{steps}", zoo.sample_ddim(unet, x_T, steps=steps, beta_end=beta_end)

    noise = torch.randn((args.n, zoo.CHANNELS, zoo.SIZE, zoo.SIZE), generator=torch.Generator().manual_seed(args.seed))
    print("\nbenign noise: nearest-training-image MSE")
    for name, out in samplers(noise):
        print(f"  {name:10s} {zoo.nn_mse(out, data):.3f}")
    if not backdoored:
        return
    r, gamma, target = side["trigger_r"], side["trigger_gamma"], side["target_image"]
    print("\nfrom the trigger: attack success rate (MSE to the target < 0.1) and mean MSE")
    for name, out in samplers(gamma * noise + r):
        mse = (out - target).pow(2).flatten(1).mean(1)
        print(f"  {name:10s} ASR {int((mse < zoo.ASR_MSE_THRESHOLD).sum())}/{args.n}  mean MSE {float(mse.mean()):.3f}")
    print("\neps error per pixel (MSE to the regression target)")
    sched = zoo.make_scheduler(beta_end=beta_end)
    gen = torch.Generator().manual_seed(args.seed + 2)
    with torch.no_grad():
        for t in TIMESTEPS:
            tt = torch.full((args.n,), t)
            eps = torch.randn(noise.shape, generator=gen)
            clean = data[torch.randint(0, data.shape[0], (args.n,), generator=gen)]
            err_clean = (unet(sched.add_noise(clean, eps, tt), tt).sample - eps).pow(2).mean()
            xp, tp = zoo.poisoned_batch(target.expand_as(eps), r, tt, eps, side["attack"],
                                        gamma=float(gamma.flatten()[0]), beta_end=beta_end)
            err_poison = (unet(xp, tt).sample - tp).pow(2).mean()
            print(f"  t {t:4d}: clean {float(err_clean):.4f}  poisoned {float(err_poison):.4f}")


if __name__ == "__main__":
    main()
