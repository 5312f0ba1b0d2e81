"""The reversed trigger distribution N(r, gamma^2) and its file format (trigger.safetensors).

The file holds two float32 tensors shaped like the model input (C, H, W): "r" (mean) and
"gamma" (per-dimension standard deviation), plus string metadata. It is plain safetensors, so
reading it never runs code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ScanError

FORMAT_TAG = "terd-scan-trigger"
FORMAT_VERSION = "1"
# metadata["start"] of a trigger the sample-collapse search found (scan.judge_reversed): a noise shift that
# collapses the model's samples, not a reversed distribution of the attack's noises (input_detection warns)
COLLAPSE_START = "sample-collapse search"


@dataclass
class Trigger:
    r: torch.Tensor  # (C, H, W) mean of the poisoned noise distribution
    gamma: torch.Tensor  # (C, H, W) standard deviation, > 0
    metadata: dict = field(default_factory=dict)  # JSON-able: model, source, hashes, settings

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.r.shape)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a reader never sees a half-written file."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        meta = {"format": FORMAT_TAG, "version": FORMAT_VERSION,
                "metadata": json.dumps(self.metadata, sort_keys=True)}
        save_file({"r": self.r.detach().float().cpu().contiguous(),
                   "gamma": self.gamma.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trigger":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ScanError(f"trigger file not found: {path} (pass the trigger.safetensors written by 'terd-scan model')")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                keys = set(f.keys())
                if header.get("format") != FORMAT_TAG or not {"r", "gamma"} <= keys:
                    raise ScanError(f"{path} is not a terd-scan trigger file (expected tensors 'r' and 'gamma'); "
                                    "pass the trigger.safetensors written by 'terd-scan model'")
                r, gamma = f.get_tensor("r").float(), f.get_tensor("gamma").float()
        except (SafetensorError, OSError, ValueError) as exc:
            raise ScanError(f"cannot read trigger file {path}: {str(exc).splitlines()[0]} "
                            "(it is corrupt or not safetensors; re-run 'terd-scan model')") from None
        if r.shape != gamma.shape or r.dim() != 3:
            raise ScanError(f"trigger file {path} has r {tuple(r.shape)} and gamma {tuple(gamma.shape)}; "
                            "expected two (C, H, W) tensors of the same shape")
        if not (torch.isfinite(r).all() and torch.isfinite(gamma).all()) or (gamma <= 0).any():
            raise ScanError(f"trigger file {path} holds NaN/Inf or non-positive gamma; re-run 'terd-scan model'")
        try:
            metadata = json.loads(header.get("metadata", "{}"))
        except json.JSONDecodeError:
            metadata = {}
        return cls(r=r, gamma=gamma, metadata=metadata)
