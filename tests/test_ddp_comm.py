"""Collectives per step under DistributedDataParallel, counted with real gloo process groups.

DDP's hooks average the gradients that ``backward()`` writes; after ``declare_ddp(model)`` the
optimizer must not all-reduce those again, while still averaging what DDP never sees (validation
losses, gradients taken with ``autograd.grad``). Every collective is counted twice: all of them
with torch's profiler (``gloo:all_reduce`` events), DDP's own with a DDP communication hook; the
difference is what the optimizer sends. Every collective has a timeout, every loop a fixed length.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import _builders, _data
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

from hyperoptim.hyperstep import resolve

STEPS = 4
WORLD = 2
# (optimizer, closure calls backward(), validation closure calls backward())
CASES = [("hd_train", True, False), ("hd_train", False, False), ("hd_val", True, True),
         ("marthe", True, True), ("HypergradAdamW", True, False), ("hd_default_val", True, True)]


def _run(name: str, backward: bool, val_backward: bool, declare: bool, rank: int
         ) -> dict[str, Any]:
    x, y, xv, yv = _data()
    part = slice(rank * x.shape[1] // WORLD, (rank + 1) * x.shape[1] // WORLD)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    model = nn.parallel.DistributedDataParallel(module)
    ddp_calls, val_calls = [0], [0]

    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations
        ddp_calls[0] += 1
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_hook)

    def val_closure() -> torch.Tensor:
        val_calls[0] += 1
        loss = F.mse_loss(model(xv[part]), yv[part])
        if val_backward:
            loss.backward()
        return loss

    opt = (torch.optim.SGD(model.parameters(), lr=0.05) if name == "sgd"
           else _builders()[name](list(model.parameters()), val_closure))
    if declare:
        opt.declare_ddp(model)

    def closure(t: int) -> torch.Tensor:
        loss = F.mse_loss(model(x[t, part]), y[t, part])
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss

    # Two steps outside the count: the first step also checks, once, that the ranks hold the
    # same parameters and hyperparameters (one all-reduce of checksums), and the first
    # validation call under declared DDP (MARTHE's is at its second step) sends the ranks'
    # verdict alone, once (docs/design.md §8); the count is per step after.
    opt.step(lambda: closure(0))
    opt.step(lambda: closure(1))
    ddp_calls[0] = val_calls[0] = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for t in range(2, STEPS + 2):
            opt.step(lambda t=t: closure(t))
    total = sum(e.name == "gloo:all_reduce" for e in prof.events())
    return {"total": total, "ddp": ddp_calls[0], "own": total - ddp_calls[0], "val": val_calls[0],
            "params": [p.detach().clone() for p in module.parameters()],
            "reads_loss": any(getattr(resolve(g.get("hyper_step", "additive")), "uses_loss", False)
                              for g in getattr(opt, "param_groups", []) if "hyper_step" in g)}


def _declare_errors() -> list[str]:
    """declare_ddp's refusals: a model that is not DDP, a DDP model holding none of the params."""
    import hyperoptim

    net = nn.Linear(3, 1).double()
    other = nn.parallel.DistributedDataParallel(nn.Linear(3, 1).double())
    out = []
    for model in (net, other):
        try:
            hyperoptim.HypergradSGD(net.parameters(), lr=0.1).declare_ddp(model)
            out.append("declared")
        except ValueError as err:
            out.append(str(err))
    return out


def _worker(rank: int, store: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        results: dict[Any, Any] = {"floor": _run("sgd", True, False, False, rank),
                                   "errors": _declare_errors()}
        for case in CASES:
            for declare in (False, True):
                results[(*case, declare)] = _run(*case, declare, rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown (the results are written, the group destroyed):
    # in a full run gloo's or the profiler's threads sometimes abort it ("terminate called
    # without an active exception"), which spawn reports as a failed rank.
    os._exit(0)


@pytest.fixture(scope="module")
def counts() -> dict[Any, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), tmp), nprocs=WORLD, join=True)
        return torch.load(os.path.join(tmp, "rank0.pt"))


def test_counting_sees_ddp_and_nothing_else_under_torch_sgd(counts):
    floor = counts["floor"]
    assert floor["ddp"] == STEPS and floor["own"] == 0, floor  # one bucket per backward


def test_declare_ddp_refuses_what_it_cannot_trust(counts):
    not_ddp, foreign = counts["errors"]
    assert "expected the DistributedDataParallel model, got Linear" in not_ddp, not_ddp
    assert "none of the optimizer's parameters belong to the model" in foreign, foreign


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_declared_ddp_drops_the_second_all_reduce(counts, case):
    name, backward, val_backward = case
    before, after = counts[(*case, False)], counts[(*case, True)]
    # Same trajectory: DDP had already averaged what the optimizer no longer averages.
    for a, b in zip(before["params"], after["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert after["ddp"] == before["ddp"]
    if not backward:  # autograd.grad bypasses DDP's hooks: the optimizer must still average
        assert after["own"] == before["own"] >= STEPS, (before, after)
        return
    # Every gradient that went through backward() is sent once: by DDP.
    validations = after["val"]
    assert validations == before["val"] and (validations > 0) == (name != "hd_train")
    if name != "marthe":
        # The HD family: one scalar all-reduce of its own per step, whatever it carries (the
        # validation loss, the training loss a policy reads, the verdicts on both closures: they
        # ride together, docs/design.md §8), beside the average of validation gradients taken
        # with autograd.grad (DDP never saw them). It sent up to three scalar all-reduces
        # before: the training closure's verdict, the validation loss with its verdict, the
        # training loss's mean.
        assert after["own"] == STEPS + (0 if val_backward else validations), (before, after)
        # Undeclared, it re-averages the training and validation gradients (the latter carry
        # the validation call's verdict), the training closure's verdict travels alone (the
        # gradients' layout is unknown on a rank whose closure failed), and the losses in one
        # all-reduce where there are any.
        losses = STEPS if validations or after["reads_loss"] else 0
        assert before["own"] == STEPS + STEPS + validations + losses, (before, after)
        return
    # MARTHE keeps one all-reduce per validation loss (DDP never averages a loss), which also
    # carries the validation gradients when they were taken with autograd.grad, and a policy
    # that reads the training loss reads its mean over ranks in one scalar all-reduce per step
    # (hyperoptim.hyperstep.ScaleFree, the default).
    policy = STEPS if after["reads_loss"] else 0
    # The ranks' verdict on the step (docs/design.md §8, a step that fails on one rank): one
    # scalar all-reduce after each evaluation of the training closure whose gradients DDP
    # averaged, since no collective of the optimizer's follows it to carry the verdict (the
    # validation call's rides in its loss's all-reduce).
    evaluations = after["ddp"] - (validations if val_backward else 0)
    assert evaluations >= STEPS, (before, after)
    assert after["own"] == validations + policy + evaluations, (before, after)
    # Undeclared, it re-averaged the training gradients and every perturbed gradient of the
    # finite-difference route (one all-reduce for each backward() DDP ran outside validation,
    # which also carries the verdicts of the perturbed evaluations), and sent the training
    # closure's verdict as a scalar of its own, once per step.
    assert before["own"] == validations + policy + evaluations + STEPS, (before, after)
