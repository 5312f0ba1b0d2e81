"""The report's sample images and their spread ratio (terd_scan/previews.py)."""

import pytest
import torch

from analytic_models import SCHEDULE, AnalyticUNet, box_trigger, corner_target
from terd_scan.denoisers import DDPMDenoiser
from terd_scan.previews import Previews, sample_previews, sample_spread


def test_sample_spread_is_the_mean_pairwise_distance():
    x = torch.zeros(3, 1, 1, 2)
    x[1, 0, 0, 0] = 3.0
    x[2, 0, 0, 1] = 4.0  # distances 3, 4 and 5
    assert sample_spread(x) == pytest.approx(4.0)
    assert sample_spread(torch.ones(4, 3, 2, 2)) == 0.0


def test_identical_samples_spread_zero_and_one_sample_has_no_spread():
    benign = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert Previews(benign=benign, trigger=torch.zeros(4, 3, 8, 8), steps=10).spread_ratio == 0.0
    with pytest.raises(ValueError, match="at least 2 samples"):
        sample_spread(benign[:1])


def test_the_true_trigger_collapses_a_backdoored_model_and_not_a_benign_one():
    """Closed-form BadDiffusion model: DDPM samples from its box trigger all land on the target,
    so they spread far less than samples from benign noise; on the benign model the same offset
    changes nothing."""
    r = box_trigger()
    ones = torch.ones_like(r)
    bad = sample_previews(DDPMDenoiser(AnalyticUNet(r, corner_target()), SCHEDULE), r, ones, 8, 100, seed=1)
    assert bad.trigger.shape == bad.benign.shape == (8, 3, 16, 16)
    assert bad.spread_ratio < 0.2
    assert (bad.trigger - corner_target()).abs().mean() < 0.1
    zero = torch.zeros_like(r)
    good = sample_previews(DDPMDenoiser(AnalyticUNet(), SCHEDULE), zero, ones, 8, 100, seed=1)
    assert 0.85 < good.spread_ratio < 1.15

