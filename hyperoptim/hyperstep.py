r"""Hyper-step policies: how a hypergradient becomes the next value of a learned hyperparameter.

Every method computes a hypergradient :math:`h_t = \partial E / \partial a` of a learned value
:math:`a` (a learning rate); a *policy* turns it into the next value. The hypergradient is the
method's business and stays exact; the policy is written once here and used by every method.

A policy is a small frozen value with two pure functions on Python floats:

- ``init_state(value) -> dict`` of plain floats (kept in the optimizer's ``hyper_state``, so a
  ``state_dict`` resumes a run exactly, mid-growth included, and every DDP rank computes the same
  thing from the same all-reduced scalars);
- ``update(value, h, norm, state, *, momentum=0.0) -> (new_value, new_state)``, where ``h`` is the
  raw hypergradient, ``norm`` its scale normaliser (for the learning rate of hypergradient descent
  :math:`\lVert \nabla E(w_t) \rVert \, \lVert d_{t-1} \rVert`, so that ``-h / norm`` is the cosine
  of the new gradient and the previous step) and ``momentum`` the inner rule's momentum
  (SGD's momentum, Adam's :math:`\beta_1`), which sets how many steps the signal takes to answer
  a change of the value. Neither argument is modified; the caller commits ``new_state`` only if the
  step is taken, and clamps ``new_value`` to its bounds.

Policies:

- :class:`Additive` ``(kappa)``: :math:`a \leftarrow a - \kappa h`, Baydin et al.'s rule (every
  method's behaviour before this module, bit for bit). Scale-dependent: :math:`h` scales like the
  squared gradient, so a :math:`\kappa` right for one model is decades off for the next.
- :class:`Multiplicative` ``(beta)``: :math:`a \leftarrow a\,(1 - \beta \cos_t)`, with
  :math:`\cos_t = h_t / \text{norm}_t`; Martinez Rubio's normalised rule (MSc dissertation, eq.
  3.4). Invariant to rescaling the loss, the parameters and the initial value's decade; moves
  :math:`a` by at most a factor :math:`1 \pm \beta` per step, so it is slow from a far start.
- :class:`Growth` ``(beta, factor)``: a bracketing phase, then :class:`Multiplicative`. While the
  cosine keeps its first sign, :math:`a` is multiplied (or divided) by
  ``factor ** (1 - momentum)`` per step; at the first change of sign it steps back once.
- :class:`AdamLog` ``(lr, betas)``: Adam on :math:`\log a` with the gradient
  :math:`\partial E / \partial \log a = a h`; each step moves :math:`\log a` by about ``lr``.
- :class:`ScaleFree` (the reasoning is in its docstring): Adam-normalised steps on
  :math:`\log a` with little hyper-momentum, a fast reactive decrease while the training
  loss runs away, with ``accel`` > 1 accelerated growth until the loss first moves, and with
  ``streak`` > 0 a fast decrease once that many hypergradients in a row ask for less.

:func:`resolve` turns a policy, its name (``"scale_free"``) or its ``repr``
(``"ScaleFree(beta=0.05)"``) into a policy; param groups keep the ``repr`` (a plain string, so a
``state_dict`` loads with ``torch.load(weights_only=True)``).

Example:
    >>> policy = Growth(beta=0.05, factor=2.0)
    >>> state = policy.init_state(0.01)
    >>> a = 0.01
    >>> for h in (-1.0, -1.0, 1.0, 0.5):   # two steps that ask for more, then opposition
    ...     a, state = policy.update(a, h, norm=2.0, state=state)
    >>> round(a, 6), state["phase"]
    (0.01975, 1.0)
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = ["POLICIES", "RUNAWAY_STATE", "AdamLog", "Additive", "Growth", "HyperStep",
           "Multiplicative", "ScaleFree", "check_stall", "moved", "new_stall", "react", "resolve",
           "watch_stall"]


def _cosine(h: float, norm: float) -> float | None:
    """:math:`h / \text{norm}` clamped to [-1, 1]; ``None`` when there is no signal (the first
    step, a zero gradient or direction) or it is not finite."""
    if not (norm > 0.0 and math.isfinite(norm) and math.isfinite(h)):
        return None
    return min(max(h / norm, -1.0), 1.0)


@dataclasses.dataclass(frozen=True)
class HyperStep:
    """Base of the policies (see the module docstring for the interface)."""

    #: The name :func:`resolve` accepts.
    name: ClassVar[str] = ""
    #: Whether :meth:`update` reads ``norm`` (the optimizer skips computing it otherwise).
    normalised: ClassVar[bool] = True
    #: Whether :meth:`update` reads ``loss``.
    uses_loss: ClassVar[bool] = False

    def init_state(self, value: float) -> dict[str, float]:
        return {}

    def update(self, value: float, h: float, norm: float, state: dict[str, float], *,
               momentum: float = 0.0, loss: float | None = None
               ) -> tuple[float, dict[str, float]]:
        raise NotImplementedError

    def phase(self, state: dict[str, float]) -> float:
        """A float for ``history``: 0 while bracketing, 1 after (policies without phases: 1)."""
        return float(state.get("phase", 1.0))


@dataclasses.dataclass(frozen=True)
class Additive(HyperStep):
    r""":math:`a \leftarrow a - \kappa h` (Baydin et al., 2018): the raw hypergradient times a
    fixed hyper-learning rate ``kappa``. ``kappa=None`` reads the param group's
    ``hyper_lr``."""

    kappa: float | None = None
    name: ClassVar[str] = "additive"
    normalised: ClassVar[bool] = False

    def update(self, value: float, h: float, norm: float, state: dict[str, float], *,
               momentum: float = 0.0, loss: float | None = None
               ) -> tuple[float, dict[str, float]]:
        if self.kappa is None:
            raise ValueError("Additive(): kappa is read from the param group's hyper_lr")
        return value - self.kappa * h, state


@dataclasses.dataclass(frozen=True)
class Multiplicative(HyperStep):
    r""":math:`a \leftarrow a\,(1 - \beta \cos_t)`, :math:`\cos_t = h_t / \text{norm}_t`
    (Martinez Rubio, eq. 3.4). ``beta`` in (0, 1)."""

    beta: float = 0.05
    name: ClassVar[str] = "multiplicative"

    def update(self, value: float, h: float, norm: float, state: dict[str, float], *,
               momentum: float = 0.0, loss: float | None = None
               ) -> tuple[float, dict[str, float]]:
        cos = _cosine(h, norm)
        if cos is None:
            return value, state
        return value * (1.0 - self.beta * cos), state


@dataclasses.dataclass(frozen=True)
class Growth(HyperStep):
    r"""Bracketing, then :class:`Multiplicative`.

    The first informative step fixes a direction :math:`s_0 = -\operatorname{sign} \cos`
    (+1: the value should grow). While :math:`-\operatorname{sign}\cos_t = s_0` the value is
    multiplied by :math:`f^{s_0}`, :math:`f =` ``factor`` :math:`^{1 - m}` with :math:`m` the
    inner momentum: a heavy-ball buffer answers a new learning rate in about :math:`1/(1-m)`
    steps, so the value doubles once per response time (an unscaled x2 per step overshoots with
    momentum 0.9). At the first opposite sign it steps back once (divides by :math:`f^{s_0}`) and
    the multiplicative rule takes over.
    """

    beta: float = 0.05
    factor: float = 2.0
    name: ClassVar[str] = "growth"

    def init_state(self, value: float) -> dict[str, float]:
        return {"phase": 0.0, "direction": 0.0}

    def update(self, value: float, h: float, norm: float, state: dict[str, float], *,
               momentum: float = 0.0, loss: float | None = None
               ) -> tuple[float, dict[str, float]]:
        cos = _cosine(h, norm)
        if cos is None:
            return value, state
        if state["phase"] == 0.0:
            return _bracket(value, cos, state, self.factor ** (1.0 - momentum),
                            self.factor ** (1.0 - momentum))
        return value * (1.0 - self.beta * cos), state


def _bracket(value: float, cos: float, state: dict[str, float], up: float, down: float
             ) -> tuple[float, dict[str, float]]:
    """One bracketing step: multiply by ``up`` (direction +1) or divide by ``down`` (-1) while
    the signal keeps its first sign; at the first change step back once and end the phase."""
    sign = 1.0 if cos < 0.0 else -1.0 if cos > 0.0 else 0.0
    direction = state["direction"] or sign
    if sign == 0.0:
        return value, {**state, "direction": direction}
    if sign == direction:
        return value * (up if direction > 0 else 1.0 / down), {**state, "direction": direction}
    back = value / up if direction > 0 else value * down
    return back, {**state, "direction": direction, "phase": 1.0}


def _moves(value: float, g: float, state: dict[str, float]) -> bool:
    r"""Whether :math:`g = a h` moves Adam's moments on :math:`\log a`: finite, :math:`a > 0`, and
    not a zero gradient before any scale is known."""
    return math.isfinite(g) and value > 0.0 and not (g == 0.0 and state["v"] == 0.0)


def _moments(g: float, state: dict[str, float], beta1: float, beta2: float) -> dict[str, float]:
    """Adam's moments ``m``, ``v`` and step count ``t`` after the gradient ``g``."""
    return {"m": beta1 * state["m"] + (1.0 - beta1) * g,
            "v": beta2 * state["v"] + (1.0 - beta2) * g * g, "t": state["t"] + 1.0}


def _corrected(moments: dict[str, float], beta1: float, beta2: float) -> tuple[float, float]:
    r"""Adam's bias-corrected moments :math:`(\hat m, \hat v)`."""
    t = moments["t"]
    return moments["m"] / (1.0 - beta1 ** t), moments["v"] / (1.0 - beta2 ** t)


@dataclasses.dataclass(frozen=True)
class AdamLog(HyperStep):
    r"""Adam on :math:`\log a`: gradient :math:`g = a h` (:math:`= \partial E / \partial \log a`),
    :math:`\log a \leftarrow \log a - \eta\, \hat m / \sqrt{\hat v}` with Adam's moments and bias
    corrections and no :math:`\epsilon` (a step is skipped while :math:`\hat v = 0`), so the rule
    is exactly invariant to the scale of the loss and of the value. ``lr`` (:math:`\eta`) is in
    natural-log units per step."""

    lr: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    name: ClassVar[str] = "adam_log"
    normalised: ClassVar[bool] = False

    def init_state(self, value: float) -> dict[str, float]:
        return {"m": 0.0, "v": 0.0, "t": 0.0}

    def update(self, value: float, h: float, norm: float, state: dict[str, float], *,
               momentum: float = 0.0, loss: float | None = None
               ) -> tuple[float, dict[str, float]]:
        g = value * h
        if not _moves(value, g, state):
            return value, state
        moments = _moments(g, state, self.beta1, self.beta2)
        if moments["v"] == 0.0:  # g * g underflowed: no scale to normalise by yet
            return value, state
        m_hat, v_hat = _corrected(moments, self.beta1, self.beta2)
        step = self.lr * m_hat / math.sqrt(v_hat)
        return value * math.exp(-step), moments


@dataclasses.dataclass(frozen=True)
class ScaleFree(HyperStep):
    r"""The scale-free policy: Adam-normalised steps on :math:`\log a` with little
    hyper-momentum, and a fast reactive decrease when the training loss runs away.

    1. *Normalised steps on the log value.* With :math:`g_t = a h_t = \partial E / \partial
       \log a`, Adam's moments (``beta1``, ``beta2``, bias-corrected, no :math:`\epsilon`) give
       :math:`r_t = \hat m_t / \sqrt{\hat v_t}`, which does not depend on the scale of the loss,
       of the parameters or of :math:`a`; :math:`\log a` moves by :math:`-\eta r_t` with
       :math:`\eta` = ``up`` when growing (:math:`r_t < 0`) and ``down`` when shrinking. A start
       :math:`10^k` away follows the same steps, only for longer: 100x takes about
       :math:`4.6/\eta` steps of consistent signal (23 at 0.2), in either direction.
       Why these choices (``benchmarks/hyperstep_policy.py``, three tasks, SGD with momentum 0.9
       and Adam, three starts): the normalised multiplicative rule and its growth phase read
       single-step cosines, which on the digits CNN started 10x too large stay at +0.1 to +0.5
       while the run dies, and whose growth phase ends at the first noisy sign flip from 100x
       too small; Adam's normalisation turns the same weak but consistent signal into full
       steps. ``beta1`` = 0.5: with Adam's 0.9 the value kept climbing after its signal had
       turned and killed the CNN from its good start (lr 0.1 -> 0.44 in 16 steps, dead ReLUs)
       at :math:`\eta` = 0.15. :math:`\eta` = 0.1 left diabetes from its large start 17% worse
       (4 seeds) and lost the CNN at 0.05; pacing growth by the inner momentum
       (:math:`\ln 2\,(1 - m)` per step) left Adam's CNN at 55% from 100x too small.
    2. *Reactive decrease.* While the training loss is above its smoothed running minimum
       :math:`\ell` (an EMA with weight ``smooth``) by more than the run's own scale,
       :math:`L_t > \ell + \max(L_0 - \ell, |\ell|)`, no step is taken on the hypergradient and
       Adam's moments stay cleared, and at each new high of the loss since that alarm began the
       value is divided by ``shrink``. The training loss sees a runaway before any one-step
       hypergradient: on a 24-row full-batch regression (``tests/test_robustness.py``) the cosine
       stayed below -0.87 up to lr 2.5 and one step at 2.9 threw the loss from 0.27 to 11 (a
       catapult); halving per step, with the hypergradient still asking for more, let it climb to
       489, and only a division by 10 brought the net back. The moments stay cleared because the
       runaway's hypergradients, remembered by the second moment, held a tiny regression's
       learning rate still for 150 steps; only a *new* high shrinks again because a run the
       runaway broke sits at a high, noisy loss that rises half the time (MartheSGD's lr went to
       1e-188). The scale is the base's divergence warning's, so minibatch noise late in training
       (batch losses several times the running minimum, yet far below the first loss) does not
       trip it. Invariant to scaling the loss by :math:`c > 0`; off without a loss (a closure
       that returns none). It cannot undo a single step that kills a ReLU network; the small
       hyper-momentum and the cap on growth (``cap`` times ``up`` per step: Adam's ratio exceeds
       1 while :math:`g = a h` grows with :math:`a`, and uncapped a digits MLP's lr grew 37x in 8
       steps, past its edge) are what prevent those.
    3. *Accelerated growth while the run is stalled* (``accel`` > 1; off in ``ScaleFree()``,
       on in the defaults ``ScaleFree(accel=1.5, streak=20)`` of the hypergradient-descent and MARTHE
       classes). At ``up`` = 0.2 a start 1000x too small (the character LSTM's from lr
       1e-5 or 1e-3) spends 35 of a 100-step budget climbing. While the training loss is still
       within ``gate`` (3%) of its first value, the run has not started learning, and each
       growth step that hits the cap is ``accel`` times the last, up to ``reach`` times ``up``
       (:math:`e^{1.6}` = 5x a step at the defaults): 100x in 7 steps, 1000x in 9. The first
       loss that leaves that band ends it for good and steps back the last accelerated step,
       which the loss had not yet answered: a fall (on the digits MLP from Adam's good start,
       gated by a smoothed loss instead, the climb ran to lr 0.32 in 8 steps and the run died in
       1 of 5 seeds) or a rise (MartheAdamW's digits CNN: 2.30 -> 2.87 after a step at lr 0.078,
       below the runaway alarm, and the net died at 0.45). A runaway ends it too, and an
       unsaturated step restarts the run at ``up``. It is for a signal that answers a new value
       within a step or two: over heavy-ball SGD MARTHE's tangent carries the momentum's past,
       and accelerated alone it killed MartheSGD's digits CNN from the poor start (7.8%);
       ``MartheSGD`` takes it with its momentum learned in the same stall, which keeps up.
       Invariant to the loss's scale (the gate is relative) and to the start's decade.
    4. *Fast decrease on a consistent signal* (``streak`` > 0; off in ``ScaleFree()``, 20 in
       the defaults of the hypergradient-descent and MARTHE classes). Once the last ``streak``
       hypergradients have all asked for a lower value, the step down is normalised by a second
       moment of short memory (``fast_beta2`` = 0.9, bias-corrected) instead of ``beta2``'s, and
       held to ``cap`` times ``down``; the first hypergradient that does not ask for less ends
       it. ``beta2``'s long memory is what keeps minibatch noise from steering the value late in
       a run, but it also remembers the early hypergradients, which are large (:math:`g = a h`,
       and both :math:`a` and :math:`h` shrink), so a late, clean and consistent signal moves the
       value by about 1% a step: on full-batch diabetes (``benchmarks/versus.py``) Adam from lr
       1e-2 met its lowest validation loss by step 40 and then overfit for 560 steps while its
       learning rate fell only 0.019 -> 0.0005 (test MSE 0.77 against 0.68 from lr 1e-3, 0.56
       with the fast decrease). Minibatch noise breaks a run of signs long before 20 (on the
       digits tasks and the character LSTM it changed no Adam run and a few SGD runs by one test
       example), so it acts where the signal is deterministic: a decrease only, since a value
       too small costs steps and one too large can cost the run. Invariant to the loss's scale
       and to the value's decade, as 1. is.
    """

    up: float = 0.2
    down: float = 0.2
    beta1: float = 0.5
    beta2: float = 0.999
    shrink: float = 10.0
    smooth: float = 0.1
    cap: float = 1.0
    accel: float = 1.0
    reach: float = 8.0
    gate: float = 0.03
    streak: int = 0
    fast_beta2: float = 0.9
    name: ClassVar[str] = "scale_free"
    normalised: ClassVar[bool] = False
    uses_loss: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not (isinstance(self.streak, int) and not isinstance(self.streak, bool)
                and self.streak >= 0):
            raise ValueError(f"Invalid streak value: {self.streak!r} (an int >= 0; 0 is off)")
        if not 0.0 <= self.fast_beta2 < 1.0:
            raise ValueError(f"Invalid fast_beta2 value: {self.fast_beta2!r} (in [0, 1))")

    def init_state(self, value: float) -> dict[str, float]:
        fast = {"streak": 0.0, "vf": 0.0} if self.streak else {}
        return {"m": 0.0, "v": 0.0, "t": 0.0, "run": 0.0, "settled": 0.0, **RUNAWAY_STATE, **fast}

    def update(self, value: float, h: float, norm: float, state: dict[str, float], *,
               momentum: float = 0.0, loss: float | None = None
               ) -> tuple[float, dict[str, float]]:
        if loss is None or not math.isfinite(loss):
            return self._log_step(value, h, state, stalled=False)
        divisor, state = react(loss, state, shrink=self.shrink, smooth=self.smooth)
        if divisor is None:
            if self.accel != 1.0 and not state.get("settled", 1.0) and self._moved(loss, state):
                # The loss has moved (fallen, or risen on an overshoot): acceleration ends for
                # good, and its last step, taken before the loss could answer it, is stepped back
                # (no step this time).
                run, state = state.get("run", 0.0), {**state, "run": 0.0, "settled": 1.0}
                if run > 1.0:
                    return value * math.exp(-self._growth(run - 1.0)), state
            return self._log_step(value, h, state, stalled=not state.get("settled", 1.0))
        # A runaway: no step on its hypergradient (the one-step signal can still ask for more
        # as the loss explodes), and its hypergradients are kept out of the moments (a second
        # moment that remembers them holds the value still for hundreds of steps afterwards).
        cleared = {"m": 0.0, "v": 0.0, "t": 0.0, "run": 0.0, "settled": 1.0}
        if self.streak:
            cleared.update(streak=0.0, vf=0.0)
        return value / divisor if divisor != 1.0 else value, {**state, **cleared}

    def _moved(self, loss: float, state: dict[str, float]) -> bool:
        """Whether the training ``loss`` has moved from its first value by more than ``gate`` of
        it, down (the run has started learning) or up (the climb overshot; 3. above)."""
        return moved(state["first"], loss, self.gate)

    def _growth(self, run: float) -> float:
        """The log-step of growth after ``run`` capped steps of a stalled run (3. above)."""
        return self.up * self.cap * min(self.accel ** run, self.reach)

    def _log_step(self, value: float, h: float, state: dict[str, float], *, stalled: bool
                  ) -> tuple[float, dict[str, float]]:
        r"""The normalised step on :math:`\log a` (1. above), :math:`\eta` by its direction, and
        the accelerated growth of a stalled run (3.)."""
        g = value * h
        if not _moves(value, g, state):
            return value, state
        moments = _moments(g, state, self.beta1, self.beta2)
        if not moments["v"] > 0.0:
            return value, state
        m_hat, v_hat = _corrected(moments, self.beta1, self.beta2)
        # Adam's ratio at a first step is the sign of g exactly; computed, it lands an ulp or two
        # either side of the cap by g's mantissa (about 3% of values), so a start's decade could
        # decide whether its first growth step counted as capped (the run of 3. above).
        r = math.copysign(1.0, m_hat) if moments["t"] == 1.0 else m_hat / math.sqrt(v_hat)
        if self.streak:
            moments.update(self._fast_moment(g, state))
            if moments["streak"] >= self.streak:  # 4. above: a consistent signal to decrease
                v_fast = moments["vf"] / (1.0 - self.fast_beta2 ** moments["t"])
                r = min(m_hat / math.sqrt(v_fast), self.cap) if v_fast > 0.0 else r
        # A growing signal (g = a h grows with a) takes Adam's ratio above 1: growth is capped at
        # ``cap * up`` per step, times accel ** run while a stalled run keeps hitting the cap.
        run = state.get("run", 0.0) if stalled else 0.0
        if r <= -self.cap:
            step = -self._growth(run)
            run = run + 1.0 if stalled else 0.0
        else:
            step = self.up * r if r < 0.0 else self.down * r
            run = 0.0
        return value * math.exp(-step), {**state, **moments, "run": run}

    def _fast_moment(self, g: float, state: dict[str, float]) -> dict[str, float]:
        """The run of hypergradients asking for a lower value (``g > 0``) and the short-memory
        second moment of 4. above, after the gradient ``g``."""
        return {"streak": state.get("streak", 0.0) + 1.0 if g > 0.0 else 0.0,
                "vf": self.fast_beta2 * state.get("vf", 0.0) + (1.0 - self.fast_beta2) * g * g}

    def phase(self, state: dict[str, float]) -> float:
        return 1.0


#: The state :func:`react` starts from (plain floats: a ``state_dict`` resumes it exactly).
RUNAWAY_STATE: dict[str, float] = {"seen": 0.0, "first": 0.0, "ema": 0.0, "low": 0.0, "prev": 0.0,
                                   "alarmed": 0.0, "peak": 0.0}


def react(loss: float, state: dict[str, float], *, shrink: float = 10.0, smooth: float = 0.1,
          margin: float = 1.0) -> tuple[float | None, dict[str, float]]:
    r"""The reactive decrease of :class:`ScaleFree` (2. in its docstring), on its own: what a
    finite training ``loss`` says about the learning rate, and the watch's next state.

    Returns ``(divisor, state)``: ``divisor`` is ``None`` while the loss stays within the run's
    own scale (:math:`L_t \le \ell + m \max(L_0 - \ell, |\ell|)`, :math:`\ell` the smoothed
    running minimum, :math:`m` the ``margin``: 1 for :class:`ScaleFree`, 2 for IFT), else
    ``shrink`` at a new high of a loss still rising since the alarm began, and ``1.0`` otherwise
    (a loss stuck high, or noise around it: shrinking there would take the value to 0). Nothing
    is modified; the caller commits ``state`` when its step is taken.
    :class:`ScaleFree` reads it at every hyper-step, and :class:`~hyperoptim.IFTOptimizer` (and
    the other IFT classes) at every step, where their hyper-updates come too seldom to catch a
    runaway (``reactive_decrease``).

    Example:
        >>> state = dict(RUNAWAY_STATE)
        >>> for loss in (1.0, 0.9, 3.0, 9.0):
        ...     divisor, state = react(loss, state)
        >>> divisor   # 9.0 is a new high of a runaway
        10.0
    """
    alarm, rising, state = _watch(loss, state, smooth, margin)
    if not alarm:
        return None, {**state, "alarmed": 0.0}
    higher = not state.get("alarmed", 0.0) or loss > state["peak"]
    return (shrink if rising and higher else 1.0,
            {**state, "alarmed": 1.0, "peak": loss if higher else state["peak"]})


def moved(first: float, loss: float, gate: float) -> bool:
    r"""Whether a training ``loss`` has left the band of a stalled run around its ``first`` value,
    :math:`|L_t - L_0| > g |L_0|`, either way: the gate of :class:`ScaleFree`'s accelerated growth
    and of IFT's accelerated warm-up.

    Example:
        >>> moved(2.0, 2.05, 0.03), moved(2.0, 1.9, 0.03)
        (False, True)
    """
    return abs(first - loss) > gate * abs(first)


def new_stall() -> dict[str, Any]:
    """A stall watch's state at the start of a run: no loss seen yet, stalled (IFT's accelerated
    warm-up, and a momentum learned while the run is stalled)."""
    return {"first": None, "stalled": True}


def check_stall(state: Any) -> bool:
    """Whether ``state`` (a saved ``hyper_state["stall"]``) has the structure :func:`new_stall`
    gives."""
    return (isinstance(state, Mapping) and set(state) == {"first", "stalled"}
            and isinstance(state["stalled"], bool)
            and (state["first"] is None or isinstance(state["first"], float)
                 and math.isfinite(state["first"])))


def watch_stall(state: Mapping[str, Any], loss: float | None) -> dict[str, Any]:
    r"""The stall state after a step whose training loss is ``loss`` (``None``: the step gave
    none). Stalled while every loss so far is within :class:`ScaleFree`'s ``gate`` of the first,
    :math:`|L_t - L_0| \le 0.03 |L_0|`; a loss outside it, or a step without a finite loss,
    ends it for good. Nothing is modified: the caller commits the result when its step is taken.

    Example:
        >>> state = new_stall()
        >>> for loss in (2.0, 2.05, 1.9):
        ...     state = watch_stall(state, loss)
        >>> state
        {'first': 2.0, 'stalled': False}
    """
    if not state["stalled"]:
        return dict(state)
    if loss is None or not math.isfinite(loss):
        return {**state, "stalled": False}
    if state["first"] is None:
        return {"first": float(loss), "stalled": True}
    return {**state, "stalled": not moved(state["first"], loss, ScaleFree.gate)}


def _watch(loss: float, state: dict[str, float], smooth: float, margin: float
           ) -> tuple[bool, bool, dict[str, float]]:
    """``(alarm, rising, state)``: whether the finite training ``loss`` is above the run's own
    scale, whether it is still rising, and the state with the loss recorded."""
    if state["seen"] == 0.0:
        return False, False, {**state, "seen": 1.0, "first": loss, "ema": loss, "low": loss,
                              "prev": loss}
    ema = (1.0 - smooth) * state["ema"] + smooth * loss
    low = min(state["low"], ema)
    scale = max(state["first"] - low, abs(low))
    return loss > low + margin * scale, loss > state["prev"], {**state, "ema": ema, "low": low,
                                                                "prev": loss}


#: Every policy by its name.
POLICIES: dict[str, type[HyperStep]] = {
    cls.name: cls for cls in (Additive, Multiplicative, Growth, AdamLog, ScaleFree)
}
_BY_CLASS = {cls.__name__: cls for cls in POLICIES.values()}


def resolve(spec: HyperStep | str) -> HyperStep:
    """A policy from a policy, a name in :data:`POLICIES` or a policy's ``repr``.

    Example:
        >>> resolve("growth")
        Growth(beta=0.05, factor=2.0)
        >>> resolve("Multiplicative(beta=0.1)") == Multiplicative(0.1)
        True
    """
    if isinstance(spec, HyperStep):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"Invalid hyper_step value: {spec!r}")
    return _parse(spec)


@functools.lru_cache(maxsize=64)
def _parse(spec: str) -> HyperStep:
    """:func:`resolve` for strings (cached: optimizers resolve their groups' policy every step,
    and policies are immutable)."""
    if spec in POLICIES:
        return POLICIES[spec]()
    try:
        call = ast.parse(spec.strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                and call.func.id in _BY_CLASS and not call.args):
            raise ValueError
        kwargs: dict[str, Any] = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        return _BY_CLASS[call.func.id](**kwargs)
    except (SyntaxError, ValueError, TypeError) as error:
        raise ValueError(f"Invalid hyper_step value: {spec!r} (a policy, one of "
                         f"{sorted(POLICIES)}, or a policy's repr)") from error
