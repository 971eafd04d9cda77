r"""MARTHE: an online learning-rate schedule from discounted forward-mode hypergradients
(Donini et al., 2020)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from ._base import (
    LEARNED_LIMIT,
    HyperOptimizer,
    all_reduce_mean,
    check_sgd_arguments,
    check_value,
    is_real,
)
from ._types import Closure, ParamsT
from ._update import SGD, UpdateRule, apply_update_, rule_tangents, sgd_direction
from .hyperstep import Additive, HyperStep, resolve

__all__ = ["MartheSGD", "RuleMarthe", "adaptive_mu", "marthe_hyper_step"]


def marthe_hyper_step(hyper_step: HyperStep | str | None) -> str:
    r"""The group's ``"hyper_step"`` for MARTHE's constructor option: ``None`` or ``"additive"``
    is MARTHE's own step (:math:`\beta` from ``hypergrad_lr``/``adapt_hypergrad_lr``); any other
    policy (:mod:`hyperoptim.hyperstep`) replaces it."""
    if hyper_step is None:
        return Additive.name
    policy = resolve(hyper_step)
    if isinstance(policy, Additive):
        if policy.kappa is not None:
            raise ValueError(f"Invalid hyper_step value: {hyper_step!r} (MARTHE's additive step "
                             "takes its size from hypergrad_lr and adapt_hypergrad_lr)")
        return Additive.name
    return repr(policy)


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

    Subclasses set ``rule`` (an :class:`~hyperoptim._update.UpdateRule`) and
    ``buffer_tangent_keys`` (the ``state[p]`` key of the tangent of each of the rule's buffers),
    and check their own arguments. The tangents :math:`(Z, S)` of the weights and of every buffer
    of the rule with respect to each group's current learning rate follow

    .. math::

        (Z, S)_{t+1} = \mu_t A_t (Z, S)_t + B_t, \qquad
        A_t = \frac{\partial \Phi_t}{\partial (w, s)} \text{ (with } H_t Z_t
        \text{ as the gradients' tangent)}, \quad B_t = \frac{\partial \Phi_t}{\partial a_t},

    both from autograd of the rule (:func:`hyperoptim._update.rule_tangents`), and
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

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        self._policy(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            # A checkpoint saved before the policies existed took MARTHE's own step.
            group.setdefault("hyper_step", Additive.name)

    @staticmethod
    def _policy(group: dict[str, Any]) -> HyperStep | None:
        r"""The group's hyper-step policy; None for MARTHE's own step :math:`a - \beta_t \Delta_t`
        (``"additive"``, with :math:`\beta_t` adapted or fixed as the group says)."""
        spec = group.get("hyper_step", Additive.name)
        return None if spec == Additive.name else resolve(spec)

    @staticmethod
    def _momentum(group: dict[str, Any]) -> float:
        """The inner rule's momentum, which paces a policy's growth (SGD's ``momentum``)."""
        return float(group.get("momentum", 0.0))

    def _tangent(self, p: Tensor, n_cols: int) -> Tensor:
        """:math:`Z` of ``p``, shape ``(n_cols, *p.shape)`` (zeros at first; padded when a
        param group was added since)."""
        z = self.state[p].get("tangent")
        return p.new_zeros((n_cols, *p.shape)) if z is None else _pad(z, n_cols)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
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
            policies = [self._policy(g) for g in groups]
            parts = [delta, torch.stack(g1)]
            if any(pol is not None and pol.normalised for pol in policies):
                # The scale of Delta_t = <grad E, Z_t[i]>: ||grad E||^2, then ||Z_t[i]||^2 per
                # column, over the tracked weights.
                parts.append(torch.stack([grad_e[p].double().pow(2).sum() for p in tracked])
                             .sum().reshape(1))
                parts.append(torch.stack([
                    self._tangent(p, n_cols).reshape(n_cols, -1).double().pow(2).sum(1)
                    for p in tracked]).sum(0))
            scalars = torch.cat([*parts, val_loss.double().reshape(1)])
            values = scalars.cpu().tolist()
            deltas, g1s = values[:n_cols], values[n_cols:2 * n_cols]
            norms = ([math.sqrt(values[2 * n_cols]) * math.sqrt(z)
                      for z in values[2 * n_cols + 1:3 * n_cols + 1]]
                     if len(parts) > 2 else [0.0] * n_cols)
            if not self._all_finite(*values):
                return self._skip(closure, deltas, values[-1])

            # 2. mu_t, beta_t, a_t from Delta_t (Appendix A; Section 4, sign derived above).
            for i, (group, h, d, g1_) in enumerate(zip(groups, hypers, deltas, g1s, strict=True)):
                if group["mu"] == "adaptive":
                    mu = adaptive_mu(d, g1_, h["count"])
                    h["count"] = h["mu"] * (1.0 + h["count"])
                    h["mu"] = mu
                policy = policies[i]
                if policy is not None:
                    # A policy turns the unclipped Delta_t into a_t (beta is not used).
                    state = self.hyper_state.get("hyper_step", {}).get(i)
                    if state is None:
                        state = policy.init_state(group["lr"])
                    raw, h["policy_state"] = policy.update(
                        group["lr"], d, norms[i], state, momentum=self._momentum(group),
                        loss=self.hyper_state.get("last_loss"))
                    h["new_lr"] = min(max(raw, 0.0), max(LEARNED_LIMIT, group["lr"]))
                    continue
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
            policy_state = h.pop("policy_state", None)
            if policy_state is not None:
                self.hyper_state.setdefault("hyper_step", {})[i] = policy_state
            self.hyper_state["groups"][i] = h
        if loss is not None and any(getattr(self._policy(g), "uses_loss", False) for g in groups):
            # The training loss at w_t reaches a policy at the next step (MARTHE updates the
            # learning rate before the training closure runs).
            value = float(all_reduce_mean([loss.detach().reshape(())])[0])  # the same on every rank
            self.hyper_state["last_loss"] = -value if self.defaults["maximize"] else value
        return loss
    def _advance(self, index: int, group: dict[str, Any], params: list[Tensor],
                 hz: dict[Tensor, Tensor] | None) -> None:
        r"""This group's step of the rule and its tangent update, in place.

        The incoming tangents are already :math:`\mu (Z, S)` and ``hz`` is :math:`H (\mu Z)`;
        :func:`~hyperoptim._update.rule_tangents` pushes them through the Jacobian of the
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


class MartheSGD(RuleMarthe):
    r"""SGD whose learning rate follows MARTHE's discounted hypergradient (Donini et al., 2020).

    PyTorch's SGD step (same arguments and update as ``torch.optim.SGD``) with one learning rate
    per param group, adapted online from the validation loss :math:`E`. Each step carries a
    forward-mode tangent :math:`(Z, C)` of the weights and the momentum buffer with respect to
    the learning rate, discounted by :math:`\mu`, and moves the learning rate against
    :math:`\Delta = \langle \nabla E, Z \rangle`. :math:`\mu = 0` is hypergradient descent on the
    validation loss (HD, Baydin et al. 2018: the same learning rates as ``HypergradSGD`` with a
    ``val_closure``), :math:`\mu = 1` is RTHO (Franceschi et al. 2017), ``mu="adaptive"`` is MARTHE.

    **Step** :math:`t` (Algorithm 1; DESIGN.md §3 for the SGD rule :math:`\Phi` with momentum
    :math:`b`, weight decay :math:`c`, direction :math:`d_t`):

    .. math::

        a_t &= \max(a_{t-1} - \beta_t \Delta_t,\ 0) \qquad (t \ge 1) \\
        (Z, C)_{t+1} &= \mu_t A_t (Z, C)_t + B_t, \qquad
            A_t = \frac{\partial \Phi_t}{\partial (w, v)}\Big|_{a_t, b, c},\quad
            B_t = \frac{\partial \Phi_t}{\partial a_t} = (-d_t, 0),\quad (Z, C)_0 = 0 \\
        w_{t+1} &= w_t - a_t d_t \qquad \text{(PyTorch's SGD step)} \\
        \Delta_{t+1} &= \langle \nabla E(w_{t+1}), Z_{t+1} \rangle, \qquad
            g'_1 = \langle \nabla E(w_{t+1}), -d_t \rangle \ \text{(the one-step HD hypergradient)}

    :math:`A_t` uses the *current* :math:`a_t`, the momentum and the weight decay (Nesterov
    included): with :math:`H_t` the training Hessian, :math:`(H_t + cI) Z_t` is the tangent of
    :math:`g_t`. With :math:`\mu = 1` and a constant learning rate, :math:`\Delta_T` is exactly
    :math:`dE(w_T)/da`. The discount and the hyper-learning rate then follow Appendix A and
    Section 4:

    .. math::

        \mu_{t+1} &= \operatorname{clip}\big(\Delta_{t+1} g'_1 / g_1'^2,\ 0,\ 1\big)^{1/(c_t + 1)},
            \qquad c_{t+1} = \mu_t (1 + c_t), \qquad \mu_0 = c_0 = 0 \\
        \beta_{t+1} &= \max\big(\beta_t - \kappa\, \Delta_{t+1} s_t,\ 0\big),\qquad
            s_t = \frac{\partial a_t}{\partial \beta_t} = \begin{cases} -\Delta_t &
            a_{t-1} - \beta_t \Delta_t \ge 0 \\ 0 & \text{otherwise (clipped at 0)}\end{cases},
            \qquad \beta_0 = 0.

    ``mu`` may also be a fixed number in [0, 1] (then :math:`\mu_t = \mu`), and with
    ``adapt_hypergrad_lr=False`` :math:`\beta_t` is the fixed ``hypergrad_lr``.

    *The sign of the* :math:`\beta` *update.* Treat the schedule as a function of :math:`\beta` and
    keep one step (the paper's ":math:`\mu = 0`" at this level): :math:`a_t = a_{t-1} - \beta_t
    \Delta_t` gives :math:`\partial a_t / \partial \beta_t = -\Delta_t =: s_t`, and
    :math:`\Delta_{t+1}` estimates :math:`\partial E(w_{t+1}) / \partial a_t` (exactly, when
    :math:`\mu_t = 0`), so

    .. math::

        \frac{\partial E(w_{t+1})}{\partial \beta_t} = \Delta_{t+1} s_t = -\Delta_{t+1} \Delta_t,
        \qquad \beta_{t+1} = \beta_t - \kappa \frac{\partial E(w_{t+1})}{\partial \beta_t}
        = \beta_t + \kappa\, \Delta_{t+1} \Delta_t:

    :math:`\beta` grows while consecutive hypergradients agree in sign and shrinks when they
    disagree, as HD's learning rate does with consecutive gradients. Algorithm 1 prints
    :math:`\beta_{t+1} = \beta_t - \kappa\, \Delta_{t+1} \Delta_t`, which with its own convention
    :math:`a_t = a_{t-1} - \beta_t \Delta_t` would *ascend* :math:`E`; this class follows the
    derivation. Where the learning rate was clipped at 0, :math:`s_t = 0` (the derivative of the
    max), so :math:`\beta` does not keep growing while the learning rate rests at 0.

    **When things happen.** :math:`\Delta_{t+1}`, :math:`g'_1`, :math:`\mu_{t+1}` and
    :math:`\beta_{t+1}` need :math:`\nabla E(w_{t+1})`; it is computed at the *start* of the next
    call to :meth:`step` (same weights, so the same numbers), just before the learning rate
    update that uses it. A non-finite validation loss or hypergradient can then skip the whole
    step before anything moves: weights, learning rate, :math:`\mu`, :math:`\beta` stay as they
    were, a ``RuntimeWarning`` says so once, and ``history[i]["skipped"]`` counts it. A non-finite
    :math:`\Delta` with a finite validation loss means the tangent itself overflowed: that group's
    tangent column and its :math:`\mu, c` are also reset to 0 (the history is forgotten, as when
    :math:`\mu = 0`) so that the next step can proceed.

    **Cost per step** (beyond SGD's forward and backward): one validation gradient (none at the
    first step, where :math:`Z = 0`), and while some
    :math:`\mu_t > 0`, one Hessian-vector product :math:`H_t Z_t` by double backward through the
    training gradient (the closure's backward runs with ``create_graph=True``; a user closure on
    live ``nn.Parameter``\ s is not a pure function, so forward-over-reverse does not apply). With
    several param groups, :math:`Z` has one column per group's learning rate over *all*
    parameters (a group's learning rate moves the other groups' weights through the shared
    loss), and the columns with :math:`\mu_t > 0` go through one batched product; memory is two
    copies of the weights per group (:math:`Z, C`; :math:`C` only with momentum). Parameters
    without a gradient at a step are left out of it (weights and tangents stay as they were), and
    a step where no parameter has a gradient changes nothing.

    **Validation pass.** ``val_closure`` returns :math:`E` from the live parameters; it may call
    ``backward()`` itself or not, and ``p.grad`` is left as the training closure set it. It runs
    as the user wrote it: to keep a train-mode BatchNorm's running statistics out of it, wrap its
    forward pass in :func:`hyperoptim.frozen_batchnorm_stats` (or switch to ``eval()`` there). The
    training gradients are never clipped or modified by this class.

    ``param_groups[i]["lr"]`` is always the current learning rate (a Python float; assigning to
    it works as with any optimizer), and ``history[i]`` records per step :math:`t`: ``"lr"``
    (:math:`a_t`), ``"hypergrad/lr"`` (:math:`\Delta_t`, the raw hypergradient that moved
    :math:`a_{t-1}` to :math:`a_t`; 0 at :math:`t = 0`), ``"mu"`` (:math:`\mu_t`, the discount
    used in this step's tangent update), ``"hypergrad_lr"`` (:math:`\beta_t`) and ``"skipped"``.
    With ``hypergrad_lr=0`` and ``adapt_hypergrad_lr=False`` the weights are bit-identical to
    ``torch.optim.SGD``'s. A resumed checkpoint continues exactly (tangents, :math:`\mu, c,
    \beta` and counters are in :meth:`state_dict`).

    Args:
        params (iterable): parameters or param-group dicts, as for ``torch.optim.SGD``.
        lr (float, optional): initial learning rate :math:`a_0` (default: 1e-3).
        momentum (float, optional): momentum factor (default: 0).
        dampening (float, optional): dampening for momentum (default: 0).
        weight_decay (float, optional): L2 penalty, part of the training step and of
            :math:`A_t` (default: 0).
        nesterov (bool, optional): Nesterov momentum (default: False).
        mu (str or float, optional): ``"adaptive"`` (Appendix A's rule) or a fixed discount in
            [0, 1]: 0 is HD, 1 is RTHO (default: ``"adaptive"``).
        hypergrad_lr (float, optional): with ``adapt_hypergrad_lr=True``, the step size
            :math:`\kappa` of the hyper-learning rate :math:`\beta` (which starts at 0, as the
            paper suggests); otherwise the fixed hyper-learning rate :math:`\beta`. Its scale
            depends on the scale of :math:`\Delta` (:math:`\kappa` scales like
            :math:`\beta / \Delta^2`): as the paper suggests, start high and divide by 10 until
            training does not diverge (default: 1e-6, for ``adapt_hypergrad_lr=True``: on
            ``benchmarks/marthe_schedules.py`` (digits MLP, 10 seeds) 1e-7 and 1e-5 both
            train well and 1e-3 diverged on 1 seed of 10, while a small linear regression in
            the tests diverges from 1e-5 on; a fixed :math:`\beta` needs its own value, 1e-4
            on that benchmark).
        adapt_hypergrad_lr (bool, optional): adapt :math:`\beta` online (default: True).
        hypergrad_clip (float, optional): clip :math:`\Delta` to
            :math:`[-\text{clip}, \text{clip}]` in the updates of :math:`a` and :math:`\beta`
            (``history`` keeps the raw value); ``None`` turns it off (default: None).
        hyper_step (HyperStep or str, optional): a policy of :mod:`hyperoptim.hyperstep` that
            turns :math:`\Delta_t` into :math:`a_t` instead of MARTHE's :math:`a_{t-1} - \beta_t
            \Delta_t` (normalised by :math:`\lVert \nabla E \rVert \lVert Z_t \rVert`; a policy
            that reads the training loss gets the previous step's); ``mu`` still discounts the
            tangent (default: None, MARTHE's own step).
        val_closure (callable, optional): returns the validation loss from the live parameters;
            may be overridden per step. Required, here or in :meth:`step` (default: None).
        hvp (str, optional): how :math:`H Z` is computed (:mod:`hyperoptim._hvp`): ``"exact"``
            (double backward; the closure must return the loss without calling ``backward()``),
            ``"finite_difference"`` (central differences of gradients, two extra closure calls
            per tangent column; works with ``backward()`` in the closure, DDP,
            ``torch.compile``), ``"forward_difference"`` (one extra call per column), or
            ``"auto"``: exact if the closure returns the loss without calling ``backward()``,
            central differences if it calls it (default: ``"auto"``).

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> xv, yv = torch.randn(16, 3), torch.randn(16, 1)
        >>> mse = torch.nn.functional.mse_loss
        >>> opt = MartheSGD(model.parameters(), lr=0.01, momentum=0.9,
        ...                 val_closure=lambda: mse(model(xv), yv))
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = mse(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(5):
        ...     loss = opt.step(closure)
        >>> sorted(opt.history[0]), isinstance(opt.param_groups[0]["lr"], float)
        (['hypergrad/lr', 'hypergrad_lr', 'lr', 'mu', 'skipped'], True)

    References:
        M. Donini, L. Franceschi, O. Majumder, M. Pontil, P. Frasconi. MARTHE: Scheduling the
        Learning Rate Via Online Hypergradients. IJCAI 2020 (arXiv:1910.08525).

        L. Franceschi, M. Donini, P. Frasconi, M. Pontil. Forward and Reverse Gradient-Based
        Hyperparameter Optimization. ICML 2017 (RTHO).

        A. G. Baydin, R. Cornish, D. Martinez Rubio, M. Schmidt, F. Wood. Online Learning Rate
        Adaptation with Hypergradient Descent. ICLR 2018 (HD).
    """

    rule = SGD
    buffer_tangent_keys = {"momentum_buffer": "tangent_buffer"}

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        mu: str | float = "adaptive",
        hypergrad_lr: float = 1e-6,
        adapt_hypergrad_lr: bool = True,
        hypergrad_clip: float | None = None,
        hyper_step: HyperStep | str | None = None,
        val_closure: Closure | None = None,
        hvp: str = "auto",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        check_sgd_arguments(lr, momentum, dampening, weight_decay, nesterov)
        policy = marthe_hyper_step(hyper_step)
        check_value("mu", mu, mu == "adaptive" or (is_real(mu) and 0.0 <= mu <= 1.0))
        check_value("hypergrad_lr", hypergrad_lr, is_real(hypergrad_lr) and hypergrad_lr >= 0.0)
        check_value("adapt_hypergrad_lr", adapt_hypergrad_lr, isinstance(adapt_hypergrad_lr, bool))
        check_value("hypergrad_clip", hypergrad_clip,
                    hypergrad_clip is None or (is_real(hypergrad_clip) and hypergrad_clip > 0.0))
        defaults = dict(
            lr=float(lr), momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, mu=mu if mu == "adaptive" else float(mu),
            hypergrad_lr=float(hypergrad_lr), adapt_hypergrad_lr=adapt_hypergrad_lr,
            hypergrad_clip=None if hypergrad_clip is None else float(hypergrad_clip),
            hyper_step=policy,
        )
        super().__init__(params, defaults, val_closure=val_closure, hvp=hvp, maximize=maximize,
                         foreach=foreach, fused=fused, differentiable=differentiable)

    @staticmethod
    def _previous_direction(group: dict[str, Any], state: dict[str, Any]) -> Tensor | None:
        if group["momentum"] != 0 and not group["nesterov"]:
            return state.get("momentum_buffer")
        return state.get("direction")

    def _advance(self, index: int, group: dict[str, Any], params: list[Tensor],
                 hz: dict[Tensor, Tensor] | None) -> None:
        r"""This group's SGD step and its tangent update, in place.

        The incoming tangents are already :math:`(\mu Z, \mu C)`, and ``hz`` is
        :math:`H (\mu Z)`. With float hyperparameters the rule before the learning rate,
        :func:`sgd_direction`, is linear in (weights, gradients, buffers), so applied to the
        tangents (weights :math:`\to \mu Z`, gradients :math:`\to H \mu Z`, buffers
        :math:`\to \mu C`) it *is* its own Jacobian-vector product: :math:`\mu C_{t+1}` and
        the direction's tangent :math:`D`, weight decay, dampening and Nesterov included. Then
        :math:`Z \leftarrow \mu Z - a_t D` (:func:`apply_update_`) and column ``index`` takes
        :math:`B_t = \partial w_{t+1} / \partial a_t = -d_t`. ``tests/test_marthe.py`` checks
        this against :func:`hyperoptim._update.sgd_tangents` (``torch.func.jvp`` of the rule),
        which gives the same numbers at several times the cost on small models. ``hz=None``
        means :math:`\mu (Z, C) = 0` (every :math:`\mu_t = 0`, or no tangent yet): then
        :math:`(Z, C)_{t+1} = B_t` and :math:`C_{t+1} = 0` is not stored.
        """
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        config = dict(dampening=group["dampening"], nesterov=group["nesterov"], inplace=True)
        momentum, weight_decay, lr = group["momentum"], group["weight_decay"], group["lr"]
        bufs = [s.get("momentum_buffer") for s in states]
        tangents = [s["tangent"] for s in states]
        new_tangent_bufs: list[Tensor | None] = [None] * len(params)
        if hz is not None:
            tangent_bufs = [None if b is None else s.get("tangent_buffer") for s, b in zip(
                states, bufs, strict=True)]
            tangent_bufs = [torch.zeros_like(z) if b is not None and c is None else c
                            for b, c, z in zip(bufs, tangent_bufs, tangents, strict=True)]
            _, new_tangent_bufs, tangent_dirs = sgd_direction(
                tangents, [hz[p] for p in params], tangent_bufs, momentum, weight_decay, **config)
            apply_update_(tangents, tangent_dirs, lr)
        _, new_bufs, dirs = sgd_direction(params, grads, bufs, momentum, weight_decay, **config)
        for z, d in zip(tangents, dirs, strict=True):
            z[index].sub_(d)
        apply_update_(params, dirs, lr)
        keep_direction = momentum == 0 or group["nesterov"]
        for s, buf, c, d, g in zip(states, new_bufs, new_tangent_bufs, dirs, grads, strict=True):
            if buf is not None:
                s["momentum_buffer"] = buf
            if buf is not None and c is not None:
                s["tangent_buffer"] = c
            else:
                s.pop("tangent_buffer", None)
            if keep_direction:
                # Heavy ball's direction is its buffer; otherwise keep a private copy.
                s["direction"] = d.clone() if d is g else d


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
