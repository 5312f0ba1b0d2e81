"""Reverse every zoo model with a preset, caching the results (benchmarks/cache/), so the scan
benchmark and the reference builder share the expensive part. Library for the two scripts
beside it; not a test."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from terd_scan.basin_test import scan_basin_test
from terd_scan.denoisers import make_denoiser
from terd_scan.detection import kl_features
from terd_scan.dip_search import dip_screen
from terd_scan.input_detection import detection_rates
from terd_scan.presets import ReversionSettings, settings_for
from terd_scan.reversion import DIP_SEED_OFFSET, search_generator
from terd_scan.scan import ScanOptions, load_source, reverse_model, weights_fingerprint
from terd_scan.trigger import Trigger
from terd_scan.zoo import load_ground_truth

ROOT = Path(__file__).resolve().parent.parent
ZOO_DIR = ROOT / "examples" / "zoo"
FAMILIES_DIR = ROOT / "examples" / "zoo-families"
CACHE = ROOT / "benchmarks" / "cache"
ROW_FORMAT = 2  # bump when a cached row gains fields (2: input-detection rates, trigger_scale)
# Settings added after the cache was filled: left out of the cache key at their ReversionSettings
# default (off, which reproduces the earlier scans), so a new knob does not invalidate every cached scan.
LATER_SETTINGS = ("centred_start", "canvas_search", "canvas_amplitudes", "canvas_pairs", "narrow_sweep_unseeded",
                  "dip_search", "dip_gammas", "dip_pairs")
# Settings of the verdict, not of the reversion (basin_test.py reads its result): never in the cache key, so a
# cached row stays valid and only gains its basin test (from the cached trigger, or a re-run without one).
VERDICT_SETTINGS = ("basin_gate", "basin_pairs", "basin_min_barrier", "collapse_search", "collapse_radii",
                    "collapse_iterations", "collapse_noises", "collapse_steps")
COLLAPSE_SETTINGS = VERDICT_SETTINGS[3:]
_DEFAULTS = ReversionSettings().to_dict()


def bad_input(message: str) -> None:
    """A benchmark script's bad argument or file: one line on stderr and exit code 2, as terd-scan does."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def zoo_models(zoo_dir: Path = ZOO_DIR) -> list[Path]:
    return sorted(p for p in zoo_dir.iterdir() if (p / "terd-zoo.json").is_file())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _keyed_settings(preset: str, overrides: dict | None = None) -> dict:
    settings = settings_for(preset, **(overrides or {})).to_dict()
    return {k: v for k, v in settings.items()
            if k not in VERDICT_SETTINGS and (k not in LATER_SETTINGS or v != _DEFAULTS[k])}


# sidecar families whose weights are a pickle (the DDIM repo's ckpt.pth): the zoo built them, so the scan
# passes --allow-pickle for them as a user would (the file is still read with torch's weights_only loader)
PICKLED_FAMILIES = ("ddim-repo",)
# the files a cached row depends on: weights, and the DDIM repo's config.yml (it sets the resolution)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".yml")


def scan_options(model_dir: Path, **kwargs) -> ScanOptions:
    """CPU scan options for a zoo model; --allow-pickle where its family's layout is a pickle."""
    family = json.loads((model_dir / "terd-zoo.json").read_text()).get("family")
    return ScanOptions(device="cpu", allow_pickle=family in PICKLED_FAMILIES, **kwargs)


def settings_digest(preset: str, overrides: dict | None = None) -> str:
    """A short hash of the reversion settings a row was made with; it travels with the row into the
    committed results, so benchmarks/seed_cache.py can tell whether a committed row is still valid."""
    return hashlib.sha256(json.dumps(_keyed_settings(preset, overrides), sort_keys=True).encode()).hexdigest()[:16]


def _keyed_path(model_dir: Path, label: str, fields: dict) -> Path:
    """A cache file for `model_dir` keyed by `fields` and its weight files' names, sizes and times (a rebuilt
    model misses the cache)."""
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                     for p in model_dir.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    key_src = json.dumps({**fields, "weights": weights}, sort_keys=True, default=list)
    return CACHE / f"{model_dir.name}-{label}-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}.json"


def cache_path(model_dir: Path, preset: str, seed: int, overrides: dict | None = None) -> Path:
    """Where the reversion of a zoo model with these settings is cached: keyed by the settings'
    values (so a changed preset misses the cache) and the weight files."""
    return _keyed_path(model_dir, preset, {"row_format": ROW_FORMAT, "model": model_dir.name, "preset": preset,
                                           "seed": seed, "settings": _keyed_settings(preset, overrides)})


def _carried_over(model_dir: Path, preset: str, seed: int, overrides: dict) -> dict | None:
    """A cached row made without the dip search, valid for a scan with it: the search draws from its own
    generator and changes nothing unless its screen seeds a run, so where the screen (forward passes only,
    run here) seeds none, the scan is the cached one plus the screen's network evaluations. None when
    there is no such row or the screen seeds a run (then the model is reversed again)."""
    settings = settings_for(preset, **overrides)
    if not settings.dip_search:
        return None
    before = cache_path(model_dir, preset, seed, {**overrides, "dip_search": False})
    if not before.is_file():
        return None
    denoiser = make_denoiser(load_source(str(model_dir), scan_options(model_dir)), "cpu")
    screen = dip_screen(denoiser, settings, search_generator(seed, DIP_SEED_OFFSET))
    if screen.has_basin:
        return None
    row = json.loads(before.read_text())
    row.update(network_evaluations=row["network_evaluations"] + screen.network_evaluations,
               settings={**row["settings"], **{k: v for k, v in settings.to_dict().items() if k.startswith("dip_")}},
               settings_digest=settings_digest(preset, overrides),
               carried_over="; ".join(filter(None, [row.get("carried_over"), (
                   f"from {before.name}: dip_search screen seeds no run (ratio {screen.ratio:.3f} at gamma "
                   f"{screen.gamma:g}): chosen run unchanged; network_evaluations + {screen.network_evaluations}; "
                   "seconds exclude the screen")])))
    return row


def reverse_zoo_model(model_dir: Path, preset: str, seed: int = 0, overrides: dict | None = None,
                      use_cache: bool = True) -> dict:
    """Features, cost and trigger-recovery error of one zoo model under one preset."""
    options = scan_options(model_dir, preset=preset, seed=seed, overrides=dict(overrides or {}), preview_steps=0)
    gt = load_ground_truth(model_dir)
    cached = cache_path(model_dir, preset, seed, options.overrides)
    settings = settings_for(preset, **options.overrides)
    if use_cache and cached.is_file():  # the sidecar's labels may have changed since (e.g. the split)
        row = json.loads(cached.read_text())
        if settings.basin_gate and "wall" not in row.get("basin", {}):  # none yet, or made before the outer wall
            trigger_file = trigger_cache_path(cached)
            if not trigger_file.is_file():  # no trigger kept for this row: reverse again
                return reverse_zoo_model(model_dir, preset, seed, overrides, use_cache=False)
            row = _with_basin_test(row, model_dir, Trigger.load(trigger_file), settings, seed)
            cached.write_text(json.dumps(row, indent=2))
        row.update(label=gt.get("label"), split=gt.get("split"), attack=gt.get("attack"), model_family=gt.get("family"))
        if not settings.basin_gate and "basin" in row:  # kept in the cache for a gated run, not this verdict's
            row["network_evaluations"] -= row.pop("basin")["network_evaluations"]
        return row
    carried = _carried_over(model_dir, preset, seed, options.overrides) if use_cache else None
    if carried is not None and settings.basin_gate:  # the basin test needs the trigger, which no carried row has
        carried = None
    if carried is not None:
        CACHE.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(carried, indent=2))
        carried.update(label=gt.get("label"), split=gt.get("split"), attack=gt.get("attack"), model_family=gt.get("family"))
        return carried
    t0 = time.perf_counter()
    rev = reverse_model(str(model_dir), options)
    seconds = time.perf_counter() - t0
    row = {"model": model_dir.name, "label": gt.get("label"), "split": gt.get("split"), "attack": gt.get("attack"),
           "model_family": gt.get("family"),
           "preset": preset, "seed": seed, **rev.features.to_dict(), "seconds": round(seconds, 1),
           "network_evaluations": rev.result.network_evaluations,
           "weights_fingerprint": weights_fingerprint(rev.loaded.provenance.to_dict()),
           "settings": rev.settings, "settings_digest": settings_digest(preset, options.overrides),
           "gamma_mean": float(rev.result.gamma.mean()),
           "trigger_scale": gt.get("trigger_scale", 1.0)}
    if "trigger_r" in gt:
        true_r = gt["trigger_r"]
        row["r_cosine"] = cosine(rev.result.r, true_r)
        row["r_l2"] = float((rev.result.r - true_r).norm())
        # input detection with the REVERSED trigger on noises from the TRUE one (1000 + 1000)
        reversed_trigger = Trigger(rev.result.r, rev.result.gamma)
        true_trigger = Trigger(true_r, gt["trigger_gamma"].clamp_min(1e-3))
        rates = detection_rates(reversed_trigger, true_trigger, n=1000, seed=0)
        row["input_tpr"], row["input_tnr"] = rates["tpr"], rates["tnr"]
    if rev.basin is not None:
        row["basin"] = rev.basin.outcome().to_dict()
        row["network_evaluations"] += rev.basin.network_evaluations
    CACHE.mkdir(parents=True, exist_ok=True)
    # the trigger too, so a later verdict setting (the basin test) can be judged without reversing again
    Trigger(rev.result.r, rev.result.gamma, metadata={"model": model_dir.name, "preset": preset}).save(
        str(trigger_cache_path(cached)))
    cached.write_text(json.dumps(row, indent=2))
    return row


def collapse_zoo_model(model_dir: Path, preset: str, seed: int = 0, overrides: dict | None = None,
                       use_cache: bool = True) -> dict:
    """The sample-collapse search (terd_scan/collapse_search.py) on one zoo model, as a scan runs it where the KL
    route finds the model clean; cached apart from the reversion (it does not read the reversion's result).
    For a backdoored model also the end point's cosine and L2 to the true trigger, input detection with it and,
    where the search keeps it, its attack success rate with the sampler the attack targets (16 samples, no
    clipping; zoo.measure_asr). The end point is kept beside the row (<row>.trigger.safetensors)."""
    from terd_scan.collapse_search import COLLAPSE_SEED_OFFSET, search_collapse

    settings = settings_for(preset, **(overrides or {}))
    knobs = {k: getattr(settings, k) for k in COLLAPSE_SETTINGS}
    cached = _keyed_path(model_dir, "collapse", {"model": model_dir.name, "seed": seed, "settings": knobs})
    gt = load_ground_truth(model_dir)
    if use_cache and cached.is_file():
        row = json.loads(cached.read_text())
        # a row made before the ASR was recorded is made again (the search is deterministic)
        if not (row.get("kept") and "trigger_r" in gt and "recovered_asr" not in row):
            return row
    denoiser = make_denoiser(load_source(str(model_dir), scan_options(model_dir)), "cpu")
    out = search_collapse(denoiser, tuple(settings.collapse_radii), settings.collapse_iterations,
                          settings.collapse_noises, settings.collapse_steps, seed + COLLAPSE_SEED_OFFSET)
    row = out.to_dict()
    if out.ran and "trigger_r" in gt:
        true_r = gt["trigger_r"]
        rates = detection_rates(Trigger(out.r, torch.ones_like(out.r)),
                                Trigger(true_r, gt["trigger_gamma"].clamp_min(1e-3)), n=1000, seed=0)
        row.update(r_cosine=cosine(out.r, true_r), r_l2=float((out.r - true_r).norm()),
                   input_tpr=rates["tpr"], input_tnr=rates["tnr"])
        if out.kept and gt.get("family") in (None, "ddpm"):  # the pixel zoo's catalogue knows the attack's sampler
            from terd_scan.zoo import ZOO, measure_asr

            spec = ZOO[model_dir.name]
            res = measure_asr(denoiser.unet, out.r, torch.ones_like(out.r), gt["target_image"], n=16,
                              sampler=spec.sampler(), benign=False, beta_end=spec.beta_end)
            row.update(recovered_asr=res["asr"], attack_sampler=res["sampler"])
    CACHE.mkdir(parents=True, exist_ok=True)
    if out.ran:
        Trigger(out.r, torch.ones_like(out.r), metadata={"model": model_dir.name, "preset": preset}).save(
            str(trigger_cache_path(cached)))
    cached.write_text(json.dumps(row, indent=2))
    return row


def trigger_cache_path(row_path: Path) -> Path:
    """Where a cached row's reversed trigger is kept (benchmarks/trigger_fires.py reads it too)."""
    return row_path.with_suffix(".trigger.safetensors")


def _with_basin_test(row: dict, model_dir: Path, trigger: Trigger, settings, seed: int) -> dict:
    """A cached row judged by the basin test on its cached trigger (which must be the row's: same features)."""
    features = kl_features(trigger.r, trigger.gamma)
    if abs(features.mean_kl - row["mean_kl"]) > 1e-4 * abs(row["mean_kl"]) or \
            abs(features.var_kl - row["var_kl"]) > 1e-4 * abs(row["var_kl"]) + 1e-12:
        raise ValueError(f"{model_dir.name}: the cached trigger is not the cached row's (features differ)")
    denoiser = make_denoiser(load_source(str(model_dir), scan_options(model_dir)), "cpu")
    test = scan_basin_test(denoiser, trigger.r, trigger.gamma, settings, seed)
    earlier = row.get("basin", {}).get("network_evaluations", 0)  # a test made before the outer wall, replaced
    return {**row, "basin": test.outcome().to_dict(),
            "network_evaluations": row["network_evaluations"] - earlier + test.network_evaluations}
