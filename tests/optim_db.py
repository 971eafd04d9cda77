"""The conformance table, in the style of PyTorch's ``OptimizerInfo`` (test/test_optim.py).

Every optimizer joins the generic tests in ``test_conformance.py`` by describing itself in a module
``tests/infos_<name>.py`` that defines ``INFOS: list[OptimizerInfo]``; this module collects them all.
"""

from __future__ import annotations

import importlib
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class OptimizerInput:
    """One configuration to run through the generic tests.

    Attributes:
        kwargs: constructor keyword arguments (``params`` and ``val_closure`` are added by the test).
        desc: a short id for the test name.
        use_val: pass a ``val_closure`` to the constructor (validation-loss mode).
    """

    kwargs: dict[str, Any]
    desc: str
    use_val: bool = False


@dataclass
class ErrorOptimizerInput:
    """Constructor arguments that must raise ``error_type`` with a message matching ``error_regex``."""

    kwargs: dict[str, Any]
    error_regex: str
    desc: str
    error_type: type[Exception] = ValueError


def default_step(opt: torch.optim.Optimizer, closure: Callable[[], torch.Tensor], t: int) -> Any:
    """Advance the optimizer one step; ``t`` counts steps from 0 since construction."""
    return opt.step(closure)


@dataclass
class OptimizerInfo:
    """How to build and drive one optimizer class in the generic tests.

    Attributes:
        cls: the optimizer class.
        inputs: configurations that must pass every generic test.
        error_inputs: constructor arguments that must raise.
        step: drives one step (FDS adds its ``hyperstep`` at episode ends here).
        second_order: needs a closure (no ``loss.backward(); opt.step()`` drop-in test).
        needs_val: a ``val_closure`` is always required.
        lr_decreases_loss: the "loss goes down" test applies (a method that tunes from lr=0 may
            need more than 30 steps; say so here and cover it in its own tests).
    """

    cls: type[torch.optim.Optimizer]
    inputs: list[OptimizerInput]
    error_inputs: list[ErrorOptimizerInput] = field(default_factory=list)
    step: Callable[[torch.optim.Optimizer, Callable[[], torch.Tensor], int], Any] = default_step
    second_order: bool = False
    needs_val: bool = False
    lr_decreases_loss: bool = True

    @property
    def name(self) -> str:
        return self.cls.__name__


def _collect() -> list[OptimizerInfo]:
    here = pathlib.Path(__file__).parent
    infos: list[OptimizerInfo] = []
    for path in sorted(here.glob("infos_*.py")):
        infos.extend(importlib.import_module(path.stem).INFOS)
    return infos


OPTIMIZER_DB: list[OptimizerInfo] = _collect()

#: torch.optim.SGD argument combinations that an optimizer with frozen hyperparameters must
#: reproduce bit for bit.
SGD_CONFIGS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True, weight_decay=0.1),
    dict(momentum=0.5, dampening=0.3, weight_decay=0.01),
    dict(weight_decay=0.05),
]


def all_inputs() -> list[tuple[OptimizerInfo, OptimizerInput]]:
    return [(info, inp) for info in OPTIMIZER_DB for inp in info.inputs]


def input_id(pair: tuple[OptimizerInfo, OptimizerInput]) -> str:
    return f"{pair[0].name}-{pair[1].desc}"
