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
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.base import LEARNED_LIMIT, HyperOptimizer
from ..core.checks import check_value
from ..core.types import Closure
from ..rules.base import UpdateRule

__all__ = ["RuleHypergrad"]


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

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        lo, hi = group["lr_bounds"]
        check_value("lr", group["lr"], lo <= group["lr"] <= hi)

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
        objective: dict[Tensor, Tensor] = {}
        val_loss: Tensor | None = None
        if val_closure is not None:
            with_grad = [p for _, ps in groups for p in ps]
            val_loss, val_grads = self._validation_grads(val_closure, with_grad)
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
            if new_lrs is not None:
                n = sum(a.numel() for a in new_lrs)
                scalars.append(torch.stack([a.sum() for a in new_lrs]).sum() / n if n
                               else torch.tensor(group["lr"]))
                scalars.append(torch.stack([a.amax() for a in new_lrs]).amax() if n
                               else torch.tensor(group["lr"]))
            plans.append((group, params, grads, states, span, new_lrs))

        if val_loss is not None:
            scalars.append(val_loss)
        guard = self._guard_scalars(loss, groups)
        values = _host_floats(scalars + guard)
        values, checked = values[: len(scalars)], values[len(scalars):]

        hypergrads = [-math.fsum(values[a:b]) for _, _, _, _, (a, b), _ in plans]
        group_lrs = [self._new_lr(plan, h, values) for plan, h in zip(plans, hypergrads)]
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
                self._record(i, skipped=True, lr=group["lr"], **{"hypergrad/lr": math.nan})
            return loss

        rule = self.rule
        for i, (plan, h, new_lr) in enumerate(zip(plans, hypergrads, group_lrs)):
            group, params, grads, states, _, new_lrs = plan
            group["lr"] = new_lr
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
            self._record(i, lr=group["lr"], **{"hypergrad/lr": h})
        return loss

    @staticmethod
    def _new_lr(plan: tuple[Any, ...], h: float, values: list[float]) -> float:
        """A group's new learning rate (per-weight groups: the new mean), not yet committed."""
        group, *_, (_, end), new_lrs = plan
        if new_lrs is not None:
            return values[end]
        lo, hi = _learned_bounds(group)
        return min(max(group["lr"] - group["hypergrad_lr"] * h, lo), hi)

    def _per_parameter_lrs(self, index: int, group: dict[str, Any], params: list[Tensor],
                           states: list[dict[str, Any]], hypergrads: list[Tensor | None]
                           ) -> list[Tensor]:
        """Candidate per-weight learning rates (not yet stored: the step may still be skipped)."""
        published = self.hyper_state.get("published_lr", {}).get(index)
        # A new group lr from outside (a scheduler) scales every per-weight rate by new / old.
        scale = (group["lr"] / published if published is not None and published != group["lr"]
                 else None)
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


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> over all elements (1-D tensors skip the reshape: biases are many and small)."""
    return torch.dot(a, b) if a.dim() == 1 else torch.dot(a.reshape(-1), b.reshape(-1))


def _host_floats(scalars: list[Tensor]) -> list[float]:
    """0-d tensors to Python floats with one host sync (one ``stack`` when dtypes agree)."""
    if not scalars:
        return []
    dtype = scalars[0].dtype
    if any(t.dtype != dtype for t in scalars):
        scalars = [t.double() for t in scalars]
    return torch.stack(scalars).tolist()
