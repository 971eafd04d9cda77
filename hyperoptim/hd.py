r"""Hypergradient descent on the learning rate (Baydin et al., 2018)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._base import LEARNED_LIMIT, HyperOptimizer, check_sgd_arguments, check_value, is_real
from ._types import Closure, ParamsT
from ._update import apply_update_, sgd_direction

__all__ = ["HypergradSGD"]


class HypergradSGD(HyperOptimizer):
    r"""SGD whose learning rate follows its hypergradient (hypergradient descent, HD).

    A drop-in replacement for ``torch.optim.SGD`` (same positional arguments, same update, same
    ``step(closure)``): before each SGD step the learning rate takes one gradient step on the
    derivative of the objective at the current weights with respect to the *previous* learning
    rate. With :math:`d_{t-1}` the previous update direction (:math:`d_{-1} = 0`):

    .. math::

        h_t &= \frac{\partial E(w_t)}{\partial a_{t-1}} = -\langle \nabla E(w_t), d_{t-1} \rangle \\
        a_t &= \operatorname{clamp}(a_{t-1} - \kappa\, h_t,\ a_{\min}, a_{\max}) \\
        w_{t+1} &= w_t - a_t d_t \qquad \text{(PyTorch's SGD step with } a_t\text{)}

    The objective :math:`E` is the training loss (Baydin et al.'s rule, free: :math:`\nabla E(w_t)`
    is the gradient :math:`g_t` including weight decay) unless a ``val_closure`` is given; then it
    is the validation loss and each step takes one validation gradient (no weight decay term),
    leaving the training gradients in ``p.grad`` as they were.

    Each param group has its own learning rate and hypergradient. With ``per_parameter=True``
    every weight has its own learning rate (the elementwise rule
    :math:`a_t = \operatorname{clamp}(a_{t-1} + \kappa\, \nabla E(w_t) \odot d_{t-1})`), kept in
    ``state[p]["lr"]``; the group's ``"lr"`` shows their mean, and assigning a new value to it
    (by hand or by a scheduler) scales them all by new / old, so a multiplicative scheduler
    composes with what they learned.

    ``param_groups[i]["lr"]`` is always the current learning rate as a Python float, and
    ``history[i]`` records per step ``"lr"`` (:math:`a_t`), ``"hypergrad/lr"`` (:math:`h_t`; with
    ``per_parameter``, the sum of the elementwise hypergradients) and ``"skipped"``. A non-finite
    hypergradient or validation loss skips the whole step (weights and learning rate unchanged)
    with one ``RuntimeWarning``. With ``hypergrad_lr=0`` the weights are bit-identical to
    ``torch.optim.SGD``'s.

    Args:
        params (iterable): parameters or param-group dicts, as for ``torch.optim.SGD``.
        lr (float, optional): initial learning rate :math:`a_0` (default: 1e-3).
        momentum (float, optional): momentum factor (default: 0).
        dampening (float, optional): dampening for momentum (default: 0).
        weight_decay (float, optional): L2 penalty (default: 0).
        nesterov (bool, optional): Nesterov momentum (default: False).
        hypergrad_lr (float, optional): the hyper-learning rate :math:`\kappa` (default: 1e-3,
            Baydin et al.'s value for SGD-HD). Its scale depends on the gradients' scale: divide
            it by 10 if the learning rate oscillates.
        lr_bounds (tuple of float, optional): :math:`(a_{\min}, a_{\max})`, with
            :math:`0 \le a_{\min} \le a_{\max}` (default: ``(0.0, inf)``). Public
            implementations let the learning rate go negative; this one does not.
        per_parameter (bool, optional): one learning rate per weight (default: False).
        val_closure (callable, optional): returns the validation loss from the live parameters;
            may be overridden per step (default: None, the training-loss rule).
        maximize (bool, optional): maximize the objectives instead, as ``torch.optim.SGD``
            (default: False).
        foreach, fused, differentiable: ``torch.optim.SGD``'s switches; only their defaults
            (None, None, False) are supported, the others raise ``ValueError``.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> opt = HypergradSGD(model.parameters(), lr=0.01, momentum=0.9, hypergrad_lr=1e-3)
        >>> for _ in range(5):
        ...     opt.zero_grad()
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     opt.step()
        >>> len(opt.history[0]["lr"]), isinstance(opt.param_groups[0]["lr"], float)
        (5, True)

    References:
        A. G. Baydin, R. Cornish, D. Martinez Rubio, M. Schmidt, F. Wood. Online Learning Rate
        Adaptation with Hypergradient Descent. ICLR 2018.
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
        hypergrad_lr: float = 1e-3,
        lr_bounds: tuple[float, float] = (0.0, math.inf),
        per_parameter: bool = False,
        val_closure: Closure | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        check_value("lr_bounds", lr_bounds,
                    isinstance(lr_bounds, (tuple, list)) and len(lr_bounds) == 2
                    and 0.0 <= lr_bounds[0] <= lr_bounds[1])
        check_sgd_arguments(lr, momentum, dampening, weight_decay, nesterov)
        check_value("lr", lr, lr_bounds[0] <= lr <= lr_bounds[1])
        check_value("hypergrad_lr", hypergrad_lr, is_real(hypergrad_lr) and hypergrad_lr >= 0.0)
        defaults = dict(
            lr=float(lr), momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, hypergrad_lr=hypergrad_lr,
            lr_bounds=(float(lr_bounds[0]), float(lr_bounds[1])), per_parameter=per_parameter,
        )
        super().__init__(params, defaults, val_closure=val_closure, maximize=maximize,
                         foreach=foreach, fused=fused, differentiable=differentiable)

    _supports_grad_scaler = True

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        lo, hi = group["lr_bounds"]
        check_value("lr", group["lr"], lo <= group["lr"] <= hi)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             val_closure: Closure | None = None) -> Any:
        """Perform one step: update each group's learning rate, then take PyTorch's SGD step.

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
        # <grad E, d_{t-1}> terms (summed on the host), then the mean of per-weight rates.
        plans = []
        scalars: list[Tensor] = []
        for index, (group, params) in enumerate(groups):
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            prev = [self._previous_direction(group, s) for s in states]
            wd = group["weight_decay"]
            # h_t = -<grad E(w_t), d_{t-1}>; in training-loss mode grad E = grad L + wd * w.
            if val_closure is not None:
                objs = [objective[p] for p in params]
            else:
                objs = grads if wd == 0 else [g.add(p, alpha=wd) for g, p in zip(grads, params)]
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
        # One guard for everything the step is about to commit (DESIGN.md §2): the hypergradient
        # and validation loss, the training gradient, and the weights the new rate would give.
        reason = None if self._all_finite(*values) else "hypergradient or validation loss"
        if reason is None:
            reason = self._guard_verdict(checked, groups, [{"lr": a} for a in largest])
        if reason is not None:
            self._warn_nonfinite(reason)
            for i, group in enumerate(self.param_groups):
                self._record(i, skipped=True, lr=group["lr"], **{"hypergrad/lr": math.nan})
            return loss

        for i, (plan, h, new_lr) in enumerate(zip(plans, hypergrads, group_lrs)):
            group, params, grads, states, _, new_lrs = plan
            group["lr"] = new_lr
            lr: float | list[Tensor] = new_lr
            if new_lrs is not None:
                self.hyper_state.setdefault("published_lr", {})[i] = new_lr
                for s, a in zip(states, new_lrs):
                    s["lr"] = a
                lr = new_lrs
            _, bufs, dirs = sgd_direction(
                params, grads, [s.get("momentum_buffer") for s in states],
                group["momentum"], group["weight_decay"],
                dampening=group["dampening"], nesterov=group["nesterov"], inplace=True,
            )
            apply_update_(params, dirs, lr)
            keep_direction = group["momentum"] == 0 or group["nesterov"]
            for s, buf, d, g in zip(states, bufs, dirs, grads):
                if buf is not None:
                    s["momentum_buffer"] = buf
                if keep_direction:
                    # Heavy ball's direction is its buffer; otherwise keep a private copy.
                    s["direction"] = d.clone() if d is g else d
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

    @staticmethod
    def _previous_direction(group: dict[str, Any], state: dict[str, Any]) -> Tensor | None:
        if group["momentum"] != 0 and not group["nesterov"]:
            return state.get("momentum_buffer")
        return state.get("direction")

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
    """``lr_bounds``, with the upper end capped at :data:`~hyperoptim._base.LEARNED_LIMIT` (1e3)
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
