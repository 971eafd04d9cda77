"""Host synchronisations per step: what a CUDA run would wait for (issue 21, item 7).

A tensor-to-host conversion (``.item()``, ``.tolist()``, ``bool()``, ``float()``, ...) makes the
host wait for every queued kernel on CUDA, so the fast path should make as few as a Python
decision truly needs. Every row of the conformance table, with each closure style (see
``ROUTES``), takes a few warm-up steps (FDS: a whole episode) and then has its next step (FDS: its
next episode's steps, the hyperstep included) counted by :class:`HostSyncCounter`; the worst step
of any row of a class must stay within that class's ceiling in ``CEILINGS``. Reads of tensors
that live on the host in a CUDA run too (step counts, random-number states) are not counted.

What the count cannot see: copies across devices that the code does not spell ``.cpu()`` or
``.to("cpu")`` (on a CPU run every tensor is on the host already), and a tensor that would sit on
another device in a CUDA run than it does here. Conversions inside an intercepted call are
counted once, at the outermost level.

Run ``python tests/test_host_syncs.py`` for the counts and the package lines that cause them.
"""

from __future__ import annotations

import collections
import pathlib
import sys
import traceback
from typing import Any

import pytest
import torch
from optim_db import OPTIMIZER_DB, OptimizerInfo, OptimizerInput, all_inputs, input_id
from test_conformance import Problem, build
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import hyperoptim

#: The closure styles: one that returns the loss (a second-order method takes its exact route) and
#: one that calls ``backward()`` itself (the finite-difference route).
ROUTES = ("exact", "finite_difference")

#: The most host synchronisations one steady-state step of any row of the class may make, per
#: route in :data:`ROUTES` order. Each number is what the class made when the test was written:
#: a ceiling may only go down.
CEILINGS: dict[str, tuple[int, int]] = {
    # One .tolist() of the guard's scalars and the hypergradients together (methods/hd.py).
    "HypergradSGD": (1, 1),
    "HypergradAdam": (1, 1),
    "HypergradAdamW": (1, 1),
    # The guard's verdict and the hypergradients' .cpu().tolist(); the finite-difference route
    # adds, per product, one .tolist() of its step sizes and one of its kink verdicts (hvp/).
    "MartheSGD": (2, 4),
    "MartheAdam": (2, 4),
    "MartheAdamW": (2, 4),
    # The guard's verdict and the hyper-update's read-back; finite differences per Neumann term.
    "IFTOptimizer": (2, 10),
    "IFTAdam": (2, 6),
    "IFTAdamW": (2, 6),
    # The guard's verdict, and at an episode's end the hypergradients; finite differences: the
    # step sizes' .tolist() and one .tolist() of every column's kink verdict. FDSSGD: one more
    # at an episode's end whose far step reads the curvature (methods/fds_outer.py
    # _stable_rate, the largest eigenvalue's one read; raised from (2, 4) with it: it decides a
    # step of up to two decades, once per episode at most, never per inner step).
    "FDSSGD": (3, 5),
    "FDSAdam": (2, 4),
    "FDSAdamW": (2, 4),
}

#: Torch functions that always hand a value to the host.
_ALWAYS = frozenset({
    "item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__",
    "__format__", "__array__", "numpy", "cpu", "equal", "allclose", "is_nonzero",
    # Data-dependent output shapes: the host must learn the size before it can allocate.
    "nonzero", "argwhere", "masked_select", "unique",
})

_PACKAGE = str(pathlib.Path(hyperoptim.__file__).parent)
_TORCH = str(pathlib.Path(torch.__file__).parent)
WARMUP = 2


def _to_host(args: tuple, kwargs: dict) -> bool:
    """``Tensor.to("cpu")``: a copy to the host on CUDA.

    Only a device named by a string counts: a ``torch.device`` usually comes from another
    tensor's ``.device`` (the package moves its scalars to the loss's device), which on CUDA is
    the same device, and on this CPU run cannot be told apart from the host.
    """
    targets = list(args[1:]) + [kwargs.get("device")]
    return any(isinstance(a, str) and torch.device(a).type == "cpu" for a in targets)


def _is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _ALWAYS:
        return True
    if name == "to":
        return _to_host(args, kwargs)
    if name == "__getitem__":  # boolean-mask indexing has a data-dependent shape
        index = args[1] if len(args) > 1 else None
        indices = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    if name == "tensor":  # torch.tensor reads tensors in its data element by element
        return _holds_tensors(args[0] if args else kwargs.get("data"))
    return False


def _holds_tensors(data: Any) -> bool:
    """Does ``torch.tensor``'s data (possibly nested lists) hold a tensor to read?"""
    if isinstance(data, (list, tuple)):
        return any(_holds_tensors(d) for d in data)
    return isinstance(data, torch.Tensor)


#: Package functions whose conversions read tensors that live on the host in a CUDA run too.
HOST_SITES = {
    "mark_after": "compares random-number states, which torch keeps on the host",
}


def _step_counts(opt: torch.optim.Optimizer) -> set[int]:
    """Ids of the ``state["step"]`` tensors of ``opt`` and of the optimizers it holds (IFT's
    hyper optimizer): torch keeps them on the host, and reads them with ``.item()``."""
    optimizers = [opt] + [v for v in vars(opt).values() if isinstance(v, torch.optim.Optimizer)]
    return {id(s["step"]) for o in optimizers for s in o.state.values()
            if isinstance(s, dict) and isinstance(s.get("step"), torch.Tensor)}


def _site() -> str:
    """The innermost frame of the package on the stack, as ``path:line (function)``."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(_PACKAGE):
            rel = pathlib.Path(frame.filename).relative_to(pathlib.Path(_PACKAGE).parent)
            return f"{rel}:{frame.lineno} ({frame.name})"
    return "<outside the package>"


def _caller() -> tuple[str, int]:
    """The line that made the intercepted call (the innermost frame outside torch and the mode)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH):
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame else ("", 0)


class HostSyncCounter(TorchFunctionMode):
    """Counts tensor-to-host conversions, keyed by ``(function name, call site)``.

    Python-level conversions are seen as torch functions; a dispatch mode inside it also sees
    ``aten._local_scalar_dense``, the read behind every ``.item()``, which catches the ones made
    in C++ argument parsing (a 0-dim tensor passed as ``alpha=``, ``torch.full(size, t)``)
    unless a counted Python-level conversion is already running.

    Args:
        on_host: ids of tensors that live on the host even in a CUDA run (torch's and the
            package's ``state["step"]`` counts); reading them, or a tensor that ``torch.tensor``
            made from Python numbers during the count, or anything in :data:`HOST_SITES`, costs
            no sync, so those are tallied apart in ``free``.
    """

    def __init__(self, on_host: set[int] | None = None) -> None:
        super().__init__()
        self.on_host = set(on_host or ())
        self.sites: collections.Counter[tuple[str, str]] = collections.Counter()
        self.free: collections.Counter[tuple[str, str]] = collections.Counter()
        self._copied: set[tuple[int, tuple[str, int]]] = set()
        self._busy = False
        self._reads = _ScalarReads(self)

    def __enter__(self) -> HostSyncCounter:
        super().__enter__()
        self._reads.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._reads.__exit__(*exc)
        super().__exit__(*exc)

    def tally(self, name: str, tensor: Any, line: tuple[str, int]) -> None:
        site = _site()
        free = (id(tensor) in self.on_host or (id(tensor), line) in self._copied
                or site.split("(")[-1][:-1] in HOST_SITES)
        (self.free if free else self.sites)[(name, site)] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        line = _caller()
        sync = _is_sync(name, args, kwargs)
        if sync:
            self.tally(name, args[0] if args else None, line)
        busy, self._busy = self._busy, self._busy or sync
        try:
            out = func(*args, **kwargs)
        finally:
            self._busy = busy
        if isinstance(out, torch.Tensor):
            if name == "tensor" and kwargs.get("device") is None:
                self.on_host.add(id(out))  # made on the host from Python numbers
            elif name == "cpu" or (name == "to" and _to_host(args, kwargs)):
                # A read of the copy on the same line (``.cpu().tolist()``) is free, as on CUDA;
                # on the CPU the copy is the tensor itself, so nothing wider can be exempted.
                self._copied.add((id(out), line))
        return out

    @property
    def count(self) -> int:
        return sum(self.sites.values())


class _ScalarReads(TorchDispatchMode):
    """The dispatcher-level half of :class:`HostSyncCounter`."""

    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func is torch.ops.aten._local_scalar_dense.default and not self.counter._busy:
            self.counter.tally("_local_scalar_dense", args[0], _caller())
        return func(*args, **(kwargs or {}))


def measure(info: OptimizerInfo, inp: OptimizerInput, backward: bool
            ) -> tuple[int, collections.Counter]:
    """The worst steady-state step of one row: its sync count and where they happen.

    ``backward``: the closure calls ``backward()`` (the finite-difference route of a second-order
    method) or returns the loss (the exact route).
    """
    prob = Problem()
    opt = build(info, inp, prob)
    closure = prob.closure if backward else (lambda opt, t: prob.loss_closure(t))
    # FDS: its second episode, hyperstep included; every other method repeats the same step.
    warmup, measured = ((opt.horizon, opt.horizon) if hasattr(opt, "horizon") else (WARMUP, 1))
    for t in range(warmup):
        info.step(opt, closure(opt, t), t)
    worst = (-1, collections.Counter())
    for t in range(warmup, warmup + measured):
        with HostSyncCounter(_step_counts(opt)) as counter:
            info.step(opt, closure(opt, t), t)
        if counter.count > worst[0]:
            worst = (counter.count, counter.sites)
    return worst


def test_counter_sees_every_kind_of_sync():
    x = torch.tensor([1.5, -2.0])
    s = torch.tensor(2)
    step = torch.tensor(3.0)  # a step count, on the host in a CUDA run too

    def toy() -> None:
        x.sum().item()  # 1
        x.tolist()  # 2
        if x[0] > 0:  # 3: __bool__
            float(s)  # 4
        [0, 1, 2][s]  # 5: __index__
        x[x > 0]  # 6: boolean mask
        x.to("cpu")  # 7
        torch.equal(x, x)  # 8
        f"{s:d}"  # 9: __format__
        x.cpu().tolist()  # 10: one copy to the host, then a read of the host's copy
        float(step)  # free
        float(torch.tensor(4.0))  # free: made on the host from a Python number
        x.to(torch.float64)  # no host copy
        torch.add(x, x, alpha=s)  # 11: read in C++ argument parsing
        torch.add(x, x, alpha=2.0)  # no tensor handed back to the host
        torch.where(x > 0, x, -x).sum()  # stays on the device

    with HostSyncCounter({id(step)}) as counter:
        toy()
    assert counter.count == 11
    assert {name for name, _ in counter.sites} == {
        "item", "tolist", "__bool__", "__float__", "__index__", "__getitem__", "to", "equal",
        "__format__", "cpu", "_local_scalar_dense"}
    assert sum(counter.free.values()) == 3  # the two floats and the tolist of x.cpu()


@pytest.mark.parametrize("route", ["exact", "finite_difference"])
@pytest.mark.parametrize("pair", all_inputs(), ids=input_id)
def test_host_syncs_per_step_within_ceiling(pair, route):
    info, inp = pair
    count, sites = measure(info, inp, backward=route == "finite_difference")
    ceiling = CEILINGS[info.name][ROUTES.index(route)]
    assert count <= ceiling, (
        f"{info.name} ({inp.desc}, {route}) makes {count} host syncs per step, ceiling "
        f"{ceiling}:\n" + "\n".join(f"  x{c} {name} at {site}"
                                     for (name, site), c in sites.most_common()))


def test_every_class_has_a_ceiling():
    assert {info.name for info in OPTIMIZER_DB} == set(CEILINGS)


def report(out: Any = sys.stdout) -> None:
    """Print each row's worst step on both routes and its call sites."""
    for info, inp in all_inputs():
        for route in ROUTES:
            count, sites = measure(info, inp, backward=route == "finite_difference")
            print(f"{info.name:14s} {inp.desc:30s} {route:17s} {count:3d}", file=out)
            for (name, site), c in sites.most_common():
                print(f"    x{c} {name:10s} {site}", file=out)


if __name__ == "__main__":
    report()
