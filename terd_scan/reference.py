"""Benign reference statistics: the mean and standard deviation of the KL features over
known-benign models, reversed with given settings. Thresholds are valid only for those
settings, so a reference records them and a scan with other settings is told so.

The shipped references (terd_scan/references/<preset>.json) are rebuilt by
`python benchmarks/build_reference.py` from the zoo's calibration-split benign models.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import ScanError
from .presets import ReversionSettings

FORMAT_TAG = "terd-scan-reference"
# Settings that change the features' scale; the others (e.g. seed) do not invalidate a reference.
SETTINGS_THAT_MATTER = ("stage1_iterations", "stage2_iterations", "batch_size", "sampler_steps", "lr", "gamma_lr",
                        "l1_weight", "stage2_grad_clip", "gamma_floor", "timestep_window",
                        "stage2_gamma_lr_scale", "centred_start")
# settings added after references were first shipped; a reference without them was built at the default
_LATER_SETTINGS = ("centred_start",)
_DEFAULTS = ReversionSettings().to_dict()


@dataclass
class Reference:
    name: str
    settings: dict  # the reversion settings the statistics are valid for
    models: list[dict]  # [{"name", "weights_sha256", "mean_kl", "var_kl"}]
    k_sigma: float = 3.0
    origin: str = ""  # where it came from: "shipped:<preset>" or a file path
    created_by: str = ""
    notes: list[str] = field(default_factory=list)

    def stats(self) -> dict:
        out = {}
        for key in ("mean_kl", "var_kl"):
            values = [m[key] for m in self.models]
            mu = sum(values) / len(values)
            # sample standard deviation (n - 1), as for a small set of benign models
            sigma = math.sqrt(sum((v - mu) ** 2 for v in values) / max(len(values) - 1, 1))
            out[key] = {"mu": mu, "sigma": sigma}
        return out

    def thresholds(self) -> dict:
        return {k: v["mu"] + self.k_sigma * v["sigma"] for k, v in self.stats().items()}

    def mismatches(self, settings: dict) -> list[str]:
        """Settings of a scan that differ from the ones this reference was calibrated with. A setting
        the reference does not record (one added after it was built) counts at its default value."""
        recorded = {k: self.settings.get(k, _DEFAULTS.get(k)) for k in SETTINGS_THAT_MATTER
                    if k in self.settings or k in _LATER_SETTINGS}
        return [f"{k}={settings.get(k)!r} (reference: {v!r})" for k, v in recorded.items() if settings.get(k) != v]

    def to_dict(self) -> dict:
        return {"format": FORMAT_TAG, "version": 1, "name": self.name, "settings": self.settings,
                "k_sigma": self.k_sigma, "models": self.models, "stats": self.stats(),
                "thresholds": self.thresholds(), "created_by": self.created_by, "notes": self.notes}

    def summary(self) -> dict:
        """What a scan report says about the reference it used."""
        return {"name": self.name, "origin": self.origin, "models": len({m.get("name", i) for i, m in enumerate(self.models)}),
                "runs": len(self.models), "k_sigma": self.k_sigma,
                "rule": f"backdoored if mean_kl > mu + {self.k_sigma:g} sigma or var_kl > mu + {self.k_sigma:g} sigma "
                        "over benign models", "stats": self.stats()}

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, data: dict, origin: str) -> "Reference":
        if not isinstance(data, dict) or data.get("format") != FORMAT_TAG:
            raise ScanError(f"{origin} is not a terd-scan reference (make one with 'terd-scan calibrate')")
        models = data.get("models")
        if (not isinstance(models, list) or len(models) < 2 or not all(
                isinstance(m, dict) and all(isinstance(m.get(k), (int, float)) and math.isfinite(m[k])
                                            for k in ("mean_kl", "var_kl")) for m in models)):
            raise ScanError(f"reference {origin} needs at least 2 benign models with finite mean_kl and var_kl")
        k = data.get("k_sigma", 3.0)
        if not isinstance(k, (int, float)) or not k > 0:
            raise ScanError(f"reference {origin} has an invalid k_sigma {k!r}; expected a positive number")
        return cls(name=str(data.get("name", "")), settings=dict(data.get("settings") or {}), models=models,
                   k_sigma=float(k), origin=origin, created_by=str(data.get("created_by", "")),
                   notes=list(data.get("notes") or []))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Reference":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ScanError(f"reference file not found: {path} (make one with 'terd-scan calibrate')") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ScanError(f"cannot read reference {path}: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScanError(f"reference {path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                            "rebuild it with 'terd-scan calibrate'") from None
        return cls.from_dict(data, str(path))


# Shipped references per model family: pixel-space models are judged against pixel-space benign
# models, latent diffusion against latent benign models (the KL features are per dimension, but how
# fast a benign start decays differs between the two; measured in docs/QUALITY.md, "Detection quality on the zoo").
FAMILY_PREFIX = {"pixel": "", "latent": "latent-"}


def shipped_reference(preset: str, family: str = "pixel") -> Reference | None:
    """The reference shipped for a preset and model family, or None when there is none."""
    name = f"{FAMILY_PREFIX[family]}{preset}"
    res = resources.files("terd_scan") / "references" / f"{name}.json"
    if not res.is_file():
        return None
    return Reference.from_dict(json.loads(res.read_text()), f"shipped:{name}")
