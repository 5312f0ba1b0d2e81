"""Benchmark TERD input detection: detection quality per trigger and scoring speed.

Quality (per trigger, --n noises of each kind, fixed seed):
  TPR = fraction of trigger-distribution noises (x = r_true + gamma_true * eps) that are FLAGGED
  TNR = fraction of benign N(0, I) noises that PASS (not flagged)
Triggers:
  synthetic box / patch / blend / weak at --shape (always)
  --zoo DIR        the TRUE trigger of every backdoored zoo model in DIR (DIR/<name>/ground_truth.safetensors),
                   scored with the true trigger itself (an upper bound for a perfect reversion)
  --reversed DIR   every trigger.safetensors under DIR (written by `terd-scan model`), scored against
                   noises carrying the model's TRUE trigger when it can be found (the trigger's "source"
                   metadata, or --zoo DIR/<model name>); otherwise against noises from the reversed
                   trigger itself ("poison from: self", which only checks TNR meaningfully)

Speed: noises scored per second, batched (--batch) vs one call per noise, for d = 3*16*16, 3*32*32,
3*256*256 (float32 input, float64 accumulation), and an end-to-end directory scan (read + score).

  python benchmarks/bench_inputs.py [--n 10000] [--zoo examples/zoo] [--reversed scans/] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from terd_scan.input_detection import (  # noqa: E402
    SYNTHETIC_TRIGGERS, NoiseFilter, detection_rates, ground_truth_trigger, scan_noise_path, synthetic_trigger,
)
from terd_scan.trigger import Trigger  # noqa: E402


def rates(score_trigger: Trigger, poison_trigger: Trigger | None, n: int, seed: int, threshold: float):
    """(TPR, TNR, mean score of poisoned noises, mean score of benign noises)."""
    r = detection_rates(score_trigger, poison_trigger, n=n, seed=seed, threshold=threshold)
    return r["tpr"], r["tnr"], r["mean_score_poisoned"], r["mean_score_benign"]


def zoo_ground_truths(zoo: Path) -> dict[str, Path]:
    return {d.name: d / "ground_truth.safetensors" for d in sorted(zoo.iterdir())
            if (d / "ground_truth.safetensors").is_file()} if zoo and zoo.is_dir() else {}


def find_true_trigger(trig: Trigger, path: Path, zoo_gts: dict[str, Path]) -> Path | None:
    meta = trig.metadata or {}
    src = meta.get("source")
    if isinstance(src, str) and (Path(src) / "ground_truth.safetensors").is_file():
        return Path(src) / "ground_truth.safetensors"
    for name in (meta.get("model"), Path(str(src)).name if src else None, path.parent.name):
        if name and name in zoo_gts:
            return zoo_gts[name]
    return None


def zoo_label(trig: Trigger, path: Path, zoo: Path | None) -> str:
    """benign / backdoored from the zoo sidecar (terd-zoo.json) of the model the trigger came from."""
    meta = trig.metadata or {}
    dirs = [Path(str(meta["source"]))] if meta.get("source") else []
    if zoo:
        dirs += [zoo / str(meta.get("model", "")), zoo / path.parent.name]
    for d in dirs:
        side = d / "terd-zoo.json"
        if side.is_file():
            try:
                return str(json.loads(side.read_text()).get("label", "?"))
            except (OSError, ValueError):
                return "?"
    return "?"


def fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def predicted(score_trigger: Trigger, same_as_poison: bool, threshold: float) -> dict:
    e = NoiseFilter(score_trigger, threshold).expected_rates()
    return {"pred_tnr": 1 - e["expected_fpr"], "pred_tpr": e["expected_tpr"] if same_as_poison else None}


def quality(args) -> list[dict]:
    shape = tuple(int(v) for v in args.shape.split(","))
    rows = []
    for kind in SYNTHETIC_TRIGGERS:
        t = synthetic_trigger(kind, shape)
        rows.append({"trigger": f"synthetic:{kind}", "shape": shape, "scored with": "true", "poison from": "true",
                     **dict(zip(("tpr", "tnr", "mean_s_poison", "mean_s_benign"),
                                rates(t, t, args.n, args.seed, args.threshold))),
                     **predicted(t, True, args.threshold)})
    gts = zoo_ground_truths(Path(args.zoo)) if args.zoo else {}
    for name, gt in gts.items():
        t = ground_truth_trigger(gt)
        rows.append({"trigger": f"zoo:{name}", "shape": t.shape, "scored with": "true", "poison from": "true",
                     **dict(zip(("tpr", "tnr", "mean_s_poison", "mean_s_benign"),
                                rates(t, t, args.n, args.seed, args.threshold))),
                     **predicted(t, True, args.threshold)})
    if args.reversed:
        for p in sorted(Path(args.reversed).rglob("trigger.safetensors")):
            rev = Trigger.load(p)
            gt = find_true_trigger(rev, p, gts)
            true = ground_truth_trigger(gt) if gt else None
            if true is not None and true.shape != rev.shape:
                true = None
            label = (rev.metadata or {}).get("model") or p.parent.name
            kind = zoo_label(rev, p, Path(args.zoo) if args.zoo else None)
            rows.append({"trigger": f"reversed:{label} ({kind})", "shape": rev.shape, "scored with": "reversed",
                         "poison from": "true" if true is not None else "self",
                         **dict(zip(("tpr", "tnr", "mean_s_poison", "mean_s_benign"),
                                    rates(rev, true if true is not None else rev, args.n, args.seed,
                                          args.threshold))),
                         **predicted(rev, true is None, args.threshold)})
    return rows


def _time(fn, min_seconds: float) -> float:
    """Median seconds per call over repeated calls for at least min_seconds (after a warm-up): the
    median resists the stalls of a shared machine better than the mean."""
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def speed(args) -> list[dict]:
    rows = []
    sizes = [(3, 16, 16), (3, 32, 32), (3, 256, 256)]
    for shape in sizes:
        d = int(np.prod(shape))
        batch = max(1, min(args.batch, (1 << 26) // (4 * d)))  # at most 64 MB of float32 input
        filt = NoiseFilter(synthetic_trigger("blend", shape))
        x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
        batched = batch / _time(lambda: filt.scores(x), args.min_seconds)
        k = min(batch, 64)
        single = k / _time(lambda: [filt.scores(x[i]) for i in range(k)], args.min_seconds)
        rows.append({"d": f"{'x'.join(map(str, shape))} = {d}", "batch": batch, "batched_per_s": batched,
                     "single_per_s": single, "GB_per_s": batched * d * 4 / 1e9})
    return rows


def scan_speed(args) -> list[dict]:
    rows = []
    shape = (3, 32, 32)
    trig = synthetic_trigger("box", shape)
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    for fmt in ("safetensors", "npy", "pt"):
        with tempfile.TemporaryDirectory() as tmp:
            files, per = args.scan_files, 64
            for i in range(files):
                x = torch.randn((per, *shape), generator=gen)
                p = Path(tmp) / f"n{i:04d}.{fmt}"
                if fmt == "safetensors":
                    save_file({"x": x}, p)
                elif fmt == "npy":
                    np.save(p, x.numpy())
                else:
                    torch.save(x, p)
            res = scan_noise_path(tmp, trig)
            assert not res.errors and res.noises == files * per
            el = _time(lambda: scan_noise_path(tmp, trig), 0.0)  # median of 3 (files in the page cache)
            rows.append({"format": fmt, "files": files, "noises": res.noises, "seconds": el,
                         "files_per_s": files / el, "noises_per_s": res.noises / el})
    return rows


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _title, spec in cols:
            v = r.get(key)
            cells.append(str(v) if spec == "s" or v is None and spec == "s" else fmt(v, spec))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="TPR/TNR per trigger and scoring speed of terd-scan inputs")
    p.add_argument("--n", type=int, default=10000, help="noises of each kind per trigger (default 10000)")
    p.add_argument("--shape", default="3,32,32", help="C,H,W of the synthetic triggers (default 3,32,32)")
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--zoo", help="zoo directory (examples/zoo): true triggers of its backdoored models")
    p.add_argument("--reversed", help="directory searched for trigger.safetensors files")
    p.add_argument("--batch", type=int, default=1024, help="batch size for the speed table")
    p.add_argument("--min-seconds", type=float, default=1.0, help="time each speed measurement this long")
    p.add_argument("--scan-files", type=int, default=100, help="files for the end-to-end scan timing")
    p.add_argument("--quick", action="store_true", help="n=1000, short timings (a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1, like 'terd-scan inputs'; 0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n, args.min_seconds, args.scan_files = min(args.n, 1000), 0.2, 20
    if args.zoo and not Path(args.zoo).is_dir():
        print(f"note: --zoo {args.zoo} not found; zoo rows skipped", file=sys.stderr)

    q, s, e = quality(args), speed(args), scan_speed(args)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "n": args.n, "seed": args.seed, "threshold": args.threshold}
    if args.json:
        print(json.dumps({"env": env, "quality": q, "speed": s, "scan": e}, default=list))
        return 0
    print(f"## Detection quality (n = {args.n} per kind, threshold {args.threshold:g}, seed {args.seed})")
    print("TPR = trigger-distribution noises flagged; TNR = benign N(0, I) noises passing. "
          "Closed form: NoiseFilter.expected_rates (normal approximation; TPR only where the noises come "
          "from the scoring trigger).\n")
    for r in q:
        r["shape"] = "x".join(map(str, r["shape"]))
    print(table(q, [("trigger", "trigger", "s"), ("shape", "shape", "s"), ("scored with", "scored with", "s"),
                    ("poison from", "poison from", "s"), ("tpr", "TPR", ".4f"), ("tnr", "TNR", ".4f"),
                    ("pred_tpr", "TPR (closed form)", ".4f"), ("pred_tnr", "TNR (closed form)", ".4f"),
                    ("mean_s_poison", "mean score (poisoned)", ".1f"), ("mean_s_benign", "mean score (benign)", ".1f")]))
    print(f"\n## Scoring speed (torch {env['torch']}, {env['threads']} threads, {env['cpus']} CPUs; "
          "float32 input, float64 accumulation)\n")
    print(table(s, [("d", "noise shape = d", "s"), ("batch", "batch", "d"), ("batched_per_s", "noises/s batched", ",.0f"),
                    ("single_per_s", "noises/s one per call", ",.0f"), ("GB_per_s", "input GB/s (batched)", ".2f")]))
    print("\n## End-to-end directory scan (scan_noise_path: list + read + score; 64 noises 3x32x32 per file; "
          "median of 3)\n")
    print(table(e, [("format", "format", "s"), ("files", "files", "d"), ("noises", "noises", "d"),
                    ("seconds", "seconds", ".2f"), ("files_per_s", "files/s", ",.0f"),
                    ("noises_per_s", "noises/s", ",.0f")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
