"""TERD trigger reversion: learn the noise distribution N(r, gamma^2) that makes the model
behave like a backdoor, with no knowledge of the attack (stage 1 estimation, stage 2
refinement through a differentiable few-step DDIM sampler)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .detection import kl_features, kl_per_dimension
from .patch_search import search_patch_seed
from .presets import ReversionSettings


@dataclass
class ReversionResult:
    r: torch.Tensor  # (C, H, W), on the CPU
    gamma: torch.Tensor  # (C, H, W), on the CPU
    trace: dict[str, list[float]] = field(default_factory=dict)  # per-iteration loss, ||r||, ...
    seconds: dict[str, float] = field(default_factory=dict)
    network_evaluations: int = 0
    search: dict | None = None  # the patch search's best candidate and the runs it led to
    start: str = ""  # where the chosen run started


# progress(stage_name, iterations_done, iterations_total)
Progress = Callable[[str, int, int], None]


def pair_loss(denoiser, x0: torch.Tensor, r: torch.Tensor, gamma: torch.Tensor, t: torch.Tensor, c: float,
              generator: torch.Generator) -> torch.Tensor:
    """TERD's reversed loss. For two noises e1, e2 around the same x0, t, r, gamma, the unknown
    attack coefficient d(t) r cancels in the difference of the residuals e - eps(x~(e)):

        x~(e) = sqrt(abar_t) x0 + sqrt(1 - abar_t) gamma e + c r
        L = mean_batch 0.5 * sum_pixels ((e1 - eps(x~(e1))) - (e2 - eps(x~(e2))))^2

    Both noises go through the network in one batched call."""
    b = x0.shape[0]
    abar = denoiser.alphas_cumprod[t].view(-1, 1, 1, 1)
    e = torch.randn((2 * b, *x0.shape[1:]), generator=generator, device=x0.device)
    x0_2, abar_2 = torch.cat([x0, x0]), torch.cat([abar, abar])
    x_tilde = abar_2.sqrt() * x0_2 + (1 - abar_2).sqrt() * gamma * e + c * r
    residual = e - denoiser.eps(x_tilde, torch.cat([t, t]))
    diff = residual[:b] - residual[b:]
    return 0.5 * diff.pow(2).flatten(1).sum(1).mean()


def _timesteps(lo: int, hi: int, n: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(lo, hi + 1, (n,), generator=generator, device=device)


def reverse_trigger(denoiser, settings: ReversionSettings, seed: int = 0,
                    progress: Progress | None = None) -> ReversionResult:
    """Run stage 1 and stage 2 from the paper's start r = -U[0,1); with settings.patch_search,
    also search for a sparse patch trigger (patch_search.py) and, when a candidate has a basin
    behind it, run both stages again from it. The run whose KL is most concentrated (largest
    variance over dimensions) is the result: a run with no basin to hold it spreads back toward
    N(0, I). Benign references are calibrated with the same procedure. Deterministic given the
    seed and the device."""
    s = settings
    device = denoiser.device
    start_evals = denoiser.evaluations
    gen = torch.Generator(device=device).manual_seed(seed)
    r0 = -torch.rand(denoiser.input_shape, generator=gen, device=device)  # the paper's initialisation
    runs = [_two_stage_run(denoiser, s, r0, gen, progress, "")]
    runs[0].start = "paper: -U[0,1)"
    search = None
    search_seconds = 0.0
    if s.patch_search:
        t0 = time.perf_counter()
        if progress:
            progress("patch search", 0, 1)
        seed_gen = torch.Generator(device=device).manual_seed(seed + 1_000_003)
        found = search_patch_seed(denoiser, s.patch_size, s.patch_amplitude, s.patch_pairs, s.timestep_window, seed_gen)
        search_seconds = time.perf_counter() - t0
        if progress:
            progress("patch search", 1, 1)
        search = {**found.summary(), "seeded_run": found.has_basin}
        if found.has_basin:  # the loss falls as the patch grows
            seeded = _two_stage_run(denoiser, s, found.r.to(device), seed_gen, progress, " (patch seed)")
            seeded.start = f"patch seed at ({found.top}, {found.left})"
            runs.append(seeded)
    best = max(runs, key=lambda run: float(kl_per_dimension(run.r, run.gamma).var(unbiased=False)))
    for run in runs:
        if not (torch.isfinite(run.r).all() and torch.isfinite(run.gamma).all()):
            raise FloatingPointError("trigger reversion diverged (NaN/Inf); try a smaller --lr")
    seconds = {"stage1": sum(run.seconds["stage1"] for run in runs),
               "stage2": sum(run.seconds["stage2"] for run in runs), "patch_search": search_seconds}
    if search is not None:
        search["runs"] = [{"start": run.start, **kl_features(run.r, run.gamma).to_dict(), "chosen": run is best}
                          for run in runs]
    return ReversionResult(r=best.r.cpu(), gamma=best.gamma.cpu(), trace=best.trace, seconds=seconds,
                           network_evaluations=denoiser.evaluations - start_evals, search=search,
                           start=best.start)


@dataclass
class _Run:
    r: torch.Tensor
    gamma: torch.Tensor
    trace: dict
    seconds: dict
    start: str = ""


def _two_stage_run(denoiser, s: ReversionSettings, r_start: torch.Tensor, gen: torch.Generator,
                   progress: Progress | None, label: str) -> _Run:
    """TERD's stage 1 and stage 2 from r_start, gamma = 1."""
    device = denoiser.device
    shape = denoiser.input_shape
    r = r_start.detach().clone().requires_grad_(True)
    gamma = torch.ones(shape, device=device).requires_grad_(True)
    late = denoiser.last_timesteps(s.timestep_window)
    early = (0, s.timestep_window - 1)
    trace: dict[str, list[float]] = {"stage": [], "loss": [], "r_l1_mean": [], "gamma_mean": []}
    seconds: dict[str, float] = {}

    def optimiser(iterations: int, gamma_lr: float):
        opt = torch.optim.SGD([{"params": [r], "lr": s.lr}, {"params": [gamma], "lr": gamma_lr}], momentum=0.0)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iterations, 1))

    def record(stage: int, loss: torch.Tensor) -> None:
        trace["stage"].append(stage)
        trace["loss"].append(float(loss.detach()))
        trace["r_l1_mean"].append(float(r.detach().abs().mean()))
        trace["gamma_mean"].append(float(gamma.detach().mean()))

    def step(opt, sched, objective: torch.Tensor, clip: float | None) -> None:
        opt.zero_grad(set_to_none=True)
        objective.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([r], clip)
        opt.step()
        sched.step()
        with torch.no_grad():  # gamma is a standard deviation: keep it above a small floor
            gamma.clamp_(min=s.gamma_floor)

    # Stage 1, estimation: surrogate x0 ~ N(0, I) is enough near t = T, where abar ~ 0.
    t0 = time.perf_counter()
    opt, sched = optimiser(s.stage1_iterations, s.gamma_lr)
    for i in range(s.stage1_iterations):
        x0 = torch.randn((s.batch_size, *shape), generator=gen, device=device)
        t = _timesteps(*late, s.batch_size, gen, device)
        loss = pair_loss(denoiser, x0, r, gamma, t, 1.0, gen)
        step(opt, sched, loss - s.l1_weight * r.abs().sum(), None)
        record(1, loss)
        if progress:
            progress("stage 1: estimation" + label, i + 1, s.stage1_iterations)
    seconds["stage1"] = time.perf_counter() - t0

    # Stage 2, refinement: x0 := what the model generates from the current trigger, through a
    # differentiable DDIM sampler, so the gradient also flows through generation into r.
    t0 = time.perf_counter()
    opt, sched = optimiser(s.stage2_iterations, s.gamma_lr * s.stage2_gamma_lr_scale)
    for i in range(s.stage2_iterations):
        e = torch.randn((s.batch_size, *shape), generator=gen, device=device)
        x0 = denoiser.ddim_sample(gamma * e + r, s.sampler_steps)
        t_late = _timesteps(*late, s.batch_size, gen, device)
        t_early = _timesteps(*early, s.batch_size, gen, device)
        loss = 0.5 * (pair_loss(denoiser, x0, r, gamma, t_late, 1.0, gen)
                      + pair_loss(denoiser, x0, r, gamma, t_early, 0.0, gen))
        step(opt, sched, loss - s.l1_weight * r.abs().sum(), s.stage2_grad_clip)
        record(2, loss)
        if progress:
            progress("stage 2: refinement" + label, i + 1, s.stage2_iterations)
    seconds["stage2"] = time.perf_counter() - t0
    return _Run(r=r.detach(), gamma=gamma.detach(), trace=trace, seconds=seconds)
