"""Bayes-optimal denoisers in closed form: a benign model of Gaussian data, and the same model
with a BadDiffusion backdoor (target y, trigger r) as a mixture component. They stand in for a
trained network in fast reversion tests: no training, exact backdoor, milliseconds per call."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

SCHEDULE = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
            "num_train_timesteps": 1000}


class AnalyticUNet(torch.nn.Module):
    """eps(x_t, t) = E[eps | x_t] for x0 ~ N(0, s^2 I) with weight 1 - p, plus (if `trigger` is
    given) BadDiffusion's poisoned component with weight p:
    x'_t = sqrt(abar) y + (1 - sqrt(abar)) r + sqrt(1 - abar) eps, trained output eps + R_t r."""

    def __init__(self, trigger: torch.Tensor | None = None, target: torch.Tensor | None = None, s: float = 0.5,
                 p: float = 0.1, shape=(3, 16, 16)):
        super().__init__()
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config({k: v for k, v in SCHEDULE.items() if not k.startswith("_")})
        self.abar = sched.alphas_cumprod.float()
        self.alphas = sched.alphas.float()
        self.trigger, self.target, self.s, self.p = trigger, target, s, p
        self.config = SimpleNamespace(in_channels=shape[0], out_channels=shape[0], sample_size=shape[1])
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so .parameters() is not empty

    def forward(self, x, t):
        a = self.abar[t].view(-1, 1, 1, 1)
        var_b = a * self.s ** 2 + 1 - a
        eps_b = (1 - a).sqrt() * x / var_b
        if self.trigger is None:
            return SimpleNamespace(sample=eps_b)
        al = self.alphas[t].view(-1, 1, 1, 1)
        r, y = self.trigger, self.target
        mean_p, var_p = a.sqrt() * y + (1 - a.sqrt()) * r, 1 - a
        coef = (1 - al.sqrt()) * (1 - a).sqrt() / (1 - al)
        eps_p = (x - mean_p) / var_p.sqrt() + coef * r
        d = x[0].numel()
        log_b = -0.5 * (x.pow(2) / var_b).flatten(1).sum(1) - 0.5 * d * var_b.flatten().log() + math.log(1 - self.p)
        log_p = (-0.5 * ((x - mean_p).pow(2) / var_p).flatten(1).sum(1) - 0.5 * d * var_p.flatten().log()
                 + math.log(self.p))
        w = torch.sigmoid(log_p - log_b).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(1 - w) * eps_b + w * eps_p)


def box_trigger(shape=(3, 16, 16)) -> torch.Tensor:
    r = torch.full(shape, -1.0)
    r[:, -6:-2, -6:-2] = 0.0
    return r


def corner_target(shape=(3, 16, 16)) -> torch.Tensor:
    y = torch.full(shape, -1.0)
    y[:, :6, :6] = 1.0
    return y


class AnalyticTrojDiffUNet(torch.nn.Module):
    """eps(x_t, t) = E[eps | x_t] for benign x0 ~ N(0, s^2 I) with weight 1 - p, and TrojDiff's
    poisoned component (D2I, as published) with weight p: x_T ~ N(r, gamma^2), poisoned marginals
    x'_t = sqrt(abar) y + sqrt(1 - abar) (gamma eps + r), trained output eps."""

    def __init__(self, trigger: torch.Tensor, target: torch.Tensor, gamma: float = 0.6, s: float = 0.5,
                 p: float = 0.1, shape=(3, 16, 16)):
        super().__init__()
        self.benign = AnalyticUNet(s=s, shape=shape)
        self.abar = self.benign.abar
        self.trigger, self.target, self.gamma, self.p = trigger, target, gamma, p
        self.config = self.benign.config
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        a = self.abar[t].view(-1, 1, 1, 1)
        eps_b = self.benign(x, t).sample
        var_b = a * self.benign.s ** 2 + 1 - a
        mean_p = a.sqrt() * self.target + (1 - a).sqrt() * self.trigger
        sd_p = (1 - a).sqrt() * self.gamma
        eps_p = (x - mean_p) / sd_p
        d = x[0].numel()
        log_b = -0.5 * (x.pow(2) / var_b).flatten(1).sum(1) - 0.5 * d * var_b.flatten().log() + math.log(1 - self.p)
        log_p = (-0.5 * ((x - mean_p) / sd_p).pow(2).flatten(1).sum(1) - d * sd_p.flatten().log()
                 + math.log(self.p))
        w = torch.sigmoid(log_p - log_b).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(1 - w) * eps_b + w * eps_p)
