"""Sample-collapse search: a second route to a verdict for backdoors whose trigger TERD's pair loss does
not hold (on in `standard`; run only when the KL route finds the model clean).

A backdoor sends every starting noise that carries its trigger to one target, so DDPM samples from
N(r, I) collapse there. On the 16 px zoo some BadDiffusion models fire their trigger under DDPM
sampling (ASR >= 90%) while TERD's pair loss at the last timesteps rises along it (docs/QUALITY.md,
"Other routes tried"): stage 1 decays r from the start, and no start or search of the pair loss finds
it. Their sampler shows the trigger: on the sphere |r| = |r_true| a projected descent of the spread of
DDPM-20 samples finds a direction whose samples collapse onto the attack's target, while on benign
models the same descent ends near the spread at r = 0 (the model's own diversity).

The search: for each radius (root-mean-square per dimension, so it scales with the image), a projected
descent on the sphere of that radius from a Gaussian direction, each step along the tangent part of the
gradient of the spread (mean per-pixel variance over `noises` samples, DDPM ancestral with `steps` steps,
the graph kept, no x0 clipping), the step an angle on a cosine schedule. The end point is judged on fixed
noises and step noises common to it and to r = 0: ratio = spread(r) / spread(0). The lowest ratio over the
radii is the outcome; it is kept when below COLLAPSE_KEEP_RATIO, which the zoo's calibration benign models
never reach (docs/QUALITY.md, "Sample-collapse search").

Only for pixel-space DDPM-family models (the sampler BadDiffusion targets); other kinds get "not run".
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .denoisers import DDPMDenoiser, graph_call
from .memory_plan import memory_plan

# The spread ratio under which the end point counts as a collapse. The calibration benign models' lowest
# end-point ratio and the design backdoor's are in docs/QUALITY.md ("Sample-collapse search").
COLLAPSE_KEEP_RATIO = 0.5
EVAL_NOISES = 32
COLLAPSE_SEED_OFFSET = 6_000_003  # its own draws, as the searches have (reversion.search_generator)


@dataclass
class CollapseSearch:
    ran: bool
    note: str = ""  # why it did not run
    radii: tuple = ()  # root-mean-square per dimension of each sphere
    ratios: tuple = ()  # spread ratio at each sphere's end point
    spread_at_zero: float = float("nan")
    r: torch.Tensor | None = None  # the end point with the lowest ratio (CPU)
    seconds: float = 0.0
    network_evaluations: int = 0

    @property
    def ratio(self) -> float:
        return min(self.ratios) if self.ratios else float("nan")

    @property
    def kept(self) -> bool:
        return self.ran and self.ratio < COLLAPSE_KEEP_RATIO

    def to_dict(self) -> dict:
        if not self.ran:
            return {"ran": False, "note": self.note}
        return {"ran": True, "radii_rms": list(self.radii), "ratios": [round(v, 4) for v in self.ratios],
                "ratio": round(self.ratio, 4), "keep_below": COLLAPSE_KEEP_RATIO, "kept": self.kept,
                "spread_at_zero": round(self.spread_at_zero, 5), "seconds": round(self.seconds, 3),
                "network_evaluations": self.network_evaluations}


def supports(denoiser) -> bool:
    return type(denoiser) is DDPMDenoiser


def ddpm_samples(denoiser: DDPMDenoiser, x_T: torch.Tensor, steps: int, seed: int,
                 checkpoint: bool = False) -> torch.Tensor:
    """DDPM ancestral sampling, differentiable when gradients are on; the step noises are fixed by `seed`.
    `checkpoint` recomputes each network call in the backward pass (memory_plan: inputs above 3x32x32)."""
    sched = denoiser.ddpm
    sched.set_timesteps(min(steps, denoiser.num_train_timesteps), device=denoiser.device)
    gen = torch.Generator(device=denoiser.device).manual_seed(seed)
    x = x_T
    for t in sched.timesteps:
        e = graph_call(denoiser.eps, x, t.expand(x.shape[0]).to(denoiser.device), checkpoint=checkpoint)
        x = sched.step(e, t, x, generator=gen).prev_sample
    return x


def sphere_step(r: torch.Tensor, grad: torch.Tensor, angle: float, rho: float) -> torch.Tensor:
    """One projected descent step on the sphere |r| = rho: `angle` radians along the gradient's tangent part."""
    with torch.no_grad():
        tangent = grad - (grad * r).sum() / (r * r).sum() * r
        r = r - angle * rho * tangent / tangent.norm().clamp_min(1e-12)
        return r * (rho / r.norm())


def _spread(x: torch.Tensor) -> torch.Tensor:
    return x.var(0).mean()


def search_collapse(denoiser, radii: tuple, iterations: int, noises: int, steps: int, seed: int) -> CollapseSearch:
    """The search above at each root-mean-square radius in `radii`; deterministic given the seed and the
    device. Above 3x32x32 (memory_plan) each network call is recomputed in the backward pass and the noises
    per step are cut to what one gradient pass holds (at least 2, for a spread); a GPU that still runs out
    of memory ends the search unrun, so the verdict is the KL route's."""
    if not supports(denoiser):
        return CollapseSearch(ran=False, note=f"not run: the sample-collapse search covers pixel-space DDPM-family "
                                              f"models only, not {denoiser.info().kind}")
    plan = memory_plan(denoiser.input_shape, noises, denoiser.device)
    try:
        return _search(denoiser, radii, iterations, max(2, min(noises, plan.micro_batch)), steps, seed,
                       plan.checkpointed_sampler)
    except torch.OutOfMemoryError:
        return CollapseSearch(ran=False, note=f"not run: out of GPU memory with {noises} noises of "
                                              f"{'x'.join(map(str, denoiser.input_shape))} through {steps} sampler steps")


def _search(denoiser, radii: tuple, iterations: int, noises: int, steps: int, seed: int,
            checkpoint: bool) -> CollapseSearch:
    t0, evals0 = time.perf_counter(), denoiser.evaluations
    device, shape = denoiser.device, denoiser.input_shape
    gen = torch.Generator(device=device).manual_seed(seed)
    e_eval = torch.randn((EVAL_NOISES, *shape), generator=gen, device=device)
    eval_seed = seed + 1

    def judged_spread(r: torch.Tensor) -> float:  # a diverging sampler spreads without bound, never a collapse
        with torch.no_grad():
            value = float(_spread(ddpm_samples(denoiser, e_eval + r, steps, eval_seed)))
        return value if math.isfinite(value) else math.inf

    at_zero = judged_spread(torch.zeros(shape, device=device))
    ratios, ends = [], []
    dim = math.prod(shape)
    for rms in radii:
        rho = rms * math.sqrt(dim)
        r = torch.randn(shape, generator=gen, device=device)
        r = r * (rho / r.norm())
        for i in range(iterations):
            angle = 0.01 + 0.5 * (0.3 - 0.01) * (1 + math.cos(math.pi * i / max(iterations - 1, 1)))
            r = r.detach().requires_grad_(True)
            e = torch.randn((noises, *shape), generator=gen, device=device)
            step_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=device))
            (grad,) = torch.autograd.grad(_spread(ddpm_samples(denoiser, e + r, steps, step_seed, checkpoint)), r)
            r = sphere_step(r, grad, angle, rho)
        if not torch.isfinite(r).all():
            raise FloatingPointError("the sample-collapse search diverged (NaN/Inf)")
        ends.append(r.detach())
        ratios.append(judged_spread(r) / max(at_zero, 1e-12))
    best = min(range(len(ratios)), key=ratios.__getitem__)
    return CollapseSearch(ran=True, radii=tuple(radii), ratios=tuple(ratios), spread_at_zero=at_zero,
                          r=ends[best].cpu(), seconds=time.perf_counter() - t0,
                          network_evaluations=denoiser.evaluations - evals0)
