"""Narrow-noise search: a global proposal step for triggers that narrow the starting noise
(TrojDiff: x_T ~ N(r, gamma^2) with gamma = 0.6 for its blend trigger, 0.1 for its patch).

TERD's descent starts at gamma = 1, where a TrojDiff model behaves like a benign one, and the
path to its trigger climbs: on the zoo's trojdiff-blend (`python benchmarks/loss_landscape.py
examples/zoo/trojdiff-blend`) the pair loss is 2.2 at (r = 0, gamma = 1), 13.0 at (r_true, 1),
11.3 at (r_true / 2, 0.6) and 2.9 at the trigger (r_true, 0.6), so descent from gamma = 1 never
leaves r ~ 0. Descending on r from 0 with gamma held narrow is no cure either: along r_true the
loss at gamma 0.6 first RISES (28.7 at 0, 33.7 at r_true / 4), and such probes found the trigger
for some seeds and went the other way for others (measured on trojdiff-blend, 60 iterations).

What a network trained on narrow poisoned noise does have is a loss that FALLS when the noise
narrows, near its trigger; a benign network, trained on gamma = 1 only, loses accuracy. The
search scores candidate offsets c, a constant per channel (every sign pattern, two amplitudes:
a blend trigger such as TrojDiff's is mostly its mean colour), at a grid of gammas, by
    ratio = L(c, gamma) / L(c, 1)
with common random numbers (forward passes only). On the zoo: trojdiff-blend 0.77 (c = +0.4,
gamma 0.8), the DDPM-adapted variant 0.26; benign models 1.34 and up, BadDiffusion 1.46 and up
(8 pairs). The best candidate with ratio < SEED_RATIO seeds a full TERD reversion from (c, gamma)
with gamma learned (reversion.reverse_trigger), and the decision is the same test at the run's
end point with the gamma it learned: kept only if ratio < KEEP_RATIO there (fast preset, 2 seeds:
trojdiff-blend 0.36-0.40; seeded benign models 0.97-1.00, their gamma back near 1). A kept run is
refined at held gammas; a run that spread back is followed by descents from the offset at each
screened gamma held, kept on the same test (reversion._refine_narrow_run, _held_gamma_sweep).

The screen sees a trigger through its mean colour only, and a mixed-palette blend picture has
none to speak of: on trojdiff-smiley-hat-checkers no offset's ratio falls below 1.64, although
held descents from the best one find the smiley. So where the screen seeds nothing, the held
sweep still runs from its best offset (settings.narrow_sweep_unseeded, on in `standard` and
`fast`), from the widest gamma until the loss first rises, on the same end test; a kept unseeded
sweep is one more candidate run, not the result by right (reversion.reverse_trigger).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .pair_loss import common_pairs, pair_losses
from .search_seed import SearchSeed

# Screen: seed a run when the loss falls as the noise narrows.
SEED_RATIO = 1.0
# Decision at the seeded run's end: its narrow noise must lower the loss by at least 20%.
KEEP_RATIO = 0.8


@dataclass(kw_only=True)  # a required field after the base's
class NarrowSeed(SearchSeed):
    """The best (offset, gamma); ratio L(c, gamma) / L(c, 1) < SEED_RATIO: worth a seeded run."""
    gamma: float  # the best candidate's gamma
    seed_below = SEED_RATIO

    def search_fields(self) -> dict:
        return {"gamma": self.gamma, "offset": self.offset()}


def narrow_ratio(denoiser, r: torch.Tensor, gamma, pairs: int, window: int, generator: torch.Generator) -> float:
    """L(r, gamma) / L(r, 1) over the same pairs (x0 ~ N(0, I), t in the last `window` steps, noises);
    gamma is a number or a (C, H, W) tensor."""
    x0, t, e = common_pairs(denoiser, pairs, window, generator)
    with torch.no_grad():
        narrow = pair_losses(denoiser, x0, r, gamma, t, 1.0, e).mean()
        wide = pair_losses(denoiser, x0, r, 1.0, t, 1.0, e).mean()
    return float(narrow / wide.clamp_min(1e-12))


def search_narrow_seed(denoiser, gammas, amplitudes, pairs: int, window: int,
                       generator: torch.Generator) -> NarrowSeed:
    """The candidate (per-channel constant offset, gamma) with the smallest narrow/wide loss ratio."""
    start = denoiser.evaluations
    shape = tuple(denoiser.input_shape)
    device = denoiser.device
    x0, t, e = common_pairs(denoiser, pairs, window, generator)
    best = None
    candidates = 0
    with torch.no_grad():
        for signs in itertools.product((1.0, -1.0), repeat=shape[0]):
            for a in amplitudes:
                c = (torch.tensor(signs, device=device) * a).view(-1, 1, 1).expand(shape).contiguous()
                wide = pair_losses(denoiser, x0, c, 1.0, t, 1.0, e).mean().clamp_min(1e-12)
                for gamma in gammas:
                    ratio = float(pair_losses(denoiser, x0, c, float(gamma), t, 1.0, e).mean() / wide)
                    candidates += 1
                    if best is None or math.isnan(best[2]) or ratio < best[2]:  # a NaN ratio never wins
                        best = (c, float(gamma), ratio)
    c, gamma, ratio = best
    return NarrowSeed(r=c, gamma=gamma, ratio=ratio, candidates=candidates,
                      network_evaluations=denoiser.evaluations - start)
