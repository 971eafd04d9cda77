r"""Hypergradient descent on Adam's and AdamW's learning rate (Baydin et al., 2018: AdamHD)."""

from __future__ import annotations

import math
from typing import Any

import torch  # noqa: F401  (the examples below use it)
from torch import Tensor

from .core.options import check_arguments, renamed_options
from .core.signatures import adamw_signature, refuse_unexpected, renamed_keywords
from .core.types import Closure, ParamsT
from .hyperstep import HyperStep
from .methods.hd import RuleHypergrad
from .rules.adam import ADAM

__all__ = ["HypergradAdam", "HypergradAdamW"]


class HypergradAdam(RuleHypergrad):
    r"""Adam whose learning rate follows its hypergradient (AdamHD, exact one-step derivative).

    A drop-in replacement for ``torch.optim.Adam`` (same positional arguments
    ``params, lr, betas, eps, weight_decay, amsgrad``, same update, same ``step(closure)``):
    before each Adam step the learning rate takes one gradient step on the derivative of the
    objective at the current weights with respect to the *previous* learning rate,

    .. math::

        h_t &= \frac{\partial E(w_t)}{\partial a_{t-1}}
            = \Big\langle \nabla E(w_t), \frac{\partial w_t}{\partial a_{t-1}} \Big\rangle
            = -\langle \nabla E(w_t), d_{t-1} \rangle, \\
        d_{t-1} &= \frac{1}{1 - \beta_1^{t-1}} \cdot
            \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^{t-1}} + \epsilon}
            \ \big(+\ \lambda\, w_{t-1} \text{ for AdamW}\big), \\
        a_t &= \operatorname{clamp}(a_{t-1} - \kappa\, h_t,\ a_{\min}, a_{\max}),

    then torch's Adam step with :math:`a_t`. :math:`d_{t-1}` is the previous step's direction
    exactly as torch computed it (bias corrections per parameter, :math:`\epsilon` added after
    the bias correction of :math:`\sqrt{v}`; :math:`d_{-1} = 0`), so :math:`h_t` is the exact
    derivative, not Baydin et al.'s approximation without the bias correction. For AdamW the
    decoupled decay :math:`w \leftarrow (1 - a\lambda) w` depends on the learning rate too, hence
    the :math:`\lambda w_{t-1}` term.

    The objective :math:`E` is the training loss (free: :math:`\nabla E(w_t)` is the gradient
    Adam uses, including the L2 term :math:`\lambda w` of ``weight_decay``; AdamW's decoupled
    decay is not part of a loss) unless a ``val_closure`` is given; then it is the validation
    loss, one validation gradient per step, and ``p.grad`` is left as it was.

    One learning rate per param group (the hypergradient sums over the group's parameters; never
    one per parameter by accident). With ``per_parameter=True`` every weight has its own learning
    rate (elementwise :math:`a_t = \operatorname{clamp}(a_{t-1} + \kappa\, \nabla E(w_t) \odot
    d_{t-1})`), kept in ``state[p]["lr"]``; the group's ``"lr"`` shows their mean, and a value
    assigned to it from outside scales them all by new / old (as ``HypergradSGD``'s).
    ``param_groups[i]["lr"]`` is always the current learning rate as a Python float, and
    ``history[i]`` records ``"lr"``, ``"hypergrad/lr"`` and ``"skipped"``. A non-finite
    hypergradient, validation loss or training gradient, or a rate that would overflow the
    weights' dtype, skips the whole step with one ``RuntimeWarning`` (the base's guard).
    With ``hyper_lr=0`` the weights are bit-identical to ``torch.optim.Adam``'s
    (``torch.optim.AdamW``'s for :class:`HypergradAdamW`). ``state[p]`` holds torch's
    ``"step"``, ``"exp_avg"``, ``"exp_avg_sq"`` and the direction ``"direction"``.

    Args:
        params (iterable): parameters or param-group dicts, as for ``torch.optim.Adam``.
        lr (float, optional): initial learning rate :math:`a_0` (default: 1e-3).
        betas (tuple of float, optional): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999)).
        eps (float, optional): :math:`\epsilon` (default: 1e-8).
        weight_decay (float, optional): :math:`\lambda`, L2 penalty added to the gradient
            (default: 0).
        amsgrad (bool, optional): must be False (not supported).
        hyper_lr (float, optional): the hyper-learning rate :math:`\kappa` of the additive
            hyper-step (Baydin et al.'s value for Adam-HD is 1e-7); giving it chooses the
            additive policy (default: None). :math:`h_t` scales like
            :math:`\lVert \nabla E \rVert_1`, so large models need a smaller :math:`\kappa`.
        hyper_step (HyperStep or str, optional): the policy that turns :math:`h_t` into
            :math:`a_t` (:mod:`hyperoptim.hyperstep`); not together with ``hyper_lr``
            (default: None, the class's :attr:`default_hyper_step`, ``ScaleFree(accel=1.5, streak=20)``).
        lr_bounds (tuple of float, optional): :math:`(a_{\min}, a_{\max})`, with
            :math:`0 \le a_{\min} \le a_{\max}` (default: ``(0.0, inf)``).
        per_parameter (bool, optional): one learning rate per weight (default: False).
        tune (tuple of str, optional): what is learned: ``("lr",)``, or ``("lr", "momentum")``
            to learn :math:`\beta_1` too by its one-step hypergradient
            :math:`\langle \nabla E(w_t), \partial w_t / \partial \beta_1 \rangle` (Adam's
            tangent by autograd of its rule; :class:`~hyperoptim.methods.hd.RuleHypergrad`),
            held to [1e-3, 0.999] and recorded as ``"momentum"`` and ``"hypergrad/momentum"`` in
            ``history`` (default: ``("lr",)``).
        momentum_phase (str, optional): when a learned :math:`\beta_1` is learned:
            ``"stall"``, while every training loss so far is within 3% of the first, then held;
            or ``"run"``, at every step (``HypergradSGD`` says why; default: ``"stall"``).
        val_closure (callable, optional): returns the validation loss from the live parameters;
            may be overridden per step (default: None, the training-loss rule).
        foreach, fused, differentiable: ``torch.optim.Adam``'s switches; their defaults
            (None, None, False) and False are accepted, True raises ``ValueError`` with the
            reason.
        decoupled_weight_decay (bool, optional): AdamW's decay (default: False; see
            :class:`HypergradAdamW`).

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> opt = HypergradAdam(model.parameters(), lr=0.01, hyper_lr=1e-4)
        >>> for _ in range(5):
        ...     opt.zero_grad()
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     opt.step()
        >>> len(opt.history[0]["lr"]), opt.param_groups[0]["lr"] > 0.01
        (5, True)

    References:
        A. G. Baydin, R. Cornish, D. Martinez Rubio, M. Schmidt, F. Wood. Online Learning Rate
        Adaptation with Hypergradient Descent. ICLR 2018.

        D. P. Kingma, J. Ba. Adam: A Method for Stochastic Optimization. ICLR 2015.
        I. Loshchilov, F. Hutter. Decoupled Weight Decay Regularization. ICLR 2019 (AdamW).
    """

    rule = ADAM
    #: :math:`\kappa` of the additive policy when it is chosen without one (Baydin et al.'s).
    default_hyper_lr = 1e-7
    #: The policy when neither ``hyper_lr`` nor ``hyper_step`` is given: ``ScaleFree`` whose
    #: growth accelerates while the run is stalled (its one-step hypergradient answers a new
    #: learning rate within a step, so a fast climb does not overshoot; MARTHE's over
    #: heavy-ball SGD does not).
    default_hyper_step: HyperStep | str = "ScaleFree(accel=1.5, streak=20)"
    # No Hessian-vector product: the base unscales GradScaler's gradients before the step, as for
    # HypergradSGD, and skips the steps where the scaler found inf/NaN.
    _supports_grad_scaler = True

    @renamed_keywords(renamed_options("hd"))
    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        hyper_lr: float | None = None,
        hyper_step: HyperStep | str | None = None,
        lr_bounds: tuple[float, float] = (0.0, math.inf),
        per_parameter: bool = False,
        tune: tuple[str, ...] = ("lr",),
        momentum_phase: str = "stall",
        val_closure: Closure | None = None,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        check_arguments(self, lr_bounds=lr_bounds, lr=lr, betas=betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        per_parameter=per_parameter, tune=tune, momentum_phase=momentum_phase,
                        decoupled_weight_decay=decoupled_weight_decay)
        rule_defaults = dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])),
                             eps=float(eps), weight_decay=float(weight_decay), amsgrad=False,
                             maximize=False, decoupled_weight_decay=decoupled_weight_decay)
        self._setup(params, rule_defaults, hyper_lr=hyper_lr, hyper_step=hyper_step,
                    lr_bounds=lr_bounds, per_parameter=per_parameter, tune=tune,
                    momentum_phase=momentum_phase, val_closure=val_closure,
                    foreach=foreach, fused=fused, differentiable=differentiable)

    momentum_hyper = "beta1"

    @staticmethod
    def _momentum(group: dict[str, Any]) -> float:
        return float(group["betas"][0])

    @staticmethod
    def _momentum_entry(group: dict[str, Any], value: float) -> dict[str, Any]:
        return {"betas": (value, group["betas"][1])}

    def _objective_grads(self, group: dict[str, Any], params: list[Tensor],
                         grads: list[Tensor]) -> list[Tensor]:
        wd = group["weight_decay"]
        if wd == 0 or group["decoupled_weight_decay"]:
            return grads
        return [g.add(p, alpha=wd) for g, p in zip(grads, params)]


class HypergradAdamW(HypergradAdam):
    r"""AdamW whose learning rate follows its hypergradient: :class:`HypergradAdam` with
    decoupled weight decay (``torch.optim.AdamW``'s signature and default ``weight_decay=1e-2``).

    The direction of the previous step includes the decay's share,
    :math:`d_{t-1} = \hat m_t / (\sqrt{\hat v_t} + \epsilon) + \lambda w_{t-1}`, because
    :math:`w_t = (1 - a\lambda) w_{t-1} - a\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)`
    (bias corrections and :math:`\epsilon` as torch places them). In training-loss mode
    :math:`\nabla E` is the loss gradient alone. With ``hyper_lr=0`` the weights are
    bit-identical to ``torch.optim.AdamW``'s. Arguments as :class:`HypergradAdam`.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = HypergradAdamW(model.parameters(), lr=0.01, weight_decay=0.1)
        >>> opt.zero_grad()
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> opt.step()
        >>> opt.param_groups[0]["decoupled_weight_decay"]
        True
    """

    @renamed_keywords(renamed_options("hd"))
    @adamw_signature(HypergradAdam.__init__)
    def __init__(self, params: ParamsT, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, **options: Any) -> None:
        refuse_unexpected(HypergradAdamW.__init__, options)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **options,
                         decoupled_weight_decay=True)
