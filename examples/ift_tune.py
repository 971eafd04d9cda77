"""IFTOptimizer: choose what learns with ``tune``; ``per_parameter_lr`` gives one learning rate
per weight. ``tune=("weight_decay",)`` is Lorraine et al.'s method.

Run:  python examples/ift_tune.py [--steps N]
"""

from __future__ import annotations

import argparse

import torch
from _digits import accuracy, batches, digits, mlp
from torch.nn import functional as F

import hyperoptim

SETTINGS = {
    "Lorraine (weight decay)": dict(tune=("weight_decay",)),
    "WD+LR+M": dict(tune=("lr", "momentum", "weight_decay")),
    "WD+HDLR+M (per weight)": dict(tune=("lr", "momentum", "weight_decay"),
                                   per_parameter_lr=True),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny model: one thread is fastest and never oversubscribes
    xtr, ytr, xva, yva, xte, yte = digits()
    schedule = batches(len(ytr), 64, args.steps)

    for name, kwargs in SETTINGS.items():
        model = mlp()
        opt = hyperoptim.IFTOptimizer(
            model.parameters(), lr=0.01, momentum=0.5, weight_decay=1e-3,
            update_interval=10, lookback=5,
            val_closure=lambda model=model: F.cross_entropy(model(xva), yva), **kwargs,
        )
        for idx in schedule:
            opt.step(lambda idx=idx, model=model: F.cross_entropy(model(xtr[idx]), ytr[idx]))
        g = opt.param_groups[0]
        print(f"{name:<24} lr {g['lr']:.4f}  momentum {g['momentum']:.3f}  "
              f"weight decay {g['weight_decay']:.2e}  test accuracy "
              f"{100 * accuracy(model, xte, yte):.1f}%")


if __name__ == "__main__":
    main()
