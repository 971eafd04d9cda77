"""``benchmarks/overhead.py``'s peer rows: loaded, built, stepped and tabulated, never timed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import hyperoptim

ROOT = Path(__file__).resolve().parents[1]
GDTUO = "gradient_descent_the_ultimate_optimizer"
BAYDIN_ROWS = ("peer: Baydin SGDHD (training loss)", "peer: Baydin AdamHD (training loss)")
GDTUO_ROWS = ("peer: gdtuo SGD (training loss)", "peer: gdtuo AdamBaydin (training loss)")

# A stand-in for Baydin et al.'s files: torch's optimizers under their names and signatures. The
# package's __init__ fails, so the rows load only if the script imports the files by path.
FAKE_FILES = {
    "__init__.py": "raise ImportError('the script must import the files, not the package')\n",
    "sgd_hd.py": ("import torch\n\n\nclass SGDHD(torch.optim.SGD):\n"
                  "    def __init__(self, params, lr, momentum=0, hypergrad_lr=1e-6):\n"
                  "        super().__init__(params, lr=lr, momentum=momentum)\n"
                  "        self.hypergrad_lr = hypergrad_lr\n"),
    "adam_hd.py": ("import torch\n\n\nclass AdamHD(torch.optim.Adam):\n"
                   "    def __init__(self, params, lr=1e-3, hypergrad_lr=1e-8):\n"
                   "        super().__init__(params, lr=lr)\n"
                   "        self.hypergrad_lr = hypergrad_lr\n"),
}


def _load_overhead():
    spec = importlib.util.spec_from_file_location("_overhead_benchmark",
                                                  ROOT / "benchmarks" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


overhead = _load_overhead()


@pytest.fixture
def tables(monkeypatch):
    """The script's case tables, restored after the test (add_peers registers into them)."""
    for name in ("CASES", "ADAM_BASELINE", "PEERS"):
        monkeypatch.setattr(overhead, name, type(getattr(overhead, name))(getattr(overhead, name)))
    return overhead


@pytest.fixture
def checkout(tmp_path):
    (tmp_path / "hypergrad").mkdir()
    for name, text in FAKE_FILES.items():
        (tmp_path / "hypergrad" / name).write_text(text)
    return tmp_path


def test_missing_peers_are_skipped_with_one_line_each(tables, monkeypatch):
    monkeypatch.setitem(sys.modules, GDTUO, None)  # import fails as if not installed
    skipped = tables.add_peers(None)
    assert len(skipped) == 2
    assert "no --peers PATH" in skipped[0] and "not installed" in skipped[1]
    assert not any(name.startswith("peer: ") for name in tables.CASES)


def test_a_wrong_checkout_is_refused_before_anything_runs(tables, tmp_path):
    with pytest.raises(SystemExit):
        tables.main(["--peers", str(tmp_path)])


def test_baydin_rows_build_step_and_report_against_sgd_and_adam(tables, checkout, monkeypatch):
    monkeypatch.setitem(sys.modules, GDTUO, None)
    assert len(tables.add_peers(checkout)) == 1
    assert "hypergrad" not in sys.modules
    assert tables.ADAM_BASELINE[BAYDIN_ROWS[1]] == "torch.optim.Adam"
    packages = {"before": hyperoptim, "after": hyperoptim}
    steppers, failed = tables._steppers([4, 8, 3], 5, list(BAYDIN_ROWS), packages)
    # timed once, under this checkout's column; the before column says why it is empty
    assert set(steppers) == {("torch.optim.SGD", ""), ("torch.optim.Adam", ""),
                             (BAYDIN_ROWS[0], "after"), (BAYDIN_ROWS[1], "after")}
    assert set(failed) == {(name, "before") for name in BAYDIN_ROWS}
    for step in steppers.values():
        assert torch.isfinite(step(0))

    times = {key: tables.Clocks() for key in steppers}
    for key, seconds in zip(steppers, (1.0, 2.0, 3.0, 4.0)):
        times[key].cpu.append(seconds)
    rows = {line.split(" | ")[0][2:]: line for line in tables.table(times, list(packages), "cpu")}
    assert rows[BAYDIN_ROWS[0]].endswith("| n/a | 3.00x | n/a |  | n/a |  | n/a |")
    assert rows[BAYDIN_ROWS[1]].endswith("| n/a | 4.00x | n/a |  | n/a | 2.00x | n/a |")


# gdtuo's README expects this warning from its backward(create_graph=True) loop
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_gdtuo_rows_step_in_its_own_loop(tables):
    pytest.importorskip(f"{GDTUO}.gdtuo")
    assert len(tables.add_peers(None)) == 1  # Baydin's: no --peers
    steppers, _ = tables._steppers([4, 8, 3], 5, list(GDTUO_ROWS), {"after": hyperoptim})
    for row in GDTUO_ROWS:
        step = steppers[(row, "after")]
        assert all(torch.isfinite(step(t)) for t in range(3))
