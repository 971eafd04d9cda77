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

The accelerated warm-up (``warmup_accel``, 1.5 by default; 1 is the warm-up above, bit for bit):
while the run is *stalled*, every training loss so far within :data:`WARMUP_GATE` (3%) of the
first one, the hyper optimizer's step size for the learning rate is :math:`\min(a^{\max(k - P,
0)}, R)` times ``hyper_lr`` at the warm-up's :math:`k`-th hyper-update (from 0; :math:`a` the
``warmup_accel``, :math:`P` = :data:`WARMUP_PATIENCE` = 3, :math:`R` = :data:`WARMUP_REACH` = 8):
after 3 plain hyper-updates Adam's 0.05 in :math:`\log_{10}` lr grows to 0.4, so three decades
take about 16 hyper-updates instead of 60. The first loss outside the band (a fall: the run has
started to learn; or a rise: an overshoot) or a step without a finite loss ends it for good, as
does the warm-up's end. It is :class:`~hyperoptim.ScaleFree`'s ``accel`` (the same 1.5, reach and
gate), for IFT's hyper optimizer. Why: the warm-up's hyper-updates move :math:`\log_{10}` lr by
about 0.05 each, so from 1000x too small the character LSTM of ``benchmarks/versus.py`` (100
steps) spent its whole run climbing: ``IFTAdam`` ended at perplexity 11.8 against 10.1 from its
good start, ``IFTOptimizer`` (one hyper-update every 2 steps at momentum 0.5) at 31.9 with its
learning rate still 30x too small. Ungated (measured, 5 seeds) the climb overshot on the digits
CNN (``IFTOptimizer``: 1 of 5 seeds died from the poor start) and on full-batch diabetes (0.50 ->
0.61 MSE); an ``accel`` of 2.25 (1.5 per step at ``IFTOptimizer``'s pace of 2) killed a CNN seed
even gated. Without the patience a start that was already right was pushed too: from Adam's lr
1e-3 the digits CNN's loss stayed within 3% for 6 steps while the learning rate reached 0.024, and
one seed of five ended at 87.2% (99.2% with the patience). Its state is ``hyper_state["stall"]``:
``"first"`` (the first training loss, None before one) and ``"stalled"``; a state dict saved
without it resumes without acceleration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..hyperstep import ScaleFree, check_stall, new_stall, watch_stall

__all__ = ["DECAY_PATIENCE", "SCHEDULES", "WARMUP_GATE", "WARMUP_LIMIT", "WARMUP_PATIENCE",
           "WARMUP_REACH", "accel_scale", "add_group", "advance", "advance_decay", "check_decay",
           "check_stall", "check_state", "climb_scale", "decay_scale", "interval", "momentum_pace",
           "new_stall", "new_state", "tuned", "warming", "watch_stall"]

SCHEDULES = ("warmup", "fixed")

WARMUP_LIMIT = 100
"""Hyper-updates after which the warm-up ends even if some group's hypergradient has not changed
sign (a learning rate held at an end of ``lr_bounds``, a group without gradients): about 5
decades of :math:`\\log_{10}` lr at Adam's default 0.05, and a bound on what the warm-up costs
(one validation gradient and ``lookback - 1`` Hessian-vector products per step)."""


WARMUP_REACH = ScaleFree.reach
r"""The accelerated warm-up's largest factor on the hyper optimizer's step size (Adam's 0.05 in
:math:`\log_{10}` lr becomes 0.4): :class:`~hyperoptim.ScaleFree`'s ``reach``."""

WARMUP_PATIENCE = 3
"""Hyper-updates of the warm-up taken at the plain step size before it accelerates: a start that
is already about right moves the loss out of the band within them."""

WARMUP_GATE = ScaleFree.gate
"""How far (relative) the training loss may move from its first value while the run still counts
as stalled and the warm-up accelerates: :class:`~hyperoptim.ScaleFree`'s ``gate``."""


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


def accel_scale(schedule: str, warmup: Mapping[str, Any] | None,
                stall: Mapping[str, Any] | None, accel: float) -> float:
    r"""The factor on the hyper optimizer's step size for the learning rate at a hyper-update
    whose step left the stall state ``stall`` (:func:`watch_stall`'s result, ``None`` without
    acceleration): :math:`\min(a^{\max(k - P, 0)}, R)` while the warm-up runs and the run is
    stalled, :math:`k` the warm-up's hyper-updates so far, :math:`a` = ``accel`` and :math:`P` =
    :data:`WARMUP_PATIENCE`; else 1.

    Example:
        >>> warmup = {"active": True, "updates": 5, "signs": [-1.0], "changed": [False]}
        >>> accel_scale("warmup", warmup, {"first": 2.0, "stalled": True}, 1.5)
        2.25
    """
    if stall is None or not stall["stalled"] or not warming(schedule, warmup):
        return 1.0
    assert warmup is not None  # warming() said so
    return min(accel ** max(warmup["updates"] - WARMUP_PATIENCE, 0), WARMUP_REACH)


DECAY_PATIENCE = 3
"""Hyper-updates in a row that must ask for more weight decay before ``decay_accel`` scales the
next one's step (:func:`decay_scale`)."""


def decay_scale(runs: Sequence[int] | None, index: int, accel: float) -> float:
    r"""The factor on the hyper optimizer's step size for param group ``index``'s weight decay at
    a hyper-update: :math:`\min(a^{\max(k - P, 0)}, R)`, :math:`k` = ``runs[index]`` the
    hyper-updates in a row so far whose hypergradient asked for more decay, :math:`a` the
    ``accel`` (``decay_accel``), :math:`P` = :data:`DECAY_PATIENCE`, :math:`R` =
    :data:`WARMUP_REACH`; 1 without ``runs`` (the option off).

    Why only upwards: the decay a run needs shows late, when the validation loss turns up
    (overfitting), and from there the hyper optimizer's 0.05 in :math:`\log_{10}` per
    hyper-update climbs a decade in 20 of them, 200 steps at the paper's interval: on
    ``benchmarks/versus.py``'s diabetes task (265 rows, full batch) ``IFTOptimizer``'s weight
    decay reached the 0.01-0.1 the task wants only in the last 100 of 600 steps, and 2 of 10
    seeds from the large start and 2 from the poor one overfit first (test MSE 0.56-0.91 against
    0.47). Early on, while the run still underfits, the hypergradient asks for *less*
    decay, and accelerated that way too it took the decay to 4e-9 within 50 steps, where
    :math:`\partial L_V / \partial \log_{10} c` is too small for the climb back: every seed from
    the poor start ended at 0.57-0.64.

    Example:
        >>> decay_scale([5], 0, 1.5)   # five increase-asks in a row: 1.5 ** 2
        2.25
        >>> decay_scale(None, 0, 1.5)
        1.0
    """
    if runs is None:
        return 1.0
    return min(accel ** max(runs[index] - DECAY_PATIENCE, 0), WARMUP_REACH)


def climb_scale(runs: Sequence[int] | None, index: int, accel: float) -> float:
    r"""``lr_accel``'s factor on the hyper optimizer's step size for param group ``index``'s
    learning rate at a hyper-update of the warm-up where the accelerated warm-up's factor is not
    in force (its loss has left the band, or it is off): :func:`decay_scale`'s
    :math:`\min(a^{\max(k - P, 0)}, R)` with :math:`k` = ``runs[index]`` the warm-up's
    hyper-updates in a row so far whose hypergradient asked for a larger learning rate, and
    :math:`a` = ``accel``. The run counts from the warm-up's start and ends at a hypergradient
    that asks for less (which ends the warm-up too), or at a cut of the learning rate by
    ``stability_guard`` or the reactive decrease.

    Why: the accelerated warm-up stops for good at the first loss outside its 3% band, and a run
    that starts to learn at a learning rate still far too small then climbs at the plain 0.05 in
    :math:`\log_{10}` per hyper-update. On ``benchmarks/versus.py``'s character LSTM (100 steps,
    a hyper-update every 2 in the warm-up at momentum 0.5) ``IFTOptimizer`` from the poor start
    ended at perplexity 15.9 against 12.9 from the good one (5 seeds); with the climb at 12.2
    against 11.9, and the other tasks' starts moved by at most 0.4 points. Only in the warm-up:
    after it, on a small full-batch regression, the climb took the learning rate to the edge of
    stability and the loss rose, and on the LSTM it gained nothing.

    Example:
        >>> climb_scale([6], 0, 1.5)   # six asks for more in a row: 1.5 ** 3
        3.375
    """
    return decay_scale(runs, index, accel)


def advance_decay(runs: list[int], hypergrads: Mapping[int, float]) -> None:
    """After an applied hyper-update: ``hypergrads`` maps each group that took part and tunes its
    weight decay to that decay's hypergradient (the summed one ``history`` records); a negative
    one (more decay) extends the group's run, anything else ends it. In place."""
    for index, h in hypergrads.items():
        runs[index] = runs[index] + 1 if h < 0.0 else 0


def check_decay(state: Any, n_groups: int) -> bool:
    """Whether ``state`` (a saved ``hyper_state["decay"]``) is one run length per param group."""
    return (isinstance(state, list) and len(state) == n_groups
            and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in state))
