"""FDSSGD's cost as the number of tangent columns N and the horizon T grow.

Five measurements, each printed as a table:

1. **Per-step time** of a full training step (forward, backward, optimizer) for N = 1, 3, 9, 27
   learning-rate columns, relative to ``torch.optim.SGD`` on the same model and batches:
   FDSSGD (one batched Hessian-vector product over all columns) against the official
   implementation's approach (polo5/FDS ``main.py``: one double-backward HVP per column in a
   Python loop, the tangent update in stacked tensor ops). Both are timed in the last window of an
   episode, where all N columns are in use (FDSSGD is restored there from a checkpoint taken once,
   which also exercises exact mid-episode resuming). Cases are interleaved in every repeat; the
   ratios are medians of block times.
2. **Hessian-vector product routes** for N columns: the batched double backward FDSSGD uses
   (``hvp_from_grads``, works with any user closure), the functional forward-over-reverse route
   (``grad_and_hvp`` on ``torch.func.functional_call``, applies only when the loss is a function
   of a parameter dict), and the per-column loop; time relative to the batched double backward.
3. **The tangent update** of one step with learning rate, momentum and weight decay tuned:
   ``sgd_tangents`` (``torch.func.jvp`` of the rule batched with ``vmap`` over every column), the
   generic FDS method's (``RuleFDS._group_step``: ``rule_tangents`` of the SGD rule, any rule's
   route) and FDSSGD's fast path (the rule applied to the tangents by linearity, elementwise over the columns,
   plus the hyperparameters' own terms; the momentum's by ``jvp`` on one flat vector), in ms.
4. **Memory as the horizon grows**: bytes held by FDSSGD (its state: tangents Z, C and the momentum
   buffer, peak over the episode, plus the largest autograd graph one step keeps for its HVP)
   against the exact reverse-mode unroll (``hyperoptim.reference.unrolled_hypergrad``: the tensors
   its graph saves for backward, counted with ``saved_tensors_hooks``), float64 on the same MLP.

5. **A recurrent model**: an FDSSGD step on ``benchmarks/versus.py``'s character LSTM against an
   SGD step, on the exact route batched, looped and ``hvp_columns="auto"``, and on the
   finite-difference route, in thread CPU time (``--no-lstm`` skips it).

Run:
    python benchmarks/fds_scaling.py                      # a few minutes on 2 CPU cores
    python benchmarks/fds_scaling.py --repeats 9 --sizes 32x32 256x128 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hyperoptim.fds import FDSSGD
from hyperoptim.hvp import grad_and_hvp, hvp_from_grads
from hyperoptim.methods.fds import RuleFDS
from hyperoptim.reference import unrolled_hypergrad
from hyperoptim.rules.sgd import sgd_tangents

LR, MOMENTUM, WD = 0.05, 0.9, 5e-4


class Data:
    """Fixed random classification batches and a validation batch."""

    def __init__(self, n_in: int, n_out: int, batch: int, n_batches: int = 8, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        gen = torch.Generator().manual_seed(seed)
        self.train = [(torch.randn(batch, n_in, generator=gen, dtype=dtype),
                       torch.randint(n_out, (batch,), generator=gen)) for _ in range(n_batches)]
        self.val = (torch.randn(batch, n_in, generator=gen, dtype=dtype),
                    torch.randint(n_out, (batch,), generator=gen))

    def batch(self, t: int) -> tuple[Tensor, Tensor]:
        return self.train[t % len(self.train)]


def mlp(n_in: int, hidden: int, n_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, n_out))


# ------------------------------------------------------------------------- 1. per-step time
class PerColumnLoop:
    """The official implementation's inner step (polo5/FDS main.py, learning rates only): the HVP
    of each column by its own double backward, then Eq. 4 on stacked (N, *shape) tangents."""

    def __init__(self, model: nn.Module, n_columns: int, seed: int = 0):
        self.params = list(model.parameters())
        gen = torch.Generator().manual_seed(seed)
        self.z = [1e-3 * torch.randn((n_columns, *p.shape), generator=gen) for p in self.params]
        self.c = [1e-3 * torch.randn((n_columns, *p.shape), generator=gen) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.k = n_columns - 1  # the last window: every column is in use

    def step(self, loss: Tensor) -> None:
        grads = torch.autograd.grad(loss, self.params, create_graph=True)
        n = self.z[0].shape[0]
        hz = [torch.empty_like(z) for z in self.z]
        for j in range(n):
            col = torch.autograd.grad(grads, self.params, grad_outputs=[z[j] for z in self.z],
                                      retain_graph=j < n - 1)
            for h, c in zip(hz, col, strict=True):
                h[j] = c
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
                g = g.detach()
                z, c, v = self.z[i], self.c[i], self.v[i]
                b = -MOMENTUM * LR * c
                b[self.k] -= g + WD * p + MOMENTUM * v
                self.c[i] = MOMENTUM * c + hz[i] + WD * z
                self.z[i] = z * (1 - LR * WD) - LR * hz[i] + b
                self.v[i] = MOMENTUM * v + g + WD * p
                p.sub_(LR * self.v[i])


def per_step_times(n_columns: list[int], hidden: int, batch: int, repeats: int, steps: int
                   ) -> list[tuple[int, float, float, float, float]]:
    """(N, FDSSGD / SGD, loop / SGD, FDSSGD / loop, SGD ms per step) per N."""
    torch.manual_seed(0)
    data = Data(64, 10, batch)
    base = mlp(64, hidden, 10)
    rows = []
    for n in n_columns:
        window = steps + 1
        horizon = n * window

        # SGD
        sgd_model = copy.deepcopy(base)
        sgd = torch.optim.SGD(sgd_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)

        def sgd_block(t0: int, model: nn.Module = sgd_model, opt=sgd) -> None:
            for t in range(t0, t0 + steps):
                x, y = data.batch(t)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()

        # FDSSGD, restored at the second step of its last window (N columns in use)
        fds_model = copy.deepcopy(base)
        fds = FDSSGD(fds_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD,
                     horizon=horizon, lr_windows=n, tune=("lr",))

        def fds_closure(t: int, model=fds_model) -> Callable[[], Tensor]:
            # Returns the loss without backward(): the exact route (batched double backward),
            # what the loop below computes column by column.
            def closure() -> Tensor:
                x, y = data.batch(t)
                return F.cross_entropy(model(x), y)
            return closure

        start = horizon - window + 1
        for t in range(start):
            fds.step(fds_closure(t))
        checkpoint = (copy.deepcopy(fds.state_dict()), copy.deepcopy(fds_model.state_dict()))
        if fds.state[next(fds_model.parameters())]["fds_z"].shape[0] != n:
            raise RuntimeError("the timed steps must have all N columns in use")

        def fds_block(t0: int, model: nn.Module = fds_model, opt=fds, start: int = start,
                      checkpoint: tuple = checkpoint) -> float:
            opt.load_state_dict(checkpoint[0])
            model.load_state_dict(checkpoint[1])
            begin = time.perf_counter()
            for t in range(start, start + steps):
                opt.step(fds_closure(t))
            return time.perf_counter() - begin

        # the per-column loop
        loop_model = copy.deepcopy(base)
        loop = PerColumnLoop(loop_model, n)

        def loop_block(t0: int, model=loop_model, opt=loop) -> None:
            for t in range(t0, t0 + steps):
                x, y = data.batch(t)
                opt.step(F.cross_entropy(model(x), y))

        def timed(block: Callable[[int], None]) -> Callable[[int], float]:
            def run(t0: int) -> float:
                begin = time.perf_counter()
                block(t0)
                return time.perf_counter() - begin
            return run

        cases = {"sgd": timed(sgd_block), "fds": fds_block, "loop": timed(loop_block)}
        for case in cases.values():  # warm-up
            case(0)
        times: dict[str, list[float]] = {k: [] for k in cases}
        for r in range(repeats):
            for name, case in cases.items():
                times[name].append(case(r * steps))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((n, med["fds"] / med["sgd"], med["loop"] / med["sgd"], med["fds"] / med["loop"],
                     1000 * med["sgd"] / steps))
    return rows


# ------------------------------------------------------------------------- 2. HVP routes
def _interleaved_medians(cases: dict[str, Callable[[], object]], repeats: int, calls: int
                         ) -> dict[str, float]:
    """Median seconds per call of each case, the cases interleaved in every repeat (one warm-up)."""
    for case in cases.values():
        case()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            begin = time.perf_counter()
            for _ in range(calls):
                case()
            times[name].append((time.perf_counter() - begin) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def hvp_route_times(n_columns: list[int], hidden: int, batch: int, repeats: int
                    ) -> list[tuple[int, float, float]]:
    """(N, functional / batched double backward, loop / batched double backward) per N; each
    route computes the training gradient and H Z from scratch."""
    torch.manual_seed(0)
    data = Data(64, 10, batch)
    model = mlp(64, hidden, 10)
    params = dict(model.named_parameters())
    x, y = data.batch(0)

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    rows = []
    for n in n_columns:
        vecs = {k: torch.randn((n, *p.shape)) for k, p in params.items()}
        plist, vlist = list(params.values()), list(vecs.values())

        def batched(plist: list[Tensor] = plist, vlist: list[Tensor] = vlist) -> None:
            grads = torch.autograd.grad(loss_fn(params), plist, create_graph=True)
            hvp_from_grads(grads, plist, vlist)

        def functional(vecs: dict[str, Tensor] = vecs) -> None:
            grad_and_hvp(loss_fn, {k: p.detach() for k, p in params.items()}, vecs)

        def loop(plist: list[Tensor] = plist, vlist: list[Tensor] = vlist, n: int = n) -> None:
            grads = torch.autograd.grad(loss_fn(params), plist, create_graph=True)
            for j in range(n):
                torch.autograd.grad(grads, plist, grad_outputs=[v[j] for v in vlist],
                                    retain_graph=j < n - 1)

        med = _interleaved_medians({"batched": batched, "functional": functional, "loop": loop},
                                   repeats, calls=3)
        rows.append((n, med["functional"] / med["batched"], med["loop"] / med["batched"]))
    return rows


# ------------------------------------------------------------------------- 4. tangent update
def tangent_update_times(n_columns: list[int], hidden: int, repeats: int
                         ) -> list[tuple[int, float, float, float]]:
    """(columns, jvp+vmap ms, FDSSGD ms, generic ms) for the tangent update of one step, all
    three tuned.

    The jvp+vmap route is ``sgd_tangents`` on every column (the rule's JVP, batched with vmap);
    FDSSGD's is its ``_group_step`` (the rule applied to the tangents by linearity, plus the
    hyperparameters' own terms), which also applies the SGD step itself; the generic one is
    ``RuleFDS._group_step`` (``rule_tangents`` of the SGD rule, then its in-place step). Same
    random state.
    """
    torch.manual_seed(0)
    model = mlp(64, hidden, 10)
    params = list(model.parameters())
    hyper = [torch.tensor(v) for v in (LR, MOMENTUM, WD)]
    rows = []
    for n in n_columns:
        horizon = 1000 * n
        opt = FDSSGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD, horizon=horizon,
                     lr_windows=n)
        t = horizon - 500  # inside the last learning-rate window: N + 2 columns in use
        columns = opt._columns()
        width = sum(c[0] <= t for c in columns)
        index = {c[1:]: j for j, c in enumerate(columns[:width])}
        for p in params:
            p.grad = torch.randn_like(p)
            opt.state[p].update(fds_z=torch.randn((width, *p.shape)),
                                fds_c=torch.randn((width, *p.shape)),
                                momentum_buffer=torch.randn_like(p))
        hz = {p: torch.randn((width, *p.shape)) for p in params}
        group = opt.param_groups[0]
        bufs = [opt.state[p]["momentum_buffer"] for p in params]
        z = [opt.state[p]["fds_z"] for p in params]
        c = [opt.state[p]["fds_c"] for p in params]
        seeds = [torch.zeros(width) for _ in range(3)]
        for seed, name in zip(seeds, ("lr", "momentum", "weight_decay"), strict=True):
            seed[index[0, ("lr", "momentum", "weight_decay").index(name),
                       opt._window(group, name, t)]] = 1.0

        def jvp_route(z: list[Tensor] = z, c: list[Tensor] = c, seeds: list[Tensor] = seeds,
                      bufs: list[Tensor] = bufs, hz: dict = hz) -> None:
            sgd_tangents(params, [p.grad for p in params], bufs, *hyper, z,
                         [hz[p] for p in params], c, *seeds)

        def fds_route(opt: FDSSGD = opt, group: dict = group, t: int = t, width: int = width,
                      index: dict = index, hz: dict = hz) -> None:
            with torch.no_grad():
                opt._group_step(0, group, params, t, width, index, hz)

        def generic_route(opt: FDSSGD = opt, group: dict = group, t: int = t, width: int = width,
                          index: dict = index, hz: dict = hz) -> None:
            with torch.no_grad():
                RuleFDS._group_step(opt, 0, group, params, t, width, index, hz)

        med = _interleaved_medians({"jvp": jvp_route, "fds": fds_route, "generic": generic_route},
                                   repeats, calls=5)
        rows.append((width, 1000 * med["jvp"], 1000 * med["fds"], 1000 * med["generic"]))
    return rows


# ------------------------------------------------------------------------- 3. memory
class SavedBytes:
    """Peak bytes of the tensors autograd keeps for backward, counted while they are alive."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def pack(self, tensor: Tensor) -> object:
        counter = self

        class Box:
            def __init__(self) -> None:
                self.tensor, self.n = tensor, tensor.numel() * tensor.element_size()
                counter.live += self.n
                counter.peak = max(counter.peak, counter.live)

            def __del__(self) -> None:
                counter.live -= self.n

        return Box()


def memory_rows(horizons: list[int], hidden: int, batch: int, lr_windows: int
                ) -> list[tuple[int, int, int, int]]:
    """(T, FDSSGD state peak, FDSSGD largest per-step graph, unrolled oracle graph) in bytes."""
    torch.manual_seed(0)
    data = Data(64, 10, batch, dtype=torch.float64)
    base = mlp(64, hidden, 10).double()
    init = {k: v.detach().clone() for k, v in base.named_parameters()}

    def train_loss(p: dict[str, Tensor], t: int) -> Tensor:
        x, y = data.batch(t)
        return F.cross_entropy(torch.func.functional_call(base, p, (x,)), y)

    def val_loss(p: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(torch.func.functional_call(base, p, (data.val[0],)), data.val[1])

    rows = []
    for horizon in horizons:
        model = copy.deepcopy(base)
        opt = FDSSGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD,
                     horizon=horizon, lr_windows=min(lr_windows, horizon))
        state_peak = graph_peak = 0
        for t in range(horizon):
            saved = SavedBytes()
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda box: box.tensor):
                def closure(t: int = t, model: nn.Module = model) -> Tensor:
                    x, y = data.batch(t)
                    return F.cross_entropy(model(x), y)
                opt.step(closure)
            graph_peak = max(graph_peak, saved.peak)
            state_peak = max(state_peak, sum(v.numel() * v.element_size()
                                             for s in opt.state.values() for v in s.values()
                                             if torch.is_tensor(v)))
        saved = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda box: box.tensor):
            unrolled_hypergrad(train_loss, val_loss, init, horizon=horizon, lr=LR,
                               momentum=MOMENTUM, weight_decay=WD)
        rows.append((horizon, state_peak, graph_peak, saved.peak))
    return rows


# ------------------------------------------------------------------------- 5. a recurrent model
def lstm_step_times(repeats: int, steps: int, lr_windows: int = 5
                    ) -> list[tuple[str, float, float]]:
    """(route, FDSSGD step / SGD step, ms per FDSSGD step) on ``benchmarks/versus.py``'s
    character LSTM, every column in use (``lr_windows`` learning rates, momentum, weight
    decay), in thread CPU time; the ``auto`` row names the route its measurement chose."""
    from _versus_tasks import charlm  # benchmarks/ is on sys.path when run as a script

    task = charlm()
    batches = task.batches(0, 64)

    def batch(t: int) -> tuple[Tensor, Tensor]:
        idx = batches[t % len(batches)]
        return task.x_train[idx], task.y_train[idx]

    sgd_model = task.make_model(0)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)

    def sgd_block(t0: int) -> None:
        for t in range(t0, t0 + steps):
            x, y = batch(t)
            sgd.zero_grad()
            task.loss(sgd_model, x, y).backward()
            sgd.step()

    cases: dict[str, Callable[[int], None]] = {"SGD": sgd_block}
    chosen = {}
    for name, hvp, columns in (("exact, batched", "exact", "batched"),
                               ("exact, per-column loop", "exact", "loop"),
                               ("exact, auto", "exact", "auto"),
                               ("finite differences", "finite_difference", "batched")):
        model = task.make_model(0)
        horizon = 10 * lr_windows
        opt = FDSSGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD,
                     horizon=horizon, lr_windows=lr_windows, hvp=hvp, hvp_columns=columns,
                     val_closure=lambda m=model: task.loss(m, task.x_val, task.y_val))
        start = horizon - 9  # the last window: every column in use
        for t in range(start):
            opt.step(lambda t=t, m=model: task.loss(m, *batch(t)))
        checkpoint = (copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict()))
        if columns == "auto":
            chosen[name] = opt.hyper_state.get("loop_columns", {})

        def block(t0: int, opt=opt, model=model, checkpoint=checkpoint, start=start) -> None:
            opt.load_state_dict(checkpoint[0])
            model.load_state_dict(checkpoint[1])
            for t in range(start, start + min(steps, 8)):
                opt.step(lambda t=t, m=model: task.loss(m, *batch(t)))

        cases[name] = block
    for case in cases.values():  # warm-up
        case(0)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(repeats):
        for name, case in cases.items():
            begin = time.thread_time()
            case(r * steps)
            times[name].append(time.thread_time() - begin)
    per_step = {k: statistics.median(v) / (steps if k == "SGD" else min(steps, 8))
                for k, v in times.items()}
    rows = []
    for name in cases:
        label = name
        if name in chosen:
            picks = sorted({"loop" if v else "batched" for v in chosen[name].values()})
            label = f"{name} (chose {' and '.join(picks) or 'nothing'})"
        rows.append((label, per_step[name] / per_step["SGD"], 1000 * per_step[name]))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--sizes", type=str, nargs="+", default=["32x32", "128x128"],
                        help="MLP 64-h-h-10 width and batch size, as HIDDENxBATCH")
    parser.add_argument("--columns", type=int, nargs="+", default=[1, 3, 9, 27])
    parser.add_argument("--horizons", type=int, nargs="+", default=[10, 20, 40, 80])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--no-lstm", action="store_true",
                        help="skip table 5 (the character LSTM)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes]
    print(f"{args.threads} thread(s), median of {args.repeats} interleaved blocks of "
          f"{args.steps} steps; learning-rate columns only (as the official code loops)")

    for hidden, batch in sizes:
        n_params = sum(p.numel() for p in mlp(64, hidden, 10).parameters())
        name = f"MLP 64-{hidden}-{hidden}-10 ({n_params} weights), batch {batch}"
        rows = per_step_times(args.columns, hidden, batch, args.repeats, args.steps)
        print(f"\n1. Per-step time, {name} (SGD: {rows[0][4]:.2f} ms/step)")
        print(f"{'N columns':>10} {'FDSSGD / SGD':>14} {'loop / SGD':>12} {'FDSSGD / loop':>15}")
        for n, fds, loop, ratio, _ in rows:
            print(f"{n:>10} {fds:>13.2f}x {loop:>11.2f}x {ratio:>14.2f}x")

    for hidden, batch in sizes:
        rows = hvp_route_times(args.columns, hidden, batch, args.repeats)
        print(f"\n2. Gradient + H Z for N columns, MLP 64-{hidden}-{hidden}-10, batch {batch}; "
              "time relative to the batched double backward FDSSGD uses")
        print(f"{'N columns':>10} {'forward-over-reverse':>22} {'per-column loop':>17}")
        for n, functional, loop in rows:
            print(f"{n:>10} {functional:>21.2f}x {loop:>16.2f}x")

    for hidden, _ in sizes:
        rows = tangent_update_times(args.columns, hidden, args.repeats)
        print(f"\n3. Tangent update of one step, MLP 64-{hidden}-{hidden}-10, lr/momentum/weight "
              "decay tuned (ms)")
        print(f"{'columns':>10} {'sgd_tangents (jvp+vmap)':>24} {'generic (rule_tangents)':>24} "
              f"{'FDSSGD':>8} {'FDSSGD / jvp':>13} {'FDSSGD / generic':>17}")
        for width, jvp_ms, fds_ms, generic_ms in rows:
            print(f"{width:>10} {jvp_ms:>24.2f} {generic_ms:>24.2f} {fds_ms:>8.2f} "
                  f"{fds_ms / jvp_ms:>12.2f}x {fds_ms / generic_ms:>16.2f}x")

    if not args.no_lstm:
        rows = lstm_step_times(args.repeats, args.steps)
        print("\n5. FDSSGD step on benchmarks/versus.py's character LSTM (32-64, windows of 24, "
              "batch 32), 5 lr + momentum + weight decay columns in use, thread CPU time")
        print(f"{'route':>46} {'x SGD step':>11} {'ms/step':>9}")
        for label, ratio, ms in rows:
            print(f"{label:>46} {ratio:>10.2f}x {ms:>9.2f}")

    hidden, batch = sizes[0]
    rows = memory_rows(args.horizons, hidden, batch, lr_windows=5)
    print(f"\n4. Memory, MLP 64-{hidden}-{hidden}-10, batch {batch}, float64; FDSSGD tunes 5 lr + 1 "
          "momentum + 1 weight decay values (bytes)")
    print(f"{'horizon T':>10} {'FDSSGD state':>14} {'FDSSGD step graph':>18} "
          f"{'unrolled oracle graph':>22} {'oracle / FDSSGD':>16}")
    for horizon, state, graph, oracle in rows:
        print(f"{horizon:>10} {state:>14,} {graph:>18,} {oracle:>22,} "
              f"{oracle / (state + graph):>15.1f}x")


if __name__ == "__main__":
    main()
