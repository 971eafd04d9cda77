r"""Telling a scheduler that scales a learned value from one that overwrites it, by what it does.

Between two steps something outside (a scheduler) may change a learned value. Step :math:`t`
starts from :math:`s_t`, the optimizer leaves :math:`o_t` (its own factor
:math:`L_t = o_t / s_t`), and the scheduler sets :math:`s_{t+1}`. Two readings of the same
numbers:

- *multiplicative* (``ExponentialLR``; in torch >= 2 also ``LinearLR``, ``CosineAnnealingLR``
  and the other chainable schedulers stepped every step): :math:`s_{t+1} = r_t\, o_t`, with a
  schedule ratio :math:`r_t = s_{t+1} / o_t` that does not depend on what was learned;
- *absolute* (``LambdaLR``, ``OneCycleLR``, ``CyclicLR``, Hugging Face's schedules):
  :math:`s_{t+1} = f(t)` whatever was learned, so the ratio of consecutive starts
  :math:`c_t = s_{t+1} / s_t` is the schedule's own and :math:`r_t = c_t / L_t` carries the
  learned factor, inverted: the learned change is erased.

A schedule's own ratios are smooth in :math:`t` (constant, or slowly varying); the learned
factors are not. So the reading whose ratios are smoother is the true one: over a run of
consecutive outside changes the summed third differences of :math:`\log r_t` (multiplicative)
and of :math:`\log c_t` (absolute) are compared, and only a clear verdict for *absolute* warns. A
step that leaves a value alone (:math:`L_t = 1`) cannot tell them apart and adds the same to
both.

The same bookkeeping gives the outside factor of each learning rate (the product of the
:math:`r_t`; infinite once a schedule is judged absolute, since the learned value is then erased
at every step), so that the divergence watch measures what the optimizer itself did to the
learning rate, not a warm-up's growth.
"""

from __future__ import annotations

import math
from typing import Any

from .warn import warn

__all__ = ["detect_overwrites", "outside_factor"]

# A run of this many steps is needed before any verdict; values set exactly by a schedule
# (an arithmetic or geometric progression) are judged then.
_RUN = 3
# A verdict on smoothness alone needs a run longer than _RUN (third differences) and the
# absolute reading's roughness below _CLEAR_SHORT of the other's, or below _CLEAR from this many
# steps on.
_RUN_LONG = 8
_CLEAR_SHORT = 0.2
# ... at this many consecutive steps (one step's verdict can be a coincidence of a feedback).
_VOTES = 3
# "Exactly", relative to the values (rounding in a schedule's arithmetic is ~1e-16).
_TOL = 1e-10
# A learned change (in log) this large is evidence, far above _TOL.
_LEARNED = 1e-6
# The verdict looks at the latest this many changes of a run.
_WINDOW = 20
# "Clearly absolute": the absolute reading's roughness below this fraction of the other's.
_CLEAR = 0.5


def _log_ratio(a: float, b: float) -> float | None:
    if a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b):
        return math.log(a / b)
    return None


def _roughness(values: list[float]) -> float:
    """Summed absolute third differences (second differences for a run of 3): 0 for a constant
    ratio (ExponentialLR, LambdaLR(lambda e: 1.0)) and small for any smooth schedule."""
    if len(values) < 4:
        return sum(abs(values[k] - 2 * values[k - 1] + values[k - 2]) for k in range(2, len(values)))
    return sum(abs(values[k] - 3 * values[k - 1] + 3 * values[k - 2] - values[k - 3])
               for k in range(3, len(values)))


def outside_factor(watch: dict[str, Any], group_index: int) -> float:
    """The product of the factors by which things outside scaled group ``group_index``'s
    learning rate so far (1.0 when nothing did)."""
    return watch.get("outside", {}).get(group_index, 1.0)


def detect_overwrites(optimizer: Any) -> None:
    """Called before every step: one warning if a schedule overwrites learned values.

    ``optimizer`` is a :class:`~hyperoptim.HyperOptimizer`; its ``_watch`` dict keeps, per
    (group, name), the value each step started from and the current run of outside changes.
    """
    watch = optimizer._watch
    published = watch.get("published")
    groups = optimizer.param_groups
    starts = watch.setdefault("starts", {})
    if published is not None and len(published) == len(groups):
        for i, (group, before) in enumerate(zip(groups, published)):
            for name, old in before.items():
                new = group.get(name)
                if _untouched(watch, (i, name), new, old, starts.get((i, name))):
                    continue
                if _observe(watch, (i, name), new, old, starts.get((i, name))):
                    if name == "lr":  # erased each step: its growth is the schedule's, not learned
                        watch.setdefault("outside", {})[i] = math.inf
                    if not watch.get("overwrite_warned"):
                        watch["overwrite_warned"] = True
                        count = len(watch["runs"].get((i, name), ())) or _RUN  # or revived
                        _warn(type(optimizer).__name__, i, name, count)
    starts.clear()
    for i, group in enumerate(groups):
        for name in optimizer._learned_names(group):
            if name in group:
                starts[(i, name)] = group[name]


def _untouched(watch: dict[str, Any], key: tuple[int, str], new: Any, old: Any,
               start: Any) -> bool:
    """What :func:`_observe` concludes, without its work, for the usual step: nothing outside
    touched the value, there is no run to continue and none to revive (it would return False
    and change nothing)."""
    return (new == old and key not in watch.get("runs", ()) and key not in watch.get("revived", ())
            and not (old == 0.0 and start))


def _observe(watch: dict[str, Any], key: tuple[int, str], new: Any, old: Any,
             start: Any) -> bool:
    """Add one step to ``key``'s run (``start``: the value the step began from, ``old``: the
    value it left, ``new``: the value found now); True when the run reads as absolute.

    A step where nothing changed the value, neither the optimizer nor anything outside, carries
    no evidence either way and continues a run as a ratio of 1 under both readings: so a method
    whose learned value moves only now and then (IFT, every ``update_interval`` steps) is judged
    across the steps in between, where a constant absolute schedule (``LambdaLR(lambda e: 1)``,
    a value assigned at every step) leaves it alone. A step where the optimizer changed the
    value and nothing outside touched it is evidence against an overwrite: it ends the run.
    """
    runs = watch.setdefault("runs", {})
    if old == 0.0 and start:
        runs.pop(key, None)
        return _revived(watch, key, new)
    watch.get("revived", {}).pop(key, None)
    i, name = key
    r = 0.0 if new == old else _log_ratio(new, old)
    if name == "lr" and r:
        outside = watch.setdefault("outside", {})
        outside[i] = outside.get(i, 1.0) * math.exp(r)
    c = _log_ratio(new, start) if start is not None else None
    if r is None or c is None or (new == old and old != start):
        runs.pop(key, None)
        return False
    if new == old and key not in runs:
        return False  # nothing happened, and no run to continue
    run = runs.setdefault(key, [])
    run.append((r, c, float(new)))
    del run[:-_WINDOW]
    return _reads_absolute(run)


def _revived(watch: dict[str, Any], key: tuple[int, str], new: Any) -> bool:
    """The optimizer took the value to 0 (from a start that was not 0) and ``new`` is found: a
    schedule that scales cannot move a value off 0, so a positive one was set. True once this
    happened at :data:`_RUN` consecutive steps."""
    revived = watch.setdefault("revived", {})
    if isinstance(new, (int, float)) and new > 0:
        revived[key] = revived.get(key, 0) + 1
        return revived[key] >= _RUN
    revived.pop(key, None)
    return False


def _reads_absolute(run: list[tuple[float, float, float]]) -> bool:
    """The verdict on a run of (multiplicative, absolute) log ratios and values found: the
    values set exactly by a schedule (:func:`_set_exactly`) after :data:`_RUN` steps, or the
    absolute reading clearly smoother at :data:`_VOTES` consecutive steps, by a wide margin in a
    short run and a narrower one after :data:`_RUN_LONG` steps (over a few steps a smooth
    learned change cannot be told from a schedule's own curvature, e.g. ``LinearLR``'s early
    steps)."""
    if len(run) < _RUN:
        return False
    rough_mult = _roughness([e[0] for e in run])
    if rough_mult <= 1e-9:
        return False
    if _set_exactly(run[-_RUN:]):
        return True
    return all(_smoother_absolute(run[: len(run) - k]) for k in range(_VOTES))


def _smoother_absolute(run: list[tuple[float, float, float]]) -> bool:
    """The absolute reading clearly smoother than the multiplicative one, and smoother than the
    learned changes themselves (where those are as smooth as a schedule, the two readings differ
    by a smooth term and cannot be told apart)."""
    if len(run) <= _RUN:
        return False
    clear = _CLEAR if len(run) >= _RUN_LONG else _CLEAR_SHORT
    rough_abs = _roughness([c for _, c, _ in run])
    return (rough_abs < clear * _roughness([r for r, _, _ in run])
            and rough_abs < _roughness([c - r for r, c, _ in run]))


def _set_exactly(tail: list[tuple[float, float, float]]) -> bool:
    """True when the values found after the ``tail``'s steps follow an arithmetic or a geometric
    progression exactly (to rounding), though the optimizer changed them within it (a learned
    change far above rounding) and the multiplicative reading is not as exact: a constant, a
    linear warm-up or decay, or a cyclic ramp, set whatever was learned.

    A schedule that scales the learned value cannot do this: a learned change moves every value
    after it off any progression. A learned value that does not move either (pinned at a bound,
    then scaled by a constant factor) fits both readings and gives no verdict.
    """
    mult = [r for r, _, _ in tail]
    logs = [c for _, c, _ in tail]
    if max(abs(c - r) for r, c in zip(mult, logs)) < _LEARNED or max(mult) - min(mult) <= _TOL:
        return False
    values = [tail[0][2] * math.exp(-logs[0])] + [v for _, _, v in tail]
    steps = [b - a for a, b in zip(values, values[1:])]
    return (max(logs) - min(logs) <= _TOL
            or max(steps) - min(steps) <= _TOL * max(abs(v) for v in values))


def _warn(cls: str, i: int, name: str, count: int) -> None:
    warn(
        f"{cls}: param_groups[{i}]['{name}'] was set from outside at {count} consecutive steps "
        "(a scheduler?), replacing the learned value rather than scaling it: what the optimizer "
        "learns is erased. Absolute schedules (LambdaLR, OneCycleLR, CyclicLR, Hugging Face's "
        "get_*_schedule*) do this. Use no scheduler, or one that scales the current value "
        "(ExponentialLR, StepLR, MultiStepLR, MultiplicativeLR, ReduceLROnPlateau, and in torch "
        ">= 2 LinearLR, CosineAnnealingLR and the other chainable schedulers stepped once per "
        "step); see README, 'Compatibility'. This warning is shown once."
    )
