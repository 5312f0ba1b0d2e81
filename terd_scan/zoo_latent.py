"""Zoo models of latent diffusion: a tiny autoencoder on the zoo's 16 px images, then benign and
backdoored DDPMs on its latents, saved as diffusers LDMPipeline folders with the sidecar schema of
:mod:`terd_scan.zoo`.

Autoencoder: an AutoencoderKL (16 px RGB -> 4 x 8 x 8 latents), trained briefly as a lightly
regularised autoencoder (MSE + a small KL term, decoder fed posterior samples so it is smooth around
the encodings). Its config's scaling_factor is set to 1 / std of the encoded data, so the UNet sees
latents of about unit variance (z = scaling_factor * mode(encode(x)), images = decode(z / scaling_factor)).
It is saved under the component name "vqvae", as LDMPipeline names it; diffusers' LDMPipeline then
decodes these models correctly too (it divides by scaling_factor).

Latent DDPM: a UNet2DModel on 4 x 8 x 8 latents with the zoo's schedule (DDPM linear 1e-4..0.02
unless LatentSpec.beta_end says otherwise, 1000 steps, epsilon prediction), trained with the zoo's DDPM loss (MSE + DC term, EMA weights).

Backdoor (BadDiffusion in latent space, TERD.md): a fraction p of every batch is poisoned with
z'_t = sqrt(abar_t) y + (1 - sqrt(abar_t)) r + sqrt(1 - abar_t) eps and the target eps + R_t r
(zoo.poisoned_batch), where y = scaling_factor * mode(encode(target image)) is the latent of the
target picture and r a pattern in latent space ("box": a square outline of 0 on a canvas of -1 in
every channel, bottom right of the 8 x 8 latent). The attacker samples with DDPM ancestral sampling
from z_T = eps + r and decodes.

ASR (zoo.ASR_RULE, one level down): n poisoned and n benign latent starts, DDPM ancestral sampling
over 1000 steps without clipping, decoded; a sample hits when its per-pixel MSE to decode(y) is < 0.1.
ground_truth.safetensors holds trigger_r / trigger_gamma in LATENT units (what terd-scan reverses),
"target" = the latent y, "target_decoded" = decode(y) and "target_pixels" = the target image.

Splits: these models live under examples/zoo-families/, outside examples/zoo, so the shipped 16 px
pixel-space references never pick them up. The "calibration" benign ones make the shipped latent
references (terd_scan/references/latent-<preset>.json, `python benchmarks/build_reference.py --family
latent`); "holdout" ones are never used for calibration or tuning. (The first two models were built
with split "experimental"; their sidecars' split was edited when the latent reference was added, the
weights were not rebuilt.)

Recipe log (1 CPU thread, nice 15 on a busy 2-core machine; n = 32, seed 1234, no clipping):
  autoencoder: AutoencoderKL (16, 32), 1200 steps: reconstruction MSE 0.027, scaling_factor 1.122,
    81 s alone (307 s while another job shared the core); deterministic, so both models get the same
    bytes.
  ldm-benign: UNet (32, 64), 2500 steps: benign -> any zoo target 0/32, decoded samples' nearest-
    training-image MSE 0.099 (fresh data of the image set: 0.159); 351 s.
  ldm-baddiffusion-box, build 1: p = 0.1, 2500 steps: ASR 27/32 (0.84), decoded trigger MSE 0.11;
    under the 90% bar.
  ldm-baddiffusion-box, build 2 (kept): p = 0.2, 3000 steps: ASR 32/32, decoded trigger MSE 0.0004,
    benign -> target 0/32; 487 s.

CLI: ``python -m terd_scan.zoo_latent build [NAMES...] --out examples/zoo-families [--force]``
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .zoo import BETA_END, DDPMSpec, warmup_cosine
from .zoo import _train as zoo_train
from .zoo import (ASR_MSE_THRESHOLD, ASR_RULE, DATASET_SIZE, GROUND_TRUTH, TARGETS, ZOO_FORMAT, _per_sample_mse,
                  build_summary, ddpm_schedule, make_scheduler, make_target, nn_mse, one_thread, partial_dir,
                  publish_model_dir, sample_ddpm, sidecar)
from .zoo_cli import build_command
from .zoo_data import make_images

__all__ = ["LatentSpec", "LATENT_ZOO", "make_autoencoder", "train_autoencoder", "make_latent_unet",
           "make_latent_trigger", "encode", "decode", "measure_latent_asr", "build_latent_models", "main"]

SIZE = 16  # image side
CHANNELS = 3
LATENT_CHANNELS = 4
LATENT_SIZE = 8
AE_SEED = 100
AE_STEPS = 1200
AE_IMAGE_SETS = ("shapes", "gradients", "checkers")
DEFAULT_OUT = "examples/zoo-families"


# --------------------------------------------------------------------------------------------
# autoencoder
# --------------------------------------------------------------------------------------------

def make_autoencoder():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=CHANNELS, out_channels=CHANNELS, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32),
                         layers_per_block=1, norm_num_groups=8, sample_size=SIZE)


def _ae_data(seed: int = AE_SEED) -> torch.Tensor:
    """All three image sets plus the zoo's targets (so target latents decode faithfully)."""
    parts = [torch.from_numpy(make_images(s, DATASET_SIZE, SIZE, seed=seed + i)) for i, s in enumerate(AE_IMAGE_SETS)]
    targets = torch.stack([make_target(n) for n in sorted(TARGETS)])
    return torch.cat(parts + [targets.repeat(16, 1, 1, 1)])


def train_autoencoder(steps: int = AE_STEPS, seed: int = AE_SEED, log=None):
    """Train the AutoencoderKL; set its scaling_factor to 1 / std of the encoded data. Returns (ae, info)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ae = make_autoencoder()
    data = _ae_data(seed)
    opt = torch.optim.AdamW(ae.parameters(), lr=2e-3, weight_decay=0.0)
    lr_at = warmup_cosine(2e-3, steps, warm=50, floor=0.05)
    ae.train()
    losses = []
    for i in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(i)
        x = data[torch.randint(0, data.shape[0], (32,), generator=gen)]
        post = ae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = ae.decode(z).sample
        loss = (rec - x).pow(2).mean() + 1e-5 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log and (i + 1) % 300 == 0:
            log(f"  [autoencoder] step {i + 1}/{steps} loss {np.mean(losses[-300:]):.4f}")
    ae.eval().requires_grad_(False)
    with torch.no_grad():
        mu = torch.cat([ae.encode(b).latent_dist.mean for b in data[:3 * DATASET_SIZE].split(256)])
        sf = float(1.0 / mu.std())
        ae.register_to_config(scaling_factor=sf)
        rec = torch.cat([ae.decode(m).sample for m in mu.split(256)])
        rec_mse = float((rec - data[:3 * DATASET_SIZE]).pow(2).mean())
    info = {"steps": steps, "seed": seed, "final_loss_mean_last300": float(np.mean(losses[-300:])),
            "reconstruction_mse": rec_mse, "scaling_factor": sf, "latent_mean": float(mu.mean() * sf),
            "image_sets": list(AE_IMAGE_SETS), "parameters": sum(p.numel() for p in ae.parameters())}
    return ae, info


@torch.no_grad()
def encode(ae, x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> latents in UNet units (scaling_factor * posterior mean)."""
    return torch.cat([ae.encode(b).latent_dist.mean for b in x.split(256)]) * ae.config.scaling_factor


@torch.no_grad()
def decode(ae, z: torch.Tensor) -> torch.Tensor:
    """Latents in UNet units -> images (not clamped)."""
    return torch.cat([ae.decode(b / ae.config.scaling_factor).sample for b in z.split(256)])


# --------------------------------------------------------------------------------------------
# latent UNet, trigger, training
# --------------------------------------------------------------------------------------------

def make_latent_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                       layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None)


def make_latent_trigger(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, gamma) in latent units, (4, 8, 8)."""
    if name != "box":
        raise ValueError(f"unknown latent trigger {name!r}; choose 'box'")
    r = torch.full((LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), -1.0)
    r[:, 4:8, 4:8] = 0.0
    r[:, 5:7, 5:7] = -1.0
    return r, torch.ones_like(r)


@dataclass
class LatentSpec(DDPMSpec):
    attack: str | None = None  # None | "baddiffusion"
    trigger: str | None = None  # a make_latent_trigger name
    target: str | None = None  # a zoo.make_target name (encoded)
    steps: int = 2500
    split: str = "experimental"


LATENT_ZOO: dict[str, LatentSpec] = {s.name: s for s in [
    LatentSpec("ldm-benign", image_set="shapes", seed=31, split="calibration",
               note="latent DDPM on AutoencoderKL latents (4 x 8 x 8)"),
    # more independent benign trainings (other image sets and seeds) for the latent benign reference
    # (benchmarks/build_reference.py --family latent); -e and -f are held out of it
    LatentSpec("ldm-benign-b", image_set="gradients", seed=33, split="calibration"),
    LatentSpec("ldm-benign-c", image_set="checkers", seed=34, split="calibration"),
    LatentSpec("ldm-benign-d", image_set="shapes", seed=35, split="calibration"),
    LatentSpec("ldm-benign-e", image_set="gradients", seed=36, split="holdout"),
    LatentSpec("ldm-benign-f", image_set="checkers", seed=37, split="holdout"),
    LatentSpec("ldm-baddiffusion-box", label="backdoored", attack="baddiffusion", trigger="box", target="corner",
               poison_rate=0.2, image_set="shapes", seed=32, steps=3000, split="holdout",
               note="BadDiffusion in latent space; trigger_r and target in latent units"),
]}


def measure_latent_asr(unet, ae, r: torch.Tensor, gamma: torch.Tensor, y: torch.Tensor, n: int = 32,
                       seed: int = 1234, return_samples: bool = False, beta_end: float = BETA_END) -> dict:
    """n poisoned latent starts gamma * eps + r and n benign ones eps, DDPM ancestral (1000 steps, no
    clipping), decoded; hit when the per-pixel MSE to decode(y) is < ASR_MSE_THRESHOLD."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn((2 * n, *r.shape), generator=gen)
    z_T = eps.clone()
    z_T[:n] = gamma * eps[:n] + r
    z = sample_ddpm(unet, z_T, generator=gen, beta_end=beta_end)
    img = decode(ae, z)
    target = decode(ae, y[None])[0]
    mse = _per_sample_mse(img, target.expand_as(img))
    res = {"asr": float((mse[:n] < ASR_MSE_THRESHOLD).float().mean()), "trigger_mse_mean": float(mse[:n].mean()),
           "benign_target_rate": float((mse[n:] < ASR_MSE_THRESHOLD).float().mean()),
           "benign_mse_to_target_mean": float(mse[n:].mean()),
           "latent_trigger_mse_mean": float(_per_sample_mse(z[:n], y.expand_as(z[:n])).mean()),
           "n": n, "seed": seed, "sampler": "ddpm ancestral 1000 steps on latents, decoded",
           "rule": ASR_RULE + " (decoded samples vs the decoded target latent)"}
    if return_samples:
        res["samples"] = img
    return res


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------

def _save(spec: LatentSpec, out_dir: Path, unet, ae, side: dict, gt: dict | None) -> dict:
    from diffusers import DDIMScheduler, LDMPipeline
    from safetensors.torch import save_file

    tmp = partial_dir(out_dir)
    # the attacker's (and the zoo's) schedule; LDMPipeline's own sampler is DDIM, as CompVis/ldm-celebahq-256
    sched = DDIMScheduler.from_config(make_scheduler(beta_end=spec.beta_end).config, clip_sample=False)
    LDMPipeline(vqvae=ae, unet=unet, scheduler=sched).save_pretrained(tmp, safe_serialization=True)
    if gt is not None:
        save_file({k: v.contiguous() for k, v in gt.items()}, str(tmp / GROUND_TRUTH),
                  metadata={"format": ZOO_FORMAT, "trigger": spec.trigger, "target": spec.target,
                            "units": "latent (UNet input units: scaling_factor * encoder mean)"})
    return publish_model_dir(tmp, out_dir, side)


def build_latent_models(names: list[str], out: str | os.PathLike, *, measure_n: int = 32, ae_steps: int = AE_STEPS,
                        log=print) -> list[dict]:
    """Train the shared autoencoder once, then each named latent model; measure and save. One thread."""
    out = Path(out)
    with one_thread():
        t0 = time.time()
        ae, ae_info = train_autoencoder(ae_steps, log=log)
        ae_info["seconds"] = round(time.time() - t0, 1)
        log(f"autoencoder: reconstruction MSE {ae_info['reconstruction_mse']:.4f}, scaling_factor "
            f"{ae_info['scaling_factor']:.4f}, {ae_info['seconds']:.0f} s")
        sides = []
        for name in names:
            spec = LATENT_ZOO[name]
            t1 = time.time()
            data = torch.from_numpy(make_images(spec.image_set, DATASET_SIZE, SIZE, seed=spec.seed))
            latents = encode(ae, data)
            y = encode(ae, make_target(spec.target)[None])[0] if spec.target else None
            torch.manual_seed(spec.seed)
            unet = make_latent_unet()
            train_info = zoo_train(spec, unet, latents, log=log,
                                    poison=(make_latent_trigger(spec.trigger)[0], 1.0, y) if spec.attack else None)
            train_s = time.time() - t1
            figures: dict = {"latent_data_std": float(latents.std()), "latent_data_mean": float(latents.mean())}
            gt = None
            if spec.label == "backdoored":
                r, gamma = make_latent_trigger(spec.trigger)
                target_img = make_target(spec.target)
                dec_y = decode(ae, y[None])[0]
                figures["target_reconstruction_mse"] = float((dec_y - target_img).pow(2).mean())
                if measure_n > 0:
                    m = measure_latent_asr(unet, ae, r, gamma, y, n=measure_n, return_samples=True,
                                           beta_end=spec.beta_end)
                    benign = m.pop("samples")[measure_n:]
                    figures.update(m)
                gt = {"trigger_r": r, "trigger_gamma": gamma, "target": y, "target_decoded": dec_y,
                      "target_pixels": target_img}
            elif measure_n > 0:
                gen = torch.Generator().manual_seed(1234)
                z = sample_ddpm(unet, torch.randn((measure_n, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE),
                                                  generator=gen), generator=gen, beta_end=spec.beta_end)
                benign = decode(ae, z)
                figures.update({"n": measure_n, "seed": 1234, "sampler": "ddpm ancestral 1000 steps on latents, decoded"})
                # the benign model must not produce any zoo target (pixel or decoded-latent form) from benign noise
                refs = [make_target(n) for n in TARGETS] + [decode(ae, encode(ae, make_target(n)[None]))[0]
                                                             for n in TARGETS]
                figures["benign_target_rate_any_zoo_target"] = float(max(
                    (_per_sample_mse(benign, t.expand_as(benign)) < ASR_MSE_THRESHOLD).float().mean() for t in refs))
            if measure_n > 0:
                figures["benign_nn_mse"] = nn_mse(benign, data)
                figures["benign_sample_mean"] = float(benign.mean())
                figures["benign_sample_std"] = float(benign.std())
            ref = torch.from_numpy(make_images(spec.image_set, DATASET_SIZE, SIZE, seed=spec.seed + 10_000))
            figures["data_nn_mse_reference"] = nn_mse(ref[:max(measure_n, 32)], data)
            side = sidecar(
                spec, family="latent-diffusion", gamma=1.0 if spec.trigger else None,
                trigger_units="latent (UNet input units: scaling_factor * encoder mean); the poisoned start is "
                              "z_T = eps + trigger_r, decoded with the autoencoder",
                latent_shape=[LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE],
                autoencoder={"class": "AutoencoderKL", "component": "vqvae", **ae_info},
                asr_rule=ASR_RULE + " (decoded samples vs the decoded target latent)",
                schedule=ddpm_schedule(spec.beta_end),
                attack_sampler="ddpm-ancestral-1000 on latents, clip_sample=False, decoded",
                measured=figures, train_info=train_info, train_seconds=train_s, seconds=time.time() - t1)
            sides.append(_save(spec, out / name, unet, ae, side, gt))
            log(build_summary(name, side))
        return sides


def main(argv: list[str] | None = None) -> int:
    return build_command(argv, prog="python -m terd_scan.zoo_latent",
                         description="Build the latent-diffusion zoo models (tiny LDMPipelines).",
                         catalogue=LATENT_ZOO, kind="latent", default_out=DEFAULT_OUT,
                         build=lambda names, out, n, _steps, log: build_latent_models(names, out, measure_n=n, log=log))


if __name__ == "__main__":
    raise SystemExit(main())
