r"""The end of an FDS episode (docs/design.md §4): the outer step of
:class:`~hyperoptim.methods.fds.RuleFDS`.


:meth:`FDSOuterStep.hyperstep` takes the episode's hypergradients (one per tuned schedule value,
from the tangents :class:`~hyperoptim.methods.fds.RuleFDS` carried through the episode) and moves
every value against its sign: the paper's additive step (``outer_step="additive"``), or the
scale-free step of the positive scales in log space with iRprop+'s backtracking after a worse
episode (``outer_step="log"``). A part of ``RuleFDS``, kept in its own module; it is not meant to
be used on its own.
"""

from __future__ import annotations

import math
import sys
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.shard import any_sharded, local, sum_across_shards
from ..core.types import Closure
from ..core.warn import warn
from ..hvp import RngReplay, top_curvature

__all__ = ["CURVATURE_ITERATIONS", "EDGE_RATIO", "FAR_STEP_MAX", "LINEAR_RATIO", "LINEAR_TARGET",
           "LOG_STEP", "LOG_STEP_MAX", "LOST_BACK_OFF", "OUTER_STEPS", "SCALE_MATCH",
           "STABLE_GAIN", "STABLE_SHARE", "FDSOuterStep", "far_step"]

OUTER_STEPS = ("log", "additive")
"""The values of ``outer_step``: the scale-free step of the positive scales in log space, or the
paper's additive step for every value (:meth:`FDSOuterStep._sign_update`)."""

LOG_STEP = math.log(2.0)
r"""The initial log-space step :math:`s` of every window (a factor of 2), before it doubles on
repeated signs or halves on flips."""

LOG_STEP_MAX = math.log(10.0)
"""The largest log-space step: one decade per episode."""

LINEAR_RATIO = 0.5
r"""The linear-regime test of a learning-rate schedule's outer step: with :math:`E_0` the validation
loss at the episode's initial weights, :math:`E_T` at its end and :math:`a_j` the windows'
learning rates, the episode counts as far below its learning rate when

.. math::

    \rho = \frac{-\sum_j a_j\, \partial E_T / \partial a_j}{E_0 - E_T} \ge 0.5,

the derivative of :math:`E_T` by a common log-scale of every window, over what the episode
gained. While every step is small, :math:`E_0 - E_T` grows linearly with the learning rate and
:math:`\rho \approx 1`; near the best rate the derivative vanishes and :math:`\rho \approx 0`;
above it :math:`\rho < 0`. Then every window of the learning rate that asks for more steps up
by :func:`far_step` (a decade deep in the linear regime) instead of Rprop's growth from a factor
of 2, and Rprop starts afresh from there: from 100x too small, two outer steps instead of four.
Measured (``benchmarks/versus.py``'s starts, 3 episodes, 3 seeds): FDSSGD on the
digits MLP from 100x too small 91.1 -> 96.6%, CNN 81.4 -> 98.5%; FDSAdamW MLP 68.0 -> 94.3%, CNN
51.4 -> 94.9%; the good starts unchanged (the test never passed there), where a first step of a
decade regardless killed FDSAdamW's CNN in 2 of 3 seeds (the sign asked for more twice). After
an episode that has trained (:data:`STABLE_GAIN`) a rule with an edge of stability aims by the
curvature instead (:data:`STABLE_SHARE`)."""

LINEAR_TARGET = 2.5
r"""Where the far step aims, in units of the saturation scale of the model below
(:math:`x = 2.5`, where :math:`\rho = x / (e^x - 1) \approx 0.22`)."""


LOST_BACK_OFF = 100.0
r"""What the learning rates are divided by after a lost episode (non-finite, or no gain) with no
outer step to undo: the start itself was past stability. A hundred, not the 10 HD and MARTHE
divide by after an overflow (:data:`~hyperoptim.core.guard.BACK_OFF`; they try again at the next
step, FDS only after a whole episode): a rate put below the stable range costs one far step (a
decade per episode while the gain is linear, :data:`LINEAR_RATIO`), one left at its edge the
run. Measured from the versus tasks' large start (SGD lr 1, momentum 0.9; 3 episodes, 5 seeds):
divided by 10, the digits CNN ended at 74.3% (2 of 5 seeds died in the third episode, whose
untested step from lr 0.1 doubled it) and full-batch diabetes at 0.612 (lr 0.1 is at its edge:
:data:`EDGE_RATIO`); by 100, 92.6% and 0.471 (the good start: 98.4%, 0.511). The outer step
after the back-off raises or holds the learning rate, never lowers it further (the edge of
stability, :data:`EDGE_RATIO`, excepted): the rate sits below the stable range on purpose, and
one seed's hypergradient there (the CNN's seed 0 at lr 0.01: rho -0.05, the end loss nearly
insensitive to the rate) had stepped it to 0.005 with the momentum at 0.75 (73.3%)."""

EDGE_RATIO = 10.0
r"""The edge-of-stability test of the same :math:`\rho` (:data:`LINEAR_RATIO`): where
:math:`|\rho| > 10`, the end loss is ten times more sensitive to a common scale of the learning
rates than the whole episode's gain, far above the linear regime's 1 (the largest seen on the
versus tasks from a start too small: 3.4). The trajectory is near a learning rate it cannot
take, and the hypergradient's signs are chaos: SGD on full-batch diabetes from lr 0.1,
momentum 0.9, read :math:`\rho = 1.4 \times 10^5`, and the far step it allowed took three windows
to lr 1, where the next episode diverged; the character LSTM from lr 2 read :math:`-1.7 \times
10^3`, and the signs took windows to lr 8 with the momentum at 0.975, a dead run. There every
learning-rate window steps down by its Rprop step (as if its hypergradient said so) and the other
values hold: a learning rate too large costs the run, one too small only time."""


STABLE_GAIN = 0.1
r"""The gain from which a far step (:data:`LINEAR_RATIO`) of a rule with an edge of stability
(SGD's) aims by the curvature instead of the saturation model (:func:`far_step`): an episode
whose validation loss ended at least 10% below :math:`E_0`. Such an episode has trained its
network enough to show the curvature of training (it sharpens as it trains: the digits CNN's
largest validation Hessian eigenvalue went from 0.9 at its initial weights to 4-28 after an
episode at lr 0.01), where an episode that barely moved (0.5-2% from 100x too small on the
versus tasks, against 15-58% in the episode after it) shows the initial weights' curvature,
which puts the edge 5-10x too far."""

STABLE_SHARE = 1.0 / 3.0
r"""Where a far step read by the curvature aims: at a third of the stable learning rate
:math:`E / (\lambda + c)` (:meth:`FDSOuterStep._stable_rate`), held between Rprop's first step
and :data:`FAR_STEP_MAX`. Measured from the versus tasks' poor start (3 episodes, 5 seeds;
the saturation model alone: MLP 96.4%, CNN 98.1%, LSTM perplexity 19.35): a third, 97.1%, 98.4%,
9.45 (the LSTM at the two decades' cap); a fifth, 96.5%, 97.2%, 9.57; a tenth, LSTM 11.13. The
episode at lr 0.01 read a stable rate of 1.0 on the MLP, 0.12-0.78 on the CNN and 4.0-6.1 on the
character LSTM, whose best rates are about 0.1-0.5, 0.1 and 1."""

FAR_STEP_MAX = math.log(100.0)
"""The largest far step read by the curvature (:data:`STABLE_SHARE`): two decades."""

SCALE_MATCH = 4.0
r"""How far apart the training and the validation loss may start for the validation loss's
curvature to stand for the training loss's (:meth:`FDSOuterStep._stable_rate`): their ratio at
the episode's first step within :math:`[1/4, 4]`. A training loss summed over a batch of 64
against a validation loss averaged starts 64x apart; read there, the curvature puts the
stable rate 64x too high (a test problem with its training loss 100x its validation loss:
its far step went x100 and that episode diverged). Outside the range the far step keeps
the saturation model (:func:`far_step`), with one warning."""

CURVATURE_ITERATIONS = 10
"""Lanczos steps behind the largest eigenvalue of the validation loss's Hessian
(:func:`~hyperoptim.hvp.top_curvature`): each one Hessian-vector product by central
differences of two validation gradients, once per episode that takes a far step read by the
curvature."""


def far_step(ratio: float) -> float:
    r"""The log step of a learning rate after an episode far below it (:data:`LINEAR_RATIO`),
    where the curvature is not read (:data:`STABLE_GAIN`).

    Model: the validation loss an episode gains saturates in the learning rate's scale
    :math:`a` as :math:`1 - e^{-a / a^*}`, whose :math:`\rho` is :math:`x / (e^x - 1)` at
    :math:`x = a / a^*` (1 at 0, 0.58 at 1, 0.16 at 3). The measured ratio gives :math:`x`, and
    the step aims at :data:`LINEAR_TARGET`: :math:`\ln(2.5 / x)`, held between Rprop's first step
    (:math:`\ln 2`) and a decade. :math:`\rho \ge 1` (the linear regime itself): a decade.

    Example:
        >>> round(math.exp(far_step(0.97)), 2), round(math.exp(far_step(0.75)), 2)
        (10.0, 4.54)
    """
    if ratio >= 1.0:
        return LOG_STEP_MAX
    lo, hi = 1e-9, 50.0  # x / (e^x - 1) falls from 1 to 0 on (0, inf): bisect for x
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if mid / math.expm1(mid) > ratio:
            lo = mid
        else:
            hi = mid
    return min(LOG_STEP_MAX, max(LOG_STEP, math.log(LINEAR_TARGET / lo)))


# The largest momentum the log step reaches (1 - b stays a positive float).
_LOG1M_MAX = 1.0 - 1e-6


class FDSOuterStep:
    """The outer step of :class:`~hyperoptim.methods.fds.RuleFDS`: hypergradients of an episode
    in, schedules out.

    It reads from the optimizer it is part of: :attr:`names`, the ``horizon``, the schedules and
    options of each param group, ``_bounds`` and ``_normalise_step_sizes`` (a name's range and
    step sizes), ``_columns`` (the tuned values, in tangent-column order),
    ``_episode_hypergradients`` and ``_reset_episode``, besides the base's ``hyper_state``,
    ``_record`` and guard.
    """

    #: The names whose values are positive scales (a learning rate, a weight decay): with
    #: ``outer_step="log"`` a positive value of one of them steps by factors.
    log_names: ClassVar[tuple[str, ...]] = ("lr", "weight_decay")
    #: The names whose values live in [0, 1) (a momentum): with ``outer_step="log"`` a value
    #: there steps by factors of :math:`1 - b`.
    log1m_names: ClassVar[tuple[str, ...]] = ()
    #: The names whose values must stay below 1 and take the additive step (a momentum): with
    #: ``outer_step="log"`` a step up goes at most halfway to 1.
    unit_names: ClassVar[tuple[str, ...]] = ("momentum", "beta1", "beta2")
    #: The log-space step's initial size, growth factor on a repeated sign, and largest size.
    log_step: ClassVar[float] = LOG_STEP
    log_growth: ClassVar[float] = 2.0
    log_step_max: ClassVar[float] = LOG_STEP_MAX
    #: How a far step (:func:`far_step`) grows when the episode it led to asks for a full decade
    #: again (:math:`\rho \ge 0.88`, where the saturation model puts the rate at least a decade
    #: further and cannot say how far): that window's next step is its last far step times this
    #: factor, up to :attr:`log_step_max` times it, Rprop's growth on a repeated sign. 1
    #: (FDSSGD): every far step is at most a decade. A rule whose step is bounded by its
    #: learning rate (Adam's) sets 2: a decade, then two (:class:`~hyperoptim.FDSAdam` has the
    #: measurement).
    far_growth: ClassVar[float] = 1.0

    @torch.no_grad()
    def hyperstep(self, val_closure: Closure | None = None) -> Tensor:
        r"""End the episode: hypergradients, sign-based update of the schedules, reset.

        Must follow exactly ``horizon`` calls of :meth:`step`. Computes
        :math:`\partial E(w_T)/\partial\lambda_j = \langle\nabla E(w_T), Z_T[:, j]\rangle` for
        every tuned schedule value, records them with the updated schedules in ``history``,
        moves each value against its sign (:meth:`_sign_update`; with ``outer_step="log"``
        first checks the episode against the one before, :meth:`_log_outer`), and clears
        tangents, the rule's state and the step counter. One host sync.

        Args:
            val_closure (callable, optional): returns the validation loss from the live
                parameters (default: the constructor's).

        Returns:
            The validation loss :math:`E(w_T)` (detached).
        """
        t = self.hyper_state["step"]
        if t != self.horizon:
            raise RuntimeError(f"{type(self).__name__}.hyperstep() ends an episode of exactly "
                               f"horizon={self.horizon} steps, but {t} step(s) have been taken.")
        val_closure = self._resolve_val_closure(val_closure, required=True)
        columns = self._columns()
        # What the validation call draws (dropout), for the curvature's extra calls to replay.
        rng = RngReplay([p.device for g in self.param_groups for p in g["params"]])
        val_loss, hypergrads, loss = self._episode_hypergradients(val_closure, len(columns))
        rng.mark_after()
        skipped = not self._all_finite(*hypergrads, loss)
        logs = [g.get("outer_step", "additive") == "log" for g in self.param_groups]
        if skipped:
            self._warn_skipped_episode(any(logs))
        self._outer_steps(self._by_group(columns, hypergrads), loss, skipped, logs,
                          (val_closure, rng))
        self._reset_episode()
        return val_loss

    def _by_group(self, columns: list[tuple[int, int, int, int]], hypergrads: list[float]
                  ) -> list[dict[str, list[float]]]:
        """The hypergradients of ``columns`` (:meth:`RuleFDS._columns`) as one list per window by
        tuned name, per group."""
        per_group: list[dict[str, list[float]]] = [
            {name: [math.nan] * g[f"{name}_windows"] for name in g["tune"]}
            for g in self.param_groups
        ]
        for (_, gi, ni, k), h in zip(columns, hypergrads, strict=True):
            per_group[gi][self.names[ni]][k] = h
        return per_group

    def _outer_steps(self, per_group: list[dict[str, list[float]]], loss: float, skipped: bool,
                     logs: list[bool], validation: tuple[Closure, RngReplay]) -> None:
        """Every group's outer step and ``history`` entry; the validation loss becomes the
        reference of the next log-space check when this episode's step stands. The log step
        compares the objective the hypergradients descend: the validation loss, negated under
        ``maximize`` (:meth:`_objective`); ``history`` keeps the loss as the closure returned it.
        The stable rates a far step reads (:meth:`_stable_rate`, extra validation gradients
        from ``validation``: the closure, and the random-number state its call at the episode's
        end drew from) are measured for every group before any schedule moves: an error there
        changes nothing."""
        objective = self._objective(loss)
        # Under the log step an episode that gained nothing counts as lost, as a non-finite one.
        lost = not skipped and any(logs) and self._lost(objective)
        failed = skipped or lost
        revert = any(logs) and self._revert_due(objective, failed)
        stable = [self._stable_rate(group, per_group[gi], objective, *validation)
                  if logs[gi] and not (failed or revert) else None
                  for gi, group in enumerate(self.param_groups)]
        for gi, group in enumerate(self.param_groups):
            extra = self._outer_step(gi, group, per_group[gi], log=logs[gi], revert=revert,
                                     skipped=failed if logs[gi] else skipped, loss=objective,
                                     stable=stable[gi])
            if logs[gi]:
                extra["lost"] = 1.0 if lost else 0.0
                # 0 where not read (a stable rate is positive; NaN would not compare equal
                # after a checkpoint's round trip).
                extra["stable_lr"] = 0.0 if stable[gi] is None else stable[gi]
            self._record(gi, skipped=skipped, val_loss=loss,
                         skipped_steps=float(self.hyper_state.get("episode_skipped", 0)),
                         **{name: list(group[f"{name}_schedule"]) for name in self.names},
                         **{f"hypergrad/{name}": h for name, h in per_group[gi].items()},
                         **extra)
        if any(logs) and not (failed or revert):
            self.hyper_state["val_loss_ref"] = objective

    def _objective(self, loss: float) -> float:
        """The validation loss as the hypergradients descend it: negated under ``maximize``
        (whose validation gradients the base negates), so that lower is better for every
        comparison of the log step (:data:`LINEAR_RATIO`, :meth:`_lost`, :meth:`_revert_due`)."""
        return -loss if self.defaults.get("maximize") else loss

    def _outer_step(self, gi: int, group: dict[str, Any], hypergrads: dict[str, list[float]], *,
                    log: bool, revert: bool, skipped: bool, loss: float,
                    stable: float | None = None) -> dict[str, Any]:
        """Group ``gi``'s outer step; returns what it adds to ``history``. The additive step
        leaves the schedules of a skipped episode as they are."""
        if log:
            return self._log_outer(gi, group, hypergrads, revert=revert, skipped=skipped,
                                   loss=loss, stable=stable)
        if not skipped:
            self._sign_update(gi, group, hypergrads)
        return {}

    # ------------------------------------------------------------------ the log-space outer step
    def _lost(self, loss: float) -> bool:
        r"""Whether a finite episode with positive learning rates gained nothing: its validation
        loss ends at or above :math:`E_0`, the loss at its first step
        (``hyper_state["start_loss"]``; never where that was not measured, nor where a group
        under the log step has a learning rate at or below 0, which gains nothing by itself).
        From the user's initial weights that is a learning rate past stability (the digits CNN
        from lr 1: its ReLUs die within 15 steps and the loss stays at chance), not one too
        small, whose gain is small but positive; the outer step treats it as a non-finite
        episode (:meth:`_log_outer`)."""
        start = self.hyper_state.get("start_loss")
        return (start is not None and math.isfinite(loss) and loss >= start
                and all(v > 0 for g in self.param_groups if g.get("outer_step") == "log"
                        and "lr" in g["tune"] for v in g["lr_schedule"]))

    def _revert_due(self, loss: float, skipped: bool) -> bool:
        """Whether the last log-space outer step is undone: the episode it led to ended with a
        non-finite or a higher validation loss than the episode before it."""
        outer = self.hyper_state["outer"]
        if not any("prev" in s for o in outer.values() for s in o.values()):
            return False
        ref = self.hyper_state.get("val_loss_ref")
        return skipped or (ref is not None and loss > ref)

    def _log_outer(self, gi: int, group: dict[str, Any], hypergrads: dict[str, list[float]], *,
                   revert: bool, skipped: bool, loss: float,
                   stable: float | None = None) -> dict[str, Any]:
        r"""The outer step of a group with ``outer_step="log"``; returns its ``history`` entries.

        The sign step (:meth:`_sign_update`) moves the values from where they are, remembering
        them. When the episode that step led to ended worse (:meth:`_revert_due`) its
        hypergradients describe a point already rejected: the values go back, every step halves
        and the signs are forgotten (iRprop+'s backtracking, Igel & Huesken 2000), and the
        learning rate probes below (:meth:`_step_back`). An episode far below its learning rate
        (:data:`LINEAR_RATIO`) steps every window of it up by up to a decade (:func:`far_step`),
        or, given the group's ``stable`` learning rate (:meth:`_stable_rate`), towards
        :data:`STABLE_SHARE` of it (:meth:`_aimed_far_step`). A lost episode
        (non-finite, or :meth:`_lost`) with no step to undo (the start itself was past
        stability) divides the learning rates by :data:`LOST_BACK_OFF`, and the next outer step
        that is not lost raises or holds them (``hyper_state["backed_off"]``, the groups it
        applies to), at the edge of stability (:data:`EDGE_RATIO`) excepted.
        """
        outer = self.hyper_state["outer"].setdefault(gi, {})
        backed_off = self.hyper_state.get("backed_off", [])
        if revert:
            self._step_back(outer, group)
        elif skipped:
            for state in outer.values():
                state.pop("prev", None)
            if "lr" in group["tune"]:
                lo = self._bounds("lr")[0]
                group["lr_schedule"] = [max(v / LOST_BACK_OFF, lo) for v in group["lr_schedule"]]
                self.hyper_state["backed_off"] = sorted({*backed_off, gi})
        else:
            before = {name: list(group[f"{name}_schedule"]) for name in hypergrads}
            ratio = self._linear_ratio(group, hypergrads, loss)
            edge = ratio is not None and abs(ratio) > EDGE_RATIO
            if edge:
                # Only the learning rate moves, down in every window (EDGE_RATIO); a zero sign
                # holds the other values (and forgets their last sign).
                self._sign_update(gi, group, {name: [1.0 if name == "lr" else 0.0] * len(hs)
                                              for name, hs in hypergrads.items()})
            else:
                far = None
                if ratio is not None and ratio >= LINEAR_RATIO:
                    far = far_step(ratio) if stable is None else self._aimed_far_step(group,
                                                                                      stable)
                near = self._near_best(ratio, stable, far)
                if gi in backed_off and "lr" in hypergrads:
                    # The back-off put the rate below the stable range on purpose
                    # (LOST_BACK_OFF): the first step after it raises the rate or holds it (a
                    # zero sign), never lowers it further.
                    hypergrads = {**hypergrads, "lr": [min(h, 0.0) for h in hypergrads["lr"]]}
                self._sign_update(gi, group, hypergrads, far=far, near=near)
            for name, values in before.items():
                outer[name]["prev"] = values
        if not skipped and gi in backed_off:
            self.hyper_state["backed_off"] = [g for g in backed_off if g != gi]
        # One entry per hyperstep, aligned with the other names (the initial s before the first).
        steps = {f"log_step/{name}": list(outer[name]["log_step"]) if "log_step" in outer.get(
                     name, {}) else [self.log_step] * group[f"{name}_windows"]
                 for name in group["tune"] if name in self.log_names}
        return {"backtracked": 1.0 if revert else 0.0, **steps}

    def _linear_ratio(self, group: dict[str, Any], hypergrads: dict[str, list[float]],
                      loss: float) -> float | None:
        r""":math:`\rho` of :data:`LINEAR_RATIO` for the group's learning-rate schedule, from the
        episode's start loss (``hyper_state["start_loss"]``, measured at its first step where the
        constructor has the ``val_closure``) and end ``loss``; ``None`` where it is not defined
        (no start loss, the learning rate not tuned, an episode that gained nothing)."""
        start = self.hyper_state.get("start_loss")
        hs = hypergrads.get("lr")
        if start is None or not hs or not start - loss > 0.0:
            return None
        g = sum(a * h for a, h in zip(group["lr_schedule"], hs, strict=True))
        return -g / (start - loss) if math.isfinite(g) else None

    @staticmethod
    def _near_best(ratio: float | None, stable: float | None, far: float | None) -> bool:
        r"""Whether an episode says its learning rate is near or past its best, so that a window
        of it that asks for more again takes its current log step instead of Rprop's doubled one
        (:meth:`_sign_update`'s ``near``; a step down grows as ever): :math:`\rho \le 0`
        (:data:`LINEAR_RATIO`: the end loss rises with a common scale-up of every window), or
        the curvature was read (``stable``) and put the rate within a factor of 2 of its aim or
        above it (no ``far`` step). Rprop's growth bets that a repeated sign means a value still
        far from its best; for a learning rate that bet overshoots into a cliff, and these
        readings say it has been lost. Measured (``benchmarks/versus.py``, 3 episodes, 5 seeds,
        160 ``FDSSGD`` and ``FDSAdamW`` runs): ``FDSSGD`` at its constructor's defaults (lr 0)
        on diabetes, whose episode at lr 0.1 read :math:`\rho` = -6.7 and -0.10 (seeds 3 and
        4) or a stable rate of 0.08-0.09 (seeds 1 and 2), took windows x4 to 0.4, where 2 of 5
        seeds diverged (test MSE 0.582 over the other 3); with x2 none does (0.551). The
        character LSTM's good start 10.01 -> 9.95 and its large start 9.09 -> 9.10 (one seed
        each); ``FDSAdamW`` on the digits CNN from the large start 97.4 -> 98.2% (seed 0 94.7 ->
        98.3%) and from the good start 98.2 -> 97.9% (seed 1 98.1 -> 96.7%, whose x4 to lr
        0.008 in the middle windows had paid, at :math:`\rho` = -0.13), on the MLP's large
        start 96.9 -> 97.0%. The other 150 runs did not change. ``None`` (no start loss
        measured): no reading, Rprop's rule."""
        if ratio is None:
            return False
        return ratio <= 0.0 or (stable is not None and far is None)

    def _stable_rate(self, group: dict[str, Any], hypergrads: dict[str, list[float]],
                     loss: float, val_closure: Closure, rng: RngReplay) -> float | None:
        r"""The largest stable learning rate of the group's rule at the episode's end weights,
        where a far step will read it; else ``None``.

        Read only where the episode will take a far step (:data:`LINEAR_RATIO`, not at the edge,
        :data:`EDGE_RATIO`), gained at least :data:`STABLE_GAIN` of its start loss, and the rule
        has an edge of stability (:attr:`~hyperoptim.rules.base.UpdateRule.edge`; SGD's,
        :func:`~hyperoptim.rules.sgd.sgd_edge`: :math:`E = 2 (1 + m)` for heavy-ball momentum
        :math:`m`; Adam's step has none). Then, with :math:`\lambda` the largest eigenvalue of
        the validation loss's Hessian over the group's parameters
        (:func:`~hyperoptim.hvp.top_curvature`, :data:`CURVATURE_ITERATIONS` products by central
        differences of validation gradients, averaged across ranks like every validation
        gradient, each call drawing what the episode's own validation call drew from ``rng``)
        and :math:`c` the group's largest weight decay, the rate is :math:`E /
        (\lambda + c)` at the group's smallest momentum: above it a quadratic with that
        curvature diverges. The validation loss's curvature stands for the training loss's,
        read only where the two losses started the episode on one scale
        (:data:`SCALE_MATCH`). The weights and every random-number generator are left as they
        were, and ``p.grad`` is not touched.
        """
        if (self.rule.edge is None or "lr" not in group["tune"]
                or group.get("outer_step") != "log"):
            return None
        ratio = self._linear_ratio(group, hypergrads, loss)
        start = self.hyper_state.get("start_loss")
        if (ratio is None or not LINEAR_RATIO <= ratio <= EDGE_RATIO or start is None
                or not start - loss >= STABLE_GAIN * abs(start)):
            return None
        params = [p for p in group["params"] if p.requires_grad]
        if not params or not self._scales_match(start):
            return None
        curvature = self._validation_curvature(val_closure, params, rng)
        # The schedules' values the episode ran (every name of the rule has one).
        hypers = {**self.rule.hypers(group), "momentum": min(group["momentum_schedule"])}
        edge = self.rule.edge(hypers, self.rule.options(group))
        sharpness = curvature + max(max(group["weight_decay_schedule"]), 0.0)
        return edge / sharpness if math.isfinite(sharpness) and sharpness > 0.0 else None

    def _scales_match(self, start: float) -> bool:
        """Whether the training loss at the episode's first step (``start_train_loss``) and the
        validation loss ``start`` there are on one scale (:data:`SCALE_MATCH`); unknown (no
        training loss) counts as a match. Warns once where they are not."""
        train = self.hyper_state.get("start_train_loss")
        if train is None or (start != 0.0 and 1.0 / SCALE_MATCH <= train / start <= SCALE_MATCH):
            return True
        if not self.__dict__.get("_warned_scales"):
            self.__dict__["_warned_scales"] = True
            warn(f"{type(self).__name__}: the training loss started this episode at {train:.4g} "
                 f"and the validation loss at {start:.4g}, more than {SCALE_MATCH:g}x apart (a "
                 "loss summed over the batch against one averaged?). The far step reads the "
                 "validation loss's curvature in place of the training loss's only where both "
                 "are on one scale; it keeps the saturation model here. Put both losses on one "
                 "scale (the same reduction) for the curvature's step.")
        return False

    def _validation_curvature(self, val_closure: Closure, params: list[Tensor], rng: RngReplay
                              ) -> float:
        """The largest eigenvalue of the validation loss's Hessian over ``params`` at the live
        weights (:meth:`_stable_rate`); the weights are put back bit for bit."""
        sharded = any_sharded(params)
        shards = [local(p) for p in params]
        origin = [s.detach().clone() for s in shards]
        # The products' step h = sqrt(eps) (1 + |w|) along a unit vector (the finite-difference
        # route's, hvp/), kept on the device.
        eps = max(torch.finfo(s.dtype).eps for s in shards if s.is_floating_point())
        norm = torch.stack([s.detach().double().square().sum() for s in shards]).sum()
        norm = (sum_across_shards([norm])[0] if sharded else norm).sqrt()
        h = math.sqrt(eps) * (1.0 + norm)

        def gradient_at(vector: list[Tensor], sign: float) -> list[Tensor]:
            with torch.no_grad():
                for s, w, v in zip(shards, origin, vector, strict=True):
                    s.copy_(w + (sign * h).to(s.dtype) * v)
            with rng.replay():
                _, grads = self._validation_grads(val_closure, params)
            return [local(g) for g in grads]

        def product(vector: list[Tensor]) -> list[Tensor]:
            plus = gradient_at(vector, 1.0)
            minus = gradient_at(vector, -1.0)
            return [(a - b).div_((2.0 * h).to(a.dtype)) for a, b in zip(plus, minus, strict=True)]

        try:
            with torch.enable_grad():
                return top_curvature(product, shards, iterations=CURVATURE_ITERATIONS,
                                     sharded=sharded)
        finally:
            with torch.no_grad():
                for s, w in zip(shards, origin, strict=True):
                    s.copy_(w)
            rng.restore()

    def _aimed_far_step(self, group: dict[str, Any], stable: float) -> float | None:
        """The log step of a far step read by the curvature: from the group's largest
        learning rate to :data:`STABLE_SHARE` of the ``stable`` one, at most
        :data:`FAR_STEP_MAX`; ``None`` (Rprop's own step) where that is less than its first
        step: the rate is near or past the share already."""
        rates = [v for v in group["lr_schedule"] if v > 0]
        if not rates:
            return None
        aim = math.log(STABLE_SHARE * stable / max(rates))
        return min(aim, FAR_STEP_MAX) if aim >= self.log_step else None

    def _step_back(self, outer: dict[str, Any], group: dict[str, Any]) -> None:
        """Put every schedule of the group back where the last step took it from, halve every
        step and forget the signs; then probe the learning rate below that point by the halved
        log step (the loss-increase signal: a learning rate too large costs the run, one too
        small only time). The probe is a step like any other: a worse episode undoes it."""
        for name, state in outer.items():
            prev = state.pop("prev", None)
            if prev is None or len(prev) != len(group[f"{name}_schedule"]):
                continue
            state["step_size"] = [v * 0.5 for v in state["step_size"]]
            state["sign"] = [0.0] * len(state["sign"])
            if "far" in state:
                state["far"] = [0.0] * len(state["far"])
            schedule = list(prev)
            if "log_step" in state:
                state["log_step"] = [v * 0.5 for v in state["log_step"]]
                if name == "lr":
                    state["prev"] = list(prev)
                    lo, hi = self._bounds(name)
                    schedule = [min(max(v * math.exp(-s), lo), hi) if v > 0 else v
                                for v, s in zip(prev, state["log_step"], strict=True)]
            group[f"{name}_schedule"] = schedule

    def _warn_skipped_episode(self, log: bool) -> None:
        """Count a non-finite episode; warn at the 1st, 10th, 100th, ... (with
        ``outer_step="log"`` in some group, saying that the schedules were stepped back)."""
        if not log:
            self._warn_nonfinite("validation loss or hypergradient")
            return
        count = self.skipped_steps + 1
        self.hyper_state["skipped_steps"] = count
        if count == 10 ** round(math.log10(count)):
            warn(f"{type(self).__name__}: non-finite validation loss or hypergradient at the end "
                 "of an episode; outer_step='log' put the schedules back where the last outer "
                 "step took them from, with half the step (or, with no step to undo, divided "
                 f"the learning rates by {LOST_BACK_OFF:g}) ({count} episode"
                 f"{'s' if count > 1 else ''} so far; history[...]['skipped'] marks them).")

    def _sign_update(self, gi: int, group: dict[str, Any], hypergrads: dict[str, list[float]],
                     *, far: float | None = None, near: bool = False) -> None:
        r"""Move every tuned value of group ``gi`` against the sign of its hypergradient.

        The step of each window halves when the sign flips between consecutive hypersteps (a
        zero sign neither moves nor counts as a flip). With ``outer_step="additive"`` (the
        paper's) the value moves by :math:`\gamma`. With ``"log"``, a positive value of a
        name in :attr:`log_names` moves by a factor, :math:`\log\lambda \leftarrow
        \log\lambda - s\,\operatorname{sign}`, :math:`s` starting at :attr:`log_step` and
        doubling (up to :attr:`log_step_max`) while the sign repeats; every other value (the
        momentum, a value at or below zero) takes the additive step. The state is per window in
        ``hyper_state["outer"][gi][name]``: ``step_size`` (:math:`\gamma`), ``sign`` and, for
        the log step, ``log_step`` (:math:`s`). ``far``: the log step (:func:`far_step`) every
        learning-rate window that asks for more takes after an episode far below its rate
        (:data:`LINEAR_RATIO`), after which Rprop starts afresh. Where that step is a full
        decade (the model puts the rate at least that far) and a window's last step was a far
        step too, the window's step is that one times :attr:`far_growth` (its size kept in
        ``"far"``, 0 after any other step, where :attr:`far_growth` is above 1). ``near``: the
        episode reads its learning rate near or past its best (:meth:`_near_best`): a window
        of the learning rate that asks for more again takes its current log step, not a doubled
        one.
        """
        outer = self.hyper_state["outer"].setdefault(gi, {})
        log_space = group.get("outer_step", "additive") == "log"
        for name, hs in hypergrads.items():
            schedule = group[f"{name}_schedule"]
            n = len(schedule)
            state = outer.get(name)
            if state is None or len(state["step_size"]) != n:
                # Read through the normalisation: a value assigned after construction may be
                # a number or a partial dict.
                size = self._normalise_step_sizes(group["hyper_lr"])[name]
                state = {"step_size": [size] * n, "sign": [0.0] * n}
                outer[name] = state
            space = None
            if log_space and name in (*self.log_names, *self.log1m_names):
                space = "log" if name in self.log_names else "log1m"
                if len(state.get("log_step", ())) != n:
                    state["log_step"] = [self.log_step] * n
            elif log_space and name in self.unit_names:
                space = "unit"
            boost = far is not None and name == "lr" and space == "log"
            grows = name == "lr" and space == "log" and self.far_growth > 1.0
            if grows and len(state.get("far", ())) != n:
                state["far"] = [0.0] * n
            lo, hi = self._bounds(name)
            for k, h in enumerate(hs):
                sign = float((h > 0) - (h < 0))
                if boost and sign < 0:
                    # A decade up, and Rprop starts afresh from its first step in the new
                    # decade (the sign forgotten, as after a backtrack): a step kept at a decade
                    # took the demo's 4th episode from 0.1 to 1 once rho had fallen to 0.01.
                    size = far
                    if grows and far >= LOG_STEP_MAX and state["far"][k] > 0.0:
                        size = min(state["far"][k] * self.far_growth,
                                   self.log_step_max * self.far_growth)
                    state["log_step"][k], state["sign"][k] = size, 0.0
                    schedule[k] = min(max(self._moved(schedule[k], sign, state, k, space), lo),
                                      hi)
                    state["log_step"][k] = self.log_step
                    if grows:
                        state["far"][k] = size
                    continue
                if grows:
                    state["far"][k] = 0.0
                self._adapt_step(state, k, sign, grow=not (near and name == "lr" and sign < 0))
                # Bounded (LEARNED_LIMIT or the rule's range): a learned value can never overflow
                # the next episode.
                schedule[k] = min(max(self._moved(schedule[k], sign, state, k, space), lo), hi)

    def _adapt_step(self, state: dict[str, Any], k: int, sign: float, *, grow: bool = True
                    ) -> None:
        """Window ``k``'s steps before it moves: halved on a flip of sign; a log step (where
        the state has one) grows on a repeat, Rprop's growth: a sign that repeats says the
        value is still far (unless ``grow`` is false: :meth:`_near_best`)."""
        agree = sign * state["sign"][k]
        log_steps = state.get("log_step")
        if agree < 0:
            state["step_size"][k] *= 0.5
            if log_steps is not None:
                log_steps[k] *= 0.5
        elif agree > 0 and log_steps is not None and grow:
            log_steps[k] = min(log_steps[k] * self.log_growth, self.log_step_max)
        state["sign"][k] = sign

    @staticmethod
    def _moved(value: float, sign: float, state: dict[str, Any], k: int, space: str | None
               ) -> float:
        """``value`` after window ``k``'s step against ``sign``, before the bounds: by a factor
        in ``space`` (``"log"``: of the value, ``"log1m"``: of 1 - value) where the value is in
        its domain, else by the additive step."""
        if space == "log" and value > 0:
            # Positive stays positive: an underflow to 0 would hand it to the additive step.
            return max(value * math.exp(-sign * state["log_step"][k]), sys.float_info.min)
        if space == "unit" and value < 1.0:
            # The additive step, up at most halfway to 1: heavy ball diverges at a momentum of
            # 1 (0.9 + 0.15 made it 1.05 in one step). Down, below 0 too, as the paper's.
            moved = value - sign * state["step_size"][k]
            return min(moved, (value + 1.0) / 2, _LOG1M_MAX)
        if space == "log1m" and 0.0 <= value < 1.0:
            # d/dlog(1 - b) has the opposite sign of d/db; a decrease stops at 0.
            grown = (1.0 - value) * math.exp(sign * state["log_step"][k])
            return min(max(1.0 - grown, 0.0), _LOG1M_MAX)
        return value - sign * state["step_size"][k]
