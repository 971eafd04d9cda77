r"""MARTHE over any update rule: an online learning-rate schedule from discounted forward-mode
hypergradients (Donini et al., 2020)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from ..core.base import LEARNED_LIMIT, HyperOptimizer
from ..core.types import Closure
from ..rules.base import UpdateRule, rule_tangents

__all__ = ["RuleMarthe", "adaptive_mu"]


def adaptive_mu(delta: float, g1: float, count: float) -> float:
    r"""Appendix A's discount :math:`\mu_{t+1} = \tilde q^{1/(c_t + 1)}`.

    With :math:`q = \Delta_{t+1} g'_1` and :math:`\tilde q = \operatorname{clip}(q / g_1'^2, 0, 1)
    = \operatorname{clip}(\Delta_{t+1} / g'_1, 0, 1)`; :math:`g'_1 = 0` (no one-step signal) gives
    :math:`\mu = 0`, forgetting the history.

    Example:
        >>> adaptive_mu(0.5, 1.0, 1.0)  # 0.5 ** (1 / 2)
        0.7071067811865476
        >>> adaptive_mu(-0.5, 1.0, 0.0), adaptive_mu(3.0, 1.0, 0.0), adaptive_mu(1.0, 0.0, 0.0)
        (0.0, 1.0, 0.0)
    """
    if g1 == 0.0:
        return 0.0
    ratio = min(max(delta / g1, 0.0), 1.0)
    return ratio ** (1.0 / (count + 1.0))

class RuleMarthe(HyperOptimizer):
    r"""MARTHE over an inner update rule: the algorithm of :class:`MartheSGD`, written once.

    Subclasses set ``rule`` (an :class:`~hyperoptim.rules.UpdateRule`) and
    ``buffer_tangent_keys`` (the ``state[p]`` key of the tangent of each of the rule's buffers),
    and check their own arguments. The tangents :math:`(Z, S)` of the weights and of every buffer
    of the rule with respect to each group's current learning rate follow

    .. math::

        (Z, S)_{t+1} = \mu_t A_t (Z, S)_t + B_t, \qquad
        A_t = \frac{\partial \Phi_t}{\partial (w, s)} \text{ (with } H_t Z_t
        \text{ as the gradients' tangent)}, \quad B_t = \frac{\partial \Phi_t}{\partial a_t},

    both from autograd of the rule (:func:`hyperoptim.rules.rule_tangents`), and
    :math:`g'_1 = -\langle \nabla E, d_t \rangle` with the direction :math:`d_t` the rule's
    in-place step returns (kept in ``state[p]["direction"]``). Everything else (the hypergradient,
    :math:`\mu`, :math:`\beta`, the guard, the atomic order) is shared.
    """

    rule: ClassVar[UpdateRule]
    buffer_tangent_keys: ClassVar[dict[str, str]]

    # ------------------------------------------------------------------ per-group hyper state
    def _hyper(self, index: int) -> dict[str, float]:
        r"""Group ``index``'s :math:`\mu_t, c_t, \beta_t, s_t` (floats in ``hyper_state``)."""
        groups = self.hyper_state.setdefault("groups", [])
        while len(groups) <= index:
            group = self.param_groups[len(groups)]
            beta = 0.0 if group["adapt_hypergrad_lr"] else group["hypergrad_lr"]
            groups.append(dict(mu=0.0, count=0.0, beta=beta, lr_beta_grad=0.0))
        return groups[index]

    @staticmethod
    def _previous_direction(group: dict[str, Any], state: dict[str, Any]) -> Tensor | None:
        return state.get("direction")

    def _tangent(self, p: Tensor, n_cols: int) -> Tensor:
        """:math:`Z` of ``p``, shape ``(n_cols, *p.shape)`` (zeros at first; padded when a
        param group was added since)."""
        z = self.state[p].get("tangent")
        return p.new_zeros((n_cols, *p.shape)) if z is None else _pad(z, n_cols)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None = None, *,
             val_closure: Closure | None = None) -> Any:
        """Perform one step: hypergradient at the current weights, learning-rate update, tangent
        update, then the rule's step (PyTorch's SGD or Adam step).

        Args:
            closure (callable, optional): recomputes and returns the training loss; it may call
                ``zero_grad()``/``backward()`` itself or not. Required unless ``mu=0`` (the
                tangent update needs the Hessian-vector product :math:`H_t Z_t`).
            val_closure (callable, optional): overrides the constructor's ``val_closure`` for this
                step.

        Returns:
            The closure's loss, or None.
        """
        # required=True: it raises rather than return None.
        objective = cast(Closure, self._resolve_val_closure(val_closure, required=True))
        groups = self.param_groups
        n_cols = len(groups)
        if closure is None and any(g["mu"] != 0 for g in groups):
            self._training_loss(None, second_order=True)  # raises: this needs a closure
        hypers = [dict(self._hyper(i)) for i in range(n_cols)]  # staged, committed at the end

        # 1. Delta_t = <grad E(w_t), Z_t> and g'_1 = <grad E(w_t), -d_{t-1}>: one validation
        #    gradient and one host sync.
        tracked = [p for g in groups for p in g["params"] if "tangent" in self.state[p]]
        deltas, g1s = [0.0] * n_cols, [0.0] * n_cols
        if tracked:
            val_loss, val_grads = self._validation_grads(objective, tracked)
            grad_e = dict(zip(tracked, val_grads, strict=True))
            delta = torch.stack([
                torch.mv(self._tangent(p, n_cols).reshape(n_cols, -1), grad_e[p].reshape(-1))
                .double() for p in tracked]).sum(0)
            g1 = []
            for group in groups:
                terms = []
                for p in group["params"]:
                    d = self._previous_direction(group, self.state[p])
                    if p in grad_e and d is not None:
                        terms.append(-torch.dot(grad_e[p].reshape(-1), d.reshape(-1)).double())
                g1.append(torch.stack(terms).sum() if terms else delta.new_zeros(()))
            scalars = torch.cat([delta, torch.stack(g1),
                                 val_loss.double().reshape(1)])
            values = scalars.cpu().tolist()
            deltas, g1s = values[:n_cols], values[n_cols:2 * n_cols]
            if not self._all_finite(*values):
                return self._skip(closure, deltas, values[-1])

            # 2. mu_t, beta_t, a_t from Delta_t (Appendix A; Section 4, sign derived above).
            for group, h, d, g1_ in zip(groups, hypers, deltas, g1s, strict=True):
                if group["mu"] == "adaptive":
                    mu = adaptive_mu(d, g1_, h["count"])
                    h["count"] = h["mu"] * (1.0 + h["count"])
                    h["mu"] = mu
                clip = group["hypergrad_clip"]
                d = d if clip is None else min(max(d, -clip), clip)
                if group["adapt_hypergrad_lr"]:
                    h["beta"] = max(h["beta"] - group["hypergrad_lr"] * d * h["lr_beta_grad"], 0.0)
                else:
                    h["beta"] = group["hypergrad_lr"]
                raw = group["lr"] - h["beta"] * d
                h["lr_beta_grad"] = -d if raw >= 0.0 else 0.0
                h["new_lr"] = min(max(raw, 0.0), max(LEARNED_LIMIT, group["lr"]))
            if not self._representable(*(h["new_lr"] for h in hypers)):
                return self._skip(closure, deltas, values[-1])
        for group, h in zip(groups, hypers, strict=True):
            if group["mu"] != "adaptive":
                h["mu"] = float(group["mu"])
            if not group["adapt_hypergrad_lr"]:
                h["beta"] = group["hypergrad_lr"]
            h.setdefault("new_lr", group["lr"])

        # 3. The training gradient, and H_t Z_t for the columns with mu_t > 0 (one batched
        #    product). H (mu Z) = mu (H Z): the product reads the stored tangents, which change
        #    only after the last call that can fail (closure, HVP, collective).
        active = [j for j in range(n_cols) if hypers[j]["mu"] != 0.0]
        need_hvp = bool(active) and bool(tracked)
        loss, second = self._training_loss(closure, second_order=need_hvp)
        plans = [(group, self._params_with_grad(group)) for group in groups]
        everything = [p for _, ps in plans for p in ps]
        mus = [h["mu"] for h in hypers]
        hz: dict[Tensor, Tensor] | None = None
        if second is not None:
            with second:
                cols = active if len(active) < n_cols else None
                stored = [self._tangent(p, n_cols) for p in second.params]
                prods = second.hvp(stored if cols is None else [z[cols] for z in stored])
            hz = {}
            for p, prod in zip(second.params, prods, strict=True):
                if cols is None:
                    hz[p] = _scale_(prod, mus)
                else:
                    hz[p] = prod.new_zeros((n_cols, *p.shape))
                    hz[p][cols] = _scale_(prod, [mus[j] for j in cols])
            del prods
        if self._guard_step(loss, plans, [{"lr": h["new_lr"]} for h in hypers]) is not None:
            for i, group in enumerate(groups):
                h = self._hyper(i)
                self._record(i, skipped=True, lr=group["lr"], mu=h["mu"], hypergrad_lr=h["beta"],
                             **{"hypergrad/lr": deltas[i]})
            return loss
        if not everything:  # nothing to step: nothing changes
            return loss

        # 4. Commit from here on: (Z, C) <- mu_t (Z, C) in place.
        for p in everything:
            state = self.state[p]
            state["tangent"] = _scale_(self._tangent(p, n_cols), mus)
            for key in self.buffer_tangent_keys.values():
                if state.get(key) is not None:
                    state[key] = _scale_(_pad(state[key], n_cols), mus)
        if hz is not None:
            for p in everything:
                hz.setdefault(p, p.new_zeros((n_cols, *p.shape)))

        # 5. Per group: (Z, C)_{t+1} = mu_t A_t (Z, C)_t + B_t (with the new a_t), then the step.
        for i, ((group, params), h) in enumerate(zip(plans, hypers, strict=True)):
            group["lr"] = h["new_lr"]
            if params:
                self._advance(i, group, params, hz)
            self._record(i, lr=group["lr"], mu=h["mu"], hypergrad_lr=h["beta"],
                         **{"hypergrad/lr": deltas[i]})
        for i, h in enumerate(hypers):
            h.pop("new_lr")
            self.hyper_state["groups"][i] = h
        return loss
    def _advance(self, index: int, group: dict[str, Any], params: list[Tensor],
                 hz: dict[Tensor, Tensor] | None) -> None:
        r"""This group's step of the rule and its tangent update, in place.

        The incoming tangents are already :math:`\mu (Z, S)` and ``hz`` is :math:`H (\mu Z)`;
        :func:`~hyperoptim.rules.rule_tangents` pushes them through the Jacobian of the
        rule with column ``index`` seeded by the learning rate (:math:`B_t`). ``hz=None`` means
        :math:`\mu (Z, S) = 0`: then :math:`Z_{t+1} = B_t = -d_t` (the direction the in-place
        step returns) and :math:`S_{t+1} = 0` (this step's buffers do not depend on
        :math:`a_t`) is not stored.
        """
        rule = self.rule
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        buffers, counts = rule.read_state(states, params)
        hypers, options = rule.hypers(group), rule.options(group)
        tangents = [s["tangent"] for s in states]
        keys = self.buffer_tangent_keys
        new_tangents: list[Tensor] | None = None
        if hz is not None:
            n_cols = tangents[0].shape[0]
            buffer_tangents = {
                name: [None if b is None or s.get(key) is None else _pad(s[key], n_cols)
                       for s, b in zip(states, buffers[name], strict=True)]
                for name, key in keys.items()}
            seed = tangents[0].new_zeros(n_cols)
            seed[index] = 1.0
            new_tangents, new_buffer_tangents = rule_tangents(
                rule, params, grads, buffers, hypers, tangents, [hz[p] for p in params],
                buffer_tangents, {"lr": seed}, counts=counts, **options)
        new_buffers, dirs = rule.step_(params, grads, buffers, hypers, counts, **options)
        rule.write_state(states, new_buffers)
        for i, (s, d) in enumerate(zip(states, dirs, strict=True)):
            s["direction"] = d
            if new_tangents is None:
                s["tangent"][index].sub_(d)
                for key in keys.values():
                    s.pop(key, None)
            else:
                s["tangent"] = new_tangents[i]
                for name, key in keys.items():
                    c = new_buffer_tangents[name][i]
                    if c is None:
                        s.pop(key, None)
                    else:
                        s[key] = c

    def _skip(self, closure: Callable[[], Any] | None, deltas: list[float], val_loss: float) -> Any:
        """The non-finite guard: nothing moves; an overflowed tangent column is reset."""
        self._warn_nonfinite("hypergradient or validation loss")
        bad = [j for j, d in enumerate(deltas) if not math.isfinite(d)]
        if bad and math.isfinite(val_loss):
            for j in bad:
                h = self._hyper(j)
                h["mu"], h["count"] = 0.0, 0.0
            for group in self.param_groups:
                for p in group["params"]:
                    for key in ("tangent", *self.buffer_tangent_keys.values()):
                        t = self.state[p].get(key)
                        if t is not None:
                            t[[j for j in bad if j < t.shape[0]]] = 0.0
        loss, _ = self._training_loss(closure)
        for i, group in enumerate(self.param_groups):
            h = self._hyper(i)
            self._record(i, skipped=True, lr=group["lr"], mu=h["mu"], hypergrad_lr=h["beta"],
                         **{"hypergrad/lr": deltas[i]})
        return loss


def _pad(t: Tensor, n_cols: int) -> Tensor:
    """``t`` with zero columns appended up to ``n_cols`` (a param group was added since)."""
    if t.shape[0] >= n_cols:
        return t
    return torch.cat([t, t.new_zeros((n_cols - t.shape[0], *t.shape[1:]))])


def _scale_(t: Tensor, mus: list[float]) -> Tensor:
    r"""Column ``j`` of ``t`` times ``mus[j]``, in place.

    The tangent update is linear in its incoming tangent, so :math:`\mu A (Z, C) + B` is the plain
    tangent step applied to :math:`(\mu Z, \mu C)` with :math:`H (\mu Z)` as the gradient's
    tangent.
    """
    if all(m == mus[0] for m in mus):
        if mus[0] == 0.0:
            return t.zero_()  # also clears a non-finite value: mu = 0 forgets
        return t if mus[0] == 1.0 else t.mul_(mus[0])
    for j, m in enumerate(mus):
        if m == 0.0:
            t[j].zero_()
        elif m != 1.0:
            t[j].mul_(m)
    return t
