"""TERD trigger reversion: learn the noise distribution N(r, gamma^2) that makes the model
behave like a backdoor, with no knowledge of the attack (stage 1 estimation, stage 2
refinement through a differentiable few-step DDIM sampler)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .canvas_search import CANVAS_KEEP_RATIO, canvas_ratio, search_canvas_seed
from .detection import kl_features
from .dip_search import DIP_KEEP_RATIO, dip_profile, dip_screen
from .memory_plan import memory_plan
from .narrow_search import KEEP_RATIO, narrow_ratio, search_narrow_seed
from .pair_loss import common_pairs, pair_losses
from .patch_search import search_patch_seed
from .presets import ReversionSettings

# Each search draws from its own generator, seeded at the scan's seed plus an offset, so adding or
# switching off one search leaves the others' draws (and their cached results) unchanged.
PATCH_SEED_OFFSET, NARROW_SEED_OFFSET, CANVAS_SEED_OFFSET, DIP_SEED_OFFSET = 1_000_003, 2_000_003, 3_000_003, 4_000_003


def search_generator(seed: int, offset: int, device="cpu") -> torch.Generator:
    """The generator a search draws from in a scan at `seed` (its offset above); benchmarks and tests that
    replay one search take it from here to see what the scan sees."""
    return torch.Generator(device=device).manual_seed(seed + offset)


@dataclass
class ReversionResult:
    r: torch.Tensor  # (C, H, W), on the CPU
    gamma: torch.Tensor  # (C, H, W), on the CPU
    trace: dict[str, list[float]] = field(default_factory=dict)  # per-iteration stage, loss, ||r||, ...
    seconds: dict[str, float] = field(default_factory=dict)
    network_evaluations: int = 0
    search: dict | None = None  # the patch search's best candidate and the runs it led to
    start: str = ""  # where the chosen run started
    narrow: dict | None = None  # the narrow-noise search: its probe, test and seeded run
    canvas: dict | None = None  # the canvas search: its best offset and whether it seeded a run
    dip: dict | None = None  # the dip search: the loss at r = 0 along its gammas and whether it seeded a run
    runs: list[dict] = field(default_factory=list)  # every run: start, features, chosen
    memory: dict = field(default_factory=dict)  # memory_plan.MemoryPlan of the gradient passes


# progress(stage_name, iterations_done, iterations_total)
Progress = Callable[[str, int, int], None]


def _timesteps(lo: int, hi: int, n: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(lo, hi + 1, (n,), generator=generator, device=device)


def reverse_trigger(denoiser, settings: ReversionSettings, seed: int = 0,
                    progress: Progress | None = None) -> ReversionResult:
    """Run stage 1 and stage 2 from the paper's start r = -U[0,1). With settings.patch_search,
    also search for a sparse patch trigger (patch_search.py) and, when a candidate has a basin
    behind it, run both stages again from it; with settings.narrow_search, probe narrow starting
    noise (narrow_search.py) and, when the loss falls as the noise narrows, run both stages from
    there with gamma learned, and refine r at a few held gammas when that run stays narrow
    (_refine_narrow_run), or, when it spreads back (or, with settings.narrow_sweep_unseeded, when the
    screen seeds no run), descend r from the screen's offset at each screened gamma held
    (_held_gamma_sweep); with settings.canvas_search, screen constant canvases
    (canvas_search.py) and, when the loss falls toward one, run both stages from it; with
    settings.dip_search, walk r = 0 down a grid of gammas (dip_search.py) and, when the loss dips at a
    narrowed gamma, descend r from 0 with that gamma held (_dip_run).

    The result: a narrow-seeded run (learned or held gamma) whose end point still passes the narrow test; otherwise a
    dip-seeded run whose end point still dips; otherwise a canvas-seeded run whose end point still passes the canvas test; otherwise the
    run whose KL is most concentrated (largest variance over dimensions), among the paper's, the
    patch-seeded and a kept unseeded sweep: a run with no basin to hold it spreads back toward
    N(0, I). (An unseeded sweep competes rather than wins: near any backdoor's trigger a narrower
    noise can lower the loss, as on the VillanDiffusion stop signs, where the sweep passes its test
    at gamma 0.8 with r at cosine 0.66 while the paper's run has 0.75 and the larger variance.)
    Each search draws from its own generator, so where the narrow or canvas search does not fire
    the result is the same as without it. Benign references are calibrated with the same
    procedure. Deterministic given the seed and the device."""
    s = settings
    device = denoiser.device
    start_evals = denoiser.evaluations
    # What fits in memory; the runs below halve its micro-batch when a GPU runs out (memory_plan.py)
    denoiser.memory_plan = memory_plan(denoiser.input_shape, s.batch_size, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    r0 = -torch.rand(denoiser.input_shape, generator=gen, device=device)  # the paper's initialisation
    start = "paper: -U[0,1)"
    if s.centred_start:
        r0, start = r0 + 0.5, "centred: U[-0.5,0.5)"
    runs = [_two_stage_run(denoiser, s, r0, gen, progress, start, "")]
    search = None
    search_seconds = 0.0
    if s.patch_search:
        seed_gen = search_generator(seed, PATCH_SEED_OFFSET, device)
        found, search_seconds = _timed("patch search", progress, lambda: search_patch_seed(
            denoiser, s.patch_size, s.patch_amplitude, s.patch_pairs, s.timestep_window, seed_gen))
        search = {**found.summary(), "seeded_run": found.has_basin}
        if found.has_basin:  # the loss falls as the patch grows
            runs.append(_two_stage_run(denoiser, s, found.r.to(device), seed_gen, progress,
                                       f"patch seed at ({found.top}, {found.left})", " (patch seed)"))
    narrow = None
    narrow_index = None
    narrow_seconds = refine_seconds = 0.0
    if s.narrow_search:
        narrow_gen = search_generator(seed, NARROW_SEED_OFFSET, device)
        probe, narrow_seconds = _timed("narrow-noise search", progress, lambda: search_narrow_seed(
            denoiser, s.narrow_gammas, s.narrow_amplitudes, s.narrow_pairs, s.timestep_window, narrow_gen))
        narrow = {**probe.summary(), "seeded_run": probe.has_basin, "end_ratio": None, "kept": False}
        if probe.has_basin:  # the loss falls as the noise narrows; kept if the run stays narrow
            narrow_index = _tested_run(runs, narrow, KEEP_RATIO, lambda: _two_stage_run(
                denoiser, s, probe.r, narrow_gen, progress,
                f"narrow-noise seed (offset {narrow['offset']}, gamma {probe.gamma:g})", " (narrow seed)",
                gamma_start=probe.gamma), lambda run: narrow_ratio(
                denoiser, run.r, run.gamma, s.narrow_pairs, s.timestep_window, narrow_gen))
            t0 = time.perf_counter()
            if narrow["kept"] and s.narrow_refine_iterations > 0:
                runs[narrow_index], narrow["refine"] = _refine_narrow_run(denoiser, s, runs[narrow_index],
                                                                          narrow_gen, progress)
            elif s.narrow_refine_iterations > 0:  # the learned-gamma run spread back: try the gammas held
                held, narrow["held"] = _held_gamma_sweep(denoiser, s, probe, runs[narrow_index].seconds,
                                                         narrow_gen, progress)
                if narrow["held"]["kept"]:
                    runs[narrow_index], narrow["kept"] = held, True
            refine_seconds = time.perf_counter() - t0
        elif s.narrow_sweep_unseeded and s.narrow_refine_iterations > 0:  # no basin: the held sweep alone
            t0 = time.perf_counter()
            held, narrow["held"] = _held_gamma_sweep(denoiser, s, probe, {"stage1": 0.0, "stage2": 0.0},
                                                     narrow_gen, progress, stop_at_rise=True)
            if narrow["held"]["kept"]:  # one more candidate run; an unkept sweep is none, the result as without it
                runs.append(held)
                narrow_index, narrow["kept"] = len(runs) - 1, True
            refine_seconds = time.perf_counter() - t0
    # a kept narrow run from a seeded screen is the result whatever a canvas run gives, so none is made then
    narrow_won = narrow is not None and narrow["kept"] and narrow["seeded_run"]
    dip = dip_index = None
    dip_seconds = 0.0
    if s.dip_search:  # the loss dips at a narrowed gamma; kept if it still dips at the run's end point
        dip_gen = search_generator(seed, DIP_SEED_OFFSET, device)
        dip, dip_index, dip_seconds = _screened_run(
            runs, "dip search", progress, lambda: dip_screen(denoiser, s, dip_gen),
            narrow_won, DIP_KEEP_RATIO, lambda found: _dip_run(denoiser, s, found.gamma, dip_gen, progress),
            lambda run: _dip_at(denoiser, s, run, dip_gen))
    dip_won = dip is not None and dip["kept"]
    canvas = canvas_index = None
    canvas_seconds = 0.0
    if s.canvas_search:  # the loss falls toward the canvas; kept if it still falls toward the end point
        canvas_gen = search_generator(seed, CANVAS_SEED_OFFSET, device)
        canvas, canvas_index, canvas_seconds = _screened_run(
            runs, "canvas search", progress, lambda: search_canvas_seed(
                denoiser, s.canvas_amplitudes, s.canvas_pairs, s.timestep_window, canvas_gen),
            narrow_won or dip_won, CANVAS_KEEP_RATIO, lambda found: _two_stage_run(
                denoiser, s, found.r.to(device), canvas_gen, progress, f"canvas seed {found.offset()}", " (canvas seed)"),
            lambda run: canvas_ratio(denoiser, run.r, s.canvas_pairs, s.timestep_window, canvas_gen),
            report_basin=True)
    for run in runs:
        if not (torch.isfinite(run.r).all() and torch.isfinite(run.gamma).all()):
            raise FloatingPointError("trigger reversion diverged (NaN/Inf); try a smaller --lr")
    features = [kl_features(run.r, run.gamma) for run in runs]
    if narrow_won:
        chosen = narrow_index
    elif dip_won:
        chosen = dip_index
    elif canvas is not None and canvas["kept"]:
        chosen = canvas_index
    else:  # an unkept narrow or canvas run never wins; a kept unseeded sweep competes like the others
        unkept = {i for i, outcome in ((narrow_index, narrow), (canvas_index, canvas), (dip_index, dip))
                  if i is not None and not outcome["kept"]}
        chosen = max((i for i in range(len(runs)) if i not in unkept), key=lambda i: features[i].var_kl)
    seconds = {"stage1": sum(run.seconds["stage1"] for run in runs),
               "stage2": sum(run.seconds["stage2"] for run in runs), "patch_search": search_seconds,
               "narrow_search": narrow_seconds, "narrow_refine": refine_seconds, "canvas_search": canvas_seconds,
               "dip_search": dip_seconds}
    run_list = [{"start": run.start, **f.to_dict(), "chosen": i == chosen}
                for i, (run, f) in enumerate(zip(runs, features))]
    if search is not None:
        search["runs"] = run_list
    best = runs[chosen]
    return ReversionResult(r=best.r.cpu(), gamma=best.gamma.cpu(), trace=best.trace, seconds=seconds,
                           network_evaluations=denoiser.evaluations - start_evals, search=search,
                           start=best.start, narrow=narrow, canvas=canvas, dip=dip, runs=run_list,
                           memory=denoiser.memory_plan.to_dict())


def _tested_run(runs: list, outcome: dict, keep_below: float, run: Callable[[], "_Run"],
                end_test: Callable[["_Run"], float]) -> int:
    """A seeded run and the test at its end point: append the run, record its end ratio and
    whether it is kept (end ratio < keep_below) in `outcome`, and return the run's index."""
    done = run()
    end_ratio = end_test(done)
    outcome.update(end_ratio=round(end_ratio, 4), kept=end_ratio < keep_below)
    runs.append(done)
    return len(runs) - 1


def _screened_run(runs: list, name: str, progress: Progress | None, screen: Callable, moot: bool, keep_below: float,
                  run: Callable, end_test: Callable[["_Run"], float], report_basin: bool = False):
    """A global search: its screen (timed), and, when it seeds a run and no earlier kept run made one
    moot, that run and its end test (_tested_run). (The outcome dict for the report, the run's index or
    None, the screen's seconds.) report_basin adds whether the screen found one even when moot."""
    found, seconds = _timed(name, progress, screen)
    outcome = {**found.summary(), **({"basin": found.has_basin} if report_basin else {}),
               "seeded_run": found.has_basin and not moot, "end_ratio": None, "kept": False}
    index = _tested_run(runs, outcome, keep_below, lambda: run(found), end_test) if outcome["seeded_run"] else None
    return outcome, index, seconds


def _timed(name: str, progress: Progress | None, search: Callable):
    """Run a one-shot search with a 0/1 progress tick; (its result, seconds)."""
    t0 = time.perf_counter()
    if progress:
        progress(name, 0, 1)
    result = search()
    if progress:
        progress(name, 1, 1)
    return result, time.perf_counter() - t0


def _refine_narrow_run(denoiser, s: ReversionSettings, run: "_Run", gen: torch.Generator,
                       progress: Progress | None) -> tuple["_Run", dict]:
    """A kept narrow run, refined: r descended again (stage-1 loss, s.narrow_refine_iterations) at
    each gamma = gamma_run * scale with gamma held, and the refinement with the lowest loss on common
    pairs is the result (with its iterations appended to the trace as stage 3).

    Why: r and gamma are coupled, and the seeded run stops where learning gamma stalls, wider than
    the trigger and with r only partly found. On trojdiff-blend (fast, seed 0) it ends at gamma 0.74
    (true 0.6) with cosine 0.69 to the true r; the loss there is 3.6 on 64 common pairs, against 2.9
    at the true trigger, and at gamma 0.6 it falls monotonically from the found r to the true one.
    Descent on r alone at gamma 0.63 reaches cosine 0.92 with loss 2.93 (the lowest of the four
    scales). On the DDPM-adapted variant the found gamma already has the lowest loss and stays."""
    scales = list(s.narrow_refine_scales)
    losses, k, best = _held_gamma_descents(denoiser, s, run.r, [run.gamma * scale for scale in scales],
                                           [f" (narrow refine, gamma x{scale:g})" for scale in scales],
                                           run.start, gen, progress)
    trace = {key: run.trace[key] + ([3] * len(best.trace["stage"]) if key == "stage" else best.trace[key])
             for key in run.trace}
    outcome = {"scales": scales, "losses": losses, "scale": scales[k], "gamma_mean": round(float(best.gamma.mean()), 4)}
    return _Run(r=best.r, gamma=best.gamma, trace=trace, seconds=run.seconds,
                start=f"{run.start}, refined at gamma x{scales[k]:g}"), outcome


def _held_gamma_sweep(denoiser, s: ReversionSettings, probe, seconds: dict, gen: torch.Generator,
                      progress: Progress | None, stop_at_rise: bool = False) -> tuple["_Run", dict]:
    """After a narrow-seeded run that spread back, or (s.narrow_sweep_unseeded) after a screen that
    seeded none: r descended from the screen's offset at each screened gamma (s.narrow_gammas) held,
    the lowest loss on common pairs picked, and kept only if the narrow test still holds at its end
    point (ratio < KEEP_RATIO), as for the learned run. The result carries `seconds` as its stage
    seconds (the spread run's, or zeros), as a refinement does: the descents are timed as narrow_refine.
    With stop_at_rise (the unseeded sweep: the screen gave no sign of a narrow-trained model) the
    gammas are walked from the widest and the walk stops at the first whose loss is higher than the
    one before: a benign model's loss only rises as its noise narrows, so its sweep costs two
    descents instead of four; on every unseeded zoo sweep (51 models at seed 0, the 14 calibration
    benign ones at seed 1) the loss along the full grid fell to one minimum and rose after it, so the
    pick is the full grid's (the end test's pairs are drawn after fewer descents, so its ratio differs).

    Why: learning gamma from the screen's (offset, gamma) can let the run widen back to gamma ~ 1
    before r has moved, when the trigger is far from any constant offset. On trojdiff-blend-smiley (a
    mixed-palette blend picture; fast, seed 0) the learned run ended at narrow ratio 0.94 with r
    unrelated to the trigger (cosine 0.04); 100 iterations with gamma held at 0.6 reach cosine 0.92
    and loss 3.13 on 64 common pairs (3.21 at the true trigger; 6.7 at gamma 0.8, 23.9 at 0.4), end
    ratio 0.14. The screen seeds no run on any benign zoo model (best ratio 1.27 and up), and forced
    through this sweep benign models end at ratio 1.65-2.15, far from the 0.8 it must pass.

    Unseeded: on trojdiff-smiley-hat-checkers (a holdout then, ASR 31/32) no constant offset lowers the loss
    as the noise narrows (best ratio 1.64), yet the sweep from that offset keeps gamma 0.6 at end
    ratio 0.17 with cosine 0.94 to the trigger; on the 26 benign zoo models (pixel, latent, VE) it
    ends at 0.97-3.28 and is not kept (docs/METHOD.md, "Narrow-noise search")."""
    gammas = [float(g) for g in s.narrow_gammas]
    if stop_at_rise:  # from the widest
        gammas.sort(reverse=True)
    start = f"narrow-noise seed (offset {probe.offset()}), gamma held"
    losses, k, best = _held_gamma_descents(denoiser, s, probe.r, gammas,
                                           [f" (narrow seed, gamma {g:g} held)" for g in gammas], start, gen, progress,
                                           stop_at_rise)
    gammas = gammas[:len(losses)]  # the ones descended
    end_ratio = narrow_ratio(denoiser, best.r, best.gamma, s.narrow_pairs, s.timestep_window, gen)
    outcome = {"gammas": gammas, "losses": losses, "gamma": gammas[k], "end_ratio": round(end_ratio, 4),
               "kept": end_ratio < KEEP_RATIO}
    return _Run(r=best.r, gamma=best.gamma, trace=best.trace, seconds=seconds,
                start=f"{start} at {gammas[k]:g}"), outcome


def _held_gamma_descents(denoiser, s: ReversionSettings, r_start: torch.Tensor, gammas: list, labels: list[str],
                         start: str, gen: torch.Generator, progress: Progress | None,
                         stop_at_rise: bool = False) -> tuple[list, int, "_Run"]:
    """r descended from r_start (stage-1 loss, s.narrow_refine_iterations) at each gamma held (a number
    or a (C, H, W) tensor), in order, or with stop_at_rise until the first loss higher than the one
    before; (the losses on common pairs, rounded; the index of the lowest; its run). A NaN loss (a
    diverged descent) never wins, and counts as a rise."""
    x0, t, e = common_pairs(denoiser, s.narrow_pairs, s.timestep_window, gen)
    held = s.override(stage1_iterations=s.narrow_refine_iterations, stage2_iterations=0, gamma_lr=0.0)
    losses, runs = [], []
    for gamma, label in zip(gammas, labels):
        run = _two_stage_run(denoiser, held, r_start, gen, progress, start, label, gamma_start=gamma)
        with torch.no_grad():
            loss = float(pair_losses(denoiser, x0, run.r, run.gamma, t, 1.0, e).mean())
        losses.append(float("inf") if math.isnan(loss) else loss)
        runs.append(run)
        if stop_at_rise and len(losses) > 1 and losses[-1] > losses[-2]:
            break
    k = min(range(len(losses)), key=losses.__getitem__)
    return [round(loss, 4) for loss in losses], k, runs[k]


def _dip_run(denoiser, s: ReversionSettings, gamma: float, gen: torch.Generator, progress: Progress | None) -> "_Run":
    """r descended from 0 with gamma held at the screen's dip (stage-1 loss, s.narrow_refine_iterations).

    Why held: a faint trigger's r is small against the noise, so the dip in gamma is what the model
    gives away; learning gamma from there lets it widen back toward 1, where the benign noise already
    has a low loss, as the learned narrow runs do on blend triggers far from any offset."""
    zero = torch.zeros(tuple(denoiser.input_shape), device=denoiser.device)
    _, _, run = _held_gamma_descents(denoiser, s, zero, [gamma], [f" (dip seed, gamma {gamma:g} held)"],
                                     f"dip seed (r = 0, gamma {gamma:g} held)", gen, progress)
    return run


def _dip_at(denoiser, s: ReversionSettings, run: "_Run", gen: torch.Generator) -> float:
    """The end test: at the run's r, its loss at the held gamma over the highest at any wider grid gamma."""
    held = float(run.gamma.mean())
    grid = sorted({float(g) for g in s.dip_gammas if float(g) > held + 1e-9} | {held}, reverse=True)
    _, _, losses = dip_profile(denoiser, run.r, grid, s.dip_pairs, s.timestep_window, gen)
    return losses[-1] / max(max(losses[:-1]), 1e-12) if len(losses) > 1 else float("inf")


@dataclass
class _Run:
    r: torch.Tensor
    gamma: torch.Tensor
    trace: dict
    seconds: dict
    start: str  # where the run started, for the report


def _two_stage_run(denoiser, s: ReversionSettings, r_start: torch.Tensor, gen: torch.Generator,
                   progress: Progress | None, start: str, label: str,
                   gamma_start: float | torch.Tensor = 1.0) -> _Run:
    """TERD's stage 1 and stage 2 from (r_start, gamma_start: a number or a (C, H, W) tensor); label
    is appended to progress names."""
    device = denoiser.device
    shape = denoiser.input_shape
    r = r_start.detach().clone().requires_grad_(True)
    if isinstance(gamma_start, torch.Tensor):
        gamma = gamma_start.detach().clone().to(device).clamp_(min=s.gamma_floor).requires_grad_(True)
    else:
        gamma = torch.full(shape, float(gamma_start), device=device).requires_grad_(True)
    late = denoiser.last_timesteps(s.timestep_window)
    early = (0, s.timestep_window - 1)
    trace: dict[str, list[float]] = {"stage": [], "loss": [], "r_l1_mean": [], "gamma_mean": []}
    seconds: dict[str, float] = {}

    def optimiser(iterations: int, gamma_lr: float):
        opt = torch.optim.SGD([{"params": [r], "lr": s.lr}, {"params": [gamma], "lr": gamma_lr}], momentum=0.0)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iterations, 1))

    def record(stage: int, loss: torch.Tensor) -> None:
        trace["stage"].append(stage)
        trace["loss"].append(float(loss.detach()))
        trace["r_l1_mean"].append(float(r.detach().abs().mean()))
        trace["gamma_mean"].append(float(gamma.detach().mean()))

    def apply(opt, sched, clip: float | None) -> None:
        """The optimiser step on the gradients accumulated in r and gamma."""
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([r], clip)
        opt.step()
        sched.step()
        with torch.no_grad():  # gamma is a standard deviation: keep it above a small floor
            gamma.clamp_(min=s.gamma_floor)

    if getattr(denoiser, "memory_plan", None) is None:  # reverse_trigger sets it; a run on its own starts here
        denoiser.memory_plan = memory_plan(shape, s.batch_size, device)

    def chunked_step(opt, sched, part: Callable[[slice], torch.Tensor], clip: float | None,
                     micro_batch: int) -> torch.Tensor:
        """step() on the batch's mean loss, its gradient accumulated micro_batch rows at a time: part(rows)
        is the loss of those rows summed and divided by the batch size. Returns the loss (detached)."""
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)
        for i in range(0, s.batch_size, micro_batch):
            piece = part(slice(i, min(i + micro_batch, s.batch_size)))
            piece.backward()
            loss += piece.detach()
        (-s.l1_weight * r.abs().sum()).backward()
        apply(opt, sched, clip)
        return loss

    def gradient_step(opt, sched, part: Callable[[slice], torch.Tensor], clip: float | None) -> torch.Tensor:
        """One optimiser step on the batch's loss (part(rows): the loss of those rows summed over the batch
        size): the whole batch in one pass while the denoiser's memory plan allows, else chunk by chunk. On
        running out of device memory the plan's micro-batch is halved and the step retried with the same
        draws (nothing was applied: the optimiser steps only after the last chunk)."""
        while True:
            plan = denoiser.memory_plan
            try:
                if plan.micro_batch >= s.batch_size and not plan.checkpointed_sampler:
                    opt.zero_grad(set_to_none=True)  # one backward, as the zoo and the references were measured
                    loss = part(slice(0, s.batch_size))
                    (loss - s.l1_weight * r.abs().sum()).backward()
                    apply(opt, sched, clip)
                    return loss
                return chunked_step(opt, sched, part, clip, plan.micro_batch)
            except torch.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                smaller = plan.halved()
                if smaller is None:
                    raise
                denoiser.memory_plan = smaller
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()

    def pairs(e: torch.Tensor, rows: slice) -> torch.Tensor:
        """The noise pairs of these rows: e holds 2 * batch noises, pair k is (e[k], e[batch + k])."""
        b = s.batch_size
        return e if rows.stop - rows.start == b else torch.cat([e[rows], e[b + rows.start:b + rows.stop]])

    def mean_over_batch(losses: torch.Tensor) -> torch.Tensor:
        return losses.mean() if losses.shape[0] == s.batch_size else losses.sum() / s.batch_size

    # Stage 1, estimation: surrogate x0 ~ N(0, I) is enough near t = T, where abar ~ 0.
    # Every draw of an iteration comes first, in the order pair_loss would make them, so a retried step
    # (out of memory) or a split batch sees the same noises.
    t0 = time.perf_counter()
    opt, sched = optimiser(s.stage1_iterations, s.gamma_lr)
    for i in range(s.stage1_iterations):
        x0 = torch.randn((s.batch_size, *shape), generator=gen, device=device)
        t = _timesteps(*late, s.batch_size, gen, device)
        e = torch.randn((2 * s.batch_size, *shape), generator=gen, device=device)
        loss = gradient_step(opt, sched, lambda rows: mean_over_batch(
            pair_losses(denoiser, x0[rows], r, gamma, t[rows], 1.0, pairs(e, rows))), None)
        record(1, loss)
        if progress:
            progress("stage 1: estimation" + label, i + 1, s.stage1_iterations)
    seconds["stage1"] = time.perf_counter() - t0

    # Stage 2, refinement: x0 := what the model generates from the current trigger, through a
    # differentiable DDIM sampler, so the gradient also flows through generation into r.
    t0 = time.perf_counter()
    opt, sched = optimiser(s.stage2_iterations, s.gamma_lr * s.stage2_gamma_lr_scale)
    for i in range(s.stage2_iterations):
        e = torch.randn((s.batch_size, *shape), generator=gen, device=device)
        t_late = _timesteps(*late, s.batch_size, gen, device)
        t_early = _timesteps(*early, s.batch_size, gen, device)
        e_late = torch.randn((2 * s.batch_size, *shape), generator=gen, device=device)
        e_early = torch.randn((2 * s.batch_size, *shape), generator=gen, device=device)

        def part(rows: slice) -> torch.Tensor:
            x0 = denoiser.ddim_sample(gamma * e[rows] + r, s.sampler_steps,
                                      checkpoint=denoiser.memory_plan.checkpointed_sampler)
            return 0.5 * (mean_over_batch(pair_losses(denoiser, x0, r, gamma, t_late[rows], 1.0, pairs(e_late, rows)))
                          + mean_over_batch(pair_losses(denoiser, x0, r, gamma, t_early[rows], 0.0,
                                                        pairs(e_early, rows))))

        loss = gradient_step(opt, sched, part, s.stage2_grad_clip)
        record(2, loss)
        if progress:
            progress("stage 2: refinement" + label, i + 1, s.stage2_iterations)
    seconds["stage2"] = time.perf_counter() - t0
    return _Run(r=r.detach(), gamma=gamma.detach(), trace=trace, seconds=seconds, start=start)
