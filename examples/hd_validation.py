"""HypergradSGD on a validation loss, one learning rate per group and one per weight.

Run:  python examples/hd_validation.py [--steps N]
"""

from __future__ import annotations

import argparse

import torch
from _digits import accuracy, batches, digits, mlp
from torch.nn import functional as F

import hyperoptim


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny model: one thread is fastest and never oversubscribes
    xtr, ytr, xva, yva, xte, yte = digits()

    # Per group the default scale-free hyper-step needs no size. Per weight the step is the
    # additive one, and each hypergradient is one term of the group's sum: it needs a large size.
    for per_parameter, hyper in ((False, {}), (True, {"hyper_lr": 10.0})):
        model = mlp()
        # The validation loss drives the learning rate; the training gradients are left alone.
        opt = hyperoptim.HypergradSGD(
            model.parameters(), lr=0.001, momentum=0.9, per_parameter=per_parameter, **hyper,
            val_closure=lambda model=model: F.cross_entropy(model(xva), yva),
        )
        for idx in batches(len(ytr), 64, args.steps):
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        kind = "per weight" if per_parameter else "per group "
        print(f"lr {kind}: 0.001 -> {opt.param_groups[0]['lr']:.4f} (mean)   "
              f"test accuracy {100 * accuracy(model, xte, yte):.1f}%")


if __name__ == "__main__":
    main()
