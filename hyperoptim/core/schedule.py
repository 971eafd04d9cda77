"""Piecewise-constant hyperparameter schedules with sharing windows (FDS, docs/design.md §4)."""

from __future__ import annotations

__all__ = ["window_of"]


def window_of(step: int, horizon: int, n_windows: int) -> int:
    r"""The window of ``step`` when ``horizon`` steps share ``n_windows`` values.

    Window :math:`k` covers steps :math:`[kT/N, (k+1)T/N)`, so step :math:`t` is in
    :math:`\lfloor tN/T \rfloor` (exact integer arithmetic, also when :math:`N` does not divide
    :math:`T`).

    Example:
        >>> [window_of(t, 10, 3) for t in range(10)]
        [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    """
    if not 0 <= step < horizon:
        raise ValueError(f"Invalid step value: {step} (expected 0 <= step < horizon={horizon})")
    return step * n_windows // horizon
