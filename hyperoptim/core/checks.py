r"""Argument checks shared by every optimizer: torch.optim's messages, one place."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_sgd_arguments", "check_torch_flags", "check_value", "is_real"]


def check_value(name: str, value: Any, ok: bool) -> None:
    """Raise ``ValueError("Invalid <name> value: <value>")`` unless ``ok``, as torch.optim does."""
    if not ok:
        raise ValueError(f"Invalid {name} value: {value}")


def is_real(value: Any) -> bool:
    """A finite Python number (``bool`` excluded): what a float hyperparameter may be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sgd_arguments(lr: Any, momentum: Any, dampening: Any, weight_decay: Any,
                        nesterov: Any) -> None:
    """The checks ``torch.optim.SGD`` makes, for every optimizer with SGD's arguments (the SGD
    rule's options in :mod:`hyperoptim.core.options`)."""
    from .options import check_rule_arguments

    check_rule_arguments("sgd", lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov)


def check_torch_flags(owner: str, foreach: Any, fused: Any, differentiable: Any) -> None:
    """``torch.optim.SGD``'s implementation switches: the defaults are honoured, the rest refused.

    Every hyperoptim step is written per tensor (``foreach=False``): ``foreach=None`` and ``False``
    are accepted; ``foreach=True``, ``fused=True`` and ``differentiable=True`` raise with the reason.
    """
    check_value("foreach", foreach, foreach is None or isinstance(foreach, bool))
    check_value("fused", fused, fused is None or isinstance(fused, bool))
    check_value("differentiable", differentiable, isinstance(differentiable, bool))
    if foreach or fused:
        flag = "foreach" if foreach else "fused"
        raise ValueError(f"{owner} does not implement {flag}=True: its step runs per tensor and "
                         "reads the hypergradient's inner products in between; leave "
                         f"{flag}=None (the default).")
    if differentiable:
        raise ValueError(f"{owner} does not implement differentiable=True: the step is not "
                         "differentiable through its learned hyperparameters (use "
                         "hyperoptim.rules.sgd.sgd_step or hyperoptim.rules.adam.adam_step for a "
                         "differentiable step).")
