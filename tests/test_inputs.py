"""`terd-scan inputs`: closed-form scores, detection rates on known triggers, directory scans, CLI."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

import terd_scan.input_detection as det
from terd_scan.cli_inputs import inputs_command
from terd_scan.errors import ScanError
from terd_scan.input_detection import (
    InputsResult, NoiseFilter, NoiseShapeError, NonFiniteNoiseError, is_poisoned, sample_trigger_noises,
    scan_noise_path, score_noises, synthetic_trigger,
)
from terd_scan.trigger import Trigger

SHAPE = (3, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small memory-bound ops


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _random_trigger(shape=SHAPE, seed=0):
    g = _gen(seed)
    return Trigger(r=torch.randn(shape, generator=g), gamma=0.3 + torch.rand(shape, generator=g) * 1.5)


# ---------------------------------------------------------------- scoring

@pytest.mark.parametrize("kind", ["box", "patch", "blend", "random"])
def test_closed_form_equals_normal_log_prob_difference(kind):
    trig = _random_trigger() if kind == "random" else synthetic_trigger(kind, SHAPE)
    x = torch.cat([torch.randn(5, *SHAPE, generator=_gen(1)), sample_trigger_noises(trig, 5, _gen(2))])
    x64, r, g = x.double(), trig.r.double(), trig.gamma.double()
    ref = (torch.distributions.Normal(r, g).log_prob(x64).flatten(1).sum(1)
           - torch.distributions.Normal(0.0, 1.0).log_prob(x64).flatten(1).sum(1))
    got = score_noises(trig, x)
    assert got.dtype == torch.float64 and got.shape == (10,)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-8)


def test_gamma_one_reduces_to_inner_product_rule():
    trig = synthetic_trigger("patch", SHAPE)
    x = torch.randn(50, *SHAPE, generator=_gen(3))
    r = trig.r.double().flatten()
    expected = x.double().flatten(1) @ r - 0.5 * r @ r  # TERD.md: <x, r> > ||r||^2 / 2
    torch.testing.assert_close(score_noises(trig, x), expected, rtol=1e-10, atol=1e-9)


def test_detection_rates_helper_with_a_reversed_like_trigger():
    true = synthetic_trigger("patch", SHAPE)
    rev = Trigger(r=true.r + 0.2 * torch.randn(SHAPE, generator=_gen(15)), gamma=torch.full(SHAPE, 1.1))
    rates = det.detection_rates(rev, true, n=1000, seed=1)
    assert rates["tpr"] >= 0.99 and rates["tnr"] >= 0.99
    assert det.detection_rates(true, n=1000)["tpr"] >= 0.99
    with pytest.raises(NoiseShapeError):
        det.detection_rates(rev, synthetic_trigger("patch", (3, 8, 8)))


@pytest.mark.parametrize("kind", ["box", "patch", "blend"])
def test_detection_rates_on_known_triggers(kind):
    trig = synthetic_trigger(kind, (3, 32, 32))
    poisoned = sample_trigger_noises(trig, 1000, _gen(10))
    benign = torch.randn(1000, 3, 32, 32, generator=_gen(11))
    tpr = is_poisoned(trig, poisoned).double().mean().item()  # trigger noises flagged
    tnr = (~is_poisoned(trig, benign)).double().mean().item()  # benign noises passing
    assert tpr >= 0.99, (kind, tpr)
    assert tnr >= 0.99, (kind, tnr)


def test_batch_and_single_give_identical_scores():
    trig = _random_trigger()
    x = torch.randn(7, *SHAPE, generator=_gen(4))
    batch = score_noises(trig, x)
    singles = torch.stack([score_noises(trig, x[i]) for i in range(7)])
    # Not bit-equal on every BLAS: MKL's gemv on an AVX-512 AMD EPYC sums rows in blocks of 4 and the
    # remainder rows another way (measured: a row's product changes with its batch's size), so the
    # last bits of a score may depend on the batch; the verdicts may not.
    torch.testing.assert_close(batch, singles, rtol=1e-12, atol=1e-9)
    assert torch.equal(batch > 0, singles > 0)
    assert score_noises(trig, x[0]).shape == ()


def test_chunked_scoring_matches_and_reports_nan_index(monkeypatch):
    trig = _random_trigger()
    x = torch.randn(9, *SHAPE, generator=_gen(5))
    full = score_noises(trig, x)
    monkeypatch.setattr(det, "_CHUNK_ELEMENTS", 2 * 3 * 16 * 16)  # two rows per chunk
    torch.testing.assert_close(score_noises(trig, x), full, rtol=1e-12, atol=1e-9)
    x[6, 0, 0, 0] = float("nan")
    x[8, 1, 2, 3] = float("inf")
    with pytest.raises(NonFiniteNoiseError, match=r"2 of 9 .*index 6"):
        score_noises(trig, x)


def test_filter_api_numpy_float16_threshold_and_shapes():
    trig = synthetic_trigger("box", SHAPE)
    filt = NoiseFilter(trig)
    pois = sample_trigger_noises(trig, 4, _gen(6))
    ben = torch.randn(4, *SHAPE, generator=_gen(7))
    mixed = torch.cat([ben[:2], pois[:2], ben[2:]])
    assert filt(mixed).tolist() == [False, False, True, True, False, False]
    assert torch.equal(filt.benign(mixed), torch.cat([ben[:2], ben[2:]]))
    assert filt.benign(pois[0]).shape == (0, *SHAPE)
    torch.testing.assert_close(filt.scores(mixed.numpy()), filt.scores(mixed))
    assert filt.is_poisoned(mixed.half()).tolist() == filt(mixed).tolist()
    # a threshold above every score flags nothing
    top = filt.scores(mixed).max().item()
    assert not NoiseFilter(trig, threshold=top + 1).is_poisoned(mixed).any()
    for bad in [torch.randn(3, 8, 8), torch.randn(2, 3, 16, 8), torch.randn(SHAPE[0] * 256), torch.randn(1, 1, *SHAPE)]:
        with pytest.raises(NoiseShapeError, match="does not match the trigger"):
            filt.scores(bad)
    with pytest.raises(NoiseShapeError, match="not floating point"):
        filt.scores(torch.ones(SHAPE, dtype=torch.int64))
    with pytest.raises(ScanError):
        NoiseFilter(trig, threshold=float("nan"))


# ---------------------------------------------------------------- directory scans

def _write_mixed_dir(root, trig, marker=None):
    """benign/poisoned noises in every format; returns {file: number of poisoned noises}."""
    root.mkdir(parents=True, exist_ok=True)
    g = _gen(20)
    ben = lambda n: torch.randn(n, *trig.shape, generator=g)  # noqa: E731
    poi = lambda n: sample_trigger_noises(trig, n, g)  # noqa: E731
    save_file({"noise": ben(1)[0]}, root / "single.safetensors")
    save_file({"noise": torch.cat([ben(3), poi(2)])}, root / "batch.safetensors")
    save_file({"a": ben(2), "b": poi(1)[0]}, root / "multi.safetensors")
    np.save(root / "n.npy", poi(3).numpy())
    np.savez(root / "z.npz", x=ben(2).numpy(), y=poi(1).numpy())
    torch.save(ben(2), root / "t.pt")
    torch.save({"k": poi(1)[0]}, root / "d.pth")
    return {"single.safetensors": 0, "batch.safetensors": 2, "multi.safetensors": 1, "n.npy": 3,
            "z.npz": 1, "t.pt": 0, "d.pth": 1}


def test_scan_every_format(tmp_path):
    trig = synthetic_trigger("box", SHAPE)
    expected = _write_mixed_dir(tmp_path / "n", trig)
    res = scan_noise_path(tmp_path / "n", trig)
    assert not res.errors
    got = {fs.file: fs.poisoned for fs in res.files}
    assert got == expected
    assert res.noises == 1 + 5 + 3 + 3 + 3 + 2 + 1
    assert res.poisoned == sum(expected.values()) and res.exit_code() == 1
    keys = {(r.file, r.key, r.index) for r in res.records}
    assert ("multi.safetensors", "b", 0) in keys and ("z.npz", "x", 1) in keys and ("n.npy", None, 2) in keys


def test_same_noise_same_score_in_every_format(tmp_path):
    trig = _random_trigger()
    x = torch.randn(3, *SHAPE, generator=_gen(8))
    save_file({"x": x}, tmp_path / "a.safetensors")
    np.save(tmp_path / "b.npy", x.numpy())
    np.savez(tmp_path / "c.npz", x=x.numpy())
    torch.save(x, tmp_path / "d.pt")
    res = scan_noise_path(tmp_path, trig)
    by_file = {}
    for r in res.records:
        by_file.setdefault(r.file, []).append(r.score)
    ref = score_noises(trig, x).tolist()
    assert all(v == ref for v in by_file.values()) and len(by_file) == 4


def test_scan_errors_are_per_file(tmp_path):
    trig = synthetic_trigger("box", SHAPE)
    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "n"
    d.mkdir()
    save_file({"ok": torch.randn(2, *SHAPE)}, d / "ok.safetensors")
    save_file({"wrong": torch.randn(3, 8, 8)}, d / "wrong_shape.safetensors")
    nan = torch.randn(2, *SHAPE)
    nan[1, 0, 0, 0] = float("nan")
    np.save(d / "nan.npy", nan.numpy())
    (d / "evil.npy").write_bytes(pickle.dumps(Evil()))
    (d / "cut.safetensors").write_bytes((d / "ok.safetensors").read_bytes()[:-50])
    (d / "notes.txt").write_text("hello")
    save_file({"good": torch.randn(SHAPE), "bad": torch.randn(4, 4)}, d / "part.safetensors")
    res = scan_noise_path(d, trig)
    errs = {(e.file, e.key): e.error for e in res.errors}
    assert set(errs) == {("wrong_shape.safetensors", "wrong"), ("nan.npy", None), ("evil.npy", None),
                         ("cut.safetensors", None), ("notes.txt", None), ("part.safetensors", "bad")}
    assert "does not match the trigger" in errs[("wrong_shape.safetensors", "wrong")]
    assert "NaN/Inf" in errs[("nan.npy", None)]
    assert "refused" in errs[("evil.npy", None)]
    assert all("\n" not in e for e in errs.values())
    assert not marker.exists()
    assert res.noises == 3  # ok.safetensors (2) + part.safetensors:good (1)
    assert res.exit_code() == 2 and res.exit_code(skip_errors=True) == 0


def test_scan_empty_hidden_only_and_missing(tmp_path):
    trig = synthetic_trigger("box", SHAPE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanError, match="no noise files found"):
        scan_noise_path(tmp_path / "empty", trig)
    (tmp_path / "hid").mkdir()
    (tmp_path / "hid" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with pytest.raises(ScanError, match="no noise files found.*1 hidden"):
        scan_noise_path(tmp_path / "hid", trig)
    with pytest.raises(ScanError, match="not found"):
        scan_noise_path(tmp_path / "nope", trig)


def test_cli_all_errors_with_skip_errors_is_exit_2(app, setup):
    tmp, tpath, ben, mixed = setup
    bad = tmp / "bad"
    bad.mkdir()
    (bad / "x.npy").write_bytes(b"garbage")
    r = run(app, bad, "-t", tpath, "--skip-errors")
    assert r.exit_code == 2 and "no noise" in r.stderr and "x.npy" in r.stdout


def test_all_errors_never_clean(tmp_path):
    trig = synthetic_trigger("box", SHAPE)
    (tmp_path / "x.npy").write_bytes(b"garbage")
    res = scan_noise_path(tmp_path, trig)
    assert res.noises == 0 and res.exit_code(skip_errors=True) == 2


# ---------------------------------------------------------------- CLI

@pytest.fixture
def app():
    a = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    a.command("inputs")(inputs_command)

    @a.command("other")
    def _other():  # a second command keeps "inputs" a subcommand, as in the real CLI
        pass

    return a


@pytest.fixture
def setup(tmp_path):
    trig = synthetic_trigger("box", SHAPE)
    trig.metadata = {"model": "zoo/test", "nested": {"x": 1}}
    tpath = tmp_path / "trigger.safetensors"
    trig.save(tpath)
    ben = tmp_path / "benign"
    ben.mkdir()
    save_file({"x": torch.randn(4, *SHAPE, generator=_gen(30))}, ben / "a.safetensors")
    np.save(ben / "b.npy", torch.randn(SHAPE, generator=_gen(31)).numpy())
    mixed = tmp_path / "mixed"
    _write_mixed_dir(mixed, trig)
    return tmp_path, tpath, ben, mixed


def run(app, *args):
    return CliRunner().invoke(app, ["inputs", *map(str, args)])


def test_cli_exit_0_for_benign_and_1_for_poisoned(app, setup):
    tmp, tpath, ben, mixed = setup
    r0 = run(app, ben, "--trigger", tpath)
    assert r0.exit_code == 0, r0.output
    assert "no poisoned noise" in r0.stdout and "a.safetensors" in r0.stdout
    r1 = run(app, mixed, "-t", tpath)
    assert r1.exit_code == 1, r1.output
    assert "poisoned" in r1.stdout and "zoo/test" in r1.stdout
    assert r1.stderr == ""


def test_cli_json_document(app, setup):
    tmp, tpath, ben, mixed = setup
    r = run(app, mixed, "--trigger", tpath, "--format", "json")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)  # stdout holds exactly one JSON document
    assert set(doc) >= {"tool", "version", "trigger", "threshold", "records", "errors", "summary"}
    assert doc["tool"] == "terd-scan" and doc["threshold"] == 0.0
    t = doc["trigger"]
    assert t["path"] == str(tpath) and t["shape"] == list(SHAPE) and len(t["sha256"]) == 64
    assert t["metadata"]["model"] == "zoo/test" and "nested" not in t["metadata"]
    assert doc["summary"] == {"files": 7, "noises": 18, "poisoned": 8, "benign": 10, "errors": 0, "skipped": 0}
    rec = doc["records"][0]
    assert set(rec) == {"file", "key", "index", "score", "verdict"} and rec["verdict"] in ("poisoned", "benign")
    assert sum(x["verdict"] == "poisoned" for x in doc["records"]) == 8


def test_cli_out_file_atomic_and_excluded_on_rerun(app, setup):
    tmp, tpath, ben, mixed = setup
    out = ben / "report.json"  # inside the scanned directory
    r = run(app, ben, "-t", tpath, "-f", "json", "--out", out)
    assert r.exit_code == 0
    assert json.loads(out.read_text()) == json.loads(r.stdout)
    assert not [p for p in os.listdir(ben) if p.endswith(".partial")]
    r2 = run(app, ben, "-t", tpath, "--out", out)  # the old report is not scanned as a noise file
    assert r2.exit_code == 0, r2.output
    assert json.loads(out.read_text())["summary"]["errors"] == 0


def test_cli_errors_exit_2_unless_skip_errors(app, setup):
    tmp, tpath, ben, mixed = setup
    save_file({"x": torch.randn(3, 8, 8)}, ben / "wrong.safetensors")
    r = run(app, ben, "-t", tpath, "-f", "json")
    assert r.exit_code == 2
    doc = json.loads(r.stdout)
    assert doc["errors"][0]["file"] == "wrong.safetensors" and doc["summary"]["noises"] == 5
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: 1 of 3 file(s)") and "wrong.safetensors [x]" in line and "--skip-errors" in line
    r = run(app, ben, "-t", tpath, "--skip-errors")
    assert r.exit_code == 0 and r.stderr == "" and "wrong.safetensors" in r.stdout
    save_file({"x": torch.randn(3, 8, 8)}, mixed / "wrong.safetensors")
    assert run(app, mixed, "-t", tpath).exit_code == 2
    assert run(app, mixed, "-t", tpath, "--skip-errors").exit_code == 1


def test_cli_unsafe_pickle_in_dir(app, setup):
    tmp, tpath, ben, mixed = setup
    marker = tmp / "MARKER"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ben / "evil.safetensors").write_bytes(pickle.dumps(Evil()))
    torch.save({"x": Evil()}, ben / "evil.pt")
    r = run(app, ben, "-t", tpath, "-f", "json")
    assert r.exit_code == 2 and not marker.exists()
    doc = json.loads(r.stdout)
    assert {e["file"] for e in doc["errors"]} == {"evil.safetensors", "evil.pt"}
    assert all("refused" in e["error"] for e in doc["errors"])
    assert doc["summary"]["noises"] == 5  # the safe files were still scored


def test_cli_recursive_and_single_file(app, setup):
    tmp, tpath, ben, mixed = setup
    sub = ben / "deeper"
    sub.mkdir()
    np.save(sub / "p.npy", sample_trigger_noises(synthetic_trigger("box", SHAPE), 2, _gen(40)).numpy())
    assert run(app, ben, "-t", tpath).exit_code == 0  # subdirectory not scanned
    r = run(app, ben, "-t", tpath, "--recursive", "-f", "json")
    assert r.exit_code == 1
    assert {x["file"] for x in json.loads(r.stdout)["records"]} >= {"deeper/p.npy"}
    assert run(app, sub / "p.npy", "-t", tpath).exit_code == 1
    assert run(app, ben / "a.safetensors", "-t", tpath).exit_code == 0
    r = run(app, sub / "p.npy", "-t", tpath.parent, "-f", "json")  # the folder holding trigger.safetensors
    assert r.exit_code == 1 and json.loads(r.stdout)["trigger"]["path"] == str(tpath)


def test_cli_threshold(app, setup):
    tmp, tpath, ben, mixed = setup
    assert run(app, mixed, "-t", tpath, "--threshold", "1e9").exit_code == 0
    assert run(app, ben, "-t", tpath, "--threshold", "-1e9").exit_code == 1
    r = run(app, ben, "-t", tpath, "--threshold", "nan")
    assert r.exit_code == 2 and "finite" in r.stderr


@pytest.mark.parametrize("case", ["empty", "missing", "no_trigger", "both", "model", "bad_trigger",
                                  "missing_trigger", "hidden_only"])
def test_cli_usage_errors_one_line_exit_2(app, setup, case):
    tmp, tpath, ben, mixed = setup
    (tmp / "empty").mkdir()
    (tmp / "hid").mkdir()
    (tmp / "hid" / ".DS_Store").write_bytes(b"x")
    (tmp / "bad.safetensors").write_bytes(b"garbage")
    args = {"empty": [tmp / "empty", "-t", tpath], "missing": [tmp / "nope", "-t", tpath],
            "no_trigger": [ben], "both": [ben, "-t", tpath, "--model", "x"], "model": [ben, "--model", "org/m"],
            "bad_trigger": [ben, "-t", tmp / "bad.safetensors"], "missing_trigger": [ben, "-t", tmp / "no.st"],
            "hidden_only": [tmp / "hid", "-t", tpath]}[case]
    r = run(app, *args)
    assert r.exit_code == 2, r.output
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    if case in ("empty", "hidden_only"):
        assert "no noise files found" in lines[0]
    if case == "model":
        assert "cannot reach the Hugging Face Hub" in lines[0]  # conftest points the Hub at a dead port


def test_cli_unexpected_exception_is_exit_2(app, setup, monkeypatch):
    tmp, tpath, ben, mixed = setup

    def boom(*a, **k):
        raise RuntimeError("kaput\nsecond line")

    monkeypatch.setattr(det, "scan_noise_path", boom)
    monkeypatch.delenv("TERD_SCAN_DEBUG", raising=False)
    r = run(app, ben, "-t", tpath)
    assert r.exit_code == 2 and not isinstance(r.exception, RuntimeError)
    assert r.stderr.startswith("error: internal error: RuntimeError: kaput second line (set TERD_SCAN_DEBUG=1")
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_threads_option_restores(app, setup):
    tmp, tpath, ben, mixed = setup
    before = torch.get_num_threads()
    assert run(app, ben, "-t", tpath, "--threads", "2").exit_code == 0
    assert run(app, ben, "-t", tpath, "--threads", "0").exit_code == 0
    assert torch.get_num_threads() == before
    assert run(app, ben, "-t", tpath, "--threads", "-1").exit_code == 2  # Typer usage error


def test_cli_quiet_and_unwritable_out(app, setup):
    tmp, tpath, ben, mixed = setup
    r = run(app, mixed, "-t", tpath, "-q")
    assert r.exit_code == 1 and r.stdout == ""
    r = run(app, mixed, "-t", tpath, "-q", "-f", "json", "--out", tmp / "q.json")
    assert r.exit_code == 1 and r.stdout == "" and json.loads((tmp / "q.json").read_text())["summary"]["poisoned"] == 8
    (tmp / "afile").write_text("x")
    r = run(app, ben, "-t", tpath, "--out", tmp / "afile" / "r.json")
    assert r.exit_code == 2 and "cannot write report" in r.stderr


def test_inputs_result_to_dict_roundtrip():
    res = InputsResult(path="p", trigger={"path": None, "shape": [3, 2, 2]}, threshold=0.0)
    assert json.loads(res.to_json())["summary"]["noises"] == 0


@pytest.mark.parametrize("kind", ["box", "blend"])
def test_example_make_noise_dir_labels_match_verdicts(tmp_path, kind, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "make_noise_dir.py"
    spec = importlib.util.spec_from_file_location("make_noise_dir", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(tmp_path), "--synthetic", kind, "--n", "6"]) == 0
    assert "terd-scan inputs" in capsys.readouterr().out
    labels = json.loads((tmp_path / "labels.json").read_text())["labels"]
    res = scan_noise_path(tmp_path / "noises", tmp_path / "trigger.safetensors", recursive=True)
    assert not res.errors
    got = {(r.file, r.key, r.index): r.verdict for r in res.records}
    assert got == {(x["file"], x["key"], x["index"]): x["label"] for x in labels}
    assert scan_noise_path(tmp_path / "noises" / "benign", tmp_path / "trigger.safetensors").exit_code() == 0


@pytest.mark.parametrize("kind", ["box", "patch", "blend"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_anywhere_is_caught(kind, value):
    # includes dimensions where r = 0 and gamma = 1 (coefficients 0): inf * 0 must still be caught
    filt = NoiseFilter(synthetic_trigger(kind, SHAPE))
    for pos in [(0, 0, 0), (1, 8, 8), (2, 15, 15)]:
        x = torch.randn(3, *SHAPE, generator=_gen(9))
        x[2][pos] = value
        with pytest.raises(NonFiniteNoiseError, match="index 2"):
            filt.scores(x)


@pytest.mark.parametrize("case", ["weak", "near_benign", "random_gamma", "box"])
def test_expected_rates_match_empirical(case):
    g = _gen(12)
    trig = {"weak": lambda: synthetic_trigger("weak", SHAPE),
            "box": lambda: synthetic_trigger("box", SHAPE),
            "near_benign": lambda: Trigger(r=0.1 * torch.randn(SHAPE, generator=g), gamma=torch.full(SHAPE, 0.95)),
            "random_gamma": lambda: Trigger(r=0.05 * torch.randn(SHAPE, generator=g),
                                            gamma=0.9 + 0.2 * torch.rand(SHAPE, generator=g))}[case]()
    filt = NoiseFilter(trig)
    e = filt.expected_rates()
    sp = filt.scores(sample_trigger_noises(trig, 20000, g))
    sb = filt.scores(torch.randn(20000, *SHAPE, generator=g))
    assert abs(e["expected_fpr"] - (sb > 0).double().mean().item()) < 0.01
    assert abs(e["expected_tpr"] - (sp > 0).double().mean().item()) < 0.01
    assert abs(e["benign_mean"] - sb.mean().item()) < 0.05 * e["benign_sd"] + 1e-9
    assert abs(e["trigger_mean"] - sp.mean().item()) < 0.05 * e["trigger_sd"] + 1e-9
    assert (e["expected_fpr"] > 1e-3 or e["expected_tpr"] < 1 - 1e-3) == bool(det.trigger_warnings(trig))


def test_trivial_trigger_warns_and_flags_nothing():
    trig = Trigger(r=torch.zeros(SHAPE), gamma=torch.ones(SHAPE))
    assert not is_poisoned(trig, torch.randn(10, *SHAPE)).any()
    assert "close to N(0, I)" in det.trigger_warnings(trig)[0]


def test_a_collapse_search_trigger_warns_that_it_is_not_the_attacks_trigger():
    """A trigger the sample-collapse search found (scan.judge_reversed) is a noise shift that collapses the samples,
    on a sphere larger than many triggers: poisoned noises can score below 0 (the zoo's CM blend: 0 of 8 flagged)."""
    strong = 3.0 * torch.ones(SHAPE)  # separates N(r, I) from N(0, I) well: only the origin warning
    found = Trigger(r=strong, gamma=torch.ones(SHAPE),
                    metadata={"verdict": "backdoored", "start": "sample-collapse search (sphere of rms radius 1)"})
    warns = det.trigger_warnings(found)
    assert len(warns) == 1 and warns[0].startswith("this trigger was found by the sample-collapse search (sphere")
    assert "weak evidence" in warns[0]
    assert det.trigger_warnings(Trigger(r=strong, gamma=torch.ones(SHAPE), metadata={"start": "paper"})) == []


def test_warnings_in_reports(app, tmp_path):
    trig = Trigger(r=0.1 * torch.randn(SHAPE, generator=_gen(13)), gamma=torch.full(SHAPE, 0.95),
                   metadata={"model": "m", "verdict": "clean"})
    tpath = tmp_path / "trigger.safetensors"
    trig.save(tpath)
    d = tmp_path / "n"
    d.mkdir()
    np.save(d / "x.npy", torch.randn(4, *SHAPE, generator=_gen(14)).numpy())
    r = run(app, d, "-t", tpath, "-f", "json")
    doc = json.loads(r.stdout)
    warns = doc["trigger"]["warnings"]
    assert len(warns) == 2 and "judged 'clean'" in warns[0] and "close to N(0, I)" in warns[1]
    assert doc["trigger"]["expected"]["expected_fpr"] > 0.01
    assert r.stderr.count("warning: ") == 2
    r = run(app, d, "-t", tpath)
    assert "warning: the model this trigger was reversed from was judged" in " ".join(r.stdout.split())


def test_cli_model_reversion_keeps_torch_threads(app, setup, monkeypatch):
    """--threads is for the memory-bound scoring; a --model reversion keeps torch's thread count."""
    import terd_scan.cli_inputs as cli_inputs

    tmp, tpath, ben, mixed = setup
    seen = {}

    def fake_reversion(model, options, show_progress):
        seen["threads"] = torch.get_num_threads()
        return Trigger.load(tpath), tpath

    monkeypatch.setattr(cli_inputs, "trigger_from_model", fake_reversion)
    torch.set_num_threads(2)
    r = run(app, mixed, "--model", "some/model", "-f", "json")
    assert r.exit_code == 1, r.output
    assert seen["threads"] == 2 and torch.get_num_threads() == 2
    assert json.loads(r.stdout)["trigger"]["path"] == str(tpath)
