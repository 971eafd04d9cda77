"""The DrMAD thesis' adaptive method (Sections 2.2, 2.4, 3.2.2) on digits: per-unit learning rates
and weight decays, updated every 100 steps from a look-back of 5 by constant sign steps, with the
per-layer mean of the learned log values plotted as in the thesis' Figures 3.16-3.17.

``hyperoptim.ift.thesis_adaptive`` builds it on IFTOptimizer: one log10 learning rate and one log10
weight decay per output unit of every layer (shared across the unit's incoming weights; biases
keep one per unit), hypergradients by implicit differentiation through the last 5 updates, steps
of 0.01 in log10 weight decay and 0.2 in natural-log learning rate against the hypergradient's
sign, log learning rate clipped below 0; momentum 0.9 fixed.

Run:  python examples/ift_adaptive_thesis.py [--steps N] [--interval T] [--plot PATH]
"""

from __future__ import annotations

import argparse
import math
import pathlib

import torch
from _digits import accuracy, batches, digits
from torch import nn
from torch.nn import functional as F

from hyperoptim.ift import thesis_adaptive


def model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def layer_means(net: nn.Sequential, opt, name: str) -> list[float]:
    """Per layer: the mean over its weights and biases of the learned log10 values."""
    out = []
    for layer in (m for m in net if isinstance(m, nn.Linear)):
        params = [layer.weight, layer.bias]
        total = sum(p.numel() for p in params)
        values = [opt.state[p][f"log10_{name}"] for p in params]
        out.append(sum(v.sum().item() * p.numel() / v.numel() for v, p in zip(values, params))
                   / total)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--interval", type=int, default=100, help="steps between hyper-updates")
    parser.add_argument("--plot", default="out/ift_adaptive_thesis.png",
                        help="where to save the figure ('' for none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny model: one thread is fastest and never oversubscribes
    xtr, ytr, xva, yva, xte, yte = digits()
    schedule = batches(len(ytr), 64, args.steps)

    fixed, adaptive = model(), model()
    sgd = torch.optim.SGD(fixed.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt = thesis_adaptive(adaptive.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                          update_interval=args.interval, lookback=5,
                          val_closure=lambda: F.cross_entropy(adaptive(xva), yva))
    trace: dict[str, list[list[float]]] = {"weight_decay": [], "lr": []}
    steps: list[int] = []
    for t, idx in enumerate(schedule):
        sgd.zero_grad()
        F.cross_entropy(fixed(xtr[idx]), ytr[idx]).backward()
        sgd.step()
        opt.step(lambda idx=idx: F.cross_entropy(adaptive(xtr[idx]), ytr[idx]))
        if t == 0 or len(opt.history[0].get("lr", [])) > len(steps) - 1:
            steps.append(t + 1)
            for name in trace:
                trace[name].append(layer_means(adaptive, opt, name))

    print(f"{len(steps) - 1} hyper-updates in {args.steps} steps")
    for name, label in (("weight_decay", "log10 weight decay"), ("lr", "log10 learning rate")):
        print(f"per-layer mean {label}: "
              + ", ".join(f"layer {i + 1} {v:+.2f}" for i, v in enumerate(trace[name][-1])))
    print(f"test accuracy: fixed SGD {100 * accuracy(fixed, xte, yte):.1f}%, "
          f"adaptive {100 * accuracy(adaptive, xte, yte):.1f}%")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, (name, label) in zip(axes, (("weight_decay", "log10 L2 decay"),
                                            ("lr", "log10 learning rate"))):
            for i in range(len(trace[name][0])):
                ax.plot(steps, [row[i] for row in trace[name]], label=f"layer {i + 1}")
            ax.set_xlabel("step")
            ax.set_ylabel(f"per-layer mean {label}")
            ax.legend()
        axes[1].axhline(math.log10(1.0), color="grey", lw=0.5)
        fig.suptitle("Adaptive method (thesis Figs. 3.16-3.17) on digits")
        fig.tight_layout()
        path = pathlib.Path(args.plot)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        print(f"figure: {path}")


if __name__ == "__main__":
    main()
