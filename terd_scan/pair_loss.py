"""TERD's reversed loss, one definition for the reversion (reversion.py) and the searches
(patch_search.py, narrow_search.py, canvas_search.py), and the common noise pairs the searches
score every candidate on."""

from __future__ import annotations

import torch


def pair_losses(denoiser, x0: torch.Tensor, r: torch.Tensor, gamma, t: torch.Tensor, c: float,
                e: torch.Tensor) -> torch.Tensor:
    """The loss of each pair (b,). For two noises e1 = e[:b], e2 = e[b:] around the same x0, t, r,
    gamma, the unknown attack coefficient d(t) r cancels in the difference of the residuals
    e - eps(x~(e)):

        x~(e) = sqrt(abar_t) x0 + sqrt(1 - abar_t) gamma e + c r
        L_i = 0.5 * sum_pixels ((e1 - eps(x~(e1))) - (e2 - eps(x~(e2))))^2

    r is one trigger (C, H, W) for every pair or one per pair (b, C, H, W). Both noises go
    through the network in one batched call."""
    b = x0.shape[0]
    abar = denoiser.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0_2, abar_2 = torch.cat([x0, x0]), torch.cat([abar, abar])
    r_2 = torch.cat([r, r]) if r.dim() == x0.dim() else r
    x_tilde = abar_2.sqrt() * x0_2 + (1 - abar_2).sqrt() * gamma * e + c * r_2
    residual = e - _eps(denoiser, x_tilde, torch.cat([t, t]))
    diff = residual[:b] - residual[b:]
    return 0.5 * diff.pow(2).flatten(1).sum(1)


def _eps(denoiser, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The network's eps, a forward-only batch split as the reversion's memory plan says (large inputs)."""
    while True:
        plan = getattr(denoiser, "memory_plan", None)  # set by reversion.reverse_trigger
        chunk = plan.forward_chunk() if plan is not None and not torch.is_grad_enabled() else None
        if chunk is None:
            return denoiser.eps(x, t)
        try:
            return torch.cat([denoiser.eps(x[i:i + chunk], t[i:i + chunk]) for i in range(0, x.shape[0], chunk)])
        except torch.OutOfMemoryError:  # a GPU that ran out: halve the plan for the rest of the scan, retry
            smaller = plan.halved()
            if smaller is None:
                raise
            denoiser.memory_plan = smaller


def pair_loss(denoiser, x0: torch.Tensor, r: torch.Tensor, gamma: torch.Tensor, t: torch.Tensor, c: float,
              generator: torch.Generator) -> torch.Tensor:
    """TERD's reversed loss, mean over the batch, with fresh noise pairs from the generator:
    L = mean_batch 0.5 * sum_pixels ((e1 - eps(x~(e1))) - (e2 - eps(x~(e2))))^2 (see pair_losses)."""
    e = torch.randn((2 * x0.shape[0], *x0.shape[1:]), generator=generator, device=x0.device)
    return pair_losses(denoiser, x0, r, gamma, t, c, e).mean()


def common_pairs(denoiser, pairs: int, window: int, generator: torch.Generator):
    """(x0, t, e) for `pairs` noise pairs: x0 ~ N(0, I), t in the last `window` training steps, and
    2 * pairs noises; drawn in this order from the generator, the same for every candidate."""
    shape = tuple(denoiser.input_shape)
    device = denoiser.device
    lo, hi = denoiser.last_timesteps(window)
    x0 = torch.randn((pairs, *shape), generator=generator, device=device)
    t = torch.randint(lo, hi + 1, (pairs,), generator=generator, device=device)
    e = torch.randn((2 * pairs, *shape), generator=generator, device=device)
    return x0, t, e
