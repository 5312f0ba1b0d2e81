"""The `build` command shared by the zoo builders of the other model families
(`python -m terd_scan.zoo_families | zoo_latent | zoo_consistency build [NAME ...] --out DIR`): which models to
build, which already exist (skipped unless --force), and an optional training-steps override for experiments."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from .zoo import SIDECAR

# build(names, out_dir, measure_n, steps or None, log): trains, measures and saves each named model
Builder = Callable[[list[str], str, int, "int | None", Callable[[str], None]], object]


def build_command(argv: list[str] | None, *, prog: str, description: str, catalogue: dict, kind: str,
                  default_out: str, build: Builder, steps_option: bool = False) -> int:
    """Parse `build [NAME ...] --out DIR [--force] [--measure-n N] [--steps N]` and build what is missing;
    exit code 2 and one line on stderr for an unknown name."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("names", nargs="*", help=f"default all: {', '.join(catalogue)}")
    b.add_argument("--out", default=default_out)
    b.add_argument("--force", action="store_true", help="rebuild models that already exist")
    b.add_argument("--measure-n", type=int, default=32)
    if steps_option:
        b.add_argument("--steps", type=int, default=None, help="override the training steps (experiments)")
    args = ap.parse_args(argv)
    names = args.names or list(catalogue)
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        print(f"unknown {kind} zoo model(s) {unknown}; choose from {list(catalogue)}", file=sys.stderr)
        return 2
    todo = [n for n in names if args.force or not (Path(args.out) / n / SIDECAR).is_file()]
    for n in sorted(set(names) - set(todo)):
        print(f"{n}: exists, skipping (use --force to rebuild)")
    if todo:
        build(todo, args.out, args.measure_n, getattr(args, "steps", None), lambda s: print(s, flush=True))
    return 0
