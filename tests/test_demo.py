"""``python -m hyperoptim demo``: runs every method on a tiny budget, prints the table, writes the
PNG; says what to install when the demo extras are missing."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from hyperoptim.__main__ import main  # noqa: E402
from hyperoptim._demo import LABELS, METHODS  # noqa: E402


def test_demo_runs_every_method_and_writes_the_figure(tmp_path, capsys):
    assert main(["demo", "--steps", "10", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert LABELS[name] in out
    assert "test acc" in out and "final hyperparameters" in out
    png = tmp_path / "hyperoptim_demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_subset(tmp_path, capsys):
    assert main(["demo", "--optimizer", "hd", "--steps", "5", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert LABELS["hd"] in out and LABELS["fds"] not in out


def test_missing_extras_is_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["demo", "--steps", "2", "--no-progress", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "torch-hyperoptim[demo]" in err and "Traceback" not in err


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--steps", "0"])
    assert info.value.code == 2
    assert "Invalid --steps value: 0" in capsys.readouterr().err


def test_demo_inner_adam(tmp_path, capsys):
    from hyperoptim._demo import ADAM_METHODS

    assert main(["demo", "--inner", "adam", "--steps", "6", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(LABELS[name] in out for name in ADAM_METHODS) and LABELS["hd"] + " " not in out
    assert "betas" in out
