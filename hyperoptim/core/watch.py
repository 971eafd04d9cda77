r"""Watchers run at the start and end of every step: who overwrites a learned value.

A part of :class:`~hyperoptim.core.base.HyperOptimizer` (docs/design.md §7), kept in its own module;
it is not meant to be used on its own.
"""

from __future__ import annotations

from .schedulers import detect_overwrites


class _Watchers:
    """Watchers run at the start and end of every step: who overwrites a learned value."""

    def _published(self) -> None:
        """Remember the learned values the step left, to notice who overwrites them."""
        self._watch["published"] = [
            {name: group[name] for name in self._learned_names(group) if name in group}
            for group in self.param_groups
        ]

    def _detect_overwrites(self) -> None:
        """Warn once if a schedule overwrites learned values rather than scaling them (judged by
        what it does to the values: :mod:`hyperoptim.core.schedulers`)."""
        detect_overwrites(self)
