"""plot_history: draws what history recorded, writes a valid PNG, and names the extra when
matplotlib is missing."""

from __future__ import annotations

import sys

import pytest
import torch

import hyperoptim
from hyperoptim import HypergradSGD, plot_history

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def _trained():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = HypergradSGD([w], lr=0.1, hyper_lr=0.01)
    for _ in range(5):
        opt.step(lambda: (w**2).sum())
    return opt


def test_writes_a_png_of_the_recorded_learning_rate(tmp_path):
    opt = _trained()
    fig = plot_history(opt, keys=("lr", "hypergrad/lr"))
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["lr", "hypergrad/lr"]
    assert lines[0].get_ydata().tolist() == opt.history[0]["lr"]
    out = tmp_path / "lr.png"
    fig.savefig(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_list_valued_records_become_one_line_per_window():
    fig = plot_history([{"lr": [[0.1, 0.2], [0.15, 0.1]]}, {"lr": [[0.0, 0.0], [0.1, 0.1]]}])
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert labels == ["lr[0] (group 0)", "lr[1] (group 0)", "lr[0] (group 1)", "lr[1] (group 1)"]


def test_unknown_key_is_a_clear_error():
    with pytest.raises(KeyError, match="recorded"):
        plot_history(_trained(), keys=("momentum",))


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"torch-hyperoptim\[demo\]"):
        hyperoptim.plot_history([{"lr": [0.1]}])
