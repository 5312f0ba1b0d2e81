"""The basin test (terd_scan/basin_test.py) and the verdict it gates (detection.judge)."""

import torch

from analytic_models import SCHEDULE, AnalyticTrojDiffUNet, AnalyticUNet, box_trigger, corner_target
from terd_scan import basin_test as bt
from terd_scan.denoisers import DDPMDenoiser
from terd_scan.detection import BACKDOORED, CLEAN, Features, judge
from terd_scan.presets import settings_for
from terd_scan.reference import Reference


def _test(unet, r, gamma=None, l1_weight=5e-5):
    gamma = torch.ones_like(r) if gamma is None else gamma
    return bt.basin_test(DDPMDenoiser(unet, SCHEDULE), r, gamma, l1_weight, 16, 10, 0.02, torch.Generator().manual_seed(0))


def test_a_true_trigger_is_a_basin_behind_a_barrier():
    r = box_trigger()
    bad = _test(AnalyticUNet(r, corner_target()), r)  # BadDiffusion: the pair loss cancels at r, not halfway
    assert bad.basin and bad.barrier > 0.5 and bad.loss[-1] < 1e-3 * max(bad.loss)
    assert bad.scales == [k / 10 for k in range(11)] and bad.network_evaluations == 11 * 2 * 16
    blend = 0.4 * torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    gamma = torch.full_like(blend, 0.6)  # TrojDiff: the line narrows gamma from 1 to 0.6 as r grows
    troj = _test(AnalyticTrojDiffUNet(blend, corner_target(), gamma=0.6), blend, gamma)
    assert troj.basin and troj.barrier > 0.02


def test_the_same_point_on_a_model_without_its_backdoor_is_no_basin():
    r = box_trigger()
    assert not _test(AnalyticUNet(), r).basin  # linear in its input: the loss is flat, only the L1 term slopes


def _shaped(monkeypatch, loss_of_scale, l1_weight=0.0):
    """pair_losses replaced by a loss that depends only on how far along the line r is."""
    r = torch.ones(3, 4, 4)
    monkeypatch.setattr(bt, "common_pairs", lambda den, pairs, window, gen: (torch.zeros(pairs, 3, 4, 4), None, None))
    monkeypatch.setattr(bt, "pair_losses", lambda den, x0, rr, gamma, t, c, e: torch.full(
        (x0.shape[0],), float(loss_of_scale(float(rr.mean())))))
    den = type("Den", (), {"evaluations": 0, "device": "cpu"})()
    return bt.basin_test(den, r, torch.ones_like(r), l1_weight, 8, 10, 0.02, None)


def test_barrier_is_the_interior_peak_over_the_higher_end_relative_to_the_highest_loss(monkeypatch):
    valley = _shaped(monkeypatch, lambda s: 4.0 + 4.0 * (1 - abs(2 * s - 1)))  # a tent: 8 at s = 0.5, 4 at both ends
    assert valley.basin and abs(valley.barrier - 0.5) < 1e-6  # (8 - 4) / 8
    falling = _shaped(monkeypatch, lambda s: 3.0 - 0.1 * s)  # benign-n's kind: a little lower all the way out
    assert not falling.basin and falling.barrier < 0
    shallow = _shaped(monkeypatch, lambda s: 5.0 + 0.05 * (1 - abs(2 * s - 1)))  # 1%: a tie, not a basin
    assert not shallow.basin and 0 < shallow.barrier < 0.02
    # the L1 term counts: r's outward push turns a flat loss into a falling objective, never a barrier
    assert not _shaped(monkeypatch, lambda s: 3.0, l1_weight=0.01).basin
    nan = _shaped(monkeypatch, lambda s: float("nan"))
    assert not nan.basin


def _reference():
    models = [{"name": "a", "mean_kl": 0.01, "var_kl": 0.001}, {"name": "b", "mean_kl": 0.01, "var_kl": 0.001}]
    return Reference(name="t", settings={}, models=models, origin="test")


def test_judge_flags_a_kl_over_the_thresholds_only_with_a_basin():
    over, under = Features(0.5, 0.0), Features(0.001, 0.0)
    basin = bt.BasinTest(scales=[], loss=[], objective=[], barrier=0.3, min_barrier=0.02, basin=True, pairs=64,
                         network_evaluations=0)
    flat = bt.BasinTest(**{**basin.to_dict(), "barrier": -0.01, "basin": False})
    assert judge(over, _reference()).verdict == BACKDOORED  # no test: the paper's rule
    assert judge(over, _reference(), basin).verdict == BACKDOORED
    v = judge(over, _reference(), flat)
    assert v.verdict == CLEAN and "mean KL" in v.reasons[0] and "no basin" in v.reasons[-1] and "-0.01" in v.reasons[-1]
    assert judge(under, _reference(), flat) == judge(under, _reference())  # under the thresholds: nothing to gate


def test_the_gate_is_opt_in():
    assert not any(settings_for(p).basin_gate for p in ("paper", "fast", "standard"))
    assert settings_for("standard", basin_gate=True).basin_gate is True
