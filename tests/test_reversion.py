"""TERD reversion on closed-form denoisers (fast, exact backdoors) and its invariants."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from analytic_models import SCHEDULE, AnalyticTrojDiffUNet, AnalyticUNet, box_trigger, corner_target
from terd_scan.denoisers import DDPMDenoiser
from terd_scan.detection import kl_features
from terd_scan.presets import settings_for
from terd_scan.canvas_search import canvas_candidates
from terd_scan.dip_search import DIP_KEEP_RATIO, DIP_SEED_RATIO
from terd_scan.patch_search import BASIN_RATIO, patch_candidates
from terd_scan.pair_loss import pair_loss
from terd_scan.reversion import reverse_trigger

FAST = settings_for("fast")


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_pair_loss_cancels_the_attack_coefficient_at_the_true_trigger():
    """At r = trigger the backdoored residual e - eps is the same for both noises: L ~ 0,
    without knowing the attack's output coefficient; at r = 0 it is not."""
    r = box_trigger()
    den = DDPMDenoiser(AnalyticUNet(r, corner_target()), SCHEDULE)
    g = torch.Generator().manual_seed(0)
    x0, t, ones = torch.randn(16, *r.shape, generator=g), torch.full((16,), 995), torch.ones_like(r)
    at_trigger = pair_loss(den, x0, r, ones, t, 1.0, g)
    at_zero = pair_loss(den, x0, torch.zeros_like(r), ones, t, 1.0, g)
    assert float(at_trigger) < 1e-3 * float(at_zero)


def test_recovers_a_box_trigger_and_flags_it_against_a_benign_model():
    r_true = box_trigger()
    bad = reverse_trigger(DDPMDenoiser(AnalyticUNet(r_true, corner_target()), SCHEDULE), FAST, seed=0)
    good = reverse_trigger(DDPMDenoiser(AnalyticUNet(), SCHEDULE), FAST, seed=0)
    assert cos(bad.r, r_true) > 0.9
    assert kl_features(bad.r, bad.gamma).mean_kl > 1.5 * kl_features(good.r, good.gamma).mean_kl
    assert torch.allclose(bad.gamma, torch.ones_like(bad.gamma), atol=0.05)


def test_deterministic_given_seed_and_frozen_network():
    unet = AnalyticUNet(box_trigger(), corner_target())
    den = DDPMDenoiser(unet, SCHEDULE)
    settings = settings_for("fast", stage1_iterations=20, stage2_iterations=2, patch_search=False,
                            narrow_search=False, canvas_search=False, dip_search=False)
    a = reverse_trigger(den, settings, seed=3)
    b = reverse_trigger(den, settings, seed=3)
    assert torch.equal(a.r, b.r) and torch.equal(a.gamma, b.gamma)
    assert all(not p.requires_grad for p in unet.parameters()) and not unet.training
    assert a.network_evaluations == 20 * 2 * 16 + 2 * (16 * 10 + 2 * 2 * 16)
    assert len(a.trace["loss"]) == 22 and a.trace["stage"].count(2) == 2


def test_narrow_search_that_finds_no_basin_leaves_the_result_unchanged():
    """On a model trained on gamma = 1 only, narrowing the noise raises the loss: the search seeds
    nothing, costs its forward passes, and the result is the one without it."""
    den = DDPMDenoiser(AnalyticUNet(box_trigger(), corner_target()), SCHEDULE)
    base = settings_for("fast", stage1_iterations=20, stage2_iterations=2, patch_search=False, narrow_search=False,
                        canvas_search=False, dip_search=False)
    without = reverse_trigger(den, base, seed=1)
    narrow = base.override(narrow_search=True, narrow_sweep_unseeded=False)  # the screen alone
    with_probe = reverse_trigger(den, narrow, seed=1)
    assert torch.equal(with_probe.r, without.r) and torch.equal(with_probe.gamma, without.gamma)
    assert with_probe.narrow["seeded_run"] is False and with_probe.narrow["ratio"] > 1.0
    offsets = 2 ** 3 * len(narrow.narrow_amplitudes)  # every channel sign pattern x amplitudes
    probe_evals = offsets * (1 + len(narrow.narrow_gammas)) * 2 * narrow.narrow_pairs  # forward passes only
    assert with_probe.narrow["candidates"] == offsets * len(narrow.narrow_gammas)
    assert with_probe.network_evaluations - without.network_evaluations == probe_evals
    assert [run["chosen"] for run in with_probe.runs] == [True] and without.narrow is None


DIP_ONLY = settings_for("fast", patch_search=False, narrow_search=False, canvas_search=False)


def test_dip_search_alone_finds_a_faint_narrow_trigger():
    """TrojDiff's blend scaled toward N(0, I) (r = 0.05 x a picture, gamma 0.6 kept): from the paper's start
    the reversion stays at gamma ~ 1 and misses its narrowed noise; the loss at r = 0 dips at gamma 0.6, below every wider
    gamma's, so the dip search descends r with gamma held there, and that run is kept and chosen."""
    faint = 0.05 * (torch.rand((3, 16, 16), generator=torch.Generator().manual_seed(5)) * 2 - 1)
    den = DDPMDenoiser(AnalyticTrojDiffUNet(faint, box_trigger(), gamma=0.6), SCHEDULE)
    without = reverse_trigger(den, DIP_ONLY.override(dip_search=False), seed=0)
    found = reverse_trigger(den, DIP_ONLY, seed=0)
    assert float(without.gamma.mean()) > 0.9 and without.start.startswith("paper")  # the narrow noise missed
    assert found.dip["seeded_run"] and found.dip["kept"] and found.dip["gamma"] == 0.6
    assert found.dip["ratio"] < DIP_SEED_RATIO and found.dip["end_ratio"] < DIP_KEEP_RATIO
    assert found.start.startswith("dip seed") and [run["chosen"] for run in found.runs] == [False, True]
    assert torch.allclose(found.gamma, torch.full_like(found.gamma, 0.6))
    assert kl_features(found.r, found.gamma).mean_kl > 0.15  # -log 0.6 + (0.36 - 1) / 2 = 0.19 per dimension


def test_dip_search_that_finds_no_dip_leaves_the_result_unchanged():
    """On a model trained on gamma = 1 only the loss at r = 0 rises as the noise narrows: no run, the
    screen's forward passes only, and the result is the one without it."""
    den = DDPMDenoiser(AnalyticUNet(box_trigger(), corner_target()), SCHEDULE)
    base = DIP_ONLY.override(stage1_iterations=20, stage2_iterations=2)
    without = reverse_trigger(den, base.override(dip_search=False), seed=1)
    with_screen = reverse_trigger(den, base, seed=1)
    assert torch.equal(with_screen.r, without.r) and torch.equal(with_screen.gamma, without.gamma)
    assert with_screen.dip["seeded_run"] is False and with_screen.dip["ratio"] >= DIP_SEED_RATIO
    assert with_screen.network_evaluations - without.network_evaluations == 9 * 2 * base.dip_pairs
    assert len(with_screen.runs) == 1 and without.dip is None


def test_dip_profile_scores_each_gamma_against_every_wider_one(monkeypatch):
    """The dip at a gamma is its loss over the HIGHEST loss at any wider gamma of the grid (the grid sorted
    widest first whatever its order); the widest never dips, and a NaN loss never wins."""
    import terd_scan.dip_search as dip_search

    table = {1.0: 4.0, 0.8: 10.0, 0.6: 6.0, 0.4: float("nan"), 0.2: 7.0}
    monkeypatch.setattr(dip_search, "pair_losses", lambda den, x0, r, gamma, t, c, e: torch.tensor([table[gamma]]))
    monkeypatch.setattr(dip_search, "common_pairs", lambda *args: (None, None, None))
    gamma, ratio, losses = dip_search.dip_profile(None, torch.zeros(1), [0.2, 0.6, 1.0, 0.4, 0.8], 1, 1, None)
    assert gamma == 0.6 and ratio == pytest.approx(0.6) and losses[:3] == [4.0, 10.0, 6.0]
    table.update({0.8: 3.0, 0.6: 2.0})  # falling all the way: each against the max above it (4.0)
    assert dip_search.dip_profile(None, torch.zeros(1), [1.0, 0.8, 0.6], 1, 1, None)[:2] == (0.6, 0.5)


CANVAS_ONLY = settings_for("fast", patch_search=False, narrow_search=False)


def test_canvas_candidates_are_every_channel_sign_pattern_at_every_amplitude():
    c = canvas_candidates((3, 4, 5), (1.0, 0.5))
    assert c.shape == (16, 3, 4, 5)
    means = {tuple(v.tolist()) for v in c.flatten(2).mean(2)}
    assert len(means) == 16 and all(abs(x) in (1.0, 0.5) for m in means for x in m)
    assert torch.equal(c, c.flatten(2)[..., :1].unsqueeze(-1).expand_as(c))  # constant per channel


def test_canvas_search_finds_a_mirrored_trigger_the_paper_start_misses():
    """The box drawn on a +1 canvas points away from the start -U[0,1): without the canvas search the
    reversion returns exactly the benign model's r; with it, a run from the +1 canvas is seeded,
    kept, and lands on the trigger."""
    trigger = -box_trigger()
    den = DDPMDenoiser(AnalyticUNet(trigger, corner_target()), SCHEDULE)
    without = reverse_trigger(den, CANVAS_ONLY.override(canvas_search=False), seed=0)
    benign = reverse_trigger(DDPMDenoiser(AnalyticUNet(), SCHEDULE), CANVAS_ONLY.override(canvas_search=False), seed=0)
    assert torch.allclose(without.r, benign.r) and cos(without.r, trigger) < 0
    found = reverse_trigger(den, CANVAS_ONLY, seed=0)
    assert found.canvas["seeded_run"] and found.canvas["kept"] and found.canvas["offset"] == [1.0, 1.0, 1.0]
    assert found.start.startswith("canvas seed") and cos(found.r, trigger) > 0.9
    assert kl_features(found.r, found.gamma).mean_kl > 2 * kl_features(without.r, without.gamma).mean_kl


def test_canvas_search_that_finds_no_basin_leaves_the_result_unchanged():
    den = DDPMDenoiser(AnalyticUNet(), SCHEDULE)
    base = CANVAS_ONLY.override(stage1_iterations=20, stage2_iterations=2, canvas_search=False)
    without = reverse_trigger(den, base, seed=1)
    with_screen = reverse_trigger(den, base.override(canvas_search=True), seed=1)
    assert torch.equal(with_screen.r, without.r) and torch.equal(with_screen.gamma, without.gamma)
    assert with_screen.canvas["seeded_run"] is False and with_screen.canvas["ratio"] >= BASIN_RATIO
    screen_evals = 16 * 2 * 2 * base.canvas_pairs  # candidates x (full, half) x a noise pair each
    assert with_screen.network_evaluations - without.network_evaluations == screen_evals
    assert len(with_screen.runs) == 1 and without.canvas is None


def test_centred_start_is_the_paper_draw_without_its_offset():
    """centred_start shifts the paper's -U[0,1) draw by 0.5 (same generator state, so everything
    after the start is drawn alike) and says so in the result."""
    den = DDPMDenoiser(AnalyticUNet(), SCHEDULE)
    still = settings_for("fast", stage1_iterations=0, stage2_iterations=0, patch_search=False, narrow_search=False,
                         canvas_search=False, dip_search=False)
    paper = reverse_trigger(den, still, seed=4)
    centred = reverse_trigger(den, still.override(centred_start=True), seed=4)
    assert float(paper.r.max()) <= 0.0 and float(paper.r.min()) >= -1.0
    assert torch.allclose(centred.r, paper.r + 0.5)
    assert abs(float(centred.r.mean())) < 0.05 and paper.start.startswith("paper") and centred.start.startswith("centred")


def test_gamma_respects_its_floor():
    den = DDPMDenoiser(AnalyticUNet(), SCHEDULE)
    res = reverse_trigger(den, settings_for("fast", stage1_iterations=30, stage2_iterations=0, gamma_lr=50.0,
                                            gamma_floor=0.2), seed=0)
    assert float(res.gamma.min()) >= 0.2 - 1e-6


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_types_are_converted_to_epsilon(prediction_type):
    """A network predicting v or x0 gives the same eps as the epsilon network it was made from."""
    base = AnalyticUNet(box_trigger(), corner_target())
    eps_den = DDPMDenoiser(base, SCHEDULE)

    class Converted(torch.nn.Module):
        config = base.config

        def forward(self, x, t):
            eps = base(x, t).sample
            a = base.abar[t].view(-1, 1, 1, 1)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            out = a.sqrt() * eps - (1 - a).sqrt() * x0 if prediction_type == "v_prediction" else x0
            return type("O", (), {"sample": out})

    den = DDPMDenoiser(Converted(), {**SCHEDULE, "prediction_type": prediction_type})
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([10, 300, 700, 990])
    assert torch.allclose(den.eps(x, t), eps_den.eps(x, t), atol=1e-3)


def patch_trigger(shape=(3, 16, 16)) -> torch.Tensor:
    r = torch.zeros(shape)
    r[:, 11:15, 11:15] = 2.0
    return r


def test_patch_candidates_cover_every_position_and_both_signs():
    patches, where = patch_candidates((3, 16, 12), 0.25)
    assert patches.shape == (2 * 13 * 10, 3, 16, 12) and len(where) == patches.shape[0]
    k = where.index((5, 7, 4, 3, -1))
    assert float(patches[k].sum()) == -3 * 4 * 3 and float(patches[k, :, 5:9, 7:10].mean()) == -1.0
    # larger images: the positions step by a quarter of the patch side, the far edge included
    patches, where = patch_candidates((4, 32, 32), 0.25)
    assert patches.shape[0] == 2 * 13 * 13 and (24, 24, 8, 8, 1) in where and (2, 0, 8, 8, 1) in where
    _, where = patch_candidates((3, 30, 30), 0.25)  # 8x8 patches, stride 2: 0, 2, ..., 22 and 22
    assert sorted({y for y, *_ in where}) == list(range(0, 23, 2))


def test_patch_search_finds_a_sparse_trigger_the_paper_start_misses():
    """A 4x4 patch on a zero background, far from r0 = -U[0,1): the search locates it, the seeded
    run is chosen and recovers it; without the search the reversion does not."""
    r_true = patch_trigger()
    den = DDPMDenoiser(AnalyticUNet(r_true, corner_target()), SCHEDULE)
    with_search = reverse_trigger(den, FAST, seed=0)
    without = reverse_trigger(den, settings_for("fast", patch_search=False), seed=0)
    assert with_search.search["top"] == 11 and with_search.search["left"] == 11 and with_search.search["seeded_run"]
    assert with_search.start.startswith("patch seed") and cos(with_search.r, r_true) > 0.9
    assert [run["chosen"] for run in with_search.search["runs"]] == [False, True]
    assert cos(without.r, r_true) < 0.5


def test_patch_search_on_a_benign_model_seeds_nothing():
    den = DDPMDenoiser(AnalyticUNet(), SCHEDULE)
    before = den.evaluations
    res = reverse_trigger(den, settings_for("fast", stage1_iterations=5, stage2_iterations=1, narrow_search=False,
                                            canvas_search=False, dip_search=False), seed=0)
    assert res.search["seeded_run"] is False and res.search["ratio"] >= BASIN_RATIO
    assert res.start.startswith("paper") and len(res.search["runs"]) == 1
    searched = res.search["candidates"] * 2 * 2 * FAST.patch_pairs  # 2 amplitudes x a pair per noise
    assert res.search["network_evaluations"] == searched
    assert res.network_evaluations == den.evaluations - before == searched + 5 * 2 * 16 + (16 * 10 + 2 * 2 * 16)


def _run_at(r, gamma):
    from terd_scan.reversion import _Run
    trace = {"stage": [1, 2], "loss": [5.0, 4.0], "r_l1_mean": [0.3, 0.3], "gamma_mean": [0.75, 0.75]}
    return _Run(r=r, gamma=torch.full(r.shape, gamma), trace=trace, seconds={"stage1": 1.0, "stage2": 1.0}, start="seed")


def test_refinement_of_a_narrow_run_settles_at_the_gamma_with_the_lowest_loss():
    """A narrow run that stopped wider than the trigger (gamma 0.75 for TrojDiff's 0.6) is refined at
    each held gamma 0.75 x scale; the lowest loss on common pairs picks x0.85 (gamma 0.64), the scale
    nearest the trigger's. The refinement's iterations join the trace as stage 3."""
    from terd_scan.reversion import _refine_narrow_run
    r_true = 0.2 * corner_target() + 0.2
    den = DDPMDenoiser(AnalyticTrojDiffUNet(r_true, box_trigger(), gamma=0.6), SCHEDULE)
    settings = FAST.override(narrow_refine_iterations=5)
    g = torch.Generator().manual_seed(0)
    run, outcome = _refine_narrow_run(den, settings, _run_at(r_true.clone(), 0.75), g, None)
    assert outcome["scales"] == [1.0, 0.85, 0.7, 0.55] and len(outcome["losses"]) == 4
    assert outcome["scale"] == 0.85 and min(outcome["losses"]) == outcome["losses"][1]
    assert torch.allclose(run.gamma, torch.full_like(run.gamma, 0.75 * 0.85))  # gamma is held
    assert run.trace["stage"] == [1, 2] + [3] * 5 and run.start == "seed, refined at gamma x0.85"


def test_refinement_never_picks_a_gamma_whose_loss_is_nan():
    """A refinement whose loss is NaN (a diverged descent) never wins."""
    from terd_scan.reversion import _refine_narrow_run

    class NanWhenWide:  # the benign analytic model, NaN wherever the noise is wider than 0.7
        def __init__(self):
            self.unet = AnalyticUNet()

        def __call__(self, x, t):
            out = self.unet(x, t).sample
            return SimpleNamespace(sample=out * float("nan") if x.std() > 0.7 else out)

    den = DDPMDenoiser(AnalyticUNet(), SCHEDULE)
    den.unet = NanWhenWide()  # the first scale (gamma 0.75) gets a NaN loss; min() alone would keep it
    g = torch.Generator().manual_seed(0)
    _, outcome = _refine_narrow_run(den, FAST.override(narrow_refine_iterations=2), _run_at(torch.zeros(3, 16, 16), 0.75),
                                    g, None)
    assert outcome["losses"][0] == float("inf") and outcome["scale"] == 0.85


def _narrow_probe(offset: float):
    from terd_scan.narrow_search import NarrowSeed
    return NarrowSeed(r=torch.full((3, 16, 16), offset), gamma=0.8, ratio=0.9, candidates=1, network_evaluations=0)


def test_held_gamma_sweep_keeps_the_gamma_with_the_lowest_loss_if_the_noise_stays_narrow():
    """After a narrow run that spread back, r is descended from the screen's offset at each screened
    gamma held: the TrojDiff model's own gamma (0.6) has the lowest loss and passes the narrow test;
    on a benign model the best sweep fails it and is not kept."""
    from terd_scan.reversion import _held_gamma_sweep
    r_true = 0.2 * corner_target() + 0.2
    settings = FAST.override(narrow_refine_iterations=5)
    den = DDPMDenoiser(AnalyticTrojDiffUNet(r_true, box_trigger(), gamma=0.6), SCHEDULE)
    spread = _run_at(torch.full((3, 16, 16), 0.2), 0.95)  # the learned-gamma run that spread back
    run, outcome = _held_gamma_sweep(den, settings, _narrow_probe(0.2), spread.seconds,
                                     torch.Generator().manual_seed(0), None)
    assert outcome["gammas"] == [0.8, 0.6, 0.4, 0.2] and len(outcome["losses"]) == 4
    assert outcome["gamma"] == 0.6 and min(outcome["losses"]) == outcome["losses"][1]
    assert outcome["kept"] and outcome["end_ratio"] < 0.8
    assert torch.allclose(run.gamma, torch.full_like(run.gamma, 0.6))  # held
    assert run.start == "narrow-noise seed (offset [0.2, 0.2, 0.2]), gamma held at 0.6"
    assert run.trace["stage"] == [1] * 5 and run.seconds is spread.seconds  # descents timed as narrow_refine
    benign = DDPMDenoiser(AnalyticUNet(), SCHEDULE)
    _, outcome = _held_gamma_sweep(benign, settings, _narrow_probe(0.2), spread.seconds,
                                   torch.Generator().manual_seed(0), None)
    assert not outcome["kept"] and outcome["end_ratio"] >= 0.8


def test_held_gamma_sweep_stopping_at_the_first_rise_keeps_the_full_grids_pick():
    """stop_at_rise (the unseeded sweep) walks the gammas from the widest and stops at the first loss
    higher than the one before: on the TrojDiff model (gamma 0.6) after 0.4, picking the full grid's
    gamma; on a benign model after 0.6. The seeded sweep keeps the grid's order and every gamma."""
    from terd_scan.reversion import _held_gamma_sweep
    r_true = 0.2 * corner_target() + 0.2
    settings = FAST.override(narrow_refine_iterations=5, narrow_gammas=(0.2, 0.6, 0.4, 0.8))  # any order
    den = DDPMDenoiser(AnalyticTrojDiffUNet(r_true, box_trigger(), gamma=0.6), SCHEDULE)
    full, full_outcome = _held_gamma_sweep(den, settings, _narrow_probe(0.2), {}, torch.Generator().manual_seed(0), None)
    assert full_outcome["gammas"] == [0.2, 0.6, 0.4, 0.8] and full_outcome["gamma"] == 0.6
    run, outcome = _held_gamma_sweep(den, settings, _narrow_probe(0.2), {}, torch.Generator().manual_seed(0), None,
                                     stop_at_rise=True)
    assert outcome["gammas"] == [0.8, 0.6, 0.4] and len(outcome["losses"]) == 3 and outcome["gamma"] == 0.6
    assert outcome["losses"][2] > outcome["losses"][1] < outcome["losses"][0]
    benign = DDPMDenoiser(AnalyticUNet(), SCHEDULE)
    _, outcome = _held_gamma_sweep(benign, settings, _narrow_probe(0.2), {}, torch.Generator().manual_seed(0), None,
                                   stop_at_rise=True)
    assert outcome["gammas"] == [0.8, 0.6] and outcome["gamma"] == 0.8 and not outcome["kept"]


def test_a_kept_held_sweep_replaces_a_narrow_run_that_spread_back(monkeypatch):
    """reverse_trigger: when the learned-gamma narrow run fails the narrow test at its end, the held
    sweep runs, and if it passes, it is the narrow result (kept, chosen, no canvas run after it);
    if it fails too, the paper's run is the result. No refinement follows a sweep."""
    import terd_scan.reversion as reversion
    r_true = 0.2 * corner_target() + 0.2
    den = DDPMDenoiser(AnalyticTrojDiffUNet(r_true, box_trigger(), gamma=0.6), SCHEDULE)
    settings = FAST.override(stage1_iterations=3, stage2_iterations=1, narrow_refine_iterations=2, patch_search=False,
                             dip_search=False)  # its dip at gamma 0.6 would seed a third run after a failed sweep
    for sweep_ratio, kept in ((0.1, True), (0.95, False)):
        ratios = iter([0.95, sweep_ratio])  # the learned run's end test, then the sweep's
        monkeypatch.setattr(reversion, "narrow_ratio", lambda *a, **k: next(ratios))
        res = reverse_trigger(den, settings, seed=0)
        narrow = res.narrow
        assert narrow["seeded_run"] and narrow["end_ratio"] == 0.95
        assert narrow["held"]["kept"] is kept and narrow["kept"] is kept and "refine" not in narrow
        assert res.start.startswith("narrow-noise seed") == kept and res.start.startswith("paper") != kept
        assert [run["chosen"] for run in res.runs] == [not kept, kept] + ([False] if res.canvas["seeded_run"] else [])
        if kept:
            assert torch.allclose(res.gamma, torch.full_like(res.gamma, narrow["held"]["gamma"]))
            assert not res.canvas["seeded_run"]


def test_a_screen_that_seeds_nothing_is_still_followed_by_the_held_sweep(monkeypatch):
    """reverse_trigger with narrow_sweep_unseeded: where the screen seeds no run (ratio >= 1), the held
    sweep still runs from its best offset; kept (end test passes), it is one more candidate run, chosen
    only if its KL is the most concentrated (it does not stop a canvas run, as a seeded narrow run does);
    not kept, the result is bit-identical to a scan without the sweep (its own generator)."""
    import terd_scan.reversion as reversion
    den = DDPMDenoiser(AnalyticUNet(), SCHEDULE)  # benign: no constant offset narrows its loss
    settings = FAST.override(stage1_iterations=3, stage2_iterations=1, narrow_refine_iterations=2, patch_search=False)
    without = reverse_trigger(den, settings.override(narrow_sweep_unseeded=False), seed=0)
    assert not without.narrow["seeded_run"] and "held" not in without.narrow
    real = reverse_trigger(den, settings, seed=0)  # the real end test: a benign model's sweep is not kept
    assert not real.narrow["seeded_run"] and real.narrow["held"]["end_ratio"] >= 0.8
    assert not real.narrow["kept"] and not real.narrow["held"]["kept"]
    assert torch.equal(real.r, without.r) and torch.equal(real.gamma, without.gamma) and real.runs == without.runs
    # the sweep ran, from the widest gamma, and stopped at the first rise of the loss (a benign model's
    # loss only rises as its noise narrows): two descents, their losses on common pairs, the end test
    assert real.narrow["held"]["gammas"] == [0.8, 0.6]
    pairs = settings.narrow_pairs
    sweep_evals = 2 * (2 * 2 * settings.batch_size + 2 * pairs) + 2 * 2 * pairs
    assert real.network_evaluations - without.network_evaluations == sweep_evals
    monkeypatch.setattr(reversion, "narrow_ratio", lambda *a, **k: 0.1)  # now the sweep's end test passes
    kept = reverse_trigger(den, settings, seed=0)
    assert kept.narrow["held"]["kept"] and kept.narrow["kept"] and not kept.narrow["seeded_run"]
    paper, sweep = kept.runs[:2]
    assert paper["start"].startswith("paper") and sweep["start"].startswith("narrow-noise seed")
    assert len(kept.runs) == 2 and not kept.canvas["basin"]  # the benign model has no canvas basin
    real_canvas = reversion.search_canvas_seed  # given one, the kept sweep does not stop its run
    monkeypatch.setattr(reversion, "search_canvas_seed", lambda *a: replace(real_canvas(*a), ratio=0.5))
    with_canvas = reverse_trigger(den, settings, seed=0)
    assert with_canvas.canvas["seeded_run"] and len(with_canvas.runs) == 3
    monkeypatch.setattr(reversion, "search_canvas_seed", real_canvas)
    # the more concentrated KL of the paper's run and the sweep wins
    real_features = reversion.kl_features
    for shift, sweep_wins in ((1.0, True), (-1.0, False)):  # the held run's variance made larger / smaller
        def shifted(r, gamma, shift=shift):
            f = real_features(r, gamma)
            held = bool((gamma - gamma.flatten()[0]).abs().max() == 0) and float(gamma.flatten()[0]) < 0.9
            return replace(f, var_kl=f.var_kl + shift) if held else f
        monkeypatch.setattr(reversion, "kl_features", shifted)
        res = reverse_trigger(den, settings, seed=0)
        assert [run["chosen"] for run in res.runs] == [not sweep_wins, sweep_wins]
        assert res.start.startswith("narrow-noise seed") is sweep_wins


def test_report_says_how_the_narrow_search_ended():
    from terd_scan.report import narrow_outcome
    base = {"seeded_run": True, "end_ratio": 0.9427, "kept": True}
    held = {"gammas": [0.8, 0.6, 0.4, 0.2], "losses": [6.4, 3.12, 22.7, 238.2], "gamma": 0.6, "end_ratio": 0.1598, "kept": True}
    assert narrow_outcome({**base, "held": held}) == (
        "seeded a run that spread back (end ratio 0.943); r descended from the offset at 4 gammas held, "
        "lowest loss at gamma 0.6 (end ratio 0.16): kept")
    assert narrow_outcome({**base, "kept": False, "held": {**held, "kept": False}}).endswith(": not kept")
    refine = {"scales": [1.0, 0.85], "losses": [3.6, 2.9], "scale": 0.85, "gamma_mean": 0.63}
    assert narrow_outcome({**base, "end_ratio": 0.47, "refine": refine}) == (
        "seeded a run that stayed narrow (end ratio 0.47): kept; r refined at 2 gammas held, lowest loss at "
        "gamma x0.85 (gamma mean 0.630)")
    assert narrow_outcome({"seeded_run": False, "end_ratio": None, "kept": False}).startswith("no basin")
    assert narrow_outcome({"seeded_run": False, "end_ratio": None, "kept": True, "held": held}) == (
        "no basin (ratio >= 1.0), no seeded run; r descended from the offset at 4 gammas held, lowest loss at "
        "gamma 0.6 (end ratio 0.16): kept")


def test_memory_plan_keeps_small_inputs_whole_and_splits_large_ones():
    from terd_scan.memory_plan import memory_plan

    def plan(shape, device="cpu"):
        p = memory_plan(shape, 16, device)
        return p.micro_batch, p.checkpointed_sampler

    assert plan((3, 16, 16)) == (16, False) and plan((3, 32, 32)) == (16, False)  # the zoo, CIFAR-10
    assert plan((3, 64, 64)) == (4, True) and plan((3, 256, 256)) == (1, True)
    assert plan((4, 64, 64)) == (3, True)  # an LDM-CelebA-HQ latent
    # a GPU says when it runs out: the whole batch first there, then halved down to one pair
    assert plan((3, 256, 256), "cuda") == (16, True) and plan((3, 16, 16), "cuda:1") == (16, False)
    p, sizes = memory_plan((3, 256, 256), 16, "cuda"), []
    while p is not None:
        sizes.append((p.micro_batch, p.halvings))
        p = p.halved()
    assert sizes == [(16, 0), (8, 1), (4, 2), (2, 3), (1, 4)]


def test_a_micro_batched_checkpointed_reversion_is_the_whole_batch_one(monkeypatch):
    """Splitting the batch into chunks (gradients accumulated) and recomputing the sampler's network
    calls in the backward pass change the memory a reversion needs, not its result: same draws, same
    gradient up to float rounding."""
    import terd_scan.reversion as reversion
    from terd_scan.memory_plan import MemoryPlan

    den = DDPMDenoiser(AnalyticUNet(box_trigger(), corner_target()), SCHEDULE)
    settings = settings_for("fast", stage1_iterations=30, stage2_iterations=3, patch_search=False,
                            narrow_search=False, canvas_search=False, dip_search=False)
    whole = reverse_trigger(den, settings, seed=5)
    assert whole.memory == {"micro_batch": 16, "checkpointed_sampler": False, "halvings": 0}
    monkeypatch.setattr(reversion, "memory_plan", lambda shape, batch, device: MemoryPlan(5, True))  # 5 + 5 + 5 + 1
    checkpointed, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda fn, x, *a, **k: checkpointed.append(x.shape[0]) or checkpoint(fn, x, *a, **k))
    split = reverse_trigger(den, settings, seed=5)
    assert split.memory == {"micro_batch": 5, "checkpointed_sampler": True, "halvings": 0}
    assert torch.allclose(whole.r, split.r, atol=1e-5, rtol=1e-4), (whole.r - split.r).abs().max()
    assert torch.allclose(whole.gamma, split.gamma, atol=1e-5, rtol=1e-4)
    assert whole.trace["loss"] == pytest.approx(split.trace["loss"], rel=1e-5)
    assert split.network_evaluations == whole.network_evaluations
    assert checkpointed == ([5] * 30 + [1] * 10) * 3  # 10 sampler calls per chunk, 4 chunks, 3 iterations


def test_running_out_of_device_memory_halves_the_micro_batch_and_retries_with_the_same_draws(monkeypatch):
    """A GPU that cannot hold the whole batch: each step that runs out is retried with half the pairs per
    pass until it fits; nothing is applied by the failed attempt, so the result is the whole-batch one."""
    den = DDPMDenoiser(AnalyticUNet(box_trigger(), corner_target()), SCHEDULE)
    settings = settings_for("fast", stage1_iterations=30, stage2_iterations=3, patch_search=False,
                            narrow_search=False, canvas_search=False, dip_search=False)
    whole = reverse_trigger(den, settings, seed=5)
    eps = den.eps

    def small_device(x, t):  # pairs come in as 2 * rows: more than 4 rows at once does not fit
        if x.shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return eps(x, t)

    monkeypatch.setattr(den, "eps", small_device)
    split = reverse_trigger(den, settings, seed=5)
    assert split.memory == {"micro_batch": 4, "checkpointed_sampler": False, "halvings": 2}  # 16 -> 8 -> 4
    assert torch.allclose(whole.r, split.r, atol=1e-5, rtol=1e-4) and torch.allclose(whole.gamma, split.gamma, atol=1e-5)
    assert whole.trace["loss"] == pytest.approx(split.trace["loss"], rel=1e-5)

    monkeypatch.setattr(den, "eps", lambda x, t: (_ for _ in ()).throw(torch.OutOfMemoryError("no room at all")))
    with pytest.raises(torch.OutOfMemoryError):  # not even one pair fits: the error goes up (the CLI says so)
        reverse_trigger(den, settings, seed=5)


def test_forward_only_batches_of_large_inputs_are_split_as_the_plan_says():
    """The searches score up to 128 noises in one forward pass: above 3x32x32 that pass is split into
    chunks a gradient pass holds, with the same losses; small inputs stay one call."""
    from terd_scan.memory_plan import MemoryPlan
    from terd_scan.pair_loss import common_pairs, pair_losses

    den = DDPMDenoiser(AnalyticUNet(box_trigger(), corner_target()), SCHEDULE)
    x0, t, e = common_pairs(den, 20, 10, torch.Generator().manual_seed(0))
    r, ones = box_trigger(), torch.ones_like(box_trigger())
    with torch.no_grad():
        one_call = pair_losses(den, x0, r, ones, t, 1.0, e)
        calls, eps = [], den.eps
        den.eps = lambda x, tt: calls.append(x.shape[0]) or eps(x, tt)
        den.memory_plan = MemoryPlan(16, False)  # a small input: one call
        assert torch.equal(pair_losses(den, x0, r, ones, t, 1.0, e), one_call) and calls == [40]
        calls.clear()
        den.memory_plan = MemoryPlan(3, True)  # a large one: 6 noises per call
        split = pair_losses(den, x0, r, ones, t, 1.0, e)
    assert calls == [6] * 6 + [4] and torch.allclose(split, one_call, rtol=1e-5)
    # a GPU that runs out in a forward-only pass: the plan is halved (6 -> 2 noises per call) and the pass retried
    den.eps = lambda x, tt: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated")) if x.shape[0] > 2 else eps(x, tt)
    den.memory_plan = MemoryPlan(3, True)
    with torch.no_grad():
        retried = pair_losses(den, x0, r, ones, t, 1.0, e)
    assert den.memory_plan.micro_batch == 1 and den.memory_plan.halvings == 1 and torch.allclose(retried, one_call, rtol=1e-5)
