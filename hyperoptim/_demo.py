"""``python -m hyperoptim demo``: every optimizer from the same poor start on scikit-learn's digits.

The data ship with scikit-learn (no download). A small MLP trains from deliberately poor
hyperparameters with ``torch.optim.SGD`` at those settings, ``torch.optim.SGD`` at hand-tuned
settings (the reference), and the four hyperoptim optimizers; with ``--inner adam``, Adam at a
poor and at its default learning rate, ``HypergradAdam`` and ``MartheAdam``. Train, validation and test splits
are separate; the hypergradients see the validation split only, the test split is used once, for
the final table.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .fds import FDSSGD
from .hd import HypergradSGD
from .hd_adam import HypergradAdam
from .ift import IFTOptimizer
from .marthe import MartheSGD
from .marthe_adam import MartheAdam

#: The deliberately poor start every method shares: a learning rate 100x too small.
POOR = dict(lr=1e-3, momentum=0.5, weight_decay=1e-4)
#: What a practitioner would hand-pick: the usual SGD-with-momentum settings, not searched here.
TUNED = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)

#: Adam's poor start (10x below its usual default) and the usual default (not searched here).
POOR_ADAM = dict(lr=1e-4)
TUNED_ADAM = dict(lr=1e-3)

METHODS = ("sgd-poor", "sgd-tuned", "hd", "marthe", "ift", "fds")
#: ``--inner adam``: the same comparison with Adam as the inner optimizer.
ADAM_METHODS = ("adam-poor", "adam-tuned", "hd-adam", "marthe-adam")
ALL_METHODS = METHODS + ADAM_METHODS
COLORS = {
    "sgd-poor": "tab:gray",
    "sgd-tuned": "black",
    "hd": "tab:green",
    "marthe": "tab:red",
    "ift": "tab:blue",
    "fds": "tab:purple",
    "adam-poor": "tab:gray",
    "adam-tuned": "black",
    "hd-adam": "tab:olive",
    "marthe-adam": "tab:orange",
}
LABELS = {
    "sgd-poor": "SGD (poor start, fixed)",
    "sgd-tuned": "SGD (hand-tuned, fixed)",
    "hd": "HypergradSGD",
    "marthe": "MartheSGD",
    "ift": "IFTOptimizer",
    "fds": "FDSSGD",
    "adam-poor": "Adam (poor start, fixed)",
    "adam-tuned": "Adam (default lr, fixed)",
    "hd-adam": "HypergradAdam",
    "marthe-adam": "MartheAdam",
}


class DemoExtrasMissing(ImportError):
    """The demo's optional dependencies are not installed."""


def _require_extras() -> tuple[Any, Any, Any]:
    try:
        import matplotlib
        import sklearn.datasets
        import tqdm
    except ImportError as err:
        raise DemoExtrasMissing(
            f"the demo needs the 'demo' extras ({err.name} is missing): "
            "pip install 'torch-hyperoptim[demo]' (keep your torch; on a CPU machine pin "
            "torch==2.13.0 in the same command)"
        ) from err
    matplotlib.use("Agg")
    return sklearn.datasets, tqdm, matplotlib


@dataclass
class Splits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(seed: int) -> Splits:
    """Digits (1797 8x8 images) scaled to [0, 1], split 60/20/20 at random with ``seed``."""
    datasets, _, _ = _require_extras()
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    tr, va, te = perm[:a], perm[a:b], perm[b:]
    return Splits(x[tr], y[tr], x[va], y[va], x[te], y[te])


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@dataclass
class Result:
    """What one method did: its trajectory and its final numbers."""

    name: str
    lr: list[float] = field(default_factory=list)
    val_curve: list[tuple[float, float]] = field(default_factory=list)  # (wall seconds, val loss)
    schedules: list[list[float]] = field(default_factory=list)  # FDS: lr schedule per outer step
    test_acc: float = math.nan
    test_loss: float = math.nan
    wall: float = 0.0
    final: dict[str, Any] = field(default_factory=dict)


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def _batches(n: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out.extend(perm[i : i + batch] for i in range(0, n - batch + 1, batch))
    return out[:steps]


def _optimizer(name: str, model: nn.Module,
               val_closure: Callable[[], torch.Tensor]) -> torch.optim.Optimizer:
    params = model.parameters()
    if name == "sgd-poor":
        return torch.optim.SGD(params, **POOR)
    if name == "sgd-tuned":
        return torch.optim.SGD(params, **TUNED)
    if name == "hd":
        return HypergradSGD(params, **POOR, hypergrad_lr=0.02, val_closure=val_closure)
    if name == "marthe":
        # beta adapted from 0 with step 1e-7: the best of benchmarks/marthe_schedules.py's grid
        return MartheSGD(params, **POOR, mu="adaptive", hypergrad_lr=1e-7,
                         val_closure=val_closure)
    if name == "ift":
        return IFTOptimizer(params, **POOR, update_interval=10, lookback=5, hyper_lr=0.05,
                            val_closure=val_closure)
    if name == "adam-poor":
        return torch.optim.Adam(params, **POOR_ADAM)
    if name == "adam-tuned":
        return torch.optim.Adam(params, **TUNED_ADAM)
    if name == "hd-adam":
        return HypergradAdam(params, **POOR_ADAM, hypergrad_lr=1e-5, val_closure=val_closure)
    if name == "marthe-adam":
        return MartheAdam(params, **POOR_ADAM, hypergrad_lr=1e-10, val_closure=val_closure)
    raise ValueError(f"Invalid optimizer value: {name!r}")


def _online(name: str, data: Splits, steps: int, batch: int, seed: int, bar: Any) -> Result:
    """Train once with an optimizer that tunes as it goes (or a fixed SGD)."""
    model = make_model(seed)
    val_closure = lambda: F.cross_entropy(model(data.x_val), data.y_val)  # noqa: E731
    opt = _optimizer(name, model, val_closure)
    result = Result(name)
    every = max(1, steps // 50)
    spent = 0.0
    for t, idx in enumerate(_batches(len(data.y_train), batch, steps, seed)):
        start = time.perf_counter()

        def closure(idx: torch.Tensor = idx) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            return loss

        opt.step(closure)
        spent += time.perf_counter() - start
        result.lr.append(float(opt.param_groups[0]["lr"]))
        if t % every == 0 or t == steps - 1:
            result.val_curve.append((spent, _evaluate(model, data.x_val, data.y_val)[0]))
        bar.update(1)
    result.wall = spent
    result.test_loss, result.test_acc = _evaluate(model, data.x_test, data.y_test)
    group = opt.param_groups[0]
    result.final = {k: group[k] for k in ("lr", "momentum", "betas", "weight_decay") if k in group}
    return result


def _fds(data: Splits, steps: int, batch: int, seed: int, outer: int, bar: Any) -> Result:
    """FDS: ``outer`` episodes of ``steps`` steps from the same initial weights; the wall time of
    every episode counts, the last episode's model is the one tested."""
    model = make_model(seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    val_closure = lambda: F.cross_entropy(model(data.x_val), data.y_val)  # noqa: E731
    opt = FDSSGD(model.parameters(), **POOR, horizon=steps, lr_windows=5,
                 val_closure=val_closure)
    result = Result("fds")
    batches = _batches(len(data.y_train), batch, steps, seed)
    every = max(1, steps // 50)
    spent = 0.0
    for episode in range(outer):
        model.load_state_dict(init)
        result.schedules.append(opt.schedule("lr"))
        for t, idx in enumerate(batches):
            start = time.perf_counter()
            opt.step(lambda idx=idx: F.cross_entropy(model(data.x_train[idx]),
                                                     data.y_train[idx]))
            spent += time.perf_counter() - start
            if t % every == 0 or t == steps - 1:
                result.val_curve.append((spent, _evaluate(model, data.x_val, data.y_val)[0]))
            bar.update(1)
        if episode < outer - 1:
            start = time.perf_counter()
            opt.hyperstep()
            spent += time.perf_counter() - start
    result.lr = [v for v in result.schedules[-1] for _ in range(math.ceil(steps / 5))][:steps]
    result.wall = spent
    result.test_loss, result.test_acc = _evaluate(model, data.x_test, data.y_test)
    result.final = {name: opt.schedule(name) for name in ("lr", "momentum", "weight_decay")}
    return result


def run_demo(methods: tuple[str, ...] = METHODS, steps: int = 600, seed: int = 0,
             quick: bool = False, out: str | Path = ".", progress: bool | None = None,
             stream: Any = None) -> tuple[list[Result], Path]:
    """Train every method, print the table, write the figure; return results and PNG path."""
    _, tqdm, _ = _require_extras()
    stream = sys.stdout if stream is None else stream
    if progress is None:
        progress = sys.stderr.isatty()
    if quick:
        steps = min(steps, 150)
    outer = 2 if quick else 4
    batch = 64
    torch.set_num_threads(1)
    data = load_digits(seed)
    total = sum(steps * (outer if m == "fds" else 1) for m in methods)
    results: list[Result] = []
    with tqdm.tqdm(total=total, disable=not progress, unit="step", leave=False) as bar:
        for m in methods:
            bar.set_description(LABELS[m])
            if m == "fds":
                results.append(_fds(data, steps, batch, seed, outer, bar))
            else:
                results.append(_online(m, data, steps, batch, seed, bar))
    print(format_table(results, steps, outer), file=stream)
    path = plot(results, Path(out), steps)
    print(f"\nfigure: {path}", file=stream)
    return results, path


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
    return f"{value:.3g}"


def format_table(results: list[Result], steps: int, outer: int) -> str:
    fds = any(r.name == "fds" for r in results)
    lines = [
        f"digits, MLP 64-64-10, {steps} steps of batch 64"
        + (f" (FDSSGD: {outer} episodes of {steps} steps, all counted)" if fds else ""),
        "",
        f"{'method':<26}{'test acc':>9}{'test loss':>11}{'wall s':>8}   final hyperparameters",
    ]
    for r in results:
        hyper = ", ".join(f"{k} {_fmt(v)}" for k, v in r.final.items())
        lines.append(f"{LABELS[r.name]:<26}{100 * r.test_acc:>8.1f}%{r.test_loss:>11.3f}"
                     f"{r.wall:>8.1f}   {hyper}")
    return "\n".join(lines)


def plot(results: list[Result], out: Path, steps: int) -> Path:
    _, _, matplotlib = _require_extras()
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, (ax_lr, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        if r.name == "fds":
            n = len(r.schedules)
            for k, sched in enumerate(r.schedules):
                xs = [t for t in range(steps)]
                ys = [sched[min(len(sched) - 1, t * len(sched) // steps)] for t in xs]
                ax_lr.plot(xs, ys, color=COLORS[r.name], alpha=0.3 + 0.7 * (k + 1) / n,
                           label=f"{LABELS[r.name]} (outer {k})" if k in (0, n - 1) else None)
        else:
            ax_lr.plot(r.lr, color=COLORS[r.name], label=LABELS[r.name],
                       linestyle="--" if r.name.startswith("sgd") else "-")
        xs, ys = zip(*r.val_curve) if r.val_curve else ((), ())
        ax_val.plot(xs, ys, color=COLORS[r.name], label=LABELS[r.name])
    ax_lr.set_yscale("symlog", linthresh=1e-3)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.legend(fontsize="small")
    ax_val.set_xscale("symlog", linthresh=1.0)
    ax_val.set_xlabel("wall time (s; FDSSGD: all its episodes)")
    ax_val.set_ylabel("validation loss")
    ax_val.set_yscale("log")
    ax_val.legend(fontsize="small")
    fig.tight_layout()
    path = out / "hyperoptim_demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
