"""Checkpoints of the ermongroup/ddim codebase (the format TrojDiff trains and releases).

`ckpt.pth` is a torch pickle of a LIST: [model_state_dict, optimizer_state, epoch, step] plus
ema_state_dict at index 4 when EMA was on. The state dicts use the DDIM repo's own `Model` names
(possibly behind a "module." DataParallel prefix):

    conv_in, temb.dense.{0,1}, down.i.block.j.{norm1,conv1,temb_proj,norm2,conv2,nin_shortcut},
    down.i.attn.j.{norm,q,k,v,proj_out}, down.i.downsample.conv, mid.{block_1,attn_1,block_2},
    up.i.block.j, up.i.attn.j, up.i.upsample.conv, norm_out, conv_out

The architecture is the DDPM UNet that diffusers' UNet2DModel reproduces (sinusoidal embedding with
sin first and a shift of 1, GroupNorm(32, eps 1e-6), conv downsampling padded (0, 1, 0, 1), single-head
attention). The up path is stored in level order (up.0 = the highest resolution) while diffusers
counts up_blocks from the lowest resolution, and attention q/k/v/proj_out are 1x1 convolutions there
and Linear layers in diffusers (same numbers, reshaped).

Only data is read here: the list comes from torch.load(weights_only=True) in safety.py.
"""

from __future__ import annotations

import re

import torch

from .errors import ScanError, UnsupportedModelError

RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
          "nin_shortcut": "conv_shortcut"}
ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
TOP = {"conv_in": "conv_in", "temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
       "norm_out": "conv_norm_out", "conv_out": "conv_out"}
EMA_INDEX = 4
DEFAULT_RESOLUTION = 32
ATTN_RESOLUTION = 16  # attn_resolutions: [16] in every config the DDIM repo ships (cifar10, celeba, lsun)
DDIM_REPO_SCHEDULE_NOTE = ("DDIM-repo checkpoint without a scheduler config: the DDIM repo's default schedule "
                           "(DDPM linear betas 1e-4..0.02, 1000 steps) is assumed")

_MARKERS = ("conv_in.weight", "temb.dense.0.weight")


def strip_prefix(sd: dict) -> tuple[dict, bool]:
    """Drop a DataParallel "module." prefix (from every key, or from none)."""
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}, True
    return sd, False


def _is_ddim_sd(obj) -> bool:
    if not isinstance(obj, dict) or not obj:
        return False
    keys = {k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k for k in obj}
    return all(m in keys for m in _MARKERS)


def is_ddim_checkpoint(obj) -> bool:
    """A DDIM-repo checkpoint: the list [model_sd, optim, epoch, step(, ema_sd)], or a bare state dict
    with the DDIM repo's names."""
    if isinstance(obj, (list, tuple)) and obj:
        return _is_ddim_sd(obj[0])
    return _is_ddim_sd(obj)


def select_state_dict(obj, rel: str) -> tuple[dict, list[str]]:
    """The weights to scan and notes saying which: the EMA copy (what the attacker samples with)
    when the checkpoint holds one, else the raw model weights."""
    notes: list[str] = []
    if isinstance(obj, dict):
        sd, which = obj, "a bare DDIM-repo state dict"
    else:
        ema = obj[EMA_INDEX] if len(obj) > EMA_INDEX else None
        if _is_ddim_sd(ema):
            sd, which = ema, f"the EMA weights (list entry {EMA_INDEX}), which the DDIM/TrojDiff samplers use"
        else:
            sd, which = obj[0], ("the raw model weights (list entry 0): the checkpoint holds no EMA copy"
                                 if ema is None else "the raw model weights (list entry 0): entry 4 is not an EMA "
                                 "state dict")
    sd, prefixed = strip_prefix(dict(sd))
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ScanError(f"{rel}: the DDIM-repo state dict holds non-tensor entries (e.g. {str(bad[0])[:60]!r}); "
                        "re-save the checkpoint")
    notes.append(f"{rel}: DDIM-repo (ermongroup/ddim, TrojDiff) checkpoint; scanned {which}"
                 + ("; 'module.' DataParallel prefix removed" if prefixed else ""))
    if "logvar" in sd:  # model.type == 'bayesian': a learned per-timestep log-variance, unused for eps
        del sd["logvar"]
        notes.append(f"{rel}: 'logvar' (bayesian model type) ignored: terd-scan uses the eps prediction only")
    return sd, notes


def _levels(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd for m in [re.match(rf"{prefix}\.(\d+)\.", k)] if m}
    if not idx:
        return 0
    if idx != set(range(max(idx) + 1)):
        raise ScanError(f"DDIM-repo checkpoint has gaps in its {prefix}.N levels ({sorted(idx)}); it is incomplete")
    return max(idx) + 1


def _count(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd for m in [re.match(rf"{re.escape(prefix)}\.(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


def unet_config(resolution: int, in_ch: int, out_ch: int, block_out_channels: list[int], num_res_blocks: int,
                attn: list[bool]) -> dict:
    """The UNet2DModel config that computes the DDIM repo's Model with these sizes (attention per level)."""
    return {
        "_class_name": "UNet2DModel", "sample_size": resolution, "in_channels": in_ch, "out_channels": out_ch,
        "block_out_channels": list(block_out_channels), "layers_per_block": num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "attention_head_dim": None, "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1,
        "norm_eps": 1e-6, "norm_num_groups": 32, "act_fn": "silu", "time_embedding_type": "positional",
        "center_input_sample": False, "mid_block_scale_factor": 1, "add_attention": True,
    }


def infer_config(sd: dict, rel: str) -> tuple[dict, list[str]]:
    """A UNet2DModel config from tensor shapes: ch, ch_mult, num_res_blocks, attention levels;
    the resolution from the attention level (DDIM-repo configs put attention at 16 px), else 32 px."""
    try:
        ch, in_ch = sd["conv_in.weight"].shape[:2]
        out_ch = sd["conv_out.weight"].shape[0]
        levels = _levels(sd, "down")
        if levels == 0 or _levels(sd, "up") != levels:
            raise KeyError("down/up levels")
        num_res = _count(sd, "down.0.block")
        mult = [int(sd[f"down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)]
    except (KeyError, AttributeError, ValueError, IndexError) as exc:
        raise ScanError(f"{rel}: cannot read the DDIM-repo architecture from the weights ({exc}); pass --config "
                        "with a UNet2DModel config.json") from None
    attn = [any(k.startswith(f"down.{i}.attn.0.") for k in sd) for i in range(levels)]
    attn_levels = [i for i, a in enumerate(attn) if a]
    if len(attn_levels) == 1:
        resolution = ATTN_RESOLUTION * 2 ** attn_levels[0]
        how = (f"{resolution} px from the attention level ({attn_levels[0]}; the DDIM repo's configs put attention "
               f"at {ATTN_RESOLUTION} px)")
    else:
        resolution = DEFAULT_RESOLUTION
        how = f"{resolution} px (default; pass --config to set sample_size)"
    cfg = unet_config(resolution, int(in_ch), int(out_ch), mult, num_res, attn)
    ch_mult = [m // int(ch) for m in mult]
    note = (f"{rel}: architecture inferred from the weights: ch={int(ch)}, ch_mult={ch_mult}, num_res_blocks={num_res}, "
            f"attention at levels {attn_levels}, resolution {how}")
    return cfg, [note]


TRAINING_CONFIG_NAME = "config.yml"  # what the DDIM repo's main.py writes beside ckpt.pth in its log folder
# The DDIM repo's beta schedules (runners/diffusion.py, get_beta_schedule), computed as it does (float64)
# and handed to the scheduler as trained_betas: diffusers' DDIMScheduler has no "sigmoid" and no "const".
# "jsd" (1/T, ..., 1) ends at beta = 1, where no noise level is left to reverse: not supported.
BETA_SCHEDULES = {
    "linear": lambda b0, b1, n: torch.linspace(b0, b1, n, dtype=torch.float64),
    "quad": lambda b0, b1, n: torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float64) ** 2,
    "sigmoid": lambda b0, b1, n: torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float64)) * (b1 - b0) + b0,
    "const": lambda b0, b1, n: torch.full((n,), b1, dtype=torch.float64),
}


def from_training_config(cfg: dict, inferred: dict, rel: str) -> tuple[dict, dict, list[str]]:
    """The UNet config and the DDPM scheduler config of a checkpoint from the config.yml it was trained
    with (the DDIM repo's data/model/diffusion sections). The architecture must agree with the one read
    from the weights (`inferred`, from infer_config); the config adds what the weights cannot tell: the
    image size and the noise schedule."""
    data, model, diffusion = (_section(cfg, k, rel) for k in ("data", "model", "diffusion"))
    size = _field(data, "image_size", int, rel, "data")
    if not 4 <= size <= 4096:
        raise ScanError(f"{rel}: data.image_size must be 4..4096, got {size}; fix the config")
    if model.get("resamp_with_conv", True) is not True:
        raise UnsupportedModelError(f"not supported yet: {rel} trains with resamp_with_conv: false (average-pool "
                                    "resampling), which has no UNet2DModel equivalent")
    ch = _field(model, "ch", int, rel, "model")
    mult = _field(model, "ch_mult", list, rel, "model")
    attn_res = _field(model, "attn_resolutions", list, rel, "model")
    if not all(isinstance(m, int) and not isinstance(m, bool) for m in mult) or not all(
            isinstance(a, int) and not isinstance(a, bool) for a in attn_res):
        raise ScanError(f"{rel}: model.ch_mult and model.attn_resolutions must be lists of integers; fix the config")
    res, attn = size, []
    for _ in mult:  # the DDIM repo's Model: attention where the level's resolution is listed, then halve
        attn.append(res in attn_res)
        res //= 2
    said = {"block_out_channels": [ch * m for m in mult],
            "layers_per_block": _field(model, "num_res_blocks", int, rel, "model"),
            "in_channels": _field(model, "in_channels", int, rel, "model"),
            "out_channels": _field(model, "out_ch", int, rel, "model"),
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn]}
    for key, value in said.items():
        have = list(inferred[key]) if isinstance(value, list) else inferred[key]
        if have != value:
            raise ScanError(f"{rel} does not describe the checkpoint beside it: {key} is {value} by the config, "
                            f"{inferred[key]} in the weights; use the config.yml it was trained with, or --config")
    unet_cfg = {**inferred, "sample_size": size}
    kind = _field(diffusion, "beta_schedule", str, rel, "diffusion")
    if kind not in BETA_SCHEDULES:
        raise UnsupportedModelError(f"not supported yet: {rel} uses the DDIM repo's '{kind}' beta schedule (supported: "
                                    f"{', '.join(BETA_SCHEDULES)})")
    var = model.get("var_type", "fixedlarge")
    b0, b1 = (_field(diffusion, k, float, rel, "diffusion") for k in ("beta_start", "beta_end"))
    n = _field(diffusion, "num_diffusion_timesteps", int, rel, "diffusion")
    if not (0.0 < b0 < 1.0 and 0.0 < b1 < 1.0 and 1 <= n <= 100_000):
        raise ScanError(f"{rel}: diffusion.beta_start and beta_end must lie in (0, 1) and num_diffusion_timesteps in "
                        "1..100000; fix the config")
    sched_cfg = {"_class_name": "DDPMScheduler", "trained_betas": BETA_SCHEDULES[kind](b0, b1, n).tolist(),
                 "beta_start": b0, "beta_end": b1, "num_train_timesteps": n,
                 "prediction_type": "epsilon", "clip_sample": False,
                 "variance_type": "fixed_large" if var == "fixedlarge" else "fixed_small"}
    note = (f"{rel}: image size {size} px and noise schedule ({kind} betas {b0:g}..{b1:g}, {n} steps) from the "
            "DDIM repo's training config; its architecture matches the weights")
    return unet_cfg, sched_cfg, [note]


def _section(cfg: dict, key: str, rel: str) -> dict:
    sec = cfg.get(key)
    if not isinstance(sec, dict):
        raise ScanError(f"{rel}: no '{key}' section; not a DDIM-repo training config (pass --config with a UNet "
                        "config.json instead)")
    return sec


def _field(sec: dict, key: str, kind: type, rel: str, where: str):
    from .safety import _is_int, _is_number  # the config gate's own type checks

    v = sec.get(key)
    ok = _is_number(v) if kind is float else _is_int(v) if kind is int else isinstance(v, kind)
    if not ok:
        raise ScanError(f"{rel}: {where}.{key} must be {'a number' if kind is float else 'a ' + kind.__name__}, "
                        f"got {v!r:.40}; fix the config")
    return float(v) if kind is float else v


def to_diffusers(sd: dict, levels: int, rel: str = "checkpoint") -> dict:
    """DDIM-repo names -> UNet2DModel names; 1x1-conv attention weights reshaped to Linear."""
    out = {}
    for key, value in sd.items():
        new = _map_key(key, levels)
        if new is None:
            raise ScanError(f"{rel}: unexpected DDIM-repo weight {key!r:.80}; the checkpoint is not the DDIM repo's "
                            "Model, pass a diffusers model instead")
        if (".attentions." in new and new.rsplit(".", 1)[-1] == "weight" and value.dim() == 4
                and any(f".{n}." in new for n in ("to_q", "to_k", "to_v", "to_out.0"))):
            value = value.reshape(value.shape[0], value.shape[1])
        out[new] = value
    return out


def _map_key(key: str, levels: int) -> str | None:
    name, _, param = key.rpartition(".")
    if name in TOP:
        return f"{TOP[name]}.{param}"
    m = re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)", name)
    if m:
        side, lvl, kind, j, leaf = m.groups()
        lvl = int(lvl) if side == "down" else levels - 1 - int(lvl)
        table = RESNET if kind == "block" else ATTN
        if leaf not in table:
            return None
        return f"{side}_blocks.{lvl}.{'resnets' if kind == 'block' else 'attentions'}.{j}.{table[leaf]}.{param}"
    m = re.fullmatch(r"down\.(\d+)\.downsample\.conv", name)
    if m:
        return f"down_blocks.{m.group(1)}.downsamplers.0.conv.{param}"
    m = re.fullmatch(r"up\.(\d+)\.upsample\.conv", name)
    if m:
        return f"up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.conv.{param}"
    m = re.fullmatch(r"mid\.(block_1|block_2|attn_1)\.(\w+)", name)
    if m:
        part, leaf = m.groups()
        if part == "attn_1":
            return f"mid_block.attentions.0.{ATTN[leaf]}.{param}" if leaf in ATTN else None
        return f"mid_block.resnets.{0 if part == 'block_1' else 1}.{RESNET[leaf]}.{param}" if leaf in RESNET else None
    return None


def from_diffusers(unet_sd: dict, levels: int, prefix: str = "") -> dict:
    """The inverse mapping (UNet2DModel -> DDIM-repo names, attention as 1x1 convs): for fabricating
    DDIM-repo checkpoints in tests and demos."""
    inv_top = {v: k for k, v in TOP.items()}
    inv_res = {v: k for k, v in RESNET.items()}
    inv_attn = {v: k for k, v in ATTN.items()}
    out = {}
    for key, value in unet_sd.items():
        name, _, param = key.rpartition(".")
        new = None
        if name in inv_top:
            new = inv_top[name]
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
            side, lvl, kind, j, leaf = m.groups()
            lvl = int(lvl) if side == "down" else levels - 1 - int(lvl)
            leaf = (inv_res if kind == "resnets" else inv_attn)[leaf]
            new = f"{side}.{lvl}.{'block' if kind == 'resnets' else 'attn'}.{j}.{leaf}"
            if kind == "attentions" and param == "weight" and value.dim() == 2:
                value = value[:, :, None, None]
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name):
            new = f"down.{m.group(1)}.downsample.conv"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", name):
            new = f"up.{levels - 1 - int(m.group(1))}.upsample.conv"
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
            kind, j, leaf = m.groups()
            if kind == "resnets":
                new = f"mid.block_{int(j) + 1}.{inv_res[leaf]}"
            else:
                new = f"mid.attn_1.{inv_attn[leaf]}"
                if param == "weight" and value.dim() == 2:
                    value = value[:, :, None, None]
        if new is None:
            raise KeyError(f"no DDIM-repo name for {key}")
        out[f"{prefix}{new}.{param}"] = value.detach().clone().contiguous()
    return out


def save_ddim_checkpoint(path, unet, ema_unet=None, *, data_parallel: bool = False, epoch: int = 1,
                         step: int = 100) -> str:
    """Write `unet` (and `ema_unet`) as the DDIM repo's ckpt.pth list (for tests and demos)."""
    levels = len(unet.config.block_out_channels)
    prefix = "module." if data_parallel else ""
    model_sd = from_diffusers(unet.state_dict(), levels, prefix)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=2e-4)
    states = [model_sd, opt.state_dict(), epoch, step]
    if ema_unet is not None:
        states.append(from_diffusers(ema_unet.state_dict(), levels, prefix))
    torch.save(states, str(path))
    return str(path)


def count_levels(sd: dict, rel: str = "checkpoint") -> int:
    levels = _levels(sd, "down")
    if levels == 0:
        raise ScanError(f"{rel}: no down.N levels in the DDIM-repo checkpoint; it is incomplete")
    return levels
