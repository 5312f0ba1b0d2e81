"""One small interface over diffusion model families: the input shape, the noise schedule,
epsilon prediction, and the samplers the reversion and the report need.

Only what TERD needs is exposed, so reversion, detection and reporting stay one code path
whatever the family. The DDPM/DDIM family (UNet2DModel + a beta-schedule scheduler) is here;
other families raise UnsupportedModelError rather than being scanned wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UnsupportedModelError

# Schedulers whose config describes a DDPM-style beta schedule (alphas_cumprod from betas).
BETA_SCHEDULERS = {
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler",
    "DEISMultistepScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler",
}
NOT_YET = {
    "ScoreSdeVeScheduler": "score-SDE VE models (sigma schedule, no betas)",
    "KarrasVeScheduler": "Karras VE models",
    "CMStochasticIterativeScheduler": "consistency models",
    "EDMEulerScheduler": "EDM models",
    "FlowMatchEulerDiscreteScheduler": "flow-matching models",
}
PREDICTION_TYPES = {"epsilon", "v_prediction", "sample"}


@dataclass
class ModelInfo:
    """What the report says about the model family."""

    kind: str
    input_shape: tuple[int, int, int]
    num_train_timesteps: int
    prediction_type: str
    prior: str
    sampler: str
    parameters: int

    def to_dict(self) -> dict:
        return {"kind": self.kind, "input_shape": list(self.input_shape),
                "num_train_timesteps": self.num_train_timesteps, "prediction_type": self.prediction_type,
                "prior": self.prior, "sampler": self.sampler, "parameters": self.parameters}


class DDPMDenoiser:
    """A UNet2DModel with a beta noise schedule, seen as an epsilon predictor.

    The network is frozen (no weight gradients) and in eval mode: only the trigger learns.
    `evaluations` counts network evaluations in samples (a batch of 32 counts 32).
    """

    def __init__(self, unet, scheduler_config: dict, device: torch.device | str = "cpu"):
        from diffusers import DDIMScheduler, DDPMScheduler

        cls = scheduler_config.get("_class_name", "DDPMScheduler")
        if cls in NOT_YET:
            raise UnsupportedModelError(f"not supported yet: {NOT_YET[cls]} ({cls}); terd-scan scans DDPM/DDIM-family "
                                        "models with a beta schedule")
        if cls not in BETA_SCHEDULERS:
            raise UnsupportedModelError(f"not supported: unknown scheduler class {cls!r}; terd-scan scans DDPM/DDIM-family "
                                        "models with a beta schedule")
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon") or "epsilon"
        if self.prediction_type not in PREDICTION_TYPES:
            raise UnsupportedModelError(f"not supported: prediction_type {self.prediction_type!r} "
                                        f"(expected one of {sorted(PREDICTION_TYPES)})")
        cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        try:
            # Samplers get the checkpoint's own schedule, predict epsilon (converted below) and never
            # clip x0: clipping hides the backdoor and zeroes the trigger's gradients.
            common = dict(prediction_type="epsilon", clip_sample=False, thresholding=False)
            self.ddpm = DDPMScheduler.from_config(cfg, **common)
            self.ddim = DDIMScheduler.from_config(cfg, **common)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise UnsupportedModelError(f"not supported: scheduler config cannot be used ({exc})") from None
        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.alphas_cumprod = self.ddpm.alphas_cumprod.to(self.device, torch.float32)
        self.num_train_timesteps = int(self.ddpm.config.num_train_timesteps)
        c = unet.config
        if c.in_channels != c.out_channels:
            raise UnsupportedModelError(f"not supported: UNet with in_channels={c.in_channels} != out_channels="
                                        f"{c.out_channels} (learned-variance or conditional models)")
        size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)
        h, w = (size, size) if isinstance(size, int) else size
        self.input_shape = (int(c.in_channels), int(h), int(w))
        self.evaluations = 0

    def info(self) -> ModelInfo:
        return ModelInfo(kind="ddpm", input_shape=self.input_shape, num_train_timesteps=self.num_train_timesteps,
                         prediction_type=self.prediction_type, prior="N(0, I)",
                         sampler="DDIM (eta=0, no x0 clipping) for refinement; DDPM ancestral for previews",
                         parameters=sum(p.numel() for p in self.unet.parameters()))

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Epsilon prediction, converted from v or x0 prediction where the model predicts those."""
        out = self.unet(x, t).sample
        self.evaluations += x.shape[0]
        if self.prediction_type == "epsilon":
            return out
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        if self.prediction_type == "v_prediction":  # v = a*eps - s*x0, x = a*x0 + s*eps  =>  eps = a*v + s*x
            return a * out + s * x
        return (x - a * out) / s  # "sample": the network predicts x0

    def last_timesteps(self, n: int = 10) -> tuple[int, int]:
        """Inclusive range of the last n training timesteps (990..999 of 1000)."""
        return self.num_train_timesteps - n, self.num_train_timesteps - 1

    def ddim_sample(self, x_t: torch.Tensor, steps: int, checkpoint: bool = False) -> torch.Tensor:
        """Deterministic DDIM (eta=0) from x_T to x0. Differentiable: the graph is kept when
        gradients are enabled. `checkpoint` recomputes each network call in the backward pass
        (less memory, more time)."""
        sched = self.ddim
        sched.set_timesteps(steps, device=self.device)
        x = x_t
        for t in sched.timesteps:
            tt = t.expand(x.shape[0]).to(self.device)
            if checkpoint and torch.is_grad_enabled():
                e = torch.utils.checkpoint.checkpoint(self.eps, x, tt, use_reentrant=False)
            else:
                e = self.eps(x, tt)
            x = sched.step(e, t, x, eta=0.0).prev_sample
        return x

    @torch.no_grad()
    def ancestral_sample(self, x_t: torch.Tensor, steps: int | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM ancestral sampling (the sampler BadDiffusion and TrojDiff target), no x0 clipping."""
        sched = self.ddpm
        sched.set_timesteps(min(steps or self.num_train_timesteps, self.num_train_timesteps), device=self.device)
        x = x_t
        for t in sched.timesteps:
            e = self.eps(x, t.expand(x.shape[0]).to(self.device))
            x = sched.step(e, t, x, generator=generator).prev_sample
        return x


def make_denoiser(loaded, device: torch.device | str = "cpu") -> DDPMDenoiser:
    """Pick the adapter for a loaded model (see loading.LoadedModel)."""
    return DDPMDenoiser(loaded.unet, loaded.scheduler_config, device)
