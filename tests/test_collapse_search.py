"""The sample-collapse search (terd_scan/collapse_search.py) and its place in the verdict (scan.judge_reversed)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from analytic_models import SCHEDULE, AnalyticUNet
from terd_scan import scan
from terd_scan.collapse_search import COLLAPSE_KEEP_RATIO, COLLAPSE_SEED_OFFSET, CollapseSearch, search_collapse
from terd_scan.denoisers import DDPMDenoiser, make_denoiser
from terd_scan.detection import kl_features
from terd_scan.presets import settings_for
from terd_scan.reference import shipped_reference
from terd_scan.reversion import ReversionResult

ZOO = Path(__file__).resolve().parent.parent / "examples" / "zoo"


def _search(den, seed=0, radii=(0.6, 0.9), iterations=3):
    return search_collapse(den, radii, iterations, noises=4, steps=5, seed=seed)


def test_benign_gaussian_model_never_collapses(one_thread):
    # Gaussian data: DDPM sampling is linear in x_T, so shifting every start by r moves the samples and keeps
    # their spread: the ratio is 1 wherever the descent goes.
    den = DDPMDenoiser(AnalyticUNet(), SCHEDULE)
    out = _search(den)
    assert out.ran and len(out.ratios) == 2
    assert all(v == pytest.approx(1.0, abs=1e-3) for v in out.ratios), out.ratios
    assert not out.kept
    # the end point lies on the sphere of the chosen radius, and the search is deterministic given its seed
    rms = out.radii[out.ratios.index(out.ratio)]
    assert float(out.r.norm()) == pytest.approx(rms * math.sqrt(out.r.numel()), rel=1e-4)
    assert torch.equal(out.r, _search(den).r) and not torch.equal(out.r, _search(den, seed=1).r)
    d = out.to_dict()
    assert d["kept"] is False and d["keep_below"] == COLLAPSE_KEEP_RATIO and d["network_evaluations"] > 0


def test_kinds_other_than_pixel_ddpm_are_not_searched(monkeypatch):
    class Latent(DDPMDenoiser):
        def __init__(self):
            pass

        def info(self):
            return type("I", (), {"kind": "latent-diffusion"})()

    out = search_collapse(Latent(), (0.6,), 3, 4, 5, 0)
    assert not out.ran and not out.kept and "latent-diffusion" in out.note
    assert out.to_dict() == {"ran": False, "note": out.note}


def _reversed(r, settings, basin=None):
    den = DDPMDenoiser(AnalyticUNet(), SCHEDULE)
    gamma = torch.ones_like(r)
    result = ReversionResult(r=r, gamma=gamma, runs=[{"start": "paper", **kl_features(r, gamma).to_dict(), "chosen": True}])
    return scan.Reversed(loaded=None, denoiser=den, settings={**settings.to_dict(), "seed": 0}, result=result,
                         features=kl_features(r, gamma), basin=basin)


def _canned(ratios, r):
    return lambda *a, **k: CollapseSearch(ran=True, radii=(0.6, 0.9), ratios=ratios, spread_at_zero=0.15, r=r)


def test_a_kept_collapse_flags_a_model_the_kl_route_finds_clean(monkeypatch):
    ref = shipped_reference("standard")
    found = torch.full((3, 16, 16), 0.6)
    monkeypatch.setattr(scan, "search_for", _canned((0.9, 0.2), found))
    rev = _reversed(torch.zeros(3, 16, 16), settings_for("standard"))
    verdict = scan.judge_reversed(rev, ref)
    assert verdict.backdoored and "collapse" in verdict.reasons[-1] and "0.2" in verdict.reasons[-1]
    assert torch.equal(rev.result.r, found) and torch.equal(rev.result.gamma, torch.ones_like(found))
    assert rev.features.mean_kl == pytest.approx(0.18, rel=1e-6)  # r^2 / 2 per dimension at gamma 1
    assert [run["chosen"] for run in rev.result.runs] == [False, True]
    assert "rms radius 0.9" in rev.result.start


def test_no_collapse_leaves_the_clean_verdict_and_the_trigger(monkeypatch):
    ref = shipped_reference("standard")
    monkeypatch.setattr(scan, "search_for", _canned((0.9, 0.7), torch.full((3, 16, 16), 0.6)))
    zero = torch.zeros(3, 16, 16)
    rev = _reversed(zero, settings_for("standard"))
    assert not scan.judge_reversed(rev, ref).backdoored
    assert torch.equal(rev.result.r, zero) and rev.collapse is not None and not rev.collapse.kept


def test_the_search_runs_only_when_the_kl_route_is_clean_and_the_preset_asks(monkeypatch):
    calls = []
    monkeypatch.setattr(scan, "search_for", lambda *a, **k: calls.append(a) or CollapseSearch(ran=False))
    flagged = _reversed(torch.full((3, 16, 16), -1.0), settings_for("standard"))
    assert scan.judge_reversed(flagged, shipped_reference("standard")).backdoored and flagged.collapse is None
    fast = _reversed(torch.zeros(3, 16, 16), settings_for("fast"))
    assert not scan.judge_reversed(fast, shipped_reference("fast")).backdoored and fast.collapse is None
    assert not calls
    assert settings_for("standard").collapse_search and not settings_for("paper").collapse_search


# The committed calibration-split BadDiffusion model that TERD's pair loss misses (the stop glyph on zero toward the
# corner, ASR 29/32) and a calibration benign model, on the standard preset's inner sphere (rms 0.6; the glyph's is
# 0.57) with its iterations: ratios 0.426 and 1.029, measured with `python benchmarks/collapse_calibration.py --model
# baddiffusion-stop-corner --model benign-a` (docs/QUALITY.md, "Sample-collapse search"). About 50 s each on one
# thread, so the benign one is in the slow set (the Gaussian model above covers a benign model in CI).
@pytest.mark.cost(55)
@pytest.mark.parametrize("name, kept", [("baddiffusion-stop-corner", True),
                                        pytest.param("benign-a", False, marks=pytest.mark.slow)])
def test_committed_zoo_models(name, kept, one_thread):
    from terd_scan.scan import ScanOptions, load_source

    s = settings_for("standard")
    den = make_denoiser(load_source(str(ZOO / name), ScanOptions(device="cpu")), "cpu")
    out = search_collapse(den, (0.6,), s.collapse_iterations, s.collapse_noises, s.collapse_steps,
                          0 + COLLAPSE_SEED_OFFSET)
    assert out.kept is kept, out.to_dict()


def test_large_inputs_are_checkpointed_with_fewer_noises(monkeypatch, one_thread):
    import terd_scan.collapse_search as cs

    den = DDPMDenoiser(AnalyticUNet(shape=(3, 64, 64)), SCHEDULE)
    seen = []
    real = cs.ddpm_samples
    monkeypatch.setattr(cs, "ddpm_samples", lambda d, x, steps, seed, checkpoint=False: seen.append(
        (x.shape[0], checkpoint)) or real(d, x, steps, seed, checkpoint))
    out = search_collapse(den, (0.6,), 2, noises=8, steps=3, seed=0)
    assert out.ran and out.ratios[0] == pytest.approx(1.0, abs=1e-3)
    # 3x64x64 is four times the values of a CPU chunk's 3x32x32 image batch of 16: 4 noises a step, recomputed
    assert (4, True) in seen and all(n in (4, 32) for n, _ in seen)


def test_a_gpu_out_of_memory_leaves_the_search_unrun(monkeypatch):
    den = DDPMDenoiser(AnalyticUNet(), SCHEDULE)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(den, "eps", oom)
    out = search_collapse(den, (0.6,), 2, noises=8, steps=3, seed=0)
    assert not out.ran and not out.kept and "out of GPU memory" in out.note
