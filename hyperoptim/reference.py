r"""Reference hypergradients: the exact unrolled oracle, finite differences, DrMAD.

Every hypergradient test in the package compares against these (docs/design.md §5). They are
slow and obviously correct rather than fast.

**Any rule** (:func:`rule_unroll`, :func:`rule_unrolled_hypergrad`,
:func:`rule_finite_difference_hypergrad`). One inner run written once over an
:class:`~hyperoptim.rules.UpdateRule` :math:`\Phi`: from the rule's fresh state :math:`s_0` (or
given buffers), :math:`(w_{t+1}, s_{t+1}) = \Phi(w_t, \nabla L_t(w_t), s_t; \lambda_t)` by the
rule's own pure step, with a piecewise-constant schedule for *every* hyperparameter of the rule
(window :math:`k` of :math:`N_x` covers steps :math:`[kT/N_x, (k+1)T/N_x)`), and the three
estimators below (forward run, exact reverse mode, central differences) over it. Nothing in them
knows a rule's formula, so a new rule gets its oracle by being a rule. The SGD and Adam functions
further down are these with their optimizers' argument names. The exact estimator differentiates
the rule with tensor hyperparameters; where a rule's float step skips work at a value of exactly
0 (SGD's momentum), finite differences see the float step, so compare them away from such zeros
(the SGD functions take the limit there, below).

**The inner run.** :math:`T` steps of ``torch.optim.SGD``'s rule (:mod:`hyperoptim.rules`, the
very function the optimizers use) from weights :math:`w_0`, with piecewise-constant schedules: the
learning rate :math:`a`, momentum :math:`b` and weight decay :math:`c` each have :math:`N_x` values,
value :math:`k` being used on the window of steps :math:`[kT/N_x, (k+1)T/N_x)`
(:func:`hyperoptim.core.schedule.window_of`; a window may be a single step, a plain float is one window
for all :math:`T` steps). With :math:`L_t` the training loss of batch :math:`t` and dampening
:math:`\delta`,

.. math::

    g_t &= \nabla L_t(w_t) + c_t w_t \\
    v_{t+1} &= b_t v_t + (1-\delta) g_t \qquad (v_1 = g_0 \text{ unless } v_0 \text{ is given})
        \\
    d_t &= v_{t+1} \ \text{(heavy ball)} \quad\text{or}\quad g_t + b_t v_{t+1}
        \ \text{(Nesterov)} \\
    w_{t+1} &= w_t - a_t d_t,

written :math:`(w_{t+1}, v_{t+1}) = \Phi_t(w_t, v_t; a_t, b_t, c_t)`. The objective is the
validation loss at the end, :math:`E(w_T)`, and the hypergradient is its derivative with respect to
every schedule value :math:`\lambda = (a_1..a_{N_a}, b_1..b_{N_b}, c_1..c_{N_c})`.

**Exact reverse mode** (:func:`unrolled_hypergrad`, "Diff-through-Opt"; Maclaurin et al. 2015, the
thesis' Algorithm 2). The forward pass runs with the schedules as tensors that require grad and
takes each :math:`\nabla L_t` with ``create_graph=True``; one backward pass then carries the
adjoints :math:`\hat w_t = \partial E / \partial w_t`, :math:`\hat v_t = \partial E / \partial v_t`
back through every step:

.. math::

    \hat w_T = \nabla E(w_T),\quad \hat v_T = 0,\qquad
    (\hat w_t, \hat v_t, \hat\lambda_t) = (\hat w_{t+1}, \hat v_{t+1})^\top
        \frac{\partial \Phi_t}{\partial (w_t, v_t, \lambda)},\qquad
    \frac{dE}{d\lambda} = \sum_t \hat\lambda_t,

so that, for instance, :math:`dE/da_k = -\sum_{t \in W_k} \langle \hat w_{t+1}, d_t \rangle`, and
each step of the :math:`\hat w` recursion takes one Hessian-vector product :math:`H_t \hat g_t`
(:math:`\hat g_t` the adjoint of :math:`g_t`) by double backward.
Everything is float64. **Memory grows linearly with** :math:`T`: the autograd graph keeps, for every
step, the weights, the buffers, the gradient and the graph of the gradient (for the double
backward), about :math:`T` times the memory of one training step with its activations. That is the
cost forward mode (``FDSSGD``: memory flat in :math:`T`) avoids.

**Finite differences** (:func:`finite_difference_hypergrad`): for each schedule value separately,
:math:`(E(\lambda + \varepsilon e_i) - E(\lambda - \varepsilon e_i)) / 2\varepsilon`, from
:math:`2(N_a + N_b + N_c)` forward runs in float64; error
:math:`O(\varepsilon^2 \partial^3 E) + O(u |E| / \varepsilon)` with :math:`u = 2^{-53}`.

**DrMAD** (:func:`drmad_hypergrad`; Fu et al. 2016, the thesis' Algorithm 3). The same reverse
recursion, with the Jacobians of :math:`\Phi_t` evaluated at *reconstructed* states instead of the
stored trajectory, so memory is that of a few copies of the weights whatever :math:`T`. The weights
are spaced uniformly on the straight line from :math:`w_0` to :math:`w_T` (Algorithm 3, line 5), and
the momentum buffer entering step :math:`t \ge 1` is the one that line implies for step
:math:`t-1`, from :math:`w_t - w_{t-1} = -a_{t-1} d_{t-1}` (as DrMAD's code recovers its velocity):

.. math::

    \tilde w_t &= (1 - t/T)\, w_0 + (t/T)\, w_T, \qquad \Delta = (w_0 - w_T) / T \\
    \tilde v_t &= \Delta / a_{t-1} \ \text{(heavy ball)} \quad\text{or}\quad
        (\Delta / a_{t-1} - \tilde g_{t-1}) / b_{t-1} \ \text{(Nesterov; } \tilde g_{t-1}
        \text{ if } b_{t-1} = 0),\qquad \tilde v_0 = v_0,

with :math:`\tilde g_{t-1} = \nabla L_{t-1}(\tilde w_{t-1}) + c_{t-1} \tilde w_{t-1}`.

*When it is exact.* The result equals :func:`unrolled_hypergrad`'s whenever
:math:`\tilde w_t = w_t` for every :math:`t`, i.e. the iterates are **equally spaced** on the
segment: the reconstructed buffers are then the true ones too (each step moves by
:math:`-a_t d_t`, and :math:`d_t` determines :math:`v_{t+1}`), so every Jacobian is taken at the
true state. Equal spacing holds for a constant training gradient (a linear training loss) with one
learning rate and one momentum value and no weight decay, without momentum or with the buffer
started at its fixed point :math:`v_0 = (1-\delta) \nabla L / (1 - b)`; and trivially for
:math:`T = 1`. A straight path is not enough: on an isotropic quadratic
:math:`\tfrac h2\|w - w^*\|^2` without momentum the path is straight but the steps shrink by the
factor :math:`q = 1 - ah`, and DrMAD gives
:math:`dE/da = -h^2 q^T \|w_0 - w^*\|^2 \sum_t q^{T-1-t} (1 - \tfrac tT (1 - q^T))` instead of
the exact :math:`-T h^2 q^{2T-1} \|w_0 - w^*\|^2`: right sign, wrong size (the tests check both
formulas). On 20 steps of a small logistic regression the tests measure relative errors of 0.1 %
to 24 % with the right signs; with schedules (a learning rate decaying over four windows from 0.5
to 0.05, two momentum and two weight decay windows) the uniform spacing, blind to the shrinking
steps, moves hypergradient between windows: still the right signs, but a relative error of 1.6 on
the learning rates (cosine 0.94). DrMAD needs every learning rate value to be positive.

**Momentum exactly 0.** The schedules are differentiated as tensors, so the buffer is kept in every
window (:math:`v_{t+1} = g_t` where :math:`b_t = 0`): the limit of ``torch.optim.SGD`` as the
momentum tends to 0, which gives the same weights as ``torch.optim.SGD`` except after a window of
momentum 0 followed by one with momentum (PyTorch then resumes from the buffer it had before that
window, or starts a new one).
Dampening with a window of momentum 0 is refused: there ``torch.optim.SGD`` steps along :math:`g_t`
while the limit steps along :math:`(1-\delta) g_t`, and no derivative exists.

**Adam and AdamW** (:func:`adam_unroll`, :func:`adam_unrolled_hypergrad`,
:func:`adam_finite_difference_hypergrad`). The same three estimators over ``torch.optim.Adam``'s
rule (:func:`hyperoptim.rules.adam.adam_step`, the function the Adam optimizers apply) from fresh
moments, with a learning-rate schedule in windows and constant :math:`\beta_1, \beta_2, \lambda`,
``decoupled_weight_decay=True`` for AdamW; the reverse pass carries adjoints of the weights and both
moments and returns :math:`dE/d` (each learning-rate window, :math:`\beta_1`, :math:`\beta_2`,
:math:`\lambda`). ``adam_unroll`` is bit-identical to ``torch.optim.Adam``/``AdamW``
(``foreach=False``).

References:
    D. Maclaurin, D. Duvenaud, R. P. Adams. Gradient-based Hyperparameter Optimization through
    Reversible Learning. ICML 2015.

    J. Fu, H. Luo, J. Feng, K. H. Low, T.-S. Chua. DrMAD: Distilling Reverse-Mode Automatic
    Differentiation for Optimizing Hyperparameters of Deep Neural Networks. IJCAI 2016.

    The MSc thesis on DrMAD and adaptive methods (../shared/papers/drmad-adaptive-thesis.txt),
    Algorithms 2 and 3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .core.schedule import window_of
from .core.types import Hyper
from .rules.adam import ADAM
from .rules.base import Buffers, UpdateRule
from .rules.sgd import SGD, sgd_step

__all__ = [
    "adam_finite_difference_hypergrad", "adam_unroll", "adam_unrolled_hypergrad", "drmad_hypergrad",
    "finite_difference_hypergrad", "rule_finite_difference_hypergrad", "rule_unroll",
    "rule_unrolled_hypergrad", "unroll", "unrolled_hypergrad",
]

TrainLoss = Callable[[dict[str, Tensor], int], Tensor]
"""``(params, t) -> loss`` of batch ``t`` at ``params``, without the weight decay term."""

ValLoss = Callable[[dict[str, Tensor]], Tensor]
"""``params -> E``, the validation loss."""

Schedule = float | Sequence[float]
"""One value for all steps, or one value per window."""

Values = Mapping[str, Sequence[Hyper]]
"""Per hyperparameter name, its schedule's values (floats, or 0-d tensors that carry a graph)."""

_F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# The inner run of any rule, and the three estimators over it
# ---------------------------------------------------------------------------------------------

def _check_horizon(horizon: int) -> None:
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"Invalid horizon value: {horizon} (expected an int >= 1)")


def _schedule(name: str, value: Schedule, horizon: int, *, nonnegative: bool = True
              ) -> tuple[float, ...]:
    if isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value}")
    if isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.dim() == 0):
        values: tuple[float, ...] = (float(value),)
    else:
        try:
            values = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"Invalid {name} value: {value}") from None
    if not values or len(values) > horizon:
        raise ValueError(f"Invalid {name} value: {value} ({len(values)} windows for a horizon of "
                         f"{horizon} steps; expected 1 to {horizon})")
    if not all(math.isfinite(v) and (v >= 0.0 or not nonnegative) for v in values):
        raise ValueError(f"Invalid {name} value: {value} (expected finite values"
                         f"{' >= 0' if nonnegative else ''})")
    return values


def _rule_schedules(rule: UpdateRule, hypers: Mapping[str, Schedule], horizon: int
                    ) -> dict[str, tuple[float, ...]]:
    """Every hyperparameter of ``rule`` as a validated schedule, in the rule's order."""
    _check_horizon(horizon)
    if not isinstance(hypers, Mapping) or set(hypers) != set(rule.hyper_names):
        raise ValueError(f"Invalid hypers value: {hypers!r} (the {rule.name!r} rule takes a "
                         f"schedule for each of {', '.join(rule.hyper_names)})")
    return {name: _schedule(name, hypers[name], horizon, nonnegative=False)
            for name in rule.hyper_names}


def _weights(params: dict[str, Tensor], dtype: torch.dtype | None) -> tuple[list[str], list[Tensor]]:
    """Names and detached weights (cast to ``dtype`` unless None)."""
    if not isinstance(params, dict) or not params:
        raise ValueError(f"Invalid params value: {params} (expected a non-empty dict of tensors)")
    names = list(params)
    weights = [params[k].detach() for k in names]
    return names, weights if dtype is None else [w.to(dtype) for w in weights]


def _given(arg: str, names: list[str], given: dict[str, Tensor] | None,
           dtype: torch.dtype | None) -> list[Tensor | None] | None:
    """One buffer per parameter from a dict keyed like ``params`` (detached, cast), or None."""
    if given is None:
        return None
    if not isinstance(given, dict) or set(given) != set(names):
        raise ValueError(f"Invalid {arg} value: expected a dict with the keys of params {names}, "
                         f"got {given!r}")
    out = [None if given[k] is None else given[k].detach() for k in names]
    return out if dtype is None else [None if b is None else b.to(dtype) for b in out]


def _fresh_buffers(rule: UpdateRule, names: list[str], weights: Sequence[Tensor],
                   given: Mapping[str, dict[str, Tensor] | None] | None,
                   dtype: torch.dtype | None) -> Buffers:
    """The rule's state before the first step: ``given`` buffers where set, else the rule's
    fresh state (``init_state``; ``None`` where the rule creates the buffer at its first step)."""
    given = {} if given is None else given
    if not isinstance(given, Mapping) or not set(given) <= set(rule.buffer_names):
        raise ValueError(f"Invalid buffers value: {given!r} (the {rule.name!r} rule's buffers are "
                         f"{', '.join(rule.buffer_names)})")
    inits = [rule.init_state(w) for w in weights]
    buffers: Buffers = {}
    for name in rule.buffer_names:
        chosen = _given("buffers", names, given.get(name), dtype)
        buffers[name] = chosen if chosen is not None else [s.get(name) for s in inits]
    return buffers


def _prepare(rule: UpdateRule, params: dict[str, Tensor], horizon: int,
             hypers: Mapping[str, Schedule],
             buffers: Mapping[str, dict[str, Tensor] | None] | None, dtype: torch.dtype | None
             ) -> tuple[dict[str, tuple[float, ...]], list[str], list[Tensor], Buffers]:
    """The public functions' arguments, checked: schedules, names, weights and the start state."""
    values = _rule_schedules(rule, hypers, horizon)
    names, weights = _weights(params, dtype)
    return values, names, weights, _fresh_buffers(rule, names, weights, buffers, dtype)


def _run(rule: UpdateRule, train_loss: TrainLoss, names: list[str], weights: list[Tensor],
         buffers: Buffers, horizon: int, values: Values, options: Mapping[str, Any], *,
         create_graph: bool) -> tuple[list[Tensor], Buffers]:
    r"""The inner run: ``horizon`` steps :math:`(w, s)_{t+1} = \Phi(w_t, \nabla L_t(w_t), s_t;
    \lambda_t)` of ``rule.step``, step :math:`t` using each schedule's value of its window, the
    step counts from 1 (a fresh run). A step that returns ``None`` for a buffer keeps the old one
    (as :meth:`~hyperoptim.rules.UpdateRule.write_state` does)."""
    for t in range(horizon):
        hypers = {name: s[window_of(t, horizon, len(s))] for name, s in values.items()}
        grads = _train_grads(train_loss, names, weights, t, create_graph=create_graph)
        counts = [float(t + 1)] * len(weights) if rule.uses_counts else None
        with torch.set_grad_enabled(create_graph):
            weights, new = rule.step(weights, grads, buffers, hypers, counts, **options)
        buffers = {name: [b if n is None else n for b, n in zip(buffers[name], new[name])]
                   for name in rule.buffer_names}
    return weights, buffers


def _by_name(names: list[str], tensors: Sequence[Tensor | None]) -> dict[str, Tensor] | None:
    return None if all(b is None for b in tensors) else dict(zip(names, tensors, strict=True))


def _exact(rule: UpdateRule, train_loss: TrainLoss, val_loss: ValLoss, names: list[str],
           weights: list[Tensor], buffers: Buffers, horizon: int,
           values: Mapping[str, Sequence[float]], options: Mapping[str, Any]
           ) -> tuple[Tensor, dict[str, Tensor]]:
    """Reverse mode through the float64 run with every schedule a tensor that requires grad."""
    hypers = {name: torch.tensor(v, dtype=_F64, requires_grad=True) for name, v in values.items()}
    with torch.enable_grad():
        weights = [w.clone().requires_grad_() for w in weights]
        weights, _ = _run(rule, train_loss, names, weights, buffers, horizon, hypers, options,
                          create_graph=True)
        objective = val_loss(dict(zip(names, weights, strict=True)))
        derivs = torch.autograd.grad(objective, list(hypers.values()), allow_unused=True)
    hypergrads = {name: torch.zeros_like(h) if d is None else d.detach()
                  for (name, h), d in zip(hypers.items(), derivs, strict=True)}
    return objective.detach(), hypergrads


def _central_differences(objective: Callable[[dict[str, list[float]]], float],
                         values: Mapping[str, Sequence[float]], step: float
                         ) -> tuple[Tensor, dict[str, Tensor]]:
    r""":math:`(E(\lambda + h e_i) - E(\lambda - h e_i)) / 2h` for every schedule value, and
    :math:`E(\lambda)`."""
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
        raise ValueError(f"Invalid step value: {step}")
    hypergrads = {}
    for name, schedule in values.items():
        column = []
        for i in range(len(schedule)):
            ends = []
            for sign in (1.0, -1.0):
                moved = {n: list(s) for n, s in values.items()}
                moved[name][i] += sign * step
                ends.append(objective(moved))
            column.append((ends[0] - ends[1]) / (2 * step))
        hypergrads[name] = torch.tensor(column, dtype=_F64)
    return torch.tensor(objective({n: list(s) for n, s in values.items()}), dtype=_F64), hypergrads


def _final_loss(rule: UpdateRule, train_loss: TrainLoss, val_loss: ValLoss, names: list[str],
                weights: list[Tensor], buffers: Buffers, horizon: int, values: Values,
                options: Mapping[str, Any]) -> float:
    """:math:`E(w_T)` of a forward run without a graph."""
    final, _ = _run(rule, train_loss, names, weights, buffers, horizon, values, options,
                    create_graph=False)
    with torch.no_grad():
        return float(val_loss(dict(zip(names, final, strict=True))))


def rule_unroll(
    rule: UpdateRule,
    train_loss: TrainLoss,
    params: dict[str, Tensor],
    *,
    horizon: int,
    hypers: Mapping[str, Schedule],
    options: Mapping[str, Any] | None = None,
    buffers: Mapping[str, dict[str, Tensor] | None] | None = None,
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor] | None]]:
    r"""Run ``horizon`` steps of any update rule forward only: :math:`(w_0, s_0) \mapsto (w_T, s_T)`.

    Step :math:`t` is the rule's pure step (:attr:`~hyperoptim.rules.UpdateRule.step`) at
    :math:`(w_t, \nabla L_t(w_t), s_t)` with each hyperparameter's value of the window holding
    :math:`t` (:func:`hyperoptim.core.schedule.window_of`) and step count :math:`t + 1`, from the
    rule's fresh state (torch's lazy state: e.g. Adam's zero moments) unless ``buffers`` gives
    it. With float hyperparameters the rule does its torch optimizer's arithmetic, so the weights
    are bit-identical to that optimizer with the schedule written into ``param_groups`` before
    each step. Works in the dtype of ``params``; nothing keeps a graph and nothing is modified.

    Args:
        rule (UpdateRule): the inner rule :math:`\Phi` (any registered or hand-made rule).
        train_loss (callable): ``(params, t) -> loss`` of batch ``t``, without weight decay.
        params (dict of Tensor): the initial weights :math:`w_0`.
        horizon (int): the number of steps :math:`T`.
        hypers (dict): a schedule (one float, or one float per window) for every name in
            ``rule.hyper_names``.
        options (dict, optional): the rule's static keyword options (default: none).
        buffers (dict, optional): initial buffers by buffer name, each a dict keyed like
            ``params`` (default: the rule's fresh state).

    Returns:
        ``(params_T, buffers_T)``: the weights keyed like ``params``, and per buffer name a dict
        keyed like ``params`` (``None`` where the rule never created that buffer).

    Example:
        >>> from hyperoptim.rules import SGD
        >>> loss = lambda p, t: 0.5 * (p["w"] ** 2).sum()
        >>> w_T, s_T = rule_unroll(SGD, loss, {"w": torch.tensor([1.0])}, horizon=2,
        ...                        hypers=dict(lr=0.5, momentum=0.0, weight_decay=0.0))
        >>> w_T["w"], s_T
        (tensor([0.2500]), {'momentum_buffer': None})
    """
    values, names, weights, state = _prepare(rule, params, horizon, hypers, buffers, None)
    weights, state = _run(rule, train_loss, names, weights, state, horizon, values,
                          dict(options or {}), create_graph=False)
    return (dict(zip(names, weights, strict=True)),
            {name: _by_name(names, state[name]) for name in rule.buffer_names})


def rule_unrolled_hypergrad(
    rule: UpdateRule,
    train_loss: TrainLoss,
    val_loss: ValLoss,
    params: dict[str, Tensor],
    *,
    horizon: int,
    hypers: Mapping[str, Schedule],
    options: Mapping[str, Any] | None = None,
    buffers: Mapping[str, dict[str, Tensor] | None] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Exact hypergradients of :math:`E(w_T)` by reverse mode through ``horizon`` unrolled steps
    of any rule, for every value of every hyperparameter's schedule.

    The run of :func:`rule_unroll` in float64 with each schedule a tensor that requires grad and
    each gradient taken with ``create_graph=True``, then one backward pass: the adjoints
    :math:`\hat w_t = \partial E / \partial w_t` and :math:`\hat s_t = \partial E / \partial s_t`
    of the weights and of every buffer run back through the rule's own step,

    .. math::

        (\hat w_t, \hat s_t, \hat\lambda_t) = (\hat w_{t+1}, \hat s_{t+1})^\top
        \frac{\partial \Phi_t}{\partial (w_t, s_t, \lambda)}, \qquad
        \frac{dE}{d\lambda_k} = \sum_{t \in W_k} \hat\lambda_t,

    with :math:`\nabla L_t(w_t)`'s dependence on :math:`w_t` (the Hessian) included by double
    backward. Nothing here knows a rule's formula. Memory grows linearly with ``horizon``.

    Args:
        rule, train_loss, params, horizon, hypers, options, buffers: as in :func:`rule_unroll`
            (``train_loss`` receives float64 tensors that carry a graph).
        val_loss (callable): ``params -> E``, a scalar.

    Returns:
        ``(E, hypergrads)``: :math:`E(w_T)` (0-d float64) and, per name of ``rule.hyper_names``,
        :math:`dE/d` each of its schedule values (float64, shape ``(N_x,)``).

    Example:
        >>> # E = L = w^2 / 2 and one SGD step: w_1 = (1 - a) w_0, so dE/da = -(1 - a) w_0^2.
        >>> from hyperoptim.rules import SGD
        >>> loss = lambda p, t: 0.5 * (p["w"] ** 2).sum()
        >>> E, hg = rule_unrolled_hypergrad(SGD, loss, lambda p: loss(p, 0),
        ...                                 {"w": torch.tensor([1.0])}, horizon=1,
        ...                                 hypers=dict(lr=0.1, momentum=0.0, weight_decay=0.0))
        >>> hg["lr"]
        tensor([-0.9000], dtype=torch.float64)
    """
    values, names, weights, state = _prepare(rule, params, horizon, hypers, buffers, _F64)
    return _exact(rule, train_loss, val_loss, names, weights, state, horizon, values,
                  dict(options or {}))


def rule_finite_difference_hypergrad(
    rule: UpdateRule,
    train_loss: TrainLoss,
    val_loss: ValLoss,
    params: dict[str, Tensor],
    *,
    horizon: int,
    hypers: Mapping[str, Schedule],
    options: Mapping[str, Any] | None = None,
    buffers: Mapping[str, dict[str, Tensor] | None] | None = None,
    step: float = 1e-6,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Hypergradients of any rule's run by central differences of float64 forward runs, for tests.

    For each schedule value :math:`\lambda_i` separately,
    :math:`(E(\lambda + h e_i) - E(\lambda - h e_i)) / 2h` with :math:`h` = ``step``, each
    :math:`E` from :func:`rule_unroll`'s arithmetic in float64; error
    :math:`O(h^2 \partial^3 E) + O(u |E| / h)` with :math:`u = 2^{-53}`.

    Args:
        rule, train_loss, val_loss, params, horizon, hypers, options, buffers: as in
            :func:`rule_unrolled_hypergrad`.
        step (float, optional): :math:`h` (default: 1e-6).

    Returns:
        ``(E, hypergrads)`` as :func:`rule_unrolled_hypergrad` returns them.

    Example:
        >>> from hyperoptim.rules import SGD
        >>> loss = lambda p, t: 0.5 * (p["w"] ** 2).sum()
        >>> _, hg = rule_finite_difference_hypergrad(
        ...     SGD, loss, lambda p: loss(p, 0), {"w": torch.tensor([1.0])}, horizon=1,
        ...     hypers=dict(lr=0.1, momentum=0.0, weight_decay=0.0))
        >>> round(hg["lr"].item(), 6)
        -0.9
    """
    values, names, weights, state = _prepare(rule, params, horizon, hypers, buffers, _F64)
    opts = dict(options or {})
    return _central_differences(
        lambda moved: _final_loss(rule, train_loss, val_loss, names, weights, state, horizon,
                                  moved, opts), values, step)


def _train_grads(train_loss: TrainLoss, names: list[str], weights: Sequence[Tensor], t: int,
                 *, create_graph: bool) -> list[Tensor]:
    """:math:`\\nabla L_t` at ``weights`` (zeros for parameters the loss does not use)."""
    with torch.enable_grad():
        leaves = list(weights) if create_graph else [w.detach().requires_grad_() for w in weights]
        loss = train_loss(dict(zip(names, leaves, strict=True)), t)
        grads = torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, leaves, strict=True)]


# ---------------------------------------------------------------------------------------------
# SGD (torch.optim.SGD's rule): the estimators above with SGD's arguments, and DrMAD
# ---------------------------------------------------------------------------------------------

_NAMES = SGD.hyper_names  # lr, momentum, weight_decay


@dataclass(frozen=True)
class _Plan:
    """Validated arguments of one inner run."""

    horizon: int
    values: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]  # lr, momentum, wd
    dampening: float
    nesterov: bool

    def at(self, t: int, values: Sequence[Sequence[float]] | None = None) -> tuple[float, ...]:
        """The (lr, momentum, weight_decay) values of step ``t``."""
        values = self.values if values is None else values
        return tuple(s[window_of(t, self.horizon, len(s))] for s in values)

    def windows(self, t: int) -> tuple[int, ...]:
        return tuple(window_of(t, self.horizon, len(s)) for s in self.values)

    def options(self) -> dict[str, Any]:
        return dict(dampening=self.dampening, nesterov=self.nesterov)


def _plan(horizon: int, lr: Schedule, momentum: Schedule, weight_decay: Schedule,
          dampening: float, nesterov: bool) -> _Plan:
    _check_horizon(horizon)
    values = (_schedule("lr", lr, horizon), _schedule("momentum", momentum, horizon),
              _schedule("weight_decay", weight_decay, horizon))
    if isinstance(dampening, bool) or not isinstance(dampening, (int, float)) \
            or not math.isfinite(dampening):
        raise ValueError(f"Invalid dampening value: {dampening}")
    if nesterov and dampening != 0:
        raise ValueError("Nesterov momentum requires zero dampening")
    if dampening != 0 and min(values[1]) == 0:
        raise ValueError(f"Invalid dampening value: {dampening} (dampening needs a momentum > 0 "
                         f"in every window; momentum is {momentum})")
    return _Plan(horizon, values, float(dampening), bool(nesterov))


def _start(params: dict[str, Tensor], momentum_buffers: dict[str, Tensor] | None,
           dtype: torch.dtype | None) -> tuple[list[str], list[Tensor], Buffers]:
    """Names, detached weights and SGD's buffers (cast to ``dtype`` unless None)."""
    names, weights = _weights(params, dtype)
    bufs = _given("momentum_buffers", names, momentum_buffers, dtype)
    return names, weights, {"momentum_buffer": [None] * len(names) if bufs is None else bufs}


def _sgd_values(values: Sequence[Sequence[float]], buffers: Buffers, dtype: torch.dtype
                ) -> dict[str, Sequence[Hyper]]:
    """The schedules a float run steps with: a momentum of exactly 0 becomes a 0-d tensor (the
    rule then keeps the buffer, ``v = 0 v + g``: the limit b -> 0+) once buffers are in use."""
    lr, momentum, weight_decay = values
    if any(b is not None for b in buffers["momentum_buffer"]) or any(b != 0 for b in momentum):
        momentum = [torch.zeros((), dtype=dtype) if b == 0 else b for b in momentum]
    return dict(zip(_NAMES, (lr, momentum, weight_decay), strict=True))


def _sgd_final_loss(train_loss: TrainLoss, val_loss: ValLoss, names: list[str],
                    weights: list[Tensor], buffers: Buffers, plan: _Plan,
                    moved: dict[str, list[float]]) -> float:
    values = _sgd_values([moved[name] for name in _NAMES], buffers, weights[0].dtype)
    return _final_loss(SGD, train_loss, val_loss, names, weights, buffers, plan.horizon, values,
                       plan.options())


def unroll(
    train_loss: TrainLoss,
    params: dict[str, Tensor],
    *,
    horizon: int,
    lr: Schedule,
    momentum: Schedule = 0.0,
    weight_decay: Schedule = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    momentum_buffers: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    r"""Run the inner SGD run forward only: :math:`(w_0, v_0) \mapsto (w_T, v_T)`.

    The same floating-point operations as ``torch.optim.SGD`` (single-tensor path) with the
    schedule's values written into ``param_groups`` before each step, so the weights are
    bit-identical to it (see the module notes for a window of momentum exactly 0). Works in the
    dtype of ``params``; nothing keeps a graph and ``params`` is not modified.

    Args:
        train_loss (callable): ``(params, t) -> loss`` of batch ``t``, without weight decay.
        params (dict of Tensor): the initial weights :math:`w_0`.
        horizon (int): the number of steps :math:`T`.
        lr (float or sequence of float): the learning rate, one value or one per window.
        momentum (float or sequence of float, optional): momentum factor(s) (default: 0).
        weight_decay (float or sequence of float, optional): L2 penalty (default: 0).
        dampening (float, optional): dampening for momentum (default: 0).
        nesterov (bool, optional): Nesterov momentum (default: False).
        momentum_buffers (dict of Tensor, optional): initial buffers :math:`v_0`, keyed like
            ``params`` (default: None: PyTorch's first step, :math:`v_1 = g_0`).

    Returns:
        ``(params_T, buffers_T)``: dicts keyed like ``params``; ``buffers_T`` is None when no
        momentum was used (every value 0 and no initial buffers).

    Example:
        >>> loss = lambda p, t: 0.5 * (p["w"] ** 2).sum()
        >>> w_T, v_T = unroll(loss, {"w": torch.tensor([1.0])}, horizon=2, lr=0.5)
        >>> w_T["w"], v_T
        (tensor([0.2500]), None)
    """
    plan = _plan(horizon, lr, momentum, weight_decay, dampening, nesterov)
    names, weights, bufs = _start(params, momentum_buffers, None)
    weights, bufs = _run(SGD, train_loss, names, weights, bufs, plan.horizon,
                         _sgd_values(plan.values, bufs, weights[0].dtype), plan.options(),
                         create_graph=False)
    return dict(zip(names, weights, strict=True)), _by_name(names, bufs["momentum_buffer"])


def unrolled_hypergrad(
    train_loss: TrainLoss,
    val_loss: ValLoss,
    params: dict[str, Tensor],
    *,
    horizon: int,
    lr: Schedule,
    momentum: Schedule = 0.0,
    weight_decay: Schedule = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    momentum_buffers: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Exact hypergradients by reverse mode through the unrolled run (Diff-through-Opt).

    Runs the :math:`T` steps of the module notes in float64 with the schedule values as tensors
    (the same :func:`hyperoptim.rules.sgd_step` the optimizers use, so the oracle differentiates
    the very rule they apply), then one backward pass from :math:`E(w_T)`. Memory grows linearly
    with ``horizon`` (the whole graph is kept); use it on small problems.

    Args:
        train_loss (callable): ``(params, t) -> loss`` of batch ``t`` at ``params``, without
            weight decay; it receives float64 tensors that carry a graph (write it with
            ``torch.func.functional_call`` for a module). For a sequence of batches:
            ``lambda p, t: loss(p, batches[t])``.
        val_loss (callable): ``params -> E``, a scalar.
        params (dict of Tensor): the initial weights :math:`w_0` (not modified).
        horizon (int): the number of steps :math:`T` (>= 1).
        lr (float or sequence of float): the learning rate; a float is one window for all steps,
            a sequence of :math:`N \le T` values gives window :math:`k` the steps
            :math:`[kT/N, (k+1)T/N)`.
        momentum (float or sequence of float, optional): momentum schedule (default: 0).
        weight_decay (float or sequence of float, optional): weight decay schedule (default: 0).
        dampening (float, optional): dampening for momentum (default: 0).
        nesterov (bool, optional): Nesterov momentum (default: False).
        momentum_buffers (dict of Tensor, optional): initial buffers :math:`v_0` keyed like
            ``params`` (default: None: PyTorch's first step, :math:`v_1 = g_0`).

    Returns:
        ``(E, hypergrads)``: the validation loss :math:`E(w_T)` (0-d float64) and a dict with
        ``"lr"``, ``"momentum"``, ``"weight_decay"``: :math:`dE/d` each schedule value, float64
        tensors of shape ``(N_lr,)``, ``(N_momentum,)``, ``(N_weight_decay,)``.

    Raises:
        ValueError: a horizon < 1, more windows than steps, a negative or non-finite value,
            dampening with Nesterov or with a window of momentum 0, ``momentum_buffers`` keyed
            differently from ``params``.

    Example:
        >>> # E = L = w^2 / 2, so w_T = (1 - a)^T w_0 and dE/da = -T (1 - a)^(2T - 1) w_0^2.
        >>> loss = lambda p, t: 0.5 * (p["w"] ** 2).sum()
        >>> E, hg = unrolled_hypergrad(loss, lambda p: loss(p, 0), {"w": torch.tensor([1.0])},
        ...                            horizon=2, lr=0.1)
        >>> hg["lr"], round(-2 * 0.9 ** 3, 12)
        (tensor([-1.4580], dtype=torch.float64), -1.458)
    """
    plan = _plan(horizon, lr, momentum, weight_decay, dampening, nesterov)
    names, weights, bufs = _start(params, momentum_buffers, _F64)
    return _exact(SGD, train_loss, val_loss, names, weights, bufs, plan.horizon,
                  dict(zip(_NAMES, plan.values, strict=True)), plan.options())


def finite_difference_hypergrad(
    train_loss: TrainLoss, val_loss: ValLoss, params: dict[str, Tensor], *, horizon: int,
    lr: Schedule, momentum: Schedule = 0.0, weight_decay: Schedule = 0.0, dampening: float = 0.0,
    nesterov: bool = False, momentum_buffers: dict[str, Tensor] | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Hypergradients by central differences of the unrolled run, for tests.

    For each schedule value :math:`\lambda_i` separately,
    :math:`dE/d\lambda_i \approx (E(\lambda + \varepsilon e_i) - E(\lambda - \varepsilon e_i)) /
    2\varepsilon`, each :math:`E` from a float64 forward run (:func:`unroll`'s arithmetic), so
    :math:`2(N_{lr} + N_{momentum} + N_{weight\_decay}) + 1` runs in all. A value at 0 is perturbed
    to :math:`\pm\varepsilon` (the rule is smooth there).

    Args:
        train_loss, val_loss, params, horizon, lr, momentum, weight_decay, dampening, nesterov,
            momentum_buffers: as in :func:`unrolled_hypergrad`.
        eps (float, optional): the step :math:`\varepsilon` (default: 1e-6).

    Returns:
        ``(E, hypergrads)`` as :func:`unrolled_hypergrad` returns them.

    Example:
        >>> loss = lambda p, t: 0.5 * (p["w"] ** 2).sum()
        >>> E, hg = finite_difference_hypergrad(loss, lambda p: loss(p, 0),
        ...                                     {"w": torch.tensor([1.0])}, horizon=2, lr=0.1)
        >>> round(hg["lr"].item(), 6)
        -1.458
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"Invalid eps value: {eps}")
    plan = _plan(horizon, lr, momentum, weight_decay, dampening, nesterov)
    names, weights, bufs = _start(params, momentum_buffers, _F64)
    return _central_differences(
        lambda moved: _sgd_final_loss(train_loss, val_loss, names, weights, bufs, plan, moved),
        dict(zip(_NAMES, plan.values, strict=True)), eps)


def drmad_hypergrad(
    train_loss: TrainLoss, val_loss: ValLoss, params: dict[str, Tensor], *, horizon: int,
    lr: Schedule, momentum: Schedule = 0.0, weight_decay: Schedule = 0.0, dampening: float = 0.0,
    nesterov: bool = False, momentum_buffers: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""DrMAD's approximate hypergradients: the reverse pass along the straight line ``w_0 -> w_T``.

    Runs the inner run forward without a graph (float64), then the reverse recursion of
    :func:`unrolled_hypergrad` one step at a time, each step the vector-Jacobian product of the
    same :func:`hyperoptim.rules.sgd_step` evaluated at the reconstructed state
    :math:`(\tilde w_t, \tilde v_t)` of the module notes instead of the stored one. Memory stays at
    a few copies of the weights whatever the horizon; the cost is one forward run plus, per
    reverse step, one gradient with its Hessian-vector product (and one more gradient with
    Nesterov momentum, to recover the buffer). Exact when the forward iterates are equally
    spaced on the segment; an approximation otherwise (see the module notes).

    Args:
        train_loss, val_loss, params, horizon, lr, momentum, weight_decay, dampening, nesterov,
            momentum_buffers: as in :func:`unrolled_hypergrad`; every learning rate value must
            be positive (the buffers are recovered by dividing by it).

    Returns:
        ``(E, hypergrads)`` as :func:`unrolled_hypergrad` returns them; ``E`` is exact.

    Example:
        >>> # A constant training gradient takes equal steps along a line: DrMAD is exact there.
        >>> train = lambda p, t: p["w"].sum()
        >>> val = lambda p: 0.5 * (p["w"] ** 2).sum()
        >>> w0 = {"w": torch.tensor([1.0, 2.0])}
        >>> _, approx = drmad_hypergrad(train, val, w0, horizon=5, lr=0.1)
        >>> _, exact = unrolled_hypergrad(train, val, w0, horizon=5, lr=0.1)
        >>> round(approx["lr"].item(), 9), round(exact["lr"].item(), 9)
        (-10.0, -10.0)
        >>> # On a quadratic the path is straight, but the steps shrink: DrMAD is only close.
        >>> quad = lambda p, t=0: 0.5 * (p["w"] ** 2).sum()
        >>> _, approx = drmad_hypergrad(quad, quad, w0, horizon=5, lr=0.2)
        >>> _, exact = unrolled_hypergrad(quad, quad, w0, horizon=5, lr=0.2)
        >>> round(approx["lr"].item(), 4), round(exact["lr"].item(), 4)
        (-3.7029, -3.3554)
    """
    plan = _plan(horizon, lr, momentum, weight_decay, dampening, nesterov)
    if min(plan.values[0]) <= 0:
        raise ValueError(f"Invalid lr value: {lr} (DrMAD recovers the momentum buffers from the "
                         "straight line, which needs every learning rate value > 0)")
    names, start, state = _start(params, momentum_buffers, _F64)
    final, _ = _run(SGD, train_loss, names, start, state, plan.horizon,
                    _sgd_values(plan.values, state, _F64), plan.options(), create_graph=False)
    with torch.enable_grad():
        leaves = [w.clone().requires_grad_() for w in final]
        objective = val_loss(dict(zip(names, leaves, strict=True)))
        val_grads = torch.autograd.grad(objective, leaves, allow_unused=True)
    w_hat = [torch.zeros_like(w) if g is None else g for g, w in zip(val_grads, final, strict=True)]
    v_hat = [torch.zeros_like(w) for w in final]
    line = _Line(train_loss, names, plan, start, final, state["momentum_buffer"])
    totals = [torch.zeros(len(v), dtype=_F64) for v in plan.values]
    for t in reversed(range(plan.horizon)):
        w_hat, v_hat, d_hypers = _drmad_step(line, t, w_hat, v_hat)
        for total, window, d in zip(totals, plan.windows(t), d_hypers, strict=True):
            total[window] += d.detach()
    return objective.detach(), dict(zip(_NAMES, totals, strict=True))


@dataclass
class _Line:
    """DrMAD's reconstructed run: the weights on the straight line from ``start`` to ``final``
    and the momentum buffers that line implies (the module notes)."""

    train_loss: TrainLoss
    names: list[str]
    plan: _Plan
    start: list[Tensor]
    final: list[Tensor]
    start_bufs: list[Tensor | None]

    def __post_init__(self) -> None:
        self.step_size = [(w0 - wT) / self.plan.horizon  # Delta
                          for w0, wT in zip(self.start, self.final, strict=True)]

    def point(self, t: int) -> list[Tensor]:
        """:math:`\tilde w_t` (Algorithm 3, line 5)."""
        return [torch.lerp(w0, wT, t / self.plan.horizon)
                for w0, wT in zip(self.start, self.final, strict=True)]

    def buffer(self, t: int) -> list[Tensor | None]:
        """:math:`\tilde v_t`, the buffer the line implies from :math:`w_t - w_{t-1}`."""
        if t == 0:
            return self.start_bufs
        a, b, c = self.plan.at(t - 1)
        directions = [s / a for s in self.step_size]  # d_{t-1}
        if not self.plan.nesterov:
            return list(directions)  # heavy ball: d_{t-1} = v_t
        w = self.point(t - 1)  # Nesterov: d_{t-1} = g_{t-1} + b v_t
        gs = [g + c * wi for g, wi in zip(
            _train_grads(self.train_loss, self.names, w, t - 1, create_graph=False), w,
            strict=True)]
        if b == 0:
            return gs
        return [(d - g) / b for d, g in zip(directions, gs, strict=True)]


def _drmad_step(line: _Line, t: int, w_hat: list[Tensor], v_hat: list[Tensor]
                ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """One step of the reverse recursion, at the reconstructed state of step ``t``: the adjoints
    of the weights and buffers before it, and the derivatives of its (lr, momentum,
    weight_decay)."""
    plan = line.plan
    hypers = [torch.tensor(x, dtype=_F64, requires_grad=True) for x in plan.at(t)]
    weights = [w.requires_grad_() for w in line.point(t)]
    bufs = [None if v is None else v.detach().clone().requires_grad_() for v in line.buffer(t)]
    live_bufs = [v for v in bufs if v is not None]
    inputs = weights + live_bufs + hypers
    with torch.enable_grad():
        grads = _train_grads(line.train_loss, line.names, weights, t, create_graph=True)
        new_w, new_v, _ = sgd_step(weights, grads, bufs, *hypers, dampening=plan.dampening,
                                   nesterov=plan.nesterov)
        derivs = torch.autograd.grad(new_w + new_v, inputs, grad_outputs=w_hat + v_hat,
                                     allow_unused=True)
    derivs = [torch.zeros_like(x) if d is None else d for d, x in zip(derivs, inputs, strict=True)]
    n = len(weights)
    it = iter(derivs[n:n + len(live_bufs)])
    v_hat = [torch.zeros_like(w) if v is None else next(it) for v, w in
             zip(bufs, weights, strict=True)]
    return derivs[:n], v_hat, derivs[-3:]


# ---------------------------------------------------------------------------------------------
# Adam / AdamW (hyperoptim.rules.adam): the same three estimators with torch.optim.Adam's arguments
# ---------------------------------------------------------------------------------------------

def _adam_run(horizon: int, lr: Schedule, betas: tuple[float, float], eps: float,
              weight_decay: float, decoupled_weight_decay: bool
              ) -> tuple[dict[str, Schedule], dict[str, Any]]:
    """Adam's arguments, checked, as the ADAM rule's schedules and options."""
    _check_horizon(horizon)
    lrs = _schedule("lr", lr, horizon)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"Invalid betas value: {betas}")
    for name, value in (("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"Invalid {name} value: {value}")
    hypers = dict(lr=lrs, beta1=float(betas[0]), beta2=float(betas[1]),
                  weight_decay=float(weight_decay))
    return hypers, dict(eps=float(eps), decoupled_weight_decay=bool(decoupled_weight_decay))


def adam_unroll(
    train_loss: TrainLoss,
    params: dict[str, Tensor],
    *,
    horizon: int,
    lr: Schedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    r"""Run ``horizon`` steps of ``torch.optim.Adam`` (or ``AdamW``) forward only, from fresh moments.

    The same floating-point operations as ``torch.optim.Adam`` (single-tensor path, float
    hyperparameters, the schedule's learning rate written into ``param_groups`` before each step),
    so the weights are bit-identical to it; works in the dtype of ``params``.

    Args:
        train_loss (callable): ``(params, t) -> loss`` of batch ``t``, without weight decay.
        params (dict of Tensor): the initial weights :math:`w_0`.
        horizon (int): the number of steps :math:`T`.
        lr (float or sequence of float): the learning rate, one value or one per window.
        betas (tuple of float, optional): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999)).
        eps (float, optional): :math:`\epsilon` (default: 1e-8).
        weight_decay (float, optional): :math:`\lambda` (default: 0).
        decoupled_weight_decay (bool, optional): AdamW (default: False).

    Returns:
        ``(params_T, moments_T)``: the weights and ``{"exp_avg": ..., "exp_avg_sq": ...}``, each
        a dict keyed like ``params``.

    Example:
        >>> loss = lambda p, t: 0.5 * (p["w"] ** 2).sum()
        >>> w_T, _ = adam_unroll(loss, {"w": torch.tensor([1.0])}, horizon=1, lr=0.1)
        >>> w_T["w"]  # Adam's first step has length lr
        tensor([0.9000])
    """
    hypers, options = _adam_run(horizon, lr, betas, eps, weight_decay, decoupled_weight_decay)
    return rule_unroll(ADAM, train_loss, params, horizon=horizon, hypers=hypers, options=options)


def adam_unrolled_hypergrad(
    train_loss: TrainLoss,
    val_loss: ValLoss,
    params: dict[str, Tensor],
    *,
    horizon: int,
    lr: Schedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Exact hypergradients by reverse mode through ``horizon`` unrolled Adam/AdamW steps.

    The inner run of :func:`adam_unroll` in float64, with the learning-rate schedule,
    :math:`\beta_1`, :math:`\beta_2` and :math:`\lambda` as tensors that require grad, each
    gradient taken with ``create_graph=True`` and the step being :func:`hyperoptim.rules.adam.adam_step`
    (the rule the optimizers apply), then one backward pass from :math:`E(w_T)`. The adjoints
    run back through the weights *and both moments*:

    .. math::

        (\hat w_t, \hat m_t, \hat v_t, \hat\lambda_t) = (\hat w_{t+1}, \hat m_{t+1},
        \hat v_{t+1})^\top \frac{\partial \Phi_t}{\partial (w_t, m_t, v_t, \lambda)},
        \qquad \frac{dE}{d\lambda} = \sum_t \hat\lambda_t.

    Memory grows linearly with ``horizon``; use it on small problems.

    Args:
        train_loss, val_loss, params, horizon, lr, betas, eps, weight_decay,
            decoupled_weight_decay: as in :func:`adam_unroll` and :func:`unrolled_hypergrad`.

    Returns:
        ``(E, hypergrads)``: :math:`E(w_T)` (0-d float64) and a dict with ``"lr"`` (one entry per
        window), ``"beta1"``, ``"beta2"``, ``"weight_decay"`` (shape ``(1,)`` each).

    Example:
        >>> # One step from w0 = 1 on L = E = w^2/2: w_1 = 1 - a, so dE/da = -(1 - a).
        >>> loss = lambda p, t: 0.5 * (p["w"] ** 2).sum()
        >>> E, hg = adam_unrolled_hypergrad(loss, lambda p: loss(p, 0), {"w": torch.tensor([1.0])},
        ...                                 horizon=1, lr=0.1, eps=0.0)
        >>> hg["lr"]
        tensor([-0.9000], dtype=torch.float64)
    """
    hypers, options = _adam_run(horizon, lr, betas, eps, weight_decay, decoupled_weight_decay)
    return rule_unrolled_hypergrad(ADAM, train_loss, val_loss, params, horizon=horizon,
                                   hypers=hypers, options=options)


def adam_finite_difference_hypergrad(
    train_loss: TrainLoss,
    val_loss: ValLoss,
    params: dict[str, Tensor],
    *,
    horizon: int,
    lr: Schedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    step: float = 1e-6,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Adam/AdamW hypergradients by central differences of float64 forward runs, for tests.

    For each learning-rate window and for :math:`\beta_1, \beta_2, \lambda` separately,
    :math:`(E(\lambda + h e_i) - E(\lambda - h e_i)) / 2h` with :math:`h` = ``step``, each
    :math:`E` from :func:`adam_unroll`'s arithmetic in float64.

    Args:
        train_loss, val_loss, params, horizon, lr, betas, eps, weight_decay,
            decoupled_weight_decay: as in :func:`adam_unrolled_hypergrad`.
        step (float, optional): :math:`h` (default: 1e-6).

    Returns:
        ``(E, hypergrads)`` as :func:`adam_unrolled_hypergrad` returns them.

    Example:
        >>> loss = lambda p, t: 0.5 * (p["w"] ** 2).sum()
        >>> _, hg = adam_finite_difference_hypergrad(loss, lambda p: loss(p, 0),
        ...                                          {"w": torch.tensor([1.0])}, horizon=1,
        ...                                          lr=0.1, eps=0.0)
        >>> round(hg["lr"].item(), 6)
        -0.9
    """
    hypers, options = _adam_run(horizon, lr, betas, eps, weight_decay, decoupled_weight_decay)
    return rule_finite_difference_hypergrad(ADAM, train_loss, val_loss, params, horizon=horizon,
                                            hypers=hypers, options=options, step=step)
