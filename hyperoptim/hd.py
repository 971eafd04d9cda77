r"""Hypergradient descent on the learning rate (Baydin et al., 2018)."""

from __future__ import annotations

import math
from typing import Any

import torch  # noqa: F401  (the examples below use it)
from torch import Tensor

from .core.options import check_arguments, renamed_options
from .core.signatures import renamed_keywords
from .core.types import Closure, ParamsT
from .hyperstep import HyperStep
from .methods.hd import RuleHypergrad
from .rules.sgd import SGD, sgd_momentum_tangents

__all__ = ["HypergradSGD"]


class HypergradSGD(RuleHypergrad):
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
    with one ``RuntimeWarning``. With ``hyper_lr=0`` the weights are bit-identical to
    ``torch.optim.SGD``'s.

    The algorithm is written once, over an update rule (:class:`~hyperoptim.methods.hd.RuleHypergrad`
    with the SGD rule :data:`hyperoptim.rules.SGD`; ``HypergradAdam`` is the same class over
    Adam's rule). With heavy-ball momentum the direction :math:`d_{t-1}` is the momentum buffer,
    so no copy of it is kept; otherwise ``state[p]["direction"]`` holds it.

    Args:
        params (iterable): parameters or param-group dicts, as for ``torch.optim.SGD``.
        lr (float, optional): initial learning rate :math:`a_0` (default: 1e-3).
        momentum (float, optional): momentum factor (default: 0).
        dampening (float, optional): dampening for momentum (default: 0).
        weight_decay (float, optional): L2 penalty (default: 0).
        nesterov (bool, optional): Nesterov momentum (default: False).
        hyper_lr (float, optional): the hyper-learning rate :math:`\kappa` of the additive
            hyper-step :math:`a_t = a_{t-1} - \kappa h_t` (Baydin et al.'s value for SGD-HD is
            1e-3). Its scale depends on the gradients' scale: divide it by 10 if the learning rate
            oscillates. Giving it chooses the additive policy (default: None). Formerly
            ``hypergrad_lr``, still accepted for one release with a ``DeprecationWarning``.
        hyper_step (HyperStep or str, optional): the policy that turns :math:`h_t` into
            :math:`a_t` (:mod:`hyperoptim.hyperstep`: a policy, or a name such as
            ``"scale_free"``); not together with ``hyper_lr`` (default: None, the class's
            :attr:`default_hyper_step`, ``ScaleFree(accel=1.5, streak=20)``).
        lr_bounds (tuple of float, optional): :math:`(a_{\min}, a_{\max})`, with
            :math:`0 \le a_{\min} \le a_{\max}` (default: ``(0.0, inf)``). Public
            implementations let the learning rate go negative; this one does not.
        per_parameter (bool, optional): one learning rate per weight (default: False).
        tune (tuple of str, optional): what is learned: ``("lr",)``, or ``("lr", "momentum")``
            to learn the momentum :math:`\mu` too, by its one-step hypergradient
            :math:`h^\mu_t = \langle \nabla E(w_t), \partial w_t / \partial \mu_{t-1} \rangle`
            with :math:`\partial w_t / \partial \mu_{t-1} = -a_{t-1} v_{t-1}` (heavy ball;
            :math:`-a_{t-1}(2\mu_{t-1} v_{t-1} + (1-\delta) g_{t-1})` with Nesterov; 0 and
            :math:`-a_0 g_0` at the first step), through the same policy as the learning rate
            (:class:`~hyperoptim.methods.hd.RuleHypergrad`). The momentum is held to
            [1e-3, 0.999] and ``history`` records ``"momentum"`` and ``"hypergrad/momentum"``
            (default: None: ``("lr", "momentum")`` when ``momentum`` > 0 and the policy is not
            the additive one, else ``("lr",)``).
        momentum_phase (str, optional): when a learned momentum is learned: ``"stall"``, while
            every training loss so far is within 3% of the first (the run has not started
            learning), then held where it stands; or ``"run"``, at every step. Learned all run,
            the one-step hypergradient's short horizon drives a good momentum down (0.9 -> 0.03
            in 40 steps on a small CNN); learned while stalled it lifts a poor start's momentum
            (0.5 -> 0.91 on a character LSTM from 100x too small) and then leaves it alone. Needs
            a closure that returns the loss: without one the momentum is held from the first
            step (default: ``"stall"``).
        val_closure (callable, optional): returns the validation loss from the live parameters;
            may be overridden per step (default: None, the training-loss rule).
        maximize (bool, optional): maximize the objectives instead, as ``torch.optim.SGD``
            (default: False).
        foreach, fused, differentiable: ``torch.optim.SGD``'s switches; only their defaults
            (None, None, False) are supported, the others raise ``ValueError``.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> opt = HypergradSGD(model.parameters(), lr=0.01, momentum=0.9, hyper_lr=1e-3)
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

    @renamed_keywords(renamed_options("hd"))
    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        hyper_lr: float | None = None,
        hyper_step: HyperStep | str | None = None,
        lr_bounds: tuple[float, float] = (0.0, math.inf),
        per_parameter: bool = False,
        tune: tuple[str, ...] | None = None,
        momentum_phase: str = "stall",
        val_closure: Closure | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        check_arguments(self, lr_bounds=lr_bounds, lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, per_parameter=per_parameter,
                        momentum_phase=momentum_phase,
                        **({} if tune is None else {"tune": tune}))
        rule_defaults = dict(lr=float(lr), momentum=momentum, dampening=dampening,
                             weight_decay=weight_decay, nesterov=nesterov)
        self._setup(params, rule_defaults, hyper_lr=hyper_lr, hyper_step=hyper_step,
                    lr_bounds=lr_bounds, per_parameter=per_parameter, tune=tune,
                    momentum_phase=momentum_phase,
                    val_closure=val_closure,
                    maximize=maximize, foreach=foreach, fused=fused, differentiable=differentiable)

    rule = SGD
    _supports_grad_scaler = True
    #: ``tune=None`` learns the momentum while the run is stalled (``momentum_phase``).
    default_learns_momentum = True
    #: :math:`\kappa` of the additive policy when it is chosen without one (Baydin et al.'s).
    default_hyper_lr = 1e-3
    #: The policy when neither ``hyper_lr`` nor ``hyper_step`` is given: ``ScaleFree`` whose
    #: growth accelerates while the run is stalled (its one-step hypergradient answers a new
    #: learning rate within a step, so a fast climb does not overshoot; MARTHE's over
    #: heavy-ball SGD does not).
    default_hyper_step: HyperStep | str = "ScaleFree(accel=1.5, streak=20)"

    def _objective_grads(self, group: dict[str, Any], params: list[Tensor],
                         grads: list[Tensor]) -> list[Tensor]:
        # In training-loss mode grad E = grad L + wd * w (the gradient SGD descends).
        wd = group["weight_decay"]
        return grads if wd == 0 else [g.add(p, alpha=wd) for g, p in zip(grads, params)]

    def _momentum_tangents(self, plan: Any, buffers: Any, hypers: dict[str, Any],
                           counts: list[float] | None) -> list[Tensor]:
        # The generic tangent's closed form for SGD (tested equal to it).
        group = plan.group
        lrs = hypers["lr"] if isinstance(hypers["lr"], list) else [hypers["lr"]] * len(plan.params)
        return sgd_momentum_tangents(plan.params, plan.grads, buffers["momentum_buffer"], lrs,
                                     hypers["momentum"], hypers["weight_decay"],
                                     dampening=group["dampening"], nesterov=group["nesterov"])

    @staticmethod
    def _previous_direction(group: dict[str, Any], state: dict[str, Any]) -> Tensor | None:
        # Heavy ball's direction is its momentum buffer: no copy is kept.
        if group["momentum"] != 0 and not group["nesterov"]:
            return state.get("momentum_buffer")
        return state.get("direction")
