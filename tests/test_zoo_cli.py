"""terd_scan/zoo_cli.py: the `build` command of the VE, latent and consistency zoo builders."""

from terd_scan.zoo import SIDECAR
from terd_scan.zoo_cli import build_command


def _run(tmp_path, argv, steps_option=True):
    calls = []
    code = build_command(["build", *argv, "--out", str(tmp_path)], prog="p", description="d",
                         catalogue={"a": object(), "b": object()}, kind="test", default_out=str(tmp_path),
                         build=lambda names, out, n, steps, log: calls.append((names, out, n, steps)),
                         steps_option=steps_option)
    return code, calls


def test_builds_what_is_missing_and_skips_what_exists(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / SIDECAR).write_text("{}")
    code, calls = _run(tmp_path, ["--steps", "7", "--measure-n", "4"])
    assert code == 0 and calls == [(["b"], str(tmp_path), 4, 7)]
    assert "a: exists, skipping" in capsys.readouterr().out
    code, calls = _run(tmp_path, ["a", "--force"], steps_option=False)
    assert code == 0 and calls == [(["a"], str(tmp_path), 32, None)]


def test_an_unknown_name_exits_2_with_one_line_and_builds_nothing(tmp_path, capsys):
    code, calls = _run(tmp_path, ["a", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and calls == [] and err.count("\n") == 1 and "unknown test zoo model(s) ['nope']" in err
