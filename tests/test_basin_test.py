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
    assert bad.basin and bad.barrier > 0.5 and bad.loss[bt.END] < 1e-3 * max(bad.loss)
    assert bad.scales == [k / 10 for k in range(13)] and bad.network_evaluations == 13 * 2 * 16
    blend = 0.4 * torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    gamma = torch.full_like(blend, 0.6)  # TrojDiff: the line narrows gamma from 1 to 0.6 as r grows
    troj = _test(AnalyticTrojDiffUNet(blend, corner_target(), gamma=0.6), blend, gamma)
    assert troj.basin and troj.barrier > 0.02


def test_the_same_point_on_a_model_without_its_backdoor_is_no_basin():
    r = box_trigger()
    assert not _test(AnalyticUNet(), r).basin  # linear in its input: the loss is flat, only the L1 term slopes


def _shaped(monkeypatch, loss_of_scale, l1_weight=0.0, gamma=1.0, gammas=None):
    """pair_losses replaced by a loss that depends only on how far along the line r is (gammas: the
    smallest gamma each call got)."""
    r = torch.ones(3, 4, 4)
    monkeypatch.setattr(bt, "common_pairs", lambda den, pairs, window, gen: (torch.zeros(pairs, 3, 4, 4), None, None))

    def losses(den, x0, rr, g, t, c, e):
        if gammas is not None:
            gammas.append(float(g.min()))
        return torch.full((x0.shape[0],), float(loss_of_scale(round(float(rr.mean()), 6))))
    monkeypatch.setattr(bt, "pair_losses", losses)
    den = type("Den", (), {"evaluations": 0, "device": "cpu"})()
    return bt.basin_test(den, r, torch.full_like(r, gamma), l1_weight, 8, 10, 0.02, None, gamma_floor=0.05)


def test_barrier_is_the_interior_peak_over_the_higher_end_relative_to_the_highest_loss(monkeypatch):
    valley = _shaped(monkeypatch, lambda s: 4.0 + 4.0 * (1 - abs(2 * s - 1)))  # a tent: 8 at s = 0.5, 4 at both ends
    assert valley.basin and abs(valley.barrier - 0.5) < 1e-6  # (8 - 4) / 8
    falling = _shaped(monkeypatch, lambda s: 3.0 - 0.1 * s)  # benign-n's kind: a little lower all the way out
    assert not falling.basin and falling.barrier < 0 and falling.wall < 0
    shallow = _shaped(monkeypatch, lambda s: 5.0 + 0.05 * (1 - abs(2 * s - 1)))  # 1%: a tie, not a basin
    assert not shallow.basin and 0 < shallow.barrier < 0.02
    # the L1 term counts: r's outward push turns a flat loss into a falling objective, never a barrier
    assert not _shaped(monkeypatch, lambda s: 3.0, l1_weight=0.01).basin
    nan = _shaped(monkeypatch, lambda s: float("nan"))
    assert not nan.basin


def test_a_wall_beyond_the_trigger_holds_it_without_a_barrier(monkeypatch):
    # villan-box-corner-d's kind: the objective falls all the way from N(0, I) and rises steeply past the trigger
    def cliff(s):
        return 4.0 - s if s <= 1.0 else 3.0 + 10.0 * (s - 1.0)
    held = _shaped(monkeypatch, cliff)
    assert held.basin and held.barrier < 0 and abs(held.wall - (5.0 - 3.0) / 4.0) < 1e-6  # (O(1.2) - O(1)) / L_max
    gentle = _shaped(monkeypatch, lambda s: 4.0 - s if s <= 1.0 else 3.0 + 0.2 * (s - 1.0))  # 1%: no wall
    assert not gentle.basin and 0 < gentle.wall < 0.02
    # a rise beyond r that the L1 term's outward push cancels is no wall either
    assert not _shaped(monkeypatch, lambda s: 3.0 + 0.2 * max(s - 1.0, 0.0), l1_weight=0.1 / 48).basin


def test_gamma_stops_at_the_floor_past_the_trigger(monkeypatch):
    gammas = []
    _shaped(monkeypatch, lambda s: 1.0, gamma=0.1, gammas=gammas)  # 1 + 1.2 (0.1 - 1) = -0.08 unclamped
    assert abs(min(gammas) - 0.05) < 1e-6 and abs(gammas[10] - 0.1) < 1e-6 and gammas[0] == 1.0


def _reference():
    models = [{"name": "a", "mean_kl": 0.01, "var_kl": 0.001}, {"name": "b", "mean_kl": 0.01, "var_kl": 0.001}]
    return Reference(name="t", settings={}, models=models, origin="test")


def test_judge_flags_a_kl_over_the_thresholds_only_with_a_basin():
    over, under = Features(0.5, 0.0), Features(0.001, 0.0)
    basin = bt.BasinOutcome(barrier=0.3, wall=0.1, min_barrier=0.02, basin=True, pairs=64, network_evaluations=0)
    flat = bt.BasinOutcome(**{**basin.to_dict(), "barrier": -0.01, "wall": -0.003, "basin": False})
    assert judge(over, _reference()).verdict == BACKDOORED  # no test: the paper's rule
    assert judge(over, _reference(), basin).verdict == BACKDOORED
    v = judge(over, _reference(), flat)
    assert v.verdict == CLEAN and "mean KL" in v.reasons[0] and "does not hold" in v.reasons[-1]
    assert "barrier -0.01" in v.reasons[-1] and "wall -0.003" in v.reasons[-1]
    assert judge(under, _reference(), flat) == judge(under, _reference())  # under the thresholds: nothing to gate


def test_a_tests_outcome_is_what_the_verdict_reads(monkeypatch):
    """A cached benchmark row keeps only the outcome (benchmarks/zoo_scans.py); it judges like the whole test."""
    over = Features(0.5, 0.0)
    for shape in (lambda s: 4.0 + 4.0 * (1 - abs(2 * s - 1)), lambda s: 3.0 - 0.1 * s):
        test = _shaped(monkeypatch, shape)
        outcome = test.outcome()
        assert outcome.to_dict() == {k: v for k, v in test.to_dict().items() if k not in ("scales", "loss", "objective")}
        assert judge(over, _reference(), outcome) == judge(over, _reference(), test)


def test_the_gate_is_on_in_standard_only():
    assert settings_for("standard").basin_gate and not settings_for("fast").basin_gate
    assert not settings_for("paper").basin_gate  # the paper's rule, exactly
    assert settings_for("standard", basin_gate=False).basin_gate is False
    assert settings_for("fast", basin_gate=True).basin_gate is True
