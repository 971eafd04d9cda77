"""The four tasks of ``benchmarks/versus.py``: data, model, loss, metric, batches.

Every task ships its data with a dependency or with Python itself (nothing downloads):

- ``digits-mlp``: scikit-learn's digits, the demo's 60/20/20 split (``hyperoptim._demo``), MLP
  64-64-10, mini-batches of 64; metric: test accuracy.
- ``digits-cnn``: the same split as 1x8x8 images; two 3x3 conv layers (16, 32 channels, ReLU, 2x2
  max-pool) and a linear layer; mini-batches of 64; metric: test accuracy.
- ``diabetes``: scikit-learn's diabetes (or ``--data PATH``, a CSV with one header row and the
  target last), the IFT paper's protocol: 60/20/20 split, inputs and target standardised with
  training statistics, one hidden layer of 50 ReLU units, full batch; metric: test MSE on the
  standardised target.
- ``charlm``: a character-level LSTM (embedding 32, one LSTM layer of 64 units) on the source of
  a few modules of Python's standard library (split 80/10/10 by position), windows of 24
  characters, mini-batches of 32; metric: test perplexity, exp of the mean per-character
  cross-entropy.

The split is fixed (seed 0); a run's seed draws the initial weights and the order of the batches.
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Task:
    """One benchmark task.

    ``loss(model, x, y)`` is the training objective (differentiable); ``evaluate(model, x, y)``
    returns ``(loss, metric)`` without a graph; ``batches(seed, steps)`` the training index
    batches (``None`` entries mean the full training split).
    """

    name: str
    title: str
    metric: str  # "accuracy", "mse" or "perplexity"
    steps: int
    quick_steps: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    make_model: Callable[[int], nn.Module]
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    batch: int | None

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """``(loss, metric)`` on ``x, y``; a non-finite loss gives the metric's worst value."""
        with torch.no_grad():
            out = model(x)
            if self.metric == "accuracy":
                loss = F.cross_entropy(out, y).item()
                metric = (out.argmax(1) == y).float().mean().item()
            elif self.metric == "mse":
                loss = metric = F.mse_loss(out, y).item()
            else:
                loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).item()
                metric = math.exp(min(loss, 700.0))
        if not math.isfinite(loss):
            metric = 0.0 if self.higher_is_better else math.inf
        return loss, metric

    def batches(self, seed: int, steps: int) -> list[torch.Tensor | None]:
        """Shuffled epochs of mini-batches drawn by ``seed`` (full batch: ``None`` each step)."""
        if self.batch is None:
            return [None] * steps
        n = len(self.y_train)
        gen = torch.Generator().manual_seed(10_000 + seed)
        out: list[torch.Tensor | None] = []
        while len(out) < steps:
            perm = torch.randperm(n, generator=gen)
            out.extend(perm[i : i + self.batch] for i in range(0, n - self.batch + 1, self.batch))
        return out[:steps]

    def within(self, value: float, best: float) -> bool:
        """Whether ``value`` reaches ``best`` within the issue's tolerance: 1 point of accuracy,
        10% of MSE, 2% of perplexity."""
        if not math.isfinite(value):
            return False
        if self.metric == "accuracy":
            return value >= best - 0.01
        if self.metric == "mse":
            return value <= 1.10 * best
        return value <= 1.02 * best


def _split_indices(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    a, b = int(0.6 * n), int(0.8 * n)
    return perm[:a], perm[a:b], perm[b:]


def _digits() -> tuple[torch.Tensor, ...]:
    """The demo's split: digits / 16, a seeded 60/20/20 permutation (seed 0)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    tr, va, te = _split_indices(len(y))
    return x[tr], y[tr], x[va], y[va], x[te], y[te]


def _xent(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def digits_mlp() -> Task:
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    return Task("digits-mlp", "digits, MLP 64-64-10, batch 64", "accuracy", 400, 30,
                *_digits(), make_model=make, loss=_xent, batch=64)


def digits_cnn() -> Task:
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(128, 10),
        )

    return Task("digits-cnn", "digits as 8x8 images, CNN (16, 32 channels), batch 64", "accuracy",
                250, 15, *_digits(), make_model=make, loss=_xent, batch=64)


def regression(path: str | None = None) -> Task:
    """Diabetes (scikit-learn) or a CSV: the IFT paper's protocol (full batch, 50 ReLU units)."""
    if path is None:
        from sklearn.datasets import load_diabetes

        x, y = load_diabetes(return_X_y=True)
        name, title = "diabetes", "diabetes, MLP 10-50-1, full batch"
    else:
        table = np.loadtxt(path, delimiter=",", skiprows=1)
        x, y = table[:, :-1], table[:, -1]
        stem = os.path.splitext(os.path.basename(path))[0]
        name, title = stem, f"{stem}, MLP {x.shape[1]}-50-1, full batch"
    tr, va, te = _split_indices(len(y))
    mu_x, sd_x = x[tr].mean(0), x[tr].std(0)
    sd_x[sd_x == 0] = 1.0
    mu_y, sd_y = y[tr].mean(), y[tr].std()

    def part(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor((x[idx] - mu_x) / sd_x, dtype=torch.float32),
                torch.tensor((y[idx] - mu_y) / sd_y, dtype=torch.float32).unsqueeze(1))

    n_in = x.shape[1]

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(n_in, 50), nn.ReLU(), nn.Linear(50, 1))

    def mse(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(model(xs), ys)

    return Task(name, title + " (test MSE on the standardised target)", "mse", 600, 40,
                *part(tr), *part(va), *part(te), make_model=make, loss=mse, batch=None)


#: Standard-library modules whose source is the language model's text (present in Python >= 3.10).
STDLIB_FILES = ("argparse.py", "dataclasses.py", "functools.py", "textwrap.py", "enum.py")
VOCAB = string.printable  # 100 characters; anything else maps to one extra "unknown" symbol


class CharLSTM(nn.Module):
    """Embedding, one LSTM layer, a linear read-out to the next character's logits."""

    def __init__(self, vocab: int, embed: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(x))
        return self.out(h)


def charlm(seq: int = 24, chars: int = 200_000) -> Task:
    """A character LSTM on the standard library's own source (80/10/10 by position)."""
    root = os.path.dirname(os.__file__)
    text = "".join(open(os.path.join(root, f), encoding="utf-8").read() for f in STDLIB_FILES)
    text = text[:chars]
    index = {c: i for i, c in enumerate(VOCAB)}
    codes = torch.tensor([index.get(c, len(VOCAB)) for c in text], dtype=torch.long)
    n = len(codes)
    train, val, test = codes[: int(0.8 * n)], codes[int(0.8 * n) : int(0.9 * n)], codes[int(0.9 * n) :]

    def windows(part: torch.Tensor, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.arange(0, len(part) - seq - 1, seq)
        if count is not None:
            starts = starts[torch.linspace(0, len(starts) - 1, count).long()]
        x = torch.stack([part[s : s + seq] for s in starts.tolist()])
        y = torch.stack([part[s + 1 : s + seq + 1] for s in starts.tolist()])
        return x, y

    vocab = len(VOCAB) + 1

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return CharLSTM(vocab)

    def xent(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))

    return Task("charlm", f"character LSTM (32-64) on {len(text) // 1000}k characters of the "
                "standard library's source, windows of 24, batch 32", "perplexity", 100, 6,
                *windows(train), *windows(val, 64), *windows(test, 256), make_model=make,
                loss=xent, batch=32)


def all_tasks(data: str | None = None) -> list[Task]:
    return [digits_mlp(), digits_cnn(), regression(data), charlm()]
