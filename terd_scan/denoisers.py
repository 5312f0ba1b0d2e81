"""One small interface over diffusion model families: the input shape, the noise schedule,
epsilon prediction, and the samplers the reversion and the report need.

Only what TERD needs is exposed, so reversion, detection and reporting stay one code path
whatever the family. The DDPM/DDIM family (UNet2DModel + a beta-schedule scheduler), latent diffusion
(the same on an autoencoder's latents) and score-SDE VE models (NCSN++-style, seen through their
variance-preserving view) are here; other families raise
UnsupportedModelError rather than being scanned wrongly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UnsupportedModelError
from .safety import SUPPORTED_SCHEDULERS, VE_SCHEDULERS

# The scheduler classes terd-scan knows are defined once, in the serialization gate: beta
# schedules (alphas_cumprod from betas) and score-SDE VE schedules.
BETA_SCHEDULERS = SUPPORTED_SCHEDULERS
NOT_YET = {
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
    latent: dict | None = None  # latent diffusion: latent shape, autoencoder, scaling, decoded image shape

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "input_shape": list(self.input_shape),
             "num_train_timesteps": self.num_train_timesteps, "prediction_type": self.prediction_type,
             "prior": self.prior, "sampler": self.sampler, "parameters": self.parameters}
        if self.latent is not None:
            d["latent"] = self.latent
        return d


class DDPMDenoiser:
    """A UNet2DModel with a beta noise schedule, seen as an epsilon predictor.

    The network is frozen (no weight gradients) and in eval mode: only the trigger learns.
    `evaluations` counts network evaluations in samples (a batch of 32 counts 32).
    """

    def __init__(self, unet, scheduler_config: dict, device: torch.device | str = "cpu"):
        from diffusers import DDIMScheduler, DDPMScheduler

        cls = scheduler_config.get("_class_name", "DDPMScheduler")
        if cls in VE_SCHEDULERS:
            raise UnsupportedModelError(f"{cls} is a score-SDE VE schedule: use VEDenoiser (make_denoiser picks it)")
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

    def normalise_noise(self, x: torch.Tensor) -> torch.Tensor:
        """Starting noise in the units triggers are reported in (the identity for DDPM models)."""
        return x

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


def _ve_grid(scheduler_config: dict) -> tuple[float, float, int]:
    cfg = scheduler_config
    smin, smax = float(cfg.get("sigma_min", 0.01)), float(cfg.get("sigma_max", 1348.0))
    n = int(cfg.get("num_train_timesteps", 2000))
    if not (0.0 < smin < smax and smax < 1e8 and n >= 2):
        raise UnsupportedModelError(f"not supported: ScoreSdeVeScheduler config with sigma_min={smin}, sigma_max={smax}, "
                                    f"num_train_timesteps={n} (need 0 < sigma_min < sigma_max, at least 2 steps)")
    return smin, smax, n


class VEDenoiser:
    """A score-SDE VE model (NCSN++-style UNet2DModel with a Fourier time embedding, called with sigma,
    returning the score) seen as a variance-preserving epsilon predictor, so that reversion, the KL
    features and input detection are the same code as for DDPM models.

    VE: x_ve = x0 + sigma eps, sigma on the geometric grid sigma_min .. sigma_max of
    num_train_timesteps points (index 0 = sigma_min, as ScoreSdeVeScheduler.discrete_sigmas).
    VP view: x_vp = x_ve / sqrt(1 + sigma^2), abar = 1 / (1 + sigma^2), so
    x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps, and
    eps_vp(x_vp, t) = -sigma_t * score(x_vp * sqrt(1 + sigma_t^2), sigma_t).
    The VE prior N(0, sigma_max^2 I) is N(0, I) in these normalised units (up to sigma_max^2 / (1 + sigma_max^2)),
    so a trigger (r, gamma) is reported in normalised units: a VE starting noise x_ve corresponds to
    x_ve / sqrt(1 + sigma_max^2) (see normalise_noise).
    """

    def __init__(self, unet, scheduler_config: dict, device: torch.device | str = "cpu"):
        c = unet.config
        if getattr(c, "time_embedding_type", "positional") != "fourier":
            raise UnsupportedModelError("not supported: ScoreSdeVeScheduler with a UNet without a Fourier time embedding "
                                        "(NCSN++ models are called with sigma); terd-scan cannot tell what its "
                                        "timestep input means")
        if c.in_channels != c.out_channels:
            raise UnsupportedModelError(f"not supported: UNet with in_channels={c.in_channels} != out_channels="
                                        f"{c.out_channels}")
        self.sigma_min, self.sigma_max, n = _ve_grid(scheduler_config)
        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        sig = torch.exp(torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), n, dtype=torch.float64))
        self.sigmas = sig.to(self.device, torch.float32)
        self.scales = (1 + sig ** 2).sqrt().to(self.device, torch.float32)  # sqrt(1 + sigma^2) = 1 / sqrt(abar)
        self.alphas_cumprod = (1 / (1 + sig ** 2)).to(self.device, torch.float32)
        self.num_train_timesteps = n
        self.prediction_type = "score"
        size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)
        h, w = (size, size) if isinstance(size, int) else size
        self.input_shape = (int(c.in_channels), int(h), int(w))
        self.evaluations = 0

    def info(self) -> ModelInfo:
        return ModelInfo(kind="score-sde-ve", input_shape=self.input_shape, num_train_timesteps=self.num_train_timesteps,
                         prediction_type="score (eps = -sigma * score)",
                         prior="N(0, sigma_max^2 I) (normalised to N(0, I))",
                         sampler=(f"DDIM (eta=0) on the VP view (Euler steps of the probability-flow ODE in sigma) for "
                                  f"refinement; VE reverse-diffusion predictor (no corrector, no clamp) for previews; "
                                  f"sigma {self.sigma_min:g}..{self.sigma_max:g}"),
                         parameters=sum(p.numel() for p in self.unet.parameters()))

    def normalise_noise(self, x_ve: torch.Tensor) -> torch.Tensor:
        """A VE starting noise (std sigma_max) in the normalised units triggers are reported in."""
        return x_ve / self.scales[-1]

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """VP-view epsilon at grid indices t (x in normalised units)."""
        sigma = self.sigmas[t]
        score = self.unet(x * self.scales[t].view(-1, 1, 1, 1), sigma).sample
        self.evaluations += x.shape[0]
        return -sigma.view(-1, 1, 1, 1) * score

    def last_timesteps(self, n: int = 10) -> tuple[int, int]:
        return self.num_train_timesteps - n, self.num_train_timesteps - 1

    def _grid(self, steps: int) -> list[int]:
        steps = max(1, min(int(steps), self.num_train_timesteps))
        return [int(i) for i in torch.linspace(self.num_train_timesteps - 1, 0, steps).round().long()]

    def ddim_sample(self, x_t: torch.Tensor, steps: int, checkpoint: bool = False) -> torch.Tensor:
        """Deterministic DDIM (eta=0) on the VP view, from the top of the grid to sigma = 0 (data units).
        Differentiable; `checkpoint` recomputes each network call in the backward pass."""
        grid = self._grid(steps)
        x = x_t
        for i, t in enumerate(grid):
            tt = torch.full((x.shape[0],), t, device=self.device, dtype=torch.long)
            if checkpoint and torch.is_grad_enabled():
                e = torch.utils.checkpoint.checkpoint(self.eps, x, tt, use_reentrant=False)
            else:
                e = self.eps(x, tt)
            a_t = self.alphas_cumprod[t]
            a_p = self.alphas_cumprod[grid[i + 1]] if i + 1 < len(grid) else torch.ones((), device=self.device)
            x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
            x = a_p.sqrt() * x0 + (1 - a_p).sqrt() * e
        return x

    @torch.no_grad()
    def ancestral_sample(self, x_t: torch.Tensor, steps: int | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """The VE reverse-diffusion predictor (ScoreSdeVeScheduler.step_pred, no corrector, no clamp) on
        `steps` sigmas of the grid; x_t in normalised units, the result in data units."""
        grid = self._grid(steps or self.num_train_timesteps)
        x = x_t * self.scales[grid[0]]
        for i, t in enumerate(grid):
            sigma = self.sigmas[t]
            prev = self.sigmas[grid[i + 1]] if i + 1 < len(grid) else torch.zeros((), device=self.device)
            score = self.unet(x, sigma.expand(x.shape[0])).sample
            self.evaluations += x.shape[0]
            d = sigma ** 2 - prev ** 2
            x = x + d * score
            if i + 1 < len(grid):
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + d.sqrt() * z
        return x


LATENT_KIND = "latent diffusion (LDM)"


class LatentDenoiser(DDPMDenoiser):
    """A latent diffusion model (LDMPipeline): the DDPM denoiser on the UNet's latents, plus the
    autoencoder's decoder to show what latents become.

    The backdoor threat model is the same one level down: the starting noise is a latent
    z_T ~ N(0, I), so the trigger (r, gamma) is reversed, judged and used for input detection in
    latent space, in the units the UNet sees (VQModel latents unscaled; AutoencoderKL latents
    multiplied by scaling_factor). Only the previews are decoded: images = decode(z / s + shift).
    """

    def __init__(self, unet, scheduler_config: dict, autoencoder, device: torch.device | str = "cpu"):
        super().__init__(unet, scheduler_config, device)
        self.autoencoder = autoencoder
        self.vae = autoencoder.model.to(self.device).eval().requires_grad_(False)
        c, h, w = self.input_shape
        f = autoencoder.downsample
        self.image_shape = (int(autoencoder.config.get("out_channels", 3)), h * f, w * f)

    def info(self) -> ModelInfo:
        ae = self.autoencoder
        scaling = ("none (VQModel latents are used unscaled)" if ae.class_name == "VQModel" else
                   (f"latents = (encode(x) - {ae.shift_factor:g}) * {ae.scaling_factor:g}" if ae.shift_factor
                    else f"latents = encode(x) * {ae.scaling_factor:g}"))
        return ModelInfo(kind=LATENT_KIND, input_shape=self.input_shape, num_train_timesteps=self.num_train_timesteps,
                         prediction_type=self.prediction_type, prior="N(0, I) in latent space",
                         sampler=("DDIM (eta=0, no x0 clipping) on latents for refinement; DDPM ancestral on latents, "
                                  f"decoded with the {ae.class_name}, for previews"),
                         parameters=sum(p.numel() for p in self.unet.parameters()),
                         latent={"latent_shape": list(self.input_shape), "autoencoder": ae.class_name,
                                 "component": ae.component, "scaling": scaling,
                                 "scaling_factor": ae.scaling_factor, "shift_factor": ae.shift_factor,
                                 "decoded_shape": list(self.image_shape),
                                 "autoencoder_parameters": sum(p.numel() for p in self.vae.parameters())})

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """Latents (UNet units) -> images in [-1, 1] (not clamped), as the pipeline decodes them
        (a VQModel quantises to its codebook first)."""
        ae = self.autoencoder
        out = []
        for z in latents.to(self.device).split(batch):
            out.append(self.vae.decode(z / ae.scaling_factor + ae.shift_factor).sample)
        return torch.cat(out) if out else latents.new_zeros((0, *self.image_shape))


def make_denoiser(loaded, device: torch.device | str = "cpu"):
    """Pick the adapter for a loaded model (see loading.LoadedModel): VEDenoiser for ScoreSdeVeScheduler,
    LatentDenoiser when there is an autoencoder (LDMPipeline), DDPMDenoiser for beta schedules."""
    if loaded.scheduler_config.get("_class_name") in VE_SCHEDULERS:
        return VEDenoiser(loaded.unet, loaded.scheduler_config, device)
    if getattr(loaded, "autoencoder", None) is not None:
        return LatentDenoiser(loaded.unet, loaded.scheduler_config, loaded.autoencoder, device)
    return DDPMDenoiser(loaded.unet, loaded.scheduler_config, device)
