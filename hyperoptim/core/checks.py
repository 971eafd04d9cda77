r"""Argument checks shared by every optimizer: torch.optim's messages, one place."""

from __future__ import annotations

import math
from collections.abc import Callable
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
    """The checks ``torch.optim.SGD`` makes, for every optimizer with SGD's arguments."""
    check_value("lr", lr, is_real(lr) and lr >= 0.0)
    check_value("momentum", momentum, is_real(momentum) and momentum >= 0.0)
    check_value("dampening", dampening, is_real(dampening))
    check_value("weight_decay", weight_decay, is_real(weight_decay) and weight_decay >= 0.0)
    check_value("nesterov", nesterov, isinstance(nesterov, bool))
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def _is_bounds(value: Any) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in value)
            and 0.0 <= value[0] <= value[1])


# What a param group's value must satisfy, by name, wherever it comes from (constructor defaults,
# a per-group dict, add_param_group, a loaded state dict). Names a class does not use are absent.
_GROUP_CHECKS: dict[str, Callable[[Any], bool]] = {
    "lr": lambda v: is_real(v) and v >= 0.0,
    "momentum": lambda v: is_real(v) and v >= 0.0,
    "dampening": is_real,
    "weight_decay": lambda v: is_real(v) and v >= 0.0,
    "nesterov": lambda v: isinstance(v, bool),
    "maximize": lambda v: isinstance(v, bool),
    "hypergrad_lr": lambda v: is_real(v) and v >= 0.0,
    "lr_bounds": _is_bounds,
    "per_parameter": lambda v: isinstance(v, bool),
    "mu": lambda v: v == "adaptive" or (is_real(v) and 0.0 <= v <= 1.0),
    "adapt_hypergrad_lr": lambda v: isinstance(v, bool),
    "hypergrad_clip": lambda v: v is None or (is_real(v) and v > 0.0),
}


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
