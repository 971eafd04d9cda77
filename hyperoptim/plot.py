"""Plot recorded hyperparameters (matplotlib is imported lazily: ``pip install 'torch-hyperoptim[demo]'``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_history"]


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - exercised by the test with a blocked import
        raise ImportError(
            "plot_history needs matplotlib: pip install 'torch-hyperoptim[demo]'"
        ) from err
    return plt


def plot_history(
    optimizer_or_history: Any,
    keys: Sequence[str] = ("lr",),
    ax: Axes | None = None,
) -> Figure:
    """Plot recorded hyperparameters (or hypergradients) against step.

    Each key of each param group becomes one line (``"lr (group 1)"`` where there are several
    groups). A record that is itself a list (``FDSSGD``'s schedules, one value per window) becomes
    one line per window, ``"lr[k]"``, against the hyper-update index. Skipped steps (``nan``) leave
    gaps.

    Args:
        optimizer_or_history: a hyperoptim optimizer, or its ``history`` (a list of dicts, one per
            param group, name -> list of values).
        keys (sequence of str, optional): the names to plot (default: ``("lr",)``).
        ax (matplotlib Axes, optional): where to draw; a new figure is made if None.

    Returns:
        The matplotlib ``Figure`` drawn on.

    Raises:
        ImportError: matplotlib is not installed (it comes with the ``demo`` extra).
        KeyError: a key was recorded by no param group.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> fig = plot_history([{"lr": [0.1, 0.12, 0.15]}])
        >>> fig.axes[0].get_lines()[0].get_ydata().tolist()
        [0.1, 0.12, 0.15]
    """
    plt = _pyplot()
    history = getattr(optimizer_or_history, "history", optimizer_or_history)
    if isinstance(history, dict):
        history = [history]
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    else:
        fig = ax.figure
    several = len(history) > 1
    for key in keys:
        if not any(key in group for group in history):
            raise KeyError(f"no param group recorded {key!r}; recorded: "
                           f"{sorted({k for g in history for k in g})}")
        for i, group in enumerate(history):
            values = group.get(key)
            if not values:
                continue
            suffix = f" (group {i})" if several else ""
            if isinstance(values[0], (list, tuple)):
                for k in range(len(values[0])):
                    ax.plot([v[k] for v in values], label=f"{key}[{k}]{suffix}")
            else:
                ax.plot(list(values), label=f"{key}{suffix}")
    ax.set_xlabel("step (or hyper-update)")
    ax.set_ylabel(", ".join(keys))
    ax.legend(fontsize="small")
    return fig
