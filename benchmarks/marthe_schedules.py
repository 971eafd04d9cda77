"""MARTHE's Section 5 at small scale: online learning-rate schedules on scikit-learn's digits.

Donini et al. (2020), Section 5, train a 3-layer MLP with plain SGD for T = 512 steps from
a_0 = 0.01 and compare the schedules that HD, RTHO, MARTHE with mu = 0.99 and MARTHE with adaptive
mu and beta produce online, by the final validation accuracy (MNIST subset, 20 seeds: fixed learning
rate 87.5%, the offline optimum LRS-OPT 96.2%, the online methods in between). Here the same at
small scale:

- data: ``sklearn.datasets.load_digits`` (1797 8x8 images), pixels / 16, split once into
  train 1197 / validation 300 / test 300;
- model: 64-128-128-10 MLP with ReLU (three linear layers), cross-entropy, mini-batches of 100
  drawn by the seed (which also draws the initial weights), plain SGD (no momentum);
- E: the cross-entropy on the whole validation split, the objective every method's hypergradient
  differentiates (the validation pass runs at every step);
- methods: fixed learning rate 0.01; HD (``HypergradSGD`` with ``val_closure``, hyper-learning
  rate kappa); RTHO (``MartheSGD(mu=1)``, fixed beta); MARTHE with ``mu=0.99`` (fixed beta);
  MARTHE with adaptive mu and beta (``MartheSGD()``, beta's step size kappa). Each adaptive method
  runs for three hyper-learning rates a decade or two apart ("rate"). Not in the paper's Section
  5: SGD with a constant learning rate tuned on the same budget (three values), the honest
  baseline for "does the schedule help".

It prints, per method and hyper-learning rate, the mean (and standard deviation) over seeds of the
final validation accuracy, of the held-out test accuracy and of the final learning rate, and how
many runs failed (diverged: a non-finite validation loss or a validation accuracy below 20%, chance
being 10%; they count in the means with their final accuracy). It plots
the schedules of the best setting of each method (by mean validation accuracy) for the first seed,
and MARTHE's mu, to ``<out>/marthe_schedules.png``.

Run:
    python benchmarks/marthe_schedules.py                  # 3 seeds, 3 rates each (~3 min)
    python benchmarks/marthe_schedules.py --seeds 10 --steps 512 --threads 2 --out out/
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from hyperoptim import HypergradSGD, MartheSGD


@dataclass
class Method:
    name: str
    rates: list[float]
    make: Callable[[list[nn.Parameter], float, Callable[[], torch.Tensor]], torch.optim.Optimizer]


LR0 = 0.01


def methods(scale: float) -> list[Method]:
    """The compared methods; ``scale`` multiplies every default hyper-learning rate grid."""

    def grid(*values: float) -> list[float]:
        return [v * scale for v in values]

    return [
        Method("fixed lr", [LR0], lambda p, r, val: torch.optim.SGD(p, lr=r)),
        Method("HD", grid(1e-3, 1e-2, 1e-1),
               lambda p, r, val: HypergradSGD(p, lr=LR0, hyper_lr=r, val_closure=val)),
        Method("RTHO (mu=1)", grid(1e-5, 1e-4, 1e-3),
               lambda p, r, val: MartheSGD(p, lr=LR0, mu=1.0, hyper_lr=r,
                                           adapt_hyper_lr=False, val_closure=val)),
        Method("MARTHE mu=0.99", grid(1e-5, 1e-4, 1e-3),
               lambda p, r, val: MartheSGD(p, lr=LR0, mu=0.99, hyper_lr=r,
                                           adapt_hyper_lr=False, val_closure=val)),
        Method("MARTHE adaptive", grid(1e-7, 1e-5, 1e-3),
               lambda p, r, val: MartheSGD(p, lr=LR0, hyper_lr=r, val_closure=val)),
        # Not in the paper's Section 5: a constant learning rate tuned on the same grid budget,
        # so that "beats the fixed a_0" is not mistaken for "beats a tuned SGD".
        Method("constant lr tuned", [0.03, 0.1, 0.3], lambda p, r, val: torch.optim.SGD(p, lr=r)),
    ]


def digits() -> tuple[torch.Tensor, ...]:
    """Train / validation / test splits of the digits, one fixed shuffle."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    return x[:1197], y[:1197], x[1197:1497], y[1197:1497], x[1497:], y[1497:]


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


@dataclass
class Result:
    val_acc: float
    test_acc: float
    val_loss: float
    final_lr: float
    lrs: list[float]
    mus: list[float]


def run(method: Method, rate: float, seed: int, steps: int, data: tuple[torch.Tensor, ...],
        batch: int = 100) -> Result:
    xtr, ytr, xva, yva, xte, yte = data
    model = mlp(seed)
    params = list(model.parameters())

    def val() -> torch.Tensor:
        return F.cross_entropy(model(xva), yva)

    opt = method.make(params, rate, val)
    gen = torch.Generator().manual_seed(10_000 + seed)
    lrs = []
    for _ in range(steps):
        idx = torch.randint(len(ytr), (batch,), generator=gen)

        def closure(idx: torch.Tensor = idx) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a diverging run skips its steps
            opt.step(closure)
        lrs.append(opt.param_groups[0]["lr"])
    with torch.no_grad():
        val_loss = float(val())
        val_acc = float((model(xva).argmax(1) == yva).float().mean())
        test_acc = float((model(xte).argmax(1) == yte).float().mean())
    history = getattr(opt, "history", [{}])[0]
    return Result(val_acc, test_acc, val_loss, lrs[-1], lrs, list(history.get("mu", [])))


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):5.1f} ± {100 * sd:4.1f}"


def plot(best: dict[str, tuple[float, list[Result]]], out: str, steps: int) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the [bench] extra
        return None
    fig, (ax, ax_mu) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, (rate, results) in best.items():
        label = f"{name} ({'lr' if name.startswith(('fixed', 'constant')) else 'rate'} {rate:g})"
        ax.plot(range(steps), results[0].lrs, label=label)
        if results[0].mus and name == "MARTHE adaptive":
            ax_mu.plot(range(steps), results[0].mus, lw=0.8, label=label)
    ax.set_xlabel("step t")
    ax.set_ylabel("learning rate a_t")
    ax.set_title("schedules, seed 0, best rate per method")
    ax.legend(fontsize=8)
    ax_mu.set_xlabel("step t")
    ax_mu.set_ylabel("mu_t")
    ax_mu.set_title("MARTHE's adaptive discount")
    ax_mu.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "marthe_schedules.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=512)
    parser.add_argument("--rate-scale", type=float, default=1.0,
                        help="multiply every hyper-learning-rate grid by this")
    parser.add_argument("--only", nargs="*", help="method names to run")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", default="out", help="directory for the plot (default: ./out)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = digits()
    start = time.perf_counter()
    print(f"digits: train {len(data[1])}, validation {len(data[3])}, test {len(data[5])}; "
          f"MLP 64-128-128-10, SGD, T = {args.steps}, a_0 = {LR0}, batch 100, "
          f"{args.seeds} seeds")
    print(f"{'method':<17} {'rate':>8} {'val acc %':>13} {'test acc %':>13} {'final lr':>9} "
          f"{'failed':>6}")
    best: dict[str, tuple[float, list[Result]]] = {}
    for method in methods(args.rate_scale):
        if args.only and method.name not in args.only:
            continue
        for rate in method.rates:
            results = [run(method, rate, seed, args.steps, data) for seed in range(args.seeds)]
            failed = sum(not math.isfinite(r.val_loss) or r.val_acc < 0.2 for r in results)
            final_lr = statistics.mean(r.final_lr for r in results)
            print(f"{method.name:<17} {rate:>8.0e} {mean_std([r.val_acc for r in results]):>13} "
                  f"{mean_std([r.test_acc for r in results]):>13} {final_lr:>9.3g} "
                  f"{failed:>6}", flush=True)
            score = statistics.mean(r.val_acc for r in results)
            if method.name not in best or score > statistics.mean(
                    r.val_acc for r in best[method.name][1]):
                best[method.name] = (rate, results)
    print("\nbest rate per method (mean final validation accuracy over seeds):")
    for name, (rate, results) in best.items():
        print(f"  {name:<17} rate {rate:<8.0e} val {mean_std([r.val_acc for r in results])} %  "
              f"test {mean_std([r.test_acc for r in results])} %")
    path = plot(best, args.out, args.steps)
    print(f"\nplot: {path}" if path else "\nplot: matplotlib not installed")
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
