"""Model-level detection: KL features of the reversed trigger distribution and the verdict.

Per dimension i, KL_i = KL(N(r_i, gamma_i^2) || N(0, 1)) = -log gamma_i + (gamma_i^2 + r_i^2 - 1) / 2.
M_r is the mean of KL_i over dimensions and V_r its (population) variance; both are per-dimension,
so they do not depend on image size. A backdoored model's trigger moves the distribution far from
the benign prior: a dense trigger raises M_r, a sparse patch raises V_r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import Reference

BACKDOORED, CLEAN = "backdoored", "clean"


def kl_per_dimension(r: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    r, gamma = r.double(), gamma.double()
    return -gamma.log() + (gamma.pow(2) + r.pow(2) - 1) / 2


@dataclass(frozen=True)
class Features:
    mean_kl: float  # M_r
    var_kl: float  # V_r

    def to_dict(self) -> dict:
        return {"mean_kl": self.mean_kl, "var_kl": self.var_kl}


def kl_features(r: torch.Tensor, gamma: torch.Tensor) -> Features:
    kl = kl_per_dimension(r, gamma).flatten()
    return Features(mean_kl=float(kl.mean()), var_kl=float(kl.var(unbiased=False)))


@dataclass(frozen=True)
class Verdict:
    verdict: str  # BACKDOORED or CLEAN
    reasons: list[str]  # which feature(s) crossed which threshold

    @property
    def backdoored(self) -> bool:
        return self.verdict == BACKDOORED


def trigger_held(basin) -> bool:
    """Whether a KL over the thresholds counts as a flag: always without a basin test (basin None: the
    gate is off), else only where TERD's objective holds the reversed trigger. The one place the gate's
    rule lives: judge() and the quality benchmark's scores (benchmarks/quality.py) both ask it."""
    return basin is None or bool(basin.basin)


def judge(features: Features, reference: Reference, basin=None) -> Verdict:
    """The paper's benign-only rule: flag when M_r > mu_M + k sigma_M or V_r > mu_V + k sigma_V. With a
    basin test (basin_test.BasinTest or its BasinOutcome, settings.basin_gate: on in `standard`), a KL over the thresholds flags only
    a reversed trigger that TERD's objective holds; otherwise the verdict is clean and the reasons say why."""
    th = reference.thresholds()
    reasons = []
    if features.mean_kl > th["mean_kl"]:
        reasons.append(f"mean KL {features.mean_kl:.4g} > threshold {th['mean_kl']:.4g}")
    if features.var_kl > th["var_kl"]:
        reasons.append(f"KL variance {features.var_kl:.4g} > threshold {th['var_kl']:.4g}")
    if reasons and not trigger_held(basin):
        return Verdict(CLEAN, [*reasons, f"but TERD's objective does not hold the reversed trigger (on the line from "
                                         f"N(0, I) through it, barrier {basin.barrier:.3g} before it and wall "
                                         f"{basin.wall:.3g} beyond it, neither above {basin.min_barrier:g}): "
                                         "a drift of the benign optimum, not a trigger"])
    return Verdict(BACKDOORED if reasons else CLEAN, reasons)
