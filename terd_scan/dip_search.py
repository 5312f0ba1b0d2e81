"""Dip search: a global proposal step for faint narrow-noise triggers, where the poisoned starting
noise N(r, gamma^2) has r near 0 and gamma < 1 (TrojDiff's blend scaled toward N(0, I) by an adaptive
attacker: r -> eta r, gamma kept; the TERD paper's case where detection degrades).

The narrow-noise search (narrow_search.py) scores constant offsets by L(c, gamma) / L(c, 1): a loss
that falls as the noise narrows. A faint trigger lies inside the benign noise, so at gamma = 1 the
model already does well there, and that ratio stays near 1: on the zoo's trojdiff-blend-eta0.1
(r = 0.04 x blend, gamma 0.6) the pair loss at r = 0 is 2.40 at gamma 1, 8.83 at 0.8 and 2.56 at
0.6, its training gamma. The dip at 0.6 is the sign: a network trained on gamma = 1 only loses
accuracy monotonically as its noise narrows (the loss at r = 0 rises at every step of the grid
1.0, 0.9, ..., 0.2 on the 57 other pixel-space zoo models, step ratios 1.14 and up; latent 1.10 and
up; the VE models are flat near gamma 1, 0.99), while one trained on a narrow noise has a second
minimum there.

The screen walks r = 0 down a grid of gammas (forward passes, common random numbers) and scores
each gamma by
    dip(gamma) = L(0, gamma) / max L(0, gamma')  over the grid's wider gammas gamma' (1 included)
(trojdiff-blend-eta0.1 0.29, -eta0.2 0.78, -eta0.5 0.60 at gamma 0.6). Below DIP_SEED_RATIO, r is
descended from 0 with gamma held at the dip (reversion._dip_run), and the run is kept only if the
dip still holds at its end point (below DIP_KEEP_RATIO, the narrow search's KEEP_RATIO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .narrow_search import KEEP_RATIO
from .pair_loss import common_pairs, pair_losses
from .search_seed import SearchSeed

DIP_SEED_RATIO = 0.9  # screen: the loss at some narrowed gamma is 10% below every wider one's
DIP_KEEP_RATIO = KEEP_RATIO  # end test: 20% below, as a kept narrow run


@dataclass(kw_only=True)
class DipSeed(SearchSeed):
    """r = 0 and the grid's gamma with the deepest dip; ratio < DIP_SEED_RATIO: worth a held run."""
    gamma: float
    losses: list[float]  # L(0, gamma) along the grid, widest first
    seed_below = DIP_SEED_RATIO

    def search_fields(self) -> dict:
        return {"gamma": self.gamma, "losses": self.losses}


def dip_profile(denoiser, r: torch.Tensor, gammas, pairs: int, window: int,
                generator: torch.Generator) -> tuple[float, float, list[float]]:
    """(gamma, dip ratio, losses): the pair loss at r along `gammas` sorted widest first, on common pairs,
    and the gamma whose loss is lowest relative to the highest at any wider gamma. A grid's widest gamma
    has no wider one and never dips; a NaN loss never wins."""
    grid = sorted((float(g) for g in gammas), reverse=True)
    x0, t, e = common_pairs(denoiser, pairs, window, generator)
    with torch.no_grad():
        losses = [float(pair_losses(denoiser, x0, r, g, t, 1.0, e).mean()) for g in grid]
    best_gamma, best_ratio = grid[0], float("inf")
    for k in range(1, len(grid)):
        ratio = losses[k] / max(max(losses[:k]), 1e-12)
        if ratio == ratio and ratio < best_ratio:  # ratio == ratio: not NaN
            best_gamma, best_ratio = grid[k], ratio
    return best_gamma, best_ratio, [round(v, 4) for v in losses]


def dip_screen(denoiser, settings, generator: torch.Generator) -> DipSeed:
    """The screen with a scan's settings (its dip grid, pairs and timestep window); the generator is the
    scan's dip generator (reversion.search_generator(seed, DIP_SEED_OFFSET)) to see what a scan sees."""
    return search_dip_seed(denoiser, settings.dip_gammas, settings.dip_pairs, settings.timestep_window, generator)


def search_dip_seed(denoiser, gammas, pairs: int, window: int, generator: torch.Generator) -> DipSeed:
    """The screen at r = 0 (see the module docstring)."""
    start = denoiser.evaluations
    zero = torch.zeros(tuple(denoiser.input_shape), device=denoiser.device)
    gamma, ratio, losses = dip_profile(denoiser, zero, gammas, pairs, window, generator)
    return DipSeed(r=zero, ratio=ratio, candidates=len(losses) - 1, gamma=gamma, losses=losses,
                   network_evaluations=denoiser.evaluations - start)
