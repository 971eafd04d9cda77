r"""MARTHE's hyper side (docs/design.md §4): from one validation gradient per step, the
hypergradients :math:`\Delta_t` and :math:`g'_1`, the discount :math:`\mu_t`, the hyper-learning
rate :math:`\beta_t` or the group's hyper-step policy, the proposed learning rate and (with
``tune=("lr", "momentum")``) the learned momentum, staged until the step commits.

A part of :class:`~hyperoptim.methods.marthe.RuleMarthe`, kept in its own module; it is not meant
to be used on its own.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core.base import LEARNED_LIMIT
from ..core.dist import all_reduce_mean
from ..core.shard import any_sharded, complete_sums, local
from ..core.types import Closure
from ..hyperstep import Additive, HyperStep, resolve
from .hd import _dot, _scale_terms, momentum_hyper_step, one_step_momentum_tangents
from .tuning import _learns_momentum

__all__ = ["MartheHyperStep", "adaptive_mu"]


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


class _Hypergradients(NamedTuple):
    """What one validation gradient tells a step (see :meth:`RuleMarthe._hypergradients`)."""

    deltas: list[float]
    g1s: list[float]
    norms: list[float]
    val_loss: float
    finite: bool
    policies: list[HyperStep | None]
    #: Per group :math:`(h^b_t, \text{its scale})`, or None where the momentum is not learned.
    momenta: list[tuple[float, float] | None]


class MartheHyperStep:
    r"""The hyper side of :class:`~hyperoptim.methods.marthe.RuleMarthe`: what one validation
    gradient tells a step, and the hyperparameters it proposes.

    The per-group values (:math:`\mu_t, c_t, \beta_t, s_t`) are staged in a copy
    (:meth:`_staged_hyper`) and stored only when the step commits (:meth:`_store_hypers`), so a
    skipped step leaves no trace. It reads from the optimizer it is part of: ``rule``,
    ``momentum_hyper``, the tangents (``_tangent``), and the base's ``param_groups``, ``state``,
    ``hyper_state``, ``_validation_grads`` and guard.
    """

    # ------------------------------------------------------------------ per-group hyper state
    def _hyper(self, index: int) -> dict[str, float]:
        r"""Group ``index``'s :math:`\mu_t, c_t, \beta_t, s_t` (floats in ``hyper_state``)."""
        groups = self.hyper_state.setdefault("groups", [])
        while len(groups) <= index:
            groups.append(self._staged_hyper(len(groups)))
        return groups[index]

    def _staged_hyper(self, index: int) -> dict[str, float]:
        """A copy of :meth:`_hyper`'s values that stores nothing (a failed step leaves no trace)."""
        groups = self.hyper_state.get("groups", [])
        if index < len(groups):
            return dict(groups[index])
        group = self.param_groups[index]
        beta = 0.0 if group["adapt_hyper_lr"] else group["hyper_lr"]
        return dict(mu=0.0, count=0.0, beta=beta, lr_beta_grad=0.0)

    @staticmethod
    def _previous_direction(group: dict[str, Any], state: dict[str, Any]) -> Tensor | None:
        return state.get("direction")

    @staticmethod
    def _policy(group: dict[str, Any]) -> HyperStep | None:
        r"""The group's hyper-step policy; None for MARTHE's own step :math:`a - \beta_t \Delta_t`
        (``"additive"``, with :math:`\beta_t` adapted or fixed as the group says)."""
        spec = group.get("hyper_step", Additive.name)
        return None if spec == Additive.name else resolve(spec)

    # ------------------------------------------------ what the guard and the policies read
    def _proposed(self, hypers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The values the guard checks per group: the proposed learning rate, and momentum where
        it is learned."""
        return [{"lr": h["new_lr"], **({} if "new_momentum" not in h else
                                       self._momentum_entry(g, h["new_momentum"]))}
                for g, h in zip(self.param_groups, hypers, strict=True)]

    def _reads_loss(self) -> bool:
        """Whether some group's policy reads the training loss (``ScaleFree``'s runaway watch)."""
        return self._watches_stall() or any(getattr(self._policy(g), "uses_loss", False)
                                            for g in self.param_groups)

    def _policy_loss(self, loss: Tensor | None) -> float | None:
        """The training loss at :math:`w_t` as a policy reads it: its mean over the ranks (every
        rank's policy state must stay identical), negated under ``maximize``; ``None`` without
        one."""
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return None
        value = float(all_reduce_mean([loss.detach().reshape(())])[0])
        return -value if self.defaults["maximize"] else value

    def _propose_with_loss(self, hypers: list[dict[str, Any]], loss: float | None) -> None:
        r"""The learning rates of the groups whose policy reads the training loss, proposed once
        the training closure has run: the policy sees :math:`L(w_t)` in the step whose update it
        sets, as HD's does (a runaway is met in the step that sees it; read at the next step, as
        before, the first division by 10 came when diabetes' loss was already 15-470x its start).
        A group without a hypergradient (the first step: no tangent yet) still shows the policy
        its loss, with a NaN for the hypergradient (no signal: ``ScaleFree`` takes no step on
        it), so the watch knows the run's first loss and a runaway is met there too."""
        for i, (group, h) in enumerate(zip(self.param_groups, hypers, strict=True)):
            pending = h.pop("pending_policy", None)
            policy = self._policy(group)
            if policy is None or not policy.uses_loss:
                continue
            delta, norm = pending if pending is not None else (math.nan, 0.0)
            raw = self._policy_lr(i, group, h, delta, norm, policy, loss)
            h["new_lr"] = min(max(raw, 0.0), max(LEARNED_LIMIT, group["lr"]))

    # ------------------------------------------------------------------ step 1: the hypergradients
    def _hypergradients(self, objective: Closure, tracked: list[Tensor]) -> _Hypergradients:
        r"""Step 1: per group :math:`\Delta_t = \langle \nabla E(w_t), Z_t \rangle`,
        :math:`g'_1 = \langle \nabla E(w_t), -d_{t-1} \rangle` and the norm a normalised policy
        divides by (0 when no policy needs it), :math:`E(w_t)`, whether all of these are finite,
        and the groups' policies: one validation gradient and one host sync."""
        groups = self.param_groups
        n_cols = len(groups)
        # FSDP2: every term below is a partial sum over this rank's shards, completed at the end.
        sharded = any_sharded(tracked)
        val_loss, val_grads = self._validation_grads(objective, tracked, average_loss=not sharded)
        grad_e = {p: local(g) for p, g in zip(tracked, val_grads, strict=True)}
        delta = torch.stack([
            torch.mv(self._tangent(p, n_cols).reshape(n_cols, grad_e[p].numel()),
                     grad_e[p].reshape(-1)).double() for p in tracked]).sum(0)
        parts = [delta, self._one_step_hypergradients(grad_e, delta.new_zeros(()))]
        policies = [self._policy(g) for g in groups]
        if any(pol is not None and pol.normalised for pol in policies):
            # The scale of Delta_t = <grad E, Z_t[i]>: ||grad E||^2, then ||Z_t[i]||^2 per
            # column, over the tracked weights.
            parts.append(torch.stack([grad_e[p].double().pow(2).sum() for p in tracked])
                         .sum().reshape(1))
            parts.append(torch.stack([
                self._tangent(p, n_cols).reshape(n_cols, grad_e[p].numel()).double().pow(2).sum(1)
                for p in tracked]).sum(0))
        normalised = len(parts) > 2
        # h^b per group, then its scale terms: the last 3 * n_cols values before E.
        parts.append(self._momentum_terms(grad_e, delta.new_zeros(())))
        # One all-reduce under FSDP2: the partial sums, and the ranks' losses to average.
        values = complete_sums(torch.cat([*parts, val_loss.double().reshape(1)]), sharded)
        values = values.cpu().tolist()
        norms = ([math.sqrt(values[2 * n_cols]) * math.sqrt(z)
                  for z in values[2 * n_cols + 1:3 * n_cols + 1]]
                 if normalised else [0.0] * n_cols)
        momenta = _momentum_hypergradients(values[-1 - 3 * n_cols:-1], policies,
                                           [self._momentum_live(g) for g in groups])
        return _Hypergradients(values[:n_cols], values[n_cols:2 * n_cols], norms, values[-1],
                               self._all_finite(*values), policies, momenta)

    def _momentum_terms(self, grad_e: dict[Tensor, Tensor], zero: Tensor) -> Tensor:
        r"""Per group :math:`h^b_t = \langle \nabla E(w_t), Y_{t-1} \rangle` and its scale,
        :math:`\lVert \nabla E \rVert^2` and :math:`\lVert Y_{t-1} \rVert^2` over the group's
        weights that have a :math:`Y` (zeros for a group that does not learn its momentum; empty
        when no group does)."""
        if not any(_learns_momentum(g) for g in self.param_groups):
            return zero.new_zeros(0)
        # A held momentum (momentum_phase="stall" after the stall) gives zeros, as an unlearned
        # one does: the layout stays one triple per group.
        terms = []
        for group in self.param_groups:
            pairs = self._momentum_pairs(group, grad_e) if self._momentum_live(group) else []
            if not pairs:
                terms.extend([zero, zero, zero])
                continue
            terms.append(torch.stack([_dot(o, y) for o, y in pairs]).double().sum())
            terms.extend(t.double() for t in _scale_terms(*zip(*pairs, strict=True)))
        return torch.stack(terms)

    def _momentum_pairs(self, group: dict[str, Any], grad_e: dict[Tensor, Tensor]
                        ) -> list[tuple[Tensor, Tensor]]:
        r""":math:`(\nabla E, Y_{t-1})` of the group's weights that have both."""
        states = ((p, self.state.get(p, {})) for p in group["params"] if p in grad_e)
        return [(grad_e[p], s["momentum_tangent"]) for p, s in states if "momentum_tangent" in s]

    def _one_step_hypergradients(self, grad_e: dict[Tensor, Tensor], zero: Tensor) -> Tensor:
        r""":math:`g'_1 = -\langle \nabla E, d_{t-1} \rangle` per group (``zero`` where no
        parameter of the group has a previous direction)."""
        g1 = []
        for group in self.param_groups:
            terms = []
            for p in group["params"]:
                d = self._previous_direction(group, self.state[p])
                if p in grad_e and d is not None:
                    terms.append(-torch.dot(grad_e[p].reshape(-1), local(d).reshape(-1)).double())
            g1.append(torch.stack(terms).sum() if terms else zero)
        return torch.stack(g1)

    # ------------------------------------------------------------------ step 2: the proposal
    def _propose(self, hypers: list[dict[str, Any]], measured: _Hypergradients) -> None:
        r"""Step 2: :math:`\mu_t, \beta_t` and the proposed :math:`a_t` (``"new_lr"``) of every
        group from :math:`\Delta_t` (Appendix A; Section 4, sign derived in
        :class:`~hyperoptim.MartheSGD`), into the staged ``hypers``."""
        for i, (group, h, d, g1_) in enumerate(
                zip(self.param_groups, hypers, measured.deltas, measured.g1s, strict=True)):
            if group["mu"] == "adaptive":
                mu = adaptive_mu(d, g1_, h["count"])
                h["count"] = h["mu"] * (1.0 + h["count"])
                h["mu"] = mu
            policy = measured.policies[i]
            if policy is not None and policy.uses_loss:
                # Proposed after the training closure (_propose_with_loss), with its loss.
                h["pending_policy"] = (d, measured.norms[i])
            else:
                raw = (_additive_lr(group, h, d) if policy is None else
                       self._policy_lr(i, group, h, d, measured.norms[i], policy, None))
                h["new_lr"] = min(max(raw, 0.0), max(LEARNED_LIMIT, group["lr"]))
            if measured.momenta[i] is not None:
                self._propose_momentum(i, group, h, *measured.momenta[i],
                                       Additive(h["beta"]) if policy is None else policy)

    def _propose_momentum(self, index: int, group: dict[str, Any], h: dict[str, Any],
                          hypergrad: float, norm: float, policy: HyperStep) -> None:
        r"""The proposed momentum :math:`b_t` from :math:`h^b_t` (MARTHE's own step with the
        group's :math:`\beta_t`, or the group's policy on :math:`1 - b`), staged in ``h``."""
        h["new_momentum"], h["momentum_state"] = momentum_hyper_step(
            policy, self._momentum(group), hypergrad, norm,
            self.hyper_state.get("momentum_step", {}).get(index))
        h["hypergrad_momentum"] = hypergrad

    def _policy_lr(self, index: int, group: dict[str, Any], h: dict[str, Any], delta: float,
                   norm: float, policy: HyperStep, loss: float | None) -> float:
        r"""The unclipped :math:`a_t` a policy makes of the unclipped :math:`\Delta_t`
        (:math:`\beta` is not used) and the training loss at :math:`w_t` (for a policy that
        reads it); its new state is staged in ``h``."""
        state = self.hyper_state.get("hyper_step", {}).get(index)
        if state is None:
            state = policy.init_state(group["lr"])
        raw, h["policy_state"] = policy.update(
            group["lr"], delta, norm, state, momentum=self._momentum(group), loss=loss)
        return raw

    # ------------------------------------------------------------------ the commit
    def _move_momentum(self, group: dict[str, Any], h: dict[str, Any]) -> dict[str, float]:
        """Set a group's learned momentum to the staged value (unchanged where none was proposed:
        no tangent yet); returns its ``history`` entries (none if it is not learned)."""
        if not _learns_momentum(group):
            return {}
        value = h.pop("new_momentum", self._momentum(group))
        group.update(self._momentum_entry(group, value))
        return {"momentum": value, "hypergrad/momentum": h.pop("hypergrad_momentum", 0.0)}

    def _momentum_tangents(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        r""":math:`Y_t = \partial w_{t+1} / \partial b_t` of the group's ``params``, from the
        state before the rule's step (call it before :meth:`_advance`)."""
        rule = self.rule
        buffers, counts = rule.read_state([self.state[p] for p in params], params)
        return one_step_momentum_tangents(rule, self.momentum_hyper, params,
                                          [p.grad for p in params], buffers, rule.hypers(group),
                                          counts, rule.options(group))

    def _store_momentum_tangents(self, group: dict[str, Any], params: list[Tensor],
                                 ys: list[Tensor] | None) -> None:
        """Keep :math:`Y_t`; a weight without a gradient this step did not move, so its
        :math:`Y_t` is 0 (dropped)."""
        stepped = set(params) if ys is not None else set()
        for p in group["params"]:
            if p not in stepped and p in self.state:
                self.state[p].pop("momentum_tangent", None)
        for p, y in zip(params, ys or (), strict=False):
            self.state[p]["momentum_tangent"] = y

    def _store_hypers(self, hypers: list[dict[str, Any]]) -> None:
        """The staged per-group hyper-state, and the policies' states, into ``hyper_state``."""
        self._hyper(len(hypers) - 1)
        for i, h in enumerate(hypers):
            h.pop("new_lr")
            policy_state = h.pop("policy_state", None)
            if policy_state is not None:
                self.hyper_state.setdefault("hyper_step", {})[i] = policy_state
            momentum_state = h.pop("momentum_state", None)
            if momentum_state is not None:
                self.hyper_state.setdefault("momentum_step", {})[i] = momentum_state
            h.pop("new_momentum", None)
            h.pop("hypergrad_momentum", None)
            self.hyper_state["groups"][i] = h


def _momentum_hypergradients(values: list[float], policies: list[HyperStep | None],
                             live: list[bool]
                             ) -> list[tuple[float, float] | None]:
    r"""Per group :math:`(h^b_t, \text{norm})` from the three values :meth:`_momentum_terms` gave
    it (the norm only for a normalised policy), or None where the momentum is not learned at
    this step (not tuned, or held: ``live``)."""
    out: list[tuple[float, float] | None] = []
    for i, (policy, learned) in enumerate(zip(policies, live, strict=True)):
        if not learned:
            out.append(None)
            continue
        h, e2, y2 = values[3 * i:3 * i + 3]
        norm = math.sqrt(e2) * math.sqrt(y2) if policy is not None and policy.normalised else 0.0
        out.append((h, norm))
    return out


def _additive_lr(group: dict[str, Any], h: dict[str, Any], delta: float) -> float:
    r"""MARTHE's own unclipped :math:`a_{t-1} - \beta_t \Delta_t`, with :math:`\beta_t` adapted
    (or fixed) and :math:`s_t = \partial a_t / \partial \beta_t` staged in ``h``."""
    clip = group["hypergrad_clip"]
    d = delta if clip is None else min(max(delta, -clip), clip)
    if group["adapt_hyper_lr"]:
        h["beta"] = max(h["beta"] - group["hyper_lr"] * d * h["lr_beta_grad"], 0.0)
    else:
        h["beta"] = group["hyper_lr"]
    raw = group["lr"] - h["beta"] * d
    h["lr_beta_grad"] = -d if raw >= 0.0 else 0.0
    return raw


def _settle(hypers: list[dict[str, Any]], groups: list[dict[str, Any]]) -> None:
    r"""The fixed :math:`\mu` and :math:`\beta` as the groups say, and the learning rate
    unchanged where nothing proposed one (no tangent yet)."""
    for group, h in zip(groups, hypers, strict=True):
        if group["mu"] != "adaptive":
            h["mu"] = float(group["mu"])
        if not group["adapt_hyper_lr"]:
            h["beta"] = group["hyper_lr"]
        h.setdefault("new_lr", group["lr"])
