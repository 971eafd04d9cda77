"""Second-order plumbing where users train: no global patch, threads, torch.compile, frozen
backbones, and atomic steps under injected failures (docs/design.md §2, §8)."""

from __future__ import annotations

import copy
import gc
import sys
import threading

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hyperoptim
import hyperoptim.core.closures as closures_module
import hyperoptim.hvp as hvp_module
from hyperoptim.hvp import SecondOrder

F64 = torch.float64


class Task:
    """A small regression with fixed batches; ``model`` may be replaced (compiled, wrapped)."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = F64):
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
        self.model: nn.Module = self.net
        gen = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(10, 16, 4, generator=gen, dtype=dtype)
        self.x, self.y = x, torch.tanh(x.sum(-1, keepdim=True))
        self.xv = torch.randn(32, 4, generator=gen, dtype=dtype)
        self.yv = torch.tanh(self.xv.sum(-1, keepdim=True))

    def val(self) -> torch.Tensor:
        return F.mse_loss(self.model(self.xv), self.yv)

    def closure(self, opt, t: int, backward: bool = True):
        def closure() -> torch.Tensor:
            loss = F.mse_loss(self.model(self.x[t % 10]), self.y[t % 10])
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss

        return closure


SECOND_ORDER = {
    "marthe": lambda p, v, **kw: hyperoptim.MartheSGD(p, lr=0.05, momentum=0.5, mu=1.0,
                                                      hyper_lr=1e-3,
                                                      adapt_hyper_lr=False,
                                                      val_closure=v, **kw),
    "ift": lambda p, v, **kw: hyperoptim.IFTOptimizer(p, lr=0.05, momentum=0.5, weight_decay=1e-3,
                                                      update_interval=2, lookback=3,
                                                      val_closure=v, **kw),
    "fds": lambda p, v, **kw: hyperoptim.FDSSGD(p, horizon=4, lr=0.05, momentum=0.5,
                                                lr_windows=2, val_closure=v, **kw),
}
ALL = dict(SECOND_ORDER, hd=lambda p, v, **kw: hyperoptim.HypergradSGD(
    p, lr=0.05, momentum=0.5, hyper_lr=0.01, val_closure=v))


def drive(name: str, opt, task: Task, start: int, n: int, backward: bool = True) -> None:
    for t in range(start, start + n):
        opt.step(task.closure(opt, t, backward))
        if name == "fds" and opt.episode_step == opt.horizon:
            opt.hyperstep()


def snapshot(opt, task: Task) -> dict:
    return {"params": [p.detach().clone() for p in task.net.parameters()],
            "state": copy.deepcopy(opt.state_dict())}


def assert_same(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, (path, a, b)


# ---------------------------------------------------------------------- no global patch
@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("backward", [False, True])
def test_the_closure_runs_with_torch_untouched(name, backward):
    task = Task()
    opt = ALL[name](task.net.parameters(), task.val)
    original = torch.Tensor.backward
    seen = []

    def spy_closure(t):
        inner = task.closure(opt, t, backward)

        def closure():
            seen.append(torch.Tensor.backward is original and torch.is_grad_enabled())
            return inner()

        return closure

    for t in range(6):
        opt.step(spy_closure(t))
        if name == "fds" and opt.episode_step == opt.horizon:
            opt.hyperstep()
    assert seen and all(seen)
    assert torch.Tensor.backward is original


# ---------------------------------------------------------------------- threads
@pytest.mark.parametrize("backward", [False, True])
def test_two_threads_give_the_sequential_results(backward):
    def build():
        return {name: Task(seed=i) for i, name in enumerate(SECOND_ORDER)}

    serial = build()
    opts = {n: SECOND_ORDER[n](t.net.parameters(), t.val) for n, t in serial.items()}
    for n, t in serial.items():
        drive(n, opts[n], t, 0, 12, backward)

    parallel = build()
    popts = {n: SECOND_ORDER[n](t.net.parameters(), t.val) for n, t in parallel.items()}
    errors: list[BaseException] = []

    def work(n):
        try:
            drive(n, popts[n], parallel[n], 0, 12, backward)
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(n,)) for n in parallel]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors and not any(th.is_alive() for th in threads)
    for n in serial:
        for a, b in zip(serial[n].net.parameters(), parallel[n].net.parameters()):
            assert torch.equal(a, b), n
        assert opts[n].param_groups[0]["lr"] == popts[n].param_groups[0]["lr"], n


@pytest.mark.parametrize("name", list(ALL))
def test_two_of_a_kind_in_two_threads(name):
    """Two optimizers of the same class in two threads (Optuna's study.optimize(n_jobs=2)) each
    get exactly the sequential result; FDSSGD's forward-mode AD levels are process-wide, and two
    FDSSGD used to fail with "no level exists"."""
    steps = 100 if name == "fds" else 24  # FDS: long enough for the old race to show

    def pair():
        tasks = [Task(seed=i) for i in range(2)]
        return tasks, [ALL[name](t.net.parameters(), t.val) for t in tasks]

    serial_tasks, serial = pair()
    for opt, task in zip(serial, serial_tasks):
        drive(name, opt, task, 0, steps, backward=False)
    tasks, opts = pair()
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(i):
        try:
            start.wait(timeout=60)
            drive(name, opts[i], tasks[i], 0, steps, backward=False)
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so that their steps interleave
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert not errors and not any(th.is_alive() for th in threads), errors
    for a_task, b_task in zip(serial_tasks, tasks):
        for a, b in zip(a_task.net.parameters(), b_task.net.parameters()):
            assert torch.equal(a, b)


def test_an_unrelated_backward_in_another_thread_is_untouched():
    task = Task()
    opt = SECOND_ORDER["marthe"](task.net.parameters(), task.val)
    other = nn.Linear(8, 8).double()
    sgd = torch.optim.SGD(other.parameters(), lr=0.01)
    stop = threading.Event()
    graphs, calls = [], [0]

    def plain_training():
        x = torch.randn(4, 8, dtype=F64)
        for _ in range(2000):  # bounded; stops early once the optimizer thread is done
            if stop.is_set():
                break
            sgd.zero_grad()
            other(x).pow(2).sum().backward()
            graphs.append(other.weight.grad.requires_grad or other.weight.grad.grad_fn is not None)
            sgd.step()
            calls[0] += 1

    th = threading.Thread(target=plain_training)
    th.start()
    try:
        for backward in (False, True):
            drive("marthe", opt, task, 0, 10, backward)
    finally:
        stop.set()
        th.join(timeout=60)
    assert calls[0] > 0 and not any(graphs)


# ---------------------------------------------------------------------- frozen backbone
def test_a_trainable_backbone_outside_the_optimizer_keeps_no_graph():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 32), nn.Tanh()).double()
    head = nn.Linear(32, 1).double()
    x, y = torch.randn(16, 4, dtype=F64), torch.randn(16, 1, dtype=F64)
    xv, yv = torch.randn(16, 4, dtype=F64), torch.randn(16, 1, dtype=F64)
    opt = hyperoptim.MartheSGD(head.parameters(), lr=0.05, mu=1.0,
                               val_closure=lambda: F.mse_loss(head(backbone(xv)), yv))
    backbone_opt = torch.optim.SGD(backbone.parameters(), lr=0.01)

    def closure():
        opt.zero_grad()
        backbone_opt.zero_grad()
        loss = F.mse_loss(head(backbone(x)), y)
        loss.backward()
        return loss

    def live_tensors() -> int:
        gc.collect()
        return sum(type(o) in (torch.Tensor, nn.Parameter) for o in gc.get_objects())

    counts = []
    for t in range(200):
        opt.step(closure)
        backbone_opt.step()
        for p in backbone.parameters():
            assert p.grad.grad_fn is None and not p.grad.requires_grad
        if t in (20, 199):
            counts.append(live_tensors())
    assert counts[1] <= counts[0] + 5, counts  # flat: nothing accumulates per step


# ---------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_a_compiled_model_trains_on_the_finite_difference_route(name):
    task = Task()
    task.model = torch.compile(task.net, backend="aot_eager")
    opt = SECOND_ORDER[name](task.net.parameters(), task.val)
    with torch.no_grad():
        before = task.val().item()
    drive(name, opt, task, 0, 12, backward=True)
    assert opt.hvp_route == "finite_difference"
    with torch.no_grad():
        assert task.val().item() < before
    # The exact route cannot differentiate a compiled graph twice, and says what to use.
    exact = SECOND_ORDER[name](task.net.parameters(), task.val, hvp="exact")
    with pytest.raises(ValueError, match="hvp='finite_difference'"):
        drive(name, exact, task, 0, 12, backward=False)


# ---------------------------------------------------------------------- atomic steps
class Boom(RuntimeError):
    pass


def _failing(fn, fail_on: int):
    """``fn`` that raises on its ``fail_on``-th call (1-based) and works otherwise."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_on:
            raise Boom(f"injected failure at call {fail_on}")
        return fn(*args, **kwargs)

    return wrapped, calls


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("backward", [False, True])
def test_a_failure_anywhere_in_a_step_changes_nothing(name, backward, monkeypatch):
    """Inject a failure at every closure call, every validation call, the HVP and the
    collectives of a step; after each, all state is as before, and the step then taken equals
    that of a twin that never failed."""
    task, twin = Task(), Task()
    opt = ALL[name](task.net.parameters(), task.val)
    ref = ALL[name](twin.net.parameters(), twin.val)
    # Mid-episode for FDS (tangents non-zero); IFT's step 3 (the 4th) is a hyper-update.
    start = 3
    drive(name, opt, task, 0, start, backward)
    drive(name, ref, twin, 0, start, backward)
    before = snapshot(opt, task)

    # How many closure, validation, HVP and collective calls does this step make?
    p_opt, p_task = copy.deepcopy((opt, task))
    counts = {"closure": 0, "val": 0, "hvp": 0, "collective": 0}

    def counting(kind, fn):
        def wrapped(*args, **kwargs):
            counts[kind] += 1
            return fn(*args, **kwargs)

        return wrapped

    with monkeypatch.context() as m:
        m.setattr(SecondOrder, "hvp", counting("hvp", SecondOrder.hvp))
        reduce = counting("collective", closures_module.all_reduce_mean)
        m.setattr(closures_module, "all_reduce_mean", reduce)
        m.setattr(hvp_module, "all_reduce_mean", reduce)
        p_opt.val_closure = counting("val", p_task.val)
        p_opt.step(counting("closure", p_task.closure(p_opt, start, backward)))
    assert counts["closure"] >= 1 and counts["collective"] >= 1
    if name != "hd":
        assert counts["hvp"] >= 1, counts
    injections = [(kind, k) for kind, n in counts.items() for k in range(1, n + 1)]
    ran = set()
    for where, k in injections:
        closure = task.closure(opt, start, backward)
        val = task.val
        with monkeypatch.context() as m:
            if where == "closure":
                closure, _ = _failing(closure, k)
            elif where == "val":
                val, _ = _failing(task.val, k)
            elif where == "hvp":
                m.setattr(SecondOrder, "hvp", _failing(SecondOrder.hvp, k)[0])
            else:
                # A collective that fails: our own seam, as if the process group broke.
                fail = _failing(closures_module.all_reduce_mean, k)[0]
                m.setattr(closures_module, "all_reduce_mean", fail)
                m.setattr(hvp_module, "all_reduce_mean", fail)
            opt.val_closure = val
            try:
                with pytest.raises(Boom):
                    opt.step(closure)
                ran.add(where)
            finally:
                opt.val_closure = task.val
        after = snapshot(opt, task)
        assert_same(before["params"], after["params"], f"{where}{k}:params")
        assert_same(before["state"], after["state"], f"{where}{k}:state")
    assert ran == {kind for kind, n in counts.items() if n}

    drive(name, opt, task, start, 2, backward)
    drive(name, ref, twin, start, 2, backward)
    assert_same(snapshot(ref, twin), snapshot(opt, task))


@pytest.mark.parametrize("backward", [False, True])
def test_a_failure_in_hyperstep_changes_nothing(backward):
    task = Task()
    opt = SECOND_ORDER["fds"](task.net.parameters(), task.val)
    drive("fds", opt, task, 0, 3, backward)
    opt.step(task.closure(opt, 3, backward))  # episode complete; hyperstep pending
    before = snapshot(opt, task)
    with pytest.raises(Boom):
        opt.hyperstep(_failing(task.val, 1)[0])
    assert_same(before, snapshot(opt, task))
    opt.hyperstep()
    assert opt.episode_step == 0
