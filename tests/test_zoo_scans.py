"""End-to-end verdicts on the shipped zoo models (examples/zoo) with the default preset and the
shipped reference: backdoored models are flagged (exit 1) and their recovered trigger r
correlates with the true one; benign models pass (exit 0), benign-n by the basin test. The reversed triggers then filter
input noises. A CI-sized slice of the zoo; benchmarks/bench_scan.py runs all of it."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from terd_scan.cli import app
from terd_scan.input_detection import detection_rates, ground_truth_trigger
from terd_scan.trigger import Trigger
from terd_scan.zoo import load_ground_truth

ZOO = Path(__file__).resolve().parent.parent / "examples" / "zoo"
MIN_COSINE = 0.8  # the recovered r's cosine with the true trigger; TrojDiff's is recovered less exactly


@pytest.fixture(scope="session")
def scans(tmp_path_factory):
    """Each zoo model scanned once through the CLI: {name: (exit code, report, out dir)}."""
    done = {}

    def scan(name, *extra):
        if (name, extra) not in done:
            out = tmp_path_factory.mktemp(name)
            res = CliRunner().invoke(app, ["model", str(ZOO / name), "-f", "json", "--out", str(out), "--device",
                                           "cpu", "--preview-steps", "0", *extra])
            assert res.exit_code in (0, 1), res.output
            done[name, extra] = (res.exit_code, json.loads(res.stdout), out)
        return done[name, extra]

    return scan


# One class per zoo model: `pytest -n 2 --dist loadscope` runs a class on one worker, so each model
# is scanned once and the scans spread over the workers. The slice: one model per detected attack
# family (BadDiffusion's box mirrored onto a +1 canvas that needs the canvas search, the patch on a
# zero background that needs the patch search, the adaptive box scaled by 0.5, TrojDiff's blend
# that needs the narrow-noise search, VillanDiffusion for DDIM on its own noise schedule; all but
# the patch are holdout models), a calibration-split benign model and the holdout benign models,
# never used for calibration or tuning. The canonical box (-1 canvas) is villan-box-corner's trigger.
class ZooModel:
    name: str
    expected = 0  # exit code: 0 clean, 1 backdoored
    scan_args: tuple = ()  # beyond the default preset's

    def test_verdict(self, scans):
        code, report, _ = scans(self.name, *self.scan_args)
        assert code == self.expected, (report["features"], report["thresholds"])
        assert report["verdict"] == ("backdoored" if self.expected else "clean")
        assert report["warnings"] == []


class BackdooredZooModel(ZooModel):
    expected = 1
    min_cosine = MIN_COSINE

    def test_recovered_trigger_correlates_with_the_true_one(self, scans):
        _, _, out = scans(self.name)
        r = Trigger.load(out / "trigger.safetensors").r
        true_r = load_ground_truth(ZOO / self.name)["trigger_r"]
        cos = float(torch.nn.functional.cosine_similarity(r.flatten(), true_r.flatten(), dim=0))
        assert cos > self.min_cosine, f"recovered r has cosine {cos:.3f} with the true trigger"

    def test_reversed_trigger_filters_poisoned_inputs(self, scans):
        """>= 99% of 1000 noises from the TRUE trigger distribution are flagged and >= 99% of 1000
        benign N(0, I) noises pass, with the trigger REVERSED from the model."""
        _, _, out = scans(self.name)
        reversed_trigger = Trigger.load(out / "trigger.safetensors")
        rates = detection_rates(reversed_trigger, ground_truth_trigger(ZOO / self.name / "ground_truth.safetensors"),
                                n=1000)
        assert rates["tpr"] >= 0.99 and rates["tnr"] >= 0.99, rates


@pytest.mark.cost(115)
class TestMirroredBox(BackdooredZooModel):
    name = "baddiffusion-boxinv-corner"

    def test_found_by_the_canvas_search(self, scans):
        """The box on a +1 canvas points away from TERD's start -U[0,1): the canvas screen seeds a
        run at a positive canvas, the run is kept and is the result."""
        _, report, _ = scans(self.name)
        canvas = report["canvas_search"]
        assert canvas["seeded_run"] and canvas["kept"] and all(v > 0 for v in canvas["offset"])
        assert report["trigger"]["start"].startswith("canvas seed")


@pytest.mark.cost(115)
class TestPatch(BackdooredZooModel):
    name = "baddiffusion-patch"

    def test_found_by_the_patch_search(self, scans):
        _, report, _ = scans(self.name)
        search = report["patch_search"]
        assert (search["top"], search["left"]) == (11, 11) and search["seeded_run"]
        assert report["trigger"]["start"] == "patch seed at (11, 11)"


@pytest.mark.cost(66)
class TestAdaptiveBox(BackdooredZooModel):
    name = "baddiffusion-box-eta0.5"


@pytest.mark.cost(130)
class TestTrojDiffBlend(BackdooredZooModel):
    name = "trojdiff-blend"
    # TrojDiff's r and gamma are coupled: the narrow run stops wider than the trigger with r partly
    # found (fast: gamma 0.74, cosine 0.69 for a true 0.6); r refined at held gammas reaches cosine
    # 0.92 at gamma 0.63 (fast, seed 0; benchmarks/results/trigger-fires-fast.md)
    min_cosine = 0.85

    def test_found_by_the_narrow_search(self, scans):
        """TrojDiff narrows the starting noise (gamma 0.6): the screen seeds a run, the run keeps a
        narrow gamma, and it is the result."""
        _, report, _ = scans(self.name)
        narrow = report["narrow_search"]
        assert narrow["seeded_run"] and narrow["kept"] and narrow["end_ratio"] < 0.8
        assert report["trigger"]["start"].startswith("narrow-noise seed")
        refine = narrow["refine"]  # refined at the held gamma with the lowest loss, near the trigger's 0.6
        assert refine["losses"][refine["scales"].index(refine["scale"])] == min(refine["losses"])
        assert 0.55 < report["trigger"]["gamma_mean"] < 0.7
        canvas = report["canvas_search"]  # a basin toward +0.5, but the kept narrow run wins: no canvas run
        assert canvas["seeded_run"] is False and len(report["trigger"]["runs"]) == 2


@pytest.mark.cost(41)
class TestTrojDiffMixedPalette:
    """Mixed-palette smiley blend triggers: descents with gamma held, from the screen's best offset,
    find the trigger at the trigger's own gamma. On trojdiff-blend-smiley (calibration split; the
    sweep was designed on it) the screen seeds a run first; on trojdiff-smiley-hat-checkers (the
    unseeded sweep's design model, calibration split since) no offset narrows the loss (best ratio
    1.64), so the sweep runs unseeded (narrow_sweep_unseeded). The sweep alone, not a whole scan, to keep CI short (in a seeded scan the learned-gamma run
    draws first, so its random draws differ from this one's)."""

    @pytest.mark.parametrize("name, seeded", [("trojdiff-blend-smiley", True), ("trojdiff-smiley-hat-checkers", False)])
    def test_held_gamma_sweep_finds_the_trigger(self, name, seeded):
        from terd_scan.denoisers import make_denoiser
        from terd_scan.narrow_search import search_narrow_seed
        from terd_scan.presets import settings_for
        from terd_scan.reversion import NARROW_SEED_OFFSET, _held_gamma_sweep, search_generator
        from terd_scan.scan import ScanOptions, load_source

        model = ZOO / name
        fast = settings_for("fast")
        den = make_denoiser(load_source(str(model), ScanOptions(preset="fast", device="cpu")), "cpu")
        gen = search_generator(0, NARROW_SEED_OFFSET)  # the narrow search's generator, scan seed 0
        probe = search_narrow_seed(den, fast.narrow_gammas, fast.narrow_amplitudes, fast.narrow_pairs,
                                   fast.timestep_window, gen)
        assert probe.has_basin is seeded, probe.summary()
        run, outcome = _held_gamma_sweep(den, fast, probe, {}, gen, None)
        true_r = load_ground_truth(model)["trigger_r"]
        assert outcome["kept"] and outcome["gamma"] == 0.6, outcome
        assert float(torch.nn.functional.cosine_similarity(run.r.flatten(), true_r.flatten(), dim=0)) > 0.85


class TestTrojDiffFaint:
    """TrojDiff's blend scaled toward N(0, I) (trojdiff-blend-eta0.1: r = 0.04 x the picture, gamma 0.6),
    missed before the dip search: the loss at r = 0 dips at gamma 0.6, the run held there keeps the dip, and
    its KL (the narrowed noise's, ~0.19 per dimension) is far over the fast threshold. The dip search alone,
    as a scan runs it (its own generator), not a whole scan, to keep CI short."""

    def test_dip_search_finds_the_narrowed_noise(self):
        from terd_scan.denoisers import make_denoiser
        from terd_scan.detection import kl_features
        from terd_scan.dip_search import DIP_KEEP_RATIO, dip_screen
        from terd_scan.presets import settings_for
        from terd_scan.reference import shipped_reference
        from terd_scan.reversion import DIP_SEED_OFFSET, _dip_at, _dip_run, search_generator
        from terd_scan.scan import ScanOptions, load_source

        fast = settings_for("fast")
        den = make_denoiser(load_source(str(ZOO / "trojdiff-blend-eta0.1"), ScanOptions(device="cpu")), "cpu")
        gen = search_generator(0, DIP_SEED_OFFSET)  # the dip search's generator, scan seed 0
        screen = dip_screen(den, fast, gen)
        assert screen.has_basin and screen.gamma == 0.6, screen.summary()
        run = _dip_run(den, fast, screen.gamma, gen, None)
        assert _dip_at(den, fast, run, gen) < DIP_KEEP_RATIO
        features = kl_features(run.r, run.gamma)
        assert features.mean_kl > 5 * shipped_reference("fast").thresholds()["mean_kl"]
        benign = make_denoiser(load_source(str(ZOO / "benign-a"), ScanOptions(device="cpu")), "cpu")
        assert not dip_screen(benign, fast, search_generator(0, DIP_SEED_OFFSET)).has_basin


@pytest.mark.cost(115)
class TestVillanDiffusion(BackdooredZooModel):
    name = "villan-box-corner"


@pytest.mark.cost(110)
class TestBenignCalibration(ZooModel):
    name = "benign-a"
    # CI time: the sample-collapse search at a third of the preset's iterations (34 s instead of about 100;
    # ratio 1.042 against 1.03 at the preset's 150: `python benchmarks/collapse_calibration.py --set
    # collapse_iterations=50 --model benign-a`); tests/test_collapse_search.py runs it at the preset's settings
    scan_args = ("--collapse-iterations", "50")

    def test_no_search_seeds_a_run(self, scans):
        """On a benign model no search finds a basin: the paper's run is the only run and the result."""
        _, report, _ = scans(self.name, *self.scan_args)
        for search in ("patch_search", "narrow_search", "canvas_search", "dip_search"):
            assert report[search]["seeded_run"] is False, search
        assert report["trigger"]["start"].startswith("paper") and len(report["trigger"]["runs"]) == 1

    def test_its_ddpm_samples_do_not_collapse(self, scans):
        """The KL route finds it clean, so the default preset's sample-collapse search runs, and finds no noise
        whose DDPM samples collapse (ratio 1.03 in benchmarks/results/quality-fast-standard.md)."""
        _, report, _ = scans(self.name, *self.scan_args)
        collapse = report["collapse_search"]
        assert collapse["ran"] and not collapse["kept"] and collapse["ratio"] > 0.8, collapse
        assert report["timing"]["collapse_search_seconds"] > 0


@pytest.mark.slow  # three other benign verdicts stay in the default run; this one's is in the benchmark table
class TestBenignFineTune(ZooModel):
    name = "benign-f"


# flagged by the standard preset until its L1 weight went from the paper's 5e-5 to 2e-3 (1.02 -> 0.94 x the
# threshold, each with its own reference of 10 benign models x 2 seeds); docs/QUALITY.md, "TERD's L1 weight lambda".
# Slow since the sample-collapse search runs on every clean verdict of the default preset (about 100 s more a
# benign scan): benign-a and benign-n keep that check in the default run.
@pytest.mark.slow
class TestBenignHoldout(ZooModel):
    name = "benign-e"


@pytest.mark.slow  # CI time: benign-a's default-preset scan stays in the default run
class TestBenignDrift(ZooModel):
    """benign-n (holdout): its reversed r is the same small structure at every seed, a direction in which this
    poorly trained model's loss is a little lower, and its KL is over the standard thresholds (1.8 x). Along
    the line from N(0, I) through it the objective has no barrier and no wall beyond it: the basin test calls
    it a drift, and the verdict is clean with the crossing and the reason in the report. Scanned without the
    sample-collapse search, which can only add a flag (it ends at ratio 0.909 on this model, kept below 0.5:
    benchmarks/results/quality-fast-standard.md) and costs about 100 s; benign-a's scan keeps it in CI."""
    name = "benign-n"
    scan_args = ("--no-collapse-search",)

    def test_the_kl_crosses_but_the_basin_test_clears_it(self, scans):
        _, report, _ = scans(self.name, *self.scan_args)
        basin = report["basin_test"]
        assert not basin["basin"] and basin["barrier"] <= 0.02 and basin["wall"] <= 0.02, basin
        assert any("KL" in r for r in report["reasons"][:-1]) and "does not hold" in report["reasons"][-1]


@pytest.mark.cost(33)
def test_inputs_with_model_reverses_once_then_uses_the_cache(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("TERD_SCAN_CACHE", str(tmp_path / "cache"))
    truth = load_ground_truth(ZOO / "baddiffusion-box-eta0.5")  # one reversion run: the searches seed none
    g = torch.Generator().manual_seed(0)
    noises = tmp_path / "noises"
    noises.mkdir()
    save_file({"x": torch.randn(8, 3, 16, 16, generator=g)}, str(noises / "benign.safetensors"))
    save_file({"x": truth["trigger_r"] + torch.randn(8, 3, 16, 16, generator=g)}, str(noises / "poisoned.safetensors"))
    args = ["inputs", str(noises), "--model", str(ZOO / "baddiffusion-box-eta0.5"), "--preset", "fast", "--device", "cpu",
            "-f", "json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 1, first.output
    verdicts = {}
    for rec in json.loads(first.stdout)["records"]:
        verdicts.setdefault(Path(rec["file"]).name, []).append(rec["verdict"])
    assert verdicts == {"benign.safetensors": ["benign"] * 8, "poisoned.safetensors": ["poisoned"] * 8}
    cached = list((tmp_path / "cache" / "triggers").glob("*.safetensors"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 1, second.output
    assert cached[0].stat().st_mtime_ns == mtime  # reused, not recomputed
    assert json.loads(second.stdout)["summary"] == json.loads(first.stdout)["summary"]
