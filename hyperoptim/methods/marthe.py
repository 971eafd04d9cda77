r"""MARTHE over any update rule: an online learning-rate schedule from discounted forward-mode
hypergradients (Donini et al., 2020).

This module holds the options and the tangent side (the step, the Hessian-vector product, the
tangent update, the skip); the hypergradients and the hyper-step are in
:mod:`hyperoptim.methods.marthe_hyper`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from ..core.base import HyperOptimizer
from ..core.options import renamed_options
from ..core.shard import check_sharded_hvp, local, local_states
from ..core.signatures import declared
from ..core.types import Closure, ParamsT
from ..hvp import SecondOrder
from ..hyperstep import Additive, HyperStep, resolve, watch_stall
from ..rules.base import UpdateRule, rule_tangents
from .marthe_hyper import MartheHyperStep, _settle, adaptive_mu
from .tuning import TunedGroups, _learns_momentum

__all__ = [
    "MARTHE_KEYWORDS", "RuleMarthe", "adaptive_mu", "keep_buffer_tangents", "marthe_hyper_step",
    "marthe_options", "own_step_given", "take_marthe_options",
]


def _marthe_keywords(*, mu: str | float = "adaptive", hyper_lr: float = 1e-6,
                     adapt_hyper_lr: bool = True, hypergrad_clip: float | None = None,
                     hyper_step: HyperStep | str | None = None,
                     tune: tuple[str, ...] | None = None, momentum_phase: str = "stall",
                     val_closure: Closure | None = None,
                     hvp: str = "auto", maximize: bool = False, foreach: bool | None = None,
                     fused: bool | None = None, differentiable: bool = False) -> None:
    """MARTHE's keyword arguments and their defaults, declared once: every public class's
    signature ends with them (:func:`~hyperoptim.core.signatures.with_keywords`; a class over
    another rule may change a default, as ``MartheAdam`` does the hyper-step size's)."""


MARTHE_KEYWORDS = declared(_marthe_keywords)

# MARTHE's own options (the rest of MARTHE_KEYWORDS go to the base), all but hyper_step checked
# by the options table.
_OWN = ("mu", "hyper_lr", "adapt_hyper_lr", "hypergrad_clip", "hyper_step", "tune",
        "momentum_phase")


def take_marthe_options(options: dict[str, Any]) -> dict[str, Any]:
    """MARTHE's own options, taken out of ``options`` (the complete keywords a public class was
    given; what is left goes to the base), in the order :func:`marthe_options` takes them."""
    return {name: options.pop(name) for name in _OWN}


def marthe_hyper_step(hyper_step: HyperStep | str | None,
                      default: HyperStep | str = Additive.name) -> str:
    r"""The group's ``"hyper_step"`` for MARTHE's constructor option: ``"additive"`` is MARTHE's
    own step (:math:`\beta` from ``hyper_lr``/``adapt_hyper_lr``); any other policy
    (:mod:`hyperoptim.hyperstep`) replaces it; ``None`` is ``default`` (the class's
    ``default_hyper_step``, or ``"additive"`` when ``hyper_lr`` or ``adapt_hyper_lr`` was
    given)."""
    policy = resolve(default if hyper_step is None else hyper_step)
    if isinstance(policy, Additive):
        if policy.kappa is not None:
            raise ValueError(f"Invalid hyper_step value: {hyper_step!r} (MARTHE's additive step "
                             "takes its size from hyper_lr and adapt_hyper_lr)")
        return Additive.name
    return repr(policy)


def own_step_given(given: dict[str, Any]) -> bool:
    """Whether a public class's keywords (as given, before the defaults are filled in) size
    MARTHE's own additive step: then that step, bit for bit as in the paper, is the default
    policy."""
    return "hyper_lr" in given or "adapt_hyper_lr" in given


def marthe_options(mu: str | float, hyper_lr: float, adapt_hyper_lr: bool,
                   hypergrad_clip: float | None, hyper_step: HyperStep | str | None,
                   tune: tuple[str, ...] | None = ("lr",), momentum_phase: str = "stall",
                   default: HyperStep | str = Additive.name) -> dict[str, Any]:
    """MARTHE's entries of a public class's ``defaults``, from its checked constructor arguments:
    numbers as floats, ``"adaptive"`` as it is, the policy as :func:`marthe_hyper_step` names it
    (``default`` when ``hyper_step`` is None).

    Example:
        >>> marthe_options(1, 1e-6, True, None, None)
        {'mu': 1.0, 'hyper_lr': 1e-06, 'adapt_hyper_lr': True, 'hypergrad_clip': None, \
'hyper_step': 'additive', 'tune': ('lr',), 'momentum_phase': 'stall'}
    """
    policy = marthe_hyper_step(hyper_step, default)
    return dict(mu=mu if mu == "adaptive" else float(mu), hyper_lr=float(hyper_lr),
                adapt_hyper_lr=adapt_hyper_lr,
                hypergrad_clip=None if hypergrad_clip is None else float(hypergrad_clip),
                hyper_step=policy, tune=None if tune is None else tuple(tune),
                momentum_phase=momentum_phase)


class RuleMarthe(MartheHyperStep, TunedGroups, HyperOptimizer):
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

    **Learning the momentum** (``tune=("lr", "momentum")``, opt-in). The rule's momentum
    :math:`b` (SGD's ``momentum``, Adam's :math:`\beta_1`) follows its one-step hypergradient, as
    gradient-descent-the-ultimate-optimizer and :class:`~hyperoptim.HypergradSGD` compute it
    (the weights and the buffers before step :math:`t` held constant):

    .. math::

        Y_t = \frac{\partial w_{t+1}}{\partial b_t}
            = \frac{\partial \Phi_t}{\partial b_t}\Big|_{w_t, s_t, g_t}, \qquad
        h^b_{t+1} = \langle \nabla E(w_{t+1}), Y_t \rangle
            = \frac{\partial E(w_{t+1})}{\partial b_t},

    (heavy ball: :math:`Y_t = -a_t v_t`), read from the validation gradient that
    :math:`\Delta_{t+1}` already takes. In MARTHE's terms :math:`Y` is a tangent column for
    :math:`b` with the discount fixed at 0, :math:`Y_{t+1} = 0 \cdot A_t Y_t + \partial
    \Phi_t / \partial b_t`: exact for what it claims, and cheap (one more tensor per weight,
    no Hessian-vector product). A discounted column (:math:`\mu_t A_t Y_t + \ldots`, exactly
    :math:`dE(w_T)/db` at :math:`\mu = 1` for a constant momentum) would add a second
    Hessian-vector product per group and step, the cost that dominates MARTHE's, and would need
    a discount of its own (:math:`\mu_t` is fitted to the learning rate's signals). The group's
    policy moves :math:`b` as :func:`~hyperoptim.methods.hd.momentum_hyper_step` does for HD:
    MARTHE's own step takes :math:`b_t = b_{t-1} - \beta_t h^b_t` with the learning rate's
    :math:`\beta_t` (one hyper-learning rate for every hyperparameter, as
    gradient-descent-the-ultimate-optimizer has; with ``mu=0`` and a fixed :math:`\beta` this is
    ``HypergradSGD(tune=("lr", "momentum"))`` on the validation loss), any other policy moves
    :math:`1 - b` by factors. The learned value stays in [1e-3, 0.999]; ``history[i]`` records
    ``"momentum"`` and ``"hypergrad/momentum"`` (:math:`h^b_t`; 0 before the first tangent),
    ``state[p]["momentum_tangent"]`` holds :math:`Y_t` and ``hyper_state["momentum_step"]`` the
    policy's state.
    """

    _backs_off = True
    # FSDP2: tangents live sharded beside each parameter shard (docs/design.md §8).
    _supports_fsdp2 = True

    rule: ClassVar[UpdateRule]
    buffer_tangent_keys: ClassVar[dict[str, str]]
    _renamed_options = renamed_options("marthe")
    #: The rule's name for the momentum that ``tune=("lr", "momentum")`` learns.
    momentum_hyper: ClassVar[str] = "momentum"

    def __init__(self, params: ParamsT, defaults: dict[str, Any], **options: Any) -> None:
        defaults = {**defaults, "tune": self._resolved_tune(
            defaults, defaults.get("tune", ("lr",)), defaults.get("hyper_step", Additive.name))}
        super().__init__(params, defaults, **options)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        self._policy(group)
        check_sharded_hvp(type(self).__name__, self.hvp, group.get("params", ()))
        self._refuse_sharded_momentum(group)

    def _tangent(self, p: Tensor, n_cols: int) -> Tensor:
        """:math:`Z` of ``p``, shape ``(n_cols, *p.shape)`` (zeros at first; padded when a
        param group was added since); under FSDP2 this rank's shard of it (plain)."""
        z = self.state[p].get("tangent")
        if z is None:
            shard = local(p)
            return shard.new_zeros((n_cols, *shard.shape))
        return _pad(local(z), n_cols)

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
        groups = self.param_groups
        creates_state = self._creates_state(closure)
        # required=True: it raises rather than return None.
        objective = cast(Closure, self._resolve_val_closure(val_closure,
                                                            required=not creates_state))
        n_cols = len(groups)
        if closure is None and any(g["mu"] != 0 for g in groups) and not creates_state:
            self._training_loss(None, second_order=True)  # raises: this needs a closure
        hypers = [self._staged_hyper(i) for i in range(n_cols)]  # committed at the end

        # 1.-2. Delta_t and g'_1 from one validation gradient, then mu_t, beta_t and the proposed
        #    a_t; a non-finite value skips the step. self.state.get: reading must not create an
        #    empty state entry (a failed step leaves none).
        tracked = [p for g in groups for p in g["params"] if "tangent" in self.state.get(p, ())]
        deltas = [0.0] * n_cols
        if tracked:
            measured = self._hypergradients(objective, tracked)
            deltas = measured.deltas
            if not measured.finite:
                return self._skip(closure, deltas, measured.val_loss, measured.momenta)
            self._propose(hypers, measured)
            if not self._representable(*(h["new_lr"] for h in hypers if "new_lr" in h)):
                return self._skip(closure, deltas, measured.val_loss)
        _settle(hypers, groups)
        return self._descend(closure, hypers, deltas, bool(tracked))

    def _creates_state(self, closure: Callable[[], Any] | None) -> bool:
        """Is this torch.distributed.checkpoint's state-creating step (its _init_optim_state: a
        fresh optimizer, no closure, every learning rate 0)? A first step needs no H Z (there is
        no tangent yet) and at rate 0 moves nothing, so it is taken: it creates the state whose
        keys DCP loads."""
        return closure is None and not self.state and all(g["lr"] == 0 for g in self.param_groups)

    @staticmethod
    def _shards(params: list[Tensor], hz: dict[Tensor, Tensor] | None
                ) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        r"""The ``params``, their gradients and :math:`H (\mu Z)` as the group step uses them:
        under FSDP2 this rank's shards (the state holds them too during the commit)."""
        return ([local(p) for p in params], [local(p.grad) for p in params],
                None if hz is None else [hz[p] for p in params])

    def _descend(self, closure: Callable[[], Any] | None, hypers: list[dict[str, Any]],
                 deltas: list[float], tracked: bool) -> Any:
        r"""Steps 3-5 with the staged ``hypers``: the training gradient, :math:`H (\mu Z)`, the
        guard, then the commit; returns the closure's loss."""
        # H (mu Z) = mu (H Z) for the columns with mu_t > 0, in one batched product: it reads the
        # stored tangents, which change only after the last call that can fail (closure, HVP,
        # collective).
        mus = [h["mu"] for h in hypers]
        active = [j for j, mu in enumerate(mus) if mu != 0.0]
        loss, second = self._training_loss(closure, second_order=bool(active) and tracked)
        plans = [(group, self._params_with_grad(group)) for group in self.param_groups]
        hz = None if second is None else self._hessian_tangents(second, mus, active)
        policy_loss = None
        if self._reads_loss():
            policy_loss = self._policy_loss(loss)
            self._propose_with_loss(hypers, policy_loss)
            if not self._representable(*(h["new_lr"] for h in hypers)):
                self._warn_nonfinite("hypergradient or validation loss")
                self._record_skipped(deltas)
                return loss
        if self._guard_step(loss, plans, self._proposed(hypers)) is not None:
            self._record_skipped(deltas)
            return loss
        everything = [p for _, ps in plans for p in ps]
        if not everything:  # nothing to step: nothing changes
            return loss
        self._commit(plans, everything, hypers, hz, deltas)
        if self._watches_stall():  # the stall before this step decided what was learned
            self.hyper_state["stall"] = watch_stall(self._stall(), policy_loss)
        return loss

    def _hessian_tangents(self, second: SecondOrder, mus: list[float], active: list[int]
                          ) -> dict[Tensor, Tensor]:
        r""":math:`H (\mu Z)` of the parameters ``second`` differentiates, from one batched
        product over the ``active`` columns (:math:`\mu_j \ne 0`); the other columns are 0."""
        n_cols = len(mus)
        with second:
            cols = active if len(active) < n_cols else None
            stored = [self._tangent(p, n_cols) for p in second.params]
            prods = second.hvp(stored if cols is None else [z[cols] for z in stored])
        hz: dict[Tensor, Tensor] = {}
        for p, prod in zip(second.params, prods, strict=True):
            if cols is None:
                hz[p] = _scale_(prod, mus)
            else:
                hz[p] = prod.new_zeros((n_cols, *prod.shape[1:]))
                hz[p][cols] = _scale_(prod, [mus[j] for j in cols])
        return hz

    def _commit(self, plans: list[tuple[dict[str, Any], list[Tensor]]], everything: list[Tensor],
                hypers: list[dict[str, Any]], hz: dict[Tensor, Tensor] | None,
                deltas: list[float]) -> None:
        r"""Steps 4-5, past the guard: :math:`(Z, S) \leftarrow \mu_t (Z, S)`, then per group
        :math:`(Z, S)_{t+1} = \mu_t A_t (Z, S)_t + B_t` with the new :math:`a_t` and the rule's
        step, ``history``, and the staged hyper-state stored.

        Under FSDP2 every ``state[p]`` holds plain local shards during the update (the rule and
        its tangents are elementwise: no communication), which are wrapped back as ``DTensor``\ s
        sharded like their parameter at the end."""
        n_cols = len(hypers)
        mus = [h["mu"] for h in hypers]
        with local_states(self.state, everything):
            for p in everything:
                state = self.state[p]
                state["tangent"] = _scale_(self._tangent(p, n_cols), mus)
                for key in self.buffer_tangent_keys.values():
                    if state.get(key) is not None:
                        state[key] = _scale_(_pad(state[key], n_cols), mus)
            if hz is not None:
                for p in everything:
                    hz.setdefault(p, torch.zeros_like(self.state[p]["tangent"]))
            for i, ((group, params), h) in enumerate(zip(plans, hypers, strict=True)):
                group["lr"] = h["new_lr"]
                moved = self._move_momentum(group, h)
                if moved and self._momentum_live(group):
                    self._step_with_momentum(i, group, params, hz)
                else:
                    if moved:  # held (momentum_phase="stall" after the stall): no Y is read
                        self._store_momentum_tangents(group, [], None)
                    if params:
                        self._advance(i, group, params, hz)
                self._record(i, lr=group["lr"], mu=h["mu"], hypergrad_lr=h["beta"],
                             **{"hypergrad/lr": deltas[i]}, **moved)
        self._store_hypers(hypers)

    def _step_with_momentum(self, index: int, group: dict[str, Any], params: list[Tensor],
                            hz: dict[Tensor, Tensor] | None) -> None:
        """:meth:`_advance` of a group that learns its momentum, with :math:`Y_t` taken from the
        state before the step and stored after it."""
        ys = self._momentum_tangents(group, params) if params else None
        if params:
            self._advance(index, group, params, hz)
        self._store_momentum_tangents(group, params, ys)

    def _advance(self, index: int, group: dict[str, Any], params: list[Tensor],
                 hz: dict[Tensor, Tensor] | None) -> None:
        r"""This group's step of the rule and its tangent update, in place.

        The incoming tangents are already :math:`\mu (Z, S)` and ``hz`` is :math:`H (\mu Z)`;
        :func:`~hyperoptim.rules.rule_tangents` pushes them through the Jacobian of the
        rule with column ``index`` seeded by the learning rate (:math:`B_t`). ``hz=None`` means
        :math:`\mu (Z, S) = 0`: then :math:`Z_{t+1} = B_t = -d_t` (the direction the in-place
        step returns) and :math:`S_{t+1} = 0` (this step's buffers do not depend on
        :math:`a_t`) is stored as zeros only where :math:`\mu \ne 0` may bring it back
        (:func:`keep_buffer_tangents`).
        """
        rule = self.rule
        states = [self.state[p] for p in params]
        params, grads, hzs = self._shards(params, hz)
        buffers, counts = rule.read_state(states, params)
        hypers, options = rule.hypers(group), rule.options(group)
        new_tangents: tuple[list[Tensor], dict[str, list[Tensor | None]]] | None = None
        if hz is not None:
            tangents = [s["tangent"] for s in states]
            n_cols = tangents[0].shape[0]
            buffer_tangents = {
                name: [None if b is None or s.get(key) is None else _pad(s[key], n_cols)
                       for s, b in zip(states, buffers[name], strict=True)]
                for name, key in self.buffer_tangent_keys.items()}
            seed = tangents[0].new_zeros(n_cols)
            seed[index] = 1.0
            new_tangents = rule_tangents(
                rule, params, grads, buffers, hypers, tangents, cast(list[Tensor], hzs),
                buffer_tangents, {"lr": seed}, counts=counts, **options)
        new_buffers, dirs = rule.step_(params, grads, buffers, hypers, counts, **options)
        rule.write_state(states, new_buffers)
        self._store_tangents(index, states, dirs, new_tangents)
        if new_tangents is None and group["mu"] != 0:
            keep_buffer_tangents(states, self.buffer_tangent_keys)

    def _store_tangents(self, index: int, states: list[dict[str, Any]], dirs: list[Tensor],
                        new_tangents: tuple[list[Tensor], dict[str, list[Tensor | None]]] | None
                        ) -> None:
        r"""Keep each direction :math:`d_t` and store :math:`(Z, S)_{t+1}`: the new tangents, or
        with ``new_tangents=None`` :math:`Z_t - d_t` in column ``index`` and no :math:`S`."""
        keys = self.buffer_tangent_keys
        for i, (s, d) in enumerate(zip(states, dirs, strict=True)):
            s["direction"] = d
            if new_tangents is None:
                s["tangent"][index].sub_(d)
                for key in keys.values():
                    s.pop(key, None)
                continue
            s["tangent"] = new_tangents[0][i]
            for name, key in keys.items():
                c = new_tangents[1][name][i]
                if c is None:
                    s.pop(key, None)
                else:
                    s[key] = c

    def _skip(self, closure: Callable[[], Any] | None, deltas: list[float], val_loss: float,
              momenta: list[tuple[float, float] | None] | None = None) -> Any:
        """The non-finite guard: nothing moves; an overflowed tangent column (or momentum
        tangent) is reset."""
        self._warn_nonfinite("hypergradient or validation loss")
        bad = [j for j, d in enumerate(deltas) if not math.isfinite(d)]
        if bad and math.isfinite(val_loss):
            self._forget(bad)
        if math.isfinite(val_loss):
            for group, m in zip(self.param_groups, momenta or (), strict=False):
                if m is not None and not math.isfinite(m[0]):
                    self._store_momentum_tangents(group, [], None)
        loss, _ = self._training_loss(closure)
        self._record_skipped(deltas)
        return loss

    def _forget(self, columns: list[int]) -> None:
        r"""Reset the tangent ``columns`` (and their groups' :math:`\mu, c`) to 0, as
        :math:`\mu = 0` does."""
        for j in columns:
            h = self._hyper(j)
            h["mu"], h["count"] = 0.0, 0.0
        for group in self.param_groups:
            for p in group["params"]:
                for key in ("tangent", *self.buffer_tangent_keys.values()):
                    t = self.state[p].get(key)
                    if t is not None:
                        local(t)[[j for j in columns if j < t.shape[0]]] = 0.0

    def _record_skipped(self, deltas: list[float]) -> None:
        """``history`` of a skipped step: the values in force, and the raw hypergradients."""
        for i, group in enumerate(self.param_groups):
            h = self._hyper(i)
            momentum = {} if not _learns_momentum(group) else {
                "momentum": self._momentum(group), "hypergrad/momentum": math.nan}
            self._record(i, skipped=True, lr=group["lr"], mu=h["mu"], hypergrad_lr=h["beta"],
                         **{"hypergrad/lr": deltas[i]}, **momentum)


def keep_buffer_tangents(states: list[dict[str, Any]], keys: dict[str, str]) -> None:
    r""":math:`S = 0` stored for every buffer that exists (``keys``: buffer name -> its
    tangent's key), after a step that left none.

    Zeros stored and none stored give the same tangent updates; storing them keeps the keys of
    ``state[p]`` the same from the first step on (for a group whose :math:`\mu` is not fixed at
    0), which torch.distributed.checkpoint needs: it loads only the keys of its target, a fresh
    optimizer's state after DCP's own initialising step, so a tangent that appeared later would
    be dropped on resume.
    """
    for s in states:
        for name, key in keys.items():
            if s.get(name) is not None and s.get(key) is None:
                s[key] = torch.zeros_like(s["tangent"])


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
