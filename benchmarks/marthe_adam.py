"""MARTHE's Section 5 with Adam as the inner optimizer, at small scale (digits MLP and a small CNN).

Donini et al. (2020), Section 5 and Figure 4, run HD, RTHO and MARTHE over Adam on CIFAR-100. Here
the same comparison at small scale on scikit-learn's digits (the splits of
``benchmarks/marthe_schedules.py``: train 1197 / validation 300 / test 300):

- models: the 64-128-128-10 ReLU MLP of ``marthe_schedules.py``, and a small CNN on the 8x8
  images (conv 3x3 1->8, ReLU, conv 3x3 8->16, ReLU, max-pool 2, linear 256->10);
- inner optimizer: Adam (betas 0.9/0.999, eps 1e-8), mini-batches of 100 drawn by the seed (which
  also draws the initial weights), T steps, initial learning rate a_0 = 3e-4;
- E: the cross-entropy on the whole validation split, at every step;
- methods: fixed learning rate 3e-4 (``torch.optim.Adam``); HD (``HypergradAdam`` with
  ``val_closure``, hyper-learning rate kappa); RTHO (``MartheAdam(mu=1)``, fixed beta); MARTHE
  (``MartheAdam()``, adaptive mu and beta, beta's step kappa). Each adaptive method runs for three
  hyper-learning rates ("rate"). Not in the paper: Adam with a constant learning rate 1e-3 and
  3e-3 (the usual default and a tuned value), the honest baseline for "does the schedule help".

It prints, per model, method and rate, the mean ± standard deviation over seeds of the final
validation accuracy, of the held-out test accuracy and of the final learning rate, the number of
failed runs (non-finite validation loss or validation accuracy below 20%), and the wall time
per run relative to fixed-lr Adam.

Run:
    python benchmarks/marthe_adam.py                     # 3 seeds, T = 300, both models
    python benchmarks/marthe_adam.py --seeds 5 --steps 512 --models mlp
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from marthe_schedules import digits, mean_std, mlp
from torch import nn
from torch.nn import functional as F

from hyperoptim import HypergradAdam, MartheAdam

LR0 = 3e-4


@dataclass
class Method:
    name: str
    rates: list[float]
    make: Callable[[list[nn.Parameter], float, Callable[[], torch.Tensor]], torch.optim.Optimizer]


def methods(scale: float) -> list[Method]:
    def grid(*values: float) -> list[float]:
        return [v * scale for v in values]

    return [
        Method("fixed lr", [LR0], lambda p, r, val: torch.optim.Adam(p, lr=r, foreach=False)),
        Method("HD", grid(1e-6, 1e-5, 1e-4),
               lambda p, r, val: HypergradAdam(p, lr=LR0, hyper_lr=r, val_closure=val)),
        Method("RTHO (mu=1)", grid(1e-7, 1e-6, 1e-5),
               lambda p, r, val: MartheAdam(p, lr=LR0, mu=1.0, hyper_lr=r,
                                            adapt_hyper_lr=False, val_closure=val)),
        Method("MARTHE adaptive", grid(1e-11, 1e-10, 1e-9),
               lambda p, r, val: MartheAdam(p, lr=LR0, hyper_lr=r, val_closure=val)),
        Method("constant lr", [1e-3, 3e-3],
               lambda p, r, val: torch.optim.Adam(p, lr=r, foreach=False)),
    ]


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8x8 -> 4x4
        return self.fc(x.flatten(1))


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN()


MODELS = {"mlp": ("MLP 64-128-128-10", mlp), "cnn": ("CNN conv8-conv16-pool-fc", cnn)}


@dataclass
class Result:
    val_acc: float
    test_acc: float
    val_loss: float
    final_lr: float
    wall: float


def run(make_model: Callable[[int], nn.Module], method: Method, rate: float, seed: int,
        steps: int, data: tuple[torch.Tensor, ...], batch: int = 100) -> Result:
    xtr, ytr, xva, yva, xte, yte = data
    model = make_model(seed)

    def val() -> torch.Tensor:
        return F.cross_entropy(model(xva), yva)

    opt = method.make(list(model.parameters()), rate, val)
    gen = torch.Generator().manual_seed(10_000 + seed)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(ytr), (batch,), generator=gen)

        def closure(idx: torch.Tensor = idx) -> torch.Tensor:
            return F.cross_entropy(model(xtr[idx]), ytr[idx])  # exact HVP route for MARTHE

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a diverging run skips its steps
            if isinstance(opt, torch.optim.Adam):
                opt.zero_grad()
                closure().backward()
                opt.step()
            else:
                opt.step(closure)
    wall = time.perf_counter() - start
    with torch.no_grad():
        val_loss = float(val())
        val_acc = float((model(xva).argmax(1) == yva).float().mean())
        test_acc = float((model(xte).argmax(1) == yte).float().mean())
    return Result(val_acc, test_acc, val_loss, opt.param_groups[0]["lr"], wall)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rate-scale", type=float, default=1.0,
                        help="multiply every hyper-learning-rate grid by this")
    parser.add_argument("--only", nargs="*", help="method names to run")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = digits()
    start = time.perf_counter()
    for key in args.models:
        title, make_model = MODELS[key]
        print(f"\ndigits, {title}, Adam inner, T = {args.steps}, a_0 = {LR0}, batch 100, "
              f"{args.seeds} seeds")
        print(f"{'method':<16} {'rate':>8} {'val acc %':>13} {'test acc %':>13} {'final lr':>9} "
              f"{'failed':>6} {'time':>6}")
        base_wall = None
        for method in methods(args.rate_scale):
            if args.only and method.name not in args.only and method.name != "fixed lr":
                continue
            for rate in method.rates:
                results = [run(make_model, method, rate, seed, args.steps, data)
                           for seed in range(args.seeds)]
                failed = sum(not math.isfinite(r.val_loss) or r.val_acc < 0.2 for r in results)
                wall = statistics.median(r.wall for r in results)
                base_wall = base_wall or wall
                final_lr = statistics.mean(r.final_lr for r in results)
                print(f"{method.name:<16} {rate:>8.0e} "
                      f"{mean_std([r.val_acc for r in results]):>13} "
                      f"{mean_std([r.test_acc for r in results]):>13} {final_lr:>9.3g} "
                      f"{failed:>6} {wall / base_wall:>5.1f}x", flush=True)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
