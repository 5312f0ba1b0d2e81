"""The report's sample images: DDPM samples from benign noise and from the recovered trigger.

A backdoor maps its trigger distribution N(r, gamma^2) to one target image, so samples from a
recovered trigger collapse while samples from benign noise stay diverse. The spread ratio puts a
number on it (the mean pairwise L2 distance of the trigger's samples over the benign samples',
the same starting noises). It is not in the verdict or the report: benchmarks/trigger_fires.py
measured it on the zoo (benchmarks/results/trigger-fires-fast.md) and found it no fit for either.
With the report's 6 samples the benign models spread 0.73-1.17, overlapping a partial collapse;
and an attack aimed at another sampler does not fire in DDPM samples (trojdiff-blend's trigger,
recovered with cosine 0.69, spreads 7.4 under DDPM: its backdoor fires under TrojDiff's sampler).
So where the recovered noise is narrowed (gamma mean under NARROW_GAMMA, TrojDiff's signature) a third sample row
samples the same trigger noises with TrojDiff's own sampler, which is what such an attacker samples with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# A reversed trigger whose gamma mean is below this is narrowed noise, TrojDiff's signature: on the pixel zoo
# under `standard` benign, BadDiffusion and VillanDiffusion triggers reverse to gamma means 0.92-1.08, TrojDiff's
# to 0.56-0.80 (the gamma_mean column of benchmarks/results/quality-fast-standard.json).
NARROW_GAMMA = 0.9


@dataclass
class Previews:
    benign: torch.Tensor  # (n, C, H, W) images sampled from N(0, I), on the CPU
    trigger: torch.Tensor  # (n, C, H, W) images sampled from N(r, gamma^2), the same noises
    steps: int  # DDPM ancestral steps
    trojan: torch.Tensor | None = None  # the same trigger noises through TrojDiff's sampler, where gamma is narrowed

    @property
    def spread_ratio(self) -> float:
        """Mean pairwise distance of the trigger's samples over the benign samples' (see module doc)."""
        return sample_spread(self.trigger) / max(sample_spread(self.benign), 1e-12)


def sample_spread(x: torch.Tensor) -> float:
    """Mean L2 distance between distinct samples of a batch (n >= 2)."""
    flat = x.flatten(1).double()
    n = flat.shape[0]
    if n < 2:
        raise ValueError(f"a spread needs at least 2 samples, got {n}")
    return float(torch.cdist(flat, flat).sum() / (n * (n - 1)))


def trojan_steps(eps, abar: torch.Tensor, timesteps, x_T: torch.Tensor, r: torch.Tensor, gamma,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """TrojDiff's ancestral sampler for a network trained on the poisoned marginals
    x_t = sqrt(abar_t) y + s_t (gamma eps + r), s_t = sqrt(1 - abar_t), over the descending `timesteps`
    (eps(x, t) the network's prediction at integer timestep t, abar the cumulative alphas). Each step predicts
    y^ = (x_t - s_t (gamma eps^ + r)) / sqrt(abar_t) and draws
        x_p = sqrt(abar_p) y^ + s_p r + sqrt(gamma^2 s_p^2 - v) eps^ + sqrt(v) z,  v = gamma^2 (1 - abar_t / abar_p) s_p^2 / s_t^2:
    the eta = 1 member of the DDIM family on those marginals, which with gamma = 1 and r = 0 is DDPM's
    ancestral step (tested). No x0 clipping."""
    x = x_T
    ts = [int(t) for t in timesteps]
    for i, t in enumerate(ts):
        a_t = abar[t]
        a_p = abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(a_t)
        s_t, s_p = (1.0 - a_t).sqrt(), (1.0 - a_p).sqrt()
        e = eps(x, t)
        y = (x - s_t * (gamma * e + r)) / a_t.sqrt()
        var = gamma ** 2 * (1.0 - a_t / a_p) * s_p ** 2 / s_t ** 2
        x = a_p.sqrt() * y + s_p * r + (gamma ** 2 * s_p ** 2 - var).clamp_min(0.0).sqrt() * e
        if i + 1 < len(ts):
            x = x + var.sqrt() * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


@torch.no_grad()
def trojan_sample(denoiser, x_T: torch.Tensor, r: torch.Tensor, gamma: torch.Tensor, steps: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """TrojDiff's sampler (trojan_steps) on a DDPM-family denoiser, on the timesteps its DDPM ancestral sampler
    uses for `steps` steps."""
    sched = denoiser.ddpm
    sched.set_timesteps(min(steps, denoiser.num_train_timesteps), device=denoiser.device)
    return trojan_steps(lambda x, t: denoiser.eps(x, torch.full((x.shape[0],), t, device=denoiser.device)),
                        denoiser.alphas_cumprod, sched.timesteps, x_T, r, gamma, generator)


def sample_previews(denoiser, r: torch.Tensor, gamma: torch.Tensor, samples: int, steps: int,
                    seed: int) -> Previews:
    """`samples` images from benign noise and from the trigger with the model's preview sampler
    (DDPM ancestral for DDPM models), decoded to images for latent models; for a DDPM-family model whose
    trigger is narrowed (gamma mean < NARROW_GAMMA) also the trigger's noises through TrojDiff's sampler."""
    device = denoiser.device
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (samples, *denoiser.input_shape)
    noise = torch.randn(shape, generator=gen, device=device)
    r, gamma = r.to(device), gamma.to(device)
    triggered = gamma * noise + r
    decode = getattr(denoiser, "decode", lambda x: x)  # latent diffusion: show images, not latents
    both = decode(denoiser.ancestral_sample(torch.cat([noise, triggered]), steps, generator=gen))
    trojan = None
    if getattr(denoiser, "ddpm", None) is not None and float(gamma.mean()) < NARROW_GAMMA:
        trojan = decode(trojan_sample(denoiser, triggered, r, gamma, steps, generator=gen)).cpu()
    return Previews(benign=both[:samples].cpu(), trigger=both[samples:].cpu(), steps=steps, trojan=trojan)

