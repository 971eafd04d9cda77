r"""One-pass hyperparameter optimisation by implicit differentiation (Clarke et al., 2022) over any
update rule.

:class:`RuleIFT` is Algorithm 1 written once against an :class:`~hyperoptim.rules.UpdateRule`:
every ``update_interval`` steps, with :math:`\mathbf u(\lambda, w) = w - w'` the update the rule
takes (its state held constant) and :math:`J = \partial\mathbf u/\partial w`,

.. math::

    \frac{dL_V}{d\lambda} \approx -\nabla L_V^\top
        \sum_{0 \le j < i} (I - J)^j\, \frac{\partial \mathbf u}{\partial \lambda},

then one step of a hyper optimizer on the transformed hyperparameters. The public classes pair it
with a rule: ``IFTOptimizer`` (SGD, :mod:`hyperoptim.ift`) and ``IFTAdam``/``IFTAdamW`` (Adam,
:mod:`hyperoptim.ift_adam`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..core.base import LEARNED_LIMIT, HyperOptimizer
from ..core.checks import check_value
from ..core.options import check_group, check_rule_arguments
from ..core.types import Closure, ParamsT
from ..core.warn import warn
from ..hvp import SecondOrder
from ..rules.base import Buffers, UpdateRule

__all__ = ["MOMENTUM_RANGE", "WEIGHT_DECAY_FLOOR", "RuleIFT"]

_NAMES = ("lr", "momentum", "weight_decay")
_PER_PARAMETER = {"lr": "per_parameter_lr", "weight_decay": "per_parameter_weight_decay"}
SHARINGS = ("weight", "unit")
TIMINGS = ("taken", "next")

WEIGHT_DECAY_FLOOR = 1e-7
"""The smallest weight decay a tuned run holds (log10 of 0 is -inf): Table 5's lowest initial
value."""

MOMENTUM_RANGE = (1e-3, 1.0 - 1e-3)
"""The interval a tuned momentum is held to when set from a float (logit of 0 or 1 is infinite)."""

_PINNED_UPDATES = 5
"""Consecutive hyper-updates with a learned learning rate at an end of ``lr_bounds`` before the
optimizer warns that the bound sets it."""

HyperOptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]


def _into_domain(name: str, value: float, lr_bounds: tuple[float, float]) -> float:
    """``value`` moved into the domain where its transform is finite (a no-op inside it)."""
    value = float(value)
    if name == "lr":
        return min(max(value, lr_bounds[0]), lr_bounds[1])
    if name == "weight_decay":
        return max(value, WEIGHT_DECAY_FLOOR)
    return min(max(value, MOMENTUM_RANGE[0]), MOMENTUM_RANGE[1])


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


def _rule_call(fn: Callable[..., tuple[Any, Any]], params: Sequence[Tensor],
               grads: Sequence[Tensor], buffers: Buffers, hypers: dict[str, Any],
               counts: Sequence[float] | None, options: dict[str, Any]) -> tuple[Any, Any]:
    """``fn(params, grads, buffers, hypers, counts, **options)``, a rule's ``step`` or ``step_``;
    where a hyperparameter is a list (one tensor per parameter) the rule steps one parameter at a
    time with that parameter's values, and the per-parameter results are joined back in order."""
    if not any(isinstance(v, list) for v in hypers.values()):
        return fn(params, grads, buffers, hypers, counts, **options)
    parts = [fn([p], [g], {name: [b[i]] for name, b in buffers.items()},
                {k: v[i] if isinstance(v, list) else v for k, v in hypers.items()},
                counts and [counts[i]], **options) for i, (p, g) in enumerate(zip(params, grads))]
    return _join([a for a, _ in parts]), _join([b for _, b in parts])


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


def _floor_as_zero(weight_decay: float | list[Tensor]) -> float | list[Tensor]:
    """``weight_decay`` (a float or one tensor per parameter) with values at or below
    :data:`WEIGHT_DECAY_FLOOR` set to 0."""
    if isinstance(weight_decay, list):
        return [w.masked_fill(w <= WEIGHT_DECAY_FLOOR, 0.0) for w in weight_decay]
    return 0.0 if weight_decay <= WEIGHT_DECAY_FLOOR else weight_decay


def _join(pieces: list[Any]) -> Any:
    """Per-parameter results of a rule, each a list or a dict of lists, joined in order."""
    if isinstance(pieces[0], dict):
        return {k: [x for piece in pieces for x in piece[k]] for k in pieces[0]}
    return [x for piece in pieces for x in piece]


class RuleIFT(HyperOptimizer):
    r"""IFT over an inner update rule: the algorithm of :class:`~hyperoptim.IFTOptimizer`, written
    once (a base class; see ``IFTOptimizer`` over SGD, ``IFTAdam`` and ``IFTAdamW`` over Adam).

    Subclasses set ``rule`` (an :class:`~hyperoptim.rules.UpdateRule`) and ``_tunable`` (which of
    the rule's ``"lr"``, ``"momentum"``, ``"weight_decay"`` ``tune`` may name: Table 5's
    transforms are :math:`\log_{10}` for the first and last, logit for momentum), check their
    arguments (``_check_rule_group``) and call :meth:`_setup` from their constructor. The rule is
    reached only through its interface: its in-place step for every weight step, the same step on
    copies for the update a hyper-update judges, and its pure step for the update function

    .. math::

        \mathbf u(\lambda, w) = w - \Phi\big(w, \nabla L_T(w), s; \lambda\big)_w,

    the rule's new weights with its state :math:`s` before the step held constant (detached,
    Appendix A.4; Eq. 11 for Adam). Autograd through that step gives
    :math:`J = \partial\mathbf u/\partial w` (through :math:`\nabla L_T(w)`, hence the training
    Hessian, by the step's HVP route) for the Neumann series and
    :math:`\partial\mathbf u/\partial\lambda` for the hypergradient
    :math:`-\nabla L_V^\top \sum_{0 \le j < i} (I - J)^j\, \partial\mathbf u/\partial\lambda`;
    no derivative of a rule is typed here. Per-parameter values (a list of tensors for a name)
    step the rule one parameter at a time. Everything else (transforms, look-back, timing, the
    hyper optimizer, state, history, non-finite skips) is written once below.

    Example:
        >>> from hyperoptim.rules import SGD
        >>> class PlainIFT(RuleIFT):  # IFT over SGD with a fixed momentum
        ...     rule, _tunable = SGD, ("lr", "weight_decay")
        ...     def __init__(self, params, lr=0.01, weight_decay=1e-4, **kwargs):
        ...         defaults = dict(lr=lr, momentum=0.0, weight_decay=weight_decay,
        ...                         dampening=0.0, nesterov=False, tune=self._tunable,
        ...                         per_parameter_lr=False, per_parameter_weight_decay=False,
        ...                         sharing="weight", lr_bounds=(1e-10, 1.0))
        ...         self._setup(params, defaults, update_interval=2, lookback=2, hyper_lr=0.05,
        ...                     hyper_optimizer=None, update_timing="taken", hvp="auto", **kwargs)
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = PlainIFT([w], val_closure=lambda: (w ** 2).sum())
        >>> for _ in range(4):
        ...     _ = opt.step(lambda: ((w - 2) ** 2).sum())
        >>> len(opt.history[0]["lr"])
        2
    """

    rule: ClassVar[UpdateRule]

    # ------------------------------------------------------------------ the inner rule
    # What a public class gives: the rule, the names it can tune and the rule's argument checks.
    _tunable: tuple[str, ...] = _NAMES
    """The hyperparameters ``tune`` may name, in their canonical order (also recorded in
    ``history``)."""

    def _setup(self, params: ParamsT, defaults: dict[str, Any], *, update_interval: int,
               lookback: int, hyper_lr: float,
               hyper_optimizer: type[Optimizer] | HyperOptimizerFactory | None,
               update_timing: str, val_closure: Closure | None, hvp: str,
               **flags: Any) -> None:
        """The rule-independent part of the constructor: IFT's own arguments, then the groups."""
        check_rule_arguments("ift", update_interval=update_interval, lookback=lookback,
                             hyper_lr=hyper_lr, hyper_optimizer=hyper_optimizer,
                             update_timing=update_timing)
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
        """The inner rule's checks of a group's values (the public classes give their torch
        optimizer's)."""

    def _check_group(self, group: dict[str, Any]) -> None:
        # Every option (hyperoptim.core.options; a tuned lr within lr_bounds, a tuned momentum
        # within [0, 1], per-parameter values only for tuned names), what this rule tunes, and
        # the checks a rule outside the options table brings (_check_rule_group).
        check_group(self, group, getattr(self, "defaults", None))
        tune = group.get("tune", ())
        check_value("tune", tune, all(n in self._tunable for n in tune))
        self._check_rule_group(group)

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
    def _step(self, closure: Callable[[], Any] | None = None, *,
             val_closure: Closure | None = None) -> Any:
        """One step: the rule's step (PyTorch's), and a hyper-update every ``update_interval`` steps.

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

    def _hypers(self, group: dict[str, Any], params: Sequence[Tensor]) -> dict[str, Any]:
        """The group's float hyperparameters for the rule, per-parameter values as lists.

        A tuned weight decay at or below :data:`WEIGHT_DECAY_FLOOR` (where a tuned 0 starts: its
        log needs a positive value) steps as 0, so a weight whose gradient is 0 stays where the
        torch optimizer with ``weight_decay=0`` leaves it (Adam's normalisation would turn even
        1e-7 into a step of about the learning rate). The hypergradient is still taken at the
        floor value (:meth:`_update_functions`), so the decay can learn away from it."""
        hypers = self.rule.hypers(group)
        for name in self._tunable:
            hypers[name] = self._per_parameter_values(group, params, name)
        if "weight_decay" in group["tune"]:
            hypers["weight_decay"] = _floor_as_zero(hypers["weight_decay"])
        return hypers

    def _options(self, group: dict[str, Any]) -> dict[str, Any]:
        """The rule's static options for ``group``."""
        return self.rule.options(group)

    def _peek_state(self, params: Sequence[Tensor]
                    ) -> tuple[list[dict[str, Any]], Buffers, list[float] | None]:
        """Each parameter's state as the rule sees it (a fresh one as the rule would start it,
        e.g. Adam's zero moments), its buffers and this step's counts; nothing is written."""
        keys = {*self.rule.buffer_names, *(("step",) if self.rule.uses_counts else ())}
        # init_state allocates (Adam: two moments), so only for a parameter that lacks a key.
        states = [s if keys <= s.keys() else {**self.rule.init_state(p), **s}
                  for p, s in zip(params, (self.state.get(p, {}) for p in params))]
        buffers: Buffers = {name: [s.get(name) for s in states] for name in self.rule.buffer_names}
        counts = [float(s["step"]) + 1.0 for s in states] if self.rule.uses_counts else None
        return states, buffers, counts

    def _weight_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """The rule's step (the torch optimizer's) with the group's current values, in place."""
        states = [self.state[p] for p in params]
        buffers, counts = self.rule.read_state(states, params)
        new, _ = _rule_call(self.rule.step_, params, [p.grad for p in params], buffers,
                            self._hypers(group, params), counts, self._options(group))
        self.rule.write_state(states, new)
        for p in params:  # torch.optim keeps no empty entries (SGD without momentum)
            if not self.state[p]:
                del self.state[p]

    def _weight_values(self, group: dict[str, Any], params: list[Tensor]
                       ) -> tuple[list[Tensor], list[dict[str, Any]]]:
        """The same step on copies, nothing written (so bit-identical to it): the new weights
        and, per parameter, the ``state[p]`` entries the step sets."""
        states, buffers, counts = self._peek_state(params)
        copies = {name: [None if b is None else b.clone() for b in bufs]
                  for name, bufs in buffers.items()}
        new = [p.detach().clone() for p in params]
        new_buffers, _ = _rule_call(self.rule.step_, new, [p.grad for p in params], copies,
                                    self._hypers(group, params), counts, self._options(group))
        entries = [{name: b for name, bs in new_buffers.items() if (b := bs[i]) is not None}
                   for i in range(len(params))]
        if self.rule.uses_counts:
            for entry, s in zip(entries, states):
                entry["step"] = s["step"] + 1
        return new, entries

    def _update_functions(self, group: dict[str, Any], params: Sequence[Tensor],
                          weights: Sequence[Tensor], grads: Sequence[Tensor],
                          values: dict[str, Any]) -> list[Tensor]:
        """``u = w - w'`` per parameter with ``w'`` the rule's pure step at ``(weights, grads)``,
        differentiable in ``weights``, ``grads`` and the tensors in ``values`` (the tuned
        hyperparameters; the others are the group's floats), the rule's state before the step
        held constant (App. A.4, Eq. 11)."""
        _, buffers, counts = self._peek_state(params)
        new, _ = _rule_call(self.rule.step, list(weights), list(grads), buffers,
                            {**self.rule.hypers(group), **values}, counts, self._options(group))
        return [w - n for w, n in zip(weights, new)]

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
        self._watch_pinned_lr(active)
        return True

    def _watch_pinned_lr(self, active: Sequence[tuple[int, dict[str, Any], Any]]) -> None:
        """Warn once when a learned learning rate sits at an end of ``lr_bounds`` for
        :data:`_PINNED_UPDATES` consecutive hyper-updates: the bound, not the hypergradient, then
        sets it (IFTAdam's default upper bound of 1.0 is far above a useful Adam rate)."""
        runs = self._watch.setdefault("pinned", {})
        for index, group, _ in active:
            if "lr" not in group["tune"] or self._watch.get("pinned_warned"):
                continue
            lo, hi = group["lr_bounds"]
            end = next((e for e in (("upper", 1, hi), ("lower", 0, lo))
                        if math.isclose(group["lr"], e[2], rel_tol=1e-9)), None)
            runs[index] = runs.get(index, 0) + 1 if end is not None else 0
            if end is not None and runs[index] >= _PINNED_UPDATES:
                self._watch["pinned_warned"] = True
                warn(
                    f"{type(self).__name__}: the learned learning rate of param group {index} has "
                    f"sat at its {end[0]} bound lr_bounds[{end[1]}]={end[2]:g} for {runs[index]} "
                    "consecutive hyper-updates: the bound, not the hypergradient, sets it. If the "
                    "bound is deliberate, ignore this; otherwise widen lr_bounds or lower hyper_lr. "
                    "This warning is shown once."
                )

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
        with self._all_or_nothing():
            super().load_state_dict(state_dict)
            self._hyper_opt = self._build_hyper_optimizer()
            if hyper_opt_state is not None:
                try:
                    self._hyper_opt.load_state_dict(hyper_opt_state)
                except (ValueError, KeyError, TypeError, RuntimeError) as err:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: hyper_optimizer: "
                                     f"{err!r}") from err
