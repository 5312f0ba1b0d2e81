"""TERD trigger reversion: learn the noise distribution N(r, gamma^2) that makes the model
behave like a backdoor, with no knowledge of the attack (stage 1 estimation, stage 2
refinement through a differentiable few-step DDIM sampler)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .presets import ReversionSettings


@dataclass
class ReversionResult:
    r: torch.Tensor  # (C, H, W), on the CPU
    gamma: torch.Tensor  # (C, H, W), on the CPU
    trace: dict[str, list[float]] = field(default_factory=dict)  # per-iteration loss, ||r||, ...
    seconds: dict[str, float] = field(default_factory=dict)
    network_evaluations: int = 0


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
    """Run stage 1 and stage 2. Deterministic given the seed and the device."""
    s = settings
    device = denoiser.device
    shape = denoiser.input_shape
    gen = torch.Generator(device=device).manual_seed(seed)
    start_evals = denoiser.evaluations

    # r starts at -U[0,1) (the paper's initialisation), gamma at 1.
    r = (-torch.rand(shape, generator=gen, device=device)).requires_grad_(True)
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
            progress("stage 1: estimation", i + 1, s.stage1_iterations)
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
            progress("stage 2: refinement", i + 1, s.stage2_iterations)
    seconds["stage2"] = time.perf_counter() - t0

    r_out, g_out = r.detach().cpu(), gamma.detach().cpu()
    if not (torch.isfinite(r_out).all() and torch.isfinite(g_out).all()):
        raise FloatingPointError("trigger reversion diverged (NaN/Inf); try a smaller --lr")
    return ReversionResult(r=r_out, gamma=g_out, trace=trace, seconds=seconds,
                           network_evaluations=denoiser.evaluations - start_evals)
