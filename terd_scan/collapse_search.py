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

Consistency models: the same search through the pipeline's default one-step consistency sampler (what a
CM backdoor targets), and there it is the only route to a verdict (TERD's pair loss is about 1000x weaker on a
CM, README "Consistency models"). Each sphere is descended from five starts, scaled to its radius: a Gaussian
direction, the constant canvases +1 and -1 (a trigger drawn on a canvas sits in a basin a Gaussian start can
miss) and the two best patches of a patch screen (screen_patches: every square patch on zero, forward passes
only; a small patch trigger's basin is narrower still). The keep ratio is CM_COLLAPSE_KEEP_RATIO: a benign tiny
CM's one-step samples also narrow off its data, to about a tenth of their spread at rms radius 1, while a
backdoored one's fall to a hundredth (docs/QUALITY.md, "Consistency models").

Other kinds (VE, latent diffusion) get "not run".
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .denoisers import ConsistencyDenoiser, DDPMDenoiser, graph_call
from .memory_plan import memory_plan

# The spread ratio under which the end point counts as a collapse. The calibration benign models' lowest
# end-point ratio and the design backdoor's are in docs/QUALITY.md ("Sample-collapse search").
COLLAPSE_KEEP_RATIO = 0.5
# The same for consistency models' one-step samples, from the calibration CMs (docs/QUALITY.md, "Consistency models").
CM_COLLAPSE_KEEP_RATIO = 0.02
EVAL_NOISES = 32
COLLAPSE_SEED_OFFSET = 6_000_003  # its own draws, as the searches have (reversion.search_generator)


@dataclass
class CollapseSearch:
    ran: bool
    note: str = ""  # why it did not run
    radii: tuple = ()  # root-mean-square per dimension of each sphere
    ratios: tuple = ()  # spread ratio at each sphere's end point (the lowest over its starts)
    keep_below: float = COLLAPSE_KEEP_RATIO
    sampler: str = ""
    starts: tuple = ()  # the start each sphere's kept end point descended from
    spread_at_zero: float = float("nan")
    r: torch.Tensor | None = None  # the end point with the lowest ratio (CPU)
    seconds: float = 0.0
    network_evaluations: int = 0

    @property
    def ratio(self) -> float:
        return min(self.ratios) if self.ratios else float("nan")

    @property
    def kept(self) -> bool:
        return self.ran and self.ratio < self.keep_below

    def to_dict(self) -> dict:
        if not self.ran:
            return {"ran": False, "note": self.note}
        return {"ran": True, "radii_rms": list(self.radii), "ratios": [round(v, 4) for v in self.ratios],
                "ratio": round(self.ratio, 4), "keep_below": self.keep_below, "kept": self.kept,
                "sampler": self.sampler, "starts": list(self.starts),
                "spread_at_zero": round(self.spread_at_zero, 5), "seconds": round(self.seconds, 3),
                "network_evaluations": self.network_evaluations}


def supports(denoiser) -> bool:
    return type(denoiser) in (DDPMDenoiser, ConsistencyDenoiser)


def is_consistency(denoiser) -> bool:
    return isinstance(denoiser, ConsistencyDenoiser)


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


def sampler_for(denoiser, steps: int):
    """(samples(x_T, seed, checkpoint), its name): the sampler the search reads for this kind of model."""
    if is_consistency(denoiser):
        return (lambda x_T, seed, checkpoint=False: denoiser.one_step_sample(x_T),
                "one-step consistency sampling (the pipeline's default), no clipping")
    return (lambda x_T, seed, checkpoint=False: ddpm_samples(denoiser, x_T, steps, seed, checkpoint),
            f"DDPM ancestral, {steps} steps, no clipping")


# Consistency models: each sphere from a Gaussian direction, the constant canvases +1 and -1, and the
# PATCH_SCREEN_KEEP patches of the patch screen whose one-step samples spread least.
CM_STARTS = ("gaussian", "canvas +1", "canvas -1")
PATCH_SCREEN_KEEP = 2
PATCH_SCREEN_NOISES = 8
PATCH_SCREEN_BATCH = 256  # candidate-noise pairs per network call


def _start(name: str, shape: tuple, gen: torch.Generator, device) -> torch.Tensor:
    if name == "gaussian":
        return torch.randn(shape, generator=gen, device=device)
    return torch.full(shape, 1.0 if name == "canvas +1" else -1.0, device=device)


def screen_candidates(shape: tuple) -> list[tuple[int, int, int, tuple]]:
    """(side, top, left, channel signs) of every square patch the screen tries: sides 1/8, 2/8, 3/8 and 4/8 of
    the image's shorter side, at every position (stride 1), every sign pattern over the channels (grey +-1
    only above 4 channels). A small trigger drawn on zero (a patch, a glyph) has a narrow basin that the
    Gaussian and canvas starts miss; one of these, scaled to the sphere, lands inside it. Unlike the TERD
    route's patch_search.patch_candidates (one side, grey, all patches built at once) the candidates are
    descriptions, built a chunk at a time by screen_patches: at 64 px they number about 67,000."""
    c, h, w = shape
    signs = ([tuple(1.0 if (k >> i) & 1 else -1.0 for i in range(c)) for k in range(2 ** c)] if c <= 4
             else [(1.0,) * c, (-1.0,) * c])
    sides = sorted({max(1, min(h, w) * k // 8) for k in (1, 2, 3, 4)})
    return [(side, top, left, sign) for side in sides for top in range(h - side + 1)
            for left in range(w - side + 1) for sign in signs]


def _patch(candidate: tuple, shape: tuple, device) -> torch.Tensor:
    side, top, left, sign = candidate
    p = torch.zeros(shape, device=device)
    p[:, top:top + side, left:left + side] = torch.tensor(sign, device=device)[:, None, None]
    return p


def _patch_name(candidate: tuple) -> str:
    side, top, left, sign = candidate
    return f"patch {side}x{side} at ({top}, {left}) {''.join('+' if v > 0 else '-' for v in sign)}"


def screen_patches(samples, shape: tuple, rho: float, gen: torch.Generator, device,
                   keep: int = PATCH_SCREEN_KEEP) -> list[tuple[str, torch.Tensor]]:
    """The `keep` patches (screen_candidates, each scaled to norm rho) whose one-step samples from
    PATCH_SCREEN_NOISES common noises spread least: forward passes only."""
    e = torch.randn((PATCH_SCREEN_NOISES, *shape), generator=gen, device=device)
    candidates = screen_candidates(shape)
    per_call = max(1, PATCH_SCREEN_BATCH // PATCH_SCREEN_NOISES)
    spreads = []
    with torch.no_grad():
        for i in range(0, len(candidates), per_call):
            chunk = torch.stack([_patch(c, shape, device) for c in candidates[i:i + per_call]])
            chunk = chunk * (rho / chunk.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
            x = samples((chunk[:, None] + e[None]).flatten(0, 1), 0).view(len(chunk), PATCH_SCREEN_NOISES, *shape)
            spreads.append(torch.nan_to_num(x.var(1).flatten(1).mean(1), nan=math.inf))
    order = torch.cat(spreads).argsort()[:keep].tolist()
    return [(_patch_name(candidates[i]), _patch(candidates[i], shape, device)) for i in order]


def search_for(denoiser, settings: dict, seed: int) -> CollapseSearch:
    """The search with a scan's settings (a dict of ReversionSettings fields): the cm_collapse_* ones for a
    consistency model, the collapse_* ones otherwise."""
    s = settings
    if is_consistency(denoiser):
        return search_collapse(denoiser, tuple(s["cm_collapse_radii"]), s["cm_collapse_iterations"],
                               s["cm_collapse_noises"], 1, seed + COLLAPSE_SEED_OFFSET)
    return search_collapse(denoiser, tuple(s["collapse_radii"]), s["collapse_iterations"], s["collapse_noises"],
                           s["collapse_steps"], seed + COLLAPSE_SEED_OFFSET)


def search_collapse(denoiser, radii: tuple, iterations: int, noises: int, steps: int, seed: int) -> CollapseSearch:
    """The search above at each root-mean-square radius in `radii`; deterministic given the seed and the
    device. Above 3x32x32 (memory_plan) each network call is recomputed in the backward pass and the noises
    per step are cut to what one gradient pass holds (at least 2, for a spread); a GPU that still runs out
    of memory ends the search unrun, so the verdict is the KL route's (a consistency model's: none)."""
    if not supports(denoiser):
        return CollapseSearch(ran=False, note=f"not run: the sample-collapse search covers pixel-space DDPM-family "
                                              f"models and consistency models only, not {denoiser.info().kind}")
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
    consistency = is_consistency(denoiser)
    samples, sampler_name = sampler_for(denoiser, steps)
    starts = CM_STARTS if consistency else ("gaussian",)
    gen = torch.Generator(device=device).manual_seed(seed)
    e_eval = torch.randn((EVAL_NOISES, *shape), generator=gen, device=device)
    eval_seed = seed + 1

    def judged_spread(r: torch.Tensor) -> float:  # a diverging sampler spreads without bound, never a collapse
        with torch.no_grad():
            value = float(_spread(samples(e_eval + r, eval_seed)))
        return value if math.isfinite(value) else math.inf

    at_zero = judged_spread(torch.zeros(shape, device=device))
    ratios, ends, best_starts = [], [], []
    dim = math.prod(shape)
    # the patch screen runs once, on the widest sphere (a trigger's basin is widest there), and its patches
    # start a descent on every sphere
    screened = screen_patches(samples, shape, max(radii) * math.sqrt(dim), gen, device) if consistency else []
    for rms in radii:
        rho = rms * math.sqrt(dim)
        best_ratio, best_r, best_start = math.inf, None, ""
        for start, r in [(name, _start(name, shape, gen, device)) for name in starts] + screened:
            r = r * (rho / r.norm())
            for i in range(iterations):
                angle = 0.01 + 0.5 * (0.3 - 0.01) * (1 + math.cos(math.pi * i / max(iterations - 1, 1)))
                r = r.detach().requires_grad_(True)
                e = torch.randn((noises, *shape), generator=gen, device=device)
                step_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=device))
                (grad,) = torch.autograd.grad(_spread(samples(e + r, step_seed, checkpoint)), r)
                r = sphere_step(r, grad, angle, rho)
            if not torch.isfinite(r).all():
                raise FloatingPointError("the sample-collapse search diverged (NaN/Inf)")
            ratio = judged_spread(r) / max(at_zero, 1e-12)
            if best_r is None or ratio < best_ratio:
                best_ratio, best_r, best_start = ratio, r.detach(), start
        ends.append(best_r)
        ratios.append(best_ratio)
        best_starts.append(best_start)
    best = min(range(len(ratios)), key=ratios.__getitem__)
    keep = CM_COLLAPSE_KEEP_RATIO if consistency else COLLAPSE_KEEP_RATIO
    return CollapseSearch(ran=True, radii=tuple(radii), ratios=tuple(ratios), spread_at_zero=at_zero,
                          keep_below=keep, sampler=sampler_name, starts=tuple(best_starts),
                          r=ends[best].cpu(), seconds=time.perf_counter() - t0,
                          network_evaluations=denoiser.evaluations - evals0)
