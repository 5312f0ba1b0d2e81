"""Canvas search: a global proposal step for triggers drawn on a constant canvas that TERD's start
does not point at.

TERD starts at r = -U[0,1): every pixel negative, mean -0.5. BadDiffusion's canonical triggers
are drawn on a -1 canvas, so that start already lies in their basin (the zoo's box trigger has
cosine 0.83 with the seed-0 start) and the reversion keeps it. Centre the start and the box is
lost (`python benchmarks/start_ablation.py --preset fast`: baddiffusion-box M_r 0.178 -> 0.009).
The same trigger mirrored onto a +1 canvas points away from the start (cosine -0.83), and the
reversion then never meets the backdoor: on the closed-form backdoored model of the tests it
returns exactly the benign model's r.

The screen scores constant offsets c (a sign per channel, every pattern, at each amplitude) by
    ratio = L(c) / L(c / 2)
at gamma = 1 with common random numbers (the same x0, t and noise pairs for every candidate;
forward passes only), the patch search's test on the whole image. A benign network's loss grows
with the offset (off-distribution input: ratio 1.14 to 1.76 on the zoo's 22 benign models); ratio
< patch_search.BASIN_RATIO means the loss falls toward a canvas, a basin lies there, and both TERD
stages run again from it (reversion.reverse_trigger). The zoo's box models screen at 0.71-0.93,
the mirrored box (baddiffusion-boxinv-corner, built after this search) at 0.76.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .pair_loss import common_pairs
from .patch_search import BASIN_RATIO, candidate_losses
from .search_seed import SearchSeed

# Decision at a seeded run's end: the loss must still fall toward its end point (the screen's test
# at r_end against r_end / 2), or the run found no basin and is not kept.
CANVAS_KEEP_RATIO = BASIN_RATIO


@dataclass
class CanvasSeed(SearchSeed):
    """The best constant offset; ratio L(c) / L(c / 2) < BASIN_RATIO: a basin lies toward this canvas."""
    seed_below = BASIN_RATIO

    def search_fields(self) -> dict:
        return {"offset": self.offset()}


def canvas_candidates(shape: tuple[int, int, int], amplitudes) -> torch.Tensor:
    """Constant offsets (K, C, H, W): every per-channel sign pattern at every amplitude."""
    c, h, w = shape
    offsets = [torch.tensor(signs) * a for a in amplitudes for signs in itertools.product((1.0, -1.0), repeat=c)]
    return torch.stack(offsets).view(-1, c, 1, 1).expand(-1, c, h, w).contiguous()


def canvas_ratio(denoiser, r: torch.Tensor, pairs: int, window: int, generator: torch.Generator) -> float:
    """L(r) / L(r / 2) at gamma = 1 over fresh common pairs: < 1 when the loss falls toward r."""
    x0, t, e = common_pairs(denoiser, pairs, window, generator)
    both = candidate_losses(denoiser, torch.stack([r, r / 2]), x0, t, e, 4 * pairs)
    return float(both[0] / both[1].clamp_min(1e-12))


def search_canvas_seed(denoiser, amplitudes, pairs: int, window: int, generator: torch.Generator,
                       chunk_samples: int = 512) -> CanvasSeed:
    """The constant offset with the smallest loss ratio (see the module docstring)."""
    start = denoiser.evaluations
    candidates = canvas_candidates(tuple(denoiser.input_shape), amplitudes)
    x0, t, e = common_pairs(denoiser, pairs, window, generator)
    full = candidate_losses(denoiser, candidates, x0, t, e, chunk_samples)
    half = candidate_losses(denoiser, candidates / 2, x0, t, e, chunk_samples)
    ratio = full / half.clamp_min(1e-12)
    ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, float("inf")), ratio)  # NaN never wins
    best = int(torch.argmin(ratio))
    return CanvasSeed(r=candidates[best], ratio=float(ratio[best]), candidates=len(candidates),
                      network_evaluations=denoiser.evaluations - start)
