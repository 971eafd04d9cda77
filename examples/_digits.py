"""Shared by the examples: scikit-learn's bundled digits (no download), split 60/20/20."""

from __future__ import annotations

import torch
from torch import nn


def digits(seed: int = 0, images: bool = False):
    """``(x_train, y_train, x_val, y_val, x_test, y_test)``; images as (N, 1, 8, 8) if asked."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    if images:
        x = x.view(-1, 1, 8, 8)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    return x[perm[:a]], y[perm[:a]], x[perm[a:b]], y[perm[a:b]], x[perm[b:]], y[perm[b:]]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def batches(n: int, size: int, steps: int, seed: int = 0):
    """``steps`` index tensors of ``size`` rows, reshuffled every epoch."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out.extend(perm[i : i + size] for i in range(0, n - size + 1, size))
    return out[:steps]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()
