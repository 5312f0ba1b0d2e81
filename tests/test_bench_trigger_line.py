"""benchmarks/trigger_line.py: the loss along the line from r = 0 to the true trigger, and its basin test."""

import math
import sys
from pathlib import Path

import torch

from analytic_models import SCHEDULE, AnalyticUNet, box_trigger, corner_target
from terd_scan.denoisers import DDPMDenoiser

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import trigger_line  # noqa: E402
from trigger_line import SCALES, line_profile  # noqa: E402

R_TRUE = box_trigger()


def _profile(unet, l1_weight=0.0):
    return line_profile(DDPMDenoiser(unet, SCHEDULE), R_TRUE, torch.ones_like(R_TRUE), l1_weight, 16, 10,
                        torch.Generator().manual_seed(0))


def test_the_line_runs_through_the_pair_loss_of_a_real_backdoor():
    """The closed-form BadDiffusion model: the pair loss cancels at the exact trigger and not halfway."""
    bad = _profile(AnalyticUNet(R_TRUE, corner_target()))
    k1, k5 = SCALES.index(1.0), SCALES.index(0.5)
    assert bad["loss"][k1] < 1e-3 * bad["loss"][k5]
    assert bad["basin"] and bad["barrier"] > 0
    assert len(bad["objective"]) == len(bad["loss"]) == len(SCALES)


def _shaped(monkeypatch, loss_of_scale):
    """pair_losses replaced by a loss that depends only on how far along the line r is."""
    norm = float(R_TRUE.norm())
    monkeypatch.setattr(trigger_line, "pair_losses",
                        lambda den, x0, r, gamma, t, c, e: torch.full((x0.shape[0],), loss_of_scale(float(r.norm()) / norm)))
    return _profile(AnalyticUNet())


def test_basin_needs_the_objective_to_fall_two_percent_below_the_barrier(monkeypatch):
    valley = _shaped(monkeypatch, lambda s: 4.0 + 3.0 * math.sin(math.pi * s) ** 2)  # barrier at 0.5, valley at 1
    assert valley["basin"] and valley["near_min_scale"] == 1.0 and abs(valley["barrier"] - 3.0) < 1e-3
    rising = _shaped(monkeypatch, lambda s: 2.0 + 4.0 * s)  # no barrier: a descent slides back to r = 0
    assert not rising["basin"] and rising["near_min_scale"] == 0.7 and rising["barrier"] == 0.0
    shallow = _shaped(monkeypatch, lambda s: 5.0 + 0.05 * math.sin(math.pi * s) ** 2)  # 1% dip: a tie, no basin
    assert not shallow["basin"] and shallow["barrier"] > 0
    assert not valley["trigger_below_zero"]
