"""Type aliases shared by the package."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

from torch import Tensor

__all__ = ["Closure", "Hyper", "ParamsT"]

ParamsT: TypeAlias = Iterable[Tensor] | Iterable[dict[str, Any]]
"""What ``torch.optim`` accepts as ``params``: tensors or param-group dicts."""

Hyper: TypeAlias = float | Tensor
"""A hyperparameter: a Python float, or a tensor where a derivative with respect to it is taken."""

Closure: TypeAlias = Callable[[], Tensor]
"""A callable that recomputes a loss from the live parameters and returns it."""
