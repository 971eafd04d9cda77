r"""MARTHE over SGD (Donini et al., 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .core.options import check_arguments, renamed_options
from .core.signatures import bind_keywords, renamed_keywords, with_keywords
from .core.types import ParamsT
from .hyperstep import Additive, HyperStep
from .methods.marthe import (
    MARTHE_KEYWORDS,
    RuleMarthe,
    keep_buffer_tangents,
    marthe_options,
    own_step_given,
    take_marthe_options,
)
from .rules.base import apply_update_
from .rules.sgd import SGD, sgd_direction, sgd_momentum_tangents

__all__ = ["MartheSGD"]


class MartheSGD(RuleMarthe):
    r"""SGD whose learning rate follows MARTHE's discounted hypergradient (Donini et al., 2020).

    PyTorch's SGD step (same arguments and update as ``torch.optim.SGD``) with one learning rate
    per param group, adapted online from the validation loss :math:`E`. Each step carries a
    forward-mode tangent :math:`(Z, C)` of the weights and the momentum buffer with respect to
    the learning rate, discounted by :math:`\mu`, and moves the learning rate against
    :math:`\Delta = \langle \nabla E, Z \rangle`. :math:`\mu = 0` is hypergradient descent on the
    validation loss (HD, Baydin et al. 2018: the same learning rates as ``HypergradSGD`` with a
    ``val_closure``), :math:`\mu = 1` is RTHO (Franceschi et al. 2017), ``mu="adaptive"`` is MARTHE.

    **Step** :math:`t` (Algorithm 1; docs/design.md §3 for the SGD rule :math:`\Phi` with momentum
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
    ``adapt_hyper_lr=False`` :math:`\beta_t` is the fixed ``hyper_lr``.

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
    With ``hyper_lr=0`` and ``adapt_hyper_lr=False`` the weights are bit-identical to
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
        hyper_lr (float, optional): with ``adapt_hyper_lr=True``, the step size
            :math:`\kappa` of the hyper-learning rate :math:`\beta` (which starts at 0, as the
            paper suggests); otherwise the fixed hyper-learning rate :math:`\beta`. Its scale
            depends on the scale of :math:`\Delta` (:math:`\kappa` scales like
            :math:`\beta / \Delta^2`): as the paper suggests, start high and divide by 10 until
            training does not diverge (default: 1e-6, for ``adapt_hyper_lr=True``: on
            ``benchmarks/marthe_schedules.py`` (digits MLP, 10 seeds) 1e-7 and 1e-5 both
            train well and 1e-3 diverged on 1 seed of 10, while a small linear regression in
            the tests diverges from 1e-5 on; a fixed :math:`\beta` needs its own value, 1e-4
            on that benchmark).
        adapt_hyper_lr (bool, optional): adapt :math:`\beta` online (default: True).
            ``hyper_lr`` and ``adapt_hyper_lr`` were ``hypergrad_lr`` and
            ``adapt_hypergrad_lr``; the old names are accepted for one release with a
            ``DeprecationWarning``.
        hypergrad_clip (float, optional): clip :math:`\Delta` to
            :math:`[-\text{clip}, \text{clip}]` in the updates of :math:`a` and :math:`\beta`
            (``history`` keeps the raw value); ``None`` turns it off (default: None).
        hyper_step (HyperStep or str, optional): a policy of :mod:`hyperoptim.hyperstep` that
            turns :math:`\Delta_t` into :math:`a_t` instead of MARTHE's :math:`a_{t-1} - \beta_t
            \Delta_t` (normalised by :math:`\lVert \nabla E \rVert \lVert Z_t \rVert`; a policy
            that reads the training loss gets the previous step's); ``mu`` still discounts the
            tangent (default: None: :attr:`default_hyper_step`, ``ScaleFree(accel=1.5, streak=20)``, unless
            ``hyper_lr`` or ``adapt_hyper_lr`` is given, which choose MARTHE's own step).
        tune (tuple of str, optional): what is learned: ``("lr",)``, or ``("lr", "momentum")``
            to learn the momentum too, by its one-step hypergradient
            :math:`\partial E(w_{t+1}) / \partial b_t` (the weights and the buffer before the
            step held constant; from the validation gradient the learning rate's step already
            takes, no extra Hessian-vector product), moved by MARTHE's own step with
            :math:`\beta_t` or by the ``hyper_step`` policy on :math:`1 - b`
            (:class:`~hyperoptim.methods.marthe.RuleMarthe`). It stays in [1e-3, 0.999] and
            ``history`` records ``"momentum"`` and ``"hypergrad/momentum"`` (default: None:
            ``("lr", "momentum")`` when ``momentum`` > 0 and the policy reads the loss (not
            MARTHE's own step), else ``("lr",)``).
        momentum_phase (str, optional): when a learned momentum is learned: ``"stall"``, while
            every training loss so far is within 3% of the first, then held (its tangents
            dropped); or ``"run"``, at every step (as :class:`~hyperoptim.HypergradSGD`;
            default: ``"stall"``).
        val_closure (callable, optional): returns the validation loss from the live parameters;
            may be overridden per step. Required, here or in :meth:`step` (default: None).
        hvp (str, optional): how :math:`H Z` is computed (:mod:`hyperoptim.hvp`): ``"exact"``
            (double backward; the closure must return the loss without calling ``backward()``),
            ``"finite_difference"`` (central differences of gradients, two extra closure calls
            per tangent column; works with ``backward()`` in the closure, DDP,
            ``torch.compile``), or ``"auto"``: exact if the closure returns the loss without
            calling ``backward()``, central differences if it calls it (default: ``"auto"``).

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
        (['hypergrad/lr', 'hypergrad/momentum', 'hypergrad_lr', 'lr', 'momentum', 'mu', 'skipped'], True)

    References:
        M. Donini, L. Franceschi, O. Majumder, M. Pontil, P. Frasconi. MARTHE: Scheduling the
        Learning Rate Via Online Hypergradients. IJCAI 2020 (arXiv:1910.08525).

        L. Franceschi, M. Donini, P. Frasconi, M. Pontil. Forward and Reverse Gradient-Based
        Hyperparameter Optimization. ICML 2017 (RTHO).

        A. G. Baydin, R. Cornish, D. Martinez Rubio, M. Schmidt, F. Wood. Online Learning Rate
        Adaptation with Hypergradient Descent. ICLR 2018 (HD).
    """

    rule = SGD
    #: The policy when none of ``hyper_step``, ``hyper_lr`` and ``adapt_hyper_lr`` is given
    #: (with either of the last two: MARTHE's own additive step): ``ScaleFree`` whose growth
    #: accelerates while the run is stalled, with the momentum learned in that stall
    #: (:attr:`default_learns_momentum`): accelerated alone it overshot the digits CNN from its
    #: poor start (7.8%), its tangent lagging heavy ball; with the momentum lifted as it climbs,
    #: every versus task meets the scale-free target (docs/hyperstep.md).
    default_hyper_step: HyperStep | str = "ScaleFree(accel=1.5, streak=20)"
    #: ``tune=None`` learns the momentum while the run is stalled (``momentum_phase``).
    default_learns_momentum = True
    buffer_tangent_keys = {"momentum_buffer": "tangent_buffer"}

    @renamed_keywords(renamed_options("marthe"))
    @with_keywords(MARTHE_KEYWORDS)
    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        **options: Any,
    ) -> None:
        own_step = own_step_given(options)
        options = bind_keywords(MartheSGD.__init__, options, MARTHE_KEYWORDS)
        marthe = take_marthe_options(options)
        check_arguments(self, lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov,
                        **{k: v for k, v in marthe.items()
                           if k != "hyper_step" and not (k == "tune" and v is None)})
        defaults = dict(lr=float(lr), momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, **marthe_options(
            **marthe, default=Additive.name if own_step else self.default_hyper_step))
        super().__init__(params, defaults, **options)

    @staticmethod
    def _previous_direction(group: dict[str, Any], state: dict[str, Any]) -> Tensor | None:
        if group["momentum"] != 0 and not group["nesterov"]:
            return state.get("momentum_buffer")
        return state.get("direction")

    def _momentum_tangents(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        # The generic one-step tangent's closed form for SGD (tested equal to it).
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        return sgd_momentum_tangents(params, [p.grad for p in params], bufs,
                                     [group["lr"]] * len(params), group["momentum"],
                                     group["weight_decay"], dampening=group["dampening"],
                                     nesterov=group["nesterov"])

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
        this against :func:`hyperoptim.rules.sgd_tangents` (``torch.func.jvp`` of the rule),
        which gives the same numbers at several times the cost on small models. ``hz=None``
        means :math:`\mu (Z, C) = 0` (every :math:`\mu_t = 0`, or no tangent yet): then
        :math:`(Z, C)_{t+1} = B_t` and :math:`C_{t+1} = 0` is not stored.
        """
        states = [self.state[p] for p in params]
        params, grads, hzs = self._shards(params, hz)
        config = dict(dampening=group["dampening"], nesterov=group["nesterov"], inplace=True)
        momentum, weight_decay, lr = group["momentum"], group["weight_decay"], group["lr"]
        bufs = [s.get("momentum_buffer") for s in states]
        tangents = [s["tangent"] for s in states]
        new_tangent_bufs: list[Tensor | None] = [None] * len(params)
        if hzs is not None:
            # The rule on (mu Z, H mu Z, mu C): mu C_{t+1} and D, then Z <- mu Z - a_t D.
            tangent_bufs = [None if b is None else s.get("tangent_buffer") for s, b in zip(
                states, bufs, strict=True)]
            tangent_bufs = [torch.zeros_like(z) if b is not None and c is None else c
                            for b, c, z in zip(bufs, tangent_bufs, tangents, strict=True)]
            _, new_tangent_bufs, tangent_dirs = sgd_direction(
                tangents, hzs, tangent_bufs, momentum, weight_decay, **config)
            apply_update_(tangents, tangent_dirs, lr)
        _, new_bufs, dirs = sgd_direction(params, grads, bufs, momentum, weight_decay, **config)
        for z, d in zip(tangents, dirs, strict=True):
            z[index].sub_(d)
        apply_update_(params, dirs, lr)
        _store(states, new_bufs, new_tangent_bufs, dirs, grads,
               keep_direction=momentum == 0 or group["nesterov"])
        if hzs is None and group["mu"] != 0:
            keep_buffer_tangents(states, self.buffer_tangent_keys)


def _store(states: list[dict[str, Any]], bufs: list[Tensor | None],
           tangent_bufs: list[Tensor | None], dirs: list[Tensor], grads: list[Tensor | None], *,
           keep_direction: bool) -> None:
    """The new momentum buffers and their tangents :math:`C` into ``state[p]`` (:math:`C` only
    where both exist), and the directions where the buffer is not already the direction."""
    for s, buf, c, d, g in zip(states, bufs, tangent_bufs, dirs, grads, strict=True):
        if buf is not None:
            s["momentum_buffer"] = buf
        if buf is not None and c is not None:
            s["tangent_buffer"] = c
        else:
            s.pop("tangent_buffer", None)
        if keep_direction:
            # Heavy ball's direction is its buffer; otherwise keep a private copy.
            s["direction"] = d.clone() if d is g else d
