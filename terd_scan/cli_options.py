"""Command-line options shared by every command that reverses a trigger (model, calibrate,
inputs --model), so they are spelled and documented once."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .presets import PRESETS


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


Preset = Enum("Preset", {name: name for name in PRESETS}, type=str)

# Options shared by the commands that reverse triggers (model, calibrate).
PresetOpt = Annotated[Preset, typer.Option("--preset", help="Reversion budget: paper (the paper's exact settings), "
                                                            "standard, fast.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto picks a CUDA or MPS GPU when present, else the CPU.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed: same inputs and seed give the same trigger and verdict.")]
Stage1Opt = Annotated[Optional[int], typer.Option("--stage1-iterations", min=0, help="Override: stage 1 iterations.")]
Stage2Opt = Annotated[Optional[int], typer.Option("--stage2-iterations", min=0, help="Override: stage 2 iterations.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Override: batch size.")]
StepsOpt = Annotated[Optional[int], typer.Option("--sampler-steps", min=1, help="Override: DDIM steps in stage 2.")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", min=0.0, help="Override: learning rate of r.")]
GammaLrOpt = Annotated[Optional[float], typer.Option("--gamma-lr", min=0.0, help="Override: learning rate of gamma.")]
LambdaOpt = Annotated[Optional[float], typer.Option("--lambda", min=0.0, help="Override: L1 weight lambda.")]
ClipOpt = Annotated[Optional[float], typer.Option("--grad-clip", min=0.0, help="Override: stage 2 gradient clip.")]
PatchSearchOpt = Annotated[Optional[bool], typer.Option("--patch-search/--no-patch-search",
                                                       help="Override: search for sparse patch triggers "
                                                            "(on in standard and fast, off in paper).")]
NarrowSearchOpt = Annotated[Optional[bool], typer.Option("--narrow-search/--no-narrow-search",
                                                         help="Override: probe narrow starting noise for TrojDiff-like "
                                                              "triggers (on in standard and fast, off in paper).")]
CanvasSearchOpt = Annotated[Optional[bool], typer.Option("--canvas-search/--no-canvas-search",
                                                         help="Override: screen constant canvases for triggers the "
                                                              "start does not point at (on in standard and fast, off "
                                                              "in paper).")]
DipSearchOpt = Annotated[Optional[bool], typer.Option("--dip-search/--no-dip-search",
                                                      help="Override: walk r = 0 down a grid of gammas for faint "
                                                           "narrow-noise triggers (on in standard and fast, off in "
                                                           "paper).")]
BasinGateOpt = Annotated[Optional[bool], typer.Option("--basin-gate/--no-basin-gate",
                                                      help="Override: flag a model only when TERD's objective holds "
                                                           "its reversed trigger, by a barrier from N(0, I) or a wall "
                                                           "beyond it (on in standard, off in fast and paper).")]
CollapseSearchOpt = Annotated[Optional[bool], typer.Option("--collapse-search/--no-collapse-search",
                                                           help="Override: where the KL route finds the model clean, "
                                                                "look for starting noises whose DDPM samples collapse to "
                                                                "one image (on in standard, off in fast and paper; on "
                                                                "a consistency model, its only route, always on).")]
CollapseItersOpt = Annotated[Optional[int], typer.Option("--collapse-iterations", min=1,
                                                         help="Override: descent iterations of the sample-collapse "
                                                              "search, per sphere (per start of a sphere on a "
                                                              "consistency model).")]
RefineOpt = Annotated[Optional[int], typer.Option("--refine-iterations", min=0,
                                                  help="Override: iterations of each held-gamma descent of the "
                                                       "narrow-noise refinement and sweeps (0: none).")]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Hub revision: branch, tag or commit.")]
TokenOpt = Annotated[Optional[str], typer.Option("--token", help="Hub token \\[default: $HF_TOKEN].", show_default=False)]
CacheOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="Hugging Face cache folder.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="UNet config.json for a single weights file.")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Load pickle weights (.bin/.pt/.ckpt), with "
                                                               "torch.load(weights_only=True) only.")]


def scan_options(preset, seed, device, stage1_iterations, stage2_iterations, batch_size, sampler_steps, lr, gamma_lr,
                 l1_weight, grad_clip, revision, token, cache_dir, config, allow_pickle, patch_search=None,
                 narrow_search=None, canvas_search=None, dip_search=None, refine_iterations=None, basin_gate=None,
                 collapse_search=None, collapse_iterations=None, **extra):
    from .scan import ScanOptions

    return ScanOptions(
        preset=preset.value, seed=seed, device=device.value, revision=revision,
        token=token or os.environ.get("HF_TOKEN"), cache_dir=str(cache_dir) if cache_dir else None,
        allow_pickle=allow_pickle, config=str(config) if config else None,
        overrides=dict(stage1_iterations=stage1_iterations, stage2_iterations=stage2_iterations,
                       batch_size=batch_size, sampler_steps=sampler_steps, lr=lr, gamma_lr=gamma_lr,
                       l1_weight=l1_weight, stage2_grad_clip=grad_clip, patch_search=patch_search,
                       narrow_search=narrow_search, canvas_search=canvas_search, dip_search=dip_search,
                       narrow_refine_iterations=refine_iterations, basin_gate=basin_gate,
                       collapse_search=collapse_search, collapse_iterations=collapse_iterations,
                       cm_collapse_iterations=collapse_iterations), **extra)


