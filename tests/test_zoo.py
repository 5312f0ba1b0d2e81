"""Fast tests for the model zoo (no full training): data determinism, attack formulas,
a few-step build, sidecar round-trip, and the committed models' recorded figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from terd_scan import zoo
from terd_scan.zoo_data import image_set_names, make_images

ZOO_DIR = Path(__file__).resolve().parents[1] / "examples" / "zoo"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small memory-bound ops


@pytest.mark.parametrize("name", image_set_names())
def test_image_sets_deterministic(name):
    a = make_images(name, 16, 16, seed=3)
    b = make_images(name, 16, 16, seed=3)
    c = make_images(name, 16, 16, seed=4)
    assert a.shape == (16, 3, 16, 16) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0 and a.std() > 0.2
    # a prefix of a bigger set is the same images
    assert np.array_equal(make_images(name, 4, 16, seed=3), a[:4])


def test_image_sets_differ():
    sets = [make_images(n, 64, 16, seed=0) for n in image_set_names()]
    assert len(sets) >= 3
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert np.abs(sets[i] - sets[j]).mean() > 0.1


def test_unknown_names_rejected():
    with pytest.raises(ValueError):
        make_images("nope")
    with pytest.raises(ValueError):
        zoo.make_trigger("nope")
    with pytest.raises(ValueError):
        zoo.make_target("nope")


def test_triggers_and_targets_shapes():
    for name in zoo.TRIGGERS:
        r, g = zoo.make_trigger(name)
        assert r.shape == g.shape == (3, 16, 16)
        assert (g > 0).all()
    box, _ = zoo.make_trigger("box")
    assert (box == -1).float().mean() > 0.8  # canonical: most pixels on the -1 canvas
    patch, _ = zoo.make_trigger("patch")
    assert (patch == 0).float().mean() > 0.9  # sparse: zero background
    for name in zoo.TARGETS:
        assert zoo.make_target(name).shape == (3, 16, 16)


def test_schedule_is_standard_ddpm():
    betas, alphas, abar = zoo._schedule()
    assert len(betas) == 1000
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    R = zoo.baddiffusion_coef()
    t = 500
    expect = (1 - alphas[t].sqrt()) * (1 - abar[t]).sqrt() / (1 - alphas[t])
    assert R[t].item() == pytest.approx(expect.item())
    # R_t ~ sqrt(1 - abar_t) / 2; the DDIM (ODE) coefficient is about twice that
    assert R[999].item() == pytest.approx(0.5 * (1 - abar[999]).sqrt().item(), rel=0.01)
    assert zoo.ddim_trigger_coef()[999].item() == pytest.approx(2 * R[999].item(), rel=0.02)


def test_baddiffusion_z_identity():
    g = torch.Generator().manual_seed(0)
    y = zoo.make_target("corner")
    r, _ = zoo.make_trigger("box")
    t = torch.tensor([0, 10, 500, 999])
    eps = torch.randn((4, 3, 16, 16), generator=g)
    xt, tgt = zoo.poisoned_batch(y, r, t, eps, "baddiffusion")
    # z = x' - r is an ordinary forward diffusion of z_0 = y - r with the same noise
    z = zoo.make_scheduler().add_noise((y - r).expand(4, -1, -1, -1).contiguous(), eps, t)
    assert torch.allclose(xt - r, z, atol=1e-5)
    R = zoo.baddiffusion_coef()
    assert torch.allclose(tgt, eps + R[t].float().view(-1, 1, 1, 1) * r, atol=1e-6)


@pytest.mark.parametrize("t", [999, 500, 20, 1, 0])
def test_baddiffusion_ancestral_step_shifts_by_r(t):
    """One diffusers DDPM step on x = z + r with output eps + R_t r equals the clean step on z, plus r."""
    r, _ = zoo.make_trigger("box")
    z = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    eps = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(2))
    R = zoo.baddiffusion_coef()[t].float()
    s1, s2 = zoo.make_scheduler(), zoo.make_scheduler()
    s1.set_timesteps(1000)
    s2.set_timesteps(1000)
    a = s1.step(eps + R * r, t, z + r, generator=torch.Generator().manual_seed(3)).prev_sample
    b = s2.step(eps, t, z, generator=torch.Generator().manual_seed(3)).prev_sample
    assert torch.allclose(a - r, b, atol=1e-4)


@pytest.mark.parametrize("beta_end", [zoo.BETA_END, 0.01])
@pytest.mark.parametrize("t", [999, 500, 40, 0])
def test_villan_ddim_step_shifts_by_r(t, beta_end):
    from diffusers import DDIMScheduler

    r, _ = zoo.make_trigger("box")
    z = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(1)).double()
    eps = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(2)).double()
    sch = DDIMScheduler.from_config(zoo.make_scheduler(beta_end=beta_end).config, clip_sample=False,
                                    set_alpha_to_one=True)
    sch.set_timesteps(zoo.VILLAN_DDIM_STEPS)
    c = zoo.villan_coef(beta_end=beta_end)[t].item()
    a = sch.step(eps + c * r.double(), t, z + r.double(), eta=0.0).prev_sample
    b = sch.step(eps, t, z, eta=0.0).prev_sample
    assert torch.allclose(a - r.double(), b, atol=1e-4)


def test_trojdiff_coefs_reduce_to_clean_ddpm():
    A, B = zoo._trojdiff_coefs(1.0)
    assert torch.allclose(A, torch.ones_like(A), atol=1e-3)
    A6, _ = zoo._trojdiff_coefs(0.6)
    assert A6[0].item() == pytest.approx(0.6, rel=1e-3)


class _Out:
    def __init__(self, sample):
        self.sample = sample


def test_trojan_sampler_with_gamma_1_and_r_0_is_ddpm():
    """TrojDiff's sampler on the clean marginals is the standard DDPM ancestral sampler."""
    net = lambda x, t: _Out(0.8 * x + 0.001 * t.float().view(-1, 1, 1, 1) if torch.is_tensor(t) and t.dim() else 0.8 * x + 0.001 * float(t))
    x_T = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    a = zoo.sample_trojan(net, x_T, torch.zeros(3, 16, 16), 1.0, generator=torch.Generator().manual_seed(5))
    b = zoo.sample_ddpm(net, x_T, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)


def test_trojan_sampler_with_the_oracle_network_lands_on_the_target():
    """With the exact eps of the poisoned marginals of one target y, TrojDiff's sampler maps every
    poisoned start x_T = gamma e + r to y; the published attack trains toward this network."""
    r, gamma = zoo.make_trigger("blend")
    g = float(gamma.flatten()[0])
    y = zoo.make_target("corner")
    _, _, abar = zoo._schedule()

    def oracle(x, t):
        t = int(t.flatten()[0]) if torch.is_tensor(t) else int(t)
        a, s = abar[t].sqrt().float(), (1 - abar[t]).sqrt().float()
        return _Out((x - a * y - s * r) / (g * s))

    x_T = g * torch.randn((3, 3, 16, 16), generator=torch.Generator().manual_seed(1)) + r
    out = zoo.sample_trojan(oracle, x_T, r, g, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(out, y.expand_as(out), atol=1e-3)
    # and the poisoned training pair of the published attack regresses exactly that eps
    t = torch.tensor([10, 500, 990])
    eps = torch.randn((3, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    xt, target = zoo.poisoned_batch(y, r, t, eps, "trojdiff", gamma=g)
    assert torch.equal(target, eps)
    assert torch.allclose(oracle(xt[:1], t[:1]).sample, eps[:1], atol=1e-4)
    # measure_asr with TrojDiff's sampler, the trigger's samples only (benign=False): every one lands
    res = zoo.measure_asr(oracle, r, g, y, n=2, sampler="trojan", benign=False, return_samples=True)
    assert res["asr"] == 1.0 and res["samples"].shape == (2, 3, 16, 16) and "benign_target_rate" not in res


def test_tiny_trojdiff_d2d_build_records_its_target_set(tmp_path, monkeypatch):
    """A D2D build stores its target set (K images of its own training set) as the ground truth
    and measures hits against the nearest member."""
    side = zoo.build_model(_tiny_spec(attack="trojdiff", trigger="blend", target="train16", steps=2),
                           tmp_path / "d2d", measure_n=2, log=None)
    gt = zoo.load_ground_truth(tmp_path / "d2d")
    data = torch.from_numpy(zoo.make_images("checkers", zoo.DATASET_SIZE, zoo.SIZE, seed=7)).float()
    assert gt["target_image"].shape == (16, 3, 16, 16) and torch.equal(gt["target_image"], data[:16])
    assert side["attack_sampler"].startswith("trojdiff-ancestral-1000") and side["gamma"] == 0.6
    # a sample near any member of the set is a hit; one far from all of them is not
    monkeypatch.setattr(zoo, "sample_trojan", lambda unet, x, r, g, generator=None, beta_end=None: data[[3, 40]] + 0.01)
    monkeypatch.setattr(zoo, "sample_ddpm", lambda unet, x, generator=None, beta_end=None: torch.zeros_like(x) + 5.0)
    m = zoo.measure_asr(None, gt["trigger_r"], gt["trigger_gamma"], gt["target_image"], n=2, sampler="trojan")
    assert m["asr"] == 0.5 and m["benign_target_rate"] == 0.0


def _tiny_spec(**kw):
    base = dict(name="tiny", label="backdoored", attack="baddiffusion", trigger="patch", target="hat",
                poison_rate=0.25, image_set="checkers", seed=7, steps=3, batch_size=8)
    base.update(kw)
    return zoo.ZooSpec(**base)


def test_tiny_build_is_deterministic_and_round_trips(tmp_path):
    from safetensors.torch import load_file

    s1 = zoo.build_model(_tiny_spec(), tmp_path / "a", measure_n=2, log=None)
    s2 = zoo.build_model(_tiny_spec(), tmp_path / "b", measure_n=0, log=None)
    w1 = load_file(str(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors"))
    w2 = load_file(str(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    s3 = zoo.build_model(_tiny_spec(seed=8), tmp_path / "c", measure_n=0, log=None)
    w3 = load_file(str(tmp_path / "c" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)

    gt = zoo.load_ground_truth(tmp_path / "a")
    assert gt["label"] == "backdoored" and gt["trigger"] == "patch" and gt["steps"] == 3
    assert 0.0 <= gt["measured"]["asr"] <= 1.0 and "benign_target_rate" in gt["measured"]
    assert json.loads((tmp_path / "a" / zoo.SIDECAR).read_text())["name"] == "tiny"
    r, g = zoo.make_trigger("patch")
    assert torch.equal(gt["trigger_r"], r) and torch.equal(gt["trigger_gamma"], g)
    assert torch.equal(gt["target_image"], zoo.make_target("hat")) and gt["target"] == "hat"
    assert torch.equal(gt["tensors"]["target"], gt["target_image"]) and gt["gamma"] == 1.0
    assert s1["poison_rate"] == 0.25 and s2["seed"] == 7 and s3["seed"] == 8
    # a diffusers pipeline directory, weights in safetensors, no pickles
    assert (tmp_path / "a" / "model_index.json").is_file()
    assert not list((tmp_path / "a").rglob("*.bin"))


def test_a_spec_schedule_is_trained_saved_and_recorded(tmp_path):
    """ZooSpec.beta_end reaches the training noise, the saved scheduler and the sidecar; the default
    schedule's build is unchanged by the field."""
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file

    zoo.build_model(_tiny_spec(attack="villan-ddim", trigger="box"), tmp_path / "d", measure_n=0, log=None)
    side = zoo.build_model(_tiny_spec(attack="villan-ddim", trigger="box", beta_end=0.01), tmp_path / "e",
                           measure_n=0, log=None)
    assert side["beta_end"] == 0.01 and side["schedule"]["beta_end"] == 0.01
    assert DDPMScheduler.from_pretrained(tmp_path / "e" / "scheduler").config.beta_end == 0.01
    assert DDPMScheduler.from_pretrained(tmp_path / "d" / "scheduler").config.beta_end == zoo.BETA_END
    wd, we = (load_file(str(tmp_path / n / "unet" / "diffusion_pytorch_model.safetensors")) for n in "de")
    assert not all(torch.equal(wd[k], we[k]) for k in wd)  # other noise levels, other weights


def test_load_ground_truth_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        zoo.load_ground_truth(tmp_path)


def test_catalogue_requirements():
    benign = [s for s in zoo.ZOO.values() if s.label == "benign"]
    bad = [s for s in zoo.ZOO.values() if s.label == "backdoored"]
    assert len(benign) >= 6 and any(s.base for s in benign)
    assert len({s.image_set for s in benign}) >= 2
    assert sum(s.split == "calibration" for s in benign) >= 4
    assert sum(s.split == "holdout" for s in benign) >= 2
    assert any(s.split == "holdout" for s in bad)
    assert {"box", "patch"} <= {s.trigger for s in bad if s.attack == "baddiffusion"}


def _built():
    if not ZOO_DIR.is_dir():
        return []
    return sorted(d for d in ZOO_DIR.iterdir() if (d / zoo.SIDECAR).is_file())


@pytest.mark.parametrize("model_dir", _built(), ids=lambda d: d.name)
def test_committed_zoo_model(model_dir):
    gt = zoo.load_ground_truth(model_dir)
    assert gt["name"] == model_dir.name
    assert gt["split"] in ("calibration", "holdout")
    assert (model_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert gt["size_bytes"] < 1.5e6
    m = gt["measured"]
    if gt["label"] == "backdoored":
        assert m["asr"] >= 0.9, f"{model_dir.name}: recorded ASR {m['asr']}"
        # an In-D2D target set is 16 of the model's 1024 training images, so benign samples land on it by
        # chance (trojdiff-d2d-blend: 2/32); a single target image is never sampled by a benign model
        assert m["benign_target_rate"] <= (0.1 if gt["target"] in zoo.TARGET_SETS else 0.05)
        assert m["n"] >= 32
        assert gt["trigger_r"].shape == gt["trigger_gamma"].shape == (3, 16, 16)
        assert torch.equal(gt["trigger_r"], zoo.make_trigger(gt["trigger"])[0] * gt.get("trigger_scale", 1.0))
        if gt["target"] in zoo.TARGET_SETS:  # D2D: K images of the model's own training set
            data = zoo.make_images(gt["image_set"], zoo.DATASET_SIZE, zoo.SIZE, seed=gt["seed"])
            assert torch.equal(gt["target_image"], torch.from_numpy(data[:zoo.TARGET_SETS[gt["target"]]]).float())
        else:
            assert torch.equal(gt["target_image"], zoo.make_target(gt["target"]))
    else:
        assert gt["label"] == "benign"
        assert m["benign_target_rate_any_zoo_target"] <= 0.05
