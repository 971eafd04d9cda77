"""``python -m hyperoptim demo``: runs every method on a tiny budget, prints the table, writes the
PNG; says what to install when the demo extras are missing."""

from __future__ import annotations

import sys

import pytest
import torch

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


# --------------------------------------------------------------------------- the figure
@pytest.fixture(scope="module")
def demo_figure():
    """The demo's figure from a short real run of every method (30 steps, 2 FDS episodes)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hyperoptim._demo import figure, run_demo

    results, _ = run_demo(METHODS, steps=30, quick=True, out=_tmp_out(), progress=False,
                          stream=io.StringIO())
    fig = figure(results, 30)
    yield fig, results
    plt.close(fig)


def _tmp_out():
    import tempfile

    return tempfile.mkdtemp(prefix="hyperoptim_demo_test_")


def _rgba(line):
    from matplotlib.colors import to_rgba

    return to_rgba(line.get_color(), line.get_alpha())


def test_every_panel_has_a_title_naming_what_it_shows(demo_figure):
    fig, _ = demo_figure
    assert len(fig.axes) == 3
    for ax in fig.axes:
        assert ax.get_title().strip(), "an axis without a title"
    assert "digits" in fig.get_suptitle() and "MLP" in fig.get_suptitle()


def test_legend_swatches_have_the_colour_of_the_lines_they_label(demo_figure):
    fig, results = demo_figure
    legend = fig.legends[0] if fig.legends else fig.axes[0].get_legend()
    entries = dict(zip([t.get_text() for t in legend.get_texts()], legend.get_lines()))
    fds = next(r for r in results if r.name == "fds")
    # every method has an entry, FDSSGD one per episode, and no two entries look the same
    expected = [LABELS[m] for m in METHODS if m != "fds"]
    expected += [f"{LABELS['fds']} episode {k}" for k in range(len(fds.schedules))]
    assert sorted(entries) == sorted(expected)
    looks = [(_rgba(h), h.get_linestyle()) for h in entries.values()]
    assert len(set(looks)) == len(looks)
    for ax in fig.axes:
        for line in ax.get_lines():
            label = line.get_label()
            assert label in entries, f"unlabelled line {label!r} in {ax.get_title()!r}"
            swatch = entries[label]
            # the faint reference lines may be lighter; the hue and the style must match
            assert _rgba(swatch)[:3] == _rgba(line)[:3], label
            assert swatch.get_linestyle() == line.get_linestyle(), label
            if line.get_alpha() is None:
                assert _rgba(swatch) == _rgba(line), label


def test_a_line_on_top_of_another_leaves_it_visible(demo_figure):
    """FDSSGD's episode 0 runs the poor start: its line coincides with the poor baseline's and
    must not hide under it (the line drawn above must be the narrower one)."""
    import numpy as np

    fig, _ = demo_figure
    coincident = 0
    for ax in fig.axes:
        lines = ax.get_lines()
        for i, a in enumerate(lines):
            for b in lines[i + 1:]:
                xa, ya = np.asarray(a.get_xdata(), float), np.asarray(a.get_ydata(), float)
                xb, yb = np.asarray(b.get_xdata(), float), np.asarray(b.get_ydata(), float)
                if xa.shape != xb.shape or not (np.allclose(xa, xb) and np.allclose(ya, yb)):
                    continue
                coincident += 1
                # matplotlib draws by zorder, then in insertion order
                below, above = (a, b) if a.get_zorder() <= b.get_zorder() else (b, a)
                assert above.get_linewidth() < below.get_linewidth(), (
                    f"{above.get_label()!r} hides {below.get_label()!r}")
    assert coincident >= 1  # episode 0 and the poor baseline in the learning-rate panel


def test_the_time_axis_shows_every_method(demo_figure):
    """Each method's validation curve lies inside the time axis and spans a fair share of its
    width (a symlog axis crushed the fast methods into its left sixth)."""
    import numpy as np

    fig, results = demo_figure
    ax = next(a for a in fig.axes if "wall time" in a.get_xlabel())
    lo, hi = ax.get_xlim()
    to_axes = ax.transData + ax.transAxes.inverted()
    for r in results:
        names = {LABELS[r.name]} | {f"{LABELS[r.name]} episode {k}" for k in range(len(r.schedules))}
        xs = np.concatenate([np.asarray(line.get_xdata(), float) for line in ax.get_lines()
                             if line.get_label() in names])
        inside = xs[(xs >= lo) & (xs <= hi)]
        assert inside.size >= 0.9 * xs.size and inside.size > 0, r.name
        fractions = to_axes.transform(np.column_stack([inside, np.ones_like(inside)]))[:, 0]
        assert fractions.max() - fractions.min() >= 0.15, (r.name, fractions.min(), fractions.max())


# --------------------------------------------------------------------------- at the defaults
class _Built(Exception):
    """Raised by a recording constructor once the demo has called it."""


def _recorder(calls):
    def build(params, **kwargs):
        calls.append(kwargs)
        raise _Built

    return build


@pytest.mark.parametrize("name", ["hd", "marthe", "ift", "fds", "hd-adam", "marthe-adam",
                                  "ift-adam"])
def test_demo_runs_every_hyperoptim_class_at_its_defaults(name, monkeypatch):
    """The demo shows what a user gets without choosing anything: each class is given only the
    poor start and the validation closure (FDSSGD also its episode's length, which it requires,
    and the learning-rate windows the figure draws)."""
    import hyperoptim._demo as demo

    classes = {"hd": "HypergradSGD", "marthe": "MartheSGD", "ift": "IFTOptimizer",
               "fds": "FDSSGD", "hd-adam": "HypergradAdam", "marthe-adam": "MartheAdam",
               "ift-adam": "IFTAdam"}
    calls: list[dict] = []
    monkeypatch.setattr(demo, classes[name], _recorder(calls))
    model = demo.make_model(0)
    with pytest.raises(_Built):
        if name == "fds":
            demo._fds(demo.load_digits(0), 4, 8, 0, 2, bar=None)
        else:
            demo._optimizer(name, model, lambda: model(torch.zeros(1, 64)).sum())
    start = demo.POOR_ADAM if "adam" in name else demo.POOR
    allowed = {*start, "val_closure", *(("horizon", "lr_windows") if name == "fds" else ())}
    (kwargs,) = calls
    assert set(kwargs) <= allowed, sorted(set(kwargs) - allowed)
    assert {k: kwargs[k] for k in start} == start
