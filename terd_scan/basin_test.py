"""Basin test: an optional second condition of the verdict (settings.basin_gate, `--basin-gate`), that the
reversed trigger is a trigger at all.

TERD flags a model when the reversed N(r, gamma^2) is far from N(0, I) in KL. The KL says how far
the descent went, not why. On every backdoored zoo model the pair loss at the true trigger is higher
than at r = 0 (45/45, benchmarks/trigger_line.py): a reversion holds a trigger only in a local basin
of its objective O = L - lambda ||r||_1, behind a barrier that separates it from the benign noise.
Where there is no barrier, the descent's end point is a drift of the benign optimum: the L1 term's
outward push against a flat loss, or a direction in which this model's loss is a little lower (the
zoo's benign-n: its bottom row of red shifted by -0.35 at every seed, 1.8-1.9 x the KL threshold).

The test walks the straight line from (0, 1) to the reversed (r, gamma), r_s = s r and
gamma_s = 1 + s (gamma - 1) for s = 0, 0.1, ..., 1, and evaluates O on common noise pairs (TERD's
pair loss at the last timesteps, c = 1, forward passes only). The barrier is the highest interior
point of O above the higher of its two ends, relative to the highest loss on the line:

    barrier = (max_{0 < s < 1} O(s) - max(O(0), O(1))) / max_s L(s)

and the reversed trigger is a basin when barrier > basin_min_barrier. Measured on the `standard`
reversions of the 78 zoo models (README, "Basin test"): the 30 benign models -0.030 to -0.006, 38
backdoored ones +0.060 to +0.87; but three found VillanDiffusion triggers (villan-box-corner-d and the two
VE models, r cosine 0.87-0.95) are no basin on this line either (-0.089 to -0.037): their objective falls
all the way from N(0, I), held by lambda as a benign drift is. So it is off in every preset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .pair_loss import common_pairs, pair_losses
from .reversion import search_generator

SCALES = tuple(k / 10 for k in range(11))
BASIN_SEED_OFFSET = 5_000_003  # its own noise pairs, as the searches have (reversion.search_generator)


@dataclass
class BasinTest:
    scales: list[float]
    loss: list[float]  # TERD's pair loss along the line
    objective: list[float]  # loss - lambda ||r_s||_1
    barrier: float  # see the module docstring
    min_barrier: float
    basin: bool
    pairs: int
    network_evaluations: int

    def to_dict(self) -> dict:
        return asdict(self)


def basin_test(denoiser, r: torch.Tensor, gamma: torch.Tensor, l1_weight: float, pairs: int, window: int,
               min_barrier: float, generator: torch.Generator) -> BasinTest:
    """The objective along the line from the benign noise to (r, gamma) and its barrier (module docstring)."""
    start = denoiser.evaluations
    r, gamma = r.to(denoiser.device), gamma.to(denoiser.device)
    x0, t, e = common_pairs(denoiser, pairs, window, generator)
    loss, objective = [], []
    with torch.no_grad():
        for s in SCALES:
            value = float(pair_losses(denoiser, x0, s * r, 1.0 + s * (gamma - 1.0), t, 1.0, e).mean())
            loss.append(round(value, 5))
            objective.append(round(value - l1_weight * s * float(r.abs().sum()), 5))
    peak, ends = max(objective[1:-1]), max(objective[0], objective[-1])
    barrier = (peak - ends) / max(max(loss), 1e-12)
    ok = barrier == barrier  # not NaN
    return BasinTest(scales=list(SCALES), loss=loss, objective=objective, barrier=round(barrier, 5) if ok else barrier,
                     min_barrier=min_barrier, basin=bool(ok and barrier > min_barrier), pairs=pairs,
                     network_evaluations=denoiser.evaluations - start)


def scan_basin_test(denoiser, r: torch.Tensor, gamma: torch.Tensor, settings, seed: int) -> BasinTest:
    """The test with a scan's settings and its own generator (the scan's seed + BASIN_SEED_OFFSET)."""
    gen = search_generator(seed, BASIN_SEED_OFFSET, denoiser.device)
    return basin_test(denoiser, r, gamma, settings.l1_weight, settings.basin_pairs, settings.timestep_window,
                      settings.basin_min_barrier, gen)
