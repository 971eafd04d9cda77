r"""One-pass hyperparameter optimisation by implicit differentiation (Clarke et al., 2022) over
Adam's and AdamW's weight update."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch  # noqa: F401  (the examples below use it)

from .core.options import check_arguments
from .core.signatures import adamw_signature, refuse_unexpected, with_keywords
from .core.types import ParamsT
from .methods.ift import IFT_KEYWORDS, RuleIFT, ift_keywords
from .rules.adam import ADAM

__all__ = ["IFTAdam", "IFTAdamW"]

_REFUSED = ("beta1", "beta2", "betas", "momentum")


class IFTAdam(RuleIFT):
    r"""Adam whose learning rate and weight decay learn from implicit hypergradients.

    A drop-in replacement for ``torch.optim.Adam`` (same positional arguments
    ``params, lr, betas, eps, weight_decay, amsgrad``; every step is torch's Adam step with the
    current hyperparameters, bit-identical to ``torch.optim.Adam(foreach=False)`` while they stay
    put) that runs :class:`~hyperoptim.IFTOptimizer`'s method, Clarke et al.'s Algorithm 1, on
    Adam's weight update instead of SGD's: every ``update_interval`` steps the hyperparameters
    take one step of a hyper optimizer (Adam, ``hyper_lr``) on the Neumann approximation of the
    implicit hypergradient of the validation loss :math:`L_V`. Everything but the update function
    (transforms, look-back, timing, hyper optimizer, state, history, non-finite skips, HVP routes)
    is :class:`~hyperoptim.IFTOptimizer`'s, the one implementation over any rule
    (:class:`hyperoptim.methods.ift.RuleIFT`) given the ADAM rule here; see its documentation.

    **The update function** (Appendix, Eq. 11). With Adam's moments :math:`m, v` and step count
    :math:`t` held constant (detached: the state before the step, as torch keeps it in
    ``exp_avg``, ``exp_avg_sq``, ``step``), the weight update is a differentiable function of
    :math:`\lambda = (a, c)` (learning rate, weight decay) and the weights:

    .. math::

        g &= \nabla L_T(w) + c\, w, \qquad
        m' = \beta_1 m + (1 - \beta_1) g, \qquad v' = \beta_2 v + (1 - \beta_2) g^2, \\
        \mathbf u(\lambda, w) &= \frac{a}{1 - \beta_1^t} \cdot
            \frac{m'}{\sqrt{v'} / \sqrt{1 - \beta_2^t} + \epsilon}, \qquad
        w \leftarrow w - \mathbf u(\lambda, w),

    with :math:`\epsilon` after the bias correction, where torch puts it (the paper's Eq. 11
    writes :math:`\sqrt{\hat v_t + \epsilon}`). For :class:`IFTAdamW` the decay is decoupled,
    :math:`w' = (1 - a c)\, w - a\,\hat m' / (\sqrt{\hat v'} + \epsilon)` with
    :math:`g = \nabla L_T(w)`, so :math:`\mathbf u` gains :math:`a c\, w`. :math:`\mathbf u` is
    computed as :math:`w - w'` with :math:`w'` from the rule's pure step
    (:func:`hyperoptim.rules.adam.adam_step` through :data:`hyperoptim.rules.adam.ADAM`), the same rule the
    optimizer steps with, so no derivative of Adam is typed here: autograd gives
    :math:`J = \partial\mathbf u / \partial w` (through :math:`g(w)`, hence the training Hessian,
    by the step's HVP route) and :math:`\partial\mathbf u/\partial\lambda`.

    **The hypergradient**, as for :class:`~hyperoptim.IFTOptimizer`: with look-back :math:`i`,

    .. math::

        \frac{dL_V}{d\lambda} \approx -\nabla L_V^\top
            \sum_{0 \le j < i} (I - J)^j\, \frac{\partial \mathbf u}{\partial \lambda},

    with respect to :math:`\log_{10} a` and :math:`\log_{10} c` (Table 5's space; the learning
    rate clamped to ``lr_bounds``). A tuned weight decay of 0 starts from
    :data:`hyperoptim.ift.WEIGHT_DECAY_FLOOR` (1e-7), shown in ``param_groups`` from the start; to
    keep it at exactly 0 leave it out of ``tune``. :math:`\beta_1, \beta_2` stay fixed (``tune``
    refuses them): the moments are detached, so Eq. 11 differentiates them only through this
    step's :math:`m', v'`.

    **State.** ``state[p]`` holds torch's ``"step"``, ``"exp_avg"`` and ``"exp_avg_sq"`` (a
    checkpoint of ``torch.optim.Adam`` loads into it); the rest as
    :class:`~hyperoptim.IFTOptimizer`: the transformed values, the hyper optimizer's state and
    the interval counter are saved, so a resumed run continues exactly; ``history[i]`` records
    ``"lr"``, ``"weight_decay"``, ``"hypergrad/<name>"``, ``"val_loss"``, ``"step"`` and
    ``"skipped"`` per hyper-update.

    **Cost.** Between hyper-updates, torch's Adam step (single-tensor path); the warm-up's
    steps (at most 100) are hyper-updates. A hyper-update costs
    what :class:`~hyperoptim.IFTOptimizer`'s does: one closure with the graph of the training
    gradient (when ``lookback > 1``), one validation gradient and ``lookback - 1`` Hessian-vector
    products.

    Args:
        params (iterable): parameters or param-group dicts, as for ``torch.optim.Adam``. A group
            may set its own ``lr``, ``betas``, ``eps``, ``weight_decay``, ``tune`` and
            ``lr_bounds``.
        lr (float, optional): initial learning rate (default: 1e-3).
        betas (tuple of float, optional): :math:`(\beta_1, \beta_2)`, fixed (default: (0.9, 0.999)).
        eps (float, optional): :math:`\epsilon` (default: 1e-8).
        weight_decay (float, optional): initial weight decay :math:`c` (default: 0; tuned from
            1e-7 then).
        amsgrad (bool, optional): must be False (not supported).
        tune (sequence of str, optional): which of ``"lr"`` and ``"weight_decay"`` learn
            (default: both).
        update_interval, lookback, hyper_lr, hyper_optimizer, lr_bounds, update_timing,
            update_schedule, reactive_decrease, warmup_accel, val_closure, hvp: as for
            :class:`~hyperoptim.IFTOptimizer` (defaults: 10, 5, 0.05, Adam, ``(1e-10, 1.0)``,
            ``"taken"``, ``"warmup"``, True, 1.5, None, ``"auto"``). Adam's warm-up takes a
            hyper-update every step (its step moves each weight by about the learning rate,
            whatever the gradient's scale) until the learning rate's hypergradient changes sign.
        stability_guard (bool or None, optional): :class:`~hyperoptim.IFTOptimizer`'s guard
            needs the rule's edge of stability, and the Adam rule has none in this package (its
            preconditioner moves the edge with the second moments): None leaves it off, True is
            refused (default: None).
        decay_accel (float or None, optional): :class:`~hyperoptim.IFTOptimizer`'s accelerated
            weight decay; None is off here (measured on ``benchmarks/versus.py``: it took
            ``IFTAdam``'s diabetes test MSE from 1.0-1.1 to 0.47, but cost the digits CNN 1.3
            points, and ``IFTAdamW``'s decoupled decay overshot to 3-5 and left 2 of 5 diabetes
            seeds from the poor start at 0.59-0.72) (default: None).
        lr_accel (float or None, optional): :class:`~hyperoptim.IFTOptimizer`'s accelerated
            climb; None is off here (a climb at 1.5 that also ran after the warm-up cost
            ``IFTAdam``'s digits CNN 0.6 points and left its character LSTM's poor start worse)
            (default: None).
        decoupled_weight_decay (bool, optional): AdamW's decay (default: False; see
            :class:`IFTAdamW`).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> xv, yv = torch.randn(16, 3), torch.randn(16, 1)
        >>> val = lambda: torch.nn.functional.mse_loss(model(xv), yv)
        >>> opt = IFTAdam(model.parameters(), lr=0.01, weight_decay=1e-4, update_interval=5,
        ...               lookback=3, val_closure=val)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(20):
        ...     _ = opt.step(closure)
        >>> len(opt.history[0]["lr"]), sorted(k for k in opt.history[0] if k.startswith("hyper"))
        (20, ['hypergrad/lr', 'hypergrad/weight_decay'])

    References:
        R. M. Clarke, E. T. Oldewage, J. M. Hernández-Lobato. Scalable One-Pass Optimisation of
        High-Dimensional Weight-Update Hyperparameters by Implicit Differentiation. ICLR 2022
        (Appendix A.4, Eq. 11).

        D. P. Kingma, J. Ba. Adam: A Method for Stochastic Optimization. ICLR 2015.
        I. Loshchilov, F. Hutter. Decoupled Weight Decay Regularization. ICLR 2019 (AdamW).
    """

    rule = ADAM
    _tunable = ("lr", "weight_decay")

    @with_keywords(IFT_KEYWORDS)
    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        tune: Sequence[str] = ("lr", "weight_decay"),
        decoupled_weight_decay: bool = False,
        **options: Any,
    ) -> None:
        options = ift_keywords(IFTAdam.__init__, options)
        check_arguments(self, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=options["maximize"],
                        decoupled_weight_decay=decoupled_weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False,
                        decoupled_weight_decay=decoupled_weight_decay, tune=tune,
                        per_parameter_lr=False, per_parameter_weight_decay=False,
                        sharing="weight", lr_bounds=options.pop("lr_bounds"))
        self._setup(params, defaults, **options)

    # ------------------------------------------------------------------ groups
    def _check_group(self, group: dict[str, Any]) -> None:
        tune = group.get("tune", ())
        refused = [n for n in tune if n in _REFUSED] if isinstance(tune, (tuple, list)) else []
        if refused:
            raise ValueError(
                f"Invalid tune value: {tuple(tune)} ({type(self).__name__} tunes 'lr' and "
                f"'weight_decay'; {refused[0]!r} is not tunable: Adam's betas stay fixed)")
        super()._check_group(group)

    @classmethod
    def _normalised(cls, group: dict[str, Any]) -> dict[str, Any]:
        out = super()._normalised(group)
        out["betas"] = (float(out["betas"][0]), float(out["betas"][1]))
        out["eps"] = float(out["eps"])
        return out


class IFTAdamW(IFTAdam):
    r"""AdamW whose learning rate and weight decay learn from implicit hypergradients:
    :class:`IFTAdam` with decoupled weight decay (``torch.optim.AdamW``'s signature and default
    ``weight_decay=1e-2``).

    The update differentiated is AdamW's, :math:`\mathbf u(\lambda, w) = w - w'` with
    :math:`w' = (1 - a c)\, w - \frac{a}{1 - \beta_1^t}\,
    \frac{m'}{\sqrt{v'}/\sqrt{1 - \beta_2^t} + \epsilon}` and :math:`m', v'` from the loss
    gradient alone, so :math:`\partial\mathbf u/\partial c = a\, w` and the decay enters
    :math:`J = \partial \mathbf u/\partial w` as :math:`a c I`. With ``hyper_lr=0`` the weights
    are bit-identical to ``torch.optim.AdamW(foreach=False)``'s. Arguments as :class:`IFTAdam`.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = IFTAdamW(model.parameters(), lr=0.01, update_interval=2, lookback=2,
        ...                val_closure=lambda: model.weight.pow(2).sum())
        >>> for _ in range(4):
        ...     _ = opt.step(lambda: model(torch.ones(8, 3)).pow(2).mean())
        >>> opt.param_groups[0]["decoupled_weight_decay"], len(opt.history[0]["weight_decay"])
        (True, 4)
    """

    @adamw_signature(IFTAdam.__init__)
    def __init__(self, params: ParamsT, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, **options: Any) -> None:
        refuse_unexpected(IFTAdamW.__init__, options)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **options,
                         decoupled_weight_decay=True)
