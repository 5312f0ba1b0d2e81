"""Model families beyond diffusers DDPM pipelines: DDIM-repo (TrojDiff) checkpoints and score-SDE VE
models. Tiny random models and the committed zoo models only: no training here."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import fixtures_models as fm
from cli_helpers import CLI_CHEAP, ZOO_SCAN
from cli_helpers import cli as _cli
from cli_helpers import lenient_reference as _lenient_reference
from terd_scan import ddim_repo
from terd_scan.denoisers import DDPMDenoiser, VEDenoiser, make_denoiser
from terd_scan.errors import ScanError, UnsafeFileError, UnsupportedModelError
from terd_scan.loading import load_model
from terd_scan.trigger import Trigger
from terd_scan.zoo import load_ground_truth
from terd_scan.zoo_ddim_repo import DDIM_REPO_ZOO
from terd_scan.zoo_families import VE_ZOO

ZOO_DIR = Path(__file__).resolve().parents[1] / "examples" / "zoo"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small memory-bound ops


# ------------------------------------------------------------------ a DDIM-repo Model, written here from
# the architecture (sinusoidal embedding sin-first, GroupNorm(32, 1e-6), swish, resnet blocks with a
# 1x1 nin_shortcut, single-head attention with 1x1-conv q/k/v/proj_out, conv downsampling padded
# (0, 1, 0, 1), nearest upsampling + conv, up levels stored in level order).


def _norm(c):
    return torch.nn.GroupNorm(32, c, eps=1e-6)


class _Res(torch.nn.Module):
    def __init__(self, cin, cout, temb):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), torch.nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = torch.nn.Linear(temb, cout)
        self.norm2, self.conv2 = _norm(cout), torch.nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = torch.nn.Conv2d(cin, cout, 1)

    def forward(self, x, temb):
        act = torch.nn.functional.silu
        h = self.conv1(act(self.norm1(x))) + self.temb_proj(act(temb))[:, :, None, None]
        h = self.conv2(act(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _Attn(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (torch.nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(b, c, hh * ww) for m in (self.q, self.k, self.v))
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=2)
        out = torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class DDIMRepoModel(torch.nn.Module):
    def __init__(self, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), in_ch=3):
        super().__init__()
        self.ch, self.levels, self.nrb = ch, len(ch_mult), num_res_blocks
        temb = 4 * ch
        self.temb = torch.nn.Module()
        self.temb.dense = torch.nn.ModuleList([torch.nn.Linear(ch, temb), torch.nn.Linear(temb, temb)])
        self.conv_in = torch.nn.Conv2d(in_ch, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = torch.nn.ModuleList()
        cin = ch
        for i, m in enumerate(ch_mult):
            lvl = torch.nn.Module()
            lvl.block, lvl.attn = torch.nn.ModuleList(), torch.nn.ModuleList()
            cin = ch * in_mult[i]
            for _ in range(num_res_blocks):
                lvl.block.append(_Res(cin, ch * m, temb))
                cin = ch * m
                if i in attn_levels:
                    lvl.attn.append(_Attn(cin))
            if i != len(ch_mult) - 1:
                lvl.downsample = torch.nn.Module()
                lvl.downsample.conv = torch.nn.Conv2d(cin, cin, 3, stride=2)
            self.down.append(lvl)
        self.mid = torch.nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = _Res(cin, cin, temb), _Attn(cin), _Res(cin, cin, temb)
        ups = []
        for i in reversed(range(len(ch_mult))):
            lvl = torch.nn.Module()
            lvl.block, lvl.attn = torch.nn.ModuleList(), torch.nn.ModuleList()
            skip = ch * ch_mult[i]
            for j in range(num_res_blocks + 1):
                if j == num_res_blocks:
                    skip = ch * in_mult[i]
                lvl.block.append(_Res(cin + skip, ch * ch_mult[i], temb))
                cin = ch * ch_mult[i]
                if i in attn_levels:
                    lvl.attn.append(_Attn(cin))
            if i != 0:
                lvl.upsample = torch.nn.Module()
                lvl.upsample.conv = torch.nn.Conv2d(cin, cin, 3, padding=1)
            ups.insert(0, lvl)
        self.up = torch.nn.ModuleList(ups)
        self.norm_out, self.conv_out = _norm(cin), torch.nn.Conv2d(cin, in_ch, 3, padding=1)

    def forward(self, x, t):
        half = self.ch // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        e = t.float()[:, None] * freqs[None]
        temb = torch.cat([torch.sin(e), torch.cos(e)], 1)
        temb = self.temb.dense[1](torch.nn.functional.silu(self.temb.dense[0](temb)))
        hs = [self.conv_in(x)]
        for i, lvl in enumerate(self.down):
            for j in range(self.nrb):
                h = lvl.block[j](hs[-1], temb)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
                hs.append(h)
            if hasattr(lvl, "downsample"):
                hs.append(lvl.downsample.conv(torch.nn.functional.pad(hs[-1], (0, 1, 0, 1))))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for i in reversed(range(self.levels)):
            lvl = self.up[i]
            for j in range(self.nrb + 1):
                h = lvl.block[j](torch.cat([h, hs.pop()], 1), temb)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample.conv(torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def _ddim_ckpt(path, model, ema=None, prefix="", extra=()):
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    sd = lambda m: {prefix + k: v.detach().clone() for k, v in m.state_dict().items()}
    states = [sd(model), opt.state_dict(), 7, 1234, *([sd(ema)] if ema is not None else []), *extra]
    torch.save(states, str(path))
    return str(path)


def _out(unet, x, t):
    with torch.no_grad():
        return unet(x, t).sample


@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "dataparallel"])
def test_ddim_repo_checkpoint_matches_the_ddim_repo_model(tmp_path, prefix):
    """The loader's key mapping reproduces the DDIM repo's own forward pass (EMA entry used)."""
    raw = _randomise(DDIMRepoModel(), 1)
    ema = _randomise(DDIMRepoModel(), 2)
    path = _ddim_ckpt(tmp_path / "ckpt.pth", raw, ema, prefix)
    m = load_model(path, allow_pickle=True)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 980])
    with torch.no_grad():
        want = ema(x, t)
    got = _out(m.unet, x, t)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(got, raw(x, t).detach(), atol=1e-2)
    assert m.provenance.pickle_loaded and m.unet_config["sample_size"] == 32
    notes = " ".join(m.provenance.notes)
    assert "EMA weights" in notes and "ch=32, ch_mult=[1, 2]" in notes and "1e-4..0.02" in notes
    assert ("DataParallel" in notes) == bool(prefix)
    assert m.scheduler_config["beta_end"] == 0.02 and m.scheduler_config["num_train_timesteps"] == 1000


def test_ddim_repo_roundtrip_from_diffusers(tmp_path):
    """A UNet2DModel exported under DDIM-repo names (inverse mapping) loads back identically; without
    an EMA entry the raw weights are used and the notes say so; a folder with ckpt.pth loads too."""
    cfg = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
               attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
               norm_num_groups=32)
    a = fm.make_unet(3, **cfg)
    b = fm.make_unet(4, **cfg)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    d = tmp_path / "run"
    d.mkdir()
    ddim_repo.save_ddim_checkpoint(d / "ckpt.pth", a, b)
    fm.write_json(tmp_path / "config.json", {**cfg, "_class_name": "UNet2DModel"})
    m = load_model(str(d), allow_pickle=True, config=str(tmp_path / "config.json"))
    assert torch.equal(_out(m.unet, x, t), _out(b, x, t))
    assert any("--config" in n for n in m.provenance.notes)
    ddim_repo.save_ddim_checkpoint(tmp_path / "noema.pth", a)
    m = load_model(str(tmp_path / "noema.pth"), allow_pickle=True)  # inferred: attention at level 1 -> 32 px
    assert torch.equal(_out(m.unet, x, t), _out(a, x, t))
    assert any("no EMA copy" in n for n in m.provenance.notes)
    assert m.unet_config["sample_size"] == 32


def test_ddim_repo_checkpoint_needs_allow_pickle(tmp_path):
    path = _ddim_ckpt(tmp_path / "ckpt.pth", _randomise(DDIMRepoModel(), 1))
    for src in (path, str(tmp_path)):
        with pytest.raises(UnsafeFileError) as info:
            load_model(src)
        msg = str(info.value)
        assert "is a pickle" in msg and "--allow-pickle" in msg and "\n" not in msg


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "raw-pickle"])
def test_malicious_ckpt_never_runs(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    evil = fm._Evil(marker)
    sd = {k: v for k, v in _randomise(DDIMRepoModel(), 1).state_dict().items()}
    path = tmp_path / "ckpt.pth"
    if zip_format:
        torch.save([sd, {"hook": evil}, 1, 2], str(path))
    else:
        import pickle

        with open(path, "wb") as f:
            pickle.dump([{"conv_in.weight": evil}], f, protocol=4)
    assert not marker.exists()
    for kw in ({}, {"allow_pickle": True}):
        with pytest.raises(UnsafeFileError):
            load_model(str(path), **kw)
    assert not marker.exists()


def test_ddim_repo_bad_checkpoints_are_one_line_errors(tmp_path):
    model = _randomise(DDIMRepoModel(), 1)
    sd = model.state_dict()
    # a missing tensor
    torch.save([{k: v for k, v in sd.items() if "mid.block_2.conv2" not in k}], str(tmp_path / "a.pth"))
    # an unknown tensor name
    torch.save([{**sd, "down.0.block.0.mystery.weight": torch.zeros(3)}], str(tmp_path / "b.pth"))
    # NaN weights
    torch.save([{**sd, "conv_out.bias": torch.full_like(sd["conv_out.bias"], float("nan"))}], str(tmp_path / "c.pth"))
    for name, needle in (("a.pth", "missing"), ("b.pth", "unexpected DDIM-repo weight"), ("c.pth", "NaN")):
        with pytest.raises(ScanError) as info:
            load_model(str(tmp_path / name), allow_pickle=True)
        assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


# The DDIM repo's main.py writes config.yml beside ckpt.pth with yaml.dump of nested argparse.Namespace
# objects (its dict2namespace): written here the same way.
def _namespace(d: dict):
    import argparse

    ns = argparse.Namespace()
    for k, v in d.items():
        setattr(ns, k, _namespace(v) if isinstance(v, dict) else v)
    return ns


def _training_config(image_size=16, attn_resolutions=(8,), ch_mult=(1, 2), beta_schedule="quad", beta_end=0.01):
    return {"data": {"dataset": "CIFAR10", "image_size": image_size, "channels": 3, "rescaled": True},
            "model": {"type": "simple", "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": list(ch_mult),
                      "num_res_blocks": 1, "attn_resolutions": list(attn_resolutions), "dropout": 0.1,
                      "var_type": "fixedlarge", "ema_rate": 0.9999, "ema": True, "resamp_with_conv": True},
            "diffusion": {"beta_schedule": beta_schedule, "beta_start": 0.0001, "beta_end": beta_end,
                          "num_diffusion_timesteps": 1000},
            "training": {"batch_size": 128, "snapshot_freq": 5000}}


def _ddim_log_folder(path: Path, config: dict | str) -> Path:
    import yaml

    path.mkdir()
    _ddim_ckpt(path / "ckpt.pth", _randomise(DDIMRepoModel(), 1), _randomise(DDIMRepoModel(), 2))
    text = config if isinstance(config, str) else yaml.dump(_namespace(config), default_flow_style=False)
    (path / "config.yml").write_text(text)
    return path


@pytest.mark.parametrize("kind, formula", [
    ("quad", lambda b0, b1, n: torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float64) ** 2),
    ("sigmoid", lambda b0, b1, n: torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float64)) * (b1 - b0) + b0),
    ("linear", lambda b0, b1, n: torch.linspace(b0, b1, n, dtype=torch.float64)),
    ("const", lambda b0, b1, n: torch.full((n,), b1, dtype=torch.float64)),
])
def test_ddim_repo_training_config_gives_size_and_schedule(tmp_path, kind, formula):
    """config.yml beside ckpt.pth: the image size (the weights alone would say 32 px: attention at
    level 1) and the noise schedule, with the DDIM repo's own beta formulas; the file is recorded."""
    d = _ddim_log_folder(tmp_path / "logs", _training_config(beta_schedule=kind))
    inferred = load_model(str(d / "ckpt.pth"), allow_pickle=True, config=None)
    assert inferred.unet_config["sample_size"] == 16
    m = load_model(str(d), allow_pickle=True)
    assert m.unet_config["sample_size"] == 16 and m.scheduler_config["beta_end"] == 0.01
    assert m.schedule_origin == "config.yml (the DDIM repo's training config)"
    assert any("from the DDIM repo's training config" in n for n in m.provenance.notes)
    assert ("config.yml", "config") in [(f.path, f.role) for f in m.provenance.files]
    den = make_denoiser(m)
    want = torch.cumprod(1 - formula(1e-4, 0.01, 1000), 0).float()
    assert torch.allclose(den.alphas_cumprod.cpu(), want, rtol=1e-4, atol=1e-6)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 980])  # the same network, now at its own size
    assert torch.equal(_out(m.unet, x, t), _out(inferred.unet, x, t))


def test_ddim_repo_training_config_bad_inputs_are_one_line_errors(tmp_path):
    marker = tmp_path / "pwned"
    cases = {
        "evil": (f"!!python/object/apply:os.system [\"touch {marker}\"]\n", UnsafeFileError, "build Python objects"),
        "truncated": ("data:\n  image_size: [16, 32\n", ScanError, "not valid YAML"),
        "list": ("- 1\n- 2\n", ScanError, "holds a YAML list"),
        "binary": (b"\xff\xfe\x00garbage".decode("latin-1"), ScanError, "not valid YAML"),
        "mismatch": (_training_config(ch_mult=(1, 1)), ScanError, "block_out_channels is [32, 32] by the config"),
        "attention": (_training_config(attn_resolutions=(16,)), ScanError, "down_block_types"),
        "jsd": (_training_config(beta_schedule="jsd"), UnsupportedModelError, "'jsd' beta schedule"),
        "nosection": ({"data": {"image_size": 16}}, ScanError, "no 'model' section"),
        "badsize": ({**_training_config(), "data": {"image_size": "16"}}, ScanError, "data.image_size must be a int"),
    }
    for name, (config, error, needle) in cases.items():
        d = _ddim_log_folder(tmp_path / name, config)
        with pytest.raises(error) as info:
            load_model(str(d), allow_pickle=True)
        msg = str(info.value)
        assert needle in msg and "\n" not in msg, (name, msg)
    assert not marker.exists()
    # --config is the way around a config.yml that cannot be used: it is then not read at all
    cfg = tmp_path / "unet.json"
    fm.write_json(cfg, {**ddim_repo.infer_config(DDIMRepoModel().state_dict(), "x")[0], "sample_size": 16})
    m = load_model(str(tmp_path / "evil"), allow_pickle=True, config=str(cfg))
    assert m.unet_config["sample_size"] == 16 and any("config.yml not read: --config" in n for n in m.provenance.notes)
    assert not marker.exists()


# ------------------------------------------------------------------ score-SDE VE


VE_SCHED = {"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": 200, "sigma_min": 0.01, "sigma_max": 50.0,
            "snr": 0.16, "sampling_eps": 1e-5, "correct_steps": 1}


def _ve_unet(seed=0):
    return fm.make_unet(seed, time_embedding_type="fourier", sample_size=8)


def _save_ve(path, unet, *, flat=False, sched=VE_SCHED):
    from diffusers import ScoreSdeVePipeline, ScoreSdeVeScheduler

    fm._quiet()
    s = ScoreSdeVeScheduler.from_config({k: v for k, v in sched.items() if not k.startswith("_")})
    if flat:  # google/ncsnpp-celebahq-256 layout
        os.makedirs(path, exist_ok=True)
        unet.save_pretrained(str(path))
        s.save_pretrained(str(path))
        fm.write_json(os.path.join(path, "model_index.json"),
                      {"_class_name": "ScoreSdeVePipeline", "_diffusers_version": "0.3.0",
                       "scheduler": ["diffusers", "ScoreSdeVeScheduler"], "unet": ["diffusers", "UNet2DModel"]})
    else:
        ScoreSdeVePipeline(unet=unet, scheduler=s).save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("flat", [False, True], ids=["pipeline", "flat"])
def test_ve_model_loads_as_ve_denoiser(tmp_path, flat):
    unet = _ve_unet()
    m = load_model(_save_ve(tmp_path / "ve", unet, flat=flat))
    assert m.pipeline_class == "ScoreSdeVePipeline" and m.scheduler_config["_class_name"] == "ScoreSdeVeScheduler"
    den = make_denoiser(m)
    assert isinstance(den, VEDenoiser)
    info = den.info().to_dict()
    assert info["kind"] == "score-sde-ve" and info["prior"] == "N(0, sigma_max^2 I) (normalised to N(0, I))"
    assert den.num_train_timesteps == 200 and den.last_timesteps(10) == (190, 199)
    # the VP view: abar = 1 / (1 + sigma^2) on the geometric grid, eps = -sigma * score(x * sqrt(1 + sigma^2), sigma)
    sig = torch.exp(torch.linspace(math.log(0.01), math.log(50.0), 200, dtype=torch.float64))
    assert torch.allclose(den.alphas_cumprod.double(), 1 / (1 + sig ** 2), rtol=1e-5)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 199])
    s = sig[t].float()
    want = -s.view(-1, 1, 1, 1) * _out(unet, x * (1 + s ** 2).sqrt().view(-1, 1, 1, 1), s)
    assert torch.allclose(den.eps(x, t), want, atol=1e-5)


def test_ve_ddim_sample_is_differentiable_and_previews_run():
    from types import SimpleNamespace

    unet = _ve_unet()
    den = make_denoiser(SimpleNamespace(unet=unet, scheduler_config=VE_SCHED))
    r = torch.zeros(1, 3, 8, 8, requires_grad=True)
    out = den.ddim_sample(torch.randn(2, 3, 8, 8) + r, 4)
    out.pow(2).sum().backward()
    assert out.shape == (2, 3, 8, 8) and r.grad is not None and torch.isfinite(r.grad).all() and r.grad.abs().sum() > 0
    gen = torch.Generator().manual_seed(0)
    prev = den.ancestral_sample(torch.randn(2, 3, 8, 8), 5, generator=gen)
    assert prev.shape == (2, 3, 8, 8) and torch.isfinite(prev).all()
    assert den.evaluations == 2 * 4 + 2 * 5


def _oracle_ve_unet(y):
    """score of x = y + sigma eps (a point mass at y): -(x - y) / sigma^2, called with sigma."""
    from types import SimpleNamespace

    class U(torch.nn.Module):
        config = SimpleNamespace(in_channels=3, out_channels=3, sample_size=8, time_embedding_type="fourier")

        def forward(self, x, sigma):
            s = sigma.view(-1, 1, 1, 1)
            return SimpleNamespace(sample=-(x - y) / s ** 2)

    return U()


def test_ve_samplers_reach_the_data_point():
    """With the exact score of a point mass, both the DDIM view and the VE predictor end at that point
    (checks the unit conventions: sigma as the timestep, score output, normalised starting noise)."""
    from types import SimpleNamespace

    y = torch.linspace(-1, 1, 3 * 8 * 8).view(1, 3, 8, 8)
    den = make_denoiser(SimpleNamespace(unet=_oracle_ve_unet(y), scheduler_config=VE_SCHED))
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(den.ddim_sample(x, 10), y.expand(4, -1, -1, -1), atol=1e-3)
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(den.ancestral_sample(x, 200, generator=gen), y.expand(4, -1, -1, -1), atol=0.05)


def _gaussian_oracle_ve_unet(mu, s2, sigma_max, r=None, sampler="ode", stride=1):
    """The exact score of VE marginals of Gaussian data y ~ N(mu, s2 I): benign (r None) x = y + sigma eps;
    VillanDiffusion-poisoned x = y + (A_i - 1) r + sigma_i eps, trained on eps + k_i r (the zoo's target)."""
    from types import SimpleNamespace

    from terd_scan import zoo_families as zf

    log_grid = zf.ve_sigmas(sigma_max=sigma_max).log()
    k = zf.ve_trigger_coef(sampler=sampler, sigma_max=sigma_max, stride=stride)

    class U(torch.nn.Module):
        def forward(self, x, sigma):
            s = sigma.view(-1, 1, 1, 1)
            if r is None:
                return SimpleNamespace(sample=-(x - mu) / (s2 + s ** 2))
            i = (log_grid.view(1, -1) - sigma.double().log().view(-1, 1)).abs().argmin(1)
            a = (1 + s ** 2).sqrt()
            eps = s * (x - mu - (a - 1) * r) / (s2 + s ** 2)  # E[eps | x]
            return SimpleNamespace(sample=-(eps + k[i].float().view(-1, 1, 1, 1) * r) / s)

    return U()


def test_ve_training_noise_levels():
    """"grid" draws every grid index once; "ddpm" the grid index nearest each DDPM timestep's noise level,
    so it runs from sigma_min to the clamped sigma_max and puts more draws at high sigma."""
    from dataclasses import replace

    from terd_scan import zoo_families as zf

    spec = zf.VE_ZOO["ve-villan-box"]
    assert torch.equal(zf.training_sigma_indices(replace(spec, sigma_sampling="grid")), torch.arange(zf.VE_STEPS))
    idx = zf.training_sigma_indices(spec)
    assert idx.numel() == 1000 and idx[0] == 0 and idx[-1] == zf.VE_STEPS - 1 and (idx.diff() >= 0).all()
    assert (idx >= 700).float().mean() > 0.5 > (torch.arange(zf.VE_STEPS) >= 700).float().mean()
    with pytest.raises(ValueError, match="sigma_sampling"):
        zf.training_sigma_indices(replace(spec, sigma_sampling="nope"))


@pytest.mark.parametrize("sigma_max", [12.0, 50.0])
def test_ve_villan_target_removes_the_trigger_on_the_attackers_grid(sigma_max):
    """The zoo's VE backdoor: on Gaussian data, a model that learned the target eps + k_i r with the
    coefficient of the attacker's ODE grid maps the poisoned start sigma_max eps + (A_max - 1) r where the
    benign model maps sigma_max eps (the trigger is carried along and removed), with 50 Euler steps as with
    1000; with the reverse-diffusion predictor's coefficient (about half) the ODE keeps part of r."""
    from terd_scan import zoo_families as zf

    mu, s2 = torch.linspace(-0.5, 0.5, 3 * 4 * 4).view(1, 3, 4, 4), 0.25
    r = torch.full((1, 3, 4, 4), -0.8)
    eps = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    start = zf.poisoned_start(r, eps, sigma_max)
    for steps in (50, 1000):
        stride = zf.ode_stride(steps)
        benign = zf.sample_ve_ode(_gaussian_oracle_ve_unet(mu, s2, sigma_max), sigma_max * eps, steps, sigma_max)
        poisoned = zf.sample_ve_ode(_gaussian_oracle_ve_unet(mu, s2, sigma_max, r, "ode", stride), start, steps,
                                    sigma_max)
        assert (poisoned - benign).abs().max() < 1e-4, (steps, (poisoned - benign).abs().max())
        sde = zf.sample_ve_ode(_gaussian_oracle_ve_unet(mu, s2, sigma_max, r, "sde", stride), start, steps,
                               sigma_max)
        assert (sde - benign).abs().mean() > 0.2, (steps, (sde - benign).abs().mean())


@pytest.mark.parametrize("bad, needle", [
    (dict(sigma_min=5.0, sigma_max=1.0), "sigma_min must be below sigma_max"),
    (dict(sigma_max=float("inf")), "sigma_max"),
    (dict(sigma_min=-1.0), "sigma_min"),
    (dict(num_train_timesteps=1), "at least 2"),
])
def test_bad_ve_scheduler_configs(tmp_path, bad, needle):
    d = _save_ve(tmp_path / "ve", _ve_unet())
    cfg = fm.read_json(os.path.join(d, "scheduler", "scheduler_config.json"))
    p = os.path.join(d, "scheduler", "scheduler_config.json")
    with open(p, "w") as f:
        f.write(json.dumps({**cfg, **bad}).replace("Infinity", "1e999"))
    with pytest.raises(ScanError) as info:
        load_model(d)
    assert needle in str(info.value), str(info.value)


def test_family_mismatches_are_refused(tmp_path):
    # a Fourier (score-SDE) UNet with a DDPM beta schedule
    d = _save_ve(tmp_path / "a", _ve_unet())
    fm.write_json(os.path.join(d, "scheduler", "scheduler_config.json"), {"_class_name": "DDPMScheduler"})
    fm.write_json(os.path.join(d, "model_index.json"), {"_class_name": "DDPMPipeline", "scheduler": [
        "diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]})
    with pytest.raises(UnsupportedModelError, match="ScoreSdeVeScheduler"):
        load_model(d)
    # ScoreSdeVePipeline naming a DDPM scheduler
    d = fm.save_pipeline(tmp_path / "b", fm.make_unet())
    idx = fm.read_json(os.path.join(d, "model_index.json"))
    fm.write_json(os.path.join(d, "model_index.json"), {**idx, "_class_name": "ScoreSdeVePipeline"})
    with pytest.raises(UnsupportedModelError, match="ScoreSdeVePipeline with a DDPMScheduler"):
        load_model(d)


def test_v_prediction_pipeline_loads_and_converts(tmp_path):
    from diffusers import DDPMScheduler

    unet = fm.make_unet(5)
    d = fm.save_pipeline(tmp_path / "v", unet, DDPMScheduler(beta_schedule="linear", prediction_type="v_prediction"))
    m = load_model(d)
    den = make_denoiser(m)
    assert isinstance(den, DDPMDenoiser) and den.info().prediction_type == "v_prediction"
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 900])
    abar = den.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = _out(unet, x, t)
    assert torch.allclose(den.eps(x, t), abar.sqrt() * v + (1 - abar).sqrt() * x, atol=1e-6)
    res = _cli("model", d, *CLI_CHEAP, "--reference", _lenient_reference(tmp_path), "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model"]["prediction_type"] == "v_prediction"


# ------------------------------------------------------------------ end to end through the CLI


# The patch search is off here: these tests are about loading each family end to end, and on the
# 32 px DDIM-repo model its 338 candidates cost minutes (it is tested in test_reversion/test_cli_model).
def test_ve_model_scans_end_to_end(tmp_path):
    d = _save_ve(tmp_path / "ve", _ve_unet())
    res = _cli("model", d, *CLI_CHEAP, "--reference", _lenient_reference(tmp_path), "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    model = json.loads(res.stdout)["model"]
    assert model["kind"] == "score-sde-ve" and model["prior"] == "N(0, sigma_max^2 I) (normalised to N(0, I))"
    assert "VE reverse-diffusion predictor" in model["sampler"] and model["pipeline_class"] == "ScoreSdeVePipeline"
    assert (tmp_path / "o" / "trigger.png").is_file()


@pytest.mark.cost(41)
def test_ddim_repo_checkpoint_scans_end_to_end(tmp_path):
    path = _ddim_ckpt(tmp_path / "ckpt.pth", _randomise(DDIMRepoModel(), 1), _randomise(DDIMRepoModel(), 2))
    ref = _lenient_reference(tmp_path)
    # the pickle gate and the EMA note are under test, not the searches (their screens dominate the time)
    cheap = [*CLI_CHEAP, "--no-narrow-search", "--no-canvas-search"]
    res = _cli("model", path, *cheap, "--reference", ref, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "--allow-pickle" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = _cli("model", path, *cheap, "--reference", ref, "--out", tmp_path / "o", "--allow-pickle")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["model"]["kind"] == "ddpm" and rep["source"]["pickle_loaded"]
    assert any("EMA weights" in n for n in rep["source"]["notes"])


def test_text_to_image_message_and_exit_code(tmp_path):
    d = fm.save_pipeline(tmp_path / "sd", fm.make_unet())
    idx = fm.read_json(os.path.join(d, "model_index.json"))
    fm.write_json(os.path.join(d, "model_index.json"), {**idx, "_class_name": "StableDiffusionPipeline",
                                                        "unet": ["diffusers", "UNet2DConditionModel"],
                                                        "text_encoder": ["transformers", "CLIPTextModel"]})
    res = _cli("model", d, *CLI_CHEAP, "--out", tmp_path / "o")
    assert res.exit_code == 2
    err = res.stderr.strip()
    assert "not covered: caption-trigger backdoors are outside TERD's noise-space threat model" in err, err
    assert len(err.splitlines()) == 1


VE_ZOO_DIR = ZOO_DIR.parent / "zoo-families"


# the committed VE models are the holdout specs of VE_ZOO (the experimental ones are recipe notes)
COMMITTED_VE = [name for name, spec in VE_ZOO.items() if spec.split == "holdout"]


def _ve_zoo_dirs(names=("ve-benign", "ve-villan-box")):
    dirs = [VE_ZOO_DIR / n for n in names]
    missing = [d.name for d in dirs if not (d / "terd-zoo.json").is_file()]
    assert not missing, f"rebuild with `python -m terd_scan.zoo_families build {' '.join(missing)}`"
    return dirs


def test_committed_ve_zoo_models():
    dirs = _ve_zoo_dirs(COMMITTED_VE)
    truths = [load_ground_truth(d) for d in dirs]
    assert {t["label"] for t in truths} == {"benign", "backdoored"}
    for d, truth in zip(dirs, truths):
        assert truth["split"] == "holdout", d  # judged with the pixel reference, built without them
        assert truth["family"] == "score-sde-ve", d
        if truth["label"] == "benign":
            assert truth["measured"]["benign_target_rate_any_zoo_target"] == 0.0, d
        else:
            assert truth["measured"]["asr"] >= 0.9 and truth["measured"]["n"] >= 32, (d, truth["measured"])
            assert truth["measured"]["benign_target_rate"] == 0.0, d
            assert truth["trigger_r"].shape == (3, 16, 16) and "normalised" in truth["trigger_units"]
        den = make_denoiser(load_model(str(d)))
        assert isinstance(den, VEDenoiser) and den.input_shape == (3, 16, 16)


# The fast preset and the shipped pixel reference on the first committed VE pair (holdout; the other four
# committed VE models are in the benchmark table only, to keep CI short): measured with
# `python benchmarks/quality.py --preset fast --preset standard --zoo examples/zoo-families`, scores (max feature /
# threshold) 0.18 for ve-benign and 7.71 for ve-villan-box (r cosine 0.94), seed 0. 30-70 s per scan, one thread.
@pytest.mark.cost(95)
class TestScanOfCommittedVEZooModels:  # a class, so --dist loadscope runs these two scans apart from the module
    @pytest.mark.parametrize("name, code", [("ve-benign", 0), ("ve-villan-box", 1)])
    def test_verdict(self, tmp_path, name, code):
        _ve_zoo_dirs()
        res = _cli("model", VE_ZOO_DIR / name, *ZOO_SCAN, "--out", tmp_path / "o")
        assert res.exit_code == code, res.output
        rep = json.loads(res.stdout)
        assert rep["model"]["kind"] == "score-sde-ve" and rep["model"]["input_shape"] == [3, 16, 16]
        assert rep["thresholds"]["origin"] == "shipped:fast", rep["thresholds"]
        f, th = rep["features"], rep["thresholds"]
        if code == 1:  # well over, and the trigger found is the one planted
            assert max(f["mean_kl"] / th["mean_kl"], f["var_kl"] / th["var_kl"]) > 2, (f, th)
            r = Trigger.load(tmp_path / "o" / "trigger.safetensors").r
            true_r = load_ground_truth(VE_ZOO_DIR / name)["trigger_r"]
            assert float(torch.nn.functional.cosine_similarity(r.flatten(), true_r.flatten(), dim=0)) > 0.8
        else:
            assert f["mean_kl"] < th["mean_kl"] and f["var_kl"] < th["var_kl"], (f, th)


# The committed DDIM-repo zoo models (examples/zoo-families/ddim-*): the DDIM repo's Model trained with the zoo's
# recipe and saved as TrojDiff saves it (ckpt.pth: [model, optimizer, epoch, step, EMA] + config.yml).
def _ddim_zoo_dirs(names=tuple(DDIM_REPO_ZOO)):
    dirs = [VE_ZOO_DIR / n for n in names]
    missing = [d.name for d in dirs if not (d / "terd-zoo.json").is_file()]
    assert not missing, f"rebuild with `python -m terd_scan.zoo_ddim_repo build {' '.join(missing)}`"
    return dirs


def test_committed_ddim_repo_zoo_models():
    dirs = _ddim_zoo_dirs()
    truths = [load_ground_truth(d) for d in dirs]
    assert {t["label"] for t in truths} == {"benign", "backdoored"}
    for d, truth in zip(dirs, truths):
        assert truth["split"] == "holdout" and truth["family"] == "ddim-repo", d
        measured = truth["measured"]
        if truth["label"] == "benign":
            assert measured["benign_target_rate_any_zoo_target"] == 0.0, d
        else:
            assert measured["asr"] >= 0.9 and measured["n"] >= 32, (d, measured)
            assert measured["benign_target_rate"] == 0.0, d
            assert truth["attack"] == "trojdiff" and float(truth["trigger_gamma"].mean()) == pytest.approx(0.6)
        with pytest.raises(UnsafeFileError):  # ckpt.pth is a pickle: refused without --allow-pickle
            load_model(str(d))
        m = load_model(str(d), allow_pickle=True)
        assert m.provenance.pickle_loaded and m.unet_config["sample_size"] == 16  # from config.yml
        assert m.schedule_origin == "config.yml (the DDIM repo's training config)"
        notes = " ".join(m.provenance.notes)
        arch = truth["architecture"]
        assert "EMA weights" in notes and "its architecture matches the weights" in notes, notes
        assert m.unet_config["block_out_channels"] == [arch["ch"] * k for k in arch["ch_mult"]]
        assert sum(p.numel() for p in m.unet.parameters()) == arch["parameters"]
        den = make_denoiser(m)
        assert isinstance(den, DDPMDenoiser) and den.input_shape == (3, 16, 16)


# The fast preset and the shipped pixel reference on the committed DDIM-repo pair (holdout), as
# `python benchmarks/quality.py --preset fast --preset standard --zoo examples/zoo-families` measured them.
# Scores (max feature / threshold) 0.93 for ddim-benign and 10.9 for ddim-trojdiff-blend (r cosine 0.95), seed 0;
# 144 s and 230 s per scan on one thread. One class each, so --dist loadscope can run them on different workers.
def _ddim_zoo_verdict(tmp_path, name, code):
    _ddim_zoo_dirs()
    res = _cli("model", VE_ZOO_DIR / name, *ZOO_SCAN, "--allow-pickle", "--out", tmp_path / "o")
    assert res.exit_code == code, res.output
    rep = json.loads(res.stdout)
    assert rep["model"]["kind"] == "ddpm" and rep["model"]["input_shape"] == [3, 16, 16]
    assert rep["source"]["pickle_loaded"] and any("EMA weights" in n for n in rep["source"]["notes"])
    assert rep["thresholds"]["origin"] == "shipped:fast", rep["thresholds"]
    f, th = rep["features"], rep["thresholds"]
    if code == 1:
        r = Trigger.load(tmp_path / "o" / "trigger.safetensors").r
        true_r = load_ground_truth(VE_ZOO_DIR / name)["trigger_r"]
        assert float(torch.nn.functional.cosine_similarity(r.flatten(), true_r.flatten(), dim=0)) > 0.8
    else:
        assert f["mean_kl"] < th["mean_kl"] and f["var_kl"] < th["var_kl"], (f, th)


# Both slow, for CI time (130 s and 222 s on one core; the TrojDiff scan's stage 1, stage 2 and narrow refinement
# on the ch-64 network are most of it, the cheaper searches off saves little): their fast-preset verdicts are in
# benchmarks/results/quality-fast-standard.md (scores 0.93 clean, 10.9 backdoored). The DDIM-repo path stays in CI
# through the key-mapping test, the committed models' load test and the end-to-end CLI scan above.
@pytest.mark.slow
class TestScanOfCommittedDDIMRepoBenign:
    def test_verdict(self, tmp_path):
        _ddim_zoo_verdict(tmp_path, "ddim-benign", 0)


@pytest.mark.slow
class TestScanOfCommittedDDIMRepoTrojDiff:
    def test_verdict(self, tmp_path):
        _ddim_zoo_verdict(tmp_path, "ddim-trojdiff-blend", 1)
