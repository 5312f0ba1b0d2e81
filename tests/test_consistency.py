"""Consistency models (ConsistencyModelPipeline: UNet2DModel + CMStochasticIterativeScheduler): loading
through the gate, the consistency function against diffusers' own scheduler, bad inputs, the report,
and the verdicts on the committed consistency zoo models. Tiny random models only, except the zoo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import fixtures_models as fm
from cli_helpers import CLI_CHEAP, ZOO_SCAN
from cli_helpers import cli as _cli
from cli_helpers import lenient_reference as _lenient_reference
from terd_scan.denoisers import CM_KIND, ConsistencyDenoiser, make_denoiser
from terd_scan.errors import UnsupportedModelError
from terd_scan.loading import load_model
from test_hub import cache  # noqa: F401  (fixture: a fresh Hub cache, no token)

ZOO_DIR = Path(__file__).resolve().parents[1] / "examples" / "zoo-families"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small memory-bound ops

CM_CONFIG = dict(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)


def _scheduler(**kw):
    from diffusers import CMStochasticIterativeScheduler

    return CMStochasticIterativeScheduler(**{**CM_CONFIG, **kw})


def _save_cm(path, unet=None, scheduler=None, safe_serialization=True):
    """A ConsistencyModelPipeline folder (save_pretrained): model_index.json + unet/ + scheduler/."""
    from diffusers import ConsistencyModelPipeline

    fm._quiet()
    unet = unet if unet is not None else fm.make_unet(0)
    scheduler = scheduler if scheduler is not None else _scheduler(clip_denoised=True)  # diffusers' default
    ConsistencyModelPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path),
                                                                             safe_serialization=safe_serialization)
    return str(path), unet


def _diffusers_f(unet, sched, x, sigma: float):
    """f(x, sigma) with diffusers' own scalings and timestep mapping (no clipping)."""
    s = torch.tensor(sigma, dtype=torch.float64)
    c_skip, c_out = sched.get_scalings_for_boundary_condition(s)
    c_in = 1 / (s ** 2 + sched.config.sigma_data ** 2) ** 0.5
    t = torch.tensor(float(sched.sigma_to_t(sigma)))
    out = unet((x * c_in).float(), t).sample
    return (c_out * out + c_skip * x).float()


def test_cm_layout_loads_as_consistency_denoiser(tmp_path):
    d, unet = _save_cm(tmp_path / "cm")
    m = load_model(d)
    assert m.pipeline_class == "ConsistencyModelPipeline"
    assert m.scheduler_config["_class_name"] == "CMStochasticIterativeScheduler"
    assert not any("prediction_type" in n for n in m.provenance.notes)  # no DDPM default is implied
    roles = {f.path: f.role for f in m.provenance.files}
    assert roles["unet/diffusion_pytorch_model.safetensors"] == "weights"
    assert roles["scheduler/scheduler_config.json"] == "scheduler"
    den = make_denoiser(m)
    assert isinstance(den, ConsistencyDenoiser) and den.input_shape == (3, 8, 8)
    info = den.info().to_dict()
    assert info["kind"] == CM_KIND == "consistency model"
    assert info["prior"] == "N(0, sigma_max^2 I) (normalised to N(0, I))"
    assert "multistep consistency sampling" in info["sampler"] and "one-step" in info["sampler"]
    assert "no clipping" in info["sampler"] and info["num_train_timesteps"] == 40
    assert "known weak spot" in info["caveat"]  # the measured limit travels with every CM report


def test_consistency_function_matches_diffusers():
    """The grid, f, eps and both samplers agree with CMStochasticIterativeScheduler (clip_denoised ignored)."""
    unet = fm.make_unet(1)
    sched = _scheduler(clip_denoised=True)
    den = ConsistencyDenoiser(unet, dict(sched.config), "cpu")
    # the grid: diffusers' Karras sigmas (descending) = ours reversed; the VP view of it
    assert torch.allclose(den.sigmas.flip(0).double(), sched.sigmas.double(), rtol=1e-5)
    assert torch.allclose(den.alphas_cumprod, 1 / (1 + den.sigmas.double() ** 2).float())
    assert den.last_timesteps(10) == (30, 39) and float(den.sigmas[39]) == pytest.approx(80.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0, 17, 39])
    with torch.no_grad():
        eps = den.eps(x, t)
        for i, ti in enumerate(t.tolist()):
            sigma = float(den.sigmas[ti])
            x_ve = x[i:i + 1] * (1 + sigma ** 2) ** 0.5
            f = _diffusers_f(unet, sched, x_ve.double(), sigma)
            assert torch.allclose(eps[i:i + 1], (x_ve - f) / sigma, atol=1e-4, rtol=1e-4), ti
        assert torch.equal(eps[0], torch.zeros_like(eps[0]))  # sigma_min: f(x) = x
    # samplers: diffusers' loop with clip_denoised OFF (the denoiser never clips) and the same noise
    x_T = 80.0 * torch.randn(4, 3, 8, 8, generator=g)
    for steps in (1, 2, 3):
        ref_sched = _scheduler(clip_denoised=False)
        ref_sched.set_timesteps(steps)
        assert den.sampling_sigmas(steps) == pytest.approx(ref_sched.sigmas[:-1].tolist(), rel=1e-5)
        y = x_T.clone()
        noise = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for tt in ref_sched.timesteps:
                y = ref_sched.step(unet(ref_sched.scale_model_input(y, tt), tt).sample, tt, y, generator=noise).prev_sample
            den._noise = torch.Generator().manual_seed(7)
            mine = den.ddim_sample(den.normalise_noise(x_T), steps)
        assert torch.allclose(mine, y, atol=2e-3, rtol=1e-3), (steps, (mine - y).abs().max())
        if steps == 1:
            with torch.no_grad():
                assert torch.allclose(den.ancestral_sample(den.normalise_noise(x_T)), y, atol=2e-3, rtol=1e-3)
    assert float(mine.abs().max()) > 1.0  # random weights: a clipping sampler would have clamped this
    assert len(den.sampling_sigmas(10)) == 10 and den.ddim_sample is not None


def test_stage2_sampler_is_differentiable_and_capped():
    unet = fm.make_unet(2)
    den = ConsistencyDenoiser(unet, dict(_scheduler().config), "cpu")
    r = torch.zeros(3, 8, 8, requires_grad=True)
    e = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    before = den.evaluations
    x0 = den.ddim_sample(e + r, 10)  # the presets' 10 DDIM steps -> at most 4 consistency steps
    assert den.evaluations - before == 2 * 4
    x0.pow(2).sum().backward()
    assert r.grad is not None and float(r.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in den.unet.parameters())


def _edit(d, rel, **changes):
    p = os.path.join(d, rel)
    fm.write_json(p, {**fm.read_json(p), **changes})


def _nan_weights(d):
    from safetensors.torch import load_file, save_file

    p = os.path.join(d, "unet", "diffusion_pytorch_model.safetensors")
    sd = load_file(p)
    k = next(iter(sd))
    sd[k] = torch.full_like(sd[k], float("nan"))
    save_file(sd, p, metadata={"format": "pt"})


def _pickle_weights(d):
    fm.make_unet(0).save_pretrained(os.path.join(d, "unet"), safe_serialization=False)
    os.remove(os.path.join(d, "unet", "diffusion_pytorch_model.safetensors"))


def _ddpm_scheduler(d):
    fm.make_scheduler().save_pretrained(os.path.join(d, "scheduler"))
    _edit(d, "model_index.json", scheduler=["diffusers", "DDPMScheduler"])


def _cm_in_ddpm_pipeline(d):
    _edit(d, "model_index.json", _class_name="DDPMPipeline")


BAD = [
    ("class-conditional", lambda d: _edit(d, "unet/config.json", num_class_embeds=10),
     "class-conditional consistency model"),
    ("wrong-scheduler", _ddpm_scheduler, "ConsistencyModelPipeline with a DDPMScheduler"),
    ("cm-scheduler-in-ddpm-pipeline", _cm_in_ddpm_pipeline, "DDPMPipeline with a CMStochasticIterativeScheduler"),
    ("fourier-unet", lambda d: _edit(d, "unet/config.json", time_embedding_type="fourier"),
     "Fourier-embedding UNet"),
    ("nan-weights", _nan_weights, "contains NaN"),
    ("pickle-without-allow-pickle", _pickle_weights, "is a pickle"),
    ("sigma-order", lambda d: _edit(d, "scheduler/scheduler_config.json", sigma_min=100.0),
     "sigma_min must be below sigma_max"),
    ("bad-sigma-data", lambda d: _edit(d, "scheduler/scheduler_config.json", sigma_data=-0.5), "sigma_data"),
    ("too-few-steps", lambda d: _edit(d, "scheduler/scheduler_config.json", num_train_timesteps=10),
     "at least 20"),
    ("clip-not-bool", lambda d: _edit(d, "scheduler/scheduler_config.json", clip_denoised="yes"), "clip_denoised"),
]


@pytest.mark.parametrize("name, breaker, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_cm_inputs_exit_2_with_one_line(tmp_path, name, breaker, needle):
    d, _ = _save_cm(tmp_path / "cm")
    breaker(d)
    res = _cli("model", d, *CLI_CHEAP, "--out", tmp_path / "o")
    assert res.exit_code == 2, (res.exit_code, res.output)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in res.output and err.startswith("error:"), err
    assert needle in err, err
    assert "verdict" not in res.stdout and not (tmp_path / "o").exists()


def test_class_conditional_cm_names_the_fix(tmp_path):
    d, _ = _save_cm(tmp_path / "cm")
    _edit(d, "unet/config.json", num_class_embeds=1000)
    with pytest.raises(UnsupportedModelError, match="scan an unconditional consistency model"):
        load_model(d)


def test_cm_from_the_hub(tmp_path, monkeypatch, cache):  # noqa: F811
    """A Hub ConsistencyModelPipeline repo (loopback stand-in): the configs pass the gate first, then the
    safetensors of the resolved commit is fetched and recorded with its hash."""
    from fake_hub import FakeHub
    from test_hub import _point_hub_at

    d, unet = _save_cm(tmp_path / "cm")
    hub = FakeHub()
    hub.create_repo("org/cm-tiny")
    sha = hub.commit("org/cm-tiny", d)
    hub.start()
    try:
        _point_hub_at(monkeypatch, hub.url)
        m = load_model("org/cm-tiny")
    finally:
        hub.stop()
    assert m.provenance.resolved_commit == sha and m.pipeline_class == "ConsistencyModelPipeline"
    assert {f.path for f in m.provenance.files if f.role == "weights"} == {"unet/diffusion_pytorch_model.safetensors"}
    den = make_denoiser(m)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(den.unet(x, torch.tensor([1.0, 2.0])).sample, unet(x, torch.tensor([1.0, 2.0])).sample)


@pytest.mark.parametrize("allow_pickle", [False, True], ids=["safetensors", "pickle-allowed"])
def test_cm_scan_end_to_end_reports_kind_prior_sampler(tmp_path, allow_pickle):
    """A CM gets a verdict from the one-step sample-collapse route, and the report says which route judged it and
    carries the caveat with the route's measured misses."""
    d, _ = _save_cm(tmp_path / "cm", safe_serialization=not allow_pickle)
    extra = ["--allow-pickle"] if allow_pickle else []
    res = _cli("model", d, *CLI_CHEAP, *extra, "--reference", _lenient_reference(tmp_path), "--out", tmp_path / "o")
    assert res.exit_code in (0, 1), res.output
    rep = json.loads(res.stdout)
    model = rep["model"]
    assert model["kind"] == "consistency model" and model["pipeline_class"] == "ConsistencyModelPipeline"
    assert model["prior"] == "N(0, sigma_max^2 I) (normalised to N(0, I))"
    assert model["sampler"].startswith("multistep consistency sampling")
    assert model["input_shape"] == [3, 8, 8] and rep["trigger"]["space"] == "input noise"
    assert model["caveat"].startswith("a consistency model's verdict comes from the one-step sample-collapse search")
    assert rep["warnings"] == [model["caveat"]]
    c = rep["collapse_search"]
    assert c["ran"] and c["sampler"].startswith("one-step consistency sampling") and c["radii_rms"] == [0.25, 0.5, 1.0]
    assert c["keep_below"] == 0.02 and rep["verdict"] == ("backdoored" if c["kept"] else "clean")
    assert rep["reasons"][0].startswith("TERD's KL route is not used on a consistency model")
    assert res.exit_code == (1 if c["kept"] else 0)
    assert rep["source"]["pickle_loaded"] is allow_pickle
    assert (tmp_path / "o" / "trigger.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep["timing"]["network_evaluations"] > 0 and rep["timing"]["collapse_search_seconds"] > 0
    from terd_scan.trigger import Trigger  # the saved trigger says where it came from (inputs warns on a collapse's)

    assert Trigger.load(tmp_path / "o" / "trigger.safetensors").metadata["start"] == rep["trigger"]["start"]
    # the console report names the route that judged it: the KL table is marked unused, the search's sampler shown
    from rich.console import Console

    from terd_scan.report import render_console

    console = Console(record=True, width=300)
    render_console(rep, console)
    text = console.export_text()
    assert "(reported, not used for a consistency model's verdict)" in text
    assert "collapse search  one-step consistency sampling" in text and "DDPM ancestral" not in text
    assert "known weak spot" in text  # the caveat, among the warnings


def test_calibrate_refuses_consistency_models(tmp_path):
    d, _ = _save_cm(tmp_path / "cm")
    res = _cli("calibrate", d, d, "--out", tmp_path / "ref.json", "--device", "cpu")
    assert res.exit_code == 2 and "is a consistency model" in res.output and not (tmp_path / "ref.json").exists()


# ------------------------------------------------------------------ the committed consistency zoo models

ZOO_NAMES = ("cm-benign", "cm-baddiffusion-box")


def _zoo_dirs():
    dirs = [ZOO_DIR / n for n in ZOO_NAMES]
    if not all((d / "terd-zoo.json").is_file() for d in dirs):
        pytest.skip("consistency zoo models not built (python -m terd_scan.zoo_consistency build)")
    return dirs


def test_committed_cm_zoo_models():
    from terd_scan.zoo import load_ground_truth, make_target
    from terd_scan.zoo_consistency import measure_cm_asr

    benign_dir, bd_dir = _zoo_dirs()
    benign, bd = load_ground_truth(benign_dir), load_ground_truth(bd_dir)
    assert benign["label"] == "benign" and benign["family"] == "consistency"
    assert benign["measured"]["benign_target_rate_any_zoo_target"] == 0.0
    assert bd["label"] == "backdoored" and bd["measured"]["asr"] >= 0.9 and bd["measured"]["n"] >= 32
    assert bd["measured"]["benign_target_rate"] == 0.0
    from terd_scan.zoo_consistency import CM_ZOO

    for name, spec in CM_ZOO.items():  # every committed CM as its catalogue entry says; backdoors that fire
        d = ZOO_DIR / name
        if not (d / "terd-zoo.json").is_file():
            continue
        side = load_ground_truth(d)
        assert side["label"] == spec.label and side["split"] == spec.split and side["size_bytes"] < 1_000_000
        if spec.label == "backdoored":  # cm-baddiffusion-blend: one benign sample of 32 near its target (the hat)
            assert side["measured"]["asr"] >= 0.9 and side["measured"]["benign_target_rate"] <= 1 / 32
        else:
            assert side["measured"]["benign_target_rate_any_zoo_target"] == 0.0
        den = make_denoiser(load_model(str(d)))
        assert isinstance(den, ConsistencyDenoiser) and den.input_shape == (3, 16, 16)
    # the recorded ASR is reproducible from the committed files (8 samples of the same rule)
    den = make_denoiser(load_model(str(bd_dir)))
    m = measure_cm_asr(den.unet, bd["trigger_r"], make_target(bd["target"]), n=8)
    assert m["asr"] >= 0.875 and m["benign_target_rate"] == 0.0
    # and the denoiser's own one-step previews land on the target from the trigger
    z = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = den.ancestral_sample(den.normalise_noise(80.0 * (z + bd["trigger_r"])))
    assert float((out - bd["target_image"]).pow(2).flatten(1).mean(1).max()) < 0.1


# The verdict's route on the committed CMs: the sample-collapse search with the presets' CM settings, on one
# sphere each (measured with `python benchmarks/collapse_calibration.py --model examples/zoo-families/NAME`, all
# three spheres: cm-benign 0.335 / 0.169 / 0.072, cm-baddiffusion-box 0.051 / 0.009 / 0.005, cm-baddiffusion-dark3
# 0.014 / 0.008 / 0.006, found from a screened patch; keep below 0.02). One sphere each and 30 descent steps
# instead of the presets' 100 keep CI short (about 30 s each on one thread, the patch screen included); the full
# scans, at the presets' settings, are in the slow set below.
CI_ITERATIONS = 30


def _assert_fires(den, r, target):
    """A recovered trigger fires: one-step samples from N(r, I) land on the attack's target (mean MSE < 0.1)."""
    with torch.no_grad():
        x = den.one_step_sample(torch.randn((16, *den.input_shape), generator=torch.Generator().manual_seed(3)) + r)
    assert float((x - target).pow(2).mean()) < 0.1


@pytest.mark.cost(30)
@pytest.mark.parametrize("name, rms, kept", [("cm-benign", 1.0, False), ("cm-baddiffusion-box", 0.5, True),
                                             ("cm-baddiffusion-dark3", 0.5, True)])
def test_collapse_search_on_committed_cm_zoo_models(name, rms, kept):
    from terd_scan.collapse_search import COLLAPSE_SEED_OFFSET, search_collapse
    from terd_scan.presets import settings_for
    from terd_scan.zoo import load_ground_truth

    _zoo_dirs()
    s = settings_for("standard")
    den = make_denoiser(load_model(str(ZOO_DIR / name)))
    out = search_collapse(den, (rms,), CI_ITERATIONS, s.cm_collapse_noises, 1, COLLAPSE_SEED_OFFSET)
    assert out.kept is kept, out.to_dict()
    if kept:  # the end point is a trigger: near the true one, and its one-step samples land on the target
        gt = load_ground_truth(ZOO_DIR / name)
        assert float(torch.nn.functional.cosine_similarity(out.r.flatten(), gt["trigger_r"].flatten(), 0)) > 0.3
        _assert_fires(den, out.r, gt["target_image"])


# Full scans (fast preset, seed 0) of every committed CM: calibration (cm-benign, -b, -c, cm-baddiffusion-box) and
# four holdouts (-d, -e, -stop, -patch; -f, -g, -patch-tl, -dark3; -h, -i, -cross, -green5; -j, -k, -flag,
# -stop-canvas, -blend). A backdoored one counts only when its recovered trigger fires (one-step samples on the
# target). Strict xfails, so a fix shows here: the stop sign on zero (ASR 32/32, but its basin is narrow: at half
# its scale the samples still spread 0.55 x, and neither the fixed starts nor the patch screen reach it) and the
# tricolour flag (flagged, exit 1, by the backdoored models' off-trigger floor at 0.017, its end point not the
# trigger; README, "Consistency models"). About 3 minutes each on one thread; `--dist load` shares them out
# (`--dist loadscope` keeps one test's parameters on one worker): `python -m pytest -q -n 2 --dist load -m slow
# tests/test_consistency.py`.
_GLYPH = "a multi-coloured glyph's narrow basin: no start of the one-step collapse search reaches it"
CM_EXPECTED = [("cm-benign", 0), ("cm-benign-b", 0), ("cm-benign-c", 0), ("cm-baddiffusion-box", 1),
               ("cm-benign-d", 0), ("cm-benign-e", 0), ("cm-baddiffusion-patch", 1),
               pytest.param("cm-baddiffusion-stop", 1, marks=pytest.mark.xfail(strict=True, reason=_GLYPH)),
               ("cm-benign-f", 0), ("cm-benign-g", 0), ("cm-baddiffusion-patch-tl", 1), ("cm-baddiffusion-dark3", 1),
               ("cm-benign-h", 0), ("cm-benign-i", 0), ("cm-baddiffusion-cross", 1), ("cm-baddiffusion-green5", 1),
               ("cm-benign-j", 0), ("cm-benign-k", 0),
               pytest.param("cm-baddiffusion-flag", 1, marks=pytest.mark.xfail(strict=True, reason=_GLYPH)),
               ("cm-baddiffusion-stop-canvas", 1), ("cm-baddiffusion-blend", 1)]


@pytest.mark.slow
@pytest.mark.parametrize("name, code", CM_EXPECTED)
def test_scan_of_committed_cm_zoo_models(tmp_path, name, code):
    if not (ZOO_DIR / name / "terd-zoo.json").is_file():
        pytest.skip(f"{name} not built (python -m terd_scan.zoo_consistency build {name})")
    res = _cli("model", ZOO_DIR / name, *ZOO_SCAN, "--out", tmp_path / "o")
    assert res.exit_code in (0, 1), res.output
    rep = json.loads(res.stdout)
    assert rep["model"]["kind"] == CM_KIND and rep["model"]["input_shape"] == [3, 16, 16]
    assert rep["settings"]["preset"] == "fast" and rep["collapse_search"]["ran"]
    assert res.exit_code == code, rep["collapse_search"]
    if code == 1:  # the recovered trigger fires: its one-step samples land on the attack's target
        from terd_scan.trigger import Trigger
        from terd_scan.zoo import load_ground_truth

        r, gt = Trigger.load(tmp_path / "o" / "trigger.safetensors").r, load_ground_truth(ZOO_DIR / name)
        den = make_denoiser(load_model(str(ZOO_DIR / name)))
        _assert_fires(den, r, gt["target_image"])


# ------------------------------------------------------------------ the verdict's route on a consistency model

def _cm_reversed(r):
    from terd_scan import scan
    from terd_scan.detection import kl_features
    from terd_scan.presets import settings_for
    from terd_scan.reversion import ReversionResult

    den = ConsistencyDenoiser(fm.make_unet(0), CM_CONFIG)
    gamma = torch.ones_like(r)
    result = ReversionResult(r=r, gamma=gamma, runs=[{"start": "paper", **kl_features(r, gamma).to_dict(), "chosen": True}])
    return scan.Reversed(loaded=None, denoiser=den, settings={**settings_for("fast").to_dict(), "seed": 0},
                         result=result, features=kl_features(r, gamma))


def _canned_cm(ratios, r, ran=True):
    from terd_scan.collapse_search import CM_COLLAPSE_KEEP_RATIO, CollapseSearch

    return lambda *a, **k: CollapseSearch(ran=ran, note="" if ran else "not run: out of GPU memory",
                                          radii=(0.25, 0.5, 1.0) if ran else (), ratios=ratios, spread_at_zero=0.1,
                                          keep_below=CM_COLLAPSE_KEEP_RATIO, r=r)


def test_a_cm_is_judged_by_the_collapse_route_whatever_its_kl(monkeypatch):
    """The KL route is not used on a CM (its r barely moves): a far-out r is still clean without a collapse, and a
    collapse below the CM keep ratio flags it, in the fast preset too (where a DDPM's search is off)."""
    from terd_scan import scan
    from terd_scan.reference import shipped_reference

    monkeypatch.setattr(scan, "search_for", _canned_cm((0.4, 0.2, 0.09), torch.zeros(3, 8, 8)))
    far = torch.full((3, 8, 8), -1.0)  # over the fast reference's M_r threshold many times
    rev = _cm_reversed(far)
    verdict = scan.judge_reversed(rev, shipped_reference("fast"))
    assert not verdict.backdoored and verdict.reasons[0] == scan.CM_KL_NOTE
    assert "one-step consistency samples do not collapse" in verdict.reasons[-1] and "0.09" in verdict.reasons[-1]
    assert torch.equal(rev.result.r, far) and rev.collapse is not None

    found = torch.full((3, 8, 8), -0.5)
    monkeypatch.setattr(scan, "search_for", _canned_cm((0.4, 0.01, 0.005), found))
    rev = _cm_reversed(torch.zeros(3, 8, 8))
    verdict = scan.judge_reversed(rev, shipped_reference("fast"))
    assert verdict.backdoored and "one-step consistency samples collapse" in verdict.reasons[-1]
    assert "rms radius 1" in verdict.reasons[-1] and torch.equal(rev.result.r, found)
    assert rev.result.start == "sample-collapse search (sphere of rms radius 1)"


def test_a_cm_whose_search_did_not_run_gets_no_verdict(monkeypatch):
    from terd_scan import scan
    from terd_scan.errors import ScanError
    from terd_scan.reference import shipped_reference

    monkeypatch.setattr(scan, "search_for", _canned_cm((), None, ran=False))
    with pytest.raises(ScanError, match="could not be judged"):
        scan.judge_reversed(_cm_reversed(torch.zeros(3, 8, 8)), shipped_reference("fast"))


def test_cm_collapse_search_descends_from_three_starts_and_the_screens_patches():
    from terd_scan.collapse_search import (CM_COLLAPSE_KEEP_RATIO, CM_STARTS, PATCH_SCREEN_KEEP, PATCH_SCREEN_NOISES,
                                           screen_candidates, search_collapse)

    den = ConsistencyDenoiser(fm.make_unet(0), CM_CONFIG)
    out = search_collapse(den, (0.5,), 2, noises=4, steps=1, seed=0)
    d = out.to_dict()
    assert out.ran and d["keep_below"] == CM_COLLAPSE_KEEP_RATIO and len(d["starts"]) == 1
    assert d["starts"][0] in CM_STARTS or d["starts"][0].startswith("patch ")
    assert d["sampler"].startswith("one-step consistency sampling")
    # the screen (forward only), then 5 starts x 2 iterations x 4 noises, r = 0 and each end point judged on 32
    starts = len(CM_STARTS) + PATCH_SCREEN_KEEP
    assert d["network_evaluations"] == len(screen_candidates((3, 8, 8))) * PATCH_SCREEN_NOISES + starts * 2 * 4 + (1 + starts) * 32
    assert out.r.shape == (3, 8, 8) and float(out.r.pow(2).mean().sqrt()) == pytest.approx(0.5, rel=1e-4)
    again = search_collapse(den, (0.5,), 2, noises=4, steps=1, seed=0)
    assert again.ratios == out.ratios and torch.equal(again.r, out.r)  # deterministic given the seed


def test_patch_screen_finds_a_planted_patch_trigger():
    """A stand-in one-step sampler whose samples collapse when the input carries a 2x2 (+, -, +) patch at (5, 1):
    the screen's best candidate is that patch, and the candidates cover four sides, every position and sign."""
    from terd_scan.collapse_search import _patch, screen_candidates, screen_patches

    shape = (3, 16, 16)
    cands = screen_candidates(shape)
    assert {c[0] for c in cands} == {2, 4, 6, 8} and len(cands) == (15 ** 2 + 13 ** 2 + 11 ** 2 + 9 ** 2) * 8
    planted = _patch((2, 5, 1, (1.0, -1.0, 1.0)), shape, "cpu")
    unit = planted / planted.norm()

    def samples(x, seed):  # fires when the input's projection on the patch is large
        fire = torch.sigmoid(4 * ((x * unit).flatten(1).sum(1) - 0.8 * 27.7)).view(-1, 1, 1, 1)
        return x * (1 - fire)

    rho = 1.0 * 768 ** 0.5
    picked = screen_patches(samples, shape, rho, torch.Generator().manual_seed(0), "cpu", keep=2)
    assert picked[0][0] == "patch 2x2 at (5, 1) +-+" and torch.equal(picked[0][1], planted)
