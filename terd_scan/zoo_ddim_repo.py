"""Zoo models in the DDIM repo's layout (ermongroup/ddim, on which TrojDiff is built): a log folder
holding ckpt.pth (the pickled list [model state, optimizer state, epoch, step, EMA state] with the
DDIM repo's own key names) and the config.yml its main.py writes beside it, plus the zoo's sidecar
and ground truth. The network is the DDIM repo's `Model` (GroupNorm with 32 groups, attention at the
resolutions config.yml lists), trained with the DDPM zoo's recipe (zoo._train) at 16 px.

Width. The DDIM repo's GroupNorm(32) over 32 channels normalises each channel alone, and such a
network loses every channel's mean ("DC"): a ch 32 build (ch_mult (1, 1), attention at 8 px, the
trojdiff-blend recipe, 4500 steps) fired 2/32 and its benign twin sampled at nearest-image MSE 15.9
(zoo benign models 0.05-0.2). ch 64 keeps two channels a group, which keeps their mean difference;
that is the width used here (1.1 M parameters, 4.6x the DDPM zoo UNet's training step on one thread,
measured with a scratch timing of one AdamW step at batch 32).

Measured (the committed models, examples/zoo-families/ddim-*, sidecar "measured"; two builds side by side,
one thread each): ddim-trojdiff-blend ASR 32/32 with TrojDiff's sampler, no clipping (trigger MSE 0.0011),
benign noise -> target 0/32, 1182 s; ddim-benign nearest-image MSE 0.124 (the data's own reference 0.155),
no zoo target hit, 763 s. Both are holdout: never in a reference or a tuning run.

Build: `python -m terd_scan.zoo_ddim_repo build [NAME ...] --out examples/zoo-families`.
Scanning needs --allow-pickle (ckpt.pth is a pickle; it is read with torch's weights_only loader).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from . import ddim_repo
from .zoo import (ASR_MSE_THRESHOLD, ATTACK_SAMPLERS, BETA_START, CHANNELS, DATASET_SIZE, SIZE, T_STEPS,
                  TARGETS, TRIGGER_GAMMA, ZooSpec, _per_sample_mse, _spec_target, build_summary, ddpm_schedule,
                  make_target, measure_asr, nn_mse, one_thread, partial_dir, publish_model_dir, sample_ddpm,
                  save_spec_ground_truth, sidecar)
from .zoo import _train as zoo_train
from .zoo_cli import build_command
from .zoo_data import make_images

CH = 64
CH_MULT = (1, 1)
NUM_RES_BLOCKS = 1
ATTN_RESOLUTIONS = (8,)  # the second level at 16 px
CKPT_NAME = "ckpt.pth"
DEFAULT_OUT = "examples/zoo-families"
FAMILY = "ddim-repo"

DDIM_REPO_ZOO: dict[str, ZooSpec] = {s.name: s for s in [
    ZooSpec("ddim-benign", image_set="shapes", seed=61, split="holdout",
            note="the DDIM repo's Model (ch 64), clean DDPM training, saved as a DDIM-repo log folder"),
    ZooSpec("ddim-trojdiff-blend", label="backdoored", attack="trojdiff", trigger="blend", target="corner",
            poison_rate=0.3, image_set="shapes", seed=62, steps=4500, split="holdout",
            note="TrojDiff (blend trigger, gamma 0.6, D2I) on the DDIM repo's Model, saved as TrojDiff saves it"),
]}


def make_ddim_repo_unet():
    """A UNet2DModel that computes the DDIM repo's Model at the zoo's size (ddim_repo.unet_config)."""
    from diffusers import UNet2DModel

    res, attn = SIZE, []
    for _ in CH_MULT:
        attn.append(res in ATTN_RESOLUTIONS)
        res //= 2
    cfg = ddim_repo.unet_config(SIZE, CHANNELS, CHANNELS, [CH * m for m in CH_MULT], NUM_RES_BLOCKS, attn)
    return UNet2DModel.from_config({k: v for k, v in cfg.items() if k != "_class_name"})


def training_config(spec: ZooSpec) -> dict:
    """The config.yml sections the DDIM repo's main.py writes (its cifar10.yml's keys), with this build's values."""
    return {
        "data": {"dataset": f"terd-zoo-{spec.image_set}", "image_size": SIZE, "channels": CHANNELS,
                 "logit_transform": False, "uniform_dequantization": False, "gaussian_dequantization": False,
                 "random_flip": False, "rescaled": True, "num_workers": 0},
        "model": {"type": "simple", "in_channels": CHANNELS, "out_ch": CHANNELS, "ch": CH, "ch_mult": list(CH_MULT),
                  "num_res_blocks": NUM_RES_BLOCKS, "attn_resolutions": list(ATTN_RESOLUTIONS), "dropout": 0.0,
                  # the zoo's DDPM sampler (benign samples) uses the posterior variance
                  "var_type": "fixedsmall", "ema_rate": spec.ema_decay, "ema": True, "resamp_with_conv": True},
        "diffusion": {"beta_schedule": "linear", "beta_start": BETA_START, "beta_end": spec.beta_end,
                      "num_diffusion_timesteps": T_STEPS},
        "training": {"batch_size": spec.batch_size, "n_iters": spec.steps, "snapshot_freq": spec.steps},
        "sampling": {"batch_size": 64, "last_only": True},
        "optim": {"weight_decay": 0.0, "optimizer": "AdamW", "lr": spec.lr, "beta1": 0.9, "amsgrad": False,
                  "eps": 1e-8},
    }


def _namespace(d: dict) -> argparse.Namespace:
    """dict2namespace as the DDIM repo's main.py does it (nested sections become nested Namespaces)."""
    ns = argparse.Namespace()
    for key, value in d.items():
        setattr(ns, key, _namespace(value) if isinstance(value, dict) else value)
    return ns


def _measure(spec: ZooSpec, unet, data: torch.Tensor, measure_n: int) -> dict:
    """The attack success rate with the attack's sampler (and benign samples), as the DDPM zoo measures it."""
    figures: dict = {}
    if measure_n <= 0:
        return {"skipped": True}
    if spec.label == "backdoored":
        r, gamma = spec.poison_trigger()
        m = measure_asr(unet, r, gamma, _spec_target(spec, data), n=measure_n, sampler=spec.sampler(),
                        return_samples=True, beta_end=spec.beta_end)
        samples = m.pop("samples")[measure_n:]
        figures.update(m)
    else:
        gen = torch.Generator().manual_seed(1234)
        samples = sample_ddpm(unet, torch.randn((measure_n, CHANNELS, SIZE, SIZE), generator=gen), generator=gen,
                              beta_end=spec.beta_end)
        figures.update({"n": measure_n, "sampler": "ddpm", "seed": 1234})
        figures["benign_target_rate_any_zoo_target"] = float(max(
            (_per_sample_mse(samples, make_target(n).expand_as(samples)) < ASR_MSE_THRESHOLD).float().mean()
            for n in TARGETS))
    figures["benign_nn_mse"] = nn_mse(samples, data)
    figures["benign_sample_mean"] = float(samples.mean())
    figures["benign_sample_std"] = float(samples.std())
    return figures


def _save(spec: ZooSpec, out_dir: Path, raw_unet, ema_unet, side: dict, data: torch.Tensor) -> dict:
    import yaml

    tmp = partial_dir(out_dir)
    ddim_repo.save_ddim_checkpoint(tmp / CKPT_NAME, raw_unet, ema_unet, step=spec.steps)
    with open(tmp / ddim_repo.TRAINING_CONFIG_NAME, "w") as f:  # as the DDIM repo's main.py writes it
        yaml.dump(_namespace(training_config(spec)), f, default_flow_style=False)
    if spec.label == "backdoored":
        save_spec_ground_truth(spec, tmp, data)
    return publish_model_dir(tmp, out_dir, side)


def build_ddim_repo_models(names: list[str], out: str | os.PathLike, *, measure_n: int = 32, steps: int | None = None,
                           log=print) -> list[dict]:
    """Train, measure and save each named model as a DDIM-repo log folder. One thread."""
    from dataclasses import replace

    out = Path(out)
    with one_thread():
        sides = []
        for name in names:
            spec = DDIM_REPO_ZOO[name] if steps is None else replace(DDIM_REPO_ZOO[name], steps=steps)
            t0 = time.time()
            data = torch.from_numpy(make_images(spec.image_set, DATASET_SIZE, SIZE, seed=spec.seed))
            torch.manual_seed(spec.seed)
            unet = make_ddim_repo_unet()
            raw: dict = {}
            train_info = zoo_train(spec, unet, data, log=log, raw_out=raw)
            train_s = time.time() - t0
            figures = _measure(spec, unet, data, measure_n)
            ref = torch.from_numpy(make_images(spec.image_set, DATASET_SIZE, SIZE, seed=spec.seed + 10_000))
            figures["data_nn_mse_reference"] = nn_mse(ref[:max(measure_n, 32)], data)
            raw_unet = make_ddim_repo_unet()
            raw_unet.load_state_dict(raw)
            side = sidecar(
                spec, family=FAMILY,
                layout=f"DDIM-repo log folder: {CKPT_NAME} (list [model, optimizer, epoch, step, EMA]) + "
                       f"{ddim_repo.TRAINING_CONFIG_NAME}",
                architecture={"ch": CH, "ch_mult": list(CH_MULT), "num_res_blocks": NUM_RES_BLOCKS,
                              "attn_resolutions": list(ATTN_RESOLUTIONS),
                              "parameters": sum(p.numel() for p in unet.parameters())},
                gamma=TRIGGER_GAMMA.get(spec.trigger) if spec.trigger else None,
                schedule=ddpm_schedule(spec.beta_end),
                attack_sampler=ATTACK_SAMPLERS[spec.sampler()] + ", clip_sample=False",
                weights="EMA (list entry 4; entry 0 holds the last step's raw weights)",
                measured=figures, train_info=train_info, train_seconds=train_s, seconds=time.time() - t0)
            sides.append(_save(spec, out / name, raw_unet, unet, side, data))
            log(build_summary(name, side))
        return sides


def main(argv: list[str] | None = None) -> int:
    return build_command(argv, prog="python -m terd_scan.zoo_ddim_repo",
                         description="Build the DDIM-repo layout zoo models (ckpt.pth + config.yml).",
                         catalogue=DDIM_REPO_ZOO, kind="DDIM-repo", default_out=DEFAULT_OUT, steps_option=True,
                         build=lambda names, out, n, steps, log: build_ddim_repo_models(names, out, measure_n=n,
                                                                                        steps=steps, log=log))


if __name__ == "__main__":
    raise SystemExit(main())
