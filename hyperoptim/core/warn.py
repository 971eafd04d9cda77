"""Every warning the package gives goes through :func:`warn`, which points it at the user's line.

A fixed ``stacklevel`` is wrong as soon as the call path changes (a subclass's ``step``, a
scheduler's patched ``step``, a Lightning or Hugging Face loop): the warning then names a line in
this package or in torch, and ``warnings`` filters keyed on the user's module miss it. Here the
level is counted at the call, by walking out of this package's and torch's frames.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["HyperoptimWarning", "warn"]

_OWN = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


class HyperoptimWarning(RuntimeWarning):
    """The category of this package's warnings (a ``RuntimeWarning``): filter them with
    ``warnings.filterwarnings("ignore", category=hyperoptim.HyperoptimWarning)``."""


def _internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_OWN) or path.startswith(_TORCH)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` call in :func:`warn` point at the first
    frame outside hyperoptim and torch (the user's code, or the framework that called step())."""
    level, frame = 1, sys._getframe(1)  # frame: warn(), which is stacklevel 1
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning] = HyperoptimWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the user's line (see the module)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
