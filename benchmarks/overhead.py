"""Per-step time of each hyperoptim optimizer relative to ``torch.optim.SGD``.

Each case is a full training step (forward, backward, optimizer step, and whatever validation work
the method does) on the same model and the same batches as the SGD baseline. Cases run
interleaved in one process: every repeat times a block of steps of each case in turn, and the
reported ratio is median(case block time) / median(SGD block time). Absolute times on shared
machines drift; the ratio is what to compare.

Run:
    python benchmarks/overhead.py                 # small and medium MLP, all cases
    python benchmarks/overhead.py --repeats 11 --steps 30 --threads 1

The Adam-family rows also report their ratio to ``torch.optim.Adam`` (``AdamW`` for the AdamW
rows, ``foreach=False`` as the hyperoptim classes step one tensor at a time).

To add an optimizer: write a ``make_<name>(model, data) -> step(t)`` factory below and add it
to ``CASES``.

Second-order methods run on both HVP routes: ``exact`` (the closure returns the loss; double
backward) and ``finite_difference`` (the closure calls ``backward()``; two extra gradient
evaluations per tangent column). Each has a *floor*: the passes that route cannot avoid, timed
alone with no optimizer logic (``FLOORS``): for MARTHE on the exact route one training backward
that keeps its graph, one HVP and one validation gradient; on the finite-difference route the
training gradient, two more gradient evaluations and one validation gradient. ``time / floor`` is
the optimizer's own overhead.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

import hyperoptim
from hyperoptim.hvp import hvp_from_grads

Step = Callable[[int], object]


class Data:
    """Fixed random classification batches (training and validation, same size)."""

    def __init__(self, n_in: int, n_out: int, batch: int, n_batches: int = 8, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.train = [
            (torch.randn(batch, n_in, generator=gen), torch.randint(n_out, (batch,), generator=gen))
            for _ in range(n_batches)
        ]
        self.val = (torch.randn(batch, n_in, generator=gen),
                    torch.randint(n_out, (batch,), generator=gen))

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train[t % len(self.train)]


def mlp(sizes: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _closure(model: nn.Module, opt: torch.optim.Optimizer, data: Data, t: int):
    def closure() -> torch.Tensor:
        x, y = data.batch(t)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _loss_closure(model: nn.Module, data: Data, t: int):
    """The closure style of the exact route: it returns the loss and calls no backward()."""
    def closure() -> torch.Tensor:
        x, y = data.batch(t)
        return F.cross_entropy(model(x), y)

    return closure


def _val_closure(model: nn.Module, data: Data):
    def val_closure() -> torch.Tensor:
        x, y = data.val
        return F.cross_entropy(model(x), y)

    return val_closure


def make_sgd(model: nn.Module, data: Data) -> Step:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return lambda t: opt.step(_closure(model, opt, data, t))


def make_hd_train(model: nn.Module, data: Data) -> Step:
    opt = hyperoptim.HypergradSGD(model.parameters(), lr=0.01, momentum=0.9, hypergrad_lr=1e-4)
    return lambda t: opt.step(_closure(model, opt, data, t))


def make_hd_val(model: nn.Module, data: Data) -> Step:
    opt = hyperoptim.HypergradSGD(model.parameters(), lr=0.01, momentum=0.9, hypergrad_lr=1e-4,
                                  val_closure=_val_closure(model, data))
    return lambda t: opt.step(_closure(model, opt, data, t))


def make_ift(route: str) -> Callable[[nn.Module, Data], Step]:
    def make(model: nn.Module, data: Data) -> Step:
        opt = hyperoptim.IFTOptimizer(model.parameters(), lr=0.01, momentum=0.9,
                                      weight_decay=1e-4, update_interval=10, lookback=5,
                                      val_closure=_val_closure(model, data), hvp=route)
        return lambda t: opt.step(_make_closure(route, model, opt, data, t))

    return make


def _make_closure(route: str, model: nn.Module, opt: torch.optim.Optimizer, data: Data, t: int):
    return _loss_closure(model, data, t) if route == "exact" else _closure(model, opt, data, t)


FDS_HORIZON, FDS_LR_WINDOWS = 50, 5


def make_fds(route: str) -> Callable[[nn.Module, Data], Step]:
    # Episodes of 50 steps, 5 lr + 1 momentum + 1 weight decay values (up to 7 tangent columns);
    # the hyperstep at each episode's end is part of the measured time. Small outer steps keep
    # the values near SGD's, as the weights are not re-initialised between episodes here.
    def make(model: nn.Module, data: Data) -> Step:
        opt = hyperoptim.FDSSGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4,
                                horizon=FDS_HORIZON, lr_windows=FDS_LR_WINDOWS,
                                val_closure=_val_closure(model, data), hvp=route,
                                step_sizes={"lr": 1e-3, "momentum": 1e-3, "weight_decay": 1e-5})

        def step(t: int) -> object:
            loss = opt.step(_make_closure(route, model, opt, data, t))
            if opt.episode_step == opt.horizon:
                opt.hyperstep()
            return loss

        return step

    return make


def make_marthe(mu: str | float, route: str) -> Callable[[nn.Module, Data], Step]:
    def make(model: nn.Module, data: Data) -> Step:
        # A fixed hyper-step of 0: every step does all of MARTHE's work (validation gradient,
        # HVP, tangents, mu), but the random labels here cannot drive the learning rate into
        # divergence and skipped steps, which would time the guard instead of the method.
        opt = hyperoptim.MartheSGD(model.parameters(), lr=0.01, momentum=0.9, mu=mu,
                                   hypergrad_lr=0.0, adapt_hypergrad_lr=False,
                                   val_closure=_val_closure(model, data), hvp=route)
        return lambda t: opt.step(_make_closure(route, model, opt, data, t))

    return make


# ---------------------------------------------------------------------- floors
def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _val_grad(model: nn.Module, data: Data) -> None:
    x, y = data.val
    torch.autograd.grad(F.cross_entropy(model(x), y), _params(model))


def _second_order_passes(model: nn.Module, data: Data, t: int, columns: int, route: str) -> None:
    """A training gradient and ``columns`` Hessian-vector products by ``route``, nothing else."""
    params = _params(model)
    x, y = data.batch(t)
    if route == "exact":
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        if columns:
            vectors = [torch.randn(columns, *p.shape) for p in params]
            hvp_from_grads(grads, params, vectors)
    else:
        torch.autograd.grad(F.cross_entropy(model(x), y), params)
        for _ in range(2 * columns):  # central differences: two gradients per column
            torch.autograd.grad(F.cross_entropy(model(x), y), params)


def floor_sgd_val(model: nn.Module, data: Data) -> Step:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(t: int) -> object:
        loss = opt.step(_closure(model, opt, data, t))
        _val_grad(model, data)
        return loss

    return step


def floor_marthe(route: str) -> Callable[[nn.Module, Data], Step]:
    def make(model: nn.Module, data: Data) -> Step:
        def step(t: int) -> object:
            _second_order_passes(model, data, t, 1, route)
            _val_grad(model, data)
            return None

        return step

    return make


def floor_ift(route: str) -> Callable[[nn.Module, Data], Step]:
    def make(model: nn.Module, data: Data) -> Step:
        def step(t: int) -> object:
            if t % 10:
                return _second_order_passes(model, data, t, 0, "finite_difference")
            _second_order_passes(model, data, t, 4, route)  # lookback 5: 4 products
            _val_grad(model, data)
            return None

        return step

    return make


def floor_fds(route: str) -> Callable[[nn.Module, Data], Step]:
    starts = [0, 0] + [k * FDS_HORIZON // FDS_LR_WINDOWS for k in range(FDS_LR_WINDOWS)]

    def make(model: nn.Module, data: Data) -> Step:
        def step(t: int) -> object:
            s = t % FDS_HORIZON
            _second_order_passes(model, data, t, sum(k < s for k in starts), route)
            if s == FDS_HORIZON - 1:
                _val_grad(model, data)
            return None

        return step

    return make


def make_adam(decoupled: bool) -> Callable[[nn.Module, Data], Step]:
    def make(model: nn.Module, data: Data) -> Step:
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        opt = cls(model.parameters(), lr=1e-3, weight_decay=1e-2 if decoupled else 0.0,
                  foreach=False)
        return lambda t: opt.step(_closure(model, opt, data, t))

    return make


def make_hd_adam(decoupled: bool, validation: bool) -> Callable[[nn.Module, Data], Step]:
    def make(model: nn.Module, data: Data) -> Step:
        cls = hyperoptim.HypergradAdamW if decoupled else hyperoptim.HypergradAdam
        opt = cls(model.parameters(), lr=1e-3, hypergrad_lr=1e-7,
                  val_closure=_val_closure(model, data) if validation else None)
        return lambda t: opt.step(_closure(model, opt, data, t))

    return make


def make_marthe_adam(mu: str | float, decoupled: bool = False) -> Callable[[nn.Module, Data], Step]:
    def make(model: nn.Module, data: Data) -> Step:
        cls = hyperoptim.MartheAdamW if decoupled else hyperoptim.MartheAdam
        opt = cls(model.parameters(), lr=1e-3, mu=mu, hypergrad_lr=0.0,  # as make_marthe
                  adapt_hypergrad_lr=False, val_closure=_val_closure(model, data))
        return lambda t: opt.step(_closure(model, opt, data, t))

    return make


def make_ift_adam(decoupled: bool, route: str = "exact") -> Callable[[nn.Module, Data], Step]:
    def make(model: nn.Module, data: Data) -> Step:
        cls = hyperoptim.IFTAdamW if decoupled else hyperoptim.IFTAdam
        opt = cls(model.parameters(), lr=1e-3, weight_decay=1e-2 if decoupled else 1e-4,
                  update_interval=10, lookback=5, val_closure=_val_closure(model, data), hvp=route)
        return lambda t: opt.step(_make_closure(route, model, opt, data, t))

    return make


def make_fds_adam(decoupled: bool) -> Callable[[nn.Module, Data], Step]:
    # As make_fds: episodes of 50 steps, here 5 lr + 1 weight decay values (up to 6 columns),
    # exact HVP route, small outer steps; the hyperstep is part of the measured time.
    def make(model: nn.Module, data: Data) -> Step:
        cls = hyperoptim.FDSAdamW if decoupled else hyperoptim.FDSAdam
        opt = cls(model.parameters(), lr=1e-3, weight_decay=1e-2 if decoupled else 1e-4,
                  horizon=FDS_HORIZON, lr_windows=FDS_LR_WINDOWS,
                  val_closure=_val_closure(model, data),
                  step_sizes={"lr": 1e-5, "weight_decay": 1e-5})

        def step(t: int) -> object:
            loss = opt.step(_loss_closure(model, data, t))
            if opt.episode_step == opt.horizon:
                opt.hyperstep()
            return loss

        return step

    return make


CASES: dict[str, Callable[[nn.Module, Data], Step]] = {
    "torch.optim.SGD": make_sgd,
    "HypergradSGD (training loss)": make_hd_train,
    "HypergradSGD (validation)": make_hd_val,
}
for _route, _tag in (("exact", "exact"), ("finite_difference", "fin. diff.")):
    CASES.update({
        f"MartheSGD (adaptive mu, {_tag})": make_marthe("adaptive", _route),
        f"MartheSGD (mu=1, {_tag})": make_marthe(1.0, _route),
        f"IFTOptimizer (T=10, i=5, {_tag})": make_ift(_route),
        f"FDSSGD (T=50, 7 columns, {_tag})": make_fds(_route),
    })
CASES["MartheSGD (mu=0, no HVP)"] = make_marthe(0.0, "exact")
CASES.update({
    "torch.optim.Adam": make_adam(False),
    "torch.optim.AdamW": make_adam(True),
    "HypergradAdam (training loss)": make_hd_adam(False, False),
    "HypergradAdam (validation)": make_hd_adam(False, True),
    "HypergradAdamW (training loss)": make_hd_adam(True, False),
    "MartheAdam (adaptive mu)": make_marthe_adam("adaptive"),
    "MartheAdam (mu=1, HVP every step)": make_marthe_adam(1.0),
    "MartheAdamW (mu=1, HVP every step)": make_marthe_adam(1.0, decoupled=True),
    "IFTAdam (T=10, i=5, exact)": make_ift_adam(False),
    "IFTAdamW (T=10, i=5, exact)": make_ift_adam(True),
    "FDSAdam (T=50, 6 columns, exact)": make_fds_adam(False),
    "FDSAdamW (T=50, 6 columns, exact)": make_fds_adam(True),
})

# The passes each case cannot avoid, timed alone (case name -> floor name).
FLOORS: dict[str, tuple[str, Callable[[nn.Module, Data], Step]]] = {
    "HypergradSGD (validation)": ("SGD step + validation gradient", floor_sgd_val),
}
for _route, _tag in (("exact", "exact"), ("finite_difference", "fin. diff.")):
    FLOORS[f"MartheSGD (mu=1, {_tag})"] = (f"1 HVP + val. grad ({_tag})", floor_marthe(_route))
    FLOORS[f"MartheSGD (adaptive mu, {_tag})"] = FLOORS[f"MartheSGD (mu=1, {_tag})"]
    FLOORS[f"IFTOptimizer (T=10, i=5, {_tag})"] = (f"IFT passes ({_tag})", floor_ift(_route))
    FLOORS[f"FDSSGD (T=50, 7 columns, {_tag})"] = (f"FDS passes ({_tag})", floor_fds(_route))
for _name in ("IFTAdam (T=10, i=5, exact)", "IFTAdamW (T=10, i=5, exact)"):
    FLOORS[_name] = ("IFT passes (exact)", floor_ift("exact"))

#: Cases whose ratio is also reported against torch.optim.Adam (AdamW for the AdamW rows).
ADAM_BASELINE = {name: ("torch.optim.AdamW" if "AdamW" in name else "torch.optim.Adam")
                 for name in CASES if "Adam" in name and not name.startswith("torch")}

MODELS = {
    "small MLP 64-128-10, batch 128": ([64, 128, 10], 128),
    "medium MLP 784-512-512-10, batch 128": ([784, 512, 512, 10], 128),
}


def measure(sizes: list[int], batch: int, repeats: int, steps: int, only: list[str] | None
            ) -> dict[str, float]:
    """Median block time per case divided by SGD's, cases interleaved in every repeat."""
    torch.manual_seed(0)
    base = mlp(sizes)
    data = Data(sizes[0], sizes[-1], batch)
    keep = {"torch.optim.SGD"} | {ADAM_BASELINE[n] for n in (only or []) if n in ADAM_BASELINE}
    names = [n for n in CASES if only is None or n in keep or n in only]
    steppers = {n: CASES[n](copy.deepcopy(base), data) for n in names}
    for n in names:
        if n in FLOORS:
            floor_name, make = FLOORS[n]
            if floor_name not in steppers:
                steppers[floor_name] = make(copy.deepcopy(base), data)
    times: dict[str, list[float]] = {n: [] for n in steppers}
    t = {n: 0 for n in steppers}
    for n in steppers:  # warm-up
        for _ in range(3):
            steppers[n](t[n])
            t[n] += 1
    for _ in range(repeats):
        for n in steppers:
            start = time.perf_counter()
            for _ in range(steps):
                steppers[n](t[n])
                t[n] += 1
            times[n].append(time.perf_counter() - start)
    ref = statistics.median(times["torch.optim.SGD"])
    ratios = {n: statistics.median(times[n]) / ref for n in steppers}
    for n, base in ADAM_BASELINE.items():
        if n in times and base in times:
            ratios[f"_vs_adam/{n}"] = statistics.median(times[n]) / statistics.median(times[base])
    return ratios | {"_sgd_ms_per_step": 1000 * ref / steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=50,
                        help="steps per timed block (50: one FDS episode, 5 IFT hyper-updates)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--only", nargs="*", help="case names to run (SGD always runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for model_name, (sizes, batch) in MODELS.items():
        ratios = measure(sizes, batch, args.repeats, args.steps, args.only)
        sgd_ms = ratios.pop("_sgd_ms_per_step")
        print(f"\n{model_name}  (SGD: {sgd_ms:.3f} ms/step, {args.threads} thread(s), "
              f"median of {args.repeats} x {args.steps} steps)")
        print(f"{'optimizer':<44} {'time / SGD':>10} {'floor / SGD':>11} {'time / floor':>12}"
              f" {'time / Adam(W)':>15}")
        for name, ratio in ratios.items():
            if name not in CASES:
                continue
            floor = ratios.get(FLOORS[name][0]) if name in FLOORS else None
            vs = ratios.get(f"_vs_adam/{name}")
            extra = f" {floor:>10.2f}x {ratio / floor:>11.2f}x" if floor else " " * 24
            extra += f" {vs:>14.2f}x" if vs is not None else ""
            print(f"{name:<44} {ratio:>10.2f}x{extra.rstrip()}")


if __name__ == "__main__":
    main()
