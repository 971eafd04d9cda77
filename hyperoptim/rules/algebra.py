r"""The elementwise algebra the rules' closed-form tangents are written in
(:attr:`~hyperoptim.rules.base.UpdateRule.tangents`; :mod:`hyperoptim.rules.sgd`,
:mod:`hyperoptim.rules.adam`): sums and products that skip zero (``None``) tangents, float or
tensor hyperparameters, per-parameter lists, and the shapes of tangent columns.

Package-internal: a new rule's closed form may use it, the methods never do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.types import Hyper

__all__: list[str] = []


def _active(h: Hyper) -> bool:
    # A tensor hyperparameter is always applied so that its tangent exists even at 0.
    return isinstance(h, Tensor) or h != 0


def _axpy(x: Tensor, a: Hyper, y: Tensor) -> Tensor:
    """``x + a * y``; the float path is ``torch.add(..., alpha=a)`` as torch.optim uses."""
    if isinstance(a, Tensor):
        return x + a * y
    return x.add(y, alpha=a)


def _lr_list(lr: Hyper | Sequence[Tensor], n: int) -> Sequence[Hyper]:
    return lr if isinstance(lr, (list, tuple)) else [lr] * n


def _terms(*ts: Tensor | None) -> Tensor | None:
    """The sum of the terms that are not ``None`` (a tangent with no term is ``None``: zero).
    For the closed-form tangents, which skip the products of zero tangents."""
    out, owned = None, False
    for t in ts:
        if t is None:
            continue
        if out is None:
            out = t
        elif owned and _fits(out, t):
            out.add_(t)  # the sum made here: no new tensor per further term (same rounding)
        else:
            out, owned = out + t, True
    return out


def _fits(out: Tensor, other: Any) -> bool:
    """Can ``out`` take an in-place op with ``other`` and keep the out-of-place result's shape
    and dtype (so the in-place op rounds as the out-of-place one)? Not where autograd records
    the op (a differentiable closed form keeps its out-of-place graph)."""
    if torch.is_grad_enabled() and (out.requires_grad or getattr(other, "requires_grad", False)):
        return False
    if torch.result_type(out, other) != out.dtype:
        return False
    return not isinstance(other, Tensor) or (
        torch.broadcast_shapes(out.shape, other.shape) == out.shape)


def _times(x: Tensor | None, *factors: Any) -> Tensor | None:
    """``x * factors...`` (``None`` for a zero ``x``); the Python numbers among the factors are
    multiplied together first, so each costs no pass over a tensor."""
    if x is None:
        return None
    scalar, owned = 1.0, False
    for f in factors:
        if not isinstance(f, Tensor):
            scalar *= f
        elif owned and _fits(x, f):
            x.mul_(f)  # the product made here: multiplied in place (same rounding)
        else:
            x, owned = x * f, True
    if scalar == 1.0:
        return x
    return x.mul_(scalar) if owned and _fits(x, scalar) else x * scalar


def _ith(h: Hyper | Sequence[Tensor], i: int) -> Hyper:
    """Parameter ``i``'s value of a hyperparameter that may be a per-parameter list."""
    return h[i] if isinstance(h, (list, tuple)) else h


def _seed_columns(seeds: dict[str, Tensor], like: Tensor) -> dict[str, Tensor]:
    """Each seed ``(N,)`` shaped ``(N, 1, ...)`` to broadcast against ``(N, *like.shape)``."""
    shape = (-1,) + (1,) * like.dim()
    return {k: e.to(like.dtype).view(shape) for k, e in seeds.items()}


def _tangent_out(t: Tensor | None, like: Tensor, n_cols: int, inputs: Sequence[Any]) -> Tensor:
    """A closed form's output tangent as a new ``(N, *like.shape)`` tensor: zeros for ``None``,
    a copy where it is one of the caller's ``inputs`` (the generic path never aliases them)."""
    if t is None:
        return like.new_zeros((n_cols, *like.shape))
    if any(t is x for x in inputs):
        return t.clone()
    shape = (n_cols, *like.shape)
    return t if t.shape == shape else t.expand(shape).clone()


def _n_cols(z: Sequence[Tensor] | None, hz: Sequence[Tensor] | None,
            seeds: dict[str, Tensor]) -> int:
    """The number of tangent columns ``N``: from ``z``, else ``hz``, else the seeds."""
    for ts in (z, hz):
        if ts:
            return ts[0].shape[0]
    for e in seeds.values():
        return e.shape[0]
    return 0
