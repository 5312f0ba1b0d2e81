"""The dip search's screen on zoo models: TERD's pair loss at r = 0 along the dip grid of gammas
(widest first) and the deepest dip below every wider gamma's loss (terd_scan/dip_search.py).
Forward passes only, a few seconds a model.

    python benchmarks/dip_profile.py examples/zoo/* examples/zoo-families/* [--pairs 32] [--seed 99]

Folders that are not models (CATALOGUE.md, README.md) and consistency models are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from terd_scan.denoisers import make_denoiser
from terd_scan.dip_search import DIP_SEED_RATIO, dip_profile
from terd_scan.errors import ScanError
from terd_scan.presets import ReversionSettings
from terd_scan.scan import ScanOptions, load_source


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model folders")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--seed", type=int, default=99)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    settings = ReversionSettings()
    gammas, window = settings.dip_gammas, settings.timestep_window
    print(f"pair loss at r = 0, {args.pairs} pairs, t in the last {window} steps; gammas {', '.join(f'{g:g}' for g in gammas)}")
    for folder in (Path(m) for m in args.models):
        if not folder.is_dir():
            continue
        try:
            denoiser = make_denoiser(load_source(str(folder), ScanOptions(device="cpu")), "cpu")
        except ScanError as err:
            print(f"{folder.name:36s} skipped: {err}")
            continue
        if denoiser.prediction_type == "consistency":
            print(f"{folder.name:36s} skipped: consistency model (no verdict)")
            continue
        zero = torch.zeros(tuple(denoiser.input_shape))
        gamma, ratio, losses = dip_profile(denoiser, zero, gammas, args.pairs, window, torch.Generator().manual_seed(args.seed))
        flag = "  <- seeds a run" if ratio < DIP_SEED_RATIO else ""
        print(f"{folder.name:36s} " + " ".join(f"{v:7.2f}" for v in losses) + f" | dip {ratio:.2f} at {gamma:g}{flag}")


if __name__ == "__main__":
    main()
