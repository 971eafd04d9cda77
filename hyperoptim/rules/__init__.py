r"""Inner update rules (SGD, Adam/AdamW) as values that every method consumes.

A rule is an :class:`~hyperoptim.rules.base.UpdateRule`; importing this package registers the
built-in ones. A new rule is one module that defines its step and calls
:func:`~hyperoptim.rules.base.register_rule`.
"""

from .adam import ADAM
from .base import (
    RULES,
    Buffers,
    UpdateRule,
    apply_update_,
    get_rule,
    register_rule,
    rule_diagonals,
    rule_tangents,
    rule_vjp,
)
from .sgd import SGD

__all__ = ["ADAM", "RULES", "SGD", "Buffers", "UpdateRule", "apply_update_", "get_rule", "register_rule",
           "rule_diagonals", "rule_tangents", "rule_vjp"]
