"""A small CNN with BatchNorm on digits; the validation pass runs inside
``hyperoptim.frozen_batchnorm_stats`` so validation data never reach the running statistics.

Run:  python examples/cnn_batchnorm.py [--steps N]
"""

from __future__ import annotations

import argparse

import torch
from _digits import batches, digits
from torch import nn
from torch.nn import functional as F

import hyperoptim


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny model: one thread is fastest and never oversubscribes
    xtr, ytr, xva, yva, xte, yte = digits(images=True)
    model = cnn()

    def val_closure() -> torch.Tensor:
        # Train mode (batch statistics), but the running statistics are left as they were.
        with hyperoptim.frozen_batchnorm_stats(model):
            return F.cross_entropy(model(xva), yva)

    opt = hyperoptim.MartheSGD(model.parameters(), lr=0.01, momentum=0.9, mu="adaptive",
                               val_closure=val_closure)
    tracked = model[1].num_batches_tracked
    for idx in batches(len(ytr), 64, args.steps):
        opt.step(lambda idx=idx: F.cross_entropy(model(xtr[idx]), ytr[idx]))
    print(f"BatchNorm saw {tracked.item()} batches in {args.steps} steps (training batches only)")
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    print(f"learning rate 0.01 -> {opt.param_groups[0]['lr']:.4f}, test accuracy {100 * acc:.1f}%")


if __name__ == "__main__":
    main()
