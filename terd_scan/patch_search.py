"""Patch search: a global proposal step for sparse triggers that TERD's local descent cannot reach.

TERD's descent starts at r = -U[0,1), next to the canonical triggers drawn on a -1 canvas. A
small patch on a zero background has its own basin of the pair loss behind a barrier: halfway
between r = 0 and the trigger the network is half-triggered, its output depends on the noise,
and the loss is higher than at either end (measured on the zoo's baddiffusion-patch: L = 3.9 at
0, 5.9 at half the trigger, 4.8 at the trigger). Descent from anywhere but the patch itself
slides back to r = 0.

The search tries every uniform square patch of one size, at every position, with both signs, at
amplitude a and a/2, with common random numbers (the same x0, t and noise pairs for every
candidate), and scores each by  ratio = L(patch at a) / L(patch at a/2).  For a benign network the
loss grows with the patch (off-distribution input; ratio ~2 on the zoo); ratio < 1 means the loss
falls as the patch grows: there is a basin behind it. The best candidate, when it has one, seeds a
second full TERD reversion (see reversion.reverse_trigger). Forward passes only, no gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pair_loss import common_pairs, pair_losses
from .search_seed import SearchSeed

# A candidate seeds a reversion only when the loss falls by at least 2% as the patch doubles: a tie
# is no basin (a network linear in its input gives ratio 1 exactly, up to rounding).
BASIN_RATIO = 0.98


@dataclass(kw_only=True)  # required fields after the base's
class PatchSeed(SearchSeed):
    """The best patch at full amplitude; ratio L(full) / L(half) < BASIN_RATIO: a basin lies behind it."""
    top: int
    left: int
    height: int
    width: int
    sign: int
    seed_below = BASIN_RATIO

    def search_fields(self) -> dict:
        return {"top": self.top, "left": self.left, "height": self.height, "width": self.width, "sign": self.sign}


def patch_candidates(shape: tuple[int, int, int], size_fraction: float) -> tuple[torch.Tensor, list[tuple]]:
    """Unit-amplitude uniform square patches (K, C, H, W), both signs, and (top, left, height,
    width, sign) for each. Positions step by a quarter of the patch side (every pixel up to 7-pixel
    patches), so a side of a quarter of the image gives 13 x 13 positions at any image size."""
    c, h, w = shape
    ph, pw = max(1, round(h * size_fraction)), max(1, round(w * size_fraction))
    stride = max(1, min(ph, pw) // 4)
    ys = _positions(h, ph, stride)
    xs = _positions(w, pw, stride)
    where = [(y, x, ph, pw, sign) for sign in (1, -1) for y in ys for x in xs]
    patches = torch.zeros((len(where), c, h, w))
    for k, (y, x, _, _, sign) in enumerate(where):
        patches[k, :, y:y + ph, x:x + pw] = sign
    return patches, where


def _positions(size: int, patch: int, stride: int) -> list[int]:
    last = size - patch
    out = list(range(0, last + 1, stride))
    return out if out[-1] == last else out + [last]  # the far edge too


@torch.no_grad()
def candidate_losses(denoiser, rs: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, e: torch.Tensor,
                      chunk_samples: int) -> torch.Tensor:
    """TERD's pair loss (gamma = 1, c = 1) of each candidate r in rs (K,), averaged over the same
    pairs (x0[i], t[i], e[i], e[pairs + i]) for every candidate."""
    pairs = x0.shape[0]
    per_call = max(1, chunk_samples // (2 * pairs))
    out = []
    for first in range(0, rs.shape[0], per_call):
        r = rs[first:first + per_call].to(x0.device)
        k = r.shape[0]  # k candidates x pairs: pair i of candidate j is row j * pairs + i
        e_k = torch.cat([e[:pairs].repeat(k, 1, 1, 1), e[pairs:].repeat(k, 1, 1, 1)])
        losses = pair_losses(denoiser, x0.repeat(k, 1, 1, 1), r.repeat_interleave(pairs, dim=0), 1.0,
                             t.repeat(k), 1.0, e_k)
        out.append(losses.view(k, pairs).mean(1).cpu())
    return torch.cat(out)


def search_patch_seed(denoiser, size_fraction: float, amplitude: float, pairs: int, window: int,
                      generator: torch.Generator, chunk_samples: int = 512) -> PatchSeed:
    """The candidate patch with the smallest loss ratio (see the module docstring)."""
    start = denoiser.evaluations
    patches, where = patch_candidates(tuple(denoiser.input_shape), size_fraction)
    x0, t, e = common_pairs(denoiser, pairs, window, generator)
    full = candidate_losses(denoiser, patches * amplitude, x0, t, e, chunk_samples)
    half = candidate_losses(denoiser, patches * (amplitude / 2), x0, t, e, chunk_samples)
    ratio = full / half.clamp_min(1e-12)
    best = int(torch.argmin(ratio))
    y, x, ph, pw, sign = where[best]
    return PatchSeed(r=patches[best] * amplitude, ratio=float(ratio[best]), top=y, left=x, height=ph, width=pw,
                     sign=sign, candidates=len(where), network_evaluations=denoiser.evaluations - start)
