"""Every example runs end to end with a tiny step budget, so the examples cannot rot."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import pytest
import torch

pytest.importorskip("sklearn")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
BUDGET = {"fds_schedule.py": ["--steps", "4", "--outer", "2"],
          "ift_adaptive_thesis.py": ["--steps", "6", "--interval", "3", "--plot", ""]}


def test_every_example_is_listed():
    assert len(SCRIPTS) >= 7, [p.name for p in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_runs(script, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()  # examples pin one thread for their tiny models
    try:
        module.main(BUDGET.get(script.name, ["--steps", "6"]))
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.strip()


def _torchrun(script: str, *args: str) -> str:
    """``torchrun --nproc_per_node 2 examples/<script> <args>`` as a user runs it: two gloo ranks
    on 127.0.0.1, bounded in time; its stdout."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(EXAMPLES / script), *args]
    # This checkout's package, not whichever one is installed (an editable install of another).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLES.parent),
                                                                    os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=EXAMPLES, env=env)
    # The whole stderr's tail: a rank's own error (a C++ abort's message) comes before the
    # launcher's report of it, which alone fills 2,000 characters.
    assert out.returncode == 0, out.stderr[-12000:]
    return out.stdout


def test_ddp_example_under_torchrun_with_two_ranks():
    """The README's command, as a user runs it."""
    assert "ranks 2, HVP route finite_difference" in _torchrun("ddp_torchrun.py", "--steps", "6")


def test_fsdp2_example_under_torchrun_with_two_ranks():
    """Two FSDP2 ranks train with HypergradAdamW and with MartheAdamW, save each with
    torch.distributed.checkpoint and resume exactly."""
    import re

    out = _torchrun("fsdp2_finetune.py", "--steps", "8")
    for name in ("HypergradAdamW", "MartheAdamW"):
        assert re.search(rf"ranks 2, fully_shard on \w+: {name} lr 0.001 -> ", out), out
    resumed = re.findall(r"resumed from the DCP checkpoint at step 4: largest weight difference "
                         r"from the uninterrupted run (\S+), history entries 8 of 8", out)
    assert len(resumed) == 2 and all(float(gap) <= 1e-6 for gap in resumed), out
