"""``benchmarks/fsdp_cost.py --quick`` on two HD rows at 2 gloo ranks: it runs, prints its four
tables, counts what the README says the optimizer sends, and its lockstep check passes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed.fsdp")

ROOT = Path(__file__).resolve().parents[1]


def _section(out: str, title: str) -> list[str]:
    """The table lines (header first, no separator) under the heading that starts with ``title``."""
    text = out.split(title, 1)[1].split("####", 1)[0]
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_quick_run_prints_the_tables_and_passes_lockstep():
    row, val = "HypergradSGD (training loss)", "HypergradAdamW"  # the latter: a val_closure
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fsdp_cost.py"), "--quick", "--worlds", "2",
         "--only", f"{row},{val}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    fsdp = {line.split(" | ")[0][2:]: line.split(" | ") for line in
            _section(out, "#### FSDP2, 2 ranks")[1:]}
    assert set(fsdp) == {"torch.optim.SGD", "torch.optim.AdamW", row, val}, fsdp
    # FSDP2's own traffic is the floor's (twice it with the validation call's forward and
    # backward); the optimizer adds one scalar all-reduce per step, with or without a
    # validation closure (three with one before the verdicts rode in it).
    assert fsdp[row][1:4] == fsdp["torch.optim.AdamW"][1:4], fsdp
    assert fsdp["torch.optim.AdamW"][4] == "0", fsdp
    for name in (row, val):
        assert fsdp[name][4] == "1" and float(fsdp[name][5]) < 1024, fsdp  # bytes: scalars
    ddp = {line.split(" | ")[0][2:]: line.split(" | ") for line in
           _section(out, "#### DDP, 2 ranks")[1:]}
    # After declare_ddp: one scalar all-reduce per step (the verdicts and the losses' means;
    # two before, with the scale-free policy's training loss). As a drop-in it also
    # re-averages the gradients DDP averaged (training, validation), and the training
    # closure's verdict travels alone.
    assert ddp[row][5] == "1" and ddp[row][3] == "3", ddp[row]
    assert ddp[val][5] == "1" and ddp[val][3] == "4", ddp[val]
    lockstep = _section(out, "#### Lockstep, 2 ranks")[1:]
    assert len(lockstep) == 4 and all(line.count(" ok") == 3 for line in lockstep), lockstep
    assert "#### Memory per rank, 2 ranks" in out and "FAIL" not in out
