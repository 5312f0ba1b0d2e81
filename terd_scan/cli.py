"""The `terd-scan` command line: parses options, calls the library, maps outcomes to exit codes
(0 clean, 1 backdoor / poisoned input found, 2 error). Errors are one line on stderr, never a
traceback (set TERD_SCAN_DEBUG=1 to see one)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import ScanError
from .cli_inputs import inputs_command
from .cli_options import (BasinGateOpt, BatchOpt, CacheOpt, CanvasSearchOpt, ClipOpt, CollapseItersOpt,
                          CollapseSearchOpt, ConfigOpt, Device, DeviceOpt,
                          DipSearchOpt,
                          GammaLrOpt, LambdaOpt, LrOpt, NarrowSearchOpt, PatchSearchOpt, PickleOpt, Preset, PresetOpt, RefineOpt,
                          RevisionOpt,
                          SeedOpt, Stage1Opt, Stage2Opt, StepsOpt, TokenOpt, scan_options)
from .presets import DEFAULT_PRESET

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode="rich",
                  help="Scan diffusion models for noise-space backdoors with TERD (ICML 2024).")
err_console = Console(stderr=True)

EXIT_CLEAN, EXIT_FOUND, EXIT_ERROR = 0, 1, 2


class Format(str, Enum):
    rich = "rich"
    json = "json"
    sarif = "sarif"


class FailOn(str, Enum):
    backdoored = "backdoored"
    never = "never"


def fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_ERROR)


def torch_out_of_memory() -> type:
    import torch

    return torch.OutOfMemoryError


def guarded(fn):
    """Map every failure to exit code 2 with one line: Typer would exit 1 on an exception,
    which a CI gate would read as 'backdoor found'."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except ScanError as exc:
            raise fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        except KeyboardInterrupt:
            raise fail("interrupted; nothing was written") from None
        except torch_out_of_memory() as exc:  # the reversion halves its micro-batch down to one pair first
            first = (str(exc).splitlines() or [""])[0]
            raise fail(f"out of device memory ({first[:80]}); free the device, use one with more memory, "
                       "or --device cpu; nothing was written") from None
        except Exception as exc:  # an unexpected failure is still exit 2, not "backdoored"
            if os.environ.get("TERD_SCAN_DEBUG"):
                raise
            first = (str(exc).splitlines() or [""])[0]
            raise fail(f"internal error: {type(exc).__name__}: {first} (set TERD_SCAN_DEBUG=1 for the traceback "
                       "and report it)") from None

    return wrapper


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Yields a callback(stage, done, total) that drives one Rich progress bar per stage, on stderr."""
    if not enabled:
        yield None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True) as bars:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update


def quiet_libraries() -> None:
    import warnings

    from diffusers.utils import logging as dlog
    from huggingface_hub.utils import disable_progress_bars

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")


@app.command("model")
@guarded
def model_command(
    source: Annotated[str, typer.Argument(help="Model to scan: a local folder or .safetensors file, or a Hub repo id "
                                               "(org/name or org/name@revision).", show_default=False)],
    preset: PresetOpt = Preset(DEFAULT_PRESET),
    out: Annotated[Optional[Path], typer.Option(help="Folder for report.json, trigger.png, trigger.safetensors "
                                                     "\\[default: ./terd-scan-out/<model name>].")] = None,
    format: Annotated[Format, typer.Option("--format", "-f", help="Report on stdout: rich, json or sarif.")]
    = Format.rich,
    fail_on: Annotated[FailOn, typer.Option(help="Exit 1 when a backdoor is found (backdoored) or never.")]
    = FailOn.backdoored,
    reference: Annotated[Optional[Path], typer.Option(help="Benign reference JSON from 'terd-scan calibrate' "
                                                           "\\[default: the one shipped for the preset and model family].")] = None,
    device: DeviceOpt = Device.auto, seed: SeedOpt = 0,
    stage1_iterations: Stage1Opt = None, stage2_iterations: Stage2Opt = None, batch_size: BatchOpt = None,
    sampler_steps: StepsOpt = None, lr: LrOpt = None, gamma_lr: GammaLrOpt = None, l1_weight: LambdaOpt = None,
    grad_clip: ClipOpt = None, patch_search: PatchSearchOpt = None, narrow_search: NarrowSearchOpt = None,
    canvas_search: CanvasSearchOpt = None, dip_search: DipSearchOpt = None, refine_iterations: RefineOpt = None,
    basin_gate: BasinGateOpt = None, collapse_search: CollapseSearchOpt = None,
    collapse_iterations: CollapseItersOpt = None,
    preview_steps: Annotated[int, typer.Option(min=0, help="DDPM steps for the sample images (0: no images).")]
    = 1000,
    revision: RevisionOpt = None, token: TokenOpt = None, cache_dir: CacheOpt = None, config: ConfigOpt = None,
    allow_pickle: PickleOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No report on stdout; the exit code tells.")] = False,
) -> None:
    """Reverse the trigger of a diffusion model and tell whether it is backdoored."""
    from .report import render_console, to_json, to_sarif
    from .scan import default_out_dir, scan_model, write_artefacts

    quiet_libraries()
    options = scan_options(preset, seed, device, stage1_iterations, stage2_iterations, batch_size, sampler_steps, lr,
                           gamma_lr, l1_weight, grad_clip, revision, token, cache_dir, config, allow_pickle,
                           patch_search=patch_search, narrow_search=narrow_search, canvas_search=canvas_search,
                           dip_search=dip_search,
                           refine_iterations=refine_iterations, basin_gate=basin_gate,
                           collapse_search=collapse_search, collapse_iterations=collapse_iterations,
                           reference=str(reference) if reference else None, preview_steps=preview_steps)
    show_progress = format == Format.rich and not quiet and err_console.is_terminal
    with progress_bars(show_progress) as progress:
        result = scan_model(source, options, progress=progress)
    write_artefacts(result, out or default_out_dir(result))

    report = result.report
    if quiet:
        pass
    elif format == Format.json:
        sys.stdout.write(to_json(report))
    elif format == Format.sarif:
        sys.stdout.write(json.dumps(to_sarif(report), indent=2) + "\n")
    else:
        render_console(report, Console())
    found = report["verdict"] == "backdoored"
    raise typer.Exit(EXIT_FOUND if found and fail_on == FailOn.backdoored else EXIT_CLEAN)


@app.command("calibrate")
@guarded
def calibrate_command(
    sources: Annotated[list[str], typer.Argument(help="Known-benign models (folders, files or Hub repo ids).",
                                                 show_default=False)],
    out: Annotated[Path, typer.Option(help="Where to write the reference JSON.")],
    name: Annotated[Optional[str], typer.Option(help="Name recorded in the reference \\[default: the file name].")]
    = None,
    k_sigma: Annotated[float, typer.Option(min=0.1, help="Thresholds at mu + k sigma of the benign features.")]
    = 3.0,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds: each model is reversed once per seed.")] = "0,1",
    preset: PresetOpt = Preset(DEFAULT_PRESET), device: DeviceOpt = Device.auto, seed: SeedOpt = 0,
    stage1_iterations: Stage1Opt = None, stage2_iterations: Stage2Opt = None, batch_size: BatchOpt = None,
    sampler_steps: StepsOpt = None, lr: LrOpt = None, gamma_lr: GammaLrOpt = None, l1_weight: LambdaOpt = None,
    grad_clip: ClipOpt = None, patch_search: PatchSearchOpt = None, narrow_search: NarrowSearchOpt = None,
    canvas_search: CanvasSearchOpt = None, dip_search: DipSearchOpt = None, refine_iterations: RefineOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None, cache_dir: CacheOpt = None,
    config: ConfigOpt = None, allow_pickle: PickleOpt = False,
) -> None:
    """Build a benign reference: reverse known-benign models with the settings you will scan with."""
    from rich.table import Table

    from .scan import calibrate

    quiet_libraries()
    options = scan_options(preset, seed, device, stage1_iterations, stage2_iterations, batch_size, sampler_steps, lr,
                           gamma_lr, l1_weight, grad_clip, revision, token, cache_dir, config, allow_pickle,
                           patch_search=patch_search, narrow_search=narrow_search, canvas_search=canvas_search,
                           dip_search=dip_search,
                           refine_iterations=refine_iterations,
                           preview_steps=0)
    command = "terd-scan calibrate " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["calibrate"] else ""
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise ScanError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    with progress_bars(err_console.is_terminal) as progress:
        ref = calibrate(sources, options, name=name or out.stem, created_by=command, seeds=seed_list,
                        progress=progress)
    ref.k_sigma = k_sigma
    ref.save(out)
    table = Table(title=f"benign reference {ref.name} -> {out}", title_justify="left")
    for col in ("model", "seed", "mean_kl", "var_kl"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in ref.models:
        table.add_row(m["name"], str(m["seed"]), f"{m['mean_kl']:.4g}", f"{m['var_kl']:.4g}")
    th = ref.thresholds()
    table.add_row("[bold]threshold[/]", "", f"{th['mean_kl']:.4g}", f"{th['var_kl']:.4g}")
    Console().print(table)


app.command("inputs")(inputs_command)


@app.command("version")
def version_command() -> None:
    """Print the version."""
    typer.echo(f"terd-scan {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
