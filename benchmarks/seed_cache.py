"""Fill benchmarks/cache/ from committed results, so a fresh checkout does not re-run hours of
reversions whose rows are already in benchmarks/results/.

    python benchmarks/seed_cache.py benchmarks/results/quality-fast-standard.json [--zoo DIR ...]
        [--accept-undigested]

A committed row is copied into the cache only when it still describes what a re-run would compute:
the model's weight files hash to the row's `weights_fingerprint` (sha256 of the files, not their
times), and the row's `settings_digest` equals the digest of the current preset's settings. Rows
written before the digest existed carry none: they are skipped unless --accept-undigested is given,
which is only right when the presets have not changed since the results were made (check with
`git log -- terd_scan/presets.py` against the results' commit). Everything skipped is listed with
the reason. Cached reversed triggers (trigger_fires.py) are not in the results and are not seeded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_scans import ZOO_DIR, bad_input, cache_path, scan_options, settings_digest, zoo_models  # noqa: E402

from terd_scan.loading import load_model  # noqa: E402
from terd_scan.scan import ScanOptions, scan_settings, weights_fingerprint  # noqa: E402

# fields quality.py adds to a cached row; recomputed from the shipped reference on every run
DERIVED = ("family", "score", "thresholds")


def seed_rows(rows: list[dict], model_dirs: dict[str, Path], accept_undigested: bool) -> tuple[int, list[str]]:
    """Write each still-valid row to its cache file; (rows written, reasons for the others)."""
    written, skipped, fingerprints = 0, [], {}
    for row in rows:
        name, preset, seed = row["model"], row["preset"], row.get("seed", 0)
        where = f"{name} {preset} seed {seed}"
        if name not in model_dirs:
            skipped.append(f"{where}: no such zoo model here")
            continue
        model_dir = model_dirs[name]
        if name not in fingerprints:
            # --allow-pickle where the zoo family's layout is a pickle (DDIM-repo ckpt.pth), as the scan has it
            loaded = load_model(str(model_dir), allow_pickle=scan_options(model_dir).allow_pickle)
            fingerprints[name] = weights_fingerprint(loaded.provenance.to_dict())
        if row.get("weights_fingerprint") != fingerprints[name]:
            skipped.append(f"{where}: weights differ from the row's")
            continue
        digest, current = row.get("settings_digest"), settings_digest(preset)
        if digest is None and not accept_undigested:
            skipped.append(f"{where}: row has no settings digest (see --accept-undigested)")
            continue
        if digest is not None and digest != current:
            skipped.append(f"{where}: preset settings changed since the row was made")
            continue
        target = cache_path(model_dir, preset, seed)
        if target.is_file():  # never overwritten: a cached row may be newer than the results
            skipped.append(f"{where}: already in the cache")
            continue
        cached = {k: v for k, v in row.items() if k not in DERIVED}
        # build_reference.py reads the settings; the results leave them out to stay readable
        cached["settings"] = scan_settings(ScanOptions(preset=preset, seed=seed, device="cpu"))
        cached["settings_digest"] = current
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(cached, indent=2))
        written += 1
    return written, skipped


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results JSON files with a 'rows' list (quality.py's)")
    ap.add_argument("--zoo", action="append", default=[], help="extra folder of zoo models (repeatable)")
    ap.add_argument("--accept-undigested", action="store_true",
                    help="also seed rows made before rows carried a settings digest")
    args = ap.parse_args(argv)
    model_dirs = {m.name: m for d in [ZOO_DIR, *map(Path, args.zoo)] for m in zoo_models(d)}
    total = 0
    for path in args.results:
        try:
            rows = json.loads(Path(path).read_text()).get("rows")
        except (OSError, ValueError, AttributeError) as exc:  # missing, unreadable, not JSON, not an object
            bad_input(f"{path}: cannot read a results JSON ({exc.__class__.__name__}); pass one written by benchmarks/quality.py")
        if not isinstance(rows, list):
            bad_input(f"{path}: no 'rows' list; pass a results JSON written by benchmarks/quality.py")
        written, skipped = seed_rows(rows, model_dirs, args.accept_undigested)
        total += written
        print(f"{path}: {written} row(s) seeded, {len(skipped)} skipped")
        for reason in skipped:
            print(f"  skipped {reason}")
    print(f"{total} cache file(s) written")


if __name__ == "__main__":
    main()
