"""FSDP2 (``fully_shard``) lockstep with real gloo process groups on 127.0.0.1.

Two ranks, each holding half of every batch and a dim-0 shard of every parameter (DTensors), must
follow one unsharded process that holds the whole batch: final weights and every learned value
within 1e-6 in float64, ranks consistent. The hypergradient-descent family supports FSDP2 (its
inner products are per-shard partial sums completed by one all-reduce of scalars); the other
classes, and FSDP1, are refused with errors that say what works. Every collective has a timeout
and every loop a fixed length. ``HYPEROPTIM_DIST_WORLDS=2,3`` runs more world sizes (CI runs 2;
3 ranks shard the 8-row layer unevenly).
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections import Counter
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import _data
from torch import nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

import hyperoptim

pytest.importorskip("torch.distributed.fsdp")

STEPS = 8
WORLDS = [w for w in (int(w) for w in os.environ.get("HYPEROPTIM_DIST_WORLDS", "2").split(",")) if w > 1]
BUILDERS = {
    "sgd_train": lambda p, v: hyperoptim.HypergradSGD(p, lr=0.05, momentum=0.5, weight_decay=1e-3,
                                                      hyper_lr=0.02),
    "sgd_val": lambda p, v: hyperoptim.HypergradSGD(p, lr=0.05, momentum=0.5, nesterov=True,
                                                    hyper_lr=0.02, val_closure=v),
    "adam_val": lambda p, v: hyperoptim.HypergradAdam(p, lr=0.01, weight_decay=1e-3,
                                                      hyper_lr=1e-3, val_closure=v),
    "adamw_train": lambda p, v: hyperoptim.HypergradAdamW(p, lr=0.01, hyper_lr=1e-3),
    "adamw_val": lambda p, v: hyperoptim.HypergradAdamW(p, lr=0.01, hyper_lr=1e-3,
                                                        val_closure=v),
}
REFUSED = ("MartheSGD", "IFTOptimizer", "FDSSGD", "MartheAdam", "MartheAdamW", "IFTAdam", "IFTAdamW")


def _model() -> nn.Module:
    torch.manual_seed(0)
    # The last layer's weight has one row: rank 1's shard of it is empty.
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def run_case(name: str, rank: int, world: int, sharded: bool) -> dict[str, Any]:
    """8 steps on this rank's share of every batch; both closures call backward()."""
    x, y, xv, yv = _data()
    part = slice(rank * x.shape[1] // world, (rank + 1) * x.shape[1] // world)
    model = _model()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)

    def val_closure() -> torch.Tensor:
        loss = F.mse_loss(model(xv[part]), yv[part])
        loss.backward()
        return loss

    opt = BUILDERS[name](model.parameters(), val_closure)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for t in range(STEPS):
            def closure(t: int = t) -> torch.Tensor:
                opt.zero_grad()
                loss = F.mse_loss(model(x[t, part]), y[t, part])
                loss.backward()
                return loss

            opt.step(closure)
    comm = Counter(e.name for e in prof.events() if e.name.startswith("gloo:"))
    full = [p.full_tensor() if sharded else p for p in model.parameters()]
    state = next(iter(opt.state.values()))
    return {"params": [p.detach().clone() for p in full],
            "lr": [g["lr"] for g in opt.param_groups], "history": opt.history,
            "state_types": sorted({type(v).__name__ for k, v in state.items() if k != "step"}),
            "comm": comm}


def _refusals() -> list[str]:
    """Construction errors under FSDP2 for the classes that do not support it, and for a closure
    that returns the loss without backward()."""
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model)
    out = []
    for name in REFUSED:
        kwargs = {"horizon": 4} if name == "FDSSGD" else {}
        try:
            getattr(hyperoptim, name)(model.parameters(), lr=0.1, val_closure=lambda: None, **kwargs)
            out.append(f"{name}: constructed")
        except ValueError as err:
            out.append(f"{name}: {err}")
    try:
        hyperoptim.HypergradAdamW(model.parameters(), lr=0.1, per_parameter=True)
        out.append("per_parameter: constructed")
    except ValueError as err:
        out.append(f"per_parameter: {err}")
    opt = hyperoptim.HypergradSGD(model.parameters(), lr=0.1)
    try:
        opt.step(lambda: model(torch.ones(2, 3, dtype=torch.float64)).sum())
        out.append("loss-only closure: stepped")
    except ValueError as err:
        out.append(f"loss-only closure: {err}")
    return out


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        results: dict[str, Any] = {name: run_case(name, rank, world, True) for name in BUILDERS}
        results["refusals"] = _refusals()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown (the results are written, the group destroyed):
    # in a full run gloo's or the profiler's threads sometimes abort it ("terminate called
    # without an active exception"), which spawn reports as a failed rank.
    os._exit(0)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def ranks(request) -> list[dict[str, Any]]:
    world = request.param
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), tmp), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_fsdp2_ranks_follow_the_single_process_run(ranks, name):
    torch.set_num_threads(1)
    ref = run_case(name, rank=0, world=1, sharded=False)
    first = ranks[0][name]
    for other in ranks[1:]:
        assert first["lr"] == other[name]["lr"] and first["history"] == other[name]["history"]
        for a, b in zip(first["params"], other[name]["params"], strict=True):
            assert torch.equal(a, b)
    for a, b in zip(ref["params"], first["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    lrs, ref_lrs = first["history"][0]["lr"], ref["history"][0]["lr"]
    assert len(lrs) == STEPS and lrs[-1] != lrs[0]  # the learning rate did learn
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor(ref_lrs), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.tensor(first["lr"]), torch.tensor(ref["lr"]), rtol=1e-6,
                               atol=1e-6)
    # State lives sharded beside the parameter, as torch.optim's does under FSDP2.
    assert first["state_types"] == ["DTensor"], first["state_types"]


def test_fsdp2_never_gathers_for_the_optimizer(ranks):
    # FSDP2 all-gathers parameters for every forward (training, validation); the optimizer
    # itself only all-reduces scalars, so the all-gathers are FSDP2's alone: 1 per forward.
    for name in BUILDERS:
        forwards = STEPS * (2 if name.endswith("val") else 1)
        assert ranks[0][name]["comm"]["gloo:all_gather"] == forwards, (name, ranks[0][name]["comm"])


def test_fsdp2_step_sends_one_scalar_all_reduce_of_its_own(ranks):
    # FSDP2 reduces each backward()'s gradients once (with gloo: an all-reduce); the optimizer
    # adds one all-reduce per step (hypergradient partial sums, the guard's norms and the
    # validation loss together), plus, once, the check that the validation gradient is not 0
    # everywhere, and, once at the first step, the two all-reduces of the replica check (the
    # ranks' hyperparameters agree; shards are not compared). And after each closure the ranks'
    # verdict on the step, a scalar all-reduce of its own: the reduce-scatter inside backward()
    # is FSDP2's and carries nothing of the optimizer's (docs/design.md §8).
    for name in BUILDERS:
        comm = ranks[0][name]["comm"]
        val = name.endswith("val")
        backwards = STEPS * (2 if val else 1)
        own = STEPS + (1 if val else 0) + 2 + backwards
        assert comm["gloo:reduce_scatter"] + comm["gloo:all_reduce"] - own == backwards, (name, comm)


def test_fsdp2_refuses_what_it_cannot_do_by_name(ranks):
    for rank in ranks:
        lines = rank["refusals"]
        assert len(lines) == len(REFUSED) + 2
        for name, line in zip(REFUSED, lines):
            assert line.startswith(f"{name}: {name} does not support FSDP2"), line
            assert "HypergradAdamW support FSDP2" in line and "DistributedDataParallel" in line
        assert "HypergradAdamW(per_parameter=True) does not support FSDP2" in lines[-2], lines[-2]
        assert "must call zero_grad() and backward() itself" in lines[-1], lines[-1]


def test_fsdp1_flat_parameters_are_refused_naming_fully_shard():
    # FSDP1 itself needs an accelerator in torch 2.13 ("FSDP needs a non-CPU accelerator
    # device"), so no gloo rank can build one; its FlatParameter is what the optimizers see.
    flat_param = pytest.importorskip("torch.distributed.fsdp._flat_param")
    flat = flat_param.FlatParameter(torch.zeros(4), requires_grad=True)
    for cls in (hyperoptim.HypergradSGD, hyperoptim.HypergradAdamW, hyperoptim.MartheSGD):
        with pytest.raises(ValueError, match=r"does not support FSDP1 .*fully_shard"):
            cls([flat], lr=0.1)
