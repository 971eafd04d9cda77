r"""When IFT's hyper-updates run (a part of :class:`~hyperoptim.methods.ift.RuleIFT`): the
``update_schedule`` option.

- ``"fixed"``: every ``update_interval`` steps, Clarke et al.'s Algorithm 1 (and this package
  before the option, bit for bit).
- ``"warmup"``: a hyper-update every step (IFTAdam), or every :func:`momentum_pace` steps
  (IFTOptimizer: 2 at momentum 0.5, 10 at 0.9), until the hypergradient of each param group's
  learning rate has changed sign once; then every ``update_interval`` steps.

Why a warm-up: the hyper optimizer moves a transformed value by about its step size per
hyper-update (Adam 0.05 in :math:`\log_{10}` lr), so with the paper's interval of 10 a run of 300
steps gets 30 hyper-updates, about 1.5 decades at best: a learning rate 100x too small is still
too small when the run ends. Updating every step (or at the momentum's pace) while the
hypergradient keeps its first sign crosses those decades in the first few dozen hyper-updates;
its first change of sign says the learning rate has reached (or passed) the region the
hypergradient points to, and from there the paper's interval takes over. The sign comes from the
hypergradient the hyper-update already reported (the summed one of ``history``'s
``"hypergrad/lr"``, all-reduced across ranks), so the schedule adds no host synchronisation and
every rank switches at the same step.

The state is plain numbers in ``hyper_state["warmup"]`` (saved by ``state_dict``): ``"active"``
(whether the warm-up still runs), ``"updates"`` (hyper-updates taken in it), ``"signs"`` (per
param group, the first non-zero sign of its learning rate's hypergradient, 0 before one) and
``"changed"`` (per group, whether that sign has changed since; True from the start for a group
that does not tune its learning rate). A state dict saved without it (a ``"fixed"`` run, or a
release before the option) resumes with the warm-up over.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["SCHEDULES", "WARMUP_LIMIT", "add_group", "advance", "check_state", "interval",
           "momentum_pace", "new_state", "tuned", "warming"]

SCHEDULES = ("warmup", "fixed")

WARMUP_LIMIT = 100
"""Hyper-updates after which the warm-up ends even if some group's hypergradient has not changed
sign (a learning rate held at an end of ``lr_bounds``, a group without gradients): about 5
decades of :math:`\\log_{10}` lr at Adam's default 0.05, and a bound on what the warm-up costs
(one validation gradient and ``lookback - 1`` Hessian-vector products per step)."""


MOMENTUM_PACE_CAP = 0.999
"""Momentum above this paces the warm-up as this does, 1000 steps (at 1 the pace is infinite); the
pace is at most ``update_interval`` anyway."""


def new_state(tunes: Sequence[Sequence[str]]) -> dict[str, Any]:
    """The warm-up's state at construction for groups tuning ``tunes``: no sign seen yet. A group
    that does not tune its learning rate has nothing to wait for (counted as changed): a weight
    decay tuned alone (Lorraine et al.) keeps the paper's interval, since more decay can look
    better at every step until the decoupled decay :math:`1 - a c` turns negative."""
    changed = [not tuned(tune) for tune in tunes]
    return {"active": not all(changed), "updates": 0, "signs": [0.0] * len(tunes),
            "changed": changed}


def tuned(tune: Sequence[str]) -> bool:
    """Whether a group tuning ``tune`` takes part in the warm-up: it tunes its learning rate."""
    return "lr" in tune


_CHECKS = {
    "active": lambda v: isinstance(v, bool),
    "updates": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "signs": lambda v: isinstance(v, list) and all(s in (-1.0, 0.0, 1.0) for s in v),
    "changed": lambda v: isinstance(v, list) and all(isinstance(c, bool) for c in v),
}


def check_state(state: Any, n_groups: int) -> bool:
    """Whether ``state`` (a saved ``hyper_state["warmup"]``) has the structure :func:`new_state`
    gives, for ``n_groups`` groups where the warm-up still runs."""
    if not isinstance(state, Mapping) or set(state) != set(_CHECKS):
        return False
    if not all(ok(state[key]) for key, ok in _CHECKS.items()):
        return False
    return not state["active"] or len(state["signs"]) == len(state["changed"]) == n_groups


def add_group(state: dict[str, Any] | None, tune: Sequence[str]) -> None:
    """A param group added later: no sign seen yet (nothing to do once the warm-up is over)."""
    if state is not None and state["active"]:
        state["signs"].append(0.0)
        state["changed"].append(not tuned(tune))


def warming(schedule: str, state: Mapping[str, Any] | None) -> bool:
    """Whether the next step is in the warm-up."""
    return schedule == "warmup" and state is not None and bool(state["active"])


def interval(schedule: str, state: Mapping[str, Any] | None, update_interval: int,
             warmup_interval: int = 1) -> int:
    """Steps between hyper-updates now: ``warmup_interval`` (the rule's pace, at most
    ``update_interval``) in the warm-up, else ``update_interval``."""
    if warming(schedule, state):
        return max(1, min(warmup_interval, update_interval))
    return update_interval


def momentum_pace(momentum: float) -> int:
    r"""Heavy-ball SGD's warm-up interval, :math:`\operatorname{round}(1 / (1 - m))` steps: the
    step is the learning rate times a buffer that sums about that many gradients, so a change of
    learning rate shows in the loss over about that many steps, and hyper-updates taken faster
    pile up on a signal that has not caught up (measured: from lr 0.1 with momentum 0.9, a
    hyper-update every step took the digits CNN's learning rate to 0.4 and its accuracy from 98%
    to 78%). 1 without momentum, 2 at 0.5, 10 (the paper's interval) at 0.9."""
    return max(1, round(1.0 / (1.0 - min(momentum, MOMENTUM_PACE_CAP))))


def advance(state: dict[str, Any], hypergrads: Mapping[int, float]) -> None:
    """Count one applied hyper-update of the warm-up and read its signs: ``hypergrads`` maps each
    group that took part and tunes its learning rate to that learning rate's hypergradient. A
    zero (no signal) neither sets nor changes a sign. The warm-up ends once every group's sign
    has changed, or after :data:`WARMUP_LIMIT` hyper-updates."""
    state["updates"] += 1
    signs, changed = state["signs"], state["changed"]
    for index, h in hypergrads.items():
        sign = math.copysign(1.0, h) if h != 0.0 and math.isfinite(h) else 0.0
        if sign == 0.0:
            continue
        if signs[index] == 0.0:
            signs[index] = sign
        elif sign != signs[index]:
            changed[index] = True
    if all(changed) or state["updates"] >= WARMUP_LIMIT:
        state["active"] = False
