"""MartheSGD's discount mu: HD (mu=0), RTHO (mu=1), a fixed mu, and MARTHE's adaptive mu.

As in the paper's Section 5: plain SGD from a_0 = 0.01; HD, mu=0.99 and RTHO with a fixed
hyper-learning rate beta (the best of a small grid in benchmarks/marthe_schedules.py), MARTHE with
adaptive mu and beta adapted from 0 with step 1e-7. RTHO with an *adapted* beta diverges here.

Run:  python examples/marthe_mu.py [--steps N]
"""

from __future__ import annotations

import argparse

import torch
from _digits import accuracy, batches, digits, mlp
from torch.nn import functional as F

import hyperoptim


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny model: one thread is fastest and never oversubscribes
    xtr, ytr, xva, yva, xte, yte = digits()
    schedule = batches(len(ytr), 64, args.steps)

    settings = {
        "HD (mu=0)": dict(mu=0.0, hyper_lr=1e-2, adapt_hyper_lr=False),
        "mu=0.99": dict(mu=0.99, hyper_lr=1e-4, adapt_hyper_lr=False),
        "RTHO (mu=1)": dict(mu=1.0, hyper_lr=1e-4, adapt_hyper_lr=False),
        "MARTHE": dict(mu="adaptive", hyper_lr=1e-7),
    }
    for name, kwargs in settings.items():
        model = mlp()
        opt = hyperoptim.MartheSGD(
            model.parameters(), lr=0.01, **kwargs,
            val_closure=lambda model=model: F.cross_entropy(model(xva), yva),
        )
        for idx in schedule:
            # MARTHE needs H·Z: give step() a closure (it may call backward() or not).
            opt.step(lambda idx=idx, model=model: F.cross_entropy(model(xtr[idx]), ytr[idx]))
        hist = opt.history[0]
        print(f"{name:<12} lr 0.01 -> {hist['lr'][-1]:.4f}  last mu {hist['mu'][-1]:.3f}  "
              f"test accuracy {100 * accuracy(model, xte, yte):.1f}%")


if __name__ == "__main__":
    main()
