"""Rendering one scan report (a plain dict, see README "Report schema") as a Rich console
report, JSON or SARIF 2.1.0, and making the recovered trigger visible as an image."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from .denoisers import CM_KIND
from .dip_search import DIP_SEED_RATIO
from .narrow_search import SEED_RATIO
from .patch_search import BASIN_RATIO

RULE_BACKDOOR = "TERD001"
RULE_PICKLE = "TERD002"
RULE_REFERENCE = "TERD003"
SARIF_RULES = [
    {"id": RULE_BACKDOOR, "name": "DiffusionBackdoorTrigger",
     "shortDescription": {"text": "Diffusion model carries a noise-space backdoor"},
     "fullDescription": {"text": "TERD reversed a trigger distribution N(r, gamma^2) whose KL divergence from the "
                                 "benign prior exceeds the calibrated benign thresholds: starting noise carrying "
                                 "the trigger makes the model generate an attacker-chosen output."},
     "defaultConfiguration": {"level": "error"},
     "help": {"text": "Do not publish or deploy this model. Inspect trigger.png: it shows what the model generates "
                      "from the recovered trigger beside benign samples."}},
    {"id": RULE_PICKLE, "name": "PickleWeightsLoaded",
     "shortDescription": {"text": "Weights were loaded from a pickle (with --allow-pickle)"},
     "defaultConfiguration": {"level": "warning"},
     "help": {"text": "Convert the weights to safetensors; pickles can run code when loaded by other tools."}},
    {"id": RULE_REFERENCE, "name": "ReferenceSettingsMismatch",
     "shortDescription": {"text": "Thresholds were calibrated with other reversion settings"},
     "defaultConfiguration": {"level": "warning"},
     "help": {"text": "Calibrate a reference with the same settings ('terd-scan calibrate') and pass --reference."}},
]


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside the target, then rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False) + "\n"


def _weight_locations(report: dict) -> list[dict]:
    src = report.get("source", {})
    files = [f for f in src.get("files", []) if f.get("role") == "weights"] or src.get("files", [])
    base = src.get("repo_id") or src.get("root") or src.get("source", "")
    locs = []
    for f in files:
        uri = f"{base.rstrip('/')}/{f['path']}" if base else f["path"]
        locs.append({"physicalLocation": {"artifactLocation": {"uri": uri}},
                     "properties": {"sha256": f.get("sha256")}})
    return locs or [{"physicalLocation": {"artifactLocation": {"uri": str(base)}}}]


def to_sarif(report: dict) -> dict:
    """SARIF 2.1.0: one result per finding, stable rule ids, the weight files as locations."""
    locations = _weight_locations(report)
    feats, th = report["features"], report["thresholds"]
    results = []
    if report["verdict"] == "backdoored":
        results.append({
            "ruleId": RULE_BACKDOOR, "level": "error", "locations": locations,
            "message": {"text": f"Backdoor found in {report['model']['name']}: " + "; ".join(report["reasons"])
                                + (f". Recovered trigger: {report['artefacts'].get('trigger_png')}"
                                   if report.get("artefacts", {}).get("trigger_png") else "")},
            "properties": {"mean_kl": feats["mean_kl"], "var_kl": feats["var_kl"],
                           "threshold_mean_kl": th["mean_kl"], "threshold_var_kl": th["var_kl"]}})
    if report["source"].get("pickle_loaded"):
        results.append({"ruleId": RULE_PICKLE, "level": "warning", "locations": locations,
                        "message": {"text": "Weights were loaded from a pickle with torch.load(weights_only=True)."}})
    for w in report.get("warnings", []):
        if w.startswith("reference"):
            results.append({"ruleId": RULE_REFERENCE, "level": "warning", "locations": locations,
                            "message": {"text": w}})
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": report["tool"]["name"], "version": report["tool"]["version"],
                                "informationUri": "https://arxiv.org/abs/2409.05294", "rules": SARIF_RULES}},
            "invocations": [{"executionSuccessful": True}],
            "results": results,
            "properties": {"verdict": report["verdict"], "features": feats, "thresholds": th},
        }],
    }


def render_console(report: dict, console) -> None:
    """The human report: verdict first, then the evidence and where the artefacts are."""
    from rich.panel import Panel
    from rich.table import Table

    bad = report["verdict"] == "backdoored"
    title = "[bold red]BACKDOORED[/]" if bad else "[bold green]CLEAN[/]"
    why = "; ".join(report["reasons"]) or "both KL features are within the benign thresholds"
    console.print(Panel(f"{title}  {report['model']['name']}\n{why}", title="terd-scan verdict",
                        border_style="red" if bad else "green", expand=False))

    feats, th = report["features"], report["thresholds"]
    title = "Features of the reversed trigger N(r, gamma^2) vs the benign prior"
    if report["model"].get("kind") == CM_KIND:  # judged by the collapse search alone (scan.CM_KL_NOTE)
        title += " (reported, not used for a consistency model's verdict)"
    t = Table(title=title, title_justify="left")
    t.add_column("feature")
    t.add_column("value", justify="right")
    t.add_column("threshold", justify="right")
    t.add_column("", justify="left")
    for key, label in (("mean_kl", "M_r: mean KL per dimension"), ("var_kl", "V_r: variance of KL")):
        over = feats[key] > th[key]
        t.add_row(label, f"{feats[key]:.4g}", f"{th[key]:.4g}", "[red]over[/]" if over else "[green]under[/]")
    console.print(t)

    ref = report["reference"]
    m, s = report["model"], report["settings"]
    info = Table.grid(padding=(0, 2))
    info.add_column(style="dim")
    info.add_column()
    src = report["source"]
    source = src.get("repo_id") or src.get("source")
    if src.get("resolved_commit"):
        source += f" @ {src['resolved_commit']}"
    info.add_row("source", source)
    info.add_row("model", f"{m['kind']} UNet, input {tuple(m['input_shape'])}, {m['parameters']:,} parameters, "
                          f"{m['prediction_type']} prediction, prior {m['prior']}")
    if m.get("latent"):
        lat = m["latent"]
        info.add_row("latent", f"latent shape {tuple(lat['latent_shape'])}, {lat['autoencoder']} "
                               f"({lat['component']}/) decodes to {tuple(lat['decoded_shape'])}; scaling: {lat['scaling']}; "
                               "the trigger is reversed in latent space")
    info.add_row("schedule", m["schedule_origin"])
    info.add_row("reference", f"{ref['name']} ({ref['origin']}, {ref['models']} benign models, {ref['runs']} runs, "
                              f"mu + {ref['k_sigma']:g} sigma)")
    info.add_row("settings", f"preset {s['preset']}, stage 1 {s['stage1_iterations']} + stage 2 "
                             f"{s['stage2_iterations']} iterations, batch {s['batch_size']}, "
                             f"{s['sampler_steps']} DDIM steps, seed {s['seed']}, device {s['device']}")
    tm = report["timing"]
    info.add_row("cost", f"{tm['seconds']:.1f} s, {tm['network_evaluations']:,} network evaluations")
    tr = report["trigger"]
    info.add_row("trigger", f"mean |r| {tr['r_abs_mean']:.3f}, gamma mean {tr['gamma_mean']:.3f} "
                            f"(min {tr['gamma_min']:.3f}, max {tr['gamma_max']:.3f})")
    ps = report.get("patch_search")
    if ps:
        where = f"{ps['height']}x{ps['width']} patch at ({ps['top']}, {ps['left']}), loss ratio {ps['ratio']:.3g}"
        info.add_row("patch search", f"{ps['candidates']:,} candidates; best {where}; "
                                     + (f"seeded a second run; kept the run from {tr['start']}" if ps["seeded_run"]
                                        else f"no basin behind it (ratio >= {BASIN_RATIO}), no second run"))
    ns = report.get("narrow_search")
    if ns:
        probe = (f"{ns['candidates']} candidates; best offset {ns['offset']} at gamma {ns['gamma']:g}, "
                 f"loss ratio narrow/wide {ns['ratio']:.3g}")
        outcome = narrow_outcome(ns)
        info.add_row("narrow search", f"{probe}; {outcome}")
    cs = report.get("canvas_search")
    if cs:
        probe = f"{cs['candidates']} candidates; best offset {cs['offset']}, loss ratio {cs['ratio']:.3g}"
        if cs.get("basin") and not cs["seeded_run"]:
            outcome = "a basin, but no run: the kept narrow-noise run is the result"
        else:
            outcome = _seeded_run_outcome(cs, BASIN_RATIO, "a basin held", "no basin held")
        info.add_row("canvas search", f"{probe}; {outcome}")
    ds = report.get("dip_search")
    if ds:
        probe = f"loss at r = 0 over {ds['candidates'] + 1} gammas; deepest dip at gamma {ds['gamma']:g}, ratio {ds['ratio']:.3g}"
        if ds["ratio"] < DIP_SEED_RATIO and not ds["seeded_run"]:
            outcome = "a dip, but no run: the kept narrow-noise run is the result"
        elif not ds["seeded_run"]:
            outcome = f"no dip (ratio >= {DIP_SEED_RATIO}), no run"
        else:
            outcome = _seeded_run_outcome(ds, DIP_SEED_RATIO, "still dips", "no longer dips")
        info.add_row("dip search", f"{probe}; {outcome}")
    bt = report.get("basin_test")
    if bt:
        info.add_row("basin test", f"on the line from N(0, I) through the trigger ({bt['pairs']} noise pairs), barrier "
                                   f"{bt['barrier']:.3g} before it, wall {bt['wall']:.3g} beyond it "
                                   f"(held above {bt['min_barrier']:g}): "
                                   + ("held, the KL verdict stands" if bt["basin"] else
                                      "not held, so a KL over the thresholds does not flag the model")
                                   + (" (the test read TERD's trigger; the sample-collapse search's replaced it)"
                                      if (report.get("collapse_search") or {}).get("kept") else ""))
    cl = report.get("collapse_search")
    if cl:
        if not cl["ran"]:
            info.add_row("collapse search", cl["note"])
        else:
            ratios = ", ".join(f"{v:.3g} at rms {rms:g}" for v, rms in zip(cl["ratios"], cl["radii_rms"]))
            info.add_row("collapse search", f"{cl.get('sampler') or 'DDPM ancestral'}: the spread of samples from N(r, I) "
                                            f"over that from N(0, I), r descended on spheres: {ratios}; "
                                            + (f"a collapse (below {cl['keep_below']:g}): its r is reported as the trigger"
                                               if cl["kept"] else f"no collapse (all >= {cl['keep_below']:g})"))
    for key, label in (("trigger_png", "trigger image"), ("trigger_safetensors", "trigger tensor"),
                       ("report_json", "report")):
        if report.get("artefacts", {}).get(key):
            path = report["artefacts"][key]
            if key == "trigger_png" and (report.get("previews") or {}).get("trojdiff_sampler"):
                path += " (a last row through TrojDiff's sampler: the trigger is narrowed noise)"
            info.add_row(label, path)
    for w in report.get("warnings", []):
        info.add_row("[yellow]warning[/]", f"[yellow]{w}[/]")
    console.print(info)


def narrow_outcome(ns: dict) -> str:
    """What the narrow-noise search came to: its seeded run, and the refinement of a kept run or
    the held-gamma sweep after one that spread back."""
    held = ns.get("held")
    if held:  # the learned-gamma run spread back, or none was seeded; the sweep with gamma held decided
        before = (f"seeded a run that spread back (end ratio {ns['end_ratio']:.3g})" if ns["seeded_run"]
                  else f"no basin (ratio >= {SEED_RATIO}), no seeded run")
        return (f"{before}; r descended from the offset at {len(held['gammas'])} gammas held, lowest loss at "
                f"gamma {held['gamma']:g} (end ratio {held['end_ratio']:.3g}): {'kept' if held['kept'] else 'not kept'}")
    outcome = _seeded_run_outcome(ns, SEED_RATIO, "stayed narrow", "spread back")
    refine = ns.get("refine")
    if refine:
        outcome += (f"; r refined at {len(refine['scales'])} gammas held, lowest loss at gamma x{refine['scale']:g} "
                    f"(gamma mean {refine['gamma_mean']:.3f})")
    return outcome


def _seeded_run_outcome(search: dict, seed_ratio: float, held: str, not_held: str) -> str:
    """What a search's seeded run came to: no run, kept, or not kept (held / not_held say why)."""
    if not search["seeded_run"]:
        return f"no basin (ratio >= {seed_ratio}), no second run"
    if search["kept"]:
        return f"seeded a run that {held} (end ratio {search['end_ratio']:.3g}): kept"
    return f"seeded a run that {not_held} (end ratio {search['end_ratio']:.3g}): not kept"


def _to_pixels(x: torch.Tensor, lo: float | None = None, hi: float | None = None) -> torch.Tensor:
    """(C, H, W) float -> (H, W, 3) uint8; values in [lo, hi] map to [0, 255]."""
    x = x.detach().float().cpu()
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] != 3:
        x = x[:3] if x.shape[0] > 3 else torch.cat([x, x[-1:].expand(3 - x.shape[0], -1, -1)])
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    x = ((x - lo) / max(hi - lo, 1e-8)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(1, 2, 0)


def trigger_image(r: torch.Tensor, gamma: torch.Tensor, benign: torch.Tensor, triggered: torch.Tensor,
                  latent: bool = False, trojan: torch.Tensor | None = None) -> bytes:
    """A PNG: the recovered r and gamma, then samples from benign noise (top row) and from the
    recovered trigger (bottom row), so a person sees what the backdoor does; with `trojan`, a last row of
    the trigger's samples through TrojDiff's sampler. For a latent model r and gamma are latents (first
    3 channels shown) and the samples are decoded images, which may be larger than r: every tile is
    drawn at the same size."""
    from PIL import Image, ImageDraw

    sample_rows = [benign, triggered] + ([trojan] if trojan is not None else [])
    sides = [r.shape[-2:], *(x.shape[-2:] for x in sample_rows if x.dim() == 4 and x.shape[0])]
    h, w = max(s[0] for s in sides), max(s[1] for s in sides)
    scale = max(1, 96 // max(h, w))
    tile_w, tile_h = w * scale, h * scale
    n = max(*(x.shape[0] for x in sample_rows), 2)
    pad, label_h = 4, 14
    cols = n
    width = max(pad + cols * (tile_w + pad), 300 if latent else 0)  # room for the longer labels
    height = (1 + len(sample_rows)) * (label_h + tile_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def paste(tile: torch.Tensor, col: int, row: int) -> None:
        img = Image.fromarray(tile.numpy(), "RGB").resize((tile_w, tile_h), Image.NEAREST)
        canvas.paste(img, (pad + col * (tile_w + pad), row * (label_h + tile_h + pad) + label_h + pad))

    if latent:
        rows = [(f"recovered latent r, gamma (first {min(3, r.shape[0])} of {r.shape[0]} channels)", None),
                ("decoded, from benign latent noise N(0, I)", benign),
                ("decoded, from the recovered latent trigger", triggered)]
    else:
        rows = [("recovered r (min..max) and gamma (0..max)", None),
                ("generated from benign noise N(0, I)", benign), ("generated from the recovered trigger", triggered)]
    if trojan is not None:
        # no apostrophe: PIL's default bitmap font drops it
        rows.append(("the same trigger noises through the TrojDiff sampler" + (", decoded" if latent else ""), trojan))
    for row, (label, _) in enumerate(rows):
        draw.text((pad, row * (label_h + tile_h + pad) + 2), label, fill=(0, 0, 0))
    paste(_to_pixels(r), 0, 0)
    paste(_to_pixels(gamma, 0.0, float(gamma.max())), 1, 0)
    for row, samples in enumerate(sample_rows, start=1):
        for i, x in enumerate(samples):
            paste(_to_pixels(x, -1.0, 1.0), i, row)  # samples are images in [-1, 1]
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
