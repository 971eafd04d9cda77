"""A stock PyTorch training loop, then the same loop with the one-line swap to HypergradSGD.

Run:  python examples/quickstart_dropin.py [--steps N]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

import hyperoptim


def make_data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 10, generator=gen)
    y = torch.sin(x @ torch.randn(10, 1, generator=gen) / 3) + 0.1 * torch.randn(512, 1, generator=gen)
    return x, y


def train(optimizer_cls, steps: int, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 1))
    x, y = make_data()
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    for step in range(steps):
        batch = slice((step * 32) % 512, (step * 32) % 512 + 32)
        optimizer.zero_grad()
        loss = F.mse_loss(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return F.mse_loss(model(x), y).item(), optimizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)

    loss, _ = train(torch.optim.SGD, args.steps, lr=0.001, momentum=0.9)
    print(f"torch.optim.SGD         lr 0.001 (fixed)    final loss {loss:.4f}")

    # The one-line change: torch.optim.SGD -> hyperoptim.HypergradSGD
    loss, opt = train(hyperoptim.HypergradSGD, args.steps, lr=0.001, momentum=0.9)
    lrs = opt.history[0]["lr"]
    print(f"hyperoptim.HypergradSGD lr 0.001 -> {lrs[-1]:.4f}   final loss {loss:.4f}")
    print("learned learning rate along the run:",
          ", ".join(f"{a:.4f}" for a in lrs[:: max(1, len(lrs) // 5)]))


if __name__ == "__main__":
    main()
