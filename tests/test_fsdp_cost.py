"""``benchmarks/fsdp_cost.py --quick`` on one HD row at 2 gloo ranks: it runs, prints its four
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
    row = "HypergradSGD (training loss)"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fsdp_cost.py"), "--quick", "--worlds", "2",
         "--only", row], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    fsdp = {line.split(" | ")[0][2:]: line.split(" | ") for line in
            _section(out, "#### FSDP2, 2 ranks")[1:]}
    assert set(fsdp) == {"torch.optim.SGD", "torch.optim.AdamW", row}, fsdp
    # FSDP2's own traffic is the floor's; the optimizer adds scalar all-reduces only.
    assert fsdp[row][1:4] == fsdp["torch.optim.AdamW"][1:4], fsdp
    assert fsdp["torch.optim.AdamW"][4] == "0" and float(fsdp[row][4]) >= 1, fsdp
    assert float(fsdp[row][5]) < 1024, fsdp  # bytes: a few scalars
    ddp = {line.split(" | ")[0][2:]: line.split(" | ") for line in
           _section(out, "#### DDP, 2 ranks")[1:]}
    # declare_ddp drops the second all-reduce of the gradients.
    assert float(ddp[row][3]) == float(ddp[row][5]) + 1, ddp[row]
    lockstep = _section(out, "#### Lockstep, 2 ranks")[1:]
    assert len(lockstep) == 3 and all(line.count(" ok") == 3 for line in lockstep), lockstep
    assert "#### Memory per rank, 2 ranks" in out and "FAIL" not in out
