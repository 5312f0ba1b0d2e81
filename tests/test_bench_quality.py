"""The quality benchmark's statistics and grouping (benchmarks/stats.py, benchmarks/quality.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from quality import family, score, summarise  # noqa: E402
from stats import auroc, auroc_interval, wilson  # noqa: E402


def test_wilson_interval_known_values():
    lo, hi = wilson(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-3)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)


def test_auroc_separation_ties_and_inversion():
    assert auroc([3, 4], [1, 2]) == 1.0
    assert auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5
    assert auroc([2, 0], [1]) == 0.5
    lo, hi = auroc_interval([3, 4, 5], [1, 2, 3.5])
    assert 0.0 <= lo <= auroc([3, 4, 5], [1, 2, 3.5]) <= hi <= 1.0


def _row(model, label, split, m, v, attack=None, scale=1.0, preset="fast"):
    row = {"model": model, "label": label, "split": split, "attack": attack, "trigger_scale": scale,
           "preset": preset, "mean_kl": m, "var_kl": v, "seconds": 10.0, "network_evaluations": 100}
    if label == "backdoored":
        row.update(r_cosine=0.9, r_l2=1.0, input_tpr=1.0, input_tnr=1.0)
    return row


def test_families_scores_and_summary():
    th = {"mean_kl": 0.02, "var_kl": 0.001}
    rows = [_row("b1", "benign", "holdout", 0.01, 0.0001), _row("b2", "benign", "holdout", 0.03, 0.0001),
            _row("x1", "backdoored", "holdout", 0.2, 0.01, "baddiffusion"),
            _row("x2", "backdoored", "holdout", 0.01, 0.0002, "baddiffusion", scale=0.2)]
    for r in rows:
        r["family"], r["score"] = family(r), score(r, th)
    assert [r["family"] for r in rows] == ["benign", "benign", "baddiffusion", "baddiffusion-eta0.2"]
    assert rows[1]["score"] == pytest.approx(1.5)  # M over its threshold: flagged (a false positive)
    lines = {(s["split"], s["family"]): s for s in summarise(rows)}
    assert lines[("holdout", "benign")]["tnr"] == 0.5
    assert lines[("holdout", "baddiffusion")]["tpr"] == 1.0 and lines[("holdout", "baddiffusion")]["auroc"] == 1.0
    assert lines[("holdout", "baddiffusion-eta0.2")]["tpr"] == 0.0
    assert lines[("holdout", "baddiffusion-eta0.2")]["auroc"] == 0.25  # below b2, tied with b1
    assert ("calibration", "benign") not in lines and lines[("all", "benign")]["n"] == 2


def test_latent_models_form_their_own_families_compared_with_latent_benign_models():
    th = {"mean_kl": 0.02, "var_kl": 0.001}
    rows = [_row("b1", "benign", "holdout", 0.01, 0.0001), _row("x1", "backdoored", "holdout", 0.015, 0.0001, "baddiffusion"),
            _row("lb1", "benign", "holdout", 0.05, 0.0001), _row("lx1", "backdoored", "holdout", 0.04, 0.0001, "baddiffusion")]
    rows += [_row("vb1", "benign", "holdout", 0.01, 0.0001), _row("vx1", "backdoored", "holdout", 0.2, 0.01, "villan-ve")]
    for r in rows[2:4]:
        r["model_family"] = "latent-diffusion"
    for r in rows[4:]:
        r["model_family"] = "score-sde-ve"  # judged with the pixel reference, ranked against VE benign models
    for r in rows:
        r["family"], r["score"] = family(r), score(r, th)
    assert [r["family"] for r in rows] == ["benign", "baddiffusion", "latent:benign", "latent:baddiffusion",
                                           "ve:benign", "ve:villan-ve"]
    lines = {(s["split"], s["family"]): s for s in summarise(rows)}
    assert lines[("holdout", "benign")]["n"] == 1 and lines[("holdout", "latent:benign")]["tnr"] == 0.0
    # each attack family is ranked against the benign models of its own kind only
    assert lines[("holdout", "baddiffusion")]["auroc"] == 1.0 and lines[("holdout", "baddiffusion")]["n_benign_for_auroc"] == 1
    assert lines[("holdout", "latent:baddiffusion")]["auroc"] == 0.0
    assert lines[("holdout", "ve:villan-ve")]["n_benign_for_auroc"] == 1 and lines[("holdout", "ve:benign")]["tnr"] == 1.0


def test_verdicts_by_model_compares_with_the_first_preset():
    from quality import verdict_markdown, verdicts_by_model

    rows = [_row("b1", "benign", "holdout", 0.01, 0.0001, preset="paper"),
            _row("b1", "benign", "holdout", 0.03, 0.0001, preset="standard"),
            _row("x1", "backdoored", "holdout", 0.2, 0.01, "baddiffusion", preset="paper"),
            _row("x1", "backdoored", "holdout", 0.3, 0.01, "baddiffusion", preset="standard")]
    for r in rows:
        r["family"], r["score"] = family(r), score(r, {"mean_kl": 0.02, "var_kl": 0.001})
    lines = {ln["model"]: ln for ln in verdicts_by_model(rows)}
    assert lines["b1"]["agrees_with_paper"] == {"standard": False}  # clean under paper, flagged under standard
    assert lines["x1"]["agrees_with_paper"] == {"standard": True}
    md = verdict_markdown(list(lines.values()), ["paper", "standard"])
    assert "| b1 | holdout | benign | 0.50 | 1.50 | NO |" in md


def test_seed_cache_copies_only_rows_that_still_match(tmp_path, monkeypatch):
    """benchmarks/seed_cache.py: a committed row reaches the cache only when the model's weights hash
    to its fingerprint and its settings digest is the current preset's; undigested rows need the flag."""
    import json

    import seed_cache
    import zoo_scans

    from terd_scan.loading import load_model
    from terd_scan.scan import weights_fingerprint

    monkeypatch.setattr(zoo_scans, "CACHE", tmp_path / "cache")
    model = zoo_scans.ZOO_DIR / "benign-a"
    fingerprint = weights_fingerprint(load_model(str(model)).provenance.to_dict())
    good = {**_row("benign-a", "benign", "calibration", 0.01, 1e-4), "seed": 0, "weights_fingerprint": fingerprint,
            "settings_digest": zoo_scans.settings_digest("fast"), "score": 0.5, "family": "benign",
            "basin": {"barrier": -0.01, "basin": False, "min_barrier": 0.02, "pairs": 64, "network_evaluations": 1408}}
    rows = [good,
            {**good, "preset": "standard"},  # the digest is fast's: settings differ
            {**good, "weights_fingerprint": "0" * 64},
            {k: v for k, v in good.items() if k != "settings_digest"},
            {**good, "model": "no-such-model"}]
    written, skipped = seed_cache.seed_rows(rows, {"benign-a": model}, accept_undigested=False)
    assert written == 1 and len(skipped) == 4
    assert any("settings changed" in s for s in skipped) and any("weights differ" in s for s in skipped)
    assert any("no settings digest" in s for s in skipped) and any("no such zoo model" in s for s in skipped)
    cached = json.loads(zoo_scans.cache_path(model, "fast", 0).read_text())
    assert cached["mean_kl"] == 0.01 and "score" not in cached and cached["settings"]["preset"] == "fast"
    assert zoo_scans.reverse_zoo_model(model, "fast")["mean_kl"] == 0.01  # served from the cache, no reversion
    written, skipped = seed_cache.seed_rows(rows[3:4], {"benign-a": model}, accept_undigested=True)
    assert written == 0 and skipped == ["benign-a fast seed 0: already in the cache"]  # never overwritten


def test_a_cached_row_gains_its_basin_test_from_its_cached_trigger(tmp_path, monkeypatch):
    """The basin test (a verdict setting) is not in the cache key: a cached row without it is judged on the
    trigger kept beside it, forward passes only, and only when that trigger is the row's (same features)."""
    import json

    import torch
    import zoo_scans

    from terd_scan.detection import kl_features
    from terd_scan.trigger import Trigger

    monkeypatch.setattr(zoo_scans, "CACHE", tmp_path / "cache")
    model = zoo_scans.ZOO_DIR / "benign-a"
    path = zoo_scans.cache_path(model, "standard", 0)
    path.parent.mkdir(parents=True)
    r, gamma = -0.3 * torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.ones(3, 16, 16)
    f = kl_features(r, gamma)
    row = {**_row("benign-a", "benign", "calibration", f.mean_kl, f.var_kl), "seed": 0, "network_evaluations": 100}
    path.write_text(json.dumps(row))
    Trigger(r, gamma).save(str(zoo_scans.trigger_cache_path(path)))
    gated = {"basin_gate": True}  # standard's own: the verdict setting does not move the cache key
    assert zoo_scans.cache_path(model, "standard", 0, gated) == path
    judged = zoo_scans.reverse_zoo_model(model, "standard", overrides=gated)
    basin = judged["basin"]
    assert basin["pairs"] == 64 and basin["basin"] == (basin["barrier"] > 0.02 or basin["wall"] > 0.02)
    assert judged["network_evaluations"] == 100 + basin["network_evaluations"]
    assert json.loads(path.read_text())["basin"] == basin  # written back
    # a row judged before the outer wall existed is judged again, its evaluations replaced, not added
    path.write_text(json.dumps({**row, "network_evaluations": 100 + 7, "basin": {"barrier": -0.01, "basin": False,
                                                                                "network_evaluations": 7}}))
    again = zoo_scans.reverse_zoo_model(model, "standard", overrides=gated)
    assert again["basin"] == basin and again["network_evaluations"] == judged["network_evaluations"]
    ungated = zoo_scans.reverse_zoo_model(model, "standard", overrides={"basin_gate": False})
    assert "basin" not in ungated and ungated["network_evaluations"] == 100  # not this verdict's without the gate
    path.write_text(json.dumps({**row, "mean_kl": 2 * f.mean_kl}))  # a trigger that is not the row's
    with pytest.raises(ValueError, match="not the cached row's"):
        zoo_scans.reverse_zoo_model(model, "standard", overrides=gated)


def test_seed_cache_rejects_what_is_not_a_results_json(tmp_path, capsys):
    import seed_cache
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text('{"rows": [')
    (tmp_path / "norows.json").write_text('{"summary": {}}')
    for name, cause in (("missing.json", "FileNotFoundError"), ("list.json", "AttributeError"),
                        ("broken.json", "JSONDecodeError"), ("norows.json", "no 'rows' list")):
        with pytest.raises(SystemExit) as exit_info:
            seed_cache.main([str(tmp_path / name)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and cause in err and err.count("\n") == 1, err


def _exits_2_with_one_line(capsys, call, *args, match: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        call(*args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and match in err and err.count("\n") == 1, err


def test_set_overrides_take_the_settings_types_and_refuse_unknown_keys(capsys):
    from quality import parse_overrides

    assert parse_overrides(["l1_weight=0.002", "stage1_iterations=50", "canvas_search=off"]) == {
        "l1_weight": 0.002, "stage1_iterations": 50, "canvas_search": False}
    _exits_2_with_one_line(capsys, parse_overrides, ["no_such_setting=1"], match="KEY=VALUE")
    _exits_2_with_one_line(capsys, parse_overrides, ["l1_weight"], match="KEY=VALUE")
    assert parse_overrides(["narrow_gammas=0.8,0.5"]) == {"narrow_gammas": (0.8, 0.5)}
    for bad in ("l1_weight=abc", "canvas_search=maybe", "narrow_gammas=0.8,x"):
        _exits_2_with_one_line(capsys, parse_overrides, [bad], match="not a valid")


def test_overridden_settings_are_judged_by_the_runs_own_calibration_benign_models(capsys):
    from quality import reference_thresholds

    rows = [_row("b1", "benign", "calibration", 0.01, 0.0001), _row("b2", "benign", "calibration", 0.03, 0.0003),
            _row("h1", "benign", "holdout", 9.0, 9.0), _row("x1", "backdoored", "calibration", 5.0, 5.0, "baddiffusion")]
    th = reference_thresholds("standard", "pixel", {"l1_weight": 0.001}, rows)
    sigma = (2 * 0.01 ** 2) ** 0.5  # sample sigma of 0.01 and 0.03: holdout and backdoored rows left out
    assert th["mean_kl"] == pytest.approx(0.02 + 3 * sigma)
    _exits_2_with_one_line(capsys, reference_thresholds, "standard", "pixel", {"l1_weight": 0.001}, rows[2:],
                           match="calibration benign")
    shipped = reference_thresholds("standard", "pixel", {}, rows)  # no overrides: the shipped reference
    assert shipped["mean_kl"] != th["mean_kl"] and shipped["mean_kl"] > 0
    # a verdict setting leaves the features alone: the shipped reference still holds
    assert reference_thresholds("fast", "pixel", {"basin_gate": True}, rows) == reference_thresholds("fast", "pixel", {}, rows)


def test_shard_is_k_of_n_and_a_bad_one_exits_with_one_line(capsys):
    from quality import _name_part, parse_shard

    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "1/0", "a/b", "2"):
        _exits_2_with_one_line(capsys, parse_shard, bad, match="K/N")
    assert [_name_part(v) for v in (0.002, 600, True, (0.8, 0.5))] == ["0.002", "600", "True", "0.8,0.5"]


def test_result_names_may_hold_dots(tmp_path, monkeypatch):
    """lambda_ablation names a result by its lambdas (lambda-ablation-standard-0.004-0.008): the dots
    are part of the name, not a suffix to replace."""
    import start_ablation

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    monkeypatch.setattr(start_ablation, "ROOT", tmp_path)
    start_ablation.write_results("lambda-ablation-standard-0.004-0.008", "cmd", {"k": 1}, [], ["| a |"])
    out = tmp_path / "benchmarks" / "results"
    assert sorted(p.name for p in out.iterdir()) == ["lambda-ablation-standard-0.004-0.008.json",
                                                     "lambda-ablation-standard-0.004-0.008.md"]
    assert (out / "lambda-ablation-standard-0.004-0.008.md").read_text() == "| a |\n"
