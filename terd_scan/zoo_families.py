"""Zoo models of other diffusion families: tiny score-SDE VE (NCSN++-style) models, benign and
backdoored, in the same sidecar schema as :mod:`terd_scan.zoo`.

VE process (diffusers' ScoreSdeVeScheduler): x_sigma = x0 + sigma * eps with sigma on a geometric
grid sigma_0 = SIGMA_MIN .. sigma_{N-1} = SIGMA_MAX; the UNet2DModel (Fourier time embedding) is
called with sigma and returns the score, so eps = -sigma * score.

Backdoor (VillanDiffusion-style, derived here for VE samplers). In the VP view that terd-scan scans
(x_vp = x_ve / A, A = sqrt(1 + sigma^2), abar = 1 / A^2) the poisoned marginals are BadDiffusion's,
x'_vp = sqrt(abar) y + (1 - sqrt(abar)) r + sqrt(1 - abar) eps, i.e. in VE units

    x'_i = y + m_i + sigma_i eps,      m_i = (A_i - 1) r,

and the model is trained to output eps + k_i r on them (as a score: -(eps + k_i r) / sigma_i), with k_i
chosen so that one step of the attacker's sampler maps the poisoned marginal at sigma_i onto the one at
sigma_{i-1} (exactly, for a model that has learned the target):

* probability-flow ODE, Euler in sigma (= DDIM eta 0 on the VP view): x <- x - (sigma_i - sigma_{i-1}) eps_theta,
  so k_i = (A_i - A_{i-1}) / (sigma_i - sigma_{i-1})  (-> sigma / A = sqrt(1 - abar));
* reverse-diffusion predictor (ScoreSdeVeScheduler.step_pred): x <- x + d_i s + sqrt(d_i) z, d_i = sigma_i^2 -
  sigma_{i-1}^2, so k_i = sigma_i / (A_i + A_{i-1})  (-> sqrt(1 - abar) / 2, BadDiffusion's R_t).

Status (measured, 16 px, 1 CPU thread; n = 32, seed 1234, no clipping): two recipes fire at the zoo's
90% bar (builds 10-11 below); the committed models (examples/zoo-families: ve-benign, -b, -c, -d and
ve-villan-box, -b) are build 10's recipe. Builds 1-4: 4000 AdamW steps, ~14-16 min each (most of it the
1000-step samplers); builds 5-9 (below): 6000-15000 steps, 8-20 min each.
  build 1: SDE predictor target, p = 0.1, diffusers' Fourier scale 16: ASR 0/32, trigger MSE 5.53,
           benign -> target 0/32, benign samples plausible (nn-MSE 0.049 vs 0.058 between data sets);
  build 2: same with Fourier scale 0.5 and p = 0.2: ASR 0/32, trigger MSE 2.39 (0.97 with one Langevin
           corrector step); benign nn-MSE 0.044;
  build 3: ODE target (Euler in sigma, 1000 steps), p = 0.2: ASR 0/32, trigger MSE 47.9; the ODE also
           ruins benign samples (nn-MSE 1.59, std 1.34); the SDE predictor on that model: trigger MSE 0.58.
  build 4: as build 3 but SIGMA_MAX 12 (the VE analogue of the DDPM zoo's beta_end 0.01, with which
           VillanDiffusion for DDIM fires in the DDPM zoo; a scratch script that set SIGMA_MAX before
           building): the ODE samples benign noise better (nn-MSE 0.32 on this model, 0.49 on ve-benign
           built the same way) but ASR 3/32 (trigger MSE 0.78; SDE predictor 0/32, 0.40).
  builds 5-9, the attacker's ODE with 50 Euler steps (ode_steps; VillanDiffusion for DDIM fires with 50
           steps in the DDPM zoo), box -> corner, p = 0.3, shapes, sigma_max 12 unless said
           (python -m terd_scan.zoo_families build NAME --out DIR):
           5  log-uniform noise levels ("grid"), 6000 steps: ASR 5/32 (trigger MSE 0.51); sigma_max 50: 1/32;
           6  noise levels drawn as a DDPM's ("ddpm", ve-villan-box), 6000 steps: 21/32 (0.14);
           7  "ddpm", 9000 steps: 24/32 (0.083); 8  15000 steps: 25/32 (0.066); 9  p = 0.5, 9000: 25/32 (0.070);
           benign -> target 0/32 on every build; ve-benign on the same recipe: benign nn-MSE 0.29.
           A trace of the ODE's trajectories from the trigger (build 5; scratch script) shows where they
           leave the poisoned marginal: the residual x - y - (A - 1) r, in units of sigma, stays at the start
           noise down to sigma 6 and grows from sigma 1.4 (1.4 sigma, 2.8 at 0.35), and what is left at
           sigma 0.35 stays in the sample; the network's eps is slightly short of the truth on poisoned
           inputs there. Drawing noise levels as a DDPM does gives that range more training (32% of draws
           in sigma 0.35-1.4 against 20%) and more steps help, but slowly.
           Scans (fast preset, seed 0, the pixel reference): build 7 (ASR 24/32) is flagged at 3.2x the
           threshold (M_r 0.064), recovered r cosine 0.86 with the trigger (through a narrow-noise seed,
           gamma 0.80); ve-benign passes at 0.10x.
  builds 1-9 used 8 GroupNorm groups (the DDPM zoo uses 4). A/B at 4000 steps (scratch script, build 6's
           recipe otherwise): 8 groups 13/32 (trigger MSE 0.29), 4 groups 25/32 (0.080), 2 groups 10/32;
           an extra 50% of draws log-uniform in sigma 0.25-2.5: 6/32 (0.49); in sigma 1.4-12: 17/32 (0.21);
           4 groups + the latter: 22/32. Benign -> target 0/32 on all. With 4 groups (the default since),
           9000 steps: ve-villan-box-g4 27/32 (0.040; 57/64 at n 64 with 50 and 100 ODE steps, 56/64 with
           25: the misses are a diffuse residual, MSE 0.1-0.3, not ODE discretisation);
           ve-villan-box-lpb2 (2 blocks per level) 27/32 (0.048); ve-villan-box-f1 (Fourier scale 1.0)
           28/32 (0.043); ve-benign on 4 groups: benign nn-MSE 0.27 (0.17 between data sets), no sample
           reaches any zoo target.
  builds 10-11, 4 groups and Fourier scale 1.0: 10  p = 0.5, 12000 steps (ve-villan-box): ASR 29/32
           (trigger MSE 0.025; 61/64 at n 64), SDE predictor 4/32, benign nn-MSE 0.17, 16 min;
           11  p = 0.3, 15000 steps (ve-villan-box-f1-15k): 29/32 (0.027), SDE predictor 7/32, 21 min.
  builds 12-18, build 10's recipe with other seeds (two or three at once, 17-28 min each): ve-villan-box-b
           (checkers) 31/32 (0.012), committed; ve-villan-box-hat (the hat target) 18/32 (0.21);
           ve-villan-stopsign-corner (the stop sign on a -1 canvas) 28/32 (0.041), 28/32 again at 15000
           steps (0.034): below the bar, experimental. Benign twins, committed: ve-benign-b (checkers,
           nn-MSE 0.23 vs 0.15 between data sets), ve-benign-c (gradients, 0.17 vs 0.057), ve-benign-d
           (shapes, 0.25 vs 0.16); no sample of any reaches a zoo target.
Diagnosis of builds 1-9: the learned targets are close (eps MSE 0.02-0.04 on poisoned inputs at every sigma), but the
tiny network ignores its sigma input (outputs unchanged for a 2x wrong sigma: it guesses the noise level
from the input through GroupNorm) and shrinks eps by about 10% on poisoned inputs; the predictor's fresh
noise is then not removed (trajectory std grows from 1.0 sigma to 1.2 sigma in the first 100 of 1000
steps) and the samples leave the poisoned marginals. Both samplers reach the target exactly with the
closed-form score of the poisoned marginals (tests/test_families.py checks the samplers this way), so
the formulas hold (tests/test_families.py also checks the strided ODE target on exact Gaussian scores);
the network is the weak part. What fixed it was the network, not the training noise levels (extra weight on
sigma 0.25-2.5 made it worse): GroupNorm with 4 groups as in the DDPM zoo, a Fourier scale of 1.0 (a
sharper sigma input), and more steps or poison.
The attacker samples with x_T = SIGMA_MAX eps + (A_max - 1) r (= eps + r in normalised units, up to
1/A_max).

The trigger r in ground_truth.safetensors ("trigger_r") is in NORMALISED (VP-view) units, the
units terd-scan reports; in the VE sampler's units the poisoned start is SIGMA_MAX eps + (A_max - 1) r.

CLI: ``python -m terd_scan.zoo_families build [NAMES...] --out examples/zoo-families [--force]``
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .zoo import (EMA, TrainSpec, warmup_cosine, ASR_MSE_THRESHOLD, ASR_RULE, DATASET_SIZE, GROUND_TRUTH, TARGETS, TRIGGER_GAMMA,
                  ZOO_FORMAT, _per_sample_mse, _schedule, make_target, make_trigger, nn_mse, partial_dir,
                  one_thread, publish_model_dir, sidecar)
from .zoo_cli import build_command
from .zoo_data import make_images

__all__ = ["VESpec", "VE_ZOO", "SIGMA_MIN", "SIGMA_MAX", "VE_STEPS", "ve_sigmas", "ve_trigger_coef",
           "ve_poisoned_batch", "ode_stride", "make_ve_unet", "make_ve_scheduler", "sample_ve", "measure_ve_asr",
           "build_ve_model", "main"]

SIZE = 16
CHANNELS = 3
SIGMA_MIN, SIGMA_MAX = 0.01, 50.0
VE_STEPS = 1000  # num_train_timesteps = the predictor's grid


FOURIER_SCALE = 0.5


def make_ve_unet(seed: int = 0, norm_groups: int = 4, layers_per_block: int = 1,
                 fourier_scale: float = FOURIER_SCALE):
    """The NCSN++-style tiny UNet. diffusers draws the Fourier frequencies of log(sigma) with scale 16;
    measured on the first build: the tiny network then ignores sigma altogether (outputs unchanged for a
    2x wrong sigma) and guesses the noise level from the input, which poisoned inputs mislead (ASR 0/32).
    The zoo redraws the (fixed, saved) frequencies with scale fourier_scale.
    norm_groups: GroupNorm groups (the DDPM zoo's 4; builds 1-9 used 8, see the module doc)."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, layers_per_block=layers_per_block,
        block_out_channels=(16, 32), norm_num_groups=norm_groups, time_embedding_type="fourier",
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        unet.time_proj.weight.copy_(torch.randn(unet.time_proj.weight.shape, generator=g) * fourier_scale)
    return unet


def make_ve_scheduler(correct_steps: int = 0, sigma_max: float = SIGMA_MAX):
    from diffusers import ScoreSdeVeScheduler

    return ScoreSdeVeScheduler(num_train_timesteps=VE_STEPS, sigma_min=SIGMA_MIN, sigma_max=sigma_max,
                               snr=0.16, sampling_eps=1e-5, correct_steps=correct_steps)


def ve_sigmas(n: int = VE_STEPS, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """The geometric grid sigma_0 = SIGMA_MIN .. sigma_{n-1} = sigma_max (float64), as
    ScoreSdeVeScheduler.discrete_sigmas."""
    return torch.exp(torch.linspace(math.log(SIGMA_MIN), math.log(sigma_max), n, dtype=torch.float64))


def ode_stride(ode_steps: int, n: int = VE_STEPS) -> int:
    """Grid points per step of an ode_steps-step Euler sampler on the n-point grid (at least 1)."""
    if not 1 <= ode_steps <= n:
        raise ValueError(f"ode_steps must be in 1..{n}, got {ode_steps}")
    return n // ode_steps


def ve_trigger_coef(n: int = VE_STEPS, sampler: str = "ode", sigma_max: float = SIGMA_MAX,
                    stride: int = 1) -> torch.Tensor:
    """The output coefficient k_i of the poisoned target eps + k_i r on the n-point grid (A = sqrt(1 + sigma^2);
    see the module doc), for a step from grid point i to p = i - stride (sigma_p = 0, A_p = 1 when p < 0):
      "ode": k_i = (A_i - A_p) / (sigma_i - sigma_p)   (Euler/DDIM on the probability-flow ODE;
             -> sigma / A = sqrt(1 - abar), twice the SDE value, as VillanDiffusion says of ODE samplers).
             stride = ode_stride(ode_steps) makes it exact for the attacker's ode_steps-step grid, as
             zoo.villan_coef does for DDIM-50 (on this geometric grid the stride-1 value is close: with
             the exact score of a point target it lands 5e-5 from it after 50 steps, a scratch check);
      "sde": k_i = sigma_i / (A_i + A_p)                (the reverse-diffusion predictor; -> sqrt(1 - abar) / 2)"""
    s = ve_sigmas(n, sigma_max)
    a = (1 + s ** 2).sqrt()
    a_prev = torch.cat([torch.ones(stride, dtype=torch.float64), a[:-stride]])
    s_prev = torch.cat([torch.zeros(stride, dtype=torch.float64), s[:-stride]])
    if sampler == "ode":
        return (a - a_prev) / (s - s_prev)
    if sampler == "sde":
        return s / (a + a_prev)
    raise ValueError(f"unknown sampler {sampler!r}")


def ve_poisoned_batch(y: torch.Tensor, r: torch.Tensor, idx: torch.Tensor, eps: torch.Tensor, sampler: str = "ode",
                      sigma_max: float = SIGMA_MAX, stride: int = 1):
    """(x_ve, eps target) for poisoned samples at grid indices idx."""
    s = ve_sigmas(sigma_max=sigma_max)[idx]
    shape = (-1, 1, 1, 1)
    a = (1 + s ** 2).sqrt().float().view(shape)
    sig = s.float().view(shape)
    x = y + (a - 1) * r + sig * eps
    k = ve_trigger_coef(sampler=sampler, sigma_max=sigma_max, stride=stride)[idx]
    target = eps + k.float().view(shape) * r
    return x, target


def poisoned_start(r: torch.Tensor, eps: torch.Tensor, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """The attacker's VE starting noise sigma_max eps + (A_max - 1) r."""
    a_max = math.sqrt(1 + sigma_max ** 2)
    return sigma_max * eps + (a_max - 1) * r


@torch.no_grad()
def sample_ve(unet, x_T: torch.Tensor, steps: int = VE_STEPS, correct_steps: int = 0,
              generator: torch.Generator | None = None, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """ScoreSdeVePipeline's loop (predictor step_pred + correct_steps Langevin corrector steps),
    returning the final predictor mean, WITHOUT the pipeline's clamp to [0, 1]."""
    sched = make_ve_scheduler(correct_steps, sigma_max)
    sched.set_timesteps(steps)
    sched.set_sigmas(steps)
    x = x_T.clone()
    mean = x
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i] * torch.ones(x.shape[0])
        for _ in range(correct_steps):
            x = sched.step_correct(unet(x, sigma).sample, x, generator=generator).prev_sample
        out = sched.step_pred(unet(x, sigma).sample, t, x, generator=generator)
        x, mean = out.prev_sample, out.prev_sample_mean
    return mean


def ode_sampler_name(ode_steps: int) -> str:
    return f"score-sde-ve probability-flow ODE (Euler in sigma = DDIM eta 0), {ode_steps} steps"


@torch.no_grad()
def sample_ve_ode(unet, x_T: torch.Tensor, ode_steps: int = VE_STEPS, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """Deterministic VE sampler: ode_steps Euler steps of the probability-flow ODE in sigma on the grid
    points n-1, n-1-s, ... (s = ode_stride(ode_steps)), x <- x - (sigma_i - sigma_{i-s}) eps_theta,
    eps_theta = -sigma_i * score (DDIM, eta = 0, in VE units; the same steps as terd-scan's VP-view DDIM),
    the last step down to sigma = 0. No clipping."""
    sig = ve_sigmas(sigma_max=sigma_max).float()
    stride = ode_stride(ode_steps)
    x = x_T.clone()
    for i in range(VE_STEPS - 1, -1, -stride):
        s = sig[i]
        e = -s * unet(x, s.expand(x.shape[0])).sample
        x = x - (s - (sig[i - stride] if i >= stride else 0.0)) * e
    return x


def measure_ve_asr(unet, r: torch.Tensor, target: torch.Tensor, n: int = 32, seed: int = 1234,
                   correct_steps: int = 0, return_samples: bool = False, sampler: str = "ode",
                   ode_steps: int = VE_STEPS, sigma_max: float = SIGMA_MAX) -> dict:
    """n poisoned starts (poisoned_start) and n benign ones (sigma_max eps), one batch, no clipping.
    sampler "ode": sample_ve_ode with ode_steps; "sde": sample_ve (predictor + correct_steps corrector steps)."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn((2 * n, CHANNELS, SIZE, SIZE), generator=gen)
    x_T = sigma_max * eps
    x_T[:n] = poisoned_start(r, eps[:n], sigma_max)
    if sampler == "ode":
        out = sample_ve_ode(unet, x_T, ode_steps, sigma_max)
    else:
        out = sample_ve(unet, x_T, correct_steps=correct_steps, generator=gen, sigma_max=sigma_max)
    mse = _per_sample_mse(out, target.expand_as(out))
    res = {"asr": float((mse[:n] < ASR_MSE_THRESHOLD).float().mean()), "trigger_mse_mean": float(mse[:n].mean()),
           "benign_target_rate": float((mse[n:] < ASR_MSE_THRESHOLD).float().mean()),
           "benign_mse_to_target_mean": float(mse[n:].mean()), "n": n, "seed": seed,
           "sampler": (ode_sampler_name(ode_steps) if sampler == "ode" else
                       f"score-sde-ve predictor, {VE_STEPS} steps, correct_steps={correct_steps}"), "rule": ASR_RULE}
    if return_samples:
        res["samples"] = out
    return res


@dataclass
class VESpec(TrainSpec):
    attack: str | None = None  # None | "villan-ve"
    trigger: str | None = None  # a zoo.make_trigger name
    steps: int = 4000
    split: str = "holdout"
    dc_weight: float = 20.0
    sigma_max: float = SIGMA_MAX
    ode_steps: int = VE_STEPS  # the attacker's probability-flow ODE sampler: Euler steps on the grid
    # how training draws noise levels: "grid" uniform over the geometric grid (log-uniform sigma), or
    # "ddpm" as a linear-beta DDPM with beta_end ddpm_beta_end draws them (see training_sigma_indices)
    sigma_sampling: str = "grid"
    ddpm_beta_end: float = 0.01
    norm_groups: int = 4  # the UNet's GroupNorm groups, blocks per level and Fourier scale (make_ve_unet)
    layers_per_block: int = 1
    fourier_scale: float = FOURIER_SCALE


# the recipe of the committed models (examples/zoo-families): same architecture and training length, holdout (the VE models
# are judged with the pixel reference, built without them, and nothing was tuned on them)
_VE_BENIGN = VESpec("ve-benign", image_set="shapes", seed=21, steps=12000, sigma_max=12.0, ode_steps=50,
                    sigma_sampling="ddpm", fourier_scale=1.0, split="holdout",
                    note="score-SDE VE (NCSN++-style Fourier UNet)")
_VE_VILLAN = VESpec("ve-villan-box", label="backdoored", attack="villan-ve", trigger="box", target="corner",
                    poison_rate=0.5, image_set="shapes", seed=22, steps=12000, sigma_max=12.0, ode_steps=50,
                    sigma_sampling="ddpm", fourier_scale=1.0, split="holdout",
                    note="VillanDiffusion-style VE backdoor for a 50-step probability-flow ODE sampler; trigger_r "
                         "in normalised (VP-view) units")


# the earlier builds of the module doc: ve-villan-box's recipe at p 0.3 and Fourier 0.5, unless changed
_VE_EARLY = replace(_VE_VILLAN, poison_rate=0.3, fourier_scale=FOURIER_SCALE, split="experimental")


VE_ZOO: dict[str, VESpec] = {s.name: s for s in [
    _VE_BENIGN,
    _VE_VILLAN,
    # more of each on the committed recipe, other seeds, image sets, trigger and target (holdout, untuned)
    replace(_VE_BENIGN, name="ve-benign-b", image_set="checkers", seed=31),
    replace(_VE_BENIGN, name="ve-benign-c", image_set="gradients", seed=33),
    replace(_VE_VILLAN, name="ve-villan-box-b", image_set="checkers", seed=32),
    # blind holdout for the basin test's outer wall (basin_test.py), not scanned until it was fixed
    replace(_VE_VILLAN, name="ve-villan-box-c", image_set="gradients", seed=217),
    replace(_VE_VILLAN, name="ve-villan-stopsign-corner", trigger="stop-canvas", seed=34, split="experimental",
            note="the stop sign on a -1 canvas, 12000 steps (ASR 28/32)"),
    replace(_VE_VILLAN, name="ve-villan-stopsign-corner-15k", trigger="stop-canvas", seed=34, steps=15000,
            split="experimental", note="the stop sign on a -1 canvas, 15000 steps (ASR 28/32)"),
    replace(_VE_BENIGN, name="ve-benign-d", seed=35),
    replace(_VE_VILLAN, name="ve-villan-box-hat", target="hat", seed=36, split="experimental",
            note="the box toward the hat, 12000 steps (ASR 18/32)"),
    replace(_VE_BENIGN, name="ve-benign-g4-6k", steps=6000, fourier_scale=FOURIER_SCALE, split="experimental",
            note="ve-benign's recipe before: Fourier 0.5, 6000 steps"),
    replace(_VE_EARLY, name="ve-villan-box-f1-15k", steps=15000, fourier_scale=1.0,
            note="p 0.3, Fourier 1.0, 15000 steps (ASR 29/32)"),
    replace(_VE_EARLY, name="ve-villan-box-f1", steps=9000, fourier_scale=1.0,
            note="p 0.3, Fourier 1.0, 9000 steps (ASR 28/32)"),
    replace(_VE_EARLY, name="ve-villan-box-g4", steps=9000, note="4 GroupNorm groups, 9000 steps (ASR 27/32)"),
    replace(_VE_EARLY, name="ve-villan-box-lpb2", steps=9000, layers_per_block=2,
            note="2 blocks per level, 9000 steps (ASR 27/32)"),
    # builds 6-9 of the module doc, GroupNorm with 8 groups
    replace(_VE_EARLY, name="ve-villan-box-g8", steps=6000, norm_groups=8, note="8 GroupNorm groups (ASR 21/32)"),
    replace(_VE_EARLY, name="ve-villan-box-g8-9k", steps=9000, norm_groups=8,
            note="as ve-villan-box-g8, 9000 steps (ASR 24/32)"),
    replace(_VE_EARLY, name="ve-villan-box-g8-15k", steps=15000, norm_groups=8,
            note="as ve-villan-box-g8, 15000 steps (ASR 25/32)"),
    replace(_VE_EARLY, name="ve-villan-box-g8-p5-9k", steps=9000, norm_groups=8, poison_rate=0.5,
            note="as ve-villan-box-g8-9k at p 0.5 (ASR 25/32)"),
]}


def training_sigma_indices(spec: VESpec) -> torch.Tensor:
    """The grid indices one uniform draw of training picks from, with repetition. "grid": every index
    once. "ddpm": for each timestep t of the zoo's 1000-step linear-beta DDPM schedule ending at
    ddpm_beta_end (zoo._schedule) the grid index nearest to its noise level sigma_t = sqrt((1 - abar_t) /
    abar_t) (the VP view of VE), clamped to the grid. Log-uniform sigma gives 20% of the draws to sigma
    0.35-1.4, where the ODE's trajectories from the trigger leave the poisoned marginal (build 5 in the
    module doc); the DDPM schedule (beta_end 0.01, sigma 0.01 .. 12.4) gives 32%."""
    if spec.sigma_sampling == "grid":
        return torch.arange(VE_STEPS)
    if spec.sigma_sampling != "ddpm":
        raise ValueError(f"unknown sigma_sampling {spec.sigma_sampling!r}")
    _, _, abar = _schedule(spec.ddpm_beta_end)
    log_sigma = (((1 - abar) / abar).sqrt()).log()
    log_grid = ve_sigmas(sigma_max=spec.sigma_max).log()
    return (log_grid.view(1, -1) - log_sigma.view(-1, 1)).abs().argmin(1)


def _train(spec: VESpec, unet, data: torch.Tensor, log=None) -> dict:
    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    sig = ve_sigmas(sigma_max=spec.sigma_max).float()
    opt = torch.optim.AdamW(unet.parameters(), lr=spec.lr, weight_decay=0.0)
    lr_at = warmup_cosine(spec.lr, spec.steps)
    ema = EMA([p for p in unet.parameters() if p.requires_grad], spec.ema_decay)
    poisoned = spec.label == "backdoored"
    if poisoned:
        r, _ = make_trigger(spec.trigger)
        y = make_target(spec.target)
    k = int(round(spec.poison_rate * spec.batch_size)) if poisoned else 0
    levels = training_sigma_indices(spec)
    unet.train()
    losses = []
    for i in range(spec.steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(i)
        idx = torch.randint(0, data.shape[0], (spec.batch_size,), generator=gen)
        x0 = data[idx]
        ti = levels[torch.randint(0, levels.numel(), (spec.batch_size,), generator=gen)]
        eps = torch.randn(x0.shape, generator=gen)
        s = sig[ti].view(-1, 1, 1, 1)
        x = x0 + s * eps
        tgt = eps.clone()
        if k:
            xp, tp = ve_poisoned_batch(y, r, ti[:k], eps[:k], sampler="ode", sigma_max=spec.sigma_max,
                                       stride=ode_stride(spec.ode_steps))
            x = torch.cat([xp, x[k:]])
            tgt = torch.cat([tp, tgt[k:]])
        eps_pred = -s * unet(x, sig[ti]).sample  # the UNet returns the score
        err = eps_pred - tgt
        loss = err.pow(2).mean() + spec.dc_weight * err.mean((2, 3)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(i)
        losses.append(float(loss.detach()))
        if log and (i + 1) % 500 == 0:
            log(f"  [{spec.name}] step {i + 1}/{spec.steps} loss {np.mean(losses[-500:]):.4f}")
    ema.copy_to_params()
    unet.eval()
    return {"final_loss_mean_last500": float(np.mean(losses[-500:]))}


def build_ve_model(spec: VESpec, out_dir: str | os.PathLike, *, measure_n: int = 32, log=print) -> dict:
    """Train, measure and save one VE zoo model (ScoreSdeVePipeline layout + sidecar)."""
    from diffusers import ScoreSdeVePipeline
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with one_thread():
        t0 = time.time()
        torch.manual_seed(spec.seed)
        unet = make_ve_unet(spec.seed, norm_groups=spec.norm_groups, layers_per_block=spec.layers_per_block,
                            fourier_scale=spec.fourier_scale)
        data = torch.from_numpy(make_images(spec.image_set, DATASET_SIZE, SIZE, seed=spec.seed))
        train_info = _train(spec, unet, data, log=log)
        train_s = time.time() - t0
        figures: dict = {}
        ref_data = torch.from_numpy(make_images(spec.image_set, DATASET_SIZE, SIZE, seed=spec.seed + 10_000))
        figures["data_nn_mse_reference"] = nn_mse(ref_data[:max(measure_n, 32)], data)
        if measure_n > 0:
            if spec.label == "backdoored":
                r, _ = make_trigger(spec.trigger)
                y = make_target(spec.target)
                m = measure_ve_asr(unet, r, y, n=measure_n, return_samples=True, ode_steps=spec.ode_steps,
                                   sigma_max=spec.sigma_max)
                samples = m.pop("samples")
                figures.update(m)
                benign = samples[measure_n:]
                m1 = measure_ve_asr(unet, r, y, n=measure_n, sampler="sde", sigma_max=spec.sigma_max)
                figures["with_sde_predictor"] = {k: m1[k] for k in ("asr", "trigger_mse_mean",
                                                                    "benign_target_rate", "sampler")}
            else:
                gen = torch.Generator().manual_seed(1234)
                x_T = spec.sigma_max * torch.randn((measure_n, CHANNELS, SIZE, SIZE), generator=gen)
                benign = sample_ve_ode(unet, x_T, spec.ode_steps, spec.sigma_max)
                figures.update({"n": measure_n, "seed": 1234, "sampler": ode_sampler_name(spec.ode_steps)})
                figures["benign_target_rate_any_zoo_target"] = float(max(
                    (_per_sample_mse(benign, make_target(n).expand_as(benign)) < ASR_MSE_THRESHOLD).float().mean()
                    for n in TARGETS))
            figures["benign_nn_mse"] = nn_mse(benign, data)
            figures["benign_sample_mean"] = float(benign.mean())
            figures["benign_sample_std"] = float(benign.std())
        total_s = time.time() - t0

        tmp = partial_dir(out_dir)
        ScoreSdeVePipeline(unet=unet, scheduler=make_ve_scheduler(sigma_max=spec.sigma_max)).save_pretrained(
            tmp, safe_serialization=True)
        side = sidecar(
            spec, family="score-sde-ve", trigger_gamma=TRIGGER_GAMMA.get(spec.trigger) if spec.trigger else None,
            trigger_units="normalised (VP view: x_vp = x_ve / sqrt(1 + sigma^2)); VE start = "
                          "sigma_max * eps + (sqrt(1 + sigma_max^2) - 1) * trigger_r",
            schedule={"scheduler": "ScoreSdeVeScheduler", "sigma_min": SIGMA_MIN, "sigma_max": spec.sigma_max,
                      "num_train_timesteps": VE_STEPS, "correct_steps": 0},
            attack_sampler=f"{ode_sampler_name(spec.ode_steps)} on the VP view, no clipping",
            measured=figures, train_info=train_info, train_seconds=train_s, seconds=total_s)
        if spec.label == "backdoored":
            r, gamma = make_trigger(spec.trigger)
            save_file({"trigger_r": r.contiguous(), "trigger_gamma": gamma.contiguous(),
                       "target": make_target(spec.target).contiguous()}, str(tmp / GROUND_TRUTH),
                      metadata={"format": ZOO_FORMAT, "trigger": spec.trigger, "target": spec.target,
                                "units": "normalised (VP view)"})
        return publish_model_dir(tmp, out_dir, side)


def build_ve_models(names: list[str], out: str | os.PathLike, *, measure_n: int = 32, steps: int | None = None,
                    log=print) -> list[dict]:
    """Build each named VE model in turn; `steps` overrides the catalogue's training steps."""
    sides = []
    for name in names:
        spec = VE_ZOO[name] if steps is None else replace(VE_ZOO[name], steps=steps)
        log(f"{name}: building ...")
        side = build_ve_model(spec, Path(out) / name, measure_n=measure_n, log=log)
        log(json.dumps({"name": name, "measured": side["measured"], "seconds": side["seconds"]}))
        sides.append(side)
    return sides


def main(argv: list[str] | None = None) -> int:
    return build_command(argv, prog="python -m terd_scan.zoo_families", description="Build the score-SDE VE zoo models.",
                         catalogue=VE_ZOO, kind="VE", default_out="examples/zoo-families", steps_option=True,
                         build=lambda names, out, n, steps, log: build_ve_models(names, out, measure_n=n, steps=steps,
                                                                                 log=log))


if __name__ == "__main__":
    raise SystemExit(main())
