"""One small interface over diffusion model families: the input shape, the noise schedule,
epsilon prediction, and the samplers the reversion and the report need.

Only what TERD needs is exposed, so reversion, detection and reporting stay one code path
whatever the family. The DDPM/DDIM family (UNet2DModel + a beta-schedule scheduler), latent diffusion
(the same on an autoencoder's latents), score-SDE VE models (NCSN++-style, seen through their
variance-preserving view) and consistency models (ConsistencyModelPipeline: UNet2DModel +
CMStochasticIterativeScheduler, seen through the same kind of view) are here; other families raise
UnsupportedModelError rather than being scanned wrongly.

Consistency models (ConsistencyDenoiser), the design in five points:

1. eps from the consistency function. diffusers' CM pipeline calls the UNet with the Karras/EDM
   preconditioning and applies the boundary-condition scalings in CMStochasticIterativeScheduler.step:
       f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, 250 ln sigma),
       c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),
       c_out  = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2),
       c_in   = 1 / sqrt(sigma^2 + sigma_data^2)          (sigma_data from the config, 0.5 by default),
   x in VE units (x_sigma = x0 + sigma z). f is the model's estimate of the trajectory's end x0, so the
   eps-prediction equivalent is eps(x, sigma) = (x - f(x, sigma)) / sigma (exactly what an x0-predicting
   diffusion model gives; 0 at sigma_min, where f(x) = x by construction).
2. The variance-preserving view, as VEDenoiser does for score-SDE VE: the timestep index t runs over the
   scheduler's own Karras grid of num_train_timesteps sigmas (rho from the config), ASCENDING (t = 0 is
   sigma_min, t = N - 1 is sigma_max; diffusers indexes it the other way round), abar_t = 1 / (1 + sigma_t^2),
   x_vp = x_ve / sqrt(1 + sigma_t^2). TERD's "last 10 / first 10 training steps" are the 10 largest / smallest
   sigmas of that grid (16.7..80 and 0.002..0.13 on the default 40-point grid).
3. The prior: the pipeline starts from N(0, sigma_max^2 I); triggers are reversed, judged and reported in
   normalised units x_ve / sqrt(1 + sigma_max^2), where the prior is N(0, I) up to sigma_max^2 / (1 + sigma_max^2)
   (0.99984 at sigma_max 80), so the KL features compare against N(0, I) like every other family. A trigger r
   in these units is the starting noise sigma_max (z + r) of the pipeline's latents.
4. The differentiable few-step sampler of stage 2 is multistep consistency sampling on the scheduler's own
   sigma sequence (CMStochasticIterativeScheduler.set_timesteps(k)): x0 = f(x, sigma_1), then re-noise
   x = x0 + s_noise sqrt(sigma_{i+1}^2 - sigma_min^2) z and apply f again; k = min(sampler_steps, 4), the
   fresh noise z from the denoiser's own seeded generator (deterministic per scan), never clipped
   (clip_denoised is ignored: clipping hides the backdoor and zeroes the trigger's gradients). The
   gradient flows through every f into r. Previews use the pipeline's default one-step sampler.
5. Unconditional only: a class-conditional UNet (num_class_embeds / class_embed_type set, e.g.
   openai/diffusers-cd_imagenet64_*) is refused by the loading gate, never scanned with a made-up label.

Measured limit (examples/zoo-families/cm-*, README): with this exact eps the noise part of the residual
e - eps(x~) cancels analytically, so TERD's pair loss near sigma_max is only the spread of f over the two
noises divided by sigma^2 (0.0098 at the paper's start r = -U[0,1) on cm-benign, gradient norm 0.0012, against
11.2 and 0.85 on the DDPM zoo's benign-a, whose loss there is the eps network's own error off its training
distribution). With the presets' SGD settings r stays at its start, so the features of a CM are those of
the start (M_r about 0.17) whether or not it is backdoored: under `fast` both zoo CMs are flagged.
Rescaling the loss by sigma^2 does not cure it: the benign CM's f collapses off its data, so its spread
also falls as r grows and a descent pushes r outward on both (benchmarks/cm_loss_scale.py).
So a CM's verdict is the one-step sample-collapse search's (collapse_search.py, scan.judge_reversed); checked on
tiny zoo CMs only (four blind holdouts, docs/QUALITY.md "Consistency models"), so CM_CAVEAT, with its measured
misses, is in every CM report's warnings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UnsupportedModelError
from .safety import CM_SCHEDULERS, SUPPORTED_SCHEDULERS, VE_SCHEDULERS


def graph_call(fn, *args, checkpoint: bool = False):
    """fn(*args); with `checkpoint` and gradients on, recomputed in the backward pass instead of keeping its
    activations (a differentiable sampler's network calls: less memory, one more forward pass each)."""
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# The scheduler classes terd-scan knows are defined once, in the serialization gate: beta
# schedules (alphas_cumprod from betas) and score-SDE VE schedules.
BETA_SCHEDULERS = SUPPORTED_SCHEDULERS
NOT_YET = {
    "KarrasVeScheduler": "Karras VE models",
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
    caveat: str | None = None  # a known limit of the scan on this family, for the report

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "input_shape": list(self.input_shape),
             "num_train_timesteps": self.num_train_timesteps, "prediction_type": self.prediction_type,
             "prior": self.prior, "sampler": self.sampler, "parameters": self.parameters}
        if self.latent is not None:
            d["latent"] = self.latent
        if self.caveat is not None:
            d["caveat"] = self.caveat
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
        if cls in CM_SCHEDULERS:
            raise UnsupportedModelError(f"{cls} is a consistency-model schedule: use ConsistencyDenoiser "
                                        "(make_denoiser picks it)")
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
            e = graph_call(self.eps, x, tt, checkpoint=checkpoint)
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
            e = graph_call(self.eps, x, tt, checkpoint=checkpoint)
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


CM_KIND = "consistency model"
CM_MAX_SAMPLER_STEPS = 4  # multistep consistency sampling in stage 2: 1..4 steps
CM_CAVEAT = ("a consistency model's verdict comes from the one-step sample-collapse search alone (TERD's KL route does "
             "not hold on a CM), checked on tiny zoo CMs only: no benign one of 11 flagged; of 10 backdoors 8 found "
             "with a trigger that fires, 1 flagged without its trigger (a tricolour glyph), 1 missed (a stop-sign "
             "glyph on zero); multi-coloured glyph triggers are its known weak spot, so a clean verdict is weaker "
             "evidence than on a DDPM model")


def _cm_config(scheduler_config: dict) -> dict:
    """The CMStochasticIterativeScheduler fields the consistency function needs (diffusers' defaults)."""
    cfg = scheduler_config
    out = {"sigma_min": float(cfg.get("sigma_min", 0.002)), "sigma_max": float(cfg.get("sigma_max", 80.0)),
           "sigma_data": float(cfg.get("sigma_data", 0.5)), "rho": float(cfg.get("rho", 7.0)),
           "s_noise": float(cfg.get("s_noise", 1.0)), "n": int(cfg.get("num_train_timesteps", 40))}
    ok = (0.0 < out["sigma_min"] < out["sigma_max"] < 1e8 and 0.0 < out["sigma_data"] < 1e8
          and 0.0 < out["rho"] < 1e3 and 0.0 <= out["s_noise"] < 1e3 and out["n"] >= 2)
    if not ok:
        raise UnsupportedModelError(f"not supported: CMStochasticIterativeScheduler config with sigma_min="
                                    f"{out['sigma_min']}, sigma_max={out['sigma_max']}, sigma_data={out['sigma_data']}, "
                                    f"rho={out['rho']}, num_train_timesteps={out['n']} (need 0 < sigma_min < "
                                    "sigma_max, sigma_data > 0, rho > 0, at least 2 steps)")
    return out


class ConsistencyDenoiser:
    """A consistency model (ConsistencyModelPipeline: UNet2DModel with a positional time embedding, called
    with c_in(sigma) x and 250 ln sigma; CMStochasticIterativeScheduler) seen as a variance-preserving
    epsilon predictor: see points 1-5 of the module docstring. Timestep indices t run over the scheduler's
    Karras grid in ascending sigma; inputs of eps() are in normalised (VP-view) units."""

    def __init__(self, unet, scheduler_config: dict, device: torch.device | str = "cpu"):
        c = unet.config
        if getattr(c, "time_embedding_type", "positional") == "fourier":
            raise UnsupportedModelError("not supported: CMStochasticIterativeScheduler with a Fourier-embedding UNet; "
                                        "diffusers' consistency pipeline calls the UNet with 250 ln sigma, which a "
                                        "Fourier embedding cannot take (negative for sigma < 1)")
        if c.in_channels != c.out_channels:
            raise UnsupportedModelError(f"not supported: UNet with in_channels={c.in_channels} != out_channels="
                                        f"{c.out_channels}")
        if getattr(c, "num_class_embeds", None) is not None or getattr(c, "class_embed_type", None) is not None:
            raise UnsupportedModelError("not supported: class-conditional consistency model (num_class_embeds set); "
                                        "terd-scan scans unconditional models only")
        cm = _cm_config(scheduler_config)
        self.sigma_min, self.sigma_max, self.sigma_data = cm["sigma_min"], cm["sigma_max"], cm["sigma_data"]
        self.rho, self.s_noise, n = cm["rho"], cm["s_noise"], cm["n"]
        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        sig = self._karras(torch.linspace(0, 1, n, dtype=torch.float64)).flip(0)  # ascending
        self.sigmas = sig.to(self.device, torch.float32)
        self.scales = (1 + sig ** 2).sqrt().to(self.device, torch.float32)  # sqrt(1 + sigma^2) = 1 / sqrt(abar)
        self.alphas_cumprod = (1 / (1 + sig ** 2)).to(self.device, torch.float32)
        self.num_train_timesteps = n
        self.prediction_type = "consistency"
        size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)
        h, w = (size, size) if isinstance(size, int) else size
        self.input_shape = (int(c.in_channels), int(h), int(w))
        self.evaluations = 0
        # the fresh noise of multistep sampling: seeded, so a scan is deterministic given its seed
        self._noise = torch.Generator(device=self.device).manual_seed(0)

    def _karras(self, ramp: torch.Tensor) -> torch.Tensor:
        """diffusers' _convert_to_karras: ramp 0 -> sigma_max, ramp 1 -> sigma_min (float64)."""
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (hi + ramp * (lo - hi)) ** self.rho

    def info(self) -> ModelInfo:
        return ModelInfo(kind=CM_KIND, input_shape=self.input_shape, num_train_timesteps=self.num_train_timesteps,
                         prediction_type="consistency function f(x, sigma) (eps = (x - f) / sigma)",
                         prior="N(0, sigma_max^2 I) (normalised to N(0, I))",
                         sampler=(f"multistep consistency sampling (min(sampler_steps, {CM_MAX_SAMPLER_STEPS}) steps of "
                                  "the scheduler's sigma sequence, no clipping) for refinement; one-step consistency "
                                  f"sampling (the pipeline's default, no clipping) for previews; Karras sigma "
                                  f"{self.sigma_min:g}..{self.sigma_max:g}, rho {self.rho:g}, sigma_data "
                                  f"{self.sigma_data:g}, {self.num_train_timesteps}-point grid"),
                         parameters=sum(p.numel() for p in self.unet.parameters()), caveat=CM_CAVEAT)

    def normalise_noise(self, x_ve: torch.Tensor) -> torch.Tensor:
        """A starting noise of the pipeline (std sigma_max) in the normalised units triggers are reported in."""
        return x_ve / self.scales[-1]

    def consistency(self, x_ve: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """f(x, sigma) in VE units, as CMStochasticIterativeScheduler.step computes it (no clipping)."""
        s = sigma.view(-1, 1, 1, 1)
        sd, smin = self.sigma_data, self.sigma_min
        c_skip = sd ** 2 / ((s - smin) ** 2 + sd ** 2)
        c_out = (s - smin) * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        out = self.unet(c_in * x_ve, 250.0 * torch.log(sigma)).sample
        self.evaluations += x_ve.shape[0]
        return c_skip * x_ve + c_out * out

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """VP-view epsilon at grid indices t (x in normalised units): (x_ve - f(x_ve, sigma)) / sigma."""
        sigma = self.sigmas[t]
        x_ve = x * self.scales[t].view(-1, 1, 1, 1)
        return (x_ve - self.consistency(x_ve, sigma)) / sigma.view(-1, 1, 1, 1)

    def last_timesteps(self, n: int = 10) -> tuple[int, int]:
        return max(0, self.num_train_timesteps - n), self.num_train_timesteps - 1

    def sampling_sigmas(self, steps: int) -> list[float]:
        """The sigmas of CMStochasticIterativeScheduler.set_timesteps(steps), largest first."""
        n = self.num_train_timesteps
        steps = max(1, min(int(steps), n))
        idx = torch.arange(steps, dtype=torch.float64) * (n // steps)
        return [float(s) for s in self._karras(idx / (n - 1))]

    def ddim_sample(self, x_t: torch.Tensor, steps: int, checkpoint: bool = False) -> torch.Tensor:
        """Multistep consistency sampling, min(steps, CM_MAX_SAMPLER_STEPS) steps, from normalised x_t to data
        units, no clipping. Differentiable; `checkpoint` recomputes each network call in the backward pass."""
        grid = self.sampling_sigmas(min(int(steps), CM_MAX_SAMPLER_STEPS))
        x = x_t * self.scales[-1]
        x0 = x
        for i, s in enumerate(grid):
            sigma = torch.full((x.shape[0],), s, device=self.device, dtype=torch.float32)
            x0 = graph_call(self.consistency, x, sigma, checkpoint=checkpoint)
            if i + 1 < len(grid):
                z = torch.randn(x.shape, generator=self._noise, device=self.device, dtype=x.dtype)
                x = x0 + self.s_noise * math.sqrt(max(grid[i + 1] ** 2 - self.sigma_min ** 2, 0.0)) * z
        return x0

    def one_step_sample(self, x_t: torch.Tensor) -> torch.Tensor:
        """The pipeline's default one-step consistency sampling (what a CM backdoor targets), x0 = f(x_T,
        sigma_max), no clipping; x_t in normalised units, the result in data units. Differentiable."""
        x = x_t * self.scales[-1]
        return self.consistency(x, torch.full((x.shape[0],), self.sigma_max, device=self.device))

    @torch.no_grad()
    def ancestral_sample(self, x_t: torch.Tensor, steps: int | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Previews: one-step consistency sampling (`steps` and `generator` are unused: one step)."""
        return self.one_step_sample(x_t)


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
    ConsistencyDenoiser for CMStochasticIterativeScheduler, LatentDenoiser when there is an autoencoder
    (LDMPipeline), DDPMDenoiser for beta schedules."""
    if loaded.scheduler_config.get("_class_name") in VE_SCHEDULERS:
        return VEDenoiser(loaded.unet, loaded.scheduler_config, device)
    if loaded.scheduler_config.get("_class_name") in CM_SCHEDULERS:
        return ConsistencyDenoiser(loaded.unet, loaded.scheduler_config, device)
    if getattr(loaded, "autoencoder", None) is not None:
        return LatentDenoiser(loaded.unet, loaded.scheduler_config, loaded.autoencoder, device)
    return DDPMDenoiser(loaded.unet, loaded.scheduler_config, device)
