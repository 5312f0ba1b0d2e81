"""Latent diffusion (LDMPipeline): loading through the gate (VQModel and AutoencoderKL), bad inputs, the
report and the trigger image, input detection on latents, and the committed latent zoo models.
Tiny random models only (built here in well under a second); no training."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import fixtures_models as fm
from cli_helpers import CLI_CHEAP, ZOO_SCAN
from cli_helpers import cli as _cli
from cli_helpers import lenient_reference as _lenient_reference
from terd_scan.denoisers import LATENT_KIND, LatentDenoiser, make_denoiser
from terd_scan.errors import UnsupportedModelError
from terd_scan.loading import load_model
from test_hub import cache  # noqa: F401  (fixture: a fresh Hub cache, no token)

ZOO_DIR = Path(__file__).resolve().parents[1] / "examples" / "zoo-families"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small memory-bound ops

AE_COMMON = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                 up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                 layers_per_block=1, norm_num_groups=4, sample_size=16)
LATENT_CH = {"VQModel": 3, "AutoencoderKL": 4}
KL_SCALING = 0.5


def _autoencoder(cls: str, seed: int = 0):
    import diffusers

    fm._quiet()
    torch.manual_seed(seed)
    if cls == "VQModel":  # CompVis/ldm-celebahq-256: a VQModel with 3 latent channels
        return diffusers.VQModel(**AE_COMMON, latent_channels=3, num_vq_embeddings=16).eval()
    return diffusers.AutoencoderKL(**AE_COMMON, latent_channels=4, scaling_factor=KL_SCALING).eval()


def _save_ldm(path, cls: str = "VQModel", key: str = "vqvae"):
    """An LDMPipeline folder (LDMPipeline.save_pretrained), the autoencoder under `key`; returns (dir, ae, unet)."""
    from diffusers import DDIMScheduler, LDMPipeline

    ae = _autoencoder(cls)
    c = LATENT_CH[cls]
    unet = fm.make_unet(1, in_channels=c, out_channels=c)  # 8 x 8 latents
    LDMPipeline(vqvae=ae, unet=unet, scheduler=DDIMScheduler(beta_schedule="linear")).save_pretrained(str(path))
    if key != "vqvae":
        os.rename(os.path.join(path, "vqvae"), os.path.join(path, key))
        idx = fm.read_json(os.path.join(path, "model_index.json"))
        idx[key] = idx.pop("vqvae")
        fm.write_json(os.path.join(path, "model_index.json"), idx)
    return str(path), ae, unet


@pytest.mark.parametrize("cls, key", [("VQModel", "vqvae"), ("AutoencoderKL", "vqvae"), ("AutoencoderKL", "vae")])
def test_ldm_layout_loads_and_decodes(tmp_path, cls, key):
    d, ae, unet = _save_ldm(tmp_path / "ldm", cls, key)
    m = load_model(d)
    assert m.pipeline_class == "LDMPipeline" and m.autoencoder is not None
    assert m.autoencoder.class_name == cls and m.autoencoder.component == key and m.autoencoder.downsample == 2
    roles = {f.path: f.role for f in m.provenance.files}
    assert roles[f"{key}/diffusion_pytorch_model.safetensors"] == "weights" and roles[f"{key}/config.json"] == "config"
    den = make_denoiser(m)
    assert isinstance(den, LatentDenoiser) and den.input_shape == (LATENT_CH[cls], 8, 8)
    info = den.info().to_dict()
    assert info["kind"] == LATENT_KIND == "latent diffusion (LDM)" and info["prior"] == "N(0, I) in latent space"
    assert info["latent"]["latent_shape"] == [LATENT_CH[cls], 8, 8] and info["latent"]["decoded_shape"] == [3, 16, 16]
    assert "DDIM" in info["sampler"] and "latents" in info["sampler"]
    # the UNet is the DDPM denoiser on latents; decoding applies the scaling rule of the autoencoder class
    z = torch.randn(2, LATENT_CH[cls], 8, 8)
    t = torch.tensor([3, 990])
    with torch.no_grad():
        assert torch.equal(den.eps(z, t), unet(z, t).sample)
        scale = 1.0 if cls == "VQModel" else KL_SCALING  # VQModel: unscaled, whatever its config says
        want = ae.decode(z / scale).sample
    assert m.autoencoder.scaling_factor == scale
    assert torch.allclose(den.decode(z), want, atol=1e-5)
    if cls == "VQModel":
        assert any("scaling_factor 0.18215 ignored" in n for n in m.provenance.notes)


def _remove_weights(d):
    os.remove(os.path.join(d, "vqvae", "diffusion_pytorch_model.safetensors"))


def _edit(d, rel, **changes):
    p = os.path.join(d, rel)
    fm.write_json(p, {**fm.read_json(p), **changes})


BAD = [
    ("missing-vqvae-weights", _remove_weights, "no weights in vqvae"),
    ("missing-vqvae-folder", lambda d: shutil.rmtree(os.path.join(d, "vqvae")), "vqvae/config.json is missing"),
    ("latent-channel-mismatch", lambda d: _edit(d, "vqvae/config.json", latent_channels=4),
     "latent channels do not match"),
    ("unknown-autoencoder-class", lambda d: _edit(d, "model_index.json", vqvae=["diffusers", "AutoencoderTiny"]),
     "not supported: autoencoder class 'AutoencoderTiny'"),
    ("no-autoencoder", lambda d: fm.write_json(os.path.join(d, "model_index.json"), {
        k: v for k, v in fm.read_json(os.path.join(d, "model_index.json")).items() if k != "vqvae"}),
     "LDMPipeline with no autoencoder"),
    ("class-mismatch", lambda d: _edit(d, "vqvae/config.json", _class_name="AutoencoderKL"),
     "is a 'AutoencoderKL' config but model_index.json names a VQModel"),
    ("weights-of-another-autoencoder", lambda d: _autoencoder("VQModel", 1).__class__(
        **{**AE_COMMON, "block_out_channels": (8, 8), "latent_channels": 3, "num_vq_embeddings": 16}).save_pretrained(
        os.path.join(d, "vqvae_other")) or shutil.copy(
        os.path.join(d, "vqvae_other", "diffusion_pytorch_model.safetensors"), os.path.join(d, "vqvae")),
     "do not match the VQModel config"),
    ("nan-autoencoder-weights", lambda d: _nan_weights(d), "contains NaN"),
    ("bad-scaling-factor", lambda d: _edit(d, "vqvae/config.json", scaling_factor=-1.0), "scaling_factor"),
]


def _nan_weights(d):
    from safetensors.torch import load_file, save_file

    p = os.path.join(d, "vqvae", "diffusion_pytorch_model.safetensors")
    sd = load_file(p)
    k = next(iter(sd))
    sd[k] = torch.full_like(sd[k], float("nan"))
    save_file(sd, p, metadata={"format": "pt"})


@pytest.mark.parametrize("name, breaker, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_ldm_inputs_exit_2_with_one_line(tmp_path, name, breaker, needle):
    d, _, _ = _save_ldm(tmp_path / "ldm")
    breaker(d)
    res = _cli("model", d, *CLI_CHEAP, "--out", tmp_path / "o")
    assert res.exit_code == 2, (res.exit_code, res.output)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in res.output and err.startswith("error:"), err
    assert needle in err, err
    assert not (tmp_path / "o").exists()


def test_ldm_from_the_hub_fetches_the_autoencoder_weights(tmp_path, monkeypatch, cache):  # noqa: F811
    """A Hub LDMPipeline repo (loopback stand-in): configs first, then the unet and vqvae weights of the
    resolved commit; both weight files are recorded with their hashes."""
    from fake_hub import FakeHub
    from test_hub import _point_hub_at

    d, ae, _ = _save_ldm(tmp_path / "ldm", "AutoencoderKL")
    hub = FakeHub()
    hub.create_repo("org/ldm-tiny")
    sha = hub.commit("org/ldm-tiny", d)
    hub.start()
    try:
        _point_hub_at(monkeypatch, hub.url)
        m = load_model("org/ldm-tiny")
    finally:
        hub.stop()
    assert m.provenance.resolved_commit == sha and m.autoencoder.class_name == "AutoencoderKL"
    weights = {f.path for f in m.provenance.files if f.role == "weights"}
    assert weights == {"unet/diffusion_pytorch_model.safetensors", "vqvae/diffusion_pytorch_model.safetensors"}
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(make_denoiser(m).decode(z), ae.decode(z / KL_SCALING).sample, atol=1e-5)


def test_ldm_with_a_ve_schedule_is_refused(tmp_path):
    d, _, _ = _save_ldm(tmp_path / "ldm")
    fm.write_json(os.path.join(d, "scheduler", "scheduler_config.json"),
                  {"_class_name": "ScoreSdeVeScheduler", "sigma_min": 0.01, "sigma_max": 50.0})
    _edit(d, "model_index.json", scheduler=["diffusers", "ScoreSdeVeScheduler"])
    with pytest.raises(UnsupportedModelError, match="LDMPipeline with a score-SDE VE"):
        load_model(d)


# ------------------------------------------------------------------ end to end


@pytest.mark.parametrize("cls", ["VQModel", "AutoencoderKL"])
def test_ldm_scan_reports_latent_space_and_decodes_previews(tmp_path, cls):
    from terd_scan.scan import ScanOptions, scan_model

    d, _, _ = _save_ldm(tmp_path / "ldm", cls)
    c = LATENT_CH[cls]
    res = _cli("model", d, *CLI_CHEAP, "--reference", _lenient_reference(tmp_path), "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    model = rep["model"]
    assert model["kind"] == "latent diffusion (LDM)" and model["prior"] == "N(0, I) in latent space"
    assert model["input_shape"] == [c, 8, 8] and model["latent"]["latent_shape"] == [c, 8, 8]
    assert model["latent"]["autoencoder"] == cls and model["pipeline_class"] == "LDMPipeline"
    assert rep["trigger"]["space"] == "latent"
    from terd_scan.trigger import Trigger

    trig = Trigger.load(tmp_path / "o" / "trigger.safetensors")
    assert trig.shape == (c, 8, 8) and trig.metadata["space"] == "latent"
    png = tmp_path / "o" / "trigger.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the preview rows are decoded images, not latents
    opts = ScanOptions(overrides=dict(stage1_iterations=2, stage2_iterations=1, batch_size=2, sampler_steps=2,
                                      patch_search=False), device="cpu", reference=_lenient_reference(tmp_path),
                       preview_samples=2, preview_steps=3)
    result = scan_model(d, opts)
    benign, triggered = result.previews.benign, result.previews.trigger
    assert benign.shape == triggered.shape == (2, 3, 16, 16)
    # and the console report names the latent space
    from rich.console import Console

    from terd_scan.report import render_console, trigger_image

    console = Console(record=True, width=200)
    render_console(result.report, console)
    text = console.export_text()
    assert "latent shape" in text and "in latent space" in text
    from io import BytesIO

    from PIL import Image

    img = Image.open(BytesIO(trigger_image(result.trigger.r, result.trigger.gamma, benign, triggered, latent=True)))
    assert img.size[1] == 3 * (14 + 96 + 4) + 4  # 16 px decoded tiles drawn at 6x: 96 px rows


def test_input_detection_uses_the_latent_shape(tmp_path):
    from safetensors.torch import save_file

    from terd_scan.trigger import Trigger

    d, _, _ = _save_ldm(tmp_path / "ldm")
    res = _cli("model", d, *CLI_CHEAP, "--reference", _lenient_reference(tmp_path), "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    trig = Trigger.load(tmp_path / "o" / "trigger.safetensors")
    noise = tmp_path / "noise"
    noise.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"x": torch.cat([torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g) + 50 * trig.r])},
              str(noise / "latents.safetensors"))
    res = _cli("inputs", noise, "--trigger", tmp_path / "o", "-f", "json")
    assert res.exit_code == 1, res.output  # the latents built on the trigger are flagged
    doc = json.loads(res.stdout)
    assert doc["trigger"]["shape"] == [3, 8, 8]
    save_file({"x": torch.randn(2, 3, 16, 16)}, str(noise / "images.safetensors"))  # image-shaped: a mismatch
    res = _cli("inputs", noise / "images.safetensors", "--trigger", tmp_path / "o", "-f", "json")
    assert res.exit_code == 2 and "does not match the trigger" in res.output, res.output


def test_latent_models_are_judged_with_the_latent_reference(tmp_path):
    """Without --reference a latent model is judged against latent benign models (shipped:latent-<preset>);
    a preset with no latent reference is refused before the reversion, with how to make one."""
    d, _, _ = _save_ldm(tmp_path / "ldm", "AutoencoderKL")
    res = _cli("model", d, *CLI_CHEAP, "--preset", "fast", "--out", tmp_path / "o")
    assert res.exit_code in (0, 1), res.output
    rep = json.loads(res.stdout)
    assert rep["thresholds"]["origin"] == "shipped:latent-fast"
    assert rep["reference"]["name"].startswith("zoo-latent")
    res = _cli("model", d, *CLI_CHEAP, "--preset", "paper", "--out", tmp_path / "p")
    assert res.exit_code == 2 and "no benign reference is shipped for latent diffusion with preset 'paper'" in res.output
    assert "terd-scan calibrate" in res.output and not (tmp_path / "p").exists()


# ------------------------------------------------------------------ the committed latent zoo models

def _zoo_dirs():
    from terd_scan.zoo_latent import LATENT_ZOO

    dirs = [ZOO_DIR / n for n in LATENT_ZOO]
    if not all((d / "terd-zoo.json").is_file() for d in dirs):
        pytest.skip("latent zoo models not built (python -m terd_scan.zoo_latent build)")
    return dirs


def test_committed_latent_zoo_models():
    from terd_scan.reference import shipped_reference
    from terd_scan.zoo import load_ground_truth

    sides = {d.name: load_ground_truth(d) for d in _zoo_dirs()}
    for name, side in sides.items():
        assert side["family"] == "latent-diffusion" and side["split"] in ("calibration", "holdout"), name
        if side["label"] == "benign":
            assert side["measured"]["benign_target_rate_any_zoo_target"] == 0.0, name
        else:
            assert side["split"] == "holdout" and side["measured"]["asr"] >= 0.9 and side["measured"]["n"] >= 32
            assert side["measured"]["benign_target_rate"] == 0.0
            assert side["trigger_r"].shape == (4, 8, 8) and "latent" in side["trigger_units"]
    calibration = {n for n, s in sides.items() if s["split"] == "calibration"}
    assert len(calibration) >= 4 and all(sides[n]["label"] == "benign" for n in calibration)
    for preset in ("fast", "standard"):  # the shipped latent references hold exactly the calibration models
        ref = shipped_reference(preset, "latent")
        assert {m["name"] for m in ref.models} == calibration
    for d in _zoo_dirs():
        den = make_denoiser(load_model(str(d)))
        assert isinstance(den, LatentDenoiser) and den.input_shape == (4, 8, 8)


# The fast preset and the shipped latent reference (4 latent benign models x 2 seeds), on the held-out
# models: `python benchmarks/quality.py --preset fast --preset standard --zoo examples/zoo-families`
# measured scores (max feature / threshold) of 0.46 for ldm-benign-e and 168 for ldm-baddiffusion-box,
# seed 0. About 25 s per scan on one thread.
@pytest.mark.cost(60)
@pytest.mark.parametrize("name, code", [("ldm-benign-e", 0), ("ldm-baddiffusion-box", 1)])
def test_scan_of_committed_latent_zoo_models(tmp_path, name, code):
    _zoo_dirs()
    res = _cli("model", ZOO_DIR / name, *ZOO_SCAN, "--out", tmp_path / "o")
    assert res.exit_code == code, res.output
    rep = json.loads(res.stdout)
    assert rep["model"]["kind"] == LATENT_KIND and rep["model"]["input_shape"] == [4, 8, 8]
    assert rep["thresholds"]["origin"] == "shipped:latent-fast" and not rep["warnings"], rep["warnings"]
    f, th = rep["features"], rep["thresholds"]
    if code == 1:  # far over, not at the edge
        assert f["mean_kl"] > 5 * th["mean_kl"] and f["var_kl"] > 5 * th["var_kl"], f
    else:
        assert f["mean_kl"] < th["mean_kl"] and f["var_kl"] < th["var_kl"], (f, th)
