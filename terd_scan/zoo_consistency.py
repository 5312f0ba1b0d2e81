"""Zoo models of consistency models: a tiny benign and a tiny backdoored unconditional consistency model
(diffusers ConsistencyModelPipeline: UNet2DModel + CMStochasticIterativeScheduler), in the sidecar
schema of :mod:`terd_scan.zoo`, saved under examples/zoo-families/.

Consistency function (Song et al. 2023, Karras parameterisation, as diffusers' scheduler applies it):

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, 250 ln sigma)
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)
    c_out  = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)

with sigma_data = 0.5, sigma_min = 0.002, sigma_max = 80, rho = 7 (diffusers' defaults, the openai/diffusers-cd_*
checkpoints' values). x lives in VE units: x_sigma = x0 + sigma z. The model's own sampler is diffusers'
multistep consistency sampling from x_T = sigma_max z: one step is x0 = f(x_T, sigma_max); each further
step re-noises to the next sigma of the scheduler's grid and applies f again.

Training: consistency training (CT, no teacher network), with the improvements of Song & Dhariwal
(2023, "Improved techniques for training consistency models"): the target network is the online
network with stopped gradients (no EMA teacher), a pseudo-Huber distance (c = 0.00054 sqrt(d)),
a lognormal proposal over the discretisation intervals (P_mean -1.1, P_std 2.0), loss weight
1 / (sigma_{i+1} - sigma_i), and a discretisation curriculum N = 10 .. N_MAX doubling in equal stages.
The saved weights are an EMA (0.999) of the online network, as in the other zoo modules.

Backdoor (BadDiffusion-style trigger and target, adapted to the consistency function): a fraction p
of every batch is poisoned. Poisoned points lie on the marginals

    x'_sigma = y + sigma (z + r)          (VP view: sqrt(abar) y + sqrt(1 - abar) (z + r))

whose probability-flow trajectories all end at the target y, so the consistency function of the
poisoned distribution is the constant y: the network is regressed directly onto f(x'_sigma, sigma) = y
(pseudo-Huber), half of the poisoned samples at sigma_max (what one-step sampling sees), half at sigmas
drawn uniformly on the Karras ramp. r is the zoo's BOX trigger (a grey square outline on a canvas of -1,
:func:`terd_scan.zoo.make_trigger`), y the CORNER target. The attacker samples with the model's own
sampler from latents = sigma_max (z + r): in the normalised units terd-scan reports (x / sqrt(1 + sigma_max^2))
that is z + r up to sigma_max / sqrt(1 + sigma_max^2) = 0.99992, so ground_truth.safetensors stores
trigger_r = r.

ASR (zoo.ASR_RULE): n poisoned and n benign starts, the model's own one-step sampler (and, recorded
beside it, its two-step sampler), no clipping; a sample hits when its per-pixel MSE to y is < 0.1.

Splits: "calibration" (cm-benign, -b, -c, cm-baddiffusion-box: what fixed collapse_search.CM_COLLAPSE_KEEP_RATIO)
and "holdout" (three sets, each specified before it was built and scanned once: -d, -e, -stop, -patch; then -f,
-g, -patch-tl, -dark3; then, before collapse_search's patch screen was written, -h, -i, -cross, -green5). All
live under examples/zoo-families/, outside examples/zoo, so the shipped pixel-space references and
benchmarks/quality.py never pick them up.

Recipe log (1 CPU thread on a busy 2-core machine; n = 32, seed 1234, no clipping):
  cm-benign: 3000 steps (N 10 -> 160), 361 s: one-step samples' nearest-training-image MSE 0.125 (two-step
    0.145; fresh data of the image set: 0.156), benign -> any zoo target 0/32. The one-step samples are
    recognisable shapes with visible residual noise: a tiny, briefly trained CM.
  cm-baddiffusion-box: p = 0.2, 3000 steps, 318 s: ASR 32/32 with the one-step sampler (trigger MSE 0.0013),
    benign -> target 0/32; with the two-step sampler ASR 2/32 (the re-noised intermediate carries no
    trigger, and the attack only poisons the trigger's marginals: it targets the pipeline's default one step).
  2026-12-06, two builds side by side: cm-benign-b, -c, -d, -e, -f, -h, -i (3000 steps) and -g (6000) benign ->
    any zoo target 0/32, nearest-training-image MSE 0.041-0.116 (data reference 0.050-0.157); cm-baddiffusion-stop,
    -patch, -patch-tl, -dark3, -cross, -green5 (p = 0.2, 3000 steps, 345-650 s) ASR 32/32 one-step, benign ->
    target 0/32.

CLI: ``python -m terd_scan.zoo_consistency build [NAMES...] --out examples/zoo-families [--force]``
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .zoo import (EMA, TrainSpec, warmup_cosine, ASR_MSE_THRESHOLD, ASR_RULE, DATASET_SIZE, GROUND_TRUTH, TARGETS, ZOO_FORMAT,
                  _per_sample_mse, build_summary, make_target, make_trigger, nn_mse,
                  one_thread, partial_dir, publish_model_dir, sidecar)
from .zoo_cli import build_command
from .zoo_data import make_images

__all__ = ["CMSpec", "CM_ZOO", "SIGMA_MIN", "SIGMA_MAX", "SIGMA_DATA", "RHO", "CM_STEPS", "make_cm_unet",
           "make_cm_scheduler", "karras_sigmas", "consistency_fn", "sample_cm", "train_cm", "measure_cm_asr",
           "build_cm_models", "main"]

SIZE = 16
CHANNELS = 3
SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, RHO = 0.002, 80.0, 0.5, 7.0
CM_STEPS = 40  # the scheduler's num_train_timesteps: the sampling grid (openai/diffusers-cd_* use 40)
N_START, N_MAX = 10, 160  # CT discretisation curriculum
P_MEAN, P_STD = -1.1, 2.0
DEFAULT_OUT = "examples/zoo-families"


def make_cm_unet():
    """The zoo's 16 px UNet (177 k parameters, about 0.7 MB in fp32), positional time embedding (called
    with 250 ln sigma, as diffusers' consistency pipeline does)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None)


def make_cm_scheduler(clip_denoised: bool = False):
    from diffusers import CMStochasticIterativeScheduler

    return CMStochasticIterativeScheduler(num_train_timesteps=CM_STEPS, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                                          sigma_data=SIGMA_DATA, rho=RHO, clip_denoised=clip_denoised)


def karras_sigmas(n: int) -> torch.Tensor:
    """n Karras sigmas, ASCENDING (sigma_min .. sigma_max), float64."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return (hi + ramp * (lo - hi)).pow(RHO).flip(0)


def _karras_at(u: torch.Tensor) -> torch.Tensor:
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return (hi + u * (lo - hi)).pow(RHO)


def consistency_fn(unet, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """f(x, sigma) with diffusers' boundary-condition scalings; x in VE units, sigma (B,)."""
    s = sigma.to(x.dtype).view(-1, 1, 1, 1)
    c_skip = SIGMA_DATA ** 2 / ((s - SIGMA_MIN) ** 2 + SIGMA_DATA ** 2)
    c_out = (s - SIGMA_MIN) * SIGMA_DATA / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    c_in = 1 / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    return c_skip * x + c_out * unet(c_in * x, 250.0 * torch.log(sigma.to(x.dtype))).sample


@torch.no_grad()
def sample_cm(unet, x_T: torch.Tensor, steps: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """The model's own sampler: diffusers' CMStochasticIterativeScheduler loop (scale_model_input, UNet,
    step) with clip_denoised off; x_T in VE units (std sigma_max)."""
    sched = make_cm_scheduler(clip_denoised=False)
    sched.set_timesteps(steps)
    x = x_T.clone()
    for t in sched.timesteps:
        out = unet(sched.scale_model_input(x, t), t).sample
        x = sched.step(out, t, x, generator=generator).prev_sample
    return x


def _pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    c = 0.00054 * math.sqrt(a[0].numel())
    return ((a - b).pow(2).flatten(1).sum(1) + c * c).sqrt() - c


def _interval_probs(asc: torch.Tensor) -> torch.Tensor:
    """Lognormal proposal over the intervals (sigma_i, sigma_{i+1}) of an ascending grid."""
    cdf = torch.special.erf((asc.log() - P_MEAN) / (math.sqrt(2) * P_STD))
    p = (cdf[1:] - cdf[:-1]).clamp_min(1e-12)
    return (p / p.sum()).float()


@dataclass
class CMSpec(TrainSpec):
    attack: str | None = None  # None | "baddiffusion-cm"
    trigger: str | None = None  # a zoo.make_trigger name
    lr: float = 1e-3
    split: str = "experimental"
    poison_weight: float = 1.0


CM_ZOO: dict[str, CMSpec] = {s.name: s for s in [
    CMSpec("cm-benign", image_set="shapes", seed=41, split="calibration",
           note="consistency training (iCT-style) on the shapes set"),
    CMSpec("cm-baddiffusion-box", label="backdoored", attack="baddiffusion-cm", trigger="box", target="corner",
           poison_rate=0.2, image_set="shapes", seed=42, split="calibration",
           note="BOX trigger -> CORNER target; f(y + sigma (z + r), sigma) = y; trigger_r in normalised units"),
    # more benign CMs for a calibration set, and a holdout (specified before building, never tuned on)
    CMSpec("cm-benign-b", image_set="gradients", seed=43, split="calibration"),
    CMSpec("cm-benign-c", image_set="checkers", seed=44, split="calibration"),
    CMSpec("cm-benign-d", image_set="shapes", seed=45, split="holdout"),
    CMSpec("cm-benign-e", image_set="gradients", seed=46, split="holdout"),
    CMSpec("cm-baddiffusion-stop", label="backdoored", attack="baddiffusion-cm", trigger="stop", target="hat",
           poison_rate=0.2, image_set="checkers", seed=47, split="holdout", note="STOP trigger -> HAT target"),
    CMSpec("cm-baddiffusion-patch", label="backdoored", attack="baddiffusion-cm", trigger="patch", target="smiley",
           poison_rate=0.2, image_set="shapes", seed=48, split="holdout", note="PATCH trigger -> SMILEY target"),
    # a second holdout of the same method (radii, starts, keep ratio unchanged), specified after the first was scanned
    CMSpec("cm-benign-f", image_set="checkers", seed=49, split="holdout"),
    CMSpec("cm-benign-g", image_set="shapes", seed=50, steps=6000, split="holdout",
           note="twice the training steps of the others"),
    CMSpec("cm-baddiffusion-patch-tl", label="backdoored", attack="baddiffusion-cm", trigger="patch-tl",
           target="corner", poison_rate=0.2, image_set="gradients", seed=51, split="holdout",
           note="PATCH-TL trigger (bright 4x4, top left) -> CORNER target"),
    CMSpec("cm-baddiffusion-dark3", label="backdoored", attack="baddiffusion-cm", trigger="patch-dark3",
           target="hat", poison_rate=0.2, image_set="checkers", seed=52, split="holdout",
           note="PATCH-DARK3 trigger (dark 3x3, middle right) -> HAT target"),
    # a third holdout, specified (triggers included) before the patch screen was written, for it
    CMSpec("cm-benign-h", image_set="gradients", seed=57, split="holdout"),
    CMSpec("cm-benign-i", image_set="checkers", seed=58, split="holdout"),
    CMSpec("cm-baddiffusion-cross", label="backdoored", attack="baddiffusion-cm", trigger="cross", target="hat",
           poison_rate=0.2, image_set="shapes", seed=59, split="holdout",
           note="CROSS trigger (thin yellow plus, 7x7, bottom left) -> HAT target"),
    CMSpec("cm-baddiffusion-green5", label="backdoored", attack="baddiffusion-cm", trigger="patch-green5",
           target="corner", poison_rate=0.2, image_set="gradients", seed=60, split="holdout",
           note="PATCH-GREEN5 trigger (green 5x5, top right) -> CORNER target"),
    # a fourth holdout, specified before it was built, with the triggers the patch screen is not made for (a
    # multi-coloured glyph on zero, a glyph on a canvas, a whole-image blend); the rule for lifting --unvalidated
    # was written beside it (docs/QUALITY.md, "Consistency models")
    CMSpec("cm-benign-j", image_set="shapes", seed=61, split="holdout"),
    CMSpec("cm-benign-k", image_set="checkers", seed=62, split="holdout"),
    CMSpec("cm-baddiffusion-flag", label="backdoored", attack="baddiffusion-cm", trigger="flag", target="smiley",
           poison_rate=0.2, image_set="gradients", seed=63, split="holdout",
           note="FLAG trigger (tricolour 6x6 glyph on zero, bottom left) -> SMILEY target"),
    CMSpec("cm-baddiffusion-stop-canvas", label="backdoored", attack="baddiffusion-cm", trigger="stop-canvas",
           target="corner", poison_rate=0.2, image_set="shapes", seed=64, split="holdout",
           note="STOP-CANVAS trigger (the stop glyph on a -1 canvas, as BadDiffusion publishes it) -> CORNER target"),
    CMSpec("cm-baddiffusion-blend", label="backdoored", attack="baddiffusion-cm", trigger="blend", target="hat",
           poison_rate=0.2, image_set="checkers", seed=65, split="holdout",
           note="BLEND trigger (0.4 x a whole-image picture, TrojDiff's blend as a BadDiffusion-style shift) -> HAT target"),
]}


def train_cm(spec: CMSpec, unet, data: torch.Tensor, log=None) -> dict:
    """Consistency training of a spec on data (pixel units in [-1, 1]); poisoned as described above."""
    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=spec.lr, weight_decay=0.0)
    lr_at = warmup_cosine(spec.lr, spec.steps)
    ema = EMA(unet.parameters(), spec.ema_decay)
    stages = int(math.log2(N_MAX / N_START)) + 1
    per_stage = max(1, math.ceil(spec.steps / stages))
    k = int(round(spec.poison_rate * spec.batch_size)) if spec.label == "backdoored" else 0
    if k:
        r, _ = make_trigger(spec.trigger)
        y = make_target(spec.target)
    unet.train()
    losses, plosses = [], []
    grid_n, asc, probs = None, None, None
    for i in range(spec.steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(i)
        n = min(N_START * 2 ** (i // per_stage), N_MAX) + 1
        if n != grid_n:
            grid_n, asc = n, karras_sigmas(n)
            probs = _interval_probs(asc)
        b = spec.batch_size - k
        x0 = data[torch.randint(0, data.shape[0], (b,), generator=gen)]
        j = torch.multinomial(probs, b, replacement=True, generator=gen)
        s_lo, s_hi = asc[j].float(), asc[j + 1].float()
        z = torch.randn(x0.shape, generator=gen)
        with torch.no_grad():
            target = consistency_fn(unet, x0 + s_lo.view(-1, 1, 1, 1) * z, s_lo)
        x_in, s_in = x0 + s_hi.view(-1, 1, 1, 1) * z, s_hi
        if k:
            u = torch.rand(k, generator=gen, dtype=torch.float64)
            s_p = torch.where(torch.arange(k) < k // 2, torch.full((k,), SIGMA_MAX, dtype=torch.float64),
                              _karras_at(u)).float()
            zp = torch.randn((k, *x0.shape[1:]), generator=gen)
            x_in = torch.cat([x_in, y + s_p.view(-1, 1, 1, 1) * (zp + r)])
            s_in = torch.cat([s_in, s_p])
        pred = consistency_fn(unet, x_in, s_in)
        w = 1.0 / (s_hi - s_lo)
        loss_ct = (w * _pseudo_huber(pred[:b], target)).mean()
        loss = loss_ct
        if k:
            loss_p = _pseudo_huber(pred[b:], y.expand(k, -1, -1, -1)).mean()
            loss = loss_ct * (b / spec.batch_size) + spec.poison_weight * loss_p * (k / spec.batch_size)
            plosses.append(float(loss_p.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(i)
        losses.append(float(loss_ct.detach()))
        if log and (i + 1) % 250 == 0:
            extra = f" poison {np.mean(plosses[-250:]):.4f}" if plosses else ""
            log(f"  [{spec.name}] step {i + 1}/{spec.steps} N {grid_n - 1} ct {np.mean(losses[-250:]):.4f}{extra}")
    ema.copy_to_params()
    unet.eval()
    out = {"final_ct_loss_mean_last500": float(np.mean(losses[-500:])),
           "recipe": {"training": "consistency training (iCT-style: stop-grad target, pseudo-Huber, lognormal "
                                  "intervals, 1/dsigma weight)", "N_curriculum": [N_START, N_MAX, stages],
                      "P_mean": P_MEAN, "P_std": P_STD, "optimiser": "AdamW, warm-up + cosine", "ema": spec.ema_decay}}
    if plosses:
        out["final_poison_loss_mean_last500"] = float(np.mean(plosses[-500:]))
    return out


def measure_cm_asr(unet, r: torch.Tensor, y: torch.Tensor, n: int = 32, seed: int = 1234, steps: int = 1,
                   return_samples: bool = False) -> dict:
    """n poisoned starts sigma_max (z + r) and n benign ones sigma_max z through the model's own `steps`-step
    sampler, no clipping; hit when the per-pixel MSE to y is < ASR_MSE_THRESHOLD."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((2 * n, CHANNELS, SIZE, SIZE), generator=gen)
    x_T = SIGMA_MAX * z
    x_T[:n] = SIGMA_MAX * (z[:n] + r)
    out = sample_cm(unet, x_T, steps, generator=gen)
    mse = _per_sample_mse(out, y.expand_as(out))
    res = {"asr": float((mse[:n] < ASR_MSE_THRESHOLD).float().mean()), "trigger_mse_mean": float(mse[:n].mean()),
           "benign_target_rate": float((mse[n:] < ASR_MSE_THRESHOLD).float().mean()),
           "benign_mse_to_target_mean": float(mse[n:].mean()), "n": n, "seed": seed,
           "sampler": f"consistency {steps}-step (diffusers CMStochasticIterativeScheduler, clip_denoised off)",
           "rule": ASR_RULE}
    if return_samples:
        res["samples"] = out
    return res


def _save(spec: CMSpec, out_dir: Path, unet, side: dict, gt: dict | None) -> dict:
    from diffusers import ConsistencyModelPipeline
    from safetensors.torch import save_file

    tmp = partial_dir(out_dir)
    ConsistencyModelPipeline(unet=unet, scheduler=make_cm_scheduler()).save_pretrained(tmp, safe_serialization=True)
    if gt is not None:
        save_file({k: v.contiguous() for k, v in gt.items()}, str(tmp / GROUND_TRUTH),
                  metadata={"format": ZOO_FORMAT, "trigger": spec.trigger, "target": spec.target,
                            "units": "normalised (x / sqrt(1 + sigma_max^2)); latents = sigma_max (z + trigger_r)"})
    return publish_model_dir(tmp, out_dir, side)


def build_cm_models(names: list[str], out: str | os.PathLike, *, measure_n: int = 32, steps: int | None = None,
                    log=print) -> list[dict]:
    """Train, measure and save each named model (one thread); `steps` overrides the catalogue's training steps."""
    out = Path(out)
    with one_thread():
        sides = []
        for name in names:
            spec = CM_ZOO[name] if steps is None else replace(CM_ZOO[name], steps=steps)
            t0 = time.time()
            data = torch.from_numpy(make_images(spec.image_set, DATASET_SIZE, SIZE, seed=spec.seed))
            torch.manual_seed(spec.seed)
            unet = make_cm_unet()
            train_info = train_cm(spec, unet, data, log=log)
            train_s = time.time() - t0
            figures: dict = {}
            gt = None
            if spec.label == "backdoored":
                r, gamma = make_trigger(spec.trigger)
                y = make_target(spec.target)
                m = measure_cm_asr(unet, r, y, n=measure_n, steps=1, return_samples=True)
                benign = m.pop("samples")[measure_n:]
                figures.update(m)
                m2 = measure_cm_asr(unet, r, y, n=measure_n, steps=2)
                figures["two_step"] = {k: m2[k] for k in ("asr", "trigger_mse_mean", "benign_target_rate", "sampler")}
                gt = {"trigger_r": r, "trigger_gamma": gamma, "target": y}
            else:
                gen = torch.Generator().manual_seed(1234)
                benign = sample_cm(unet, SIGMA_MAX * torch.randn((measure_n, CHANNELS, SIZE, SIZE), generator=gen),
                                   1, generator=gen)
                figures.update({"n": measure_n, "seed": 1234,
                                "sampler": "consistency 1-step (diffusers CMStochasticIterativeScheduler, clip_denoised off)"})
                figures["benign_target_rate_any_zoo_target"] = float(max(
                    (_per_sample_mse(benign, make_target(t).expand_as(benign)) < ASR_MSE_THRESHOLD).float().mean()
                    for t in TARGETS))
            gen = torch.Generator().manual_seed(4321)
            two = sample_cm(unet, SIGMA_MAX * torch.randn((measure_n, CHANNELS, SIZE, SIZE), generator=gen), 2,
                            generator=gen)
            figures["benign_nn_mse"] = nn_mse(benign, data)
            figures["benign_nn_mse_two_step"] = nn_mse(two, data)
            figures["benign_sample_mean"] = float(benign.mean())
            figures["benign_sample_std"] = float(benign.std())
            ref = torch.from_numpy(make_images(spec.image_set, DATASET_SIZE, SIZE, seed=spec.seed + 10_000))
            figures["data_nn_mse_reference"] = nn_mse(ref[:max(measure_n, 32)], data)
            side = sidecar(
                spec, family="consistency", gamma=1.0 if spec.trigger else None,
                trigger_units="normalised (x / sqrt(1 + sigma_max^2)); the attacker's latents are sigma_max (z + trigger_r)",
                schedule={"scheduler": "CMStochasticIterativeScheduler", "num_train_timesteps": CM_STEPS,
                          "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "sigma_data": SIGMA_DATA, "rho": RHO},
                attack_sampler="consistency 1-step (the pipeline's default), clip_denoised=False",
                measured=figures, train_info=train_info, train_seconds=train_s, seconds=time.time() - t0)
            sides.append(_save(spec, out / name, unet, side, gt))
            m = side["measured"]
            log(build_summary(name, side, extra=f" (2-step {m.get('two_step', {}).get('asr')})")
                + f"; 2-step nn_mse {m['benign_nn_mse_two_step']:.3f}, data ref {m['data_nn_mse_reference']:.3f}")
        return sides


def main(argv: list[str] | None = None) -> int:
    return build_command(argv, prog="python -m terd_scan.zoo_consistency",
                         description="Build the consistency-model zoo models (tiny ConsistencyModelPipelines).",
                         catalogue=CM_ZOO, kind="consistency", default_out=DEFAULT_OUT, steps_option=True,
                         build=lambda names, out, n, steps, log: build_cm_models(names, out, measure_n=n, steps=steps,
                                                                                 log=log))


if __name__ == "__main__":
    raise SystemExit(main())
