r"""One-pass hyperparameter optimisation by implicit differentiation (Clarke et al., 2022), and the
adaptive per-weight method of the DrMAD thesis built on it."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from .core.base import LEARNED_LIMIT, HyperOptimizer
from .core.checks import check_sgd_arguments, check_value, is_real
from .core.types import Closure, ParamsT
from .hvp import SecondOrder
from .rules.sgd import sgd_direction

__all__ = ["IFTOptimizer", "SignSGD", "thesis_adaptive"]

_NAMES = ("lr", "momentum", "weight_decay")
_PER_PARAMETER = {"lr": "per_parameter_lr", "weight_decay": "per_parameter_weight_decay"}
SHARINGS = ("weight", "unit")
TIMINGS = ("taken", "next")

WEIGHT_DECAY_FLOOR = 1e-7
"""The smallest weight decay a tuned run holds (log10 of 0 is -inf): Table 5's lowest initial
value."""

MOMENTUM_RANGE = (1e-3, 1.0 - 1e-3)
"""The interval a tuned momentum is held to when set from a float (logit of 0 or 1 is infinite)."""

HyperOptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]


def _into_domain(name: str, value: float, lr_bounds: tuple[float, float]) -> float:
    """``value`` moved into the domain where its transform is finite (a no-op inside it)."""
    value = float(value)
    if name == "lr":
        return min(max(value, lr_bounds[0]), lr_bounds[1])
    if name == "weight_decay":
        return max(value, WEIGHT_DECAY_FLOOR)
    return min(max(value, MOMENTUM_RANGE[0]), MOMENTUM_RANGE[1])



def _internal_step(opt: Optimizer) -> None:
    """Step the hyper optimizer without ``torch.optim``'s hook wrapper.

    ``Optimizer.step`` is wrapped to run the process-wide hooks
    (``torch.optim.optimizer.register_optimizer_step_pre_hook``) and the profiler's record: they
    belong to the user's optimizers, not to an Adam that lives inside this one. The wrapped
    function is the same arithmetic, so the result is bit-identical.
    """
    step = type(opt).step
    raw = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    if raw is None:
        opt.step()
    else:
        raw(opt)

def _transform(name: str, value: float) -> float:
    """Table 5's optimisation space: log10 for lr and weight decay, logit for momentum."""
    if name == "momentum":
        return math.log(value / (1.0 - value))
    return math.log10(value)


def _natural(name: str, x: Tensor) -> Tensor:
    """The inverse of :func:`_transform`, differentiable: ``10 ** x`` or ``sigmoid(x)``."""
    if name == "momentum":
        return torch.sigmoid(x)
    return torch.pow(10.0, x)


def _hyper_shape(p: Tensor, sharing: str) -> tuple[int, ...]:
    """Shape of a per-parameter hyperparameter of ``p``: one per weight, or one per output unit
    (shared over every dimension but the first, i.e. over a unit's incoming weights or a
    convolution kernel; tensors of dimension <= 1 have one value per entry either way)."""
    if sharing == "unit" and p.dim() >= 2:
        return (p.shape[0],) + (1,) * (p.dim() - 1)
    return tuple(p.shape)


def _mean_over_weights(values: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """Mean of per-parameter hyperparameters over the weights they apply to (float64, 0-d)."""
    total = sum(p.numel() for p in params)
    return torch.stack([a.sum().double() * (p.numel() / a.numel())
                        for a, p in zip(values, params)]).sum() / total


def _vjp_through_update(updates: Sequence[Tensor], params: Sequence[Tensor],
                        weights: Sequence[Tensor], grads: Sequence[Tensor],
                        q: Sequence[Tensor], second: SecondOrder) -> list[Tensor]:
    r""":math:`(\partial\mathbf u/\partial w)^\top q`, ``u`` a function of ``(w, g(w))``: every
    second-order product IFT takes.

    The rule's own vector-Jacobian product gives the direct term (weight decay) and the
    gradient's cotangent; the latter goes through :math:`H` by the step's HVP route
    (:class:`hyperoptim.hvp.SecondOrder`, averaged across ranks):
    :math:`(\partial u/\partial w)^\top q + H (\partial u/\partial g)^\top q`.
    """
    raw = torch.autograd.grad(list(updates), list(weights) + list(grads), grad_outputs=list(q),
                              retain_graph=True, allow_unused=True)
    n = len(params)
    direct = [torch.zeros_like(p) if j is None else j for p, j in zip(params, raw[:n])]
    through_g = {p: (torch.zeros_like(p) if j is None else j) for p, j in zip(params, raw[n:])}
    hq = second.hvp([through_g.get(p, torch.zeros_like(p)).unsqueeze(0) for p in second.params])
    by_param = dict(zip(second.params, hq))
    return [d + by_param[p][0] if p in by_param else d for p, d in zip(params, direct)]


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


class IFTOptimizer(HyperOptimizer):
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

    **Cost.** A step between hyper-updates is SGD's step, with no host synchronisation. A
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
        (4, ['hypergrad/lr', 'hypergrad/momentum', 'hypergrad/weight_decay'])

    References:
        R. M. Clarke, E. T. Oldewage, J. M. Hernández-Lobato. Scalable One-Pass Optimisation of
        High-Dimensional Weight-Update Hyperparameters by Implicit Differentiation. ICLR 2022.

        J. Lorraine, P. Vicol, D. Duvenaud. Optimizing Millions of Hyperparameters by Implicit
        Differentiation. AISTATS 2020.
    """

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
        update_interval: int = 10,
        lookback: int = 5,
        hyper_lr: float = 0.05,
        hyper_optimizer: type[Optimizer] | HyperOptimizerFactory | None = None,
        lr_bounds: tuple[float, float] = (1e-10, 1.0),
        update_timing: str = "taken",
        val_closure: Closure | None = None,
        hvp: str = "auto",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        check_sgd_arguments(lr, momentum, dampening, weight_decay, nesterov)
        if dampening != 0 or nesterov:
            raise ValueError(f"Invalid {'dampening' if dampening != 0 else 'nesterov'} value: "
                             f"{dampening if dampening != 0 else nesterov} (IFTOptimizer implements "
                             "heavy-ball momentum without dampening, as Clarke et al. do)")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, tune=tune,
                        per_parameter_lr=per_parameter_lr,
                        per_parameter_weight_decay=per_parameter_weight_decay, sharing=sharing,
                        lr_bounds=lr_bounds)
        self._setup(params, defaults, update_interval=update_interval, lookback=lookback,
                    hyper_lr=hyper_lr, hyper_optimizer=hyper_optimizer,
                    update_timing=update_timing, val_closure=val_closure, hvp=hvp,
                    maximize=maximize, foreach=foreach, fused=fused, differentiable=differentiable)

    # ------------------------------------------------------------------ the inner rule
    # What depends on the inner optimizer (SGD here; Adam/AdamW in hyperoptim.ift_adam): the names
    # it can tune, its argument checks, its step in place and out of place, and u(lambda, w).
    _tunable: tuple[str, ...] = _NAMES
    """The hyperparameters ``tune`` may name, in their canonical order (also recorded in
    ``history``)."""

    def _setup(self, params: ParamsT, defaults: dict[str, Any], *, update_interval: int,
               lookback: int, hyper_lr: float,
               hyper_optimizer: type[Optimizer] | HyperOptimizerFactory | None,
               update_timing: str, val_closure: Closure | None, hvp: str,
               **flags: Any) -> None:
        """The rule-independent part of the constructor: IFT's own arguments, then the groups."""
        check_value("update_interval", update_interval,
                    isinstance(update_interval, int) and not isinstance(update_interval, bool)
                    and update_interval >= 1)
        check_value("lookback", lookback,
                    isinstance(lookback, int) and not isinstance(lookback, bool) and lookback >= 1)
        check_value("hyper_lr", hyper_lr, is_real(hyper_lr) and hyper_lr >= 0)
        check_value("hyper_optimizer", hyper_optimizer,
                    hyper_optimizer is None or callable(hyper_optimizer))
        check_value("update_timing", update_timing, update_timing in TIMINGS)
        self._check_group(defaults)
        self.update_interval = update_interval
        self.lookback = lookback
        self.update_timing = update_timing
        self._hyper_lr = float(hyper_lr)
        self._hyper_factory = hyper_optimizer
        self._hyper_opt: Optimizer | None = None
        super().__init__(params, self._normalised(defaults), val_closure=val_closure, hvp=hvp,
                         **flags)
        self.hyper_state.update(since_update=0, steps=0)
        self._hyper_opt = self._build_hyper_optimizer()

    # ------------------------------------------------------------------ groups
    @staticmethod
    def _check_rule_group(group: dict[str, Any]) -> None:
        """The inner rule's checks of a group's values (``torch.optim.SGD``'s, in logit range)."""
        check_sgd_arguments(group["lr"], group["momentum"], 0.0, group["weight_decay"], False)
        if "momentum" in group["tune"]:  # logit momentum
            check_value("momentum", group["momentum"], group["momentum"] <= 1.0)

    @classmethod
    def _check_group(cls, group: dict[str, Any]) -> None:
        bounds = group["lr_bounds"]
        check_value("lr_bounds", bounds,
                    isinstance(bounds, (tuple, list)) and len(bounds) == 2
                    and all(isinstance(b, (int, float)) for b in bounds)
                    and 0.0 < bounds[0] <= bounds[1] < math.inf)
        tune = group["tune"]
        check_value("tune", tune,
                    isinstance(tune, (tuple, list)) and len(tune) > 0
                    and len(set(tune)) == len(tune) and all(n in cls._tunable for n in tune))
        check_value("sharing", group["sharing"], group["sharing"] in SHARINGS)
        cls._check_rule_group(group)
        if "lr" in tune:  # log10 learning rate lives in the bounds
            check_value("lr", group["lr"], bounds[0] <= group["lr"] <= bounds[1])
        for name, key in _PER_PARAMETER.items():
            if group[key] and name not in tune:
                raise ValueError(f"{key}=True needs '{name}' in tune (tune={tuple(tune)})")

    @classmethod
    def _normalised(cls, group: dict[str, Any]) -> dict[str, Any]:
        out = dict(group)
        for name in cls._tunable:
            out[name] = float(out[name])
        out["tune"] = tuple(n for n in cls._tunable if n in out["tune"])
        for key in _PER_PARAMETER.values():
            out[key] = bool(out[key])
        out["lr_bounds"] = (float(out["lr_bounds"][0]), float(out["lr_bounds"][1]))
        return out

    @staticmethod
    def _per_parameter(group: dict[str, Any], name: str) -> bool:
        return name in _PER_PARAMETER and bool(group.get(_PER_PARAMETER[name], False))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_group(merged)
        normalised = self._normalised(merged)
        super().add_param_group({**param_group, **normalised})
        index = len(self.param_groups) - 1
        self._init_group(index, self.param_groups[index])
        if self._hyper_opt is not None:
            for group in self._hyper_groups(index):
                self._hyper_opt.add_param_group(group)

    def _init_group(self, index: int, group: dict[str, Any]) -> None:
        """Move tuned values into their transform's domain and create the transformed tensors."""
        device = next((p.device for p in group["params"]), None)
        transformed: dict[str, Tensor] = {}
        published: dict[str, float] = {}
        for name in group["tune"]:
            value = _into_domain(name, group[name], group["lr_bounds"])
            group[name] = published[name] = value
            if self._per_parameter(group, name):
                for p in group["params"]:
                    shape = _hyper_shape(p, group["sharing"])
                    self.state[p][name] = torch.full(shape, value, dtype=p.dtype, device=p.device)
                    self.state[p][f"log10_{name}"] = torch.full(shape, math.log10(value),
                                                                dtype=p.dtype, device=p.device)
            else:
                transformed[name] = torch.tensor(_transform(name, value), dtype=torch.float64,
                                                 device=device)
        self.hyper_state.setdefault("transformed", []).append(transformed)
        self.hyper_state.setdefault("published", []).append(published)

    def _stored(self, index: int, name: str, params: Sequence[Tensor] | None = None) -> list[Tensor]:
        """The transformed tensors of one tuned name of group ``index`` (for ``params``)."""
        group = self.param_groups[index]
        if self._per_parameter(group, name):
            return [self.state[p][f"log10_{name}"]
                    for p in (group["params"] if params is None else params)]
        return [self.hyper_state["transformed"][index][name]]

    def _hyper_groups(self, index: int) -> list[dict[str, Any]]:
        """The hyper optimizer's param groups for group ``index``: one per tuned name."""
        return [{"params": self._stored(index, name), "name": name}
                for name in self.param_groups[index]["tune"]]

    def _build_hyper_optimizer(self) -> Optimizer:
        groups = [g for i in range(len(self.param_groups)) for g in self._hyper_groups(i)]
        factory = self._hyper_factory
        if factory is None:
            opt: Any = torch.optim.Adam(groups, lr=self._hyper_lr)
        elif isinstance(factory, type) and issubclass(factory, Optimizer):
            opt = factory(groups, lr=self._hyper_lr)
        else:
            opt = factory(groups)
        if not isinstance(opt, Optimizer):
            raise ValueError(f"Invalid hyper_optimizer value: {factory!r} (it returned {opt!r}, "
                             "not a torch.optim.Optimizer)")
        return opt

    def _sync_from_groups(self) -> None:
        """Respect values assigned to ``param_groups`` from outside: restart their transforms."""
        for index, group in enumerate(self.param_groups):
            published = self.hyper_state["published"][index]
            for name in group["tune"]:
                if group[name] == published[name]:
                    continue
                value = _into_domain(name, group[name], group["lr_bounds"])
                group[name] = published[name] = value
                if self._per_parameter(group, name):
                    for p in group["params"]:
                        self.state[p][name].fill_(value)
                        self.state[p][f"log10_{name}"].fill_(math.log10(value))
                else:
                    self.hyper_state["transformed"][index][name].fill_(_transform(name, value))

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             val_closure: Closure | None = None) -> Any:
        """One step: PyTorch's SGD step, and a hyper-update every ``update_interval`` steps.

        Args:
            closure (callable, optional): recomputes and returns the training loss; it may call
                ``zero_grad()``/``backward()`` itself or not. Needed at hyper-update steps when
                ``lookback > 1`` (the graph of the training gradient gives the Hessian products).
            val_closure (callable, optional): overrides the constructor's ``val_closure`` for this
                step.

        Returns:
            The closure's loss, or None.
        """
        self._sync_from_groups()
        taken = self.update_timing == "taken"
        since = self.hyper_state["since_update"]
        hyper = since + 1 >= self.update_interval if taken else since >= self.update_interval
        second_order = hyper and self.lookback > 1
        if second_order and closure is None:
            if not any(p.grad is not None for p in self._all_params()):
                return None
            raise ValueError(
                f"{type(self).__name__} needs second-order information at its hyperparameter "
                f"updates (every update_interval={self.update_interval} steps, lookback="
                f"{self.lookback}): call step(closure) with a closure that recomputes and returns "
                "the training loss (it may call backward() itself), or use lookback=1."
            )
        loss, second = self._training_loss(closure, second_order=second_order)
        groups = [(group, self._params_with_grad(group)) for group in self.param_groups]
        if not any(params for _, params in groups):
            if second is not None:
                second.close()
            return loss
        if self._guard_step(loss, groups, worst_case=hyper) is not None:
            if second is not None:
                second.close()
            return loss
        if hyper:
            try:
                done = self._hyper_step(groups, second, val_closure, taken)
            finally:
                if second is not None:
                    second.close()
            if not done:
                return loss
        else:
            for group, params in groups:
                if params:
                    self._weight_step(group, params)
        self.hyper_state["since_update"] = (0 if taken else 1) if hyper else since + 1
        self.hyper_state["steps"] += 1
        return loss

    def _per_parameter_values(self, group: dict[str, Any], params: Sequence[Tensor], name: str
                              ) -> float | list[Tensor]:
        if name in group["tune"] and self._per_parameter(group, name):
            return [self.state[p][name] for p in params]
        return group[name]

    @staticmethod
    def _directions(params: Sequence[Tensor], grads: Sequence[Tensor],
                    bufs: Sequence[Tensor | None], momentum: Any, weight_decay: Any,
                    inplace: bool = False) -> tuple[list[Tensor | None], list[Tensor]]:
        """SGD's buffers and directions; ``weight_decay`` may be one tensor per parameter."""
        if not isinstance(weight_decay, list):
            _, new_bufs, dirs = sgd_direction(params, grads, bufs, momentum, weight_decay,
                                              inplace=inplace)
            return new_bufs, dirs
        new_bufs, dirs = [], []
        for p, g, b, c in zip(params, grads, bufs, weight_decay):
            _, (v,), (d,) = sgd_direction([p], [g], [b], momentum, c, inplace=inplace)
            new_bufs.append(v)
            dirs.append(d)
        return new_bufs, dirs

    @staticmethod
    def _apply(params: Sequence[Tensor], dirs: Sequence[Tensor], lr: float | list[Tensor],
               out_of_place: bool) -> list[Tensor]:
        """``w - a d`` with torch.optim.SGD's operations, in place or as new tensors."""
        lrs = lr if isinstance(lr, list) else [lr] * len(params)
        out = []
        for p, d, a in zip(params, dirs, lrs):
            if isinstance(a, Tensor):
                out.append(p.addcmul(d, a, value=-1) if out_of_place else p.addcmul_(d, a, value=-1))
            else:
                out.append(p.add(d, alpha=-a) if out_of_place else p.add_(d, alpha=-a))
        return out

    def _weight_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """PyTorch's SGD step with the group's current hyperparameters, in place."""
        # Read with .get: state[p] stays absent, as in torch.optim.SGD, where nothing is kept.
        bufs, dirs = self._directions(
            params, [p.grad for p in params],
            [self.state.get(p, {}).get("momentum_buffer") for p in params],
            group["momentum"], self._per_parameter_values(group, params, "weight_decay"),
            inplace=True)
        self._apply(params, dirs, self._per_parameter_values(group, params, "lr"), False)
        for p, buf in zip(params, bufs):
            if buf is not None:
                self.state[p]["momentum_buffer"] = buf

    def _weight_values(self, group: dict[str, Any], params: list[Tensor]
                       ) -> tuple[list[Tensor], list[dict[str, Any]]]:
        """The same step as new tensors, nothing written (bit-identical): the new weights and,
        per parameter, the ``state[p]`` entries the step sets."""
        bufs, dirs = self._directions(
            params, [p.grad for p in params],
            [self.state.get(p, {}).get("momentum_buffer") for p in params], group["momentum"],
            self._per_parameter_values(group, params, "weight_decay"))
        new = self._apply(params, dirs, self._per_parameter_values(group, params, "lr"), True)
        return new, [{} if buf is None else {"momentum_buffer": buf} for buf in bufs]

    def _update_functions(self, group: dict[str, Any], params: Sequence[Tensor],
                          weights: Sequence[Tensor], grads: Sequence[Tensor],
                          values: dict[str, Any]) -> list[Tensor]:
        """``u(lambda, w)`` per parameter, differentiable in ``weights``, ``grads`` and the
        tensors in ``values`` (the tuned hyperparameters; the others are the group's floats), the
        rule's state before the step detached: ``lr * d(w; v, momentum, weight_decay)``
        (App. A.4)."""
        bufs = [self.state.get(p, {}).get("momentum_buffer") for p in params]
        _, dirs = self._directions(weights, grads, bufs, values["momentum"],
                                   values["weight_decay"])
        lrs = values["lr"] if isinstance(values["lr"], list) else [values["lr"]] * len(params)
        return [a * d for a, d in zip(lrs, dirs)]

    def _hyper_step(self, groups: list[tuple[dict[str, Any], list[Tensor]]],
                    second: SecondOrder | None, val_closure: Closure | None,
                    taken: bool) -> bool:
        """A step with a hyper-update; False where it was skipped (nothing changed)."""
        val_closure = self._resolve_val_closure(val_closure, required=True)
        params = [p for _, ps in groups for p in ps]
        if taken:
            # The update this step takes, as new tensors; the validation gradient at w_t is taken
            # with w_t in the parameters' storage and w_{t-1} put back bit for bit afterwards
            # (through .data: the version counters, and the training graph at w_{t-1} that the
            # exact HVP route differentiates, stay valid). The Hessian products below are then
            # taken at w_{t-1} by either route.
            news = [self._weight_values(group, ps) if ps else ([], []) for group, ps in groups]
            new_weights = [w for ws, _ in news for w in ws]
            previous = [p.detach().clone() for p in params]
            try:
                for p, w in zip(params, new_weights):
                    p.data.copy_(w)
                val_loss, val_grads = self._validation_grads(val_closure, params)
            finally:
                for p, w in zip(params, previous):
                    p.data.copy_(w)
            del previous
        else:
            val_loss, val_grads = self._validation_grads(val_closure, params)
        result = self._hyper_update(groups, second, val_loss, val_grads, taken)
        if not result:
            return False
        # Commit the weights (and buffers) after every fallible call of the step.
        if taken:
            for (_, ps), (ws, entries) in zip(groups, news):
                for p, w, entry in zip(ps, ws, entries):
                    p.copy_(w)
                    if entry:
                        self.state[p].update(entry)
        else:
            for group, ps in groups:
                if ps:
                    self._weight_step(group, ps)
        return True

    def _hyper_update(self, groups: list[tuple[dict[str, Any], list[Tensor]]],
                      second: SecondOrder | None, val_loss: Tensor,
                      val_grads: list[Tensor], taken: bool) -> bool:
        """The hypergradient of the update u(lambda, w) at the live weights and buffers against
        ``val_grads``, and one hyper-optimizer step; False (nothing changed) where non-finite."""
        params = [p for _, ps in groups for p in ps]
        # Per tuned hyperparameter: the stored tensors the hyper optimizer updates ("targets")
        # and detached copies of them that carry this step's graph ("leaves").
        active = [(index, group, ps) for index, (group, ps) in enumerate(groups) if ps]
        spans: list[tuple[int, str, int, int]] = []  # (group index, name, start, stop)
        targets: list[Tensor] = []
        leaves: list[Tensor] = []
        updates: list[Tensor] = []
        # u as a function of (w, g): copies, not views (the finite-difference route moves the
        # live weights in place while it runs).
        weight_leaves = [p.detach().clone().requires_grad_() for p in params]
        grad_leaves = [p.grad.detach().requires_grad_() for p in params]
        weight_of = dict(zip(params, weight_leaves))
        grad_of = dict(zip(params, grad_leaves))
        with torch.enable_grad():
            for index, group, ps in active:
                values: dict[str, Any] = {n: group[n] for n in self._tunable}
                for name in group["tune"]:
                    per_param = self._per_parameter(group, name)
                    stored = self._stored(index, name, ps)
                    fresh = [x.detach().requires_grad_() for x in stored]
                    spans.append((index, name, len(leaves), len(leaves) + len(fresh)))
                    targets.extend(stored)
                    leaves.extend(fresh)
                    natural = [_natural(name, x) for x in fresh]
                    values[name] = natural if per_param else natural[0]
                updates.extend(self._update_functions(group, ps, [weight_of[p] for p in ps],
                                                      [grad_of[p] for p in ps], values))

            # acc = sum_{j < i} ((I - J)^T)^j grad L_V by i - 1 vector-Jacobian products (Eq. 6).
            q = list(val_grads)  # fresh tensors, owned here: updated in place below
            acc = [g.clone() for g in val_grads]
            for _ in range(self.lookback - 1):
                jq = _vjp_through_update(updates, params, weight_leaves, grad_leaves, q,
                                         cast(SecondOrder, second))
                for a, b, c in zip(q, jq, acc):
                    a.sub_(b)
                    c.add_(a)
            raw = torch.autograd.grad(updates, leaves, grad_outputs=acc, allow_unused=True)
        del updates
        hypergrads = [torch.zeros_like(x) if g is None else -g for x, g in zip(leaves, raw)]

        # The hyper optimizer steps before the step's one host sync; a skip restores the snapshot.
        before = [x.clone() for x in targets]
        snapshot = {k: {n: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)
                        for n, v in entry.items()}
                    for k, entry in self._hyper_opt.state.items()}
        for x, g in zip(targets, hypergrads):
            x.grad = g
        _internal_step(self._hyper_opt)
        for x in targets:
            x.grad = None

        reported: list[Tensor] = [val_loss.double().reshape(())]
        published: list[Tensor] = []  # (natural value, changed) per span
        new_values: dict[tuple[int, str], list[Tensor]] = {}
        for index, name, start, stop in spans:
            reported.append(torch.stack([g.sum() for g in hypergrads[start:stop]]).sum().double())
            group, ps = groups[index]
            if name == "lr":
                lo, hi = group["lr_bounds"]
                for x in targets[start:stop]:
                    x.clamp_(math.log10(lo), math.log10(hi))
            if name == "weight_decay":
                for x in targets[start:stop]:
                    x.clamp_(max=math.log10(LEARNED_LIMIT))
            if self._per_parameter(group, name):
                fresh = {p: _natural(name, x) for p, x in zip(ps, targets[start:stop])}
                new_values[index, name] = list(fresh.values())
                every = [fresh.get(p, self.state[p][name]) for p in group["params"]]
                published += [_mean_over_weights(every, group["params"]),
                              torch.ones((), dtype=torch.float64, device=every[0].device)]
            else:
                x = targets[start]
                published += [_natural(name, x).double(), (x != before[start]).double()]
        device = reported[0].device
        values = torch.stack([t.to(device) for t in reported + published]).tolist()

        steps = float(self.hyper_state["steps"] + (1 if taken else 0))
        if not self._all_finite(*values):
            for x, old in zip(targets, before):
                x.copy_(old)
            self._hyper_opt.state.clear()
            self._hyper_opt.state.update(snapshot)
            self._warn_nonfinite("validation loss or hypergradient")
            for index, group, _ in active:
                self._record(index, skipped=True, **self._values(group), val_loss=values[0],
                             step=steps, **{f"hypergrad/{n}": math.nan for n in group["tune"]})
            return False

        hyper_values = iter(values[1 : 1 + len(spans)])
        pairs = iter(values[1 + len(spans) :])
        hypers: dict[int, dict[str, float]] = {index: {} for index, _, _ in active}
        for index, name, _, _ in spans:
            group, ps = groups[index]
            hypers[index][f"hypergrad/{name}"] = next(hyper_values)
            natural, changed = next(pairs), next(pairs)
            if changed:
                group[name] = self.hyper_state["published"][index][name] = natural
                if self._per_parameter(group, name):
                    for p, a in zip(ps, new_values[index, name]):
                        self.state[p][name].copy_(a)
        for index, group, _ in active:
            self._record(index, **self._values(group), val_loss=values[0], step=steps,
                         **hypers[index])
        return True

    def _values(self, group: dict[str, Any]) -> dict[str, float]:
        return {name: group[name] for name in self._tunable}

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        """Everything :class:`HyperOptimizer` saves, plus the hyper optimizer's state dict."""
        sd = super().state_dict()
        sd["hyper_optimizer"] = copy.deepcopy(self._hyper_opt.state_dict())
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved; a resumed run continues exactly."""
        state_dict = dict(state_dict)
        hyper_opt_state = state_dict.pop("hyper_optimizer", None)
        super().load_state_dict(state_dict)
        self._hyper_opt = self._build_hyper_optimizer()
        if hyper_opt_state is not None:
            self._hyper_opt.load_state_dict(hyper_opt_state)


LN10 = math.log(10.0)


def thesis_adaptive(params: ParamsT, lr: float = 0.1, momentum: float = 0.9,
                    weight_decay: float = 1e-4, *, sharing: str = "unit",
                    update_interval: int = 100, lookback: int = 5,
                    weight_decay_step: float = 0.01, lr_step: float = 0.2,
                    val_closure: Closure | None = None, **kwargs: Any) -> IFTOptimizer:
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
                        hyper_optimizer=factory, val_closure=val_closure, **kwargs)
