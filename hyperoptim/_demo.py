"""``python -m hyperoptim demo``: every optimizer from the same poor start on scikit-learn's digits.

The data ship with scikit-learn (no download). A small MLP trains from deliberately poor
hyperparameters with ``torch.optim.SGD`` at those settings, ``torch.optim.SGD`` at hand-tuned
settings (the reference), and the four hyperoptim optimizers; with ``--inner adam``, Adam at a
poor and at its default learning rate, ``HypergradAdam``, ``MartheAdam`` and ``IFTAdam``. Train,
validation and test splits are separate; the hypergradients see the validation split only, the
test split is used once, for the final table.
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

from .core.base import HyperOptimizer
from .fds import FDSSGD
from .hd import HypergradSGD
from .hd_adam import HypergradAdam
from .ift import IFTOptimizer
from .ift_adam import IFTAdam
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
ADAM_METHODS = ("adam-poor", "adam-tuned", "hd-adam", "marthe-adam", "ift-adam")
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
    "ift-adam": "tab:cyan",
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
    "ift-adam": "IFTAdam",
}


#: Line widths of the tuned online methods, narrower in the order they are drawn: at their
#: defaults HypergradSGD and MartheSGD (MARTHE starts at mu = 0, HD on the validation loss) take
#: the same learning rates for their first two steps, and the later line must not hide the
#: earlier.
TUNED_WIDTHS = {"hd": 2.8, "marthe": 2.2, "ift": 1.8, "hd-adam": 2.8, "marthe-adam": 2.2,
                "ift-adam": 1.8}


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
    #: (step, val loss) per episode: one curve for an online method, one per episode for FDS
    step_curves: list[list[tuple[int, float]]] = field(default_factory=list)
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
    # Every hyperoptim class at its defaults (HD, MARTHE: the ScaleFree hyper-step; IFT: the
    # warm-up schedule): the demo shows what a user gets without choosing a hyper-step.
    if name == "hd":
        return HypergradSGD(params, **POOR, val_closure=val_closure)
    if name == "marthe":
        return MartheSGD(params, **POOR, val_closure=val_closure)
    if name == "ift":
        return IFTOptimizer(params, **POOR, val_closure=val_closure)
    if name == "adam-poor":
        return torch.optim.Adam(params, **POOR_ADAM)
    if name == "adam-tuned":
        return torch.optim.Adam(params, **TUNED_ADAM)
    if name == "hd-adam":
        return HypergradAdam(params, **POOR_ADAM, val_closure=val_closure)
    if name == "marthe-adam":
        return MartheAdam(params, **POOR_ADAM, val_closure=val_closure)
    if name == "ift-adam":
        return IFTAdam(params, **POOR_ADAM, val_closure=val_closure)
    raise ValueError(f"Invalid optimizer value: {name!r}")


def _online(name: str, data: Splits, steps: int, batch: int, seed: int, bar: Any) -> Result:
    """Train once with an optimizer that tunes as it goes (or a fixed SGD)."""
    model = make_model(seed)
    val_closure = lambda: F.cross_entropy(model(data.x_val), data.y_val)  # noqa: E731
    opt = _optimizer(name, model, val_closure)
    hyper = isinstance(opt, HyperOptimizer)
    result = Result(name)
    every = max(1, steps // 50)
    spent = 0.0
    result.step_curves.append([])
    for t, idx in enumerate(_batches(len(data.y_train), batch, steps, seed)):
        start = time.perf_counter()

        def closure(idx: torch.Tensor = idx) -> torch.Tensor:
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            if not hyper:  # torch.optim reads p.grad; hyperoptim takes the gradient itself,
                opt.zero_grad()  # and a closure that returns the loss gets exact H·Z
                loss.backward()
            return loss

        opt.step(closure)
        spent += time.perf_counter() - start
        result.lr.append(float(opt.param_groups[0]["lr"]))
        if t % every == 0 or t == steps - 1:
            val_loss = _evaluate(model, data.x_val, data.y_val)[0]
            result.val_curve.append((spent, val_loss))
            result.step_curves[-1].append((t + 1, val_loss))
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
    # At its defaults (the log outer step) but for the episode's length, which FDS requires,
    # and a learning-rate schedule of 5 windows, which the figure shows.
    opt = FDSSGD(model.parameters(), **POOR, horizon=steps, lr_windows=5,
                 val_closure=val_closure)
    result = Result("fds")
    batches = _batches(len(data.y_train), batch, steps, seed)
    every = max(1, steps // 50)
    spent = 0.0
    for episode in range(outer):
        model.load_state_dict(init)
        result.schedules.append(opt.schedule("lr"))
        result.step_curves.append([])
        for t, idx in enumerate(batches):
            start = time.perf_counter()
            opt.step(lambda idx=idx: F.cross_entropy(model(data.x_train[idx]),
                                                     data.y_train[idx]))
            spent += time.perf_counter() - start
            if t % every == 0 or t == steps - 1:
                val_loss = _evaluate(model, data.x_val, data.y_val)[0]
                result.val_curve.append((spent, val_loss))
                result.step_curves[-1].append((t + 1, val_loss))
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


def _fds_colors(n: int) -> list[tuple[float, float, float]]:
    """One opaque colour per FDS episode: pale (episode 0) to ``COLORS["fds"]`` (the last)."""
    from matplotlib.colors import to_rgb

    base = to_rgb(COLORS["fds"])
    fractions = [0.45 + 0.55 * k / max(1, n - 1) for k in range(n)]
    return [(1 - f * (1 - base[0]), 1 - f * (1 - base[1]), 1 - f * (1 - base[2])) for f in fractions]


def _title(results: list[Result], steps: int) -> str:
    adam = any(r.name in ADAM_METHODS for r in results)
    start = ", ".join(f"{k} {v:g}" for k, v in (POOR_ADAM if adam else POOR).items())
    return (f"scikit-learn digits, MLP 64-64-10, {steps} steps of batch 64; every hyperoptim "
            f"optimizer starts from the poor {start}")


def figure(results: list[Result], steps: int) -> Any:
    """The demo's figure (a matplotlib ``Figure``, one legend for every panel).

    Panels: learning rate against step; validation loss against wall time on a log axis (so that
    the fast methods are not crushed by FDSSGD's episodes); with FDSSGD, validation loss against
    step in each of its episodes. The fixed baselines are thin dashed lines drawn on top, the
    tuned methods wide lines beneath (each narrower than the one drawn before it:
    :data:`TUNED_WIDTHS`), so that a method that sits on another line (FDSSGD's episode 0 runs
    the poor start) stays visible.
    """
    _, _, matplotlib = _require_extras()
    import matplotlib.pyplot as plt

    fds = next((r for r in results if r.name == "fds"), None)
    fig, axes = plt.subplots(1, 3 if fds else 2, figsize=(16.5 if fds else 11.5, 5.2))
    ax_lr, ax_time = axes[0], axes[1]
    ax_ep = axes[2] if fds else None
    episode_colors = _fds_colors(len(fds.schedules)) if fds else []
    for r in results:
        if r.name == "fds":
            _plot_fds(r, steps, episode_colors, ax_lr, ax_time, ax_ep)
        else:
            _plot_method(r, ax_lr, ax_time, ax_ep)
    _label_axes(ax_lr, ax_time, ax_ep, fds is not None)
    handles, labels = ax_lr.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize="small",
               frameon=False)
    fig.suptitle(_title(results, steps))
    rows = math.ceil(len(labels) / 5)
    fig.tight_layout(rect=(0, 0.015 + 0.04 * rows, 1, 1))
    return fig


def _plot_fds(r: Result, steps: int, episode_colors: list[tuple[float, float, float]],
              ax_lr: Any, ax_time: Any, ax_ep: Any | None) -> None:
    """FDSSGD's lines, one colour per episode: its schedule, its validation loss in each episode
    and, on the time axis, the episodes one after another."""
    for k, (sched, curve, color) in enumerate(zip(r.schedules, r.step_curves, episode_colors)):
        label = f"{LABELS['fds']} episode {k}"
        xs = list(range(steps))
        ys = [sched[min(len(sched) - 1, t * len(sched) // steps)] for t in xs]
        ax_lr.plot(xs, ys, color=color, linewidth=3.0, zorder=3, label=label)
        if ax_ep is not None:
            ax_ep.plot(*zip(*curve), color=color, linewidth=3.0, zorder=3, label=label)
    points = iter(r.val_curve)
    for k, (curve, color) in enumerate(zip(r.step_curves, episode_colors)):
        segment = [next(points) for _ in curve]
        ax_time.plot(*zip(*segment), color=color, linewidth=2.0, zorder=3,
                     label=f"{LABELS['fds']} episode {k}")


def _plot_method(r: Result, ax_lr: Any, ax_time: Any, ax_ep: Any | None) -> None:
    """An online method's lines: a fixed baseline thin and dashed on top, a tuned method wide
    beneath (see :func:`figure`); faint in FDSSGD's episode panel."""
    style = dict(linestyle="--", linewidth=1.3, zorder=5) if r.name in (
        "sgd-poor", "sgd-tuned", "adam-poor", "adam-tuned") else {
            "linewidth": TUNED_WIDTHS.get(r.name, 2.0), "zorder": 3}
    ax_lr.plot(r.lr, color=COLORS[r.name], label=LABELS[r.name], **style)
    ax_time.plot(*zip(*r.val_curve), color=COLORS[r.name], label=LABELS[r.name], **style)
    if ax_ep is not None:
        ax_ep.plot(*zip(*r.step_curves[0]), color=COLORS[r.name], label=LABELS[r.name],
                   **{**style, "linewidth": style["linewidth"] / 2, "alpha": 0.5})


def _label_axes(ax_lr: Any, ax_time: Any, ax_ep: Any | None, fds: bool) -> None:
    """Scales, labels and titles of the panels (the notes in brackets only with FDSSGD)."""
    ax_lr.set_yscale("log")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate (log)")
    ax_lr.set_title("Learning rate at each step" + (
        "\n(FDSSGD: the schedule each episode ran)" if fds else ""))
    ax_time.set_xscale("log")
    ax_time.set_yscale("log")
    ax_time.set_xlabel("wall time, s (log; optimizer steps only)")
    ax_time.set_ylabel("validation loss (log)")
    ax_time.set_title("Validation loss against wall time" + (
        "\n(FDSSGD: its episodes one after another)" if fds else ""))
    if ax_ep is not None:
        ax_ep.set_yscale("log")
        ax_ep.set_xlabel("step (within the episode)")
        ax_ep.set_ylabel("validation loss (log)")
        ax_ep.set_title("FDSSGD: validation loss in each episode\n(faint: the other methods)")


def plot(results: list[Result], out: Path, steps: int) -> Path:
    """Write :func:`figure` to ``out/hyperoptim_demo.png``."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig = figure(results, steps)
    path = out / "hyperoptim_demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
