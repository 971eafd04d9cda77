"""Learn a learning-rate schedule, a momentum and a weight decay with FDSSGD (non-greedy).

A small MLP on scikit-learn's digits. Every outer step (episode) trains the network from fresh
weights for a fixed number of SGD steps under the current schedules, then one ``hyperstep()``
moves every schedule value against the sign of its exact hypergradient. As in Micaelli & Storkey
(2021) everything starts at 0: 5 learning-rate windows, 1 momentum, 1 weight decay, about 10 outer
steps. At the end, the learned schedules and a hand-set cosine schedule (momentum 0.9, weight
decay 5e-4, peak learning rate picked on the validation set from 0.1, 0.3, 1) each train the
network once more from the same weights, and their test accuracies are printed side by side.

Run:
    python examples/fds_schedule.py                   # about 10-30 s on a laptop CPU
    python examples/fds_schedule.py --outer-steps 2 --steps 4   # smoke test
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from hyperoptim.fds import FDSSGD


def load(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits split 1000 / 300 / 497 (train / validation / test), pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return {"train": (x[:1000], y[:1000]), "val": (x[1000:1300], y[1000:1300]),
            "test": (x[1300:], y[1300:])}


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def batches(data, batch_size: int, epochs: int, seed: int, steps: int | None = None
            ) -> list[tuple[torch.Tensor, ...]]:
    """The inner loop's minibatches: ``epochs`` shuffled passes over the training set (the first
    ``steps`` of them if given)."""
    x, y = data["train"]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            out.append((x[idx], y[idx]))
    return out[:steps]


def accuracy(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return (model(split[0]).argmax(1) == split[1]).float().mean().item()


def train(model: nn.Module, opt: torch.optim.Optimizer, steps, scheduler=None) -> None:
    for x, y in steps:
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        if scheduler is not None:
            scheduler.step()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outer-steps", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per episode")
    parser.add_argument("--steps", type=int, default=None,
                        help="inner steps per episode (default: --epochs passes over the data)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr-windows", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cosine-lrs", type=float, nargs="+", default=[0.1, 0.3, 1.0],
                        help="peak learning rates tried for the hand-set cosine schedule")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads while the example runs (small model: 1 is "
                        "fastest, more threads mostly contend)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, float]:
    start = time.perf_counter()

    data = load(args.seed)
    per_epoch = len(data["train"][1]) // args.batch_size
    if args.steps is not None:
        args.epochs = -(-args.steps // per_epoch)
    horizon = args.steps or args.epochs * per_epoch
    lr_windows = min(args.lr_windows, horizon)
    model = make_model(args.seed)
    xv, yv = data["val"]
    opt = FDSSGD(model.parameters(), lr=0.0, momentum=0.0, weight_decay=0.0, horizon=horizon,
                 lr_windows=lr_windows, val_closure=lambda: F.cross_entropy(model(xv), yv))
    print(f"{horizon} inner steps per episode, {lr_windows} learning rates, 1 momentum, "
          "1 weight decay, all starting at 0")

    for outer in range(1, args.outer_steps + 1):
        # A fresh network and batch order every episode (the paper's outer loop); the user
        # re-initialises the model, the optimizer resets its tangents and buffers itself.
        fresh = make_model(args.seed + outer)
        model.load_state_dict(fresh.state_dict())
        train(model, opt, batches(data, args.batch_size, args.epochs, args.seed + outer, horizon))
        val_loss = opt.hyperstep().item()
        fmt = lambda values: "[" + ", ".join(f"{v:.3g}" for v in values) + "]"  # noqa: E731
        print(f"outer step {outer:2d}: val loss {val_loss:.3f} -> lr {fmt(opt.schedule('lr'))}"
              f"  momentum {fmt(opt.schedule('momentum'))}"
              f"  weight decay {fmt(opt.schedule('weight_decay'))}")

    # Final comparison: both schedules train the same initial network on the same batches.
    final_seed = 10_000 + args.seed
    steps = batches(data, args.batch_size, args.epochs, final_seed, horizon)
    learned = make_model(final_seed)
    frozen = FDSSGD(learned.parameters(), horizon=horizon, tune=(),
                    lr_windows=lr_windows)
    for name in ("lr", "momentum", "weight_decay"):
        frozen.param_groups[0][f"{name}_schedule"] = opt.schedule(name)
        frozen.param_groups[0][name] = opt.schedule(name)[0]
    train(learned, frozen, steps)

    # The hand-set baseline: cosine annealing with momentum 0.9 and weight decay 5e-4, its peak
    # learning rate picked by validation accuracy from a small grid (as one would by hand).
    cosine = {}
    for peak in args.cosine_lrs:
        net = make_model(final_seed)
        sgd = torch.optim.SGD(net.parameters(), lr=peak, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(
            sgd, lambda t: 0.5 * (1 + math.cos(math.pi * t / horizon)))
        train(net, sgd, steps, sched)
        cosine[peak] = (accuracy(net, data["val"]), accuracy(net, data["test"]))
    best = max(cosine, key=lambda peak: cosine[peak][0])
    grid = ", ".join(f"{peak:g}: {100 * test:.1f}%" for peak, (_, test) in cosine.items())

    results = {"fds": accuracy(learned, data["test"]), "cosine": cosine[best][1]}
    print(f"test accuracy: FDS-learned schedules {100 * results['fds']:.1f}%  |  hand-set cosine "
          f"(momentum 0.9, wd 5e-4, peak lr {best:g} chosen on validation) "
          f"{100 * results['cosine']:.1f}%  [all peaks: {grid}]")
    print(f"({time.perf_counter() - start:.1f} s)")
    return results


if __name__ == "__main__":
    main()
