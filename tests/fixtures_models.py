"""Tiny random UNet2DModel checkpoints in every layout terd-scan loads (seconds on a CPU, ~200 KB each).

    make_unet(seed)                 -> UNet2DModel (45 k params, 3x8x8)
    save_pipeline(dir, unet, ...)   -> model_index.json + unet/ + scheduler/   (DDPMPipeline.save_pretrained)
    save_flat(dir, unet, ...)       -> config.json + weights + scheduler_config.json + model_index.json at root
    save_bare(dir, unet, ...)       -> config.json + weights [+ scheduler_config.json]
    save_baddiffusion(dir, unet)    -> pipeline layout + a root config.json of training args + data.ckpt pickle
    write_evil_pickle(path, marker) -> a pickle whose __reduce__ would create `marker` if ever executed
"""

from __future__ import annotations

import json
import os
import pickle
import warnings

import torch

TINY_CONFIG = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                   norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None)


def _quiet():
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def make_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DModel

    _quiet()
    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY_CONFIG, **overrides}).eval()


def make_scheduler(kind: str = "DDPMScheduler", **kw):
    import diffusers

    return getattr(diffusers, kind)(beta_schedule="linear", **kw)


def save_pipeline(path, unet=None, scheduler=None, *, safe_serialization=True, pipeline="DDPMPipeline"):
    import diffusers

    _quiet()
    unet = unet if unet is not None else make_unet()
    scheduler = scheduler if scheduler is not None else make_scheduler()
    pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(path), safe_serialization=safe_serialization)
    return str(path)


def save_flat(path, unet=None, scheduler=None, *, safe_serialization=True, with_index=True):
    """google/ddpm-cifar10-32 layout: everything at the root."""
    _quiet()
    unet = unet if unet is not None else make_unet()
    scheduler = scheduler if scheduler is not None else make_scheduler()
    os.makedirs(path, exist_ok=True)
    unet.save_pretrained(str(path), safe_serialization=safe_serialization)
    scheduler.save_pretrained(str(path))
    if with_index:
        write_json(os.path.join(path, "model_index.json"),
                   {"_class_name": "DDPMPipeline", "_diffusers_version": "0.0.4",
                    "scheduler": ["diffusers", type(scheduler).__name__], "unet": ["diffusers", "UNet2DModel"]})
    return str(path)


def save_bare(path, unet=None, *, scheduler=None, safe_serialization=True):
    _quiet()
    unet = unet if unet is not None else make_unet()
    os.makedirs(path, exist_ok=True)
    unet.save_pretrained(str(path), safe_serialization=safe_serialization)
    if scheduler is not None:
        scheduler.save_pretrained(str(path))
    return str(path)


def save_baddiffusion(path, unet=None):
    """BadDiffusion/VillanDiffusion upload: pipeline folders plus a root config.json of *training args*
    and a pickle (data.ckpt) that must never be opened."""
    save_pipeline(path, unet)
    write_json(os.path.join(path, "config.json"),
               {"project": "BadDiffusion", "epoch": 50, "learning_rate": 0.0002, "trigger": "BOX_14",
                "target": "HAT", "poison_rate": 0.1, "ckpt": "DDPM-CIFAR10-32"})
    torch.save({"x": torch.zeros(2)}, os.path.join(path, "data.ckpt"))
    return str(path)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def read_json(path):
    with open(path) as f:
        return json.load(f)


class _Evil:
    """Unpickling this calls open(marker, 'w'): creates the marker file. Must never happen."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_evil_pickle(path, marker, *, torch_zip=False):
    """A 'checkpoint' whose unpickling would create `marker`; raw protocol-2+ pickle or torch zip."""
    obj = {"conv_in.weight": _Evil(marker)}
    if torch_zip:
        torch.save(obj, str(path))  # pickles __reduce__ into data.pkl inside a zip archive
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=4)
    assert not os.path.exists(marker)
    return str(path)
