"""`terd-scan inputs NOISE_PATH`: flag starting noises that carry a reversed trigger.

The lead's cli.py registers it with `app.command("inputs")(inputs_command)`. The command is
self-contained: every failure becomes one line on stderr and exit code 2 (never a traceback;
TERD_SCAN_DEBUG=1 re-raises unexpected exceptions);
0 = no poisoned noise, 1 = at least one poisoned noise.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_options import (BasinGateOpt, BatchOpt, CacheOpt, CanvasSearchOpt, ClipOpt, CollapseItersOpt,
                          CollapseSearchOpt, ConfigOpt, Device, DeviceOpt,
                          DipSearchOpt,
                          GammaLrOpt, LambdaOpt, LrOpt, NarrowSearchOpt, PatchSearchOpt, PickleOpt, Preset, PresetOpt, RefineOpt,
                          RevisionOpt, SeedOpt, Stage1Opt, Stage2Opt,
                          StepsOpt, TokenOpt, scan_options)
from .errors import ScanError
from .presets import DEFAULT_PRESET

EXIT_CLEAN, EXIT_POISONED, EXIT_ERROR = 0, 1, 2
# Show a progress bar (stderr, TTY, rich format only) from this many files on.
PROGRESS_MIN_FILES = 8


class OutputFormat(str, Enum):
    rich = "rich"
    json = "json"


def trigger_from_model(model: str, options, show_progress: bool):
    """Reverse MODEL as 'terd-scan model' does, or reuse the cached reversal for the same model file
    hashes and settings; return (Trigger, path of its cached trigger.safetensors)."""
    from .cli import progress_bars, quiet_libraries
    from .scan import reverse_cached

    quiet_libraries()
    with progress_bars(show_progress) as progress:
        trigger, path, _cached = reverse_cached(model, options, progress=progress)
    return trigger, path


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


def _fail(msg: str) -> "typer.Exit":
    sys.stderr.write(f"error: {_one_line(msg)}\n")
    sys.stderr.flush()
    return typer.Exit(EXIT_ERROR)


def _write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise ScanError(f"cannot write report {path}: {exc.strerror or exc} (choose a writable --out path)") from None


def inputs_command(
    noise_path: Annotated[Path, typer.Argument(
        metavar="NOISE_PATH", show_default=False,
        help="Directory of noise files (.safetensors, .npy, .npz, .pt/.pth; format read from the bytes) "
             "or a single noise file. Each tensor is one noise (C,H,W) or a batch (N,C,H,W).")],
    trigger: Annotated[Optional[Path], typer.Option(
        "--trigger", "-t", metavar="PATH", show_default=False,
        help="trigger.safetensors written by 'terd-scan model' (or the --out folder holding it).")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", metavar="SOURCE", show_default=False,
        help="Reverse this model first (as 'terd-scan model', same options below) and use its trigger; the "
             "result is cached per model file hashes and settings ($TERD_SCAN_CACHE, default ~/.cache/terd-scan).")
    ] = None,
    threshold: Annotated[float, typer.Option(
        "--threshold", help="Flag a noise when log N(x; r, gamma^2) - log N(x; 0, I) > threshold.")] = 0.0,
    recursive: Annotated[bool, typer.Option(
        "--recursive", "-r", help="Also scan subdirectories (hidden ones are skipped).")] = False,
    skip_errors: Annotated[bool, typer.Option(
        "--skip-errors", help="Report unreadable/mismatched files but let the exit code reflect the verdicts "
                              "of the noises that were scored.")] = False,
    output_format: Annotated[OutputFormat, typer.Option(
        "--format", "-f", case_sensitive=False,
        help="rich: table on stdout; json: one JSON document on stdout, nothing else.")] = OutputFormat.rich,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", metavar="FILE", show_default=False,
        help="Also write the JSON report to FILE (atomically).")] = None,
    threads: Annotated[int, typer.Option(
        "--threads", min=0, help="torch threads for scoring (not for a --model reversion); 0 = torch's default. "
                                 "Scoring is memory-bound: on a "
                                 "busy 2-core machine two threads measured 3-100x slower than one.")] = 1,
    preset: PresetOpt = Preset(DEFAULT_PRESET), device: DeviceOpt = Device.auto, seed: SeedOpt = 0,
    stage1_iterations: Stage1Opt = None, stage2_iterations: Stage2Opt = None, batch_size: BatchOpt = None,
    sampler_steps: StepsOpt = None, lr: LrOpt = None, gamma_lr: GammaLrOpt = None, l1_weight: LambdaOpt = None,
    grad_clip: ClipOpt = None, patch_search: PatchSearchOpt = None, narrow_search: NarrowSearchOpt = None,
    canvas_search: CanvasSearchOpt = None, dip_search: DipSearchOpt = None, refine_iterations: RefineOpt = None,
    basin_gate: BasinGateOpt = None, collapse_search: CollapseSearchOpt = None,
    collapse_iterations: CollapseItersOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None, cache_dir: CacheOpt = None,
    config: ConfigOpt = None, allow_pickle: PickleOpt = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Nothing on stdout (--out is still written), no progress bar; the exit code "
                              "carries the verdict.")] = False,
) -> None:
    """Flag starting noises x_T that carry a reversed trigger N(r, gamma^2).

    Files are read by content, never unpickled (torch files only via weights-only loading). Hidden files (.DS_Store, .git) and *.partial/*.tmp are skipped; any other file that is not a noise file, or whose shape does not match the trigger, is listed as an error.

    Exit codes: 0 no poisoned noise, 1 at least one poisoned noise, 2 error.
    """
    import torch

    saved_threads = torch.get_num_threads()
    try:
        options = scan_options(preset, seed, device, stage1_iterations, stage2_iterations, batch_size, sampler_steps,
                               lr, gamma_lr, l1_weight, grad_clip, revision, token, cache_dir, config, allow_pickle,
                               patch_search=patch_search, narrow_search=narrow_search, canvas_search=canvas_search,
                               dip_search=dip_search,
                               refine_iterations=refine_iterations, basin_gate=basin_gate,
                               collapse_search=collapse_search, collapse_iterations=collapse_iterations,
                               preview_steps=0) if model is not None else None
        code = _run(noise_path, trigger, model, threshold, recursive, skip_errors, output_format, out, quiet, options,
                    threads)
    except typer.Exit:
        raise
    except ScanError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted") from None
    except torch.OutOfMemoryError:  # the --model reversion already halved its micro-batch down to one pair
        raise _fail("out of device memory while reversing the trigger; free the device, use one with more "
                    "memory, or --device cpu") from None
    except MemoryError:
        raise _fail("out of memory while scoring noises (split the directory or use smaller batch files)") from None
    except Exception as exc:  # never a traceback, never exit 1 (which means "poisoned")
        if os.environ.get("TERD_SCAN_DEBUG"):
            raise
        raise _fail(f"internal error: {type(exc).__name__}: {exc} (set TERD_SCAN_DEBUG=1 for the traceback "
                    "and report it)") from None
    finally:
        torch.set_num_threads(saved_threads)
    raise typer.Exit(code)


def _run(noise_path: Path, trigger_path: Optional[Path], model: Optional[str], threshold: float,
         recursive: bool, skip_errors: bool, output_format: OutputFormat, out: Optional[Path],
         quiet: bool, options=None, threads: int = 1) -> int:
    from . import TOOL_NAME, __version__
    from .input_detection import render_rich, scan_noise_path
    from .trigger import Trigger

    if (trigger_path is None) == (model is None):
        raise ScanError("pass exactly one of --trigger PATH (a trigger.safetensors written by "
                        "'terd-scan model') or --model SOURCE")
    if not math.isfinite(threshold):
        raise ScanError(f"--threshold must be a finite number, got {threshold}")
    if not noise_path.exists():
        raise ScanError(f"noise path not found: {noise_path} (pass a directory of noise files or a noise file)")
    if trigger_path is not None:
        if trigger_path.is_dir() and (trigger_path / "trigger.safetensors").is_file():
            trigger_path = trigger_path / "trigger.safetensors"  # the --out folder of 'terd-scan model'
        trig = Trigger.load(trigger_path)
    else:
        trig, trigger_path = trigger_from_model(model, options, show_progress=not (
            output_format == OutputFormat.json or quiet) and sys.stderr.isatty())

    # --threads applies to the scoring only (memory-bound), not to a --model reversion (compute-bound).
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    as_json = output_format == OutputFormat.json
    show_progress = not (as_json or quiet) and sys.stderr.isatty()
    exclude = [p for p in (out, trigger_path) if p is not None]

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err_console = Console(stderr=True)
    progress = Progress(TextColumn("scoring noises"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err_console, transient=True, disable=not show_progress)
    task = {}

    def on_start(n: int) -> None:
        if n >= PROGRESS_MIN_FILES:
            progress.start()
            task["id"] = progress.add_task("scoring", total=n)

    def on_file(_p) -> None:
        if "id" in task:
            progress.advance(task["id"])

    try:
        result = scan_noise_path(noise_path, trig, recursive=recursive, threshold=threshold,
                                 exclude=exclude, on_start=on_start, on_file=on_file)
    finally:
        progress.stop()
    # The report names the trigger file as given, hashes it, and records the tool.
    from .input_detection import trigger_summary

    result.trigger = trigger_summary(trig, trigger_path, threshold)
    doc = result.to_dict(tool=TOOL_NAME, version=__version__)
    text = json.dumps(doc, allow_nan=False)
    if out is not None:
        _write_atomic(out, text + "\n")
    if quiet:
        pass  # the exit code (and --out) carry the result
    elif as_json:
        for w in result.trigger.get("warnings", []):
            sys.stderr.write(f"warning: {_one_line(w)}\n")
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        render_rich(result, Console(), skip_errors=skip_errors)
        if out is not None:
            Console().print(f"report written to {out}", markup=False, highlight=False)
    code = result.exit_code(skip_errors)
    if code == EXIT_ERROR:
        # One line on stderr too, for CI logs (stdout keeps the table or the JSON document).
        if result.errors and not skip_errors:
            first = result.errors[0]
            where = first.file + (f" [{first.key}]" if first.key else "")
            files = len({e.file for e in result.errors})
            sys.stderr.write(f"error: {files} of {len(result.files)} file(s) could not be fully scored "
                             f"(first: {where}: {_one_line(first.error)}); fix them or pass --skip-errors "
                             "to judge the others\n")
        else:
            sys.stderr.write(f"error: no noise in {noise_path} could be scored ({len(result.errors)} error(s))\n")
    return code
