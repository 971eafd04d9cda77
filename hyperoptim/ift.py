r"""One-pass hyperparameter optimisation by implicit differentiation (Clarke et al., 2022) over
SGD, and the adaptive per-weight method of the DrMAD thesis built on it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .core.checks import check_value, is_real
from .core.options import check_arguments
from .core.signatures import with_keywords
from .core.types import Closure, ParamsT
from .methods.ift import (
    _NAMES,
    IFT_KEYWORDS,
    MOMENTUM_RANGE,
    WEIGHT_DECAY_FLOOR,
    RuleIFT,
    ift_keywords,
)
from .methods.ift_schedule import momentum_pace
from .rules.sgd import SGD, sgd_direction

__all__ = ["MOMENTUM_RANGE", "WEIGHT_DECAY_FLOOR", "IFTOptimizer", "SignSGD", "thesis_adaptive"]


class SignSGD(Optimizer):
    r"""Constant steps against the sign of the gradient: :math:`x \leftarrow x - \eta\,\mathrm{sign}(g)`.

    The thesis' hyper optimizer (Section 2.4): "the vector of the signs of the hypergradient is
    used, with a constant learning rate". Each param group may set its own ``lr``.

    Args:
        params (iterable): tensors or param-group dicts.
        lr (float, optional): the step :math:`\eta` (default: 0.01).

    Example:
        >>> x = torch.tensor([1.0, -2.0], requires_grad=True)
        >>> opt = SignSGD([x], lr=0.5)
        >>> x.grad = torch.tensor([3.0, -0.1])
        >>> opt.step()
        >>> x.detach()
        tensor([ 0.5000, -1.5000])
    """

    def __init__(self, params: ParamsT, lr: float = 0.01) -> None:
        check_value("lr", lr, is_real(lr) and lr >= 0)
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for x in group["params"]:
                if x.grad is not None:
                    x.add_(torch.sign(x.grad), alpha=-group["lr"])
        return loss


class IFTOptimizer(RuleIFT):
    r"""SGD whose learning rate, momentum and weight decay learn from implicit hypergradients.

    A drop-in replacement for ``torch.optim.SGD`` (heavy-ball momentum, no dampening): every step
    is PyTorch's SGD step with the current hyperparameters, and every ``update_interval`` weight
    updates the hyperparameters :math:`\lambda` take one step of a hyper optimizer (Adam by
    default) on an approximate hypergradient of the validation loss :math:`L_V`. Training never
    restarts (one pass). This is Algorithm 1 of Clarke et al. (2022); with
    ``tune=("weight_decay",)`` it is Lorraine et al.'s (2020) method, the paper's baseline; with
    per-parameter learning rates and weight decays, shared by unit, and :class:`SignSGD` it is the
    thesis' adaptive method (:func:`thesis_adaptive`).

    **The update function.** With the momentum buffer :math:`v` held constant (detached, Appendix
    A.4), the weight update of PyTorch's SGD is a differentiable function of the hyperparameters
    and the weights,

    .. math::

        \mathbf u(\lambda, w) = a\,\big(b\, v + \nabla L_T(w) + c\, w\big), \qquad
        w \leftarrow w - \mathbf u(\lambda, w),

    written here with :func:`hyperoptim.rules.sgd_direction`, the rule the step itself applies
    (:math:`a` and :math:`c` may be tensors: per-weight or per-unit values, broadcast).

    **The hypergradient** (Eq. 6 with Eq. 2; the direct term :math:`\partial L_V/\partial\lambda`
    is 0 because the validation loss depends on the weights only). With lookback :math:`i`,
    :math:`J = \partial\mathbf u/\partial w` (which holds the training Hessian) and
    :math:`\nabla L_V` at the weights the update produced,

    .. math::

        \frac{dL_V}{d\lambda} \approx -\nabla L_V^\top
            \sum_{0 \le j < i} (I - J)^j\, \frac{\partial \mathbf u}{\partial \lambda},

    computed without forming :math:`J`: :math:`q = p = \nabla L_V`, then :math:`i - 1` times
    :math:`q \leftarrow q - J^\top q,\ p \leftarrow p + q` (vector-Jacobian products by double
    backward through the training gradient), then one product
    :math:`-(\partial\mathbf u/\partial\lambda)^\top p`. As :math:`i \to \infty` the sum tends to
    :math:`-\nabla L_V^\top J^{-1}\, \partial\mathbf u/\partial\lambda`, the implicit function
    theorem's best-response derivative (Section 2.3), when the series converges. Eq. 6 and the
    authors' code sum :math:`i` terms, so lookback :math:`i` matches the exact hypergradient
    through the last :math:`i` updates whenever the weights stay put (at a fixed point of
    :math:`\mathbf u` with no momentum); Algorithm 1 as printed loops :math:`i` times, one term
    more. ``lookback=1`` is the one-step (greedy) hypergradient and needs no second derivatives.

    **Which update** (``update_timing``). ``"taken"`` (the default, the authors' code): the
    hyper-update runs at the end of every ``update_interval``-th step and differentiates the
    update that step just took, :math:`\mathbf u(\lambda, w_{t-1})` with the buffer
    :math:`v_{t-1}` and the training gradient at :math:`w_{t-1}`, against
    :math:`\nabla L_V(w_t)` at the new weights; the new hyperparameters apply from the next step.
    To do that inside one ``step`` call without writing anything before its last fallible call,
    the step computes :math:`w_t` out of place, evaluates the validation gradient with
    :math:`w_t` swapped into the parameters' storage (``p.data``, so that autograd's version
    counters, and with them the graph of the training gradient at :math:`w_{t-1}`, stay valid),
    swaps :math:`w_{t-1}` back bit for bit, takes the Hessian products at :math:`w_{t-1}`, and
    only then writes :math:`w_t`, the buffers and the hyperparameters. Nothing is kept alive
    between steps, so a checkpoint resumes exactly. ``"next"`` (Algorithm 1 as printed, this
    class's behaviour before 0.1): the hyper-update runs at the start of the step after every
    ``update_interval`` updates and differentiates the update about to be taken,
    :math:`\mathbf u(\lambda, w_t)` with :math:`v_t`, against :math:`\nabla L_V(w_t)`; that step
    then uses the new values. Both agree under the method's constant-weight assumption and the
    medians over many runs are close, but "next" diverges far more often from large initial
    learning rates (UCI Energy, authors' split, see the README's "IFT robustness"): it steers
    with the curvature at a point the step has not yet left, while "taken" sees the result of the
    step it judges. Both cost the same: one closure with the graph of the training gradient and
    one validation gradient per hyper-update.

    **When** (``update_schedule``). ``"fixed"`` (the paper's, and this class's before the
    option): a hyper-update every ``update_interval`` steps. ``"warmup"`` (the default): first a warm-up,
    with a hyper-update every :math:`\operatorname{round}(1/(1 - m))` steps (:math:`m` the
    largest momentum of the groups; 1 without momentum, 2 at 0.5, the paper's 10 at 0.9; at most
    ``update_interval``) until the hypergradient of each group's learning rate has changed sign
    once (or after :data:`~hyperoptim.methods.ift_schedule.WARMUP_LIMIT` = 100 hyper-updates),
    then every ``update_interval`` steps. The hyper optimizer moves a value by about its step
    per hyper-update (Adam 0.05 in :math:`\log_{10}`), so at the paper's interval a run of 300
    steps crosses at most 1.5 decades; from a learning rate 100x too small the warm-up crosses
    them in a few dozen steps, and its first change of sign says the learning rate has got
    there. The pace follows the momentum because an SGD step is the learning rate times a buffer
    that sums about :math:`1/(1 - m)` gradients: a change shows in the loss over that many steps,
    and faster hyper-updates overshoot (from lr 0.1 with momentum 0.9, one every step took the
    digits CNN from 98% to 78%). Groups that do not tune their learning rate (Lorraine et al.'s
    weight decay alone) keep the interval. A warm-up step with ``lookback > 1`` needs the closure
    as every hyper-update does. ``hyper_state["warmup"]`` holds its state (saved and resumed
    exactly) and ``history`` records ``"update_schedule/warmup"`` (1.0 for a hyper-update of
    the warm-up). ``benchmarks/ift_schedule.py`` measures both (README, "IFTOptimizer"). While
    the run has not started learning (every training loss within 3% of the first) the warm-up
    accelerates (``warmup_accel``): after 3 plain hyper-updates the learning rate's step size grows
    1.5x per hyper-update, up to 8x, so a start 1000x too small is crossed in about 16; ``history``
    records the factor used (``"update_schedule/accel"``).

    **Stability guard** (``stability_guard``, on by default). A learning rate 10x too large kills
    a ReLU network within a few steps of heavy-ball SGD, before a hyper-update (every 10 steps at
    momentum 0.9) or the loss can show it. The guard reads the sharpness each step's update meets
    along its own gradient :math:`g`: with :math:`J = \partial\mathbf u/\partial w = a (H + c I)`,
    the Jacobian the Neumann series multiplies by,

    .. math::

        \rho = \frac{g^\top J g}{g^\top g}, \qquad
        \text{and where } \rho > E = 2 (1 + b): \quad
        a \leftarrow a \cdot \max\Big(\frac{0.8\, E}{\rho}, \frac{1}{10}\Big),

    in the step that sees it, before the step uses :math:`a`. :math:`E` is heavy-ball SGD's edge of
    stability (:func:`~hyperoptim.rules.sgd.sgd_edge`): on a quadratic, the iteration diverges
    along a direction of curvature :math:`\lambda` exactly when :math:`a \lambda > 2 (1 + b)`.
    It costs one Hessian-vector product (by the step's HVP route, averaged across ranks) and no
    host synchronisation of its own (its two numbers per group ride in the step's one), and it
    runs in the warm-up, where the learning rate is being found (at every step while
    :math:`\rho / E` is above 1/4, further apart below: :func:`~hyperoptim.methods.ift.edge_skip`),
    and at every hyper-update after it, the only steps that raise it then. On the digits CNN of
    ``benchmarks/versus.py`` from lr 1.0 with momentum 0.9 (seed 0), :math:`\rho / E` went 0.12,
    0.51 and 1.30 at steps 5, 7 and 8 while the loss still sat near 2.2, and without the guard
    the runs died at steps 11-16 (41% over 5 seeds); with it they end at 97%, and from the good
    start (lr 0.1, :math:`\rho / E \le 0.4`)
    it never acts and the trajectory is bit-identical. Groups that do not learn their learning
    rate are left alone; a step without a closure (``lookback=1``) is not checked. A
    ``HyperoptimWarning`` says once that it acted.

    **Accelerated decay** (``decay_accel``, 1.5 by default here). A weight decay learns at the
    hyper optimizer's pace, about 0.05 in :math:`\log_{10}` per hyper-update, and the need for
    more shows late, when the validation loss turns up: at the paper's interval a decade takes 200
    steps. So while a group's weight-decay hypergradient keeps asking for more, the :math:`k`-th
    hyper-update in a row moves it with :math:`\min(1.5^{\max(k - 3, 0)}, 8)` times the hyper
    optimizer's step size (up to 0.4 in :math:`\log_{10}`); the first one that asks for less (or
    nothing) ends the run. Only upwards: early, while a run underfits, the hypergradient asks for
    less, and accelerated that way too it took the decay to 4e-9, too small to climb back from
    (:func:`~hyperoptim.methods.ift_schedule.decay_scale` has the numbers). On
    ``benchmarks/versus.py``'s diabetes task (265 rows, 600 full-batch steps) it took the test MSE
    over 10 seeds from 0.496 to 0.459 from the poor start, 0.552 to 0.464 from the large start and
    0.471 to 0.462 from the good one; on the other three tasks no start moved by more than 0.9
    points (the CNN's large start, 98.2 to 97.3%). ``hyper_state["decay"]`` holds each group's run
    (saved and resumed exactly). :class:`~hyperoptim.IFTAdam` leaves it off by default: there it
    cost the digits CNN 1.3 points, and AdamW's decoupled decay overshot to 3-5.

    **Accelerated climb** (``lr_accel``, 1.5 by default here). The accelerated warm-up
    (``warmup_accel``) ends for good at the first training loss outside its 3% band, and a run
    that starts to learn while its learning rate is still far too small then climbs at the hyper
    optimizer's plain 0.05 in :math:`\log_{10}` per hyper-update. So for the rest of the warm-up,
    while a group's learning-rate hypergradient keeps asking for more (the warm-up's
    :math:`k`-th such hyper-update in a row), the step is :math:`\min(1.5^{\max(k - 3, 0)}, 8)`
    times the hyper optimizer's step size; a cut of that learning rate by ``stability_guard`` or
    the reactive decrease ends the run, and the warm-up's end ends the climb
    (:func:`~hyperoptim.methods.ift_schedule.climb_scale` has the numbers). On
    ``benchmarks/versus.py``'s character LSTM it took the poor start from perplexity 15.9 to 12.2
    (the good start 12.9 to 11.9, 5 seeds); the other tasks' starts moved by at most 0.4 points.
    ``hyper_state["climb"]`` holds each group's run (saved and resumed exactly);
    ``history``'s ``"update_schedule/climb"`` the factor each hyper-update used. Small cuts that
    hold a learning rate the climb raised to the edge are not warned about (only cuts of 2x or
    more: :data:`~hyperoptim.methods.ift.EDGE_WARN_CUT`).

    **Transforms** (Table 5). The hyper optimizer works on :math:`\log_{10}` of the learning rate
    and the weight decay and on :math:`\operatorname{logit}` of the momentum, and the hypergradient
    is taken with respect to those values. The :math:`\log_{10}` learning rate is clamped to
    :math:`\log_{10}` of ``lr_bounds`` after every update (the paper clips to
    :math:`[10^{-10}, 1]`). Where a tuned value has no finite transform (weight decay 0, momentum
    0 or 1) it starts from the nearest point of :data:`WEIGHT_DECAY_FLOOR` (1e-7) or
    :data:`MOMENTUM_RANGE` ([1e-3, 0.999]), and ``param_groups`` shows that value from the start.

    **Per-parameter values.** ``per_parameter_lr=True`` gives every weight its own learning rate
    (the paper's WD+HDLR+M), ``per_parameter_weight_decay=True`` its own weight decay (the
    thesis); ``sharing="unit"`` shares each value across a unit's incoming weights (one per row of
    a ``Linear`` weight, one per output channel of a convolution; biases keep one per entry), as
    the thesis does for dense layers. They live in ``state[p]["lr"]`` /
    ``state[p]["weight_decay"]`` (natural values, broadcastable to ``p``) with their
    :math:`\log_{10}` in ``state[p]["log10_lr"]`` / ``state[p]["log10_weight_decay"]``; the
    group's value shows their mean over the weights, and assigning to it resets them all.

    **State.** ``param_groups[i]`` holds the current ``lr``, ``momentum`` and ``weight_decay`` as
    Python floats (each changes only when its transformed value moves, so with ``hyper_lr=0``
    and values inside their transformed domain the weights are bit-identical to
    ``torch.optim.SGD``'s); assigning a new value to one of them restarts its transformed value
    from there. The transformed scalars, the hyper optimizer's state and the step counter are
    saved by :meth:`state_dict`, so a resumed run continues exactly. The hyper optimizer gets one
    param group per (param group, tuned name), each with a ``"name"`` key, so that a factory can
    give each hyperparameter its own step.

    **History.** ``history[i]`` gets one entry per hyper-update: ``"lr"``, ``"momentum"``,
    ``"weight_decay"`` (the values after the update), ``"hypergrad/<name>"`` for each tuned name
    (with respect to its transformed value; for per-parameter values the sum over them, i.e. the
    derivative for a common shift of every :math:`\log_{10}` value), ``"val_loss"`` (the
    validation loss the hypergradient used), ``"step"`` (weight updates taken at the weights where
    it was measured) and ``"skipped"``.

    **Cost.** A step between hyper-updates is SGD's step, with no host synchronisation (the
    warm-up's steps are hyper-updates, at most 100 of them, and take the stability guard's one
    Hessian-vector product). A
    hyper-update step asks the closure for the graph of the training gradient (when
    ``lookback > 1``), takes one validation gradient, ``lookback - 1`` vector-Jacobian products
    with respect to the weights (each about one Hessian-vector product) and one with respect to
    :math:`\lambda`, and synchronises with the host once.

    **Non-finite values.** A non-finite validation loss or hypergradient at a hyper-update skips
    that whole step: neither hyperparameters (nor the hyper optimizer's state) nor weights nor
    buffers change, a ``RuntimeWarning`` says so once, ``history`` records it as skipped, and the
    next step tries again. Between hyper-updates the validation loss is not computed.

    Args:
        params (iterable): parameters or param-group dicts, as for ``torch.optim.SGD``. A group may
            set its own ``lr``, ``momentum``, ``weight_decay``, ``tune``, ``per_parameter_lr``,
            ``per_parameter_weight_decay``, ``sharing`` and ``lr_bounds``.
        lr (float, optional): initial learning rate (default: 1e-3).
        momentum (float, optional): initial momentum factor (default: 0).
        weight_decay (float, optional): initial L2 penalty (default: 0).
        tune (sequence of str, optional): which of ``"lr"``, ``"momentum"``, ``"weight_decay"``
            learn; the others stay fixed (default: all three, the paper's WD+LR+M).
        per_parameter_lr (bool, optional): one learning rate per weight (or unit); needs ``"lr"``
            in ``tune`` (default: False).
        per_parameter_weight_decay (bool, optional): one weight decay per weight (or unit);
            needs ``"weight_decay"`` in ``tune`` (default: False).
        sharing (str, optional): ``"weight"`` or ``"unit"``, the granularity of per-parameter
            values (default: ``"weight"``).
        update_interval (int, optional): weight updates between hyper-updates, :math:`T`
            (default: 10).
        lookback (int, optional): terms of the Neumann series, :math:`i` (default: 5).
        hyper_lr (float, optional): learning rate of the hyper optimizer, :math:`\kappa`; used when
            ``hyper_optimizer`` is None or a class (default: 0.05).
        hyper_optimizer (class or callable, optional): a ``torch.optim.Optimizer`` subclass (built
            as ``cls(groups, lr=hyper_lr)``) or a factory ``groups -> Optimizer`` over the
            transformed hyperparameters, one group per (param group, tuned name) with its
            ``"name"`` (default: None, Adam).
        lr_bounds (tuple of float, optional): :math:`(a_{\min}, a_{\max})` with
            :math:`0 < a_{\min} \le a_{\max}`, the range of a tuned learning rate (default:
            ``(1e-10, 1.0)``).
        update_timing (str, optional): ``"taken"`` or ``"next"``, which update is differentiated
            (above; default: ``"taken"``, the authors').
        update_schedule (str, optional): ``"warmup"`` or ``"fixed"``, when hyper-updates run
            (above; default: ``"warmup"``; ``"fixed"`` is the paper's every ``update_interval``).
        reactive_decrease (bool, optional): read every step's training loss with
            :class:`~hyperoptim.ScaleFree`'s runaway watch (at twice its margin) and divide every
            learned learning rate by 10 at each new high of a runaway, in the step that sees it
            (default: True; False is the paper's).
        stability_guard (bool or None, optional): cut a learned learning rate that puts the
            step past SGD's edge of stability to 0.8 of it (above); None means on where the rule
            has an edge (SGD), False is the paper's (default: None).
        decay_accel (float or None, optional): the accelerated decay (above); 1 is off (the
            paper's), None the class's default (default: None, 1.5 here).
        lr_accel (float or None, optional): the accelerated climb (above); 1 is off, None the
            class's default (default: None, 1.5 here).
        warmup_accel (float, optional): the accelerated warm-up: while the training loss stays
            within 3% of its first value, the warm-up's :math:`k`-th hyper-update (from 0) moves
            the learning rate with ``min(warmup_accel ** max(k - 3, 0), 8)`` times the hyper
            optimizer's step size (Adam's 0.05 in :math:`\log_{10}` lr becomes up to 0.4); the
            first loss outside that band ends it for good
            (:mod:`~hyperoptim.methods.ift_schedule`). 1 is the plain warm-up (default: 1.5).
        val_closure (callable, optional): returns the validation loss from the live parameters;
            may be given to :meth:`step` instead (default: None).
        hvp (str, optional): how :math:`H Z` is computed (:mod:`hyperoptim.hvp`): ``"exact"``
            (double backward; the closure must return the loss without calling ``backward()``),
            ``"finite_difference"`` (central differences of gradients, two extra closure calls
            per product; works with ``backward()`` in the closure, DDP, ``torch.compile``), or
            ``"auto"``: exact if the closure returns the loss without calling ``backward()``,
            finite differences if it calls it (default: ``"auto"``). With
            ``update_timing="taken"`` the products are taken with :math:`w_{t-1}` in the
            parameters, so both routes differentiate the update taken.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> xv, yv = torch.randn(16, 3), torch.randn(16, 1)
        >>> val = lambda: torch.nn.functional.mse_loss(model(xv), yv)
        >>> opt = IFTOptimizer(model.parameters(), lr=0.01, momentum=0.5, weight_decay=1e-4,
        ...                    update_interval=5, lookback=3, val_closure=val)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(20):
        ...     _ = opt.step(closure)
        >>> len(opt.history[0]["lr"]), sorted(k for k in opt.history[0] if k.startswith("hyper"))
        (9, ['hypergrad/lr', 'hypergrad/momentum', 'hypergrad/weight_decay'])

    References:
        R. M. Clarke, E. T. Oldewage, J. M. Hernández-Lobato. Scalable One-Pass Optimisation of
        High-Dimensional Weight-Update Hyperparameters by Implicit Differentiation. ICLR 2022.

        J. Lorraine, P. Vicol, D. Duvenaud. Optimizing Millions of Hyperparameters by Implicit
        Differentiation. AISTATS 2020.
    """

    @with_keywords(IFT_KEYWORDS)
    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        tune: Sequence[str] = _NAMES,
        per_parameter_lr: bool = False,
        per_parameter_weight_decay: bool = False,
        sharing: str = "weight",
        **options: Any,
    ) -> None:
        options = ift_keywords(IFTOptimizer.__init__, options)
        check_arguments(self, lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, tune=tune,
                        per_parameter_lr=per_parameter_lr,
                        per_parameter_weight_decay=per_parameter_weight_decay, sharing=sharing,
                        lr_bounds=options.pop("lr_bounds"))
        self._setup(params, defaults, **options)

    # ------------------------------------------------------------------ the SGD rule
    rule = SGD
    _tunable = _NAMES
    decay_accel_default = 1.5
    lr_accel_default = 1.5

    fast_path = True
    """Compute ``u(lambda, w)`` as ``a * d(w; v, b, c)`` with SGD's direction (the arithmetic of
    releases before 0.2, so trajectories stay bit-identical to them) instead of the generic
    ``w - w'`` through the rule's pure step; both are the same function, and their
    hypergradients agree to rounding (``tests/test_ift.py``)."""

    def _warmup_interval(self) -> int:
        """The warm-up's pace: :func:`~hyperoptim.methods.ift_schedule.momentum_pace` of the
        largest momentum of the groups (the slowest to show a change of learning rate)."""
        return momentum_pace(max(group["momentum"] for group in self.param_groups))

    def _options(self, group: dict[str, Any]) -> dict[str, Any]:
        """Heavy-ball momentum without dampening (the constructor refuses the others)."""
        return {"dampening": 0.0, "nesterov": False}

    def _update_functions(self, group: dict[str, Any], params: Sequence[Tensor],
                          weights: Sequence[Tensor], grads: Sequence[Tensor],
                          values: dict[str, Any]) -> list[Tensor]:
        """``u(lambda, w) = lr * d(w; v, momentum, weight_decay)`` per parameter (App. A.4), or
        the generic form without :attr:`fast_path`."""
        if not self.fast_path:
            return super()._update_functions(group, params, weights, grads, values)
        bufs = [self.state.get(p, {}).get("momentum_buffer") for p in params]
        _, dirs = _directions(weights, grads, bufs, values["momentum"], values["weight_decay"])
        lrs = values["lr"] if isinstance(values["lr"], list) else [values["lr"]] * len(params)
        return [a * d for a, d in zip(lrs, dirs)]


def _directions(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Sequence[Tensor | None],
                momentum: Any, weight_decay: Any) -> tuple[list[Tensor | None], list[Tensor]]:
    """SGD's buffers and directions; ``weight_decay`` may be one tensor per parameter."""
    if not isinstance(weight_decay, list):
        _, new_bufs, dirs = sgd_direction(params, grads, bufs, momentum, weight_decay)
        return new_bufs, dirs
    new_bufs, dirs = [], []
    for p, g, b, c in zip(params, grads, bufs, weight_decay):
        _, (v,), (d,) = sgd_direction([p], [g], [b], momentum, c)
        new_bufs.append(v)
        dirs.append(d)
    return new_bufs, dirs


LN10 = math.log(10.0)


def thesis_adaptive(params: ParamsT, lr: float = 0.1, momentum: float = 0.9,
                    weight_decay: float = 1e-4, *, sharing: str = "unit",
                    update_interval: int = 100, lookback: int = 5,
                    weight_decay_step: float = 0.01, lr_step: float = 0.2,
                    update_schedule: str = "fixed", reactive_decrease: bool = False,
                    stability_guard: bool | None = False, decay_accel: float | None = 1.0,
                    lr_accel: float | None = 1.0, val_closure: Closure | None = None,
                    **kwargs: Any) -> IFTOptimizer:
    r"""The adaptive method of the DrMAD thesis (Sections 2.2, 2.4, 3.2.2) as an IFTOptimizer.

    Per-unit (``sharing="unit"``, the thesis' choice for dense layers) or per-weight
    (``sharing="weight"``) weight decays and learning rates, both on log scales, updated every
    ``update_interval`` steps (100) from a look-back of the last ``lookback`` (5) updates by a
    constant step against the sign of the hypergradient (:class:`SignSGD`): ``weight_decay_step``
    (0.01) in :math:`\log_{10}` for weight decay, ``lr_step`` (0.2) in the natural log for learning
    rates (``lr_step / ln 10`` in the :math:`\log_{10}` the optimizer stores), the log learning
    rate clipped below 0 (``lr_bounds=(1e-10, 1)``). Momentum stays fixed (0.9 in the thesis).
    The look-back is the Neumann series of :class:`IFTOptimizer` (the thesis differentiated the
    last 5 updates exactly); the first experiment's settings are the defaults.

    Args:
        params (iterable): parameters or param-group dicts.
        lr, momentum, weight_decay (float, optional): initial values (defaults: 0.1, 0.9, 1e-4).
        sharing (str, optional): ``"unit"`` or ``"weight"`` (default: ``"unit"``).
        update_interval, lookback (int, optional): :math:`T` and :math:`i` (defaults: 100, 5).
        weight_decay_step (float, optional): sign step in log10 weight decay (default: 0.01).
        lr_step (float, optional): sign step in natural-log learning rate (default: 0.2).
        update_schedule (str, optional): as for :class:`IFTOptimizer`; the thesis' fixed
            interval by default (default: ``"fixed"``).
        reactive_decrease (bool, optional): as for :class:`IFTOptimizer`; off by default, as in
            the thesis (default: False).
        stability_guard (bool or None, optional): as for :class:`IFTOptimizer`; off by default,
            as in the thesis (default: False).
        decay_accel (float or None, optional): as for :class:`IFTOptimizer`; 1 (off) by default,
            the thesis' constant sign steps (default: 1.0).
        lr_accel (float or None, optional): as for :class:`IFTOptimizer` (it acts only with
            ``update_schedule="warmup"``); 1 (off) by default, the thesis' constant sign steps
            (default: 1.0).
        val_closure (callable, optional): the validation loss.
        **kwargs: passed on to :class:`IFTOptimizer` (e.g. ``update_timing``, ``lr_bounds``).

    Returns:
        IFTOptimizer: tuning ``("lr", "weight_decay")`` per parameter with :class:`SignSGD`.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = thesis_adaptive(model.parameters(), val_closure=lambda: model.weight.sum())
        >>> opt.state[model.weight]["log10_lr"].shape  # one value per output unit
        torch.Size([2, 1])
    """
    steps = {"lr": lr_step / LN10, "weight_decay": weight_decay_step}

    def factory(groups: list[dict[str, Any]]) -> Optimizer:
        return SignSGD([dict(g, lr=steps[g["name"]]) for g in groups])

    return IFTOptimizer(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                        tune=("lr", "weight_decay"), per_parameter_lr=True,
                        per_parameter_weight_decay=True, sharing=sharing,
                        update_interval=update_interval, lookback=lookback,
                        update_schedule=update_schedule, reactive_decrease=reactive_decrease,
                        stability_guard=stability_guard, decay_accel=decay_accel,
                        lr_accel=lr_accel, hyper_optimizer=factory,
                        val_closure=val_closure, **kwargs)
