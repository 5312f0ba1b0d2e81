"""The report's sample images: DDPM samples from benign noise and from the recovered trigger.

A backdoor maps its trigger distribution N(r, gamma^2) to one target image, so samples from a
recovered trigger collapse while samples from benign noise stay diverse. The spread ratio puts a
number on it (the mean pairwise L2 distance of the trigger's samples over the benign samples',
the same starting noises). It is not in the verdict or the report: benchmarks/trigger_fires.py
measured it on the zoo (benchmarks/results/trigger-fires-fast.md) and found it no fit for either.
With the report's 6 samples the benign models spread 0.73-1.17, overlapping a partial collapse;
and an attack aimed at another sampler does not fire in DDPM samples (trojdiff-blend's trigger,
recovered with cosine 0.69, spreads 7.4 under DDPM: its backdoor fires under TrojDiff's sampler).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Previews:
    benign: torch.Tensor  # (n, C, H, W) images sampled from N(0, I), on the CPU
    trigger: torch.Tensor  # (n, C, H, W) images sampled from N(r, gamma^2), the same noises
    steps: int  # DDPM ancestral steps

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


def sample_previews(denoiser, r: torch.Tensor, gamma: torch.Tensor, samples: int, steps: int,
                    seed: int) -> Previews:
    """`samples` images from benign noise and from the trigger with the model's preview sampler
    (DDPM ancestral for DDPM models), decoded to images for latent models."""
    device = denoiser.device
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (samples, *denoiser.input_shape)
    noise = torch.randn(shape, generator=gen, device=device)
    r, gamma = r.to(device), gamma.to(device)
    both = denoiser.ancestral_sample(torch.cat([noise, gamma * noise + r]), steps, generator=gen)
    if hasattr(denoiser, "decode"):  # latent diffusion: show images, not latents
        both = denoiser.decode(both)
    return Previews(benign=both[:samples].cpu(), trigger=both[samples:].cpu(), steps=steps)

