"""`terd-scan model` through the CLI on tiny random models: outputs, artefacts, exit codes and
bad inputs. Verdicts on real (zoo) backdoors are in test_zoo_scans.py."""

import json
import os

import pytest
from typer.testing import CliRunner

import fixtures_models as fm
from terd_scan.cli import app

CHEAP = ["--stage1-iterations", "3", "--stage2-iterations", "1", "--batch-size", "2", "--sampler-steps", "2",
         "--refine-iterations", "3",
         "--preview-steps", "4", "--device", "cpu", "--collapse-iterations", "2"]
CALIBRATE_CHEAP = CHEAP[:-6]  # calibrate reverses only: no previews, no verdict (so no collapse search)


def reference(path, mean_kl, var_kl):
    models = [{"name": "a", "mean_kl": mean_kl, "var_kl": var_kl}, {"name": "b", "mean_kl": mean_kl, "var_kl": var_kl}]
    fm.write_json(path, {"format": "terd-scan-reference", "name": path.stem, "settings": {}, "models": models})
    return str(path)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    d = tmp_path_factory.mktemp("refs")
    return {"lenient": reference(d / "lenient.json", 1e6, 1e6), "strict": reference(d / "strict.json", 0.0, 0.0)}


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_json_report_fields_and_artefacts(model_dirs, refs, tmp_path):
    out = tmp_path / "out"
    res = run("model", model_dirs["pipeline"], "-f", "json", "--out", out, "--reference", refs["lenient"], *CHEAP)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)  # stdout holds one JSON document and nothing else
    assert report["tool"]["name"] == "terd-scan" and report["tool"]["version"]
    assert report["verdict"] == "clean" and report["reasons"] == []
    assert set(report["features"]) == {"mean_kl", "var_kl"}
    assert set(report["thresholds"]) >= {"mean_kl", "var_kl", "origin"}
    assert report["settings"]["preset"] == "standard" and report["settings"]["stage1_iterations"] == 3
    assert report["settings"]["seed"] == 0 and report["settings"]["device"] == "cpu"
    weights = [f for f in report["source"]["files"] if f["role"] == "weights"]
    assert weights and all(len(f["sha256"]) == 64 for f in weights)
    assert report["timing"]["network_evaluations"] > 0 and report["timing"]["seconds"] > 0
    assert report["model"]["input_shape"] == [3, 8, 8] and report["model"]["prior"] == "N(0, I)"
    search = report["patch_search"]  # 2x2 patches (a quarter of the side) at 7 x 7 positions, both signs
    assert search["candidates"] == 98 and search["height"] == search["width"] == 2
    assert report["settings"]["patch_search"] is True and report["trigger"]["start"]
    narrow = report["narrow_search"]  # 8 sign patterns x 2 amplitudes x 4 gammas; seeding is the model's business
    assert report["settings"]["narrow_search"] is True and narrow["candidates"] == 64
    assert narrow["gamma"] in (0.8, 0.6, 0.4, 0.2) and len(narrow["offset"]) == 3
    assert isinstance(narrow["seeded_run"], bool) and narrow["ratio"] > 0 and narrow["network_evaluations"] > 0
    assert report["settings"]["narrow_refine_iterations"] == 3  # --refine-iterations
    canvas = report["canvas_search"]  # 8 sign patterns x 2 amplitudes
    assert report["settings"]["canvas_search"] is True and canvas["candidates"] == 16 and len(canvas["offset"]) == 3
    assert isinstance(canvas["kept"], bool) and report["timing"]["canvas_search_seconds"] >= 0
    dip = report["dip_search"]  # r = 0 along the 9 gammas of the grid; 8 of them can dip
    assert report["settings"]["dip_search"] is True and dip["candidates"] == 8 and len(dip["losses"]) == 9
    assert isinstance(dip["kept"], bool) and report["timing"]["dip_search_seconds"] >= 0
    assert report["settings"]["basin_gate"] is True and report["basin_test"]["pairs"] == 64  # standard's gate
    collapse = report["collapse_search"]  # the KL route found the model clean, so standard's collapse search ran
    assert report["settings"]["collapse_search"] is True and report["settings"]["collapse_iterations"] == 2
    assert collapse["ran"] and collapse["radii_rms"] == [0.6, 0.9] and len(collapse["ratios"]) == 2
    assert not collapse["kept"] and collapse["network_evaluations"] > 0 and report["timing"]["collapse_search_seconds"] > 0
    assert sum(run["chosen"] for run in report["trigger"]["runs"]) == 1
    previews = report["previews"]  # a TrojDiff-sampler row exactly where the reversed noise is narrowed
    assert previews["samples"] == 6 and previews["steps"] == 4
    assert previews["trojdiff_sampler"] == (report["trigger"]["gamma_mean"] < previews["narrow_gamma_below"] == 0.9)
    for key in ("report_json", "trigger_png", "trigger_safetensors"):
        assert os.path.isfile(report["artefacts"][key])
    assert json.loads((out / "report.json").read_text())["verdict"] == "clean"
    assert not list(out.glob("*.partial"))
    from terd_scan.trigger import Trigger

    trig = Trigger.load(out / "trigger.safetensors")
    assert trig.shape == (3, 8, 8) and trig.metadata["verdict"] == "clean"
    assert (out / "trigger.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refine_iterations_0_runs_no_held_gamma_descent(model_dirs, refs, tmp_path):
    """Whether or not the narrow screen seeds a run, --refine-iterations 0 leaves no refinement and no sweep."""
    cheap = [a if a != "3" or CHEAP[i - 1] != "--refine-iterations" else "0" for i, a in enumerate(CHEAP)]
    res = run("model", model_dirs["pipeline"], "-f", "json", "--out", tmp_path, "--reference", refs["lenient"], *cheap)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["settings"]["narrow_refine_iterations"] == 0 and report["settings"]["narrow_sweep_unseeded"] is True
    assert "held" not in report["narrow_search"] and "refine" not in report["narrow_search"]
    assert report["timing"]["narrow_refine_seconds"] == 0


def test_no_patch_search_and_no_narrow_search_flags(model_dirs, refs, tmp_path):
    res = run("model", model_dirs["pipeline"], "-f", "json", "--out", tmp_path, "--reference", refs["lenient"],
              "--no-patch-search", "--no-narrow-search", "--no-canvas-search", "--no-dip-search", *CHEAP)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["patch_search"] is None and report["settings"]["patch_search"] is False
    assert report["narrow_search"] is None and report["settings"]["narrow_search"] is False
    assert report["canvas_search"] is None and report["settings"]["canvas_search"] is False
    assert report["dip_search"] is None and report["settings"]["dip_search"] is False
    assert report["trigger"]["start"].startswith("paper") and len(report["trigger"]["runs"]) == 1


def test_backdoored_verdict_exits_1_and_fail_on_never_exits_0(model_dirs, refs, tmp_path):
    # the strict reference (thresholds 0) forces the KL verdict; the basin gate is off so it alone decides
    res = run("model", model_dirs["flat"], "-f", "json", "--out", tmp_path / "a", "--reference", refs["strict"], *CHEAP,
              "--no-basin-gate")
    assert res.exit_code == 1, res.output
    assert json.loads(res.stdout)["verdict"] == "backdoored"
    res = run("model", model_dirs["flat"], "-q", "--fail-on", "never", "--out", tmp_path / "b",
              "--reference", refs["strict"], *CHEAP, "--no-basin-gate")
    assert res.exit_code == 0 and res.stdout == ""


def test_a_kl_over_the_thresholds_without_a_basin_is_clean_and_says_why(model_dirs, refs, tmp_path):
    """The basin gate: the strict reference puts any KL over its thresholds; on this random network's line
    from N(0, I) through its reversed trigger the objective has neither a barrier before the trigger nor a wall
    beyond it, so the verdict is clean, exit 0, with the crossings and the gate's reason in the report."""
    res = run("model", model_dirs["flat"], "-f", "json", "--out", tmp_path, "--reference", refs["strict"], *CHEAP,
              "--basin-gate")
    report = json.loads(res.stdout)
    basin = report["basin_test"]  # the line from N(0, I) through the trigger, 13 points (s to 1.2) on 64 noise pairs
    assert report["settings"]["basin_gate"] is True and basin["pairs"] == 64 and len(basin["objective"]) == 13
    assert basin["network_evaluations"] == 13 * 2 * 64 and report["timing"]["basin_test_seconds"] >= 0
    assert not basin["basin"] and basin["barrier"] <= 0.02 and basin["wall"] <= 0.02, basin
    assert res.exit_code == 0 and report["verdict"] == "clean", res.output
    assert any("KL" in r for r in report["reasons"]) and "does not hold" in report["reasons"][-1]
    res = run("model", model_dirs["flat"], "--out", tmp_path / "rich", "--reference", refs["strict"], *CHEAP,
              "--basin-gate")
    assert res.exit_code == 0 and "not held" in res.stdout and "basin test" in res.stdout
    assert "collapse" in res.stdout  # its row (the label may wrap at the runner's width)


def test_a_collapse_flags_the_model_and_its_r_is_the_saved_trigger(model_dirs, refs, tmp_path, monkeypatch):
    """The sample-collapse route through the CLI (its search replaced by a canned outcome; the search itself is
    tested in test_collapse_search.py): exit 1, the reason, the report's trigger and the saved tensor are its r."""
    import torch

    from terd_scan import scan
    from terd_scan.collapse_search import CollapseSearch
    from terd_scan.trigger import Trigger

    found = torch.full((3, 8, 8), 0.9)
    monkeypatch.setattr(scan, "search_for", lambda *a, **k: CollapseSearch(
        ran=True, radii=(0.6, 0.9), ratios=(0.8, 0.1), spread_at_zero=0.2, r=found))
    res = run("model", model_dirs["flat"], "-f", "json", "--out", tmp_path, "--reference", refs["lenient"], *CHEAP)
    assert res.exit_code == 1, res.output
    report = json.loads(res.stdout)
    assert report["verdict"] == "backdoored" and "DDPM samples collapse" in report["reasons"][-1]
    assert report["collapse_search"]["kept"] and report["collapse_search"]["ratio"] == 0.1
    assert report["trigger"]["start"].startswith("sample-collapse search") and report["trigger"]["gamma_mean"] == 1.0
    assert torch.equal(Trigger.load(tmp_path / "trigger.safetensors").r, found)
    assert report["features"]["mean_kl"] > 0.4  # 0.9^2 / 2 per dimension


def test_sarif_output(model_dirs, refs, tmp_path):
    res = run("model", model_dirs["bare"], "-f", "sarif", "--out", tmp_path, "--reference", refs["strict"], *CHEAP,
              "--no-basin-gate")
    assert res.exit_code == 1, res.output
    sarif = json.loads(res.stdout)
    assert sarif["version"] == "2.1.0"
    run0 = sarif["runs"][0]
    assert {r["id"] for r in run0["tool"]["driver"]["rules"]} >= {"TERD001"}
    [finding] = [r for r in run0["results"] if r["ruleId"] == "TERD001"]
    assert finding["level"] == "error"
    uris = [loc["physicalLocation"]["artifactLocation"]["uri"] for loc in finding["locations"]]
    assert any(u.endswith("diffusion_pytorch_model.safetensors") for u in uris)


def test_same_seed_same_result_and_reference_mismatch_warning(model_dirs, refs, tmp_path):
    a = run("model", model_dirs["pipeline"], "-f", "json", "--out", tmp_path / "a", "--reference", refs["lenient"],
            "--seed", "7", *CHEAP)
    b = run("model", model_dirs["pipeline"], "-f", "json", "--out", tmp_path / "b", "--reference", refs["lenient"],
            "--seed", "7", *CHEAP)
    assert json.loads(a.stdout)["features"] == json.loads(b.stdout)["features"]
    # the default (shipped) reference was calibrated with the preset's own settings: overriding warns
    c = run("model", model_dirs["pipeline"], "-f", "json", "--out", tmp_path / "c", *CHEAP)
    assert c.exit_code in (0, 1), c.output
    assert any("calibrated with other settings" in w for w in json.loads(c.stdout)["warnings"])


def one_line_error(res, fragment):
    assert res.exit_code == 2, (res.exit_code, res.output)
    err = res.stderr.strip()
    assert "Traceback" not in res.output and len(err.splitlines()) == 1, err
    assert fragment.lower() in err.lower(), err


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(model_dirs, refs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    fm.save_pipeline(corrupt, fm.make_unet())
    w = corrupt / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
    mismatch = tmp_path / "mismatch"
    fm.save_pipeline(mismatch, fm.make_unet())
    cfg = fm.read_json(mismatch / "unet" / "config.json")
    cfg["block_out_channels"] = [16, 32]
    cfg["norm_num_groups"] = 8
    fm.write_json(mismatch / "unet" / "config.json", cfg)
    bad_ref = tmp_path / "bad_ref.json"
    bad_ref.write_text("{")
    cases = [
        (["model", tmp_path / "missing"], "not found"),
        (["model", empty], "no"),
        (["model", corrupt], "diffusion_pytorch_model.safetensors"),
        (["model", mismatch], "shape"),
        (["model", model_dirs["pipeline"], "--reference", bad_ref], "not valid JSON"),
        (["model", model_dirs["pipeline"], "--reference", tmp_path / "nope.json"], "not found"),
    ]
    for args, fragment in cases:
        out = tmp_path / "out"
        one_line_error(run(*args, "--out", out, *CHEAP), fragment)
        assert not out.exists()


def test_usage_errors_exit_2(model_dirs):
    assert run("model", model_dirs["pipeline"], "--preset", "nope").exit_code == 2
    assert run("model", model_dirs["pipeline"], "--stage1-iterations", "-1").exit_code == 2
    assert run("model").exit_code == 2


def test_unsupported_scheduler_is_an_error_never_clean(tmp_path, refs):
    d = tmp_path / "ve"
    fm.save_bare(d, fm.make_unet())
    fm.write_json(d / "scheduler_config.json", {"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": 2000,
                                                "sigma_min": 0.01, "sigma_max": 1348.0, "snr": 0.15})
    res = run("model", d, "--reference", refs["lenient"], "--out", tmp_path / "o", *CHEAP)
    one_line_error(res, "not supported")


def test_paper_preset_uses_the_shipped_paper_reference_and_says_when_settings_differ(model_dirs, tmp_path):
    res = run("model", model_dirs["pipeline"], "--preset", "paper", "-f", "json", "--out", tmp_path / "o", *CHEAP)
    assert res.exit_code in (0, 1), res.output
    report = json.loads(res.stdout)
    assert report["thresholds"]["origin"] == "shipped:paper"
    assert any("stage1_iterations=3 (reference: 3000)" in w for w in report["warnings"]), report["warnings"]


def test_a_preset_without_a_shipped_reference_says_how_to_make_one(model_dirs, tmp_path, monkeypatch):
    import terd_scan.scan

    monkeypatch.setattr(terd_scan.scan, "shipped_reference", lambda preset, family="pixel": None)
    res = run("model", model_dirs["pipeline"], "--preset", "paper", "--out", tmp_path / "o", *CHEAP)
    one_line_error(res, "no benign reference is shipped for preset 'paper'")
    assert "terd-scan calibrate" in res.stderr and not (tmp_path / "o").exists()


def test_calibrate_writes_a_reference_that_model_uses(model_dirs, tmp_path):
    ref = tmp_path / "ref.json"
    res = run("calibrate", model_dirs["pipeline"], model_dirs["flat"], "--out", ref, "--seeds", "0,1", *CALIBRATE_CHEAP,
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    data = json.loads(ref.read_text())
    assert data["format"] == "terd-scan-reference" and len(data["models"]) == 4
    assert {m["seed"] for m in data["models"]} == {0, 1}
    assert data["settings"]["stage1_iterations"] == 3 and "seed" not in data["settings"]
    scan = run("model", model_dirs["bare"], "-f", "json", "--reference", ref, "--out", tmp_path / "o", *CHEAP)
    assert scan.exit_code in (0, 1), scan.output
    report = json.loads(scan.stdout)
    assert report["thresholds"]["origin"] == str(ref) and report["warnings"] == []
    assert report["reference"]["models"] == 2 and report["reference"]["runs"] == 4
    # scanning with other settings than the reference's is reported
    other = run("model", model_dirs["bare"], "-f", "json", "--reference", ref, "--out", tmp_path / "p", *CHEAP,
                "--stage1-iterations", "4")
    assert any("calibrated with other settings" in w for w in json.loads(other.stdout)["warnings"])


def test_calibrate_needs_two_models(model_dirs, tmp_path):
    one_line_error(run("calibrate", model_dirs["pipeline"], "--out", tmp_path / "r.json", *CALIBRATE_CHEAP), "at least 2")
    assert not (tmp_path / "r.json").exists()
