r"""Hypergradient descent on the learning rate over any inner update rule (docs/design.md §4).

:class:`RuleHypergrad` is Baydin et al.'s rule written once against an
:class:`~hyperoptim.rules.UpdateRule`: with :math:`d_{t-1} = -\partial w_t / \partial a_{t-1}`
the previous step's direction *as the rule computes it* (the rule's ``step_`` returns it),

.. math::

    h_t = \frac{\partial E(w_t)}{\partial a_{t-1}} = -\langle \nabla E(w_t), d_{t-1} \rangle,
    \qquad a_t = \operatorname{clamp}(a_{t-1} - \kappa h_t,\ a_{\min}, a_{\max}),

then the rule's step with :math:`a_t`. Subclasses (``HypergradSGD`` over the SGD rule,
``HypergradAdam`` and ``HypergradAdamW`` over Adam's) set the rule, check their arguments, and say
what the training-loss objective's gradient is.

With ``tune=("lr", "momentum")`` the rule's momentum :math:`\mu` (SGD's ``momentum``, Adam's
:math:`\beta_1`) is learned the same way, by its one-step hypergradient (as
gradient-descent-the-ultimate-optimizer computes it: the weights and the buffers before the step
are constants),

.. math::

    Z_t = \frac{\partial w_{t+1}}{\partial \mu_t} = -a_t \frac{\partial d_t}{\partial \mu_t},
    \qquad h^\mu_{t+1} = \langle \nabla E(w_{t+1}), Z_t \rangle,

:math:`Z_t` from the rule's own one-step tangent (:func:`~hyperoptim.rules.rule_tangents` with
one column for the momentum and zero incoming tangents; ``HypergradSGD`` has a closed form as a
fast path, tested equal to it), kept in ``state[p]["momentum_tangent"]``.

``momentum_phase`` says for how long: ``"run"``, every step; ``"stall"`` (the default), while the
run is stalled, every training loss so far within 3% of the first (``ScaleFree``'s gate, the one
of its accelerated growth), and then held where it stands, its tangents dropped. Why (measured on
the four tasks of ``benchmarks/versus.py``, 5 seeds): learned all run, the one-step hypergradient
takes ``HypergradSGD``'s momentum from 0.9 to 0.03 in 40 steps on the digits CNN (its short horizon
prefers a small step now) and the digits tasks lose 1.5-2.6 points; learned only while the loss has
not moved, it answers the question a poor start asks, how much further each step should go, and
then leaves the momentum alone: the character LSTM from lr 1e-3 and momentum 0.5 took its momentum
to 0.91 in 8 steps and ended at perplexity 9.69 (13.7 with the momentum kept at 0.5; 9.76 from
the good start), and the digits' poor starts gained 0.8-1.5 points.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, cast

import torch
from torch import Tensor

from ..core.base import LEARNED_LIMIT, HyperOptimizer
from ..core.checks import check_value, is_real
from ..core.dist import world_size
from ..core.options import check_rule_arguments, components, renamed_options
from ..core.shard import any_sharded, is_sharded, local, sums_and_norms
from ..core.types import Closure, ParamsT
from ..core.warn import warn
from ..hyperstep import Additive, HyperStep, resolve, watch_stall
from ..rules.base import UpdateRule, rule_tangents
from .ift import MOMENTUM_RANGE
from .tuning import TunedGroups, _learns_momentum, lr_only_when_untuned

__all__ = [
    "RuleHypergrad", "hyper_step_option", "lr_only_when_untuned", "momentum_hyper_step",
    "one_step_momentum_tangents",
]

#: Where a learned momentum is held (IFT's range: its horizon :math:`1/(1-\mu)` stays within
#: 1000 steps, and it never reaches 0, where the rule would stop keeping its buffer).
MOMENTUM_BOUNDS = MOMENTUM_RANGE


#: Each param group with its parameters that have a gradient.
_Groups = list[tuple[dict[str, Any], list[Tensor]]]
#: A group's proposed learning rate, its policy's new state and what it adds to ``history``.
_Stepped = tuple[float, dict[str, float] | None, dict[str, float]]


class _Moved(NamedTuple):
    """A group's proposed momentum (``tune`` with ``"momentum"``), not yet committed."""

    value: float
    hypergrad: float
    #: The policy's new state for the momentum (``None``: the additive policy keeps none).
    state: dict[str, float] | None


class _Plan(NamedTuple):
    """A param group's share of one step, proposed and not yet committed."""

    group: dict[str, Any]
    params: list[Tensor]
    grads: list[Tensor]
    states: list[dict[str, Any]]
    #: Where the group's <grad E, d_{t-1}> terms stand in the step's scalars; the scale terms
    #: (a normalised policy) or the per-weight rates' mean and largest value follow them.
    span: tuple[int, int]
    #: Candidate per-weight learning rates (``per_parameter`` groups), else None.
    new_lrs: list[Tensor] | None
    #: Where the group's <grad E, Z_{t-1}> terms stand (a normalised policy's two scale terms
    #: follow them), or None when the momentum is not learned.
    momentum_span: tuple[int, int] | None = None


def hyper_step_option(hyper_lr: float | None, hyper_step: HyperStep | str | None,
                      default_kappa: float, default: HyperStep | str) -> tuple[float, str]:
    r"""The constructor's ``hyper_lr`` and ``hyper_step`` as the group's ``(hyper_lr,
    hyper_step)``: a float ``hyper_lr`` alone is the additive policy with that :math:`\kappa`
    (every trajectory as before the policies existed); ``hyper_step`` alone is that policy
    (``Additive(kappa)`` sets ``hyper_lr``); neither is the class default."""
    if hyper_lr is not None and hyper_step is not None:
        raise ValueError(f"Invalid hyper_step value: {hyper_step!r} (hyper_lr={hyper_lr} "
                         "already chooses the additive policy: pass one of hyper_lr and "
                         "hyper_step)")
    if hyper_lr is not None:
        check_value("hyper_lr", hyper_lr, is_real(hyper_lr) and hyper_lr >= 0.0)
        return float(hyper_lr), Additive.name
    policy = resolve(default if hyper_step is None else hyper_step)
    if isinstance(policy, Additive):
        kappa = default_kappa if policy.kappa is None else policy.kappa
        check_value("hyper_lr", kappa, is_real(kappa) and kappa >= 0.0)
        return float(kappa), Additive.name
    return float(default_kappa), repr(policy)


class RuleHypergrad(TunedGroups, HyperOptimizer):
    r"""Hypergradient descent over ``rule`` (a base class; see ``HypergradSGD``, ``HypergradAdam``).

    Param groups carry ``lr``, ``hyper_lr`` (:math:`\kappa`), ``lr_bounds``, ``per_parameter``
    and ``tune`` next to the rule's own hyperparameters. ``state[p]`` holds the rule's state
    (torch's names) and ``"direction"`` (:math:`d_{t-1}`, unless :meth:`_previous_direction` finds
    it in the rule's own state: SGD's heavy-ball direction is its momentum buffer), plus ``"lr"``
    with per-weight learning rates. ``history[i]`` records ``"lr"``, ``"hypergrad/lr"`` and
    ``"skipped"`` per step.

    Per-weight learning rates (``per_parameter=True``) follow the elementwise rule
    :math:`a_t = \operatorname{clamp}(a_{t-1} + \kappa\, \nabla E(w_t) \odot d_{t-1})`; the
    group's ``"lr"`` shows their mean, and a new value assigned to it from outside (by hand or by
    a scheduler) scales them all by new / old, so a multiplicative scheduler composes with what
    they learned. A learned rate stays within ``lr_bounds`` and below
    :data:`~hyperoptim.core.base.LEARNED_LIMIT` (unless it started above it).

    Every step is guarded once (docs/design.md §7): a non-finite hypergradient, validation loss,
    training loss or gradient, or a rate that would overflow the weights' dtype skips the whole
    step before anything is committed.

    With ``"momentum"`` in ``tune`` the rule's momentum follows its one-step hypergradient
    :math:`h^\mu` (module docstring) through the group's policy: the additive policy takes
    :math:`\mu \leftarrow \mu - \kappa h^\mu` with the learning rate's :math:`\kappa` (one
    hyper-learning rate for every hyperparameter, as gradient-descent-the-ultimate-optimizer has);
    every other policy acts on :math:`u = 1 - \mu` with the derivative
    :math:`\partial E / \partial u = -h^\mu`, so a multiplicative or log-space policy moves the
    momentum's horizon :math:`1/(1-\mu)` by factors, whatever its scale (the policy's reaction to
    a rising training loss is the learning rate's alone: shrinking :math:`u` would *raise* the
    momentum). The learned value is held to :data:`MOMENTUM_BOUNDS`; ``history[i]`` records
    ``"momentum"`` and ``"hypergrad/momentum"``, and ``hyper_state["momentum_step"]`` the
    policy's state.

    Subclasses set ``rule``, check their arguments, and say what the training-loss objective's
    gradient is (:meth:`_objective_grads`) and where the momentum lives (:meth:`_momentum`,
    :meth:`_momentum_entry`, :attr:`momentum_hyper`).
    """

    _backs_off = True

    rule: ClassVar[UpdateRule]
    _supports_fsdp2 = True

    _renamed_options = renamed_options("hd")

    #: :math:`\kappa` of the additive policy when it is chosen without one (each public class
    #: sets Baydin et al.'s value for its rule).
    default_hyper_lr: float
    #: The policy when neither ``hyper_lr`` nor ``hyper_step`` is given.
    default_hyper_step: HyperStep | str = Additive.name
    #: The rule's name for the momentum that ``tune=("lr", "momentum")`` learns.
    momentum_hyper: ClassVar[str] = "momentum"

    def _setup(self, params: ParamsT, defaults: dict[str, Any], *, hyper_lr: float | None,
               hyper_step: HyperStep | str | None, lr_bounds: tuple[float, float],
               per_parameter: bool, tune: tuple[str, ...] | None = ("lr",),
               momentum_phase: str = "stall", **base: Any) -> None:
        """The rule-independent part of the constructor, after the public class has checked its
        arguments: the rule's ``defaults`` with HD's options after them, then the groups."""
        # Per-weight rates take the additive policy only: it is their default too.
        kappa, policy = hyper_step_option(hyper_lr, hyper_step, self._default_hyper_lr(),
                                          Additive.name if per_parameter
                                          else self.default_hyper_step)
        # An explicit tune that asks for a learned momentum: a step that cannot learn it says so.
        tune = self._resolved_tune(defaults, tune, policy)
        defaults = {**defaults, "hyper_lr": kappa, "hyper_step": policy,
                    "lr_bounds": (float(lr_bounds[0]), float(lr_bounds[1])),
                    "per_parameter": per_parameter, "tune": tuple(tune),
                    "momentum_phase": momentum_phase}
        super().__init__(params, defaults, **base)

    def _lossless_stall(self) -> None:
        """A step without a training loss ends the stall (:func:`~hyperoptim.hyperstep.
        watch_stall`), and a momentum learned while stalled is held from then on: said once
        where ``tune`` asked for it (the default's momentum stays where it was set, as
        before it was learned)."""
        if not getattr(self, "_default_tuned", True) \
                and not getattr(self, "_warned_lossless", False):
            self._warned_lossless = True
            warn(f"{type(self).__name__}: momentum_phase='stall' learns the momentum while the "
                 "training loss is within 3% of its first value, and this step has no loss: "
                 "the momentum is held from now on. Pass step(closure) with a closure that "
                 "returns the loss, or momentum_phase='run'.")

    @classmethod
    def _default_hyper_lr(cls) -> float:
        """:attr:`default_hyper_lr`, or the value a subclass still sets under its old name."""
        old = getattr(cls, "default_hypergrad_lr", None)
        if old is None:
            return cls.default_hyper_lr
        warn(f"{cls.__name__}: 'default_hypergrad_lr' is deprecated, use 'default_hyper_lr'; "
             "the old name will be removed in the next release", DeprecationWarning)
        return old

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        lo, hi = group["lr_bounds"]
        check_value("lr", group["lr"], lo <= group["lr"] <= hi)
        if group["per_parameter"] and any(is_sharded(p) for p in group.get("params", ())):
            raise ValueError(f"{type(self).__name__}(per_parameter=True) does not support FSDP2 "
                             "(fully_shard) yet: use one learning rate per param group.")
        policy = self._policy(group)
        if group["per_parameter"] and not isinstance(policy, Additive):
            raise ValueError(f"Invalid hyper_step value: {group['hyper_step']} (per_parameter=True "
                             "takes the additive hyper-step: pass hyper_lr)")
        if components(self) is None and "tune" in group:  # a rule outside the options' table
            check_rule_arguments("hd", tune=group["tune"])
        self._refuse_sharded_momentum(group)

    @staticmethod
    def _policy(group: dict[str, Any]) -> HyperStep:
        r"""The group's hyper-step policy (``"additive"``: :math:`\kappa` = ``hyper_lr``)."""
        spec = group.get("hyper_step", Additive.name)
        if spec == Additive.name:
            return _additive(group["hyper_lr"])
        return resolve(spec)

    def _objective_grads(self, group: dict[str, Any], params: list[Tensor],
                         grads: list[Tensor]) -> list[Tensor]:
        r""":math:`\nabla E(w_t)` in training-loss mode: the gradient the rule descends."""
        return grads

    @staticmethod
    def _previous_direction(group: dict[str, Any], state: dict[str, Any]) -> Tensor | None:
        """:math:`d_{t-1}` of a parameter (``None`` before its first step)."""
        return state.get("direction")

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None = None, *,
              val_closure: Closure | None = None) -> Any:
        """Perform one step: update each group's learning rate, then take the rule's step
        (PyTorch's SGD or Adam step) with it.

        The pipeline of docs/design.md §7: propose (the terms of :math:`h_t` and the candidate
        per-weight rates), one host sync, the hyper-step (each group's new rate), the guard, then
        commit or skip; nothing is written before the guard's verdict.

        Args:
            closure (callable, optional): recomputes and returns the training loss; it may call
                ``zero_grad()``/``backward()`` itself or not.
            val_closure (callable, optional): overrides the constructor's ``val_closure`` for this
                step.

        Returns:
            The closure's loss, or None.
        """
        val_closure = self._resolve_val_closure(val_closure, required=False)
        # The ranks' verdicts on the closures ride in the step's one all-reduce of scalars
        # (_complete_shards) where no collective of the optimizer's follows a closure (FSDP2,
        # declared DDP): docs/design.md §8.
        loss, _ = self._training_loss(closure, defer=True)
        groups = [(group, self._params_with_grad(group)) for group in self.param_groups]
        sharded = any(any_sharded(ps) for _, ps in groups)  # FSDP2
        val_loss, objective = self._validation(val_closure, groups)
        self._settle_pending()  # a rank whose closure failed raises here, with the others
        plans, scalars = self._propose(groups, objective)
        values, checked, train_loss = self._gather(scalars, loss, val_loss, groups, sharded)
        hypergrads = [-_fsum(values[a:b]) for a, b in (plan.span for plan in plans)]
        if train_loss is None and self._watches_stall():
            self._lossless_stall()
        stepped = [self._new_lr(i, plan, h, values, train_loss)
                   for i, (plan, h) in enumerate(zip(plans, hypergrads))]
        moved = [self._new_momentum(i, plan, values) for i, plan in enumerate(plans)]
        reason = self._verdict(values, checked, groups, plans, stepped, moved)
        if reason is not None:
            self._skip(reason, stepped, moved)
        else:
            self._commit(plans, hypergrads, stepped, moved)
            if self._watches_stall():
                self.hyper_state["stall"] = watch_stall(self._stall(), train_loss)
        return loss

    def _validation(self, val_closure: Closure | None, groups: _Groups
                    ) -> tuple[Tensor | None, dict[Tensor, Tensor] | None]:
        r"""The validation loss (this rank's) and :math:`\nabla E(w_t)` per parameter, or
        ``(None, None)`` in training-loss mode (the objective's gradient is then
        :meth:`_objective_grads`)."""
        if val_closure is None:
            return None, None
        with_grad = [p for _, ps in groups for p in ps]
        # The loss is averaged in the step's one all-reduce of scalars (_gather).
        val_loss, val_grads = self._validation_grads(val_closure, with_grad, average_loss=False)
        return val_loss, dict(zip(with_grad, val_grads))

    def _propose(self, groups: _Groups, objective: dict[Tensor, Tensor] | None
                 ) -> tuple[list[_Plan], list[Tensor]]:
        r"""Every group's plan and the step's device scalars, in one flat list for one host sync:
        per group, its :math:`\langle \nabla E, d_{t-1} \rangle` terms (summed on the host), then
        the scale of a normalised policy or the mean and the largest of the per-weight rates,
        then (a learned momentum) its :math:`\langle \nabla E, Z_{t-1} \rangle` terms and their
        scale."""
        scalars: list[Tensor] = []
        plans = [self._propose_group(index, group, params, objective, scalars)
                 for index, (group, params) in enumerate(groups)]
        return plans, scalars

    def _propose_group(self, index: int, group: dict[str, Any], params: list[Tensor],
                       objective: dict[Tensor, Tensor] | None, scalars: list[Tensor]) -> _Plan:
        """One group's share of :meth:`_propose`: appends its scalars, writes nothing."""
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        prev = [self._previous_direction(group, s) for s in states]
        if objective is not None:
            objs = [objective[p] for p in params]
        else:
            objs = self._objective_grads(group, params, grads)
        start = len(scalars)
        new_lrs = None
        if group["per_parameter"]:
            new_lrs = self._propose_per_weight(index, group, params, states, objs, prev, scalars)
            span = (start, len(scalars))
            scalars.extend(_mean_and_largest(new_lrs, group["lr"]))
        else:  # h_t = -<grad E(w_t), d_{t-1}>
            span = self._propose_terms(group, objs, prev, scalars)
        momentum_span = None
        if self._momentum_live(group):  # h^mu_t = <grad E(w_t), Z_{t-1}>, Z_{t-1} = dw_t/dmu_{t-1}
            tangents = [s.get("momentum_tangent") for s in states]
            momentum_span = self._propose_terms(group, objs, tangents, scalars)
        return _Plan(group, params, grads, states, span, new_lrs, momentum_span)

    def _propose_terms(self, group: dict[str, Any], objs: list[Tensor],
                       vectors: list[Tensor | None], scalars: list[Tensor]) -> tuple[int, int]:
        r"""Appends the terms :math:`\langle \nabla E(w_t), x \rangle` over the ``vectors``
        that exist (:math:`d_{t-1}` for the learning rate, :math:`Z_{t-1}` for the momentum;
        summed on the host), then their scale for a normalised policy; returns where the terms
        stand."""
        start = len(scalars)
        scalars.extend(_dot(o, x) for o, x in zip(objs, vectors) if x is not None)
        span = (start, len(scalars))
        if self._policy(group).normalised:
            scalars.extend(_scale_terms(objs, vectors))
        return span

    def _propose_per_weight(self, index: int, group: dict[str, Any], params: list[Tensor],
                            states: list[dict[str, Any]], objs: list[Tensor],
                            prev: list[Tensor | None], scalars: list[Tensor]) -> list[Tensor]:
        r"""The candidate per-weight rates; appends the terms of :math:`h_t` (the sums of the
        elementwise :math:`-\nabla E(w_t) \odot d_{t-1}`)."""
        elementwise = [None if d is None else -(o * d) for o, d in zip(objs, prev)]
        scalars.extend(-e.sum() for e in elementwise if e is not None)
        return self._per_parameter_lrs(index, group, params, states, elementwise)

    def _gather(self, scalars: list[Tensor], loss: Tensor | None, val_loss: Tensor | None,
                groups: _Groups, sharded: bool) -> tuple[list[float], list[float], float | None]:
        """The step's one host sync: the proposed scalars, then the validation loss and the
        training loss's mean over ranks where they are read, as ``values``; the guard's scalars as
        ``checked``; and the training loss a policy reads (``None`` if none does)."""
        norms = None
        # A policy that reads the training loss reads its mean over ranks (every rank's policy
        # state must stay identical; the closure's loss is this rank's own).
        read = (_loss_tensor(loss, scalars) if self._watches_stall()
                or any(self._policy(g).uses_loss for g, _ in groups) else None)
        reads_loss = read is not None
        losses = ([] if val_loss is None else [val_loss]) + ([cast(Tensor, read)] if reads_loss
                                                             else [])
        # Sent at every step under torch.distributed, even one without a loss to average: a
        # deferred verdict rides in it, and a rank whose closure failed waits for it.
        if world_size() > 1:
            scalars, losses, norms = self._complete_shards(scalars, losses, groups, sharded)
        scalars = scalars + losses
        guard = self._guard_scalars(loss, groups, norms)
        values = _host_floats(scalars, guard)
        values, checked = values[: len(scalars)], values[len(scalars):]
        if not reads_loss:
            return values, checked, None
        return values, checked, -values[-1] if self.defaults["maximize"] else values[-1]

    def _complete_shards(self, scalars: list[Tensor], losses: list[Tensor], groups: _Groups,
                         sharded: bool) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        """The step's one all-reduce of scalars: it sums the ranks' ``losses`` (the validation
        loss, the training loss a policy reads: returned as their means), carries the ranks'
        verdicts where they were deferred (:meth:`_defers_verdict`) and, under FSDP2
        (``sharded``), completes every dot and the guard's norms (returned; ``None``
        otherwise, where ``scalars`` are whole already)."""
        own = scalars if sharded else []
        tensors = ([t for kinds in self._guard_tensors(groups) for ts in kinds for t in ts]
                   if sharded else [])
        sums, norms = sums_and_norms(own + [t.detach().reshape(()) for t in losses], tensors,
                                     reduce=self._sum_with_verdict)
        means = [t / world_size() for t in sums[len(own):]]
        return (sums[:len(own)] if sharded else scalars), means, norms if sharded else None

    def _verdict(self, values: list[float], checked: list[float], groups: _Groups,
                 plans: list[_Plan], stepped: list[_Stepped], moved: list[_Moved | None]
                 ) -> str | None:
        """Why the step must be skipped (``None``: commit it). One guard for everything the step
        is about to commit (docs/design.md §7): the hypergradients and validation loss, the
        training gradient, and the weights the new rate (a per-weight group's largest rate) and
        momentum would give."""
        if not self._all_finite(*values):
            return "hypergradient or validation loss"
        largest = [values[plan.span[1] + 1] if plan.new_lrs is not None else lr
                   for plan, (lr, _, _) in zip(plans, stepped)]
        hypers = [{"lr": a, **({} if m is None else self._momentum_entry(plan.group, m.value))}
                  for a, plan, m in zip(largest, plans, moved)]
        return self._guard_verdict(checked, groups, hypers)

    def _skip(self, reason: str, stepped: list[_Stepped], moved: list[_Moved | None]) -> None:
        """Count and record a skipped step: nothing else changes."""
        self._warn_nonfinite(reason)
        for i, group in enumerate(self.param_groups):
            momentum = {} if moved[i] is None else {
                "momentum": self._momentum(group), "hypergrad/momentum": math.nan}
            self._record(i, skipped=True, lr=group["lr"], **{"hypergrad/lr": math.nan},
                         **dict.fromkeys(stepped[i][2], math.nan), **momentum)

    def _commit(self, plans: list[_Plan], hypergrads: list[float], stepped: list[_Stepped],
                moved: list[_Moved | None]) -> None:
        """Write every group's new rate, momentum and policy states, take the rule's step with
        them, and record ``history``."""
        for i, (plan, h, (new_lr, policy_state, extra), m) in enumerate(
                zip(plans, hypergrads, stepped, moved)):
            group = plan.group
            group["lr"] = new_lr
            if policy_state is not None:
                self.hyper_state.setdefault("hyper_step", {})[i] = policy_state
            if m is not None:
                group.update(self._momentum_entry(group, m.value))
                if m.state is not None:
                    self.hyper_state.setdefault("momentum_step", {})[i] = m.state
                extra = {**extra, "momentum": m.value, "hypergrad/momentum": m.hypergrad}
            hypers: dict[str, Any] = self.rule.hypers(group)
            if plan.new_lrs is not None:
                self.hyper_state.setdefault("published_lr", {})[i] = new_lr
                for s, a in zip(plan.states, plan.new_lrs):
                    s["lr"] = a
                hypers["lr"] = plan.new_lrs
            if plan.params:
                self._rule_step(plan, hypers)
            self._record(i, lr=group["lr"], **{"hypergrad/lr": h}, **extra)

    def _rule_step(self, plan: _Plan, hypers: dict[str, Any]) -> None:
        """The rule's step in place; each parameter's direction :math:`d_t` is kept for the next
        hypergradient."""
        rule, group, states = self.rule, plan.group, plan.states
        buffers, counts = rule.read_state(states, plan.params)
        # Z_t = dw_{t+1}/dmu_t, from the state before the step (step_ updates it in place)
        tangents = (self._momentum_tangents(plan, buffers, hypers, counts)
                    if plan.momentum_span is not None else None)
        new_buffers, dirs = rule.step_(plan.params, plan.grads, buffers, hypers, counts,
                                       **rule.options(group))
        rule.write_state(states, new_buffers)
        if tangents is not None:
            for s, z in zip(states, tangents):
                s["momentum_tangent"] = z
        elif _learns_momentum(group):  # held: its tangents are no longer read
            for s in states:
                s.pop("momentum_tangent", None)
        for s, d in zip(states, dirs):
            # Kept unless the rule's state already holds it (heavy ball's buffer).
            if self._previous_direction(group, s) is not d:
                s["direction"] = d

    def _new_lr(self, index: int, plan: _Plan, h: float, values: list[float],
                train_loss: float | None) -> _Stepped:
        """A group's new learning rate (per-weight groups: the new mean), the policy's new state
        and what it adds to ``history``; nothing is committed (the step may still be skipped)."""
        group, end = plan.group, plan.span[1]
        if plan.new_lrs is not None:
            return values[end], None, {}
        lo, hi = _learned_bounds(group)
        policy = self._policy(group)
        if isinstance(policy, Additive):
            return min(max(group["lr"] - group["hyper_lr"] * h, lo), hi), None, {}
        norm = math.sqrt(values[end]) * math.sqrt(values[end + 1]) if policy.normalised else 0.0
        state = self.hyper_state.get("hyper_step", {}).get(index)
        if state is None:
            state = policy.init_state(group["lr"])
        lr, state = policy.update(group["lr"], h, norm, state, momentum=self._momentum(group),
                                  loss=train_loss)
        extra = {"hyper_step/phase": policy.phase(state)}
        if policy.normalised:
            extra["hypergrad/lr_cosine"] = h / norm if norm > 0.0 else 0.0
        return min(max(lr, lo), hi), state, extra

    def _new_momentum(self, index: int, plan: _Plan, values: list[float]) -> _Moved | None:
        r"""A group's new momentum, its hypergradient :math:`h^\mu` and the policy's new state
        (``None`` when the momentum is not learned); nothing is committed."""
        if plan.momentum_span is None:
            if not _learns_momentum(plan.group):
                return None
            # Held (momentum_phase="stall" after the stall): no hypergradient is computed, and
            # history records 0 for it (a NaN would make equal histories compare unequal).
            return _Moved(self._momentum(plan.group), 0.0, None)
        group, (first, end) = plan.group, plan.momentum_span
        h = _fsum(values[first:end])
        policy = self._policy(group)
        norm = (math.sqrt(values[end]) * math.sqrt(values[end + 1]) if policy.normalised
                else 0.0)
        new, state = momentum_hyper_step(policy, self._momentum(group), h, norm,
                                         self.hyper_state.get("momentum_step", {}).get(index))
        return _Moved(new, h, state)

    def _momentum_tangents(self, plan: _Plan, buffers: Any, hypers: dict[str, Any],
                           counts: list[float] | None) -> list[Tensor]:
        r""":math:`Z_t = \partial w_{t+1} / \partial \mu_t` per parameter, the state before the
        step held constant: the rule's one-step tangent (one column, zero incoming tangents)."""
        return one_step_momentum_tangents(self.rule, self.momentum_hyper, plan.params,
                                          plan.grads, buffers, hypers, counts,
                                          self.rule.options(plan.group))

    def _per_parameter_lrs(self, index: int, group: dict[str, Any], params: list[Tensor],
                           states: list[dict[str, Any]], hypergrads: list[Tensor | None]
                           ) -> list[Tensor]:
        """Candidate per-weight learning rates (not yet stored: the step may still be skipped)."""
        published = self.hyper_state.get("published_lr", {}).get(index)
        # A new group lr from outside (a scheduler) scales every per-weight rate by new / old;
        # from an lr of 0 (a warm-up from 0) there is no ratio: the rates restart at the new lr.
        scale = None
        if published is not None and published != group["lr"]:
            scale = group["lr"] / published if published != 0.0 else math.inf
        lo, hi = _learned_bounds(group)
        out = []
        for p, s, h in zip(params, states, hypergrads):
            a = s.get("lr")
            if a is None or (scale is not None and not math.isfinite(scale)):
                a = torch.full_like(p, group["lr"])
            elif scale is not None:
                a = (a * scale).clamp_(group["lr_bounds"][0], max(hi, group["lr"]))
            if h is not None:
                a = (a - group["hyper_lr"] * h).clamp_(lo, hi)
            out.append(a)
        return out


def _loss_tensor(loss: Any, scalars: list[Tensor]) -> Tensor | None:
    """The closure's loss as a 0-d tensor for a policy to read, beside ``scalars`` (their
    device): a closure may return a plain number (torch's own tests return ``1``) or something
    that is not a number at all, which leaves the policy without a loss."""
    if isinstance(loss, Tensor):
        return loss.detach().reshape(())
    if loss is None or not scalars:
        return None
    try:
        return torch.tensor(float(loss), dtype=scalars[0].dtype, device=scalars[0].device)
    except (TypeError, ValueError):
        return None


# The additive policy of a group's hyper_lr, read three times a step: policies are immutable, and
# building the dataclass cost more than the lookup.
_additive = functools.lru_cache(maxsize=64, typed=True)(Additive)


def momentum_hyper_step(policy: HyperStep, mu: float, h: float, norm: float,
                        state: dict[str, float] | None) -> tuple[float, dict[str, float] | None]:
    r"""A learned momentum's next value from its hypergradient :math:`h^\mu`, and the policy's
    new state (``None`` for the additive policy, which keeps none): ``Additive(kappa)`` takes
    :math:`\mu - \kappa h^\mu`; every other policy moves :math:`u = 1 - \mu` with
    :math:`\partial E / \partial u = -h^\mu` (``norm`` is its scale for a normalised policy), so
    the horizon :math:`1/(1-\mu)` moves by factors. Held to :data:`MOMENTUM_BOUNDS`.

    Example:
        >>> momentum_hyper_step(Additive(0.1), 0.5, 2.0, 0.0, None)
        (0.3, None)
    """
    if isinstance(policy, Additive):
        new = mu - cast(float, policy.kappa) * h
    else:
        if state is None:
            state = policy.init_state(1.0 - mu)
        # The policy's reaction to a rising training loss is the learning rate's alone:
        # shrinking u would raise the momentum.
        u, state = policy.update(1.0 - mu, -h, norm, state, momentum=mu)
        new = 1.0 - u
    return min(max(new, MOMENTUM_BOUNDS[0]), MOMENTUM_BOUNDS[1]), state


def one_step_momentum_tangents(rule: UpdateRule, name: str, params: list[Tensor],
                               grads: list[Tensor], buffers: Any, hypers: dict[str, Any],
                               counts: list[float] | None, options: dict[str, Any]
                               ) -> list[Tensor]:
    r""":math:`\partial w_{t+1} / \partial \mu_t` per parameter for the rule's momentum
    hyperparameter ``name``, the weights and buffers before the step held constant: the rule's
    tangent (:func:`~hyperoptim.rules.rule_tangents`) with one column and no incoming
    tangents (``None``: the closed forms skip their products). Call it before the rule's in-place step."""
    z, _ = rule_tangents(rule, params, grads, buffers, hypers, None, None,
                         {b: [None] * len(params) for b in rule.buffer_names},
                         {name: params[0].new_ones(1)}, counts=counts, **options)
    return [t[0] for t in z]


def _learned_bounds(group: dict[str, Any]) -> tuple[float, float]:
    """``lr_bounds``, with the upper end capped at :data:`~hyperoptim.core.base.LEARNED_LIMIT` (1e3)
    unless the group's lr is already above it (a learned rate never climbs past 1e3)."""
    lo, hi = group["lr_bounds"]
    return lo, min(hi, max(LEARNED_LIMIT, group["lr"]))


def _fsum(values: list[float]) -> float:
    """The exact sum of ``values``; NaN if one is not finite (products that overflowed: the guard
    then skips the step), where ``math.fsum`` would raise on ``-inf + inf``."""
    return math.fsum(values) if all(math.isfinite(v) for v in values) else math.nan


def _mean_and_largest(rates: list[Tensor], lr: float) -> list[Tensor]:
    """The mean and the largest element of per-weight ``rates`` (``lr`` twice when there are
    none)."""
    n = sum(a.numel() for a in rates)
    if not n:
        return [torch.tensor(lr), torch.tensor(lr)]
    return [torch.stack([a.sum() for a in rates]).sum() / n,
            torch.stack([a.amax() for a in rates]).amax()]


def _scale_terms(objs: list[Tensor], prev: list[Tensor | None]) -> list[Tensor]:
    r""":math:`\lVert \nabla E(w_t) \rVert^2` and :math:`\lVert d_{t-1} \rVert^2` over the terms
    of :math:`h_t`: its scale, for a normalised policy (partial sums under FSDP2, completed with
    the dots)."""
    pairs = [(o, d) for o, d in zip(objs, prev) if d is not None]
    return [_squares([o for o, _ in pairs], objs), _squares([d for _, d in pairs], objs)]


def _squares(tensors: list[Tensor], like: list[Tensor]) -> Tensor:
    """The sum of squares of ``tensors`` (0 in ``like``'s dtype when there are none)."""
    if not tensors:
        # local(): under FSDP2 a DTensor's zeros would be a DTensor among plain partial sums.
        return local(like[0]).new_zeros(()) if like else torch.zeros((), dtype=torch.float64)
    return torch.stack([_dot(t, t) for t in tensors]).sum()


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> over all elements (1-D tensors skip the reshape: biases are many and small)."""
    if type(a) is not Tensor or type(b) is not Tensor:  # a plain tensor is no DTensor: no call
        a, b = local(a), local(b)  # FSDP2: this rank's partial sum
    return torch.dot(a, b) if a.dim() == 1 else torch.dot(a.reshape(-1), b.reshape(-1))


def _host_floats(scalars: list[Tensor], tail: Tensor) -> list[float]:
    """0-d tensors, then the float64 vector ``tail``, to Python floats with one host sync (one
    ``stack``; type promotion takes every value to float64 exactly)."""
    if not scalars:
        return tail.tolist()
    return torch.cat([torch.stack(scalars), tail]).tolist()
