"""Basin test: the verdict's second condition (settings.basin_gate: on in `standard`, `--basin-gate` /
`--no-basin-gate`), that the reversed trigger is held by TERD's objective at all.

TERD flags a model when the reversed N(r, gamma^2) is far from N(0, I) in KL. The KL says how far
the descent went, not why. On every backdoored zoo model the pair loss at the true trigger is higher
than at r = 0 (50/50, benchmarks/trigger_line.py): a reversion holds a trigger only where the objective
O = L - lambda ||r||_1 has a wall: a barrier that separates it from the benign noise, or a rise just
beyond it. Where it has neither, the descent's end point is a drift of the benign optimum: the L1 term's
outward push against a flat loss, or a direction in which this model's loss is a little lower (the
zoo's benign-n: its bottom row of red shifted by -0.35 at every seed, 1.8-1.9 x the KL threshold), and
the run stopped where its learning rate ran out, not at anything that holds it.

The test walks the straight line from (0, 1) through the reversed (r, gamma), r_s = s r and
gamma_s = max(1 + s (gamma - 1), gamma_floor) for s = 0, 0.1, ..., 1.2, and evaluates O on common noise
pairs (TERD's pair loss at the last timesteps, c = 1, forward passes only). Relative to the highest
loss between N(0, I) and the trigger, L_max = max_{s <= 1} L(s):

    barrier = (max_{0 < s < 1} O(s) - max(O(0), O(1))) / L_max    the inner wall
    wall    = (O(1.2) - O(1)) / L_max                              the outer wall

and the trigger is held (`basin`) when either exceeds basin_min_barrier (2%, the patch search's margin).
Measured on the `standard` reversions of the 78 zoo models (docs/METHOD.md, "Basin test"): the 30 benign models
have barriers -0.032 to -0.006 and walls -0.016 to +0.010 (three sets of noise pairs); every flagged
backdoored one but the p = 2% box (its trigger not found) is held, the found VillanDiffusion triggers
whose objective falls all the way from N(0, I) (villan-box-corner-d, the VE models) by their outer wall
(+0.08 to +0.38).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from .pair_loss import common_pairs, pair_losses
from .reversion import search_generator

SCALES = tuple(k / 10 for k in range(13))  # 0 .. 1.2: the trigger at s = 1, the outer wall beyond it
END = SCALES.index(1.0)
BASIN_SEED_OFFSET = 5_000_003  # its own noise pairs, as the searches have (reversion.search_generator)


@dataclass
class BasinOutcome:
    """What the verdict reads from a basin test (detection.judge); a cached benchmark row keeps only this."""
    barrier: float  # the inner wall, see the module docstring
    wall: float  # the outer wall, see the module docstring
    min_barrier: float
    basin: bool  # held: barrier or wall above min_barrier
    pairs: int
    network_evaluations: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class BasinTest(BasinOutcome):
    """The outcome and the line it was read from."""
    scales: list[float]
    loss: list[float]  # TERD's pair loss along the line
    objective: list[float]  # loss - lambda ||r_s||_1

    def outcome(self) -> BasinOutcome:
        return BasinOutcome(**{f.name: getattr(self, f.name) for f in fields(BasinOutcome)})


def basin_test(denoiser, r: torch.Tensor, gamma: torch.Tensor, l1_weight: float, pairs: int, window: int,
               min_barrier: float, generator: torch.Generator, gamma_floor: float = 0.05) -> BasinTest:
    """The objective along the line from the benign noise through (r, gamma), and its two walls (module docstring)."""
    start = denoiser.evaluations
    r, gamma = r.to(denoiser.device), gamma.to(denoiser.device)
    x0, t, e = common_pairs(denoiser, pairs, window, generator)
    loss, objective = [], []
    with torch.no_grad():
        for s in SCALES:  # past the trigger gamma would cross 0: it stops at the reversion's floor
            gamma_s = (1.0 + s * (gamma - 1.0)).clamp_min(gamma_floor)
            value = float(pair_losses(denoiser, x0, s * r, gamma_s, t, 1.0, e).mean())
            loss.append(round(value, 5))
            objective.append(round(value - l1_weight * s * float(r.abs().sum()), 5))
    scale = max(max(loss[:END + 1]), 1e-12)
    barrier = (max(objective[1:END]) - max(objective[0], objective[END])) / scale
    wall = (objective[-1] - objective[END]) / scale
    held = barrier > min_barrier or wall > min_barrier  # False when either is NaN and the other is not above
    return BasinTest(scales=list(SCALES), loss=loss, objective=objective, barrier=_rounded(barrier),
                     wall=_rounded(wall), min_barrier=min_barrier, basin=bool(held), pairs=pairs,
                     network_evaluations=denoiser.evaluations - start)


def _rounded(value: float) -> float:
    return round(value, 5) if value == value else value  # NaN stays NaN


def scan_basin_test(denoiser, r: torch.Tensor, gamma: torch.Tensor, settings, seed: int) -> BasinTest:
    """The test with a scan's settings and its own generator (the scan's seed + BASIN_SEED_OFFSET)."""
    gen = search_generator(seed, BASIN_SEED_OFFSET, denoiser.device)
    return basin_test(denoiser, r, gamma, settings.l1_weight, settings.basin_pairs, settings.timestep_window,
                      settings.basin_min_barrier, gen, settings.gamma_floor)
