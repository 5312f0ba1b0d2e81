"""KL features, the benign-only decision rule, references and presets."""

import json
import math

import pytest
import torch

from terd_scan.detection import BACKDOORED, CLEAN, Features, judge, kl_features, kl_per_dimension
from terd_scan.errors import ScanError
from terd_scan.presets import PRESETS, settings_for
from terd_scan.reference import Reference, shipped_reference


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 4, 4, generator=g)
    gamma = torch.rand(3, 4, 4, generator=g) + 0.1
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(r.double(), gamma.double()),
                                                 torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(kl_per_dimension(r, gamma), expected)


def test_benign_prior_has_zero_features_and_features_are_size_free():
    assert kl_features(torch.zeros(3, 8, 8), torch.ones(3, 8, 8)) == Features(0.0, 0.0)
    small = kl_features(torch.full((3, 8, 8), -1.0), torch.ones(3, 8, 8))
    big = kl_features(torch.full((3, 64, 64), -1.0), torch.ones(3, 64, 64))
    assert small.mean_kl == pytest.approx(0.5) and big.mean_kl == pytest.approx(0.5)


def test_sparse_patch_raises_variance_more_than_mean():
    r = torch.zeros(3, 16, 16)
    r[:, :4, :4] = 2.0
    f = kl_features(r, torch.ones_like(r))
    assert f.mean_kl == pytest.approx(2.0 * 48 / 768)
    dense = kl_features(torch.full_like(r, math.sqrt(2 * f.mean_kl)), torch.ones_like(r))
    assert dense.mean_kl == pytest.approx(f.mean_kl)
    assert f.var_kl > 100 * max(dense.var_kl, 1e-9) and f.var_kl > f.mean_kl


def _reference(values, k=3.0, settings=None):
    models = [{"name": f"m{i}", "mean_kl": m, "var_kl": v} for i, (m, v) in enumerate(values)]
    return Reference(name="t", settings=settings or {}, models=models, k_sigma=k, origin="test")


def test_rule_is_mu_plus_three_sigma_on_either_feature():
    ref = _reference([(0.01, 0.001), (0.02, 0.002), (0.03, 0.003)])
    th = ref.thresholds()
    assert th["mean_kl"] == pytest.approx(0.02 + 3 * 0.01)
    assert th["var_kl"] == pytest.approx(0.002 + 3 * 0.001)
    assert judge(Features(0.049, 0.0049), ref).verdict == CLEAN
    v = judge(Features(0.051, 0.0), ref)
    assert v.verdict == BACKDOORED and "mean KL" in v.reasons[0]
    v = judge(Features(0.0, 0.0051), ref)
    assert v.verdict == BACKDOORED and "variance" in v.reasons[0]


def test_reference_roundtrip_and_mismatch(tmp_path):
    settings = settings_for("standard").to_dict()
    ref = _reference([(0.01, 0.001), (0.02, 0.002)], settings=settings)
    ref.save(tmp_path / "ref.json")
    back = Reference.load(tmp_path / "ref.json")
    assert back.thresholds() == pytest.approx(ref.thresholds())
    assert back.mismatches(settings) == []
    other = settings_for("standard", stage1_iterations=7).to_dict()
    assert any("stage1_iterations" in m for m in back.mismatches(other))


def test_reference_without_a_later_setting_counts_it_at_its_default():
    """A reference built before centred_start existed was built from the paper start: a scan from
    that start matches it, a centred one is reported."""
    settings = settings_for("standard").to_dict()
    old = _reference([(0.01, 0.001), (0.02, 0.002)], settings={k: v for k, v in settings.items() if k != "centred_start"})
    assert old.mismatches(settings) == []
    centred = settings_for("standard", centred_start=True).to_dict()
    assert old.mismatches(centred) == ["centred_start=True (reference: False)"]


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format": "something-else"}), "not a terd-scan reference"),
    (json.dumps({"format": "terd-scan-reference", "models": [{"mean_kl": 1, "var_kl": 1}]}), "at least 2"),
    (json.dumps({"format": "terd-scan-reference", "models": [{"mean_kl": 1, "var_kl": 1},
                                                           {"mean_kl": "x", "var_kl": 1}]}), "at least 2"),
    (json.dumps({"format": "terd-scan-reference", "k_sigma": -1,
                 "models": [{"mean_kl": 1, "var_kl": 1}, {"mean_kl": 2, "var_kl": 1}]}), "k_sigma"),
])
def test_bad_reference_files_are_one_line_errors(tmp_path, content, fragment):
    p = tmp_path / "ref.json"
    p.write_text(content)
    with pytest.raises(ScanError) as exc:
        Reference.load(p)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_missing_reference_file():
    with pytest.raises(ScanError, match="not found"):
        Reference.load("/nonexistent/ref.json")


def test_paper_preset_is_the_papers_hyperparameters():
    p = PRESETS["paper"]
    assert (p.stage1_iterations, p.stage2_iterations, p.batch_size, p.sampler_steps) == (3000, 1000, 16, 10)
    assert (p.lr, p.l1_weight, p.stage2_grad_clip, p.timestep_window) == (0.5, 5e-5, 0.01, 10)


def test_presets_get_cheaper():
    cost = {n: p.stage1_iterations * 2 + p.stage2_iterations * (p.sampler_steps + 4) for n, p in PRESETS.items()}
    assert cost["fast"] < cost["standard"] < cost["paper"]


@pytest.mark.parametrize("preset", ["standard", "fast"])
def test_default_presets_ship_a_reference_calibrated_with_their_settings(preset):
    ref = shipped_reference(preset)
    assert ref is not None, f"no shipped reference for {preset}"
    assert ref.settings.get("preset") == preset
    assert ref.mismatches(settings_for(preset).to_dict()) == []
    assert len(ref.models) >= 3 and all(math.isfinite(v) for v in ref.thresholds().values())
