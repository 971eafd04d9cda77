"""FSDP2 (``fully_shard``) lockstep with real gloo process groups on 127.0.0.1.

Two ranks, each holding half of every batch and a dim-0 shard of every parameter (DTensors), must
follow one unsharded process that holds the whole batch: final weights and every learned value
within 1e-6 in float64, ranks consistent. Every family supports FSDP2 (inner products are
per-shard partial sums completed by one all-reduce of scalars; MARTHE's and FDS's tangents and
IFT's Neumann-series vectors live as local shards and their Hessian-vector products are finite
differences of the gradients FSDP2 reduce-scatters); the exact HVP route, per-parameter values
and FSDP1 are refused with errors that say what works. Under FSDP2 a closure must call backward() (the
other closure style is refused, by name). Every collective has a timeout
and every loop a fixed length. ``HYPEROPTIM_DIST_WORLDS=2,3`` runs more world sizes (CI runs 2;
3 ranks shard the 8-row layer unevenly). The last part: torch.distributed.checkpoint, a save at 2
ranks resumed at 1, 2 and 3 (every family: HD, MARTHE, IFT, FDS).
"""

from __future__ import annotations

import copy
import datetime
import io
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from optim_db import input_id
from test_conformance import (
    CASES,
    Problem,
    _fresh_kwargs,
    assert_same_params,
    build,
    hyper_groups,
    run,
)
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
    # The scale-free policy reads the training loss's mean: in the same all-reduce.
    "adamw_scale_free_train": lambda p, v: hyperoptim.HypergradAdamW(p, lr=0.01,
                                                                 hyper_step="scale_free"),
    "adamw_val": lambda p, v: hyperoptim.HypergradAdamW(p, lr=0.01, hyper_lr=1e-3,
                                                        val_closure=v),
}


def _two_groups(params: Any) -> list[dict[str, Any]]:
    """The first layer and the last at different learning rates: two tangent columns."""
    params = list(params)
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.02}]


# MARTHE: adaptive and fixed mu, SGD (momentum, weight decay, Nesterov) and Adam/AdamW (one and
# two tangent columns), on the finite-difference route (the closure calls backward()).
MARTHE_BUILDERS = {
    "marthe_sgd": lambda p, v: hyperoptim.MartheSGD(p, lr=0.05, momentum=0.5, weight_decay=1e-3,
                                                    hyper_lr=1e-3, val_closure=v),
    "marthe_sgd_nesterov": lambda p, v: hyperoptim.MartheSGD(
        p, lr=0.05, momentum=0.5, nesterov=True, mu=0.9, hyper_lr=1e-2, adapt_hyper_lr=False,
        val_closure=v),
    "marthe_adam": lambda p, v: hyperoptim.MartheAdam(p, lr=0.01, weight_decay=1e-3,
                                                      hyper_lr=1e-5, val_closure=v),
    "marthe_adamw_groups": lambda p, v: hyperoptim.MartheAdamW(_two_groups(p), lr=0.01,
                                                               hyper_lr=1e-5, val_closure=v),
}
# FDS: episodes of 4 steps; SGD learning its three schedules, AdamW its learning rate.
FDS_BUILDERS = {
    "fds_sgd": lambda p, v: hyperoptim.FDSSGD(p, lr=0.05, momentum=0.5, weight_decay=1e-3,
                                              horizon=4, tune=("lr", "momentum", "weight_decay"),
                                              val_closure=v),
    "fds_adamw": lambda p, v: hyperoptim.FDSAdamW(p, lr=0.01, horizon=4, val_closure=v),
}
# IFT: a hyper-update every step (8 in the history), Neumann series of 3 terms (2 HVPs each, by
# finite differences); SGD learning its three values at either timing, Adam/AdamW lr and decay.
_IFT = dict(update_interval=1, lookback=3, hyper_lr=0.01, update_schedule="fixed")
IFT_BUILDERS = {
    "ift_sgd": lambda p, v: hyperoptim.IFTOptimizer(p, lr=0.05, momentum=0.5, weight_decay=1e-3,
                                                    val_closure=v, **_IFT),
    "ift_sgd_next": lambda p, v: hyperoptim.IFTOptimizer(
        _two_groups(p), lr=0.05, momentum=0.5, weight_decay=1e-3,
        update_timing="next", val_closure=v, **_IFT),
    "ift_adam": lambda p, v: hyperoptim.IFTAdam(p, lr=0.01, weight_decay=1e-3, val_closure=v,
                                                **_IFT),
    "ift_adamw_groups": lambda p, v: hyperoptim.IFTAdamW(_two_groups(p), lr=0.01, val_closure=v,
                                                         **_IFT),
}
ALL_BUILDERS = {**BUILDERS, **MARTHE_BUILDERS, **FDS_BUILDERS, **IFT_BUILDERS}


def _model() -> nn.Module:
    torch.manual_seed(0)
    # The last layer's weight has one row: rank 1's shard of it is empty.
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _setup(builder: Callable[..., Any], rank: int, world: int, sharded: bool
           ) -> tuple[nn.Module, Any, Callable[[int], None]]:
    """The model (sharded or not), its optimizer, and step ``t`` on this rank's share of batch
    ``t``; both closures call backward()."""
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

    opt = builder(model.parameters(), val_closure)

    def step(t: int) -> None:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.mse_loss(model(x[t, part]), y[t, part])
            loss.backward()
            return loss

        opt.step(closure)

    return model, opt, step


def run_case(name: str, rank: int, world: int, sharded: bool) -> dict[str, Any]:
    """8 steps on this rank's share of every batch (FDS: two episodes, each ended by
    hyperstep(), which clears the state: its types are read before)."""
    model, opt, step = _setup(ALL_BUILDERS[name], rank, world, sharded)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for t in range(STEPS):
            step(t)
            state = next(iter(opt.state.values()))
            types = sorted({type(v).__name__ for k, v in state.items() if k != "step"})
            if hasattr(opt, "hyperstep") and opt.episode_step == opt.horizon:
                opt.hyperstep()
    comm = Counter(e.name for e in prof.events() if e.name.startswith("gloo:"))
    full = [p.full_tensor() if sharded else p for p in model.parameters()]
    return {"params": [p.detach().clone() for p in full],
            "lr": [g["lr"] for g in opt.param_groups], "history": opt.history,
            "state_types": types, "comm": comm}


def _refusals() -> list[str]:
    """Construction errors under FSDP2 for what it does not support (per-parameter values, the
    exact HVP route), and for a closure that returns the loss without backward()."""
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model)
    # Taken before any forward: between a forward and its backward the module holds FSDP2's
    # unsharded parameters instead.
    params = list(model.parameters())
    out = []
    for make in (lambda: hyperoptim.HypergradAdamW(params, lr=0.1, per_parameter=True),
                 lambda: hyperoptim.IFTOptimizer(params, lr=0.1, per_parameter_lr=True,
                                                 val_closure=lambda: None),
                 lambda: hyperoptim.MartheAdamW(params, lr=0.1, hvp="exact",
                                                val_closure=lambda: None),
                 lambda: hyperoptim.IFTAdamW(params, lr=0.1, hvp="exact",
                                             val_closure=lambda: None)):
        try:
            make()
            out.append("constructed")
        except ValueError as err:
            out.append(str(err))
    for cls in (hyperoptim.HypergradSGD, hyperoptim.MartheSGD, hyperoptim.IFTAdam):
        opt = cls(params, lr=0.1, val_closure=lambda: model(torch.ones(2, 3)).sum())
        try:
            opt.step(lambda: model(torch.ones(2, 3, dtype=torch.float64)).sum())
            out.append("loss-only closure: stepped")
        except ValueError as err:
            out.append(f"loss-only closure: {err}")
    return out


def _in_gloo_group(rank: int, world: int, store: str, work: Callable[[], None]) -> None:
    """``work()`` in a gloo process group of ``world`` ranks (60 s timeout on every collective),
    then leave the process."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        work()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown (the results are written, the group destroyed):
    # in a full run gloo's or the profiler's threads sometimes abort it ("terminate called
    # without an active exception"), which spawn reports as a failed rank.
    os._exit(0)


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    def work() -> None:
        results: dict[str, Any] = {name: run_case(name, rank, world, True)
                                   for name in ALL_BUILDERS}
        results["refusals"] = _refusals()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))

    _in_gloo_group(rank, world, store, work)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def ranks(request) -> list[dict[str, Any]]:
    world = request.param
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), tmp), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


@pytest.mark.parametrize("name", list(ALL_BUILDERS))
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
    for hist, ref_hist in zip(first["history"], ref["history"], strict=True):
        lrs = hist["lr"]  # FDS: one schedule per episode; IFT "next": none at the first step
        updates = 2 if name.startswith("fds") else STEPS - 1 if name.endswith("next") else STEPS
        assert len(lrs) == updates and lrs[-1] != lrs[0]
        assert not any(hist["skipped"])
        # Every learned value (MARTHE's mu and hyper-step size, FDS's schedules) and raw
        # hypergradient.
        assert sorted(hist) == sorted(ref_hist)
        for key in hist:
            torch.testing.assert_close(torch.tensor(hist[key]), torch.tensor(ref_hist[key]),
                                       rtol=1e-6, atol=1e-6, msg=key)
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
    # ranks' hyperparameters agree; shards are not compared). And the ranks' verdict on each
    # closure (docs/design.md §8; the reduce-scatter inside backward() is FSDP2's and carries
    # nothing of the optimizer's), training and validation alike, rides in the step's one
    # all-reduce, whose size a rank whose closure failed must know: the last step's. So the
    # first step sends each closure's verdict alone (one, or two with a validation closure),
    # the second its sums twice (they grow as d_{t-1} appears), every later step exactly one
    # all-reduce of its own (with a validation closure it sent three before: each closure's
    # verdict alone).
    for name in BUILDERS:
        comm = ranks[0][name]["comm"]
        val = name.endswith("val")
        backwards = STEPS * (2 if val else 1)
        own = STEPS + (1 if val else 0) + 2 + (3 if val else 2)
        assert comm["gloo:reduce_scatter"] + comm["gloo:all_reduce"] - own == backwards, (name, comm)


def _marthe_calls(hist: list[dict[str, Any]]) -> tuple[int, int, int]:
    """From a MARTHE run's history: the validation calls (every step after the first, which
    has no tangent yet), the steps that took H Z, and the tangent columns it took (the groups
    with mu != 0 there)."""
    active = [sum(h["mu"][t] != 0 for h in hist) for t in range(1, STEPS)]
    return STEPS - 1, sum(a > 0 for a in active), sum(active)


def test_fsdp2_marthe_communicates_scalars_only(ranks):
    # Every all-gather is FSDP2's, one per forward: the training closure, the validation closure
    # and the two finite-difference evaluations per tangent column. Beside the reductions of
    # each backward() (FSDP2's), the optimizer all-reduces scalars only: the ranks' verdict after
    # each closure call (training, validation, perturbed), per step one all-reduce for the
    # hypergradient's partial sums and the validation loss, one for the guard's norms, per H Z
    # one for the finite-difference step sizes and per column one for the kink check; once, the
    # validation gradient's nonzero check and the two of the replica check.
    for name in MARTHE_BUILDERS:
        comm = ranks[0][name]["comm"]
        vals, hvps, cols = _marthe_calls(ranks[0][name]["history"])
        forwards = STEPS + vals + 2 * cols
        assert comm["gloo:all_gather"] == forwards, (name, comm)
        own = (STEPS + vals + 2 * cols) + vals + STEPS + hvps + cols + 3
        assert comm["gloo:reduce_scatter"] + comm["gloo:all_reduce"] - own == forwards, (name, comm)
        assert hvps >= STEPS - 2 and cols >= hvps, (name, hvps, cols)  # H Z was taken


def test_fsdp2_ift_communicates_scalars_only(ranks):
    # Every all-gather is FSDP2's, one per forward: the training closure, and per hyper-update
    # the validation closure and two finite-difference evaluations for each of the lookback - 1
    # Hessian products. Beside the reductions of each backward() (FSDP2's), the optimizer
    # all-reduces scalars only: the ranks' verdict after each closure call, per hyper-update ONE
    # all-reduce for every hypergradient's partial sums and the validation loss, per step one
    # for the guard's norms, per Hessian product one for the finite-difference step size and one
    # for the kink check; once, the validation gradient's nonzero check and the replica check's
    # two. The Neumann series' vectors never leave the rank. IFTOptimizer's stability guard
    # (SGD's edge; the Adam rule has none) takes one more Hessian product at every hyper-update
    # (every step here), and one all-reduce of its per-group sums.
    for name in IFT_BUILDERS:
        comm = ranks[0][name]["comm"]
        hypers = len(ranks[0][name]["history"][0]["lr"])
        guarded = hypers if name.startswith("ift_sgd") else 0
        hvps = 2 * hypers + guarded  # lookback=3
        forwards = STEPS + hypers + 2 * hvps
        assert comm["gloo:all_gather"] == forwards, (name, comm)
        own = forwards + hypers + STEPS + 2 * hvps + 3 + guarded
        assert comm["gloo:reduce_scatter"] + comm["gloo:all_reduce"] - own == forwards, (name, comm)


def test_fsdp2_refuses_what_it_cannot_do_by_name(ranks):
    for rank in ranks:
        lines = rank["refusals"]
        assert len(lines) == 7
        assert "HypergradAdamW(per_parameter=True) does not support FSDP2" in lines[0], lines[0]
        assert "IFTOptimizer(per_parameter_lr=True) does not support FSDP2" in lines[1], lines[1]
        for name, line in zip(("MartheAdamW", "IFTAdamW"), lines[2:4]):
            assert f"{name}(hvp='exact') does not support FSDP2" in line, line
            assert "hvp='finite_difference'" in line, line
        for line in lines[4:]:
            assert "must call zero_grad() and backward() itself" in line, line


def test_fsdp1_flat_parameters_are_refused_naming_fully_shard():
    # FSDP1 itself needs an accelerator in torch 2.13 ("FSDP needs a non-CPU accelerator
    # device"), so no gloo rank can build one; its FlatParameter is what the optimizers see.
    flat_param = pytest.importorskip("torch.distributed.fsdp._flat_param")
    flat = flat_param.FlatParameter(torch.zeros(4), requires_grad=True)
    for cls in (hyperoptim.HypergradSGD, hyperoptim.HypergradAdamW, hyperoptim.MartheSGD):
        with pytest.raises(ValueError, match=r"does not support FSDP1 .*fully_shard"):
            cls([flat], lr=0.1)


# ---------------------------------------------------------------- torch.distributed.checkpoint
# A save after SPLIT steps at 2 ranks resumes at 1 (one plain, unsharded process), 2 and 3 ranks
# (FSDP2) on the trajectory of the uninterrupted run: weights, learned values, history and the
# hyper-step policies' state (hyper_state) within 1e-6. The policies' state is what only
# hyper_state holds: losing it changes the trajectory, losing history changes the record.
SPLIT = 4
DCP_BUILDERS = {
    "sgd_val": BUILDERS["sgd_val"],
    "adam_scale_free": lambda p, v: hyperoptim.HypergradAdam(p, lr=0.01, hyper_step="scale_free",
                                                             val_closure=v),
    "adamw_growth": lambda p, v: hyperoptim.HypergradAdamW(p, lr=0.01, weight_decay=1e-2,
                                                           hyper_step="growth"),
    # Tangents (two columns, sharded on the parameter's dim 0 after the columns) and the Adam
    # moments' tangents, resharded to 1 and 3 ranks.
    "marthe_adamw_groups": MARTHE_BUILDERS["marthe_adamw_groups"],
    # IFT: the Adam moments sharded, the hyper optimizer's state in the repeated extras.
    "ift_adamw_groups": IFT_BUILDERS["ift_adamw_groups"],
    # FDS: saved two steps into its second episode (the tangent columns, sharded on the
    # parameter's dim 0 after the columns, the episode clock and the schedules), each episode
    # ended by hyperstep().
    "fds_sgd": FDS_BUILDERS["fds_sgd"],
    "fds_adamw": FDS_BUILDERS["fds_adamw"],
}
DCP_WORLDS = (1, 2, 3)
DCP_SPLITS = {"fds_sgd": SPLIT + 2, "fds_adamw": SPLIT + 2}


def _advance(opt: Any, step: Callable[[int], None], steps: range) -> None:
    """Steps ``steps``; an FDS optimizer's episode ended by ``hyperstep()`` where it is due."""
    for t in steps:
        step(t)
        if hasattr(opt, "hyperstep") and opt.episode_step == opt.horizon:
            opt.hyperstep()


def _learned(model: nn.Module, opt: Any, sharded: bool) -> dict[str, Any]:
    return {"params": [(p.full_tensor() if sharded else p).detach().clone()
                       for p in model.parameters()],
            "lr": [g["lr"] for g in opt.param_groups], "history": opt.history,
            "hyper_state": copy.deepcopy(opt.hyper_state)}


def _save(name: str, rank: int, world: int, path: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt, step = _setup(DCP_BUILDERS[name], rank, world, True)
    _advance(opt, step, range(DCP_SPLITS.get(name, SPLIT)))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def _resume(name: str, rank: int, world: int, path: str, sharded: bool) -> dict[str, Any]:
    """A fresh model and optimizer loaded from ``path`` (the usual DCP idiom: the state dicts of
    what is being resumed are the load's target), then the steps after SPLIT."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt, step = _setup(DCP_BUILDERS[name], rank, world, sharded)
    model_sd, optim_sd = get_state_dict(model, opt)
    target = {"model": model_sd, "optim": optim_sd}
    dcp.load(target, checkpoint_id=path, no_dist=not sharded)
    set_state_dict(model, opt, model_state_dict=target["model"], optim_state_dict=target["optim"])
    _advance(opt, step, range(DCP_SPLITS.get(name, SPLIT), STEPS))
    return _learned(model, opt, sharded)


def _dcp_worker(rank: int, world: int, store: str, ckpt: str) -> None:
    """At 2 ranks: save every case after SPLIT steps; at any world size: resume every case."""
    def work() -> None:
        if world == 2:
            for name in DCP_BUILDERS:
                _save(name, rank, world, os.path.join(ckpt, name))
        results = {name: _resume(name, rank, world, os.path.join(ckpt, name), True)
                   for name in DCP_BUILDERS}
        torch.save(results, os.path.join(ckpt, f"world{world}-rank{rank}.pt"))

    _in_gloo_group(rank, world, store, work)


@pytest.fixture(scope="module")
def resumed() -> dict[int, list[dict[str, Any]]]:
    """Per world size, every rank's results (saved at 2 ranks first)."""
    out: dict[int, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (2, *(w for w in DCP_WORLDS if w > 2)):
            store = os.path.join(tmp, f"store{world}")
            mp.spawn(_dcp_worker, args=(world, store, tmp), nprocs=world, join=True)
            out[world] = [torch.load(os.path.join(tmp, f"world{world}-rank{r}.pt"))
                          for r in range(world)]
        if 1 in DCP_WORLDS:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                out[1] = [{name: _resume(name, 0, 1, os.path.join(tmp, name), False)
                           for name in DCP_BUILDERS}]
            finally:
                torch.set_num_threads(threads)
    return out


def _floats(obj: Any) -> list[float]:
    """Every number in a nest of dicts and lists, in key order."""
    if isinstance(obj, dict):
        return [f for k in sorted(obj, key=str) for f in _floats(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [f for v in obj for f in _floats(v)]
    return [float(obj)]


# DCP's note that the unsharded resume loads in one process, as it is meant to.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("world", DCP_WORLDS, ids=lambda w: f"world{w}")
@pytest.mark.parametrize("name", list(DCP_BUILDERS))
def test_dcp_save_at_two_ranks_resumes_on_the_uninterrupted_trajectory(resumed, name, world):
    torch.set_num_threads(1)
    model, opt, step = _setup(DCP_BUILDERS[name], 0, 1, False)
    _advance(opt, step, range(STEPS))
    ref = _learned(model, opt, False)
    first = resumed[world][0][name]
    for other in resumed[world][1:]:
        assert first["history"] == other[name]["history"], "ranks disagree"
        assert all(map(torch.equal, first["params"], other[name]["params"]))
    for a, b in zip(ref["params"], first["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # history: every step, the saved ones included; hyper_state: the policy's state.
    assert [sorted(h) for h in first["history"]] == [sorted(h) for h in ref["history"]]
    assert len(first["history"][0]["lr"]) == (2 if name.startswith("fds") else STEPS)
    assert sorted(first["hyper_state"]) == sorted(ref["hyper_state"])
    for key in ("lr", "history", "hyper_state"):
        torch.testing.assert_close(torch.tensor(_floats(first[key]), dtype=torch.float64),
                                   torch.tensor(_floats(ref[key]), dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6, msg=key)


def _trained_and_fresh(name: str) -> tuple[nn.Module, Any, nn.Module, Any]:
    """An unsharded model and optimizer after SPLIT steps, and a fresh pair."""
    model, opt, step = _setup(DCP_BUILDERS[name], 0, 1, False)
    for t in range(SPLIT):
        step(t)
    fresh_model, fresh, _ = _setup(DCP_BUILDERS[name], 0, 1, False)
    return model, opt, fresh_model, fresh


def test_dcp_optimizer_state_dict_keeps_history_and_hyper_state():
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model, opt, fresh_model, fresh = _trained_and_fresh("adam_scale_free")
    osd = get_optimizer_state_dict(model, opt)
    assert set(osd) == {"state", "param_groups"}  # all that DCP keeps
    set_optimizer_state_dict(fresh_model, fresh, osd)
    assert fresh.history == opt.history and fresh.hyper_state == opt.hyper_state
    assert fresh.hyper_state["hyper_step"]  # the policy's state, not a fresh one
    plain = fresh.state_dict()
    assert hyperoptim.core.serialization.EXTRA_STATE_KEY not in fresh.param_groups[0]
    assert plain["history"] == opt.history


def test_dcp_flattened_optimizer_state_dict_warns_that_hyper_state_is_lost():
    # flatten_optimizer_state_dict=True (torchtitan's choice) rebuilds param groups from the live
    # groups' keys only: the repeated hyper state cannot come back, and the load says so.
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model, opt, fresh_model, fresh = _trained_and_fresh("adamw_growth")
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    osd = get_optimizer_state_dict(model, opt, options=options)
    with pytest.warns(hyperoptim.HyperoptimWarning, match="but not its history and hyper_state"):
        set_optimizer_state_dict(fresh_model, fresh, osd, options=options)
    assert fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_unreadable_repeated_hyper_state_is_refused():
    _, opt, _, fresh = _trained_and_fresh("sgd_val")
    sd = opt.state_dict()
    groups = [{**g, hyperoptim.core.serialization.EXTRA_STATE_KEY: b"junk"} for g in sd["param_groups"]]
    with pytest.raises(ValueError, match="hyperoptim_extra_state'] is not what HypergradSGD"):
        fresh.load_state_dict({"state": sd["state"], "param_groups": groups})


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_every_class_resumes_from_the_two_keys_dcp_keeps(case):
    """Every class and configuration of the conformance table: a state dict cut down to
    ``state`` and ``param_groups`` (what get_optimizer_state_dict keeps) resumes in lockstep,
    history and hyper state included (its ``torch.load(weights_only=True)`` reads them all)."""
    info, inp = case
    prob = Problem()
    opt = build(info, inp, prob)
    run(info, opt, prob, 0, 6)
    sd = opt.state_dict()
    buffer = io.BytesIO()  # a copy, as a checkpoint is (the state dict shares opt's tensors)
    torch.save({"state": sd["state"], "param_groups": sd["param_groups"]}, buffer)
    buffer.seek(0)
    prob2 = Problem()
    prob2.model.load_state_dict(prob.model.state_dict())
    opt2 = build(info, inp, prob2, **_fresh_kwargs(inp))
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.history == opt.history and opt2.state_dict()["hyper_state"] == sd["hyper_state"]
    run(info, opt, prob, 6, 4)
    run(info, opt2, prob2, 6, 4)
    assert_same_params(prob.params(), prob2.params())
    assert hyper_groups(opt2) == hyper_groups(opt) and opt2.history == opt.history


# FDS through DCP: its state-creating step (no closure, lr 0) creates the keys a checkpoint
# taken within an episode has, and moves nothing; a save two steps into the second episode
# resumes bit for bit, and one at the end of the first episode with a partial load.
FDS_DCP_BUILDERS = {
    "fds_sgd": FDS_BUILDERS["fds_sgd"],
    "fds_adam": lambda p, v: hyperoptim.FDSAdam(p, lr=0.01, weight_decay=1e-3, horizon=4,
                                                val_closure=v),
    "fds_adamw": FDS_BUILDERS["fds_adamw"],
}


def _fds_steps(opt: Any, step: Callable[[int], None], steps: range) -> None:
    for t in steps:
        step(t)
        if opt.episode_step == opt.horizon:
            opt.hyperstep()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("split", [SPLIT + 2, SPLIT], ids=["within", "between"])
@pytest.mark.parametrize("name", list(FDS_DCP_BUILDERS))
def test_fds_resumes_bit_for_bit_through_dcp(name, split, tmp_path):
    # Between episodes FDS holds no per-parameter state: the fresh target's (from DCP's
    # state-creating step) is loaded partially and dropped.
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt, step = _setup(FDS_DCP_BUILDERS[name], 0, 1, False)
    _fds_steps(opt, step, range(split))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path), no_dist=True)
    ref_model, ref = model, opt  # the uninterrupted run (the save moved nothing)
    _fds_steps(ref, step, range(split, STEPS))

    model, opt, step = _setup(FDS_DCP_BUILDERS[name], 0, 1, False)
    before = [p.detach().clone() for p in model.parameters()]
    lrs = [g["lr_schedule"][:] for g in opt.param_groups]
    model_sd, optim_sd = get_state_dict(model, opt)  # DCP's state-creating step
    assert all(map(torch.equal, before, model.parameters()))  # it moved nothing
    assert [g["lr_schedule"] for g in opt.param_groups] == lrs and opt.episode_step == 0
    target = {"model": model_sd, "optim": optim_sd}
    dcp.load(target, checkpoint_id=str(tmp_path), no_dist=True,
             planner=DefaultLoadPlanner(allow_partial_load=split == SPLIT))
    set_state_dict(model, opt, model_state_dict=target["model"], optim_state_dict=target["optim"])
    assert split != SPLIT or not opt.state
    _fds_steps(opt, step, range(split, STEPS))
    assert all(map(torch.equal, ref_model.parameters(), model.parameters()))
    assert opt.history == ref.history and len(opt.history[0]["lr"]) == 2
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in ref.param_groups]
