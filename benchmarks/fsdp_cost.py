"""What each optimizer costs under DDP and FSDP2: collectives and bytes per step, memory per rank.

Issue 19's performance part. Every optimizer class of the package (each with a validation
closure, the HD family also without one) and the floors ``torch.optim.SGD`` and
``torch.optim.AdamW`` train the same MLP on real gloo process groups on 127.0.0.1 (2 and 3 ranks
by default; every collective has a 60 s timeout, every loop a fixed length), each rank on its
share of every batch, in three set-ups: ``DistributedDataParallel`` as a drop-in,
``DistributedDataParallel`` after ``optimizer.declare_ddp(model)``, and FSDP2 (``fully_shard`` on
each ``nn.Linear`` and on the root). Both closures call ``zero_grad()`` and ``backward()`` (what
FSDP2 requires), so the second-order methods take their Hessian-vector products by finite
differences: two more gradient evaluations per tangent column. A class that refuses a set-up
prints its refusal as the row.

Measured, on each rank, over ``--steps`` steps after ``--warmup`` (the first step's one-off checks
fall in the warm-up; ``--steps`` should be a multiple of the IFT classes' ``update_interval`` and
the FDS classes' ``horizon``, both 3, so that per-step figures are averages over whole periods):

* **Collectives and bytes per step.** A ``TorchDispatchMode`` sees every ``c10d`` operator the
  rank issues (DDP's bucket all-reduces, FSDP2's all-gathers and reduce-scatters, the optimizer's
  all-reduces; DTensor operations are let through to DTensor and their inner operators seen); the
  profiler's ``gloo:*`` events (``tests/test_ddp_comm.py``) do not record tensor lists and name
  gloo's reduce-scatter an all-reduce. Bytes are each collective's payload, the convention of
  nccl-tests: an all-reduce's tensors, an all-gather's output, a reduce-scatter's input (the
  unsharded size). A bandwidth-optimal ring sends 2(N-1)/N times the payload per rank for an
  all-reduce and (N-1)/N times it for an all-gather or a reduce-scatter. Under DDP a communication
  hook counts DDP's own all-reduces; the rest are the optimizer's ("own"). Under FSDP2 (a 1-D
  mesh) every all-reduce is the optimizer's, every all-gather and reduce-scatter FSDP2's, which
  also runs them for the extra gradient evaluations of the second-order methods.
  ``x AdamW`` is the set-up's total payload over ``torch.optim.AdamW``'s in the same set-up.
* **Optimizer state** (KiB per rank): the bytes of every tensor in ``optimizer.state``,
  ``optimizer.hyper_state`` and the optimizer's other tensor attributes (the IFT classes' hyper
  optimizer), DTensors counted by their local shard, parameters and gradients left out; the
  largest after any step (an FDS episode's end frees its tangents).
* **Step peak** under FSDP2 (KiB per rank, the largest over ranks): the profiler's memory events
  (``profile_memory=True``: the allocations and frees of torch's CPU allocator), summed in time
  order within each measured step; the peak of that running sum above where the step began is
  what the step holds at once beyond what it started with: gradients, FSDP2's unsharded
  parameters and gradients during forward and backward, saved activations, the method's
  transient buffers (median over the measured steps). Summed over a whole run the live bytes
  drift up by up to a model's size in some FSDP2 runs and not in others (a free the profiler
  does not see, with gloo's asynchronous work), so only peaks within a step are compared.
  ``tracemalloc`` does not see torch's allocator, and ``ru_maxrss`` is a process-wide
  high-water mark that the first case fixes for all the others, so neither can tell cases apart.
  ``both - AdamW's`` is state plus step peak, less AdamW's under FSDP2: the memory per rank the
  method adds to AdamW's; ``/ model`` divides it by the full (unsharded) model's bytes. The issue
  asks for at most the extra state each method needs, never a full copy of the model.
* **Lockstep** (float64), in each set-up: final weights and every learned hyperparameter (the
  numbers in ``param_groups``) of rank 0 against one unsharded process on the whole batch, run
  here after the ranks; the largest absolute difference, ``ok`` within 1e-6 with every rank's
  weights bit-identical to rank 0's (``tests/test_fsdp.py`` checks FSDP2 at 2 ranks; this
  benchmark at 2 and 3, where 3 ranks shard some rows unevenly). The exit status is 1 if one
  fails.

Run (about 7 minutes of CPU time at the defaults; ``--quick`` about half a minute):
    python benchmarks/fsdp_cost.py                 # 2 and 3 ranks, 6 measured steps, width 128
    python benchmarks/fsdp_cost.py --quick         # 3 measured steps, width 32
    python benchmarks/fsdp_cost.py --worlds 3 --only HypergradAdamW,MartheAdamW
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]  # this checkout's package, also in the spawned ranks

import hyperoptim  # noqa: E402

MODES = ("ddp", "ddp_declared", "fsdp2")
TOL = 1e-6
STEP_MARK = "fsdp_cost.measured_step"
IN, BATCH, VAL = 16, 12, 12  # 12 rows split evenly over 1, 2, 3 and 4 ranks
PERIOD = dict(ift=dict(update_interval=3, lookback=3), fds=dict(horizon=3))


def _cases() -> dict[str, Callable[..., Any]]:
    """Row label -> (params, val_closure) -> optimizer; torch's floors first."""
    hp = hyperoptim
    sgd, adam = dict(lr=0.05, momentum=0.5), dict(lr=0.01)
    out: dict[str, Callable[..., Any]] = {
        "torch.optim.SGD": lambda p, v: torch.optim.SGD(p, **sgd),
        "torch.optim.AdamW": lambda p, v: torch.optim.AdamW(p, **adam),
    }
    for cls, kw in ((hp.HypergradSGD, sgd), (hp.HypergradAdam, adam), (hp.HypergradAdamW, adam)):
        out[f"{cls.__name__} (training loss)"] = lambda p, v, c=cls, k=kw: c(p, **k)
    table = ((hp.HypergradSGD, sgd, {}), (hp.HypergradAdam, adam, {}),
             (hp.HypergradAdamW, adam, {}), (hp.MartheSGD, sgd, {}), (hp.MartheAdam, adam, {}),
             (hp.MartheAdamW, adam, {}), (hp.IFTOptimizer, sgd, PERIOD["ift"]),
             (hp.IFTAdam, adam, PERIOD["ift"]), (hp.IFTAdamW, adam, PERIOD["ift"]),
             (hp.FDSSGD, sgd, PERIOD["fds"]), (hp.FDSAdam, adam, PERIOD["fds"]),
             (hp.FDSAdamW, adam, PERIOD["fds"]))
    for cls, kw, extra in table:
        out[cls.__name__] = lambda p, v, c=cls, k=kw, e=extra: c(p, val_closure=v, **k, **e)
    return out


# ------------------------------------------------------------------------------ measuring
_TWO_TENSOR_OPS = ("_allgather_base_", "_reduce_scatter_base_", "allgather_into_tensor_coalesced_",
                   "reduce_scatter_tensor_coalesced_")


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class CommCounter(TorchDispatchMode):
    """Counts the ``c10d`` collectives issued while active, with their payload in bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs it; its inner operators come back here
        if func.namespace == "c10d":
            name = func.__name__.split(".")[0]
            if name in _TWO_TENSOR_OPS:  # (output, input): the larger is the unsharded size
                size = max(_nbytes(_tensors(args[0])), _nbytes(_tensors(args[1])))
            else:  # all-reduce, broadcast: the tensors sent, the first argument
                size = _nbytes(_tensors(args[0])) if args else 0
            self.calls.append((name.strip("_"), size))
        return func(*args, **(kwargs or {}))

    def totals(self) -> dict[str, list[int]]:
        """Collective name -> [count, bytes]."""
        out: dict[str, list[int]] = {}
        for name, size in self.calls:
            entry = out.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += size
        return out


def _step_peaks(prof: profile, marker: str) -> list[int]:
    """Per step marked ``marker``: the peak bytes of torch's CPU allocator above where the step
    began (its allocations and frees, in order)."""
    events = prof.profiler.kineto_results.events()
    steps = sorted((e.start_ns(), e.end_ns()) for e in events if e.name() == marker)
    memory = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    peaks, live, i = [], 0, 0
    for start, end in steps:
        while i < len(memory) and memory[i][0] < start:
            live += memory[i][1]
            i += 1
        base = peak = live
        while i < len(memory) and memory[i][0] <= end:
            live += memory[i][1]
            peak = max(peak, live)
            i += 1
        peaks.append(peak - base)
    return peaks


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _state_bytes(opt: Any, exclude: Sequence[torch.Tensor]) -> int:
    """Bytes of the tensors the optimizer keeps, each storage once, shards by their local part."""
    skip = {_local(t).untyped_storage().data_ptr() for t in exclude}
    seen: set[int] = set()
    total = 0

    def walk(value: Any, depth: int) -> None:
        nonlocal total
        if depth > 6:
            return
        if isinstance(value, torch.Tensor):
            local = _local(value)
            ptr = local.untyped_storage().data_ptr()
            if local.numel() and ptr not in skip and ptr not in seen:
                seen.add(ptr)
                total += local.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                walk(v, depth + 1)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, depth + 1)
        elif isinstance(value, torch.optim.Optimizer):  # IFT's hyper optimizer
            walk(value.state, depth + 1)

    walk(opt.state, 0)
    extra = {k: v for k, v in vars(opt).items() if k not in ("state", "param_groups", "defaults")}
    walk(extra, 0)
    return total


def _hypers(opt: Any) -> list[float]:
    """Every number in the param groups, in order (the learned values among them)."""
    out: list[float] = []
    for group in opt.param_groups:
        for key in sorted(k for k in group if k != "params"):
            values = group[key] if isinstance(group[key], (tuple, list)) else [group[key]]
            for v in values:
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    v = v.item()
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.append(float(v))
    return out


def _first_sentence(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text.split(". ")[0].rstrip(".")


# ------------------------------------------------------------------------------ one run
def _model(width: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 1)).to(dtype)


def _data(total_steps: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(total_steps, BATCH, IN, generator=gen, dtype=dtype)
    xv = torch.randn(VAL, IN, generator=gen, dtype=dtype)
    w = torch.randn(IN, 1, generator=gen, dtype=dtype)
    return x, torch.sin(x @ w), xv, torch.sin(xv @ w)


def _wrap(net: nn.Module, mode: str, world: int, ddp_calls: list[int]) -> nn.Module:
    """``net`` under DDP (its all-reduces counted into ``ddp_calls``) or sharded by FSDP2 (each
    ``nn.Linear``, then the root); as it is in one process."""
    if world == 1:
        return net
    if mode.startswith("ddp"):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        model = nn.parallel.DistributedDataParallel(net)

        def counting_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP reads annotations
            ddp_calls[0] += 1
            ddp_calls[1] += _nbytes([bucket.buffer()])
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(net)
    return net


def run_case(name: str, mode: str, rank: int, world: int, cfg: argparse.Namespace
             ) -> dict[str, Any]:
    """Warm-up and measured steps of one optimizer in one set-up on this rank's share.

    ``world == 1`` is the unsharded one-process reference (no process group needed).
    """
    dtype = getattr(torch, cfg.dtype)
    total = cfg.warmup + cfg.steps
    x, y, xv, yv = _data(total, dtype)
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    vpart = slice(rank * VAL // world, (rank + 1) * VAL // world)
    net = _model(cfg.width, dtype)
    full_bytes = _nbytes(net.parameters())
    ddp_calls = [0, 0]  # DDP's own all-reduces and their bytes
    model = _wrap(net, mode, world, ddp_calls)

    def val_closure() -> torch.Tensor:
        loss = F.mse_loss(model(xv[vpart]), yv[vpart])
        loss.backward()
        return loss

    try:
        opt = _cases()[name](list(model.parameters()), val_closure)
        if mode == "ddp_declared" and world > 1 and hasattr(opt, "declare_ddp"):
            opt.declare_ddp(model)
    except ValueError as err:
        return {"refused": _first_sentence(err)}

    params = [p.detach() for p in net.parameters()]
    state = [0]  # the largest over the steps: FDS frees its tangents at each episode's end

    def step(t: int) -> None:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.mse_loss(model(x[t, part]), y[t, part])
            loss.backward()
            return loss

        opt.step(closure)
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        state[0] = max(state[0], _state_bytes(opt, params + grads))
        if name.startswith("FDS") and opt.episode_step == opt.horizon:
            opt.hyperstep()  # the episode's end (weights not restored: the cost is the same)
        gc.collect()

    for t in range(cfg.warmup):
        step(t)
    ddp_calls[:] = [0, 0]
    counter = CommCounter()
    # Memory is compared under FSDP2 only: the profiler's memory events slow every step.
    memory = mode == "fsdp2"
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with prof if memory else contextlib.nullcontext(), counter:
        for t in range(cfg.warmup, total):
            with record_function(STEP_MARK):
                step(t)
    peak = int(statistics.median(_step_peaks(prof, STEP_MARK))) if memory else 0
    history = getattr(opt, "history", None)
    return {"comm": counter.totals(), "ddp": list(ddp_calls), "peak": peak,
            "state": state[0],
            "full_bytes": full_bytes,
            "params": [(p.full_tensor() if hasattr(p, "full_tensor") else p).clone()
                       for p in params],
            "hypers": _hypers(opt),
            "lr": opt.param_groups[0]["lr"],
            "first_lr": history[0]["lr"][0] if history and history[0].get("lr") else None}


def _worker(rank: int, world: int, store: str, out_dir: str, cfg: argparse.Namespace) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        results: dict[tuple[str, str], Any] = {}
        for name in cfg.names:
            for mode in MODES:
                try:
                    results[(name, mode)] = run_case(name, mode, rank, world, cfg)
                except Exception as err:  # noqa: BLE001  # a row that fails is a row of the table
                    results[(name, mode)] = {"refused": f"error: {_first_sentence(err)}"}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown (the results are written, the group destroyed):
    # gloo's or the profiler's threads sometimes abort it (tests/test_ddp_comm.py).
    os._exit(0)


def run_world(world: int, cfg: argparse.Namespace) -> list[dict[tuple[str, str], Any]]:
    """Every case at ``world`` ranks: one result dict per rank."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), tmp, cfg), nprocs=world,
                 join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
                 for r in range(world)]
    # A row refused (or failed) on some rank is that row on every rank.
    for key in ranks[0]:
        refused = [(r, res[key]["refused"]) for r, res in enumerate(ranks) if "refused" in res[key]]
        if refused:
            r, why = refused[0]
            note = why if len(refused) == world else f"rank {r}: {why}"
            for res in ranks:
                res[key] = {"refused": note}
    return ranks


# ------------------------------------------------------------------------------ tables
def _kib(n: float) -> str:
    return f"{n / 1024:.1f}"


def _num(n: float) -> str:
    return f"{n:.0f}" if n >= 100 or n == int(n) else f"{n:.3g}"


def _fmt(value: Any) -> str:
    """A learning rate, or a schedule of them (FDS)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return "?" if value is None else f"{float(value):.4g}"


def _per_step(res: dict[str, Any], steps: int) -> dict[str, float]:
    comm = {k: (c / steps, b / steps) for k, (c, b) in res["comm"].items()}
    total = sum(b for _, b in comm.values())
    ar, ar_bytes = comm.get("allreduce", (0.0, 0.0))
    return {"ag": comm.get("allgather_base", (0, 0))[0], "ag_b": comm.get("allgather_base", (0, 0))[1],
            "rs": comm.get("reduce_scatter_base", (0, 0))[0],
            "rs_b": comm.get("reduce_scatter_base", (0, 0))[1],
            "ar": ar, "ar_b": ar_bytes, "ddp": res["ddp"][0] / steps, "ddp_b": res["ddp"][1] / steps,
            "other": sum(c for k, (c, _) in comm.items()
                         if k not in ("allreduce", "allgather_base", "reduce_scatter_base")),
            "total": total}


def _refused_row(name: str, res: dict[str, Any]) -> str:
    return f"| {name} | {res['refused'].replace('|', '/')} |"


def ddp_table(rank0: dict[tuple[str, str], Any], names: Sequence[str], steps: int) -> list[str]:
    floor = rank0.get(("torch.optim.AdamW", "ddp_declared"), {})
    floor_total = _per_step(floor, steps)["total"] if "comm" in floor else math.nan
    lines = ["| optimizer | DDP's all-reduces | DDP KiB | own, drop-in | own bytes, drop-in "
             "| own, `declare_ddp` | own bytes, `declare_ddp` | total KiB, `declare_ddp` "
             "| x AdamW |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        plain, declared = rank0[(name, "ddp")], rank0[(name, "ddp_declared")]
        if "refused" in plain or "refused" in declared:
            lines.append(_refused_row(name, plain if "refused" in plain else declared))
            continue
        a, b = _per_step(plain, steps), _per_step(declared, steps)
        own_a, own_b = a["ar"] - a["ddp"], b["ar"] - b["ddp"]
        lines.append(f"| {name} | {_num(b['ddp'])} | {_kib(b['ddp_b'])} | {_num(own_a)} "
                     f"| {_num(a['ar_b'] - a['ddp_b'])} | {_num(own_b)} "
                     f"| {_num(b['ar_b'] - b['ddp_b'])} | {_kib(b['total'])} "
                     f"| {b['total'] / floor_total:.2f} |")
    return lines


def fsdp_table(rank0: dict[tuple[str, str], Any], names: Sequence[str], steps: int) -> list[str]:
    floor = rank0.get(("torch.optim.AdamW", "fsdp2"), {})
    floor_total = _per_step(floor, steps)["total"] if "comm" in floor else math.nan
    lines = ["| optimizer | all-gathers | reduce-scatters | FSDP2 KiB | own all-reduces "
             "| own bytes | total KiB | x AdamW |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        res = rank0[(name, "fsdp2")]
        if "refused" in res:
            lines.append(_refused_row(name, res))
            continue
        s = _per_step(res, steps)
        lines.append(f"| {name} | {_num(s['ag'])} | {_num(s['rs'])} "
                     f"| {_kib(s['ag_b'] + s['rs_b'])} | {_num(s['ar'])} | {_num(s['ar_b'])} "
                     f"| {_kib(s['total'])} | {s['total'] / floor_total:.2f} |")
    return lines


def memory_table(ranks: Sequence[dict[tuple[str, str], Any]], names: Sequence[str]) -> list[str]:
    def worst(name: str, mode: str, key: str) -> int | None:
        """The largest value over ranks; None where a rank refused."""
        res = [r[(name, mode)] for r in ranks]
        return None if any("refused" in x for x in res) else max(x[key] for x in res)

    floor = [worst("torch.optim.AdamW", "fsdp2", key) for key in ("state", "peak")]
    full = ranks[0][("torch.optim.SGD", "ddp")]["full_bytes"]
    lines = ["| optimizer | state KiB, DDP | state KiB, FSDP2 | step peak KiB, FSDP2 "
             "| both - AdamW's | / model |", "|---|---:|---:|---:|---:|---:|"]
    for name in names:
        fsdp = ranks[0][(name, "fsdp2")]
        state_ddp = worst(name, "ddp_declared", "state")
        ddp_cell = "refused" if state_ddp is None else _kib(state_ddp)
        if "refused" in fsdp:
            lines.append(f"| {name} | {ddp_cell} | {fsdp['refused'].replace('|', '/')} |")
            continue
        state, peak = worst(name, "fsdp2", "state") or 0, worst(name, "fsdp2", "peak") or 0
        extra = math.nan if None in floor else state + peak - sum(floor)  # type: ignore[arg-type]
        lines.append(f"| {name} | {ddp_cell} | {_kib(state)} | {_kib(peak)} | {_kib(extra)} "
                     f"| {extra / full:.2f} |")
    return lines


def lockstep_table(ranks: Sequence[dict[tuple[str, str], Any]], names: Sequence[str],
                   cfg: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Rows comparing each set-up's rank 0 with one unsharded process, and the failures."""
    lines = ["| optimizer | DDP | DDP, `declare_ddp` | FSDP2 | learned lr, first -> last |",
             "|---|---:|---:|---:|---|"]
    failures: list[str] = []
    torch.set_num_threads(1)
    for name in names:
        ref = run_case(name, "single", 0, 1, cfg)
        cells = []
        for mode in MODES:
            res = ranks[0][(name, mode)]
            if "refused" in res:
                cells.append("refused")
                continue
            same = all(torch.equal(a, b) for r in ranks[1:]
                       for a, b in zip(res["params"], r[(name, mode)]["params"], strict=True))
            diff = max([float((a - b).abs().max()) for a, b in
                        zip(res["params"], ref["params"], strict=True)]
                       + [abs(a - b) for a, b in zip(res["hypers"], ref["hypers"], strict=True)])
            ok = same and diff <= TOL and len(res["hypers"]) == len(ref["hypers"])
            cells.append(f"{diff:.1e} {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"{name} under {mode}: max difference {diff:.2e}, ranks "
                                f"{'agree' if same else 'differ'}")
        moved = "fixed" if name.startswith("torch") else (
            f"{_fmt(ref['first_lr'])} -> {_fmt(ref['lr'])}")
        lines.append(f"| {name} | {' | '.join(cells)} | {moved} |")
    return lines, failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="2,3", help="rank counts, comma-separated")
    parser.add_argument("--steps", type=int, default=6, help="measured steps (a multiple of 3)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the count")
    parser.add_argument("--width", type=int, default=128, help="the MLP's hidden width")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                        help="float64: the lockstep check's precision")
    parser.add_argument("--only", default="", help="row labels, comma-separated (floors kept)")
    parser.add_argument("--quick", action="store_true",
                        help="2 warm-up and 3 measured steps, width 32")
    cfg = parser.parse_args(argv)
    if cfg.quick:
        cfg.steps, cfg.warmup, cfg.width = 3, 2, 32
    names = list(_cases())
    if cfg.only:
        wanted = {n.strip() for n in cfg.only.split(",")}
        unknown = wanted - set(names)
        if unknown:
            parser.error(f"unknown rows {sorted(unknown)}; choose from {names}")
        names = [n for n in names if n in wanted or n.startswith("torch.optim.")]
    cfg.names = names
    worlds = [int(w) for w in cfg.worlds.split(",")]
    if any(w < 2 for w in worlds):
        parser.error("--worlds: at least 2 ranks")
    model = _model(cfg.width, getattr(torch, cfg.dtype))
    full = _nbytes(model.parameters())
    print(f"MLP {IN}-{cfg.width}-{cfg.width}-1 (Tanh), {sum(p.numel() for p in model.parameters())} "
          f"parameters, {_kib(full)} KiB in {cfg.dtype}; batch {BATCH} and validation batch "
          f"{VAL} split over the ranks; {cfg.warmup} warm-up steps, then per step over "
          f"{cfg.steps}; gloo on 127.0.0.1, CPU.")
    failures: list[str] = []
    for world in worlds:
        ranks = run_world(world, cfg)
        print(f"\n#### DDP, {world} ranks: collectives per step\n")
        print("\n".join(ddp_table(ranks[0], names, cfg.steps)))
        print(f"\n#### FSDP2, {world} ranks: collectives per step\n")
        print("\n".join(fsdp_table(ranks[0], names, cfg.steps)))
        print(f"\n#### Memory per rank, {world} ranks (the largest over ranks)\n")
        print("\n".join(memory_table(ranks, names)))
        lines, bad = lockstep_table(ranks, names, cfg)
        print(f"\n#### Lockstep, {world} ranks against one process: largest difference "
              f"(weights, hyperparameters)\n")
        print("\n".join(lines))
        failures += [f"{world} ranks: {line}" for line in bad]
    if failures:
        print("\nLockstep failures:\n" + "\n".join(failures))
    return 1 if failures and cfg.dtype == "float64" else 0


if __name__ == "__main__":
    sys.exit(main())
