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

# A run of this many consecutive outside changes is needed before any verdict.
_RUN = 3
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
        runs = watch.setdefault("runs", {})
        outside = watch.setdefault("outside", {})
        for i, (group, before) in enumerate(zip(groups, published)):
            for name, old in before.items():
                key = (i, name)
                new = group.get(name)
                if new == old:
                    runs.pop(key, None)
                    continue
                r = _log_ratio(new, old)
                if name == "lr" and r is not None:
                    outside[i] = outside.get(i, 1.0) * math.exp(r)
                c = _log_ratio(new, starts[key]) if key in starts else None
                if r is None or c is None:
                    runs.pop(key, None)
                    continue
                run = runs.setdefault(key, [])
                run.append((r, c))
                del run[:-_WINDOW]
                if len(run) < _RUN:
                    continue
                rough_mult = _roughness([x for x, _ in run])
                rough_abs = _roughness([y for _, y in run])
                if rough_mult > 1e-9 and rough_abs < _CLEAR * rough_mult:
                    if name == "lr":  # erased each step: its growth is the schedule's, not learned
                        outside[i] = math.inf
                    if not watch.get("overwrite_warned"):
                        watch["overwrite_warned"] = True
                        _warn(type(optimizer).__name__, i, name, len(run))
    starts.clear()
    for i, group in enumerate(groups):
        for name in optimizer._learned_names(group):
            if name in group:
                starts[(i, name)] = group[name]


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
