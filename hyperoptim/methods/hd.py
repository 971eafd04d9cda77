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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from ..core.base import LEARNED_LIMIT, HyperOptimizer
from ..core.checks import check_value, is_real
from ..core.dist import all_reduce_mean, world_size
from ..core.shard import is_sharded, local, sums_and_norms
from ..core.types import Closure
from ..hyperstep import Additive, HyperStep, resolve
from ..rules.base import UpdateRule

__all__ = ["RuleHypergrad", "hyper_step_option"]


def hyper_step_option(hypergrad_lr: float | None, hyper_step: HyperStep | str | None,
                      default_kappa: float, default: HyperStep | str) -> tuple[float, str]:
    r"""The constructor's ``hypergrad_lr`` and ``hyper_step`` as the group's ``(hypergrad_lr,
    hyper_step)``: a float ``hypergrad_lr`` alone is the additive policy with that
    :math:`\kappa` (every trajectory as before the policies existed); ``hyper_step`` alone is that
    policy (``Additive(kappa)`` sets ``hypergrad_lr``); neither is the class default."""
    if hypergrad_lr is not None and hyper_step is not None:
        raise ValueError(f"Invalid hyper_step value: {hyper_step!r} (hypergrad_lr={hypergrad_lr} "
                         "already chooses the additive policy: pass one of hypergrad_lr and "
                         "hyper_step)")
    if hypergrad_lr is not None:
        check_value("hypergrad_lr", hypergrad_lr, is_real(hypergrad_lr) and hypergrad_lr >= 0.0)
        return float(hypergrad_lr), Additive.name
    policy = resolve(default if hyper_step is None else hyper_step)
    if isinstance(policy, Additive):
        kappa = default_kappa if policy.kappa is None else policy.kappa
        check_value("hypergrad_lr", kappa, is_real(kappa) and kappa >= 0.0)
        return float(kappa), Additive.name
    return float(default_kappa), repr(policy)


class RuleHypergrad(HyperOptimizer):
    r"""Hypergradient descent over ``rule`` (a base class; see ``HypergradSGD``, ``HypergradAdam``).

    Param groups carry ``lr``, ``hypergrad_lr`` (:math:`\kappa`), ``lr_bounds`` and
    ``per_parameter`` next to the rule's own hyperparameters. ``state[p]`` holds the rule's state
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

    Subclasses set ``rule``, check their arguments, and say what the training-loss objective's
    gradient is (:meth:`_objective_grads`).
    """

    rule: ClassVar[UpdateRule]
    _supports_fsdp2 = True

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
                             "takes the additive hyper-step: pass hypergrad_lr)")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            # A checkpoint saved before the policies existed took the additive step.
            group.setdefault("hyper_step", Additive.name)

    @staticmethod
    def _policy(group: dict[str, Any]) -> HyperStep:
        r"""The group's hyper-step policy (``"additive"``: :math:`\kappa` = ``hypergrad_lr``)."""
        spec = group.get("hyper_step", Additive.name)
        if spec == Additive.name:
            return Additive(group["hypergrad_lr"])
        return resolve(spec)

    @staticmethod
    def _momentum(group: dict[str, Any]) -> float:
        """The inner rule's momentum, which paces the policy's growth (SGD's ``momentum``)."""
        return float(group.get("momentum", 0.0))


    def _objective_grads(self, group: dict[str, Any], params: list[Tensor],
                         grads: list[Tensor]) -> list[Tensor]:
        """:math:`\nabla E(w_t)` in training-loss mode: the gradient the rule descends."""
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

        Args:
            closure (callable, optional): recomputes and returns the training loss; it may call
                ``zero_grad()``/``backward()`` itself or not.
            val_closure (callable, optional): overrides the constructor's ``val_closure`` for this
                step.

        Returns:
            The closure's loss, or None.
        """
        loss, _ = self._training_loss(closure)
        val_closure = self._resolve_val_closure(val_closure, required=False)

        groups = [(group, self._params_with_grad(group)) for group in self.param_groups]
        sharded = any(is_sharded(p) for _, ps in groups for p in ps)  # FSDP2
        objective: dict[Tensor, Tensor] = {}
        val_loss: Tensor | None = None
        if val_closure is not None:
            with_grad = [p for _, ps in groups for p in ps]
            val_loss, val_grads = self._validation_grads(val_closure, with_grad,
                                                         average_loss=not sharded)
            objective = dict(zip(with_grad, val_grads))

        # Every scalar of the step goes into one flat list and one host sync: per group, its
        # <grad E, d_{t-1}> terms (summed on the host), then the mean and the largest of the
        # per-weight rates.
        plans = []
        scalars: list[Tensor] = []
        for index, (group, params) in enumerate(groups):
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            prev = [self._previous_direction(group, s) for s in states]
            # h_t = -<grad E(w_t), d_{t-1}>
            if val_closure is not None:
                objs = [objective[p] for p in params]
            else:
                objs = self._objective_grads(group, params, grads)
            start = len(scalars)
            new_lrs = None
            if group["per_parameter"]:
                elementwise = [None if d is None else -(o * d) for o, d in zip(objs, prev)]
                scalars.extend(-e.sum() for e in elementwise if e is not None)
                new_lrs = self._per_parameter_lrs(index, group, params, states, elementwise)
            else:
                scalars.extend(_dot(o, d) for o, d in zip(objs, prev) if d is not None)
            span = (start, len(scalars))
            if not group["per_parameter"] and self._policy(group).normalised:
                # ||grad E(w_t)||^2 and ||d_{t-1}||^2 over the terms of h_t: its scale (partial
                # sums under FSDP2, completed with the dots).
                pairs = [(o, d) for o, d in zip(objs, prev) if d is not None]
                scalars.append(_squares([o for o, _ in pairs], objs))
                scalars.append(_squares([d for _, d in pairs], objs))
            if new_lrs is not None:
                n = sum(a.numel() for a in new_lrs)
                scalars.append(torch.stack([a.sum() for a in new_lrs]).sum() / n if n
                               else torch.tensor(group["lr"]))
                scalars.append(torch.stack([a.amax() for a in new_lrs]).amax() if n
                               else torch.tensor(group["lr"]))
            plans.append((group, params, grads, states, span, new_lrs))

        norms = None
        if sharded:
            # FSDP2: one all-reduce completes every dot and the guard's norms, and sums the
            # ranks' validation losses.
            tensors = [t for kinds in self._guard_tensors(groups) for ts in kinds for t in ts]
            sums, norms = sums_and_norms(scalars + ([] if val_loss is None else [val_loss]), tensors)
            scalars = sums[:len(scalars)]
            if val_loss is not None:
                val_loss = sums[-1] / world_size()
        if val_loss is not None:
            scalars.append(val_loss)
        # A policy that reads the training loss reads its mean over ranks (every rank's policy
        # state must stay identical; the closure's loss is this rank's own).
        reads_loss = loss is not None and any(self._policy(g).uses_loss for g, _ in groups)
        if reads_loss:
            scalars.append(all_reduce_mean([cast(Tensor, loss).detach().reshape(())])[0])
        guard = self._guard_scalars(loss, groups, norms)
        values = _host_floats(scalars + guard)
        values, checked = values[: len(scalars)], values[len(scalars):]

        hypergrads = [-_fsum(values[a:b]) for _, _, _, _, (a, b), _ in plans]
        # The training loss's mean over ranks (the last scalar), for policies that read it.
        train_loss = None
        if reads_loss:
            train_loss = -values[-1] if self.defaults["maximize"] else values[-1]
        stepped = [self._new_lr(i, plan, h, values, train_loss)
                   for i, (plan, h) in enumerate(zip(plans, hypergrads))]
        group_lrs = [lr for lr, _, _ in stepped]
        largest = [values[b + 1] if plan[-1] is not None else lr
                   for plan, (_, b), lr in zip(plans, (p[4] for p in plans), group_lrs)]
        # One guard for everything the step is about to commit (docs/design.md §7): the hypergradient
        # and validation loss, the training gradient, and the weights the new rate would give.
        reason = None if self._all_finite(*values) else "hypergradient or validation loss"
        if reason is None:
            reason = self._guard_verdict(checked, groups, [{"lr": a} for a in largest])
        if reason is not None:
            self._warn_nonfinite(reason)
            for i, group in enumerate(self.param_groups):
                extra = {} if not stepped[i][2] else dict.fromkeys(stepped[i][2], math.nan)
                self._record(i, skipped=True, lr=group["lr"], **{"hypergrad/lr": math.nan},
                             **extra)
            return loss

        rule = self.rule
        for i, (plan, h, (new_lr, policy_state, extra)) in enumerate(
                zip(plans, hypergrads, stepped)):
            group, params, grads, states, _, new_lrs = plan
            group["lr"] = new_lr
            if policy_state is not None:
                self.hyper_state.setdefault("hyper_step", {})[i] = policy_state
            hypers: dict[str, Any] = rule.hypers(group)
            if new_lrs is not None:
                self.hyper_state.setdefault("published_lr", {})[i] = new_lr
                for s, a in zip(states, new_lrs):
                    s["lr"] = a
                hypers["lr"] = new_lrs
            if params:
                buffers, counts = rule.read_state(states, params)
                new_buffers, dirs = rule.step_(params, grads, buffers, hypers, counts,
                                               **rule.options(group))
                rule.write_state(states, new_buffers)
                for s, d in zip(states, dirs):
                    # Kept unless the rule's state already holds it (heavy ball's buffer).
                    if self._previous_direction(group, s) is not d:
                        s["direction"] = d
            self._record(i, lr=group["lr"], **{"hypergrad/lr": h}, **extra)
        return loss

    def _new_lr(self, index: int, plan: tuple[Any, ...], h: float, values: list[float],
                train_loss: float | None) -> tuple[float, dict[str, float] | None,
                                                   dict[str, float]]:
        """A group's new learning rate (per-weight groups: the new mean), the policy's new state
        and what it adds to ``history``; nothing is committed (the step may still be skipped)."""
        group, *_, (_, end), new_lrs = plan
        if new_lrs is not None:
            return values[end], None, {}
        lo, hi = _learned_bounds(group)
        policy = self._policy(group)
        if isinstance(policy, Additive):
            return min(max(group["lr"] - group["hypergrad_lr"] * h, lo), hi), None, {}
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
                a = (a - group["hypergrad_lr"] * h).clamp_(lo, hi)
            out.append(a)
        return out


def _learned_bounds(group: dict[str, Any]) -> tuple[float, float]:
    """``lr_bounds``, with the upper end capped at :data:`~hyperoptim.core.base.LEARNED_LIMIT` (1e3)
    unless the group's lr is already above it (a learned rate never climbs past 1e3)."""
    lo, hi = group["lr_bounds"]
    return lo, min(hi, max(LEARNED_LIMIT, group["lr"]))


def _fsum(values: list[float]) -> float:
    """The exact sum of ``values``; NaN if one is not finite (products that overflowed: the guard
    then skips the step), where ``math.fsum`` would raise on ``-inf + inf``."""
    return math.fsum(values) if all(math.isfinite(v) for v in values) else math.nan


def _squares(tensors: list[Tensor], like: list[Tensor]) -> Tensor:
    """The sum of squares of ``tensors`` (0 in ``like``'s dtype when there are none)."""
    if not tensors:
        return like[0].new_zeros(()) if like else torch.zeros((), dtype=torch.float64)
    return torch.stack([_dot(t, t) for t in tensors]).sum()


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> over all elements (1-D tensors skip the reshape: biases are many and small)."""
    a, b = local(a), local(b)  # FSDP2: this rank's partial sum
    return torch.dot(a, b) if a.dim() == 1 else torch.dot(a.reshape(-1), b.reshape(-1))


def _host_floats(scalars: list[Tensor]) -> list[float]:
    """0-d tensors to Python floats with one host sync (one ``stack`` when dtypes agree)."""
    if not scalars:
        return []
    dtype = scalars[0].dtype
    if any(t.dtype != dtype for t in scalars):
        scalars = [t.double() for t in scalars]
    return torch.stack(scalars).tolist()
