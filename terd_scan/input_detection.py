"""TERD input detection: flag starting noises x_T that carry a reversed trigger N(r, diag gamma^2).

Score (log-likelihood ratio, closed form, O(d) per noise, never a dense covariance):

    s(x) = log N(x; r, diag gamma^2) - log N(x; 0, I)
         = sum_i [ -log gamma_i - (x_i - r_i)^2 / (2 gamma_i^2) + x_i^2 / 2 ]
         = c + sum_i a_i x_i^2 + sum_i b_i x_i,
    a = (1 - 1/gamma^2) / 2,  b = r / gamma^2,  c = -sum(log gamma) - sum(r^2 / (2 gamma^2))

computed in float64 (two matrix-vector products per batch). A noise is poisoned when s > threshold
(0 in the paper: the trigger distribution is more likely than the benign N(0, I)).

Library API (for services that filter inline):
    score_noises(trigger, x)                 -> float64 scores, (N,) for (N,C,H,W) or () for (C,H,W)
    is_poisoned(trigger, x, threshold=0.0)   -> bool tensor, same shape as the scores
    NoiseFilter(trigger, threshold=0.0)      -> reusable: .scores(x), .is_poisoned(x), .benign(x)
    scan_noise_path(path, trigger, recursive=False, threshold=0.0) -> InputsResult
NaN/Inf in a noise raise NonFiniteNoiseError (never scored as benign: a filter must not fail open);
a shape that does not match the trigger raises NoiseShapeError. Both are ScanErrors.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .errors import ScanError
from .noise_files import NoiseFileError, list_noise_files, read_noise_file
from .safety import sha256_file
from .trigger import COLLAPSE_START, Trigger

__all__ = [
    "InvalidNoiseError", "NonFiniteNoiseError", "NoiseShapeError", "NoiseFilter", "score_noises", "is_poisoned",
    "scan_noise_path", "InputsResult", "NoiseRecord", "NoiseFileIssue", "FileSummary",
    "render_rich", "trigger_summary", "trigger_warnings", "synthetic_trigger", "SYNTHETIC_TRIGGERS",
    "sample_trigger_noises", "detection_rates", "ground_truth_trigger",
]

VERDICT_POISONED = "poisoned"
VERDICT_BENIGN = "benign"
# Rows per float64 chunk: about this many elements (512 KB), so a chunk and its square stay in cache
# (measured on a 2-core CPU: 4-5x faster than 32 MB chunks for d = 3*32*32).
_CHUNK_ELEMENTS = 1 << 16


class InvalidNoiseError(ScanError):
    """A noise that cannot be scored (base of the two below)."""


class NonFiniteNoiseError(InvalidNoiseError):
    """A noise holds NaN or Inf: it cannot be scored."""


class NoiseShapeError(InvalidNoiseError):
    """A noise is not a floating-point tensor shaped like the trigger (C, H, W) or a batch of it (N, C, H, W)."""


# --------------------------------------------------------------------------- scoring

class NoiseFilter:
    """Scores noises against one trigger; keeps the O(d) coefficients (per device) between calls.

    >>> filt = NoiseFilter(Trigger.load("trigger.safetensors"))
    >>> keep = filt.benign(batch)          # the noises that may be sampled from
    """

    def __init__(self, trigger: Trigger, threshold: float = 0.0):
        if not isinstance(trigger, Trigger):
            raise TypeError("NoiseFilter needs a terd_scan.trigger.Trigger (use Trigger.load(path))")
        threshold = float(threshold)
        if not math.isfinite(threshold):
            raise ScanError(f"threshold must be a finite number, got {threshold}")
        gamma = trigger.gamma.detach().to(torch.float64)
        if gamma.shape != trigger.r.shape or not torch.isfinite(gamma).all() or (gamma <= 0).any():
            raise ScanError("trigger gamma must be finite, positive and shaped like r")
        r = trigger.r.detach().to(torch.float64).reshape(-1)
        inv_var = (1.0 / gamma.reshape(-1)) ** 2
        self.trigger = trigger
        self.threshold = threshold
        self.shape = tuple(trigger.r.shape)
        self.dim = r.numel()
        self._a = 0.5 * (1.0 - inv_var)
        self._b = r * inv_var
        self._c = float(-torch.log(gamma).sum() - 0.5 * (r * r * inv_var).sum())
        self._per_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def expected_rates(self) -> dict:
        """Closed-form mean and standard deviation of the score under the benign N(0, I) and under
        the trigger distribution itself, and the error rates they imply at the threshold (normal
        approximation of a sum of d independent terms; exact when gamma = 1, where the score is
        Gaussian). `kl` = KL(trigger || N(0, I)) = the mean score of trigger noises.

        A trigger close to N(0, I) (small kl, e.g. one reversed from a benign model) separates
        poorly: expect false positives. This is about the trigger given; how well it matches the
        model's real trigger is another matter (see benchmarks/bench_inputs.py --reversed)."""
        a, b = self._a, self._b
        g = self.trigger.gamma.detach().to(torch.float64).reshape(-1)
        r = self.trigger.r.detach().to(torch.float64).reshape(-1)
        mu_b = self._c + float(a.sum())
        sd_b = math.sqrt(float((2 * a * a + b * b).sum()))
        mu_p = self._c + float((a * (r * r + g * g) + b * r).sum())
        sd_p = math.sqrt(float(((2 * a * r * g + b * g) ** 2 + 2 * (a * g * g) ** 2).sum()))

        def upper(mu, sd):  # P(score > threshold)
            if sd == 0:
                return float(mu > self.threshold)
            return 0.5 * math.erfc((self.threshold - mu) / (sd * math.sqrt(2)))

        return {"kl": mu_p, "benign_mean": mu_b, "benign_sd": sd_b, "trigger_mean": mu_p, "trigger_sd": sd_p,
                "expected_fpr": upper(mu_b, sd_b), "expected_tpr": upper(mu_p, sd_p)}

    def _coeffs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._per_device:
            self._per_device[device] = (self._a.to(device), self._b.to(device))
        return self._per_device[device]

    def _as_batch(self, x) -> tuple[torch.Tensor, bool]:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor or numpy array, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise NoiseShapeError(f"noise dtype {str(x.dtype).replace('torch.', '')} is not floating point")
        shape = tuple(x.shape)
        if shape == self.shape:
            return x.reshape(1, self.dim), True
        if len(shape) == len(self.shape) + 1 and shape[1:] == self.shape:
            return x.reshape(shape[0], self.dim), False
        raise NoiseShapeError(f"noise shape {shape} does not match the trigger {self.shape}: "
                              f"expected {self.shape} or (N, {', '.join(map(str, self.shape))})")

    def scores(self, x) -> torch.Tensor:
        """Log-likelihood ratio per noise, float64: shape (N,) for (N,C,H,W), () for (C,H,W)."""
        flat, single = self._as_batch(x)
        n = flat.shape[0]
        a, b = self._coeffs(flat.device)
        out = torch.empty(n, dtype=torch.float64, device=flat.device)
        row_sums = torch.empty(n, dtype=torch.float64, device=flat.device)
        rows = max(1, _CHUNK_ELEMENTS // max(self.dim, 1))
        for start in range(0, n, rows):
            chunk = flat[start:start + rows].to(torch.float64)
            out[start:start + rows] = self._c + (chunk * chunk) @ a + chunk @ b
            # NaN/Inf detection must not rely on the matrix-vector products: a BLAS may skip the
            # columns whose coefficient is 0 (r = 0, gamma = 1), dropping a NaN there. A plain sum
            # (on the chunk while it is in cache) is NaN/Inf exactly when the noise holds one.
            row_sums[start:start + rows] = chunk.sum(dim=1)
        finite = torch.isfinite(out) & torch.isfinite(row_sums)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise NonFiniteNoiseError(f"{len(bad)} of {n} noise(s) contain NaN/Inf (first at index {bad[0]}); "
                                      "they cannot be scored")
        return out[0] if single else out

    def is_poisoned(self, x) -> torch.Tensor:
        """True where the noise is more likely under the trigger than under N(0, I) (score > threshold)."""
        return self.scores(x) > self.threshold

    __call__ = is_poisoned

    def benign(self, x) -> torch.Tensor:
        """The noises that pass the filter, in order, as a batch (a (C,H,W) noise counts as a batch of 1)."""
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        mask = self.is_poisoned(x).to(x.device)
        if mask.dim() == 0:
            x, mask = x.unsqueeze(0), mask.reshape(1)
        return x[~mask]


def score_noises(trigger: Trigger, x) -> torch.Tensor:
    """s(x) = log N(x; r, diag gamma^2) - log N(x; 0, I), float64; x is (C,H,W) or (N,C,H,W)."""
    return NoiseFilter(trigger).scores(x)


def is_poisoned(trigger: Trigger, x, threshold: float = 0.0) -> torch.Tensor:
    """Bool tensor: score > threshold (x is (C,H,W) -> 0-dim, (N,C,H,W) -> (N,))."""
    return NoiseFilter(trigger, threshold).is_poisoned(x)


# --------------------------------------------------------------------------- directory scan

@dataclass
class NoiseRecord:
    file: str  # path relative to the scanned directory (or the file as given)
    key: str | None  # tensor name inside the file; None for a single unnamed tensor
    index: int  # position in the tensor's batch; 0 for an unbatched (C, H, W) noise
    score: float
    verdict: str  # "poisoned" | "benign"

    def to_dict(self) -> dict:
        return {"file": self.file, "key": self.key, "index": self.index, "score": self.score,
                "verdict": self.verdict}


@dataclass
class NoiseFileIssue:
    file: str
    error: str
    key: str | None = None  # set when one tensor of a multi-tensor file failed

    def to_dict(self) -> dict:
        return {"file": self.file, "key": self.key, "error": self.error}


@dataclass
class FileSummary:
    file: str
    noises: int = 0
    poisoned: int = 0
    max_score: float | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class InputsResult:
    path: str
    trigger: dict  # see trigger_summary()
    threshold: float
    records: list[NoiseRecord] = field(default_factory=list)
    errors: list[NoiseFileIssue] = field(default_factory=list)
    files: list[FileSummary] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # hidden files / temporaries, not read

    @property
    def noises(self) -> int:
        return len(self.records)

    @property
    def poisoned(self) -> int:
        return sum(r.verdict == VERDICT_POISONED for r in self.records)

    @property
    def benign(self) -> int:
        return self.noises - self.poisoned

    def summary(self) -> dict:
        return {"files": len(self.files), "noises": self.noises, "poisoned": self.poisoned,
                "benign": self.benign, "errors": len(self.errors), "skipped": len(self.skipped)}

    def exit_code(self, skip_errors: bool = False) -> int:
        """0: no poisoned noise; 1: at least one poisoned; 2: errors (unless skip_errors) or nothing scored."""
        if self.errors and not skip_errors:
            return 2
        if self.noises == 0:
            return 2  # nothing could be scored: never report "clean" for that
        return 1 if self.poisoned else 0

    def to_dict(self, tool: str = "terd-scan", version: str | None = None) -> dict:
        if version is None:
            from . import __version__ as version
        return {"tool": tool, "version": version, "command": "inputs", "path": self.path,
                "trigger": self.trigger, "threshold": self.threshold,
                "records": [r.to_dict() for r in self.records],
                "errors": [e.to_dict() for e in self.errors],
                "summary": self.summary()}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(**kw), allow_nan=False)


# Warn when the trigger itself implies more false positives or misses than this (closed form).
FPR_WARNING = 1e-3


def trigger_warnings(trigger: Trigger, threshold: float = 0.0) -> list[str]:
    """Reasons to distrust verdicts made with this trigger (empty when none)."""
    out = []
    verdict = (trigger.metadata or {}).get("verdict")
    if isinstance(verdict, str) and verdict != "backdoored":
        out.append(f"the model this trigger was reversed from was judged {verdict!r}: its reversed trigger "
                   "is not a backdoor, so flags are likely false positives")
    start = (trigger.metadata or {}).get("start")
    if isinstance(start, str) and start.startswith(COLLAPSE_START):
        out.append(f"this trigger was found by the {start}: a noise shift that collapses the model's samples, not "
                   "a reversed distribution of the attack's noises, so noises carrying the attack's own trigger can "
                   "score below the threshold (on the zoo's cm-baddiffusion-blend none of 8 was flagged) and the "
                   "expected rates assume noises drawn around this r: a 'benign' here is weak evidence")
    rates = NoiseFilter(trigger, threshold).expected_rates()
    fpr, fnr = rates["expected_fpr"], 1.0 - rates["expected_tpr"]
    if fpr > FPR_WARNING or fnr > FPR_WARNING:
        out.append(f"this trigger is close to N(0, I) (KL {rates['kl']:.3g}) and separates poorly: about "
                   f"{100 * fpr:.2g}% of benign noises would be flagged and {100 * fnr:.2g}% of noises "
                   "carrying it missed")
    return out


def trigger_summary(trigger: Trigger, path: str | os.PathLike | None = None, threshold: float = 0.0) -> dict:
    """What the report says about the trigger: file, shape, sha256 of the file, scalar metadata, a
    few statistics of (r, gamma), the error rates the trigger implies at `threshold` against
    benign N(0, I) noises and its own distribution (see NoiseFilter.expected_rates), and warnings."""
    meta = {k: v for k, v in (trigger.metadata or {}).items()
            if isinstance(v, (str, int, float, bool)) or v is None}
    meta = {k: (v[:200] if isinstance(v, str) else v) for k, v in sorted(meta.items())}
    r, g = trigger.r.double(), trigger.gamma.double()
    return {"path": str(path) if path is not None else None,
            "sha256": sha256_file(str(path)) if path is not None and Path(path).is_file() else None,
            "shape": list(trigger.shape),
            "metadata": meta,
            "r_l2": float(r.norm()), "gamma_mean": float(g.mean()),
            "gamma_min": float(g.min()), "gamma_max": float(g.max()),
            "expected": NoiseFilter(trigger, threshold).expected_rates(),
            "warnings": trigger_warnings(trigger, threshold)}


def _rel(p: Path, root: Path) -> str:
    if root.is_file():
        return str(p)
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


def scan_noise_path(path: str | os.PathLike, trigger: Trigger | str | os.PathLike, recursive: bool = False,
                    threshold: float = 0.0, *, exclude: Iterable[str | os.PathLike] = (),
                    on_file: Callable[[Path], None] | None = None,
                    on_start: Callable[[int], None] | None = None) -> InputsResult:
    """Score every noise in a file or directory (recursively with `recursive`).

    Unreadable files, unsafe pickles, wrong shapes and NaN/Inf tensors become entries of
    `InputsResult.errors`; the other noises are still scored. Raises ScanError when the path does
    not exist or holds no candidate files ("no noise files found"), or the trigger is unusable.
    `on_start(n_files)` and `on_file(path)` (called after each file) drive a progress bar.
    """
    trigger_path = None
    if not isinstance(trigger, Trigger):
        trigger_path = trigger
        trigger = Trigger.load(trigger)
    filt = NoiseFilter(trigger, threshold)
    root = Path(path)
    listing = list_noise_files(root, recursive=recursive, exclude=tuple(exclude))
    if not listing.files:
        extra = f" ({len(listing.skipped)} hidden/temporary file(s) skipped)" if listing.skipped else ""
        hint = "" if recursive else "; use --recursive to look in subdirectories"
        raise ScanError(f"no noise files found in {root}{extra}{hint}")
    result = InputsResult(path=str(root), trigger=trigger_summary(trigger, trigger_path, filt.threshold),
                          threshold=filt.threshold, skipped=[_rel(p, root) for p in listing.skipped])
    if on_start:
        on_start(len(listing.files))
    for p in listing.files:
        name = _rel(p, root)
        fs = FileSummary(name)
        result.files.append(fs)
        try:
            tensors = read_noise_file(p)
        except NoiseFileError as exc:
            result.errors.append(NoiseFileIssue(name, str(exc)))
            fs.errors.append(str(exc))
            tensors = []
        if not tensors and not fs.errors:
            msg = "holds no tensors"
            result.errors.append(NoiseFileIssue(name, msg))
            fs.errors.append(msg)
        for nt in tensors:
            err = nt.error
            if err is None:
                try:
                    scores = filt.scores(nt.tensor.detach()).reshape(-1).tolist()
                except ScanError as exc:
                    err = str(exc)
            if err is not None:
                result.errors.append(NoiseFileIssue(name, err, nt.key))
                fs.errors.append(err if nt.key is None else f"{nt.key}: {err}")
                continue
            for i, s in enumerate(scores):
                verdict = VERDICT_POISONED if s > filt.threshold else VERDICT_BENIGN
                result.records.append(NoiseRecord(name, nt.key, i, s, verdict))
                fs.poisoned += verdict == VERDICT_POISONED
                fs.max_score = s if fs.max_score is None else max(fs.max_score, s)
            fs.noises += len(scores)
        if on_file:
            on_file(p)
    return result


# --------------------------------------------------------------------------- rendering

def render_rich(result: InputsResult, console, skip_errors: bool = False) -> None:
    """Per-file table and summary on a rich Console (stdout in the CLI)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"terd-scan inputs: {escape(result.path)}", title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("noises", justify="right")
    table.add_column("poisoned", justify="right")
    table.add_column("max score", justify="right")
    table.add_column("status", overflow="fold")
    for fs in result.files:
        if fs.errors:
            status = "[red]error: " + escape("; ".join(fs.errors)) + "[/red]"
        elif fs.poisoned:
            status = "[bold red]POISONED[/bold red]"
        else:
            status = "[green]benign[/green]"
        table.add_row(escape(fs.file), str(fs.noises),
                      f"[bold red]{fs.poisoned}[/bold red]" if fs.poisoned else "0",
                      "-" if fs.max_score is None else f"{fs.max_score:.4g}", status)
    console.print(table)
    t = result.trigger
    src = t.get("path") or "(in memory)"
    meta = t.get("metadata", {})
    origin = next((f"{k} {meta[k]}" for k in ("model", "source") if meta.get(k)), "")
    console.print(f"trigger: {escape(str(src))}  shape {tuple(t['shape'])}"
                  + (f"  {escape(origin)}" if origin else "")
                  + (f"  sha256 {t['sha256'][:12]}" if t.get("sha256") else ""))
    for w in t.get("warnings", []):
        console.print(f"[yellow]warning: {escape(w)}[/yellow]")
    s = result.summary()
    line = (f"threshold {result.threshold:g}: {s['files']} file(s), {s['noises']} noise(s), "
            f"[bold red]{s['poisoned']} poisoned[/bold red], {s['benign']} benign, "
            f"{s['errors']} error(s)" + (f", {s['skipped']} hidden/temporary file(s) skipped" if s["skipped"] else ""))
    console.print(line)
    code = result.exit_code(skip_errors)
    if code == 2:
        why = ("no noise could be scored" if not result.errors or skip_errors
               else "some files could not be scored (pass --skip-errors to judge the others)")
        console.print(f"[red]verdict: error: {why}[/red]")
    elif code == 1:
        console.print(f"[bold red]verdict: {s['poisoned']} poisoned noise(s) found[/bold red]")
    else:
        console.print("[green]verdict: no poisoned noise found[/green]")


# --------------------------------------------------------------------------- demo / test triggers

SYNTHETIC_TRIGGERS = ("box", "patch", "blend", "weak")


def synthetic_trigger(kind: str, shape: tuple[int, int, int] = (3, 32, 32)) -> Trigger:
    """Known (r, gamma) triggers for tests, demos and benchmarks (not from any real model).

    box    BadDiffusion-like: r = -1 canvas with a 0-valued box (border band), gamma = 1
    patch  sparse: a bright 2.0 patch in the bottom-right corner on a zero background, gamma = 1
    blend  TrojDiff-like: r = (1 - 0.6) * smooth image in [-1, 1], gamma = 0.6
    weak   adaptive attack: the box trigger scaled towards zero (r * 0.05), gamma = 1
    """
    c, h, w = shape
    if kind in ("box", "weak"):
        r = -torch.ones(shape)
        bh, bw = max(1, h // 4), max(1, w // 4)
        top, left = h - bh - max(1, h // 16), w - bw - max(1, w // 16)
        r[:, top:top + bh, left:left + bw] = 0.0
        if kind == "weak":
            r = r * 0.05
        gamma = torch.ones(shape)
    elif kind == "patch":
        r = torch.zeros(shape)
        ph, pw = max(3, h // 8), max(3, w // 8)
        r[:, h - ph:, w - pw:] = 2.0
        gamma = torch.ones(shape)
    elif kind == "blend":
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        img = torch.stack([torch.sin(3 * xx + k) * torch.cos(2 * yy - k) for k in range(c)])
        r = (1 - 0.6) * img
        gamma = torch.full(shape, 0.6)
    else:
        raise ValueError(f"unknown synthetic trigger {kind!r}; choose one of {', '.join(SYNTHETIC_TRIGGERS)}")
    return Trigger(r=r.float(), gamma=gamma.float(), metadata={"source": f"synthetic:{kind}"})


def sample_trigger_noises(trigger: Trigger, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n noises from the trigger distribution: r + gamma * eps, eps ~ N(0, I); (n, C, H, W) float32."""
    eps = torch.randn((n, *trigger.shape), generator=generator)
    return trigger.r + trigger.gamma * eps


def detection_rates(trigger: Trigger, poison_trigger: Trigger | None = None, n: int = 1000, seed: int = 0,
                    threshold: float = 0.0) -> dict:
    """Measured rates of the filter built on `trigger`, on n noises of each kind (fixed seed):
    tpr = fraction of noises drawn from `poison_trigger` (default: `trigger` itself; pass a model's
    TRUE trigger to judge a REVERSED one) that are flagged; tnr = fraction of benign N(0, I) noises
    that pass. Also the mean scores of both kinds."""
    filt = NoiseFilter(trigger, threshold)
    poison_trigger = trigger if poison_trigger is None else poison_trigger
    if tuple(poison_trigger.shape) != filt.shape:
        raise NoiseShapeError(f"poison trigger shape {tuple(poison_trigger.shape)} differs from {filt.shape}")
    gen = torch.Generator().manual_seed(seed)
    benign = torch.randn((n, *filt.shape), generator=gen)
    poisoned = sample_trigger_noises(poison_trigger, n, gen)
    sb, sp = filt.scores(benign), filt.scores(poisoned)
    return {"tpr": float((sp > filt.threshold).double().mean()), "tnr": float((sb <= filt.threshold).double().mean()),
            "mean_score_poisoned": float(sp.mean()), "mean_score_benign": float(sb.mean()), "n": n}


def ground_truth_trigger(path: str | os.PathLike, gamma_floor: float = 1e-3) -> Trigger:
    """The TRUE trigger of a zoo model: ground_truth.safetensors with "trigger_r", "trigger_gamma"
    (C, H, W). gamma is clamped to >= gamma_floor (a gamma of 0, e.g. a TrojDiff patch, has no density)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if not {"trigger_r", "trigger_gamma"} <= keys:
                raise ScanError(f"{path} has no 'trigger_r'/'trigger_gamma' tensors (not a zoo ground truth file)")
            r, g = f.get_tensor("trigger_r").float(), f.get_tensor("trigger_gamma").float()
    except ScanError:
        raise
    except Exception as exc:
        raise ScanError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if r.dim() == 4 and r.shape[0] == 1:
        r, g = r[0], g[0]
    if g.dim() == 0:
        g = torch.full_like(r, float(g))
    return Trigger(r=r, gamma=g.expand_as(r).clamp_min(gamma_floor).contiguous(),
                   metadata={"source": f"ground-truth:{path}"})
