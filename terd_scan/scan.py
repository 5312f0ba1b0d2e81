"""The model scan, end to end: load -> denoiser -> reverse -> features -> verdict -> report.

`scan_model` returns everything in memory; `write_artefacts` puts it on disk. The CLI is a thin
layer over these two, and so is any service that scans models from Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from . import TOOL_NAME, __version__
from .basin_test import scan_basin_test
from .collapse_search import is_consistency, search_for
from .denoisers import make_denoiser
from .detection import BACKDOORED, CLEAN, Verdict, judge, kl_features
from .errors import ScanError
from .presets import DEFAULT_PRESET, PRESETS, settings_for
from .previews import NARROW_GAMMA, Previews, sample_previews
from .reference import Reference, shipped_reference
from .report import to_json, trigger_image, write_atomic
from .reversion import reverse_trigger
from .trigger import COLLAPSE_START, Trigger


CM_KL_NOTE = ("TERD's KL route is not used on a consistency model: its pair loss is about 1000x weaker there and "
              "leaves r at its start, so the verdict is the one-step sample-collapse search's")


@dataclass
class ScanOptions:
    preset: str = DEFAULT_PRESET
    overrides: dict = field(default_factory=dict)  # ReversionSettings fields; None values are ignored
    seed: int = 0
    device: str = "auto"
    # path of a reference JSON; default: the one shipped for the preset and model family (reference_family)
    reference: str | None = None
    revision: str | None = None
    token: str | None = None
    cache_dir: str | None = None
    allow_pickle: bool = False
    config: str | None = None
    preview_samples: int = 6
    preview_steps: int = 1000  # DDPM ancestral steps for the images in trigger.png (0: no previews)


@dataclass
class ScanResult:
    report: dict
    trigger: Trigger
    previews: Previews | None  # sampled from benign noise and from the trigger
    trace: dict


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ScanError("--device cuda was asked for but no CUDA GPU is available; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ScanError("--device mps was asked for but MPS is not available; use --device auto or cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ScanError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def reference_family(loaded) -> str:
    """Which family of shipped reference judges a loaded model: latent diffusion is reversed in
    latent space and judged against latent benign models."""
    return "latent" if getattr(loaded, "autoencoder", None) is not None else "pixel"


def load_reference(options: ScanOptions, family: str = "pixel") -> Reference:
    if options.reference:
        return Reference.load(options.reference)
    ref = shipped_reference(options.preset, family)
    if ref is None:
        what = "latent diffusion with " if family == "latent" else ""
        raise ScanError(f"no benign reference is shipped for {what}preset {options.preset!r}; "
                        "make one with 'terd-scan calibrate' and pass --reference")
    return ref


def weights_fingerprint(provenance: dict) -> str:
    """sha256 over the sha256s of the files that define the model (for caching reversions)."""
    h = hashlib.sha256()
    for f in sorted(provenance.get("files", []), key=lambda f: f["path"]):
        h.update(f"{f['path']}\0{f['sha256']}\n".encode())
    return h.hexdigest()


@dataclass
class Reversed:
    """A model's reversed trigger and its features, before any verdict."""

    loaded: object  # loading.LoadedModel
    denoiser: object  # denoisers.DDPMDenoiser
    settings: dict  # preset, every hyperparameter, seed, device
    result: object  # reversion.ReversionResult
    features: object  # detection.Features
    basin: object = None  # basin_test.BasinTest when settings.basin_gate, else None
    basin_seconds: float = 0.0
    collapse: object = None  # collapse_search.CollapseSearch when the KL route found it clean and the preset runs it


def judge_reversed(rev: Reversed, reference, progress: Callable[[str, int, int], None] | None = None):
    """The verdict on a reversed model: the KL route (detection.judge, with the basin test where it runs);
    where that finds the model clean and the preset runs the sample-collapse search (collapse_search.py),
    that search's route. A kept collapse becomes the reversed trigger (its end point, gamma 1: the run is
    added to the result's runs and chosen) and flags the model; the KL route's reasons stay in the verdict.
    A consistency model is judged by the collapse route alone (through its one-step sampler), in every preset:
    TERD's KL route does not hold on one (README, "Consistency models")."""
    consistency = is_consistency(rev.denoiser)
    if consistency:
        verdict = Verdict(CLEAN, [CM_KL_NOTE])
    else:
        verdict = judge(rev.features, reference, rev.basin)
        if verdict.backdoored or not rev.settings.get("collapse_search"):
            return verdict
    if progress:
        progress("sample-collapse search", 0, 1)
    rev.collapse = c = search_for(rev.denoiser, rev.settings, rev.settings["seed"])
    if progress:
        progress("sample-collapse search", 1, 1)
    sampler = "one-step consistency samples" if consistency else "DDPM samples"
    if consistency and not c.ran:  # never a clean verdict for a model that was not scanned
        raise ScanError(f"the consistency model could not be judged: its sample-collapse search was {c.note}; "
                        "scan it on a machine with more memory (--device cpu)")
    if not c.kept:
        if consistency:
            verdict.reasons.append(f"{sampler} do not collapse: from N(r, I) on spheres of rms radius "
                                   f"{', '.join(f'{v:g}' for v in c.radii)} they spread at least {c.ratio:.3g} x as much "
                                   f"as from N(0, I) (a backdoor: below {c.keep_below:g})")
        return verdict
    result = rev.result
    result.r, result.gamma = c.r, torch.ones_like(c.r)
    rms = c.radii[c.ratios.index(c.ratio)]
    result.start = f"{COLLAPSE_START} (sphere of rms radius {rms:g})"
    rev.features = kl_features(result.r, result.gamma)
    result.runs = [{**run, "chosen": False} for run in result.runs] + [
        {"start": result.start, **rev.features.to_dict(), "chosen": True}]
    # what was measured: the samples collapse; whether onto the attack's own target is unknown to a scan
    found = "r, the noise shift that collapses them, is reported as the trigger" + (
        "" if consistency else " (TERD's pair loss did not hold one)")
    return Verdict(BACKDOORED, [*verdict.reasons, f"{sampler} collapse: from N(r, I) on a sphere of rms radius {rms:g} "
                                f"they spread {c.ratio:.3g} x as much as from N(0, I) (below {c.keep_below:g}); {found}"])


def load_source(source: str, options: ScanOptions):
    from .loading import load_model

    return load_model(source, revision=options.revision, token=options.token, cache_dir=options.cache_dir,
                      allow_pickle=options.allow_pickle, config=options.config)


def scan_settings(options: ScanOptions) -> dict:
    """Preset, every hyperparameter, seed and device: what a reversion's result depends on."""
    if options.preset not in PRESETS:
        raise ScanError(f"unknown preset {options.preset!r}; use one of {', '.join(PRESETS)}")
    settings = settings_for(options.preset, **options.overrides)
    return {"preset": options.preset, **settings.to_dict(), "seed": options.seed,
            "device": str(pick_device(options.device))}


def reverse_model(source: str, options: ScanOptions,
                  progress: Callable[[str, int, int], None] | None = None, loaded=None) -> Reversed:
    """Load a model (unless given) and reverse its trigger: the expensive part of a scan."""
    settings_dict = scan_settings(options)
    loaded = loaded or load_source(source, options)
    denoiser = make_denoiser(loaded, settings_dict["device"])
    settings = settings_for(options.preset, **options.overrides)
    result = reverse_trigger(denoiser, settings, seed=options.seed, progress=progress)
    basin, basin_seconds = None, 0.0
    if settings.basin_gate:  # reads the result, changes nothing in it
        t0 = time.perf_counter()
        if progress:
            progress("basin test", 0, 1)
        basin = scan_basin_test(denoiser, result.r, result.gamma, settings, options.seed)
        if progress:
            progress("basin test", 1, 1)
        basin_seconds = time.perf_counter() - t0
    return Reversed(loaded, denoiser, settings_dict, result, kl_features(result.r, result.gamma), basin, basin_seconds)


def cache_root() -> Path:
    env = os.environ.get("TERD_SCAN_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "terd-scan"


def reverse_cached(source: str, options: ScanOptions,
                   progress: Callable[[str, int, int], None] | None = None) -> tuple[Trigger, Path, bool]:
    """The trigger of a model, reversed once per (model file hashes, settings) and then reused
    from the cache. Returns (trigger, its file, whether it came from the cache)."""
    settings_dict = scan_settings(options)
    loaded = load_source(source, options)
    fingerprint = weights_fingerprint(loaded.provenance.to_dict())
    key = hashlib.sha256(json.dumps({"weights": fingerprint, "settings": settings_dict},
                                    sort_keys=True).encode()).hexdigest()[:32]
    path = cache_root() / "triggers" / f"{key}.safetensors"
    if path.is_file():
        try:
            return Trigger.load(path), path, True
        except ScanError:
            pass  # a damaged cache entry is recomputed, not trusted
    rev = reverse_model(source, options, progress, loaded=loaded)
    try:  # judge it too, so the inputs report can warn when the model looks clean
        verdict = judge_reversed(rev, load_reference(options, reference_family(loaded)), progress).verdict
    except ScanError:
        verdict = "unjudged: no reference for these settings"
    trigger = Trigger(r=rev.result.r, gamma=rev.result.gamma, metadata={
        "model": loaded.name, "source": source, "weights_fingerprint": fingerprint, "settings": settings_dict,
        "features": rev.features.to_dict(), "verdict": verdict, "start": rev.result.start, "tool_version": __version__})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        trigger.save(path)
    except OSError as exc:
        raise ScanError(f"cannot write the trigger cache {path.parent}: {exc.strerror}; "
                        "set TERD_SCAN_CACHE to a writable folder") from None
    return trigger, path, False


def scan_model(source: str, options: ScanOptions | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> ScanResult:
    options = options or ScanOptions()
    started = time.perf_counter()
    scan_settings(options)  # a bad preset or device fails first
    loaded = load_source(source, options)
    reference = load_reference(options, reference_family(loaded))  # fails before the expensive part
    rev = reverse_model(source, options, progress, loaded=loaded)
    denoiser, result, features, settings_dict = rev.denoiser, rev.result, rev.features, rev.settings
    verdict = judge_reversed(rev, reference, progress)
    features = rev.features  # the collapse route replaces the trigger it flags
    reversion_seconds = time.perf_counter() - started

    previews = None
    if options.preview_samples > 0 and options.preview_steps > 0:
        if progress:
            progress("previews: sampling", 0, 1)
        previews = sample_previews(denoiser, result.r, result.gamma, options.preview_samples, options.preview_steps,
                                   seed=options.seed + 1)
        if progress:
            progress("previews: sampling", 1, 1)

    provenance = loaded.provenance.to_dict()
    basin_evaluations = rev.basin.network_evaluations if rev.basin is not None else 0
    collapse_evaluations = rev.collapse.network_evaluations if rev.collapse is not None else 0
    search_evaluations = basin_evaluations + collapse_evaluations
    warnings = [f"reference '{reference.name}' was calibrated with other settings: " + ", ".join(mm)
                for mm in [reference.mismatches(settings_dict)] if mm]
    model_info = {"name": loaded.name, **denoiser.info().to_dict(), "schedule_origin": loaded.schedule_origin,
                  "pipeline_class": loaded.pipeline_class}
    if model_info.get("caveat"):  # a family's known limit (consistency models) travels with every report
        warnings.append(model_info["caveat"])
    report = {
        "tool": {"name": TOOL_NAME, "version": __version__},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "diffusers": _version("diffusers"), "huggingface_hub": _version("huggingface_hub"),
                        "safetensors": _version("safetensors")},
        "source": provenance,
        "model": model_info,
        "settings": settings_dict,
        "features": features.to_dict(),
        "thresholds": {**reference.thresholds(), "origin": reference.origin},
        "reference": reference.summary(),
        "verdict": verdict.verdict,
        "reasons": verdict.reasons,
        "trigger": {"space": "latent" if model_info.get("latent") else "input noise",
                    "r_mean": float(result.r.mean()), "r_abs_mean": float(result.r.abs().mean()),
                    "gamma_mean": float(result.gamma.mean()), "gamma_min": float(result.gamma.min()),
                    "gamma_max": float(result.gamma.max()), "start": result.start, "runs": result.runs},
        "patch_search": result.search,
        "narrow_search": result.narrow,
        "canvas_search": result.canvas,
        "dip_search": result.dip,
        "basin_test": rev.basin.to_dict() if rev.basin is not None else None,
        "collapse_search": rev.collapse.to_dict() if rev.collapse is not None else None,
        "previews": None if previews is None else {
            "samples": int(previews.benign.shape[0]), "steps": previews.steps,
            "trojdiff_sampler": previews.trojan is not None, "narrow_gamma_below": NARROW_GAMMA},
        "memory": result.memory,
        "timing": {"seconds": round(time.perf_counter() - started, 3),
                   "reversion_seconds": round(reversion_seconds, 3),
                   "stage1_seconds": round(result.seconds["stage1"], 3),
                   "stage2_seconds": round(result.seconds["stage2"], 3),
                   "patch_search_seconds": round(result.seconds.get("patch_search", 0.0), 3),
                   "narrow_search_seconds": round(result.seconds.get("narrow_search", 0.0), 3),
                   "narrow_refine_seconds": round(result.seconds.get("narrow_refine", 0.0), 3),
                   "canvas_search_seconds": round(result.seconds.get("canvas_search", 0.0), 3),
                   "dip_search_seconds": round(result.seconds.get("dip_search", 0.0), 3),
                   "basin_test_seconds": round(rev.basin_seconds, 3),
                   "collapse_search_seconds": round(rev.collapse.seconds, 3) if rev.collapse is not None else 0.0,
                   "network_evaluations": result.network_evaluations + search_evaluations,
                   "preview_network_evaluations": denoiser.evaluations - result.network_evaluations - search_evaluations},
        "warnings": warnings,
        "artefacts": {},
    }
    trigger = Trigger(r=result.r, gamma=result.gamma, metadata={
        "model": loaded.name, "source": source, "weights_fingerprint": weights_fingerprint(provenance),
        "files": {f["path"]: f["sha256"] for f in provenance.get("files", [])},
        "settings": settings_dict, "features": features.to_dict(), "verdict": verdict.verdict,
        "start": result.start, "space": report["trigger"]["space"], "tool_version": __version__})
    return ScanResult(report=report, trigger=trigger, previews=previews, trace=result.trace)


def calibrate(sources: list[str], options: ScanOptions, name: str, created_by: str = "", seeds=(0, 1),
              progress: Callable[[str, int, int], None] | None = None) -> Reference:
    """Reverse known-benign models with the scan's settings and keep their feature statistics.
    Each model is reversed with every seed, so the thresholds also cover the scan's own
    seed-to-seed spread."""
    if len(sources) < 2:
        raise ScanError("calibration needs at least 2 known-benign models (more give steadier thresholds)")
    if not seeds:
        raise ScanError("calibration needs at least one seed")
    models, settings = [], None
    for i, source in enumerate(sources):
        loaded = load_source(source, options)
        if is_consistency(make_denoiser(loaded, "cpu")):
            raise ScanError(f"{source} is a consistency model: it is judged by the sample-collapse search, whose keep "
                            "ratio is fixed, not by a KL reference; calibrate with DDPM-family, VE or latent models")
        prov = loaded.provenance.to_dict()
        for seed in seeds:
            rev = reverse_model(source, replace(options, seed=seed), progress, loaded=loaded)
            settings = {k: v for k, v in rev.settings.items() if k not in ("seed", "device")}
            models.append({"name": loaded.name, "source": source, "seed": seed,
                           "weights_fingerprint": weights_fingerprint(prov), **rev.features.to_dict()})
        if progress:
            progress("calibration: models", i + 1, len(sources))
    return Reference(name=name, settings=settings, models=models, created_by=created_by, origin=name)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def default_out_dir(result: ScanResult) -> Path:
    return Path("terd-scan-out") / result.report["model"]["name"]


def write_artefacts(result: ScanResult, out_dir: str | Path) -> dict:
    """report.json, trigger.png, trigger.safetensors and trace.json, each written atomically,
    report.json last (its presence means the set is complete)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScanError(f"cannot create output folder {out}: {exc.strerror}; pass another --out") from None
    paths = {"report_json": str(out / "report.json"), "trigger_safetensors": str(out / "trigger.safetensors"),
             "trace_json": str(out / "trace.json")}
    if result.previews is not None:
        paths["trigger_png"] = str(out / "trigger.png")
    result.report["artefacts"] = paths
    try:
        result.trigger.save(paths["trigger_safetensors"])
        if result.previews is not None:
            write_atomic(paths["trigger_png"], trigger_image(result.trigger.r, result.trigger.gamma, result.previews.benign,
                                                             result.previews.trigger, trojan=result.previews.trojan,
                                                             latent=bool(result.report["model"].get("latent"))))
        write_atomic(paths["trace_json"], json.dumps(result.trace).encode())
        write_atomic(paths["report_json"], to_json(result.report).encode())
    except OSError as exc:
        raise ScanError(f"cannot write to {out}: {exc.strerror}; pass another --out") from None
    return paths
