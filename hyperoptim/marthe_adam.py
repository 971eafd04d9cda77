r"""MARTHE with Adam/AdamW as the inner optimizer (Donini et al., 2020, Section 5)."""

from __future__ import annotations

from typing import Any

import torch  # noqa: F401  (the examples below use it)

from .core.options import check_arguments, renamed_options
from .core.signatures import (
    adamw_signature,
    bind_keywords,
    declared,
    refuse_unexpected,
    renamed_keywords,
    with_defaults,
    with_keywords,
)
from .core.types import ParamsT
from .hyperstep import Additive, HyperStep
from .methods.marthe import (
    MARTHE_KEYWORDS,
    RuleMarthe,
    marthe_options,
    own_step_given,
    take_marthe_options,
)
from .rules.adam import ADAM

__all__ = ["MartheAdam", "MartheAdamW"]


def _adam_keywords(*, decoupled_weight_decay: bool = False) -> None:
    """The keyword MartheAdam adds to MARTHE's: AdamW's flag."""


# MARTHE's keywords with Adam's hyper-step size (Adam's hypergradients are larger than SGD's),
# then AdamW's flag.
_KEYWORDS = (*with_defaults(MARTHE_KEYWORDS, hyper_lr=1e-9), *declared(_adam_keywords))


class MartheAdam(RuleMarthe):
    r"""Adam whose learning rate follows MARTHE's discounted hypergradient (Donini et al., 2020).

    ``torch.optim.Adam``'s step (same positional arguments and update) with one learning rate per
    param group, adapted online from the validation loss :math:`E` exactly as
    :class:`~hyperoptim.MartheSGD` does for SGD (HD at ``mu=0``, RTHO at ``mu=1``, MARTHE with
    ``mu="adaptive"``; the same :math:`\mu`, :math:`\beta` rules, guard and history; see its
    docstring), with Adam as the inner dynamics :math:`\Phi`. MARTHE's CIFAR-100 experiment
    (Section 5, Figure 4) runs it this way.

    **Tangents.** Adam's state is :math:`(w, m, v)` and its step count :math:`t`; with
    :math:`Z, M, V` the tangents of the weights and of both moments with respect to the
    group's current learning rate :math:`a_t`:

    .. math::

        (Z, M, V)_{t+1} &= \mu_t\, \frac{\partial \Phi_t}{\partial (w, m, v)} (Z, M, V)_t
            + \mu_t\, \frac{\partial \Phi_t}{\partial g} H_t Z_t
            + \frac{\partial \Phi_t}{\partial a_t}, \\
        \frac{\partial \Phi_t}{\partial a_t} &= (-d_t, 0, 0), \qquad
        d_t = \frac{1}{1 - \beta_1^t} \frac{m_{t+1}}{\sqrt{v_{t+1}}/\sqrt{1 - \beta_2^t} + \epsilon}
            \ (+\ \lambda w_t \text{ for AdamW}),

    the exact Jacobian of torch's step (the L2 term's :math:`\lambda Z` in the gradient, AdamW's
    :math:`(1 - a\lambda)` factor, the bias corrections and :math:`\epsilon` where torch puts
    them), obtained by autograd of the one Adam rule
    (:func:`hyperoptim.rules.rule_tangents`), one column per group. :math:`H_t
    Z_t` comes from the shared Hessian-vector-product routes (``hvp=``). With ``mu=1`` and a
    constant learning rate the hypergradient after :math:`T` steps is exactly the reverse-mode
    derivative through :math:`T` unrolled Adam steps
    (:func:`hyperoptim.reference.adam_unrolled_hypergrad`). The one-step hypergradient
    :math:`g'_1 = -\langle \nabla E(w_{t+1}), d_t \rangle` uses the direction torch's step
    took.

    **Cost per step** beyond Adam's: one validation gradient, while some :math:`\mu_t > 0` one
    batched Hessian-vector product and the forward-mode pass through the rule; memory is three
    copies of the weights per group (:math:`Z, M, V`) plus the direction.

    With ``hyper_lr=0`` and ``adapt_hyper_lr=False`` the weights are bit-identical to
    ``torch.optim.Adam``'s (``torch.optim.AdamW``'s for :class:`MartheAdamW`). ``state[p]``
    holds torch's ``"step"``, ``"exp_avg"``, ``"exp_avg_sq"``, and ``"direction"``,
    ``"tangent"``, ``"tangent_exp_avg"``, ``"tangent_exp_avg_sq"``.

    Args:
        params (iterable): parameters or param-group dicts, as for ``torch.optim.Adam``.
        lr (float, optional): initial learning rate :math:`a_0` (default: 1e-3).
        betas (tuple of float, optional): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999)).
        eps (float, optional): :math:`\epsilon` (default: 1e-8).
        weight_decay (float, optional): :math:`\lambda` (default: 0).
        amsgrad (bool, optional): must be False (not supported).
        mu (str or float, optional): ``"adaptive"`` or a fixed discount in [0, 1]
            (default: ``"adaptive"``).
        hyper_lr (float, optional): with ``adapt_hyper_lr=True`` the step size
            :math:`\kappa` of :math:`\beta`, otherwise the fixed :math:`\beta`. Adam's
            hypergradients are larger than SGD's (the direction has entries of order 1), so
            the scale is smaller (default: 1e-9; ``benchmarks/marthe_adam.py`` measures the
            grid).
        adapt_hyper_lr (bool, optional): adapt :math:`\beta` online (default: True).
            Formerly ``hypergrad_lr`` and ``adapt_hypergrad_lr`` (deprecated, as for
            :class:`~hyperoptim.MartheSGD`).
        hypergrad_clip (float, optional): clip :math:`\Delta` in the updates (default: None).
        hyper_step (HyperStep or str, optional): a policy of :mod:`hyperoptim.hyperstep` in
            place of MARTHE's step, as for :class:`~hyperoptim.MartheSGD` (default: None:
            ``ScaleFree(accel=1.5, streak=20)``, unless ``hyper_lr`` or ``adapt_hyper_lr`` is given).
        tune (tuple of str, optional): ``("lr", "momentum")`` learns :math:`\beta_1` too, by its
            one-step hypergradient, as for :class:`~hyperoptim.MartheSGD` (default: ``("lr",)``).
        momentum_phase (str, optional): ``"stall"`` or ``"run"``, when a learned :math:`\beta_1`
            is learned, as for :class:`~hyperoptim.MartheSGD` (default: ``"stall"``).
        val_closure (callable, optional): the validation loss; required here or in
            :meth:`step` (default: None).
        hvp (str, optional): the Hessian-vector-product route, as for
            :class:`~hyperoptim.MartheSGD` (default: ``"auto"``).
        foreach, fused, differentiable: ``torch.optim.Adam``'s switches; their defaults
            (None, None, False) and False are accepted, True raises ``ValueError`` with the
            reason.
        decoupled_weight_decay (bool, optional): AdamW's decay (default: False; see
            :class:`MartheAdamW`).

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> xv, yv = torch.randn(16, 3), torch.randn(16, 1)
        >>> mse = torch.nn.functional.mse_loss
        >>> opt = MartheAdam(model.parameters(), lr=0.01, hyper_lr=1e-6,
        ...                  val_closure=lambda: mse(model(xv), yv))
        >>> for _ in range(5):
        ...     loss = opt.step(lambda: mse(model(x), y))
        >>> sorted(opt.history[0]), opt.hvp_route
        (['hypergrad/lr', 'hypergrad_lr', 'lr', 'mu', 'skipped'], 'exact')

    References:
        M. Donini, L. Franceschi, O. Majumder, M. Pontil, P. Frasconi. MARTHE: Scheduling the
        Learning Rate Via Online Hypergradients. IJCAI 2020 (arXiv:1910.08525).

        D. P. Kingma, J. Ba. Adam: A Method for Stochastic Optimization. ICLR 2015.
    """

    rule = ADAM
    #: The policy when none of ``hyper_step``, ``hyper_lr`` and ``adapt_hyper_lr`` is given
    #: (with either of the last two: MARTHE's own additive step): ``ScaleFree`` whose growth
    #: accelerates while the run is stalled, as for HD (over heavy-ball SGD MARTHE's signal answers
    #: too late for it, and ``MartheSGD`` keeps ``ScaleFree()``).
    default_hyper_step: HyperStep | str = "ScaleFree(accel=1.5, streak=20)"
    buffer_tangent_keys = {"exp_avg": "tangent_exp_avg", "exp_avg_sq": "tangent_exp_avg_sq"}

    @renamed_keywords(renamed_options("marthe"))
    @with_keywords(_KEYWORDS)
    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        **options: Any,
    ) -> None:
        own_step = own_step_given(options)
        options = bind_keywords(MartheAdam.__init__, options, _KEYWORDS)
        marthe, decoupled = take_marthe_options(options), options.pop("decoupled_weight_decay")
        check_arguments(self, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=options["maximize"],
                        **{k: v for k, v in marthe.items()
                           if k != "hyper_step" and not (k == "tune" and v is None)},
                        decoupled_weight_decay=decoupled)
        defaults = dict(
            lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps),
            weight_decay=float(weight_decay), amsgrad=False, maximize=False,
            decoupled_weight_decay=decoupled, **marthe_options(
            **marthe, default=Additive.name if own_step else self.default_hyper_step))
        super().__init__(params, defaults, **options)

    momentum_hyper = "beta1"

    @staticmethod
    def _momentum(group: dict[str, Any]) -> float:
        return float(group["betas"][0])

    @staticmethod
    def _momentum_entry(group: dict[str, Any], value: float) -> dict[str, Any]:
        return {"betas": (value, group["betas"][1])}


class MartheAdamW(MartheAdam):
    r"""AdamW whose learning rate follows MARTHE's hypergradient: :class:`MartheAdam` with
    decoupled weight decay (``torch.optim.AdamW``'s signature and default ``weight_decay=1e-2``).

    The decay :math:`w \leftarrow (1 - a\lambda) w` is part of the rule, so its Jacobian
    (:math:`(1 - a\lambda) Z`) and its learning-rate derivative (:math:`-\lambda w`) enter the
    tangents. Arguments as :class:`MartheAdam`.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> opt = MartheAdamW(model.parameters(), lr=0.01, mu=1.0,
        ...                   val_closure=lambda: model(x).sub(y).pow(2).mean())
        >>> _ = opt.step(lambda: model(x).sub(y).pow(2).mean())
        >>> opt.param_groups[0]["weight_decay"], opt.param_groups[0]["decoupled_weight_decay"]
        (0.01, True)
    """

    @renamed_keywords(renamed_options("marthe"))
    @adamw_signature(MartheAdam.__init__)
    def __init__(self, params: ParamsT, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, **options: Any) -> None:
        refuse_unexpected(MartheAdamW.__init__, options)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **options,
                         decoupled_weight_decay=True)
