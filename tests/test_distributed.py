"""Distributed lockstep with real gloo process groups on 127.0.0.1 (docs/design.md §8).

N ranks that each hold 1/N of every batch must follow the trajectory of one process that holds
the whole batch: for every optimizer, plain and ``DistributedDataParallel`` models, closures that
return the loss (exact HVPs) and closures that call ``backward()`` (finite-difference HVPs). The
ranks must also stay bit-identical to each other. Every collective has a timeout and every loop a
fixed length. ``HYPEROPTIM_DIST_WORLDS=1,2,3`` runs more world sizes (CI runs 2).
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import hyperoptim

STEPS = 12
BATCH = 12  # divisible by 1, 2, 3 and 4 ranks: every rank's mean has the same weight
WORLDS = [int(w) for w in os.environ.get("HYPEROPTIM_DIST_WORLDS", "2").split(",")]


def _builders() -> dict[str, Callable[..., Any]]:
    """name -> (params, val_closure) -> optimizer; one entry per optimizer and mode."""
    out: dict[str, Callable[..., Any]] = {
        "hd_train": lambda p, v: hyperoptim.HypergradSGD(p, lr=0.05, momentum=0.5,
                                                         hyper_lr=0.02),
        "hd_val": lambda p, v: hyperoptim.HypergradSGD(p, lr=0.05, momentum=0.5,
                                                       hyper_lr=0.02, val_closure=v),
        "marthe": lambda p, v: hyperoptim.MartheSGD(p, lr=0.05, momentum=0.5, weight_decay=1e-3,
                                                    hyper_lr=1e-4, val_closure=v),
        # The policies of hyperoptim.hyperstep: their state (the loss-reading ScaleFree's too)
        # must be identical across ranks.
        "hd_scale_free": lambda p, v: hyperoptim.HypergradSGD(p, lr=0.05, momentum=0.5,
                                                              hyper_step="scale_free"),
        "hd_growth_val": lambda p, v: hyperoptim.HypergradSGD(p, lr=0.05, momentum=0.5,
                                                              hyper_step="growth", val_closure=v),
        # A learned momentum (its tangent, hypergradient and policy state) in lockstep too.
        "hd_momentum_growth_val": lambda p, v: hyperoptim.HypergradSGD(
            p, lr=0.05, momentum=0.5, tune=("lr", "momentum"), hyper_step="growth",
            val_closure=v),
        "hd_adam_beta1": lambda p, v: hyperoptim.HypergradAdam(
            p, lr=0.01, tune=("lr", "momentum"), hyper_lr=1e-4, val_closure=v),
        "marthe_scale_free": lambda p, v: hyperoptim.MartheSGD(p, lr=0.05, momentum=0.5,
                                                               hyper_step="scale_free",
                                                               val_closure=v),
        "marthe_momentum_growth": lambda p, v: hyperoptim.MartheSGD(
            p, lr=0.05, momentum=0.5, tune=("lr", "momentum"), hyper_step="growth",
            val_closure=v),
        "marthe_adam_beta1": lambda p, v: hyperoptim.MartheAdam(
            p, lr=0.01, tune=("lr", "momentum"), adapt_hyper_lr=False, hyper_lr=1e-4,
            val_closure=v),
        # The defaults (issue 16: ScaleFree, no hyper-step size given) in lockstep, as
        # benchmarks/versus.py runs them; the Adam family below is built at its defaults too.
        "hd_default_val": lambda p, v: hyperoptim.HypergradSGD(p, lr=0.05, momentum=0.5,
                                                               val_closure=v),
        "marthe_default": lambda p, v: hyperoptim.MartheSGD(p, lr=0.05, momentum=0.5,
                                                            val_closure=v),
        "ift": lambda p, v: hyperoptim.IFTOptimizer(p, lr=0.05, momentum=0.5, weight_decay=1e-3,
                                                    update_interval=3, lookback=3, val_closure=v),
        # IFT's reactive decrease from lr 0.9 (it acts twice within STEPS): every rank reads
        # the loss's mean over the ranks, so every rank divides at the same step. The stability
        # guard, which would act first, is off here (ift_edge has it).
        "ift_runaway": lambda p, v: hyperoptim.IFTOptimizer(p, lr=0.9, momentum=0.9,
                                                            update_interval=3, lookback=3,
                                                            stability_guard=False,
                                                            val_closure=v),
        # IFT's stability guard from lr 0.9 at its defaults: H g averaged over the ranks, its
        # Rayleigh quotient read in the step's one sync, the same cut at the same step everywhere.
        "ift_edge": lambda p, v: hyperoptim.IFTOptimizer(p, lr=0.9, momentum=0.9,
                                                         update_interval=3, lookback=3,
                                                         val_closure=v),
        # MARTHE's ScaleFree reads the loss of the step it sets, its mean over the ranks: from
        # lr 0.9 it divides twice within STEPS, at the same step on every rank.
        "marthe_runaway": lambda p, v: hyperoptim.MartheSGD(p, lr=0.9, momentum=0.9,
                                                            val_closure=v),
        "fds": lambda p, v: hyperoptim.FDSSGD(p, horizon=4, lr=0.05, momentum=0.5,
                                              weight_decay=1e-3, lr_windows=2, val_closure=v),
        # hvp_columns="auto" times the batched and the looped H Z on each rank: the ranks
        # must still take one route (the times are averaged), or they would part at rounding.
        # From lr 1 the first episode's validation loss ends above where it started: lost, the
        # learning rates divided by 100, on every rank at once (the losses are the ranks' mean).
        "fds_runaway": lambda p, v: hyperoptim.FDSSGD(p, horizon=4, lr=1.0, momentum=0.9,
                                                      lr_windows=2, val_closure=v),
        "fds_auto_columns": lambda p, v: hyperoptim.FDSSGD(
            p, horizon=4, lr=0.05, momentum=0.5, weight_decay=1e-3, lr_windows=2,
            hvp_columns="auto", val_closure=v),
        "fds_adam": lambda p, v: hyperoptim.FDSAdam(p, horizon=4, lr=0.01, weight_decay=1e-3,
                                                    lr_windows=2, hyper_lr={"lr": 0.005},
                                                    val_closure=v),
        "fds_adamw": lambda p, v: hyperoptim.FDSAdamW(p, horizon=4, lr=0.01, lr_windows=2,
                                                      tune=("lr", "beta1", "weight_decay"),
                                                      hyper_lr={"lr": 0.005}, val_closure=v),
    }
    # The Adam family, where it exists.
    ift = dict(update_interval=3, lookback=3)  # hyper-updates within STEPS
    for name in ("HypergradAdam", "MartheAdam", "HypergradAdamW", "MartheAdamW", "IFTAdam",
                 "IFTAdamW"):
        cls = getattr(hyperoptim, name, None)
        if cls is not None:
            kwargs = ift if name.startswith("IFT") else {}
            out[name] = lambda p, v, cls=cls, kw=kwargs: cls(p, lr=0.01, val_closure=v, **kw)
    return out


def _data() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, BATCH, 3, generator=gen, dtype=torch.float64)
    y = torch.tanh(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(STEPS, BATCH, 1, generator=gen,
                                                                 dtype=torch.float64)
    xv = torch.randn(BATCH, 3, generator=gen, dtype=torch.float64)
    yv = torch.tanh(xv.sum(-1, keepdim=True))
    return x, y, xv, yv


def run_case(name: str, wrapper: str, backward: bool, rank: int, world: int) -> dict[str, Any]:
    """One optimizer's 12 steps on this rank's share of every batch; the final state."""
    x, y, xv, yv = _data()
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    model: nn.Module = module
    if wrapper == "ddp":
        model = nn.parallel.DistributedDataParallel(module)
    opt = _builders()[name](list(model.parameters()), lambda: F.mse_loss(model(xv[part]),
                                                                         yv[part]))
    if wrapper == "ddp":
        opt.declare_ddp(model)  # DDP averages what backward() writes: not sent twice
    for t in range(STEPS):
        def closure(t: int = t) -> torch.Tensor:
            loss = F.mse_loss(model(x[t, part]), y[t, part])
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss

        opt.step(closure)
        if name.startswith("fds") and opt.episode_step == opt.horizon:
            opt.hyperstep()
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {"params": [p.detach().clone() for p in module.parameters()], "groups": hyper,
            "history": opt.history, "hyper_state": opt.state_dict()["hyper_state"]}


CASES = [(name, wrapper, backward) for name in _builders() for wrapper in ("plain", "ddp")
         for backward in (False, True)]


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        results = {case: run_case(*case, rank=rank, world=world) for case in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown (the results are written, the group destroyed):
    # in a full run gloo's or the profiler's threads sometimes abort it ("terminate called
    # without an active exception"), which spawn reports as a failed rank.
    os._exit(0)


def _flatten(obj: Any) -> list[float]:
    if isinstance(obj, torch.Tensor):
        return obj.double().reshape(-1).tolist()
    if isinstance(obj, dict):
        return [v for k in sorted(obj, key=str) for v in _flatten(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [v for item in obj for v in _flatten(item)]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return []
    return [float(obj)]


@pytest.fixture(scope="module")
def single_process() -> dict[tuple[str, str, bool], dict[str, Any]]:
    torch.set_num_threads(1)
    return {case: run_case(case[0], "plain", case[2], rank=0, world=1) for case in CASES}


# ift_runaway's loss runs away on purpose, and ift_edge's learning rate starts past the edge of
# stability: their warnings (the fixture's, in this process) are expected.
@pytest.mark.filterwarnings("ignore:.*the training loss ran away:hyperoptim.HyperoptimWarning")
@pytest.mark.filterwarnings("ignore:.*past the edge of stability:hyperoptim.HyperoptimWarning")
@pytest.mark.parametrize("world", WORLDS)
def test_ranks_follow_the_single_process_run(world, single_process):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), tmp), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(world)]
    for case in CASES:
        ref, first = single_process[case], ranks[0][case]
        for other in ranks[1:]:  # bit-identical across ranks
            for a, b in zip(first["params"], other[case]["params"], strict=True):
                assert torch.equal(a, b), case
            assert _flatten(first) == _flatten(other[case]), case
        for a, b in zip(ref["params"], first["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, c=case: f"{c}: {m}")
        learned_ref = _flatten([ref["groups"], ref["hyper_state"], ref["history"]])
        learned = _flatten([first["groups"], first["hyper_state"], first["history"]])
        assert len(learned) == len(learned_ref), case
        torch.testing.assert_close(torch.tensor(learned), torch.tensor(learned_ref), rtol=1e-6,
                                   atol=1e-6, equal_nan=True, msg=lambda m, c=case: f"{c}: {m}")
    # The hyperparameters did learn: a lockstep of frozen values would prove nothing.
    for case in CASES:
        if case[0] in ("ift_runaway", "marthe_runaway"):  # the watch did act (two divisions)
            assert min(single_process[case]["history"][0]["lr"]) < 0.01, case
        if case[0] == "ift_edge":  # the guard did act: Adam's first hyper-step (0.05 in log10)
            # alone leaves 0.80 from 0.9, and a runaway's division would leave below 0.09
            assert 0.1 < single_process[case]["history"][0]["lr"][0] < 0.6, case
        if case[0] == "fds_runaway":  # the first episode was lost
            hist = single_process[case]["history"][0]
            assert hist["lost"][0] == 1.0 and hist["lr"][0] == [0.01, 0.01], case
        lrs = single_process[case]["history"][0].get("lr", [])
        assert any(lr != lrs[0] for lr in lrs) or case[0] == "fds", case


def _fsdp_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
        fully_shard(model)
        messages = []
        for cls, kwargs in ((hyperoptim.HypergradSGD, {}), (hyperoptim.MartheSGD, {}),
                            (hyperoptim.IFTOptimizer, {}), (hyperoptim.FDSSGD, {"horizon": 4}),
                            (hyperoptim.IFTOptimizer, {"hvp": "exact"})):
            try:
                cls(model.parameters(), lr=0.1, val_closure=lambda: torch.zeros(()), **kwargs)
                messages.append("constructed")
            except ValueError as err:
                messages.append(str(err))
        with open(os.path.join(out_dir, f"fsdp{rank}.txt"), "w") as f:
            f.write("\n".join(messages))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown (the results are written, the group destroyed):
    # in a full run gloo's or the profiler's threads sometimes abort it ("terminate called
    # without an active exception"), which spawn reports as a failed rank.
    os._exit(0)


def test_fsdp_is_refused_with_a_clear_error():
    pytest.importorskip("torch.distributed.fsdp")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_fsdp_worker, args=(2, os.path.join(tmp, "store"), tmp), nprocs=2, join=True)
        for r in range(2):
            with open(os.path.join(tmp, f"fsdp{r}.txt")) as f:
                lines = f.read().splitlines()
            assert len(lines) == 5
            # Every family supports FSDP2 (tests/test_fsdp.py); the exact HVP route is refused,
            # naming the finite-difference route.
            assert lines[:4] == ["constructed"] * 4, lines
            assert "IFTOptimizer(hvp='exact') does not support FSDP2" in lines[4], lines
            assert "hvp='finite_difference'" in lines[4], lines


def _mismatch_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        x, y, xv, yv = _data()
        messages = []
        for what in ("weights", "lr"):
            for name, build in _builders().items():
                torch.manual_seed(rank if what == "weights" else 0)  # plain model, no broadcast
                model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
                before = [p.detach().clone() for p in model.parameters()]
                opt = build(list(model.parameters()), lambda m=model: F.mse_loss(m(xv), yv))
                if what == "lr":
                    opt.param_groups[0]["lr"] *= 1.0 + rank
                try:
                    opt.step(lambda m=model: F.mse_loss(m(x[0]), y[0]))
                    messages.append(f"{what} {name}: stepped")
                except ValueError as err:
                    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
                    messages.append(f"{what} {name}: unchanged={unchanged}: {err}")
        with open(os.path.join(out_dir, f"mismatch{rank}.txt"), "w") as f:
            f.write("\n".join(messages))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown (the results are written, the group destroyed):
    # in a full run gloo's or the profiler's threads sometimes abort it ("terminate called
    # without an active exception"), which spawn reports as a failed rank.
    os._exit(0)


def test_ranks_with_different_weights_or_hyperparameters_are_refused_at_the_first_step():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_mismatch_worker, args=(2, os.path.join(tmp, "store"), tmp), nprocs=2, join=True)
        for r in range(2):
            with open(os.path.join(tmp, f"mismatch{r}.txt")) as f:
                lines = f.read().splitlines()
            assert len(lines) == 2 * len(_builders())
            for line in lines:
                assert "unchanged=True" in line and "ranks disagree at the first step" in line, line
                what = line.split()[0]
                expected = "['params'][0]" if what == "weights" else "param_groups[0]['lr']"
                assert expected in line, line
