"""The report's sample images and their spread ratio (terd_scan/previews.py)."""

import pytest
import torch

from analytic_models import SCHEDULE, AnalyticUNet, box_trigger, corner_target
from types import SimpleNamespace

from terd_scan.denoisers import DDPMDenoiser
from terd_scan.previews import NARROW_GAMMA, Previews, sample_previews, sample_spread, trojan_sample


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



class TrojanOracle(torch.nn.Module):
    """The exact eps of TrojDiff's poisoned marginals x_t = sqrt(abar) y + sqrt(1 - abar) (gamma eps + r) toward
    one target y: the network the published attack trains toward, on its poisoned inputs."""

    def __init__(self, r: torch.Tensor, gamma: float, y: torch.Tensor):
        super().__init__()
        from diffusers import DDPMScheduler

        self.abar = DDPMScheduler.from_config({k: v for k, v in SCHEDULE.items() if not k.startswith("_")}).alphas_cumprod
        self.r, self.gamma, self.y = r, gamma, y
        self.config = SimpleNamespace(in_channels=3, out_channels=3, sample_size=16)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        a = self.abar[t].float().view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(x - a.sqrt() * self.y - (1 - a).sqrt() * self.r) / (self.gamma * (1 - a).sqrt()))


def test_trojdiff_sampler_on_clean_marginals_is_ddpm_ancestral_sampling():
    """gamma 1 and r 0: TrojDiff's sampler is diffusers' DDPM step, strided steps included (same draws)."""
    den = DDPMDenoiser(AnalyticUNet(), SCHEDULE)
    x_T = torch.randn((3, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    ones, zero = torch.ones(3, 16, 16), torch.zeros(3, 16, 16)
    for steps in (50, 1000):
        a = trojan_sample(den, x_T, zero, ones, steps, generator=torch.Generator().manual_seed(4))
        b = den.ancestral_sample(x_T, steps, generator=torch.Generator().manual_seed(4))
        assert torch.allclose(a, b, atol=1e-4), (steps, float((a - b).abs().max()))


def test_a_narrowed_trigger_gets_a_trojdiff_sampler_row_that_shows_the_target():
    """On the TrojDiff oracle the trigger's noises land on the target through TrojDiff's sampler (100 strided
    steps); a trigger that is not narrowed gets no such row."""
    r = 0.5 * box_trigger()
    y = corner_target()
    den = DDPMDenoiser(TrojanOracle(r, 0.6, y), SCHEDULE)
    gamma = torch.full_like(r, 0.6)
    p = sample_previews(den, r, gamma, 4, 100, seed=1)
    assert p.trojan is not None and p.trojan.shape == p.trigger.shape == (4, 3, 16, 16)
    assert (p.trojan - y).pow(2).flatten(1).mean(1).max() < 0.01
    assert sample_previews(den, r, torch.full_like(r, NARROW_GAMMA + 0.01), 2, 10, seed=1).trojan is None


def test_the_trigger_image_gains_a_row_for_the_trojdiff_sampler():
    import io

    from PIL import Image

    from terd_scan.report import trigger_image

    r, x = torch.zeros(3, 16, 16), torch.zeros(4, 3, 16, 16)
    three = Image.open(io.BytesIO(trigger_image(r, r + 1, x, x)))
    four = Image.open(io.BytesIO(trigger_image(r, r + 1, x, x, trojan=x)))
    assert four.width == three.width and four.height > three.height * 1.3
