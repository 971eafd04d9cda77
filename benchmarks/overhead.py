"""Per-step time of each hyperoptim optimizer relative to ``torch.optim.SGD``, Adam and its floor.

Each case is a full training step (forward, backward, optimizer step, and whatever validation work
the method does) on the same model and the same batches as the SGD baseline. Cases run
interleaved in one process: every repeat times a block of steps of each case in turn (the order
reversed on every other repeat, so no case always follows the same neighbour), and a ratio is
median(case block time) / median(baseline block time).

Every block is timed on two clocks: the thread's CPU time (``time.thread_time_ns``; with the
default ``--threads 1`` the whole step runs on the calling thread, autograd's CPU backward
included) and wall time. On a loaded machine wall time also counts the time other processes held
the core (floors came out slower than the steps that contain them); CPU time counts only the work
this thread did, so its ratios survive the load. With ``--threads`` above 1 the CPU clock is the
process's (``time.process_time_ns``), which counts torch's worker threads too.

Run:
    python benchmarks/overhead.py                          # small and medium MLP, all cases
    python benchmarks/overhead.py --before f3039ad         # the package at a git ref beside this one
    python benchmarks/overhead.py --before main --models small --only "MartheAdam (mu=1, exact)"
    python benchmarks/overhead.py --peers ~/src/hypergradient-descent   # with the peers' rows

``--before REF`` extracts the ``hyperoptim`` package at ``REF`` (``git archive``) into a temporary
folder, imports it under another module name in this same process, and times every case for both
versions, interleaved (the two versions of a case run next to each other in every repeat); the
tables print before and after side by side, with ``after / before`` the ratio of the two
versions' own median block times. A case the old package cannot build or step (a class or option
it lacks) prints ``n/a``, with the reason under the table. Baselines and floors use torch alone and
are timed once.

The Adam-family rows also report their ratio to ``torch.optim.Adam`` (``AdamW`` for the AdamW
rows, ``foreach=False`` as the hyperoptim classes step one tensor at a time).

To add an optimizer: write a ``make_<name>(hp, model, data) -> step(t)`` factory below (``hp`` is
the package under test: this checkout's or the ``--before`` one) and add it to ``CASES``.

Second-order methods run on both HVP routes: ``exact`` (the closure returns the loss; double
backward) and ``finite_difference`` (the closure calls ``backward()``; two extra gradient
evaluations per tangent column). The Adam family runs on the exact route only: on this ReLU MLP in
float32 the finite-difference route warns that its products are unreliable (kinks). Each has a
*floor*: the passes that route cannot avoid, timed alone with no optimizer logic (``FLOORS``): for
MARTHE on the exact route one training backward that keeps its graph, one HVP and one validation
gradient; on the finite-difference route the training gradient, two more gradient evaluations and
one validation gradient. ``x floor`` is the optimizer's own overhead.

Peers: other implementations of hypergradient descent, timed in the same run on the same model and
batches, are rows ``peer: ...`` reported like the cases (``x SGD``, ``x Adam``; ``n/a`` before, as
they are no part of the package ``--before`` swaps). They use torch alone and are timed once.

- ``--peers PATH``: Baydin et al.'s reference code, ``SGDHD`` and ``AdamHD`` from a checkout of
  github.com/gbaydin/hypergradient-descent (``PATH`` holds its ``hypergrad/`` folder; not on PyPI,
  whose ``hypergrad`` is another project). Each file is imported from its path under a private
  module name, so nothing else named ``hypergrad`` is shadowed. Configured as our training-loss
  rows: SGDHD with lr 0.01, momentum 0.9, hyper-step 1e-4; AdamHD with lr 1e-3, hyper-step 1e-7;
  ``weight_decay=0`` as in our rows. The code calls torch's deprecated ``add_(Number, Tensor)``
  overloads, which torch 2.13 still takes (one UserWarning per process), and keeps the learning
  rate as a 0-dim tensor once the first hyper-step has run.
  Without ``--peers`` the two rows are skipped with a printed line.
- gradient-descent-the-ultimate-optimizer (``pip install gradient-descent-the-ultimate-optimizer``,
  in the ``bench`` extra), Chandra et al.: ``SGD(alpha=0.01, mu=0.9, optimizer=SGD(1e-4))`` and
  ``AdamBaydin(alpha=1e-3, optimizer=SGD(1e-7))`` (Adam whose hyper-optimizer tunes the learning
  rate only, as HypergradAdam) in ``ModuleWrapper``, in the loop its README prescribes:
  ``begin()``, forward, ``zero_grad()``, ``backward(create_graph=True)``, ``step()``. Not quite the
  same step: its hypergradient comes from autograd through the previous update (the parameters are
  non-leaf tensors of the learning rate), ``create_graph=True`` makes every backward record a graph
  of itself (needed only by taller optimizer stacks), and its SGD also tunes the momentum (the
  hyper-SGD steps every entry of the optimizer's ``parameters``). Skipped with a printed line when
  the package is not installed.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parent.parent
# "After" is this checkout: run as a script, the folder on sys.path is benchmarks/, and the
# import would find whichever checkout the environment installed (another git worktree's).
sys.path.insert(0, str(REPO))

import hyperoptim  # noqa: E402

Step = Callable[[int], object]
BEFORE_MODULE = "hyperoptim_before"


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


#: ``make(hp, model, data) -> step``; ``hp`` is the hyperoptim package under test.
Factory = Callable[[ModuleType, nn.Module, Data], Step]


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


def _make_closure(route: str, model: nn.Module, opt: torch.optim.Optimizer, data: Data, t: int):
    return _loss_closure(model, data, t) if route == "exact" else _closure(model, opt, data, t)


def _knobs(hp: ModuleType, method: str, **kwargs: object) -> dict[str, object]:
    """``kwargs`` with the hyper-step knobs under the names ``hp`` takes: a ``--before`` package
    from before issue 18's rename (no ``core.options.renamed_options``) takes the old ones
    (``hypergrad_lr``, ``adapt_hypergrad_lr``, ``step_sizes``)."""
    options = getattr(getattr(hp, "core", None), "options", None)
    if options is not None and hasattr(options, "renamed_options"):
        return kwargs
    old = {new: old for old, new in hyperoptim.core.options.renamed_options(method).items()}
    return {old.get(name, name): value for name, value in kwargs.items()}


def _pinned(cls: type, **kwargs: object) -> dict[str, object]:
    """The options of ``kwargs`` that ``cls`` takes: they pin the algorithm a case times where a
    later default changed it (IFT's warm-up schedule, FDS's log-space outer step), and are left
    out for a ``--before`` package that predates them (it runs that algorithm anyway)."""
    names = inspect.signature(cls).parameters
    return {name: value for name, value in kwargs.items() if name in names}


def make_sgd(hp: ModuleType, model: nn.Module, data: Data) -> Step:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return lambda t: opt.step(_closure(model, opt, data, t))


def make_hd_train(hp: ModuleType, model: nn.Module, data: Data) -> Step:
    opt = hp.HypergradSGD(model.parameters(), lr=0.01, momentum=0.9,
                          **_knobs(hp, "hd", hyper_lr=1e-4))
    return lambda t: opt.step(_closure(model, opt, data, t))


def make_hd_val(hp: ModuleType, model: nn.Module, data: Data) -> Step:
    opt = hp.HypergradSGD(model.parameters(), lr=0.01, momentum=0.9,
                          val_closure=_val_closure(model, data), **_knobs(hp, "hd", hyper_lr=1e-4))
    return lambda t: opt.step(_closure(model, opt, data, t))


def make_ift(route: str) -> Factory:
    def make(hp: ModuleType, model: nn.Module, data: Data) -> Step:
        opt = hp.IFTOptimizer(model.parameters(), lr=0.01, momentum=0.9,
                              weight_decay=1e-4, update_interval=10, lookback=5,
                              val_closure=_val_closure(model, data), hvp=route,
                              **_pinned(hp.IFTOptimizer, update_schedule="fixed"))
        return lambda t: opt.step(_make_closure(route, model, opt, data, t))

    return make


FDS_HORIZON, FDS_LR_WINDOWS = 50, 5


def _episodes(opt: torch.optim.Optimizer, closure: Callable[[int], Callable]) -> Step:
    """A step that closes each FDS episode with its hyperstep (part of the measured time)."""
    def step(t: int) -> object:
        loss = opt.step(closure(t))
        if opt.episode_step == opt.horizon:
            opt.hyperstep()
        return loss

    return step


def make_fds(route: str) -> Factory:
    # Episodes of 50 steps, 5 lr + 1 momentum + 1 weight decay values (up to 7 tangent columns).
    # Small outer steps keep the values near SGD's, as the weights are not re-initialised between
    # episodes here.
    def make(hp: ModuleType, model: nn.Module, data: Data) -> Step:
        opt = hp.FDSSGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4,
                        horizon=FDS_HORIZON, lr_windows=FDS_LR_WINDOWS,
                        val_closure=_val_closure(model, data), hvp=route,
                        **_pinned(hp.FDSSGD, outer_step="additive"),
                        **_knobs(hp, "fds", hyper_lr={"lr": 1e-3, "momentum": 1e-3,
                                                      "weight_decay": 1e-5}))
        return _episodes(opt, lambda t: _make_closure(route, model, opt, data, t))

    return make


def make_marthe(mu: str | float, route: str) -> Factory:
    def make(hp: ModuleType, model: nn.Module, data: Data) -> Step:
        # A fixed hyper-step of 0: every step does all of MARTHE's work (validation gradient,
        # HVP, tangents, mu), but the random labels here cannot drive the learning rate into
        # divergence and skipped steps, which would time the guard instead of the method.
        opt = hp.MartheSGD(model.parameters(), lr=0.01, momentum=0.9, mu=mu,
                           val_closure=_val_closure(model, data), hvp=route,
                           **_knobs(hp, "marthe", hyper_lr=0.0, adapt_hyper_lr=False))
        return lambda t: opt.step(_make_closure(route, model, opt, data, t))

    return make


def make_adam(decoupled: bool) -> Factory:
    def make(hp: ModuleType, model: nn.Module, data: Data) -> Step:
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        opt = cls(model.parameters(), lr=1e-3, weight_decay=1e-2 if decoupled else 0.0,
                  foreach=False)
        return lambda t: opt.step(_closure(model, opt, data, t))

    return make


def make_hd_adam(decoupled: bool, validation: bool) -> Factory:
    def make(hp: ModuleType, model: nn.Module, data: Data) -> Step:
        cls = hp.HypergradAdamW if decoupled else hp.HypergradAdam
        opt = cls(model.parameters(), lr=1e-3, **_knobs(hp, "hd", hyper_lr=1e-7),
                  val_closure=_val_closure(model, data) if validation else None)
        return lambda t: opt.step(_closure(model, opt, data, t))

    return make


def make_marthe_adam(mu: str | float, decoupled: bool = False) -> Factory:
    # The exact route (the closure returns the loss): the finite-difference route warns on this
    # ReLU MLP in float32, and its kink retries would time the warning's cause, not the method.
    def make(hp: ModuleType, model: nn.Module, data: Data) -> Step:
        cls = hp.MartheAdamW if decoupled else hp.MartheAdam
        opt = cls(model.parameters(), lr=1e-3, mu=mu, val_closure=_val_closure(model, data),
                  hvp="exact",  # the knobs as make_marthe's
                  **_knobs(hp, "marthe", hyper_lr=0.0, adapt_hyper_lr=False))
        return lambda t: opt.step(_loss_closure(model, data, t))

    return make


def make_ift_adam(decoupled: bool, route: str = "exact") -> Factory:
    def make(hp: ModuleType, model: nn.Module, data: Data) -> Step:
        cls = hp.IFTAdamW if decoupled else hp.IFTAdam
        opt = cls(model.parameters(), lr=1e-3, weight_decay=1e-2 if decoupled else 1e-4,
                  update_interval=10, lookback=5, val_closure=_val_closure(model, data), hvp=route,
                  **_pinned(cls, update_schedule="fixed"))
        return lambda t: opt.step(_make_closure(route, model, opt, data, t))

    return make


def make_fds_adam(decoupled: bool) -> Factory:
    # As make_fds: episodes of 50 steps, here 5 lr + 1 weight decay values (up to 6 columns),
    # exact HVP route, small outer steps.
    def make(hp: ModuleType, model: nn.Module, data: Data) -> Step:
        cls = hp.FDSAdamW if decoupled else hp.FDSAdam
        opt = cls(model.parameters(), lr=1e-3, weight_decay=1e-2 if decoupled else 1e-4,
                  horizon=FDS_HORIZON, lr_windows=FDS_LR_WINDOWS,
                  val_closure=_val_closure(model, data), hvp="exact",
                  **_pinned(cls, outer_step="additive"),
                  **_knobs(hp, "fds", hyper_lr={"lr": 1e-5, "weight_decay": 1e-5}))
        return _episodes(opt, lambda t: _loss_closure(model, data, t))

    return make


# ---------------------------------------------------------------------- floors
def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _val_grad(model: nn.Module, data: Data) -> None:
    x, y = data.val
    torch.autograd.grad(F.cross_entropy(model(x), y), _params(model))


def _hvp(grads: list[torch.Tensor], params: list[torch.Tensor], columns: int) -> None:
    """``columns`` Hessian-vector products by double backward, batched as hyperoptim.hvp batches
    them (one column: a plain double backward), in torch alone so that a floor does not depend on
    the package version under test."""
    vectors = [torch.randn(columns, *p.shape) for p in params]
    if columns == 1:
        torch.autograd.grad(grads, params, grad_outputs=[v[0] for v in vectors])
    else:
        torch.autograd.grad(grads, params, grad_outputs=vectors, is_grads_batched=True)


def _second_order_passes(model: nn.Module, data: Data, t: int, columns: int, route: str) -> None:
    """A training gradient and ``columns`` Hessian-vector products by ``route``, nothing else."""
    params = _params(model)
    x, y = data.batch(t)
    if route == "exact":
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        if columns:
            _hvp(list(grads), params, columns)
    else:
        torch.autograd.grad(F.cross_entropy(model(x), y), params)
        for _ in range(2 * columns):  # central differences: two gradients per column
            torch.autograd.grad(F.cross_entropy(model(x), y), params)


def floor_sgd_val(hp: ModuleType, model: nn.Module, data: Data) -> Step:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(t: int) -> object:
        loss = opt.step(_closure(model, opt, data, t))
        _val_grad(model, data)
        return loss

    return step


def floor_marthe(route: str) -> Factory:
    def make(hp: ModuleType, model: nn.Module, data: Data) -> Step:
        def step(t: int) -> object:
            _second_order_passes(model, data, t, 1, route)
            _val_grad(model, data)
            return None

        return step

    return make


def floor_ift(route: str) -> Factory:
    def make(hp: ModuleType, model: nn.Module, data: Data) -> Step:
        def step(t: int) -> object:
            if t % 10:
                return _second_order_passes(model, data, t, 0, "finite_difference")
            _second_order_passes(model, data, t, 4, route)  # lookback 5: 4 products
            _val_grad(model, data)
            return None

        return step

    return make


def floor_fds(route: str, constant_columns: int) -> Factory:
    """FDS's passes: the constant hyperparameters' columns from the episode's start, one lr column
    per window from the window's start (a column is zero, so skipped, at its first step)."""
    starts = [0] * constant_columns + [k * FDS_HORIZON // FDS_LR_WINDOWS
                                       for k in range(FDS_LR_WINDOWS)]

    def make(hp: ModuleType, model: nn.Module, data: Data) -> Step:
        def step(t: int) -> object:
            s = t % FDS_HORIZON
            _second_order_passes(model, data, t, sum(k < s for k in starts), route)
            if s == FDS_HORIZON - 1:
                _val_grad(model, data)
            return None

        return step

    return make


CASES: dict[str, Factory] = {
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
    "MartheAdam (adaptive mu, exact)": make_marthe_adam("adaptive"),
    "MartheAdam (mu=1, exact)": make_marthe_adam(1.0),
    "MartheAdamW (mu=1, exact)": make_marthe_adam(1.0, decoupled=True),
    "IFTAdam (T=10, i=5, exact)": make_ift_adam(False),
    "IFTAdamW (T=10, i=5, exact)": make_ift_adam(True),
    "FDSAdam (T=50, 6 columns, exact)": make_fds_adam(False),
    "FDSAdamW (T=50, 6 columns, exact)": make_fds_adam(True),
})

#: Cases that use torch alone: timed once, not per package version.
BASELINES = {"torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW"}

# The passes each case cannot avoid, timed alone (case name -> floor name).
FLOORS: dict[str, tuple[str, Factory]] = {
    "HypergradSGD (validation)": ("SGD step + validation gradient", floor_sgd_val),
}
for _route, _tag in (("exact", "exact"), ("finite_difference", "fin. diff.")):
    FLOORS[f"MartheSGD (mu=1, {_tag})"] = (f"1 HVP + val. grad ({_tag})", floor_marthe(_route))
    FLOORS[f"MartheSGD (adaptive mu, {_tag})"] = FLOORS[f"MartheSGD (mu=1, {_tag})"]
    FLOORS[f"IFTOptimizer (T=10, i=5, {_tag})"] = (f"IFT passes ({_tag})", floor_ift(_route))
    FLOORS[f"FDSSGD (T=50, 7 columns, {_tag})"] = (f"FDS passes, 7 columns ({_tag})",
                                                   floor_fds(_route, 2))
for _name in ("MartheAdam (adaptive mu, exact)", "MartheAdam (mu=1, exact)",
              "MartheAdamW (mu=1, exact)"):
    FLOORS[_name] = FLOORS["MartheSGD (mu=1, exact)"]
for _name in ("IFTAdam (T=10, i=5, exact)", "IFTAdamW (T=10, i=5, exact)"):
    FLOORS[_name] = FLOORS["IFTOptimizer (T=10, i=5, exact)"]
for _name in ("FDSAdam (T=50, 6 columns, exact)", "FDSAdamW (T=50, 6 columns, exact)"):
    FLOORS[_name] = ("FDS passes, 6 columns (exact)", floor_fds("exact", 1))

#: Cases whose ratio is also reported against torch.optim.Adam (AdamW for the AdamW rows).
ADAM_BASELINE = {name: ("torch.optim.AdamW" if "AdamW" in name else "torch.optim.Adam")
                 for name in CASES if "Adam" in name and name not in BASELINES}


# ---------------------------------------------------------------------- peers
BAYDIN_URL = "github.com/gbaydin/hypergradient-descent"
GDTUO = "gradient_descent_the_ultimate_optimizer"

#: The peers' cases that ``add_peers`` registered in ``CASES``: timed once, as the baselines,
#: but reported as cases (the ``after`` column).
PEERS: set[str] = set()


def _import_path(name: str, path: Path) -> ModuleType:
    """The module in file ``path``, imported as ``name`` (never registered as ``hypergrad``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_baydin(cls: type, **options: object) -> Factory:
    """Baydin et al.'s optimizers follow ``torch.optim``: the same closure as our rows."""
    def make(hp: ModuleType, model: nn.Module, data: Data) -> Step:
        opt = cls(model.parameters(), **options)
        return lambda t: opt.step(_closure(model, opt, data, t))

    return make


def make_gdtuo(gdtuo: ModuleType, optimizer: Callable[[], object]) -> Factory:
    """gdtuo's loop, as its README writes it: the whole of it is the step timed."""
    def make(hp: ModuleType, model: nn.Module, data: Data) -> Step:
        wrapper = gdtuo.ModuleWrapper(model, optimizer=optimizer())
        wrapper.initialize()

        def step(t: int) -> object:
            x, y = data.batch(t)
            wrapper.begin()
            loss = F.cross_entropy(wrapper.forward(x), y)
            wrapper.zero_grad()
            loss.backward(create_graph=True)
            wrapper.step()
            return loss

        return step

    return make


def peer_cases(checkout: Path | None) -> tuple[dict[str, Factory], list[str]]:
    """The peers' cases that can run here, and one line for each peer left out, saying why."""
    cases: dict[str, Factory] = {}
    skipped: list[str] = []
    if checkout is None:
        skipped.append(f"peers: Baydin SGDHD, AdamHD skipped: no --peers PATH (a checkout of "
                       f"{BAYDIN_URL})")
    else:
        folder = checkout / "hypergrad"
        sgd_hd = _import_path("_overhead_peer_sgd_hd", folder / "sgd_hd.py")
        adam_hd = _import_path("_overhead_peer_adam_hd", folder / "adam_hd.py")
        cases["peer: Baydin SGDHD (training loss)"] = make_baydin(  # as make_hd_train
            sgd_hd.SGDHD, lr=0.01, momentum=0.9, hypergrad_lr=1e-4)
        cases["peer: Baydin AdamHD (training loss)"] = make_baydin(  # as make_hd_adam
            adam_hd.AdamHD, lr=1e-3, hypergrad_lr=1e-7)
    try:
        gdtuo = importlib.import_module(f"{GDTUO}.gdtuo")
    except ImportError as err:
        skipped.append(f"peers: gdtuo SGD, AdamBaydin skipped: not installed (pip install "
                       f"{GDTUO.replace('_', '-')}; {type(err).__name__}: {err})")
    else:
        cases["peer: gdtuo SGD (training loss)"] = make_gdtuo(
            gdtuo, lambda: gdtuo.SGD(alpha=0.01, mu=0.9, optimizer=gdtuo.SGD(1e-4)))
        cases["peer: gdtuo AdamBaydin (training loss)"] = make_gdtuo(
            gdtuo, lambda: gdtuo.AdamBaydin(alpha=1e-3, optimizer=gdtuo.SGD(1e-7)))
    return cases, skipped


def add_peers(checkout: Path | None) -> list[str]:
    """Register the peers' cases that can run (replacing any earlier call's); why others cannot."""
    for name in PEERS:
        del CASES[name]
        ADAM_BASELINE.pop(name, None)
    cases, skipped = peer_cases(checkout)
    CASES.update(cases)
    PEERS.clear()
    PEERS.update(cases)
    ADAM_BASELINE.update({name: "torch.optim.Adam" for name in cases if "Adam" in name})
    return skipped


MODELS = {
    "small": ("small MLP 64-128-10, batch 128", [64, 128, 10], 128),
    "medium": ("medium MLP 784-512-512-10, batch 128", [784, 512, 512, 10], 128),
}


# ---------------------------------------------------------------------- the old package
def load_package(ref: str, into: Path) -> tuple[ModuleType, str]:
    """The ``hyperoptim`` package at git ``ref``, imported from ``into`` as ``BEFORE_MODULE``.

    Registered in ``sys.modules`` under that name with its folder as the search location, so its
    relative imports resolve to its own modules, never to this checkout's.
    """
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", f"{ref}^{{commit}}"],
                         check=True, capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "hyperoptim"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    path = into / "hyperoptim"
    spec = importlib.util.spec_from_file_location(
        BEFORE_MODULE, path / "__init__.py", submodule_search_locations=[str(path)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[BEFORE_MODULE] = module
    spec.loader.exec_module(module)
    return module, sha


# ---------------------------------------------------------------------- timing
Key = tuple[str, str]  # (case or floor name, version: "after", "before" or "" when torch alone)


class Clocks:
    """Block times of one stepper on both clocks, in seconds."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.wall: list[float] = []

    def median(self, clock: str) -> float:
        return statistics.median(getattr(self, clock))


def _steppers(sizes: list[int], batch: int, only: list[str] | None,
              packages: dict[str, ModuleType]) -> tuple[dict[Key, Step], dict[Key, str]]:
    """Every stepper to time, in interleaving order, and why a before-version could not run."""
    torch.manual_seed(0)
    base = mlp(sizes)
    data = Data(sizes[0], sizes[-1], batch)
    keep = {"torch.optim.SGD"} | {ADAM_BASELINE[n] for n in (only or []) if n in ADAM_BASELINE}
    steppers: dict[Key, Step] = {}
    failed: dict[Key, str] = {}
    for name in CASES:
        if only is not None and name not in keep and name not in only:
            continue
        versions = [""] if name in BASELINES else ["after"] if name in PEERS else list(packages)
        if name in PEERS and "before" in packages:
            failed[(name, "before")] = "not hyperoptim: timed once, as this checkout's row"
        for version in versions:
            key = (name, version)
            try:
                steppers[key] = CASES[name](packages.get(version, hyperoptim),
                                            copy.deepcopy(base), data)
            except Exception as err:  # noqa: BLE001 (an old package may lack a class or option)
                if version != "before":
                    raise
                failed[key] = f"{type(err).__name__}: {err}"
        if name in FLOORS and (FLOORS[name][0], "") not in steppers:
            floor_name, make = FLOORS[name]
            steppers[(floor_name, "")] = make(hyperoptim, copy.deepcopy(base), data)
    return steppers, failed


def measure(sizes: list[int], batch: int, repeats: int, steps: int, only: list[str] | None,
            packages: dict[str, ModuleType], cpu_clock: Callable[[], int]
            ) -> tuple[dict[Key, Clocks], dict[Key, str]]:
    """Block times of every stepper, interleaved in every repeat."""
    steppers, failed = _steppers(sizes, batch, only, packages)
    t = dict.fromkeys(steppers, 0)
    for key in list(steppers):  # warm-up
        try:
            for _ in range(3):
                steppers[key](t[key])
                t[key] += 1
        except Exception as err:  # noqa: BLE001 (as in _steppers)
            if key[1] != "before":
                raise
            failed[key] = f"{type(err).__name__}: {err}"
            del steppers[key]
    times = {key: Clocks() for key in steppers}
    order = list(steppers)
    for r in range(repeats):
        for key in order if r % 2 == 0 else order[::-1]:
            step = steppers[key]
            wall, cpu = time.perf_counter_ns(), cpu_clock()
            for _ in range(steps):
                step(t[key])
                t[key] += 1
            cpu, wall = cpu_clock() - cpu, time.perf_counter_ns() - wall
            times[key].cpu.append(cpu * 1e-9)
            times[key].wall.append(wall * 1e-9)
    return times, failed


# ---------------------------------------------------------------------- report
def _ratio(times: dict[Key, Clocks], key: Key, base: Key | None, clock: str) -> str:
    if key not in times:
        return "n/a" if key[1] == "before" else ""
    if base is None or base not in times:
        return ""
    return f"{times[key].median(clock) / times[base].median(clock):.2f}x"


def table(times: dict[Key, Clocks], versions: list[str],
          clock: str) -> list[str]:
    """One markdown table on ``clock``: every case against SGD, its floor and Adam(W)."""
    sgd = ("torch.optim.SGD", "")
    columns = ["x SGD", "x floor", "x Adam(W)"]
    head = ["optimizer"]
    for column in columns:
        head += [f"{column} {v}" for v in versions] if len(versions) > 1 else [column]
    if len(versions) > 1:
        head.append("after / before")
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name in dict.fromkeys(name for name, _ in times):
        if name in BASELINES or name not in CASES:
            row = [name if name in BASELINES else f"floor: {name}"]
            row += [""] * (len(versions) - 1) + [_ratio(times, (name, ""), sgd, clock)]
            row += [""] * (2 * len(versions) + (len(versions) > 1))
        else:
            floor = (FLOORS[name][0], "") if name in FLOORS else None
            adam = (ADAM_BASELINE[name], "") if name in ADAM_BASELINE else None
            row = [name]
            for base in (sgd, floor, adam):
                row += [_ratio(times, (name, v), base, clock) for v in versions]
            if len(versions) > 1:
                row.append(_ratio(times, (name, "after"), (name, "before"), clock)
                           if (name, "before") in times else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50,
                        help="steps per timed block (50: one FDS episode, 5 IFT hyper-updates)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--models", nargs="*", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--only", nargs="*", help="case names to run (SGD always runs)")
    parser.add_argument("--before", metavar="REF",
                        help="also time the package at this git ref (e.g. main), side by side")
    parser.add_argument("--peers", metavar="PATH", type=Path,
                        help=f"a checkout of {BAYDIN_URL} (the folder holding hypergrad/): "
                             "adds Baydin et al.'s SGDHD and AdamHD rows")
    args = parser.parse_args(argv)
    if args.peers is not None and not (args.peers / "hypergrad" / "sgd_hd.py").is_file():
        parser.error(f"--peers {args.peers}: no hypergrad/sgd_hd.py there (a checkout of "
                     f"{BAYDIN_URL})")
    for line in add_peers(args.peers):
        print(line)
    torch.set_num_threads(args.threads)
    # One thread: the step runs on the calling thread, whose CPU time excludes other processes'.
    cpu_clock = time.thread_time_ns if args.threads == 1 else time.process_time_ns
    cpu_name = "thread CPU time" if args.threads == 1 else "process CPU time"
    with tempfile.TemporaryDirectory() as tmp:
        packages = {"after": hyperoptim}
        label = ""
        if args.before:
            before, sha = load_package(args.before, Path(tmp))
            packages = {"before": before, "after": hyperoptim}
            label = f"; before = {args.before} ({sha}), after = this checkout"
        versions = list(packages)
        for model in args.models:
            title, sizes, batch = MODELS[model]
            times, failed = measure(sizes, batch, args.repeats, args.steps, args.only, packages,
                                    cpu_clock)
            sgd = times[("torch.optim.SGD", "")]
            print(f"\n### {title}\n\nSGD: {1000 * sgd.median('cpu') / args.steps:.3f} ms/step "
                  f"CPU, {1000 * sgd.median('wall') / args.steps:.3f} ms/step wall; "
                  f"{args.threads} thread(s); median of {args.repeats} x {args.steps} steps"
                  f"{label}", flush=True)
            for clock, name in (("cpu", cpu_name), ("wall", "wall time")):
                print(f"\n{name}:\n")
                print("\n".join(table(times, versions, clock)), flush=True)
            for (name, _), why in failed.items():
                print(f"\nn/a before: {name}: {why}")


if __name__ == "__main__":
    main()
