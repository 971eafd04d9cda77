r"""FDSAdam and FDSAdamW: forward-mode hyperparameter schedules (FDS; Micaelli & Storkey, 2021) over
torch.optim.Adam's and AdamW's rule."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch  # noqa: F401  (the examples below use it)

from .core.checks import check_value
from .core.options import check_rule_arguments, renamed_options
from .core.signatures import adamw_signature, refuse_unexpected, renamed_keywords
from .core.types import Closure, ParamsT
from .methods.fds import RuleFDS
from .rules.adam import ADAM

__all__ = ["FDSAdam", "FDSAdamW"]

NAMES = ("lr", "beta1", "beta2", "weight_decay")
"""The hyperparameters FDSAdam can schedule, in the order used for columns and ``tune``."""

DEFAULT_STEP_SIZES = {"lr": 1e-3, "beta1": 0.05, "beta2": 1e-3, "weight_decay": 1e-3}
r"""Initial outer step sizes :math:`\gamma`. The paper gives SGD's only; these are on the scale
of Adam's usual values (a learning rate of order 1e-3, weight decays of order 1e-3 to 1e-2), not
tuned: pass ``hyper_lr`` for your problem."""

_BETA_MAX = 1.0 - 1e-6  # torch requires beta < 1; the bias corrections divide by 1 - beta^t


class FDSAdam(RuleFDS):
    r"""Adam whose learning-rate and weight-decay (and optionally :math:`\beta_1, \beta_2`)
    *schedules* learn non-greedily (FDS).

    :class:`~hyperoptim.FDSSGD`'s method (episodes of ``horizon`` steps from weights the user
    re-initialises, piecewise-constant schedules with ``<name>_windows`` values each, exact
    forward-mode hypergradients at the end of an episode, the sign-based outer update with
    halving step sizes; see its docstring) with ``torch.optim.Adam``'s step as the inner rule
    :math:`\Phi`. With :math:`a, \beta_1, \beta_2, \lambda` the values in force at step :math:`t`
    (counted from 1 in each episode, whose moments start at 0 as a fresh ``torch.optim.Adam``'s):

    .. math::

        g_t &= \nabla L_t(w_t) + \lambda w_t \quad(\text{AdamW instead: } w_t \leftarrow
            (1 - a\lambda) w_t), \\
        m_{t+1} &= \beta_1 m_t + (1 - \beta_1) g_t, \qquad
        v_{t+1} = \beta_2 v_t + (1 - \beta_2) g_t^2, \\
        w_{t+1} &= w_t - \frac{a}{1 - \beta_1^t}\,
            \frac{m_{t+1}}{\sqrt{v_{t+1}} / \sqrt{1 - \beta_2^t} + \epsilon}.

    The state carries the tangents :math:`Z, M, V` of the weights and both moments with respect to
    every tuned schedule value :math:`\lambda_j`:

    .. math::

        (Z, M, V)_{t+1} = \frac{\partial \Phi}{\partial (w, m, v)} (Z, M, V)_t
            + \frac{\partial \Phi}{\partial g} H_t Z_t
            + \sum_x \frac{\partial \Phi}{\partial x}\, e_x(t), \qquad
        \frac{\partial E(w_T)}{\partial \lambda_j} = \langle \nabla E(w_T), Z_T[:, j] \rangle,

    the exact Jacobian of torch's step (bias corrections, :math:`\epsilon` where torch adds it,
    the L2 term or AdamW's decoupled decay), by autograd of the one Adam rule
    (:func:`hyperoptim.rules.rule_tangents`). In float64 the hypergradients agree with reverse mode
    through the unrolled run (:func:`hyperoptim.reference.adam_unrolled_hypergrad`) to rounding.
    The weights move by torch's own operations: frozen schedules (``tune=()``, or within an
    episode) give weights bit-identical to ``torch.optim.Adam`` (``torch.optim.AdamW``) started
    at the same point.

    Learned values are clipped: :math:`\beta_1, \beta_2` to :math:`[0, 1 - 10^{-6}]`, the
    learning rate and weight decay to :math:`\pm 10^3` (negative values are allowed, as in the
    paper's search ranges). ``group["lr"]``, ``group["weight_decay"]`` and ``group["betas"]`` show
    the values in force; ``group["<name>_schedule"]`` (``"lr"``, ``"beta1"``, ``"beta2"``,
    ``"weight_decay"``) the schedules, also returned by :meth:`schedule`. ``history[i]`` records,
    per hyperstep, every schedule, the raw hypergradients of the tuned ones
    (``"hypergrad/<name>"``), ``"val_loss"`` and ``"skipped"``.

    **Cost per step** beyond Adam's: while tangent columns are in use, one batched
    Hessian-vector product over them and the forward-mode pass through the rule. Memory: three
    weights-sized tensors per reached schedule value (:math:`Z, M, V`, in ``state[p]`` as
    ``"fds_z"``, ``"fds_m"``, ``"fds_v"``) besides torch's ``"step"``, ``"exp_avg"``,
    ``"exp_avg_sq"``; independent of the horizon.

    Args:
        params (iterable): parameters or param-group dicts, as for ``torch.optim.Adam``. A group
            may set its own values and ``*_windows``, ``tune``, ``hyper_lr``, ``hz_clip`` and
            ``*_schedule`` lists; ``horizon`` is shared.
        lr (float, optional): initial value of every learning-rate window (default: 1e-3).
        betas (tuple of float, optional): initial :math:`(\beta_1, \beta_2)` of every window
            (default: (0.9, 0.999)).
        eps (float, optional): :math:`\epsilon`, not scheduled (default: 1e-8).
        weight_decay (float, optional): initial value of every weight-decay window (default: 0).
        amsgrad (bool, optional): must be False (not supported).
        horizon (int): inner steps per episode, :math:`T`.
        lr_windows, beta1_windows, beta2_windows, weight_decay_windows (int, optional): values
            shared over contiguous steps, :math:`1 \le N \le T` (default: 1 each).
        tune (iterable of str, optional): which schedules learn, a subset of
            ``("lr", "beta1", "beta2", "weight_decay")`` (default: ``("lr", "weight_decay")``).
        hyper_lr (float or dict, optional): initial outer step sizes :math:`\gamma`: one for
            every schedule, or a dict by name where missing names keep
            :data:`DEFAULT_STEP_SIZES` (default: None, i.e. 1e-3 for the learning rate and the
            weight decay, 0.05 for :math:`\beta_1`, 1e-3 for :math:`\beta_2`). Formerly
            ``step_sizes`` (deprecated, as for :class:`~hyperoptim.FDSSGD`).
        hz_clip (float, optional): clip :math:`H Z` elementwise to this magnitude (default: None,
            exact).
        outer_step (str, optional): ``"log"`` (positive learning rates and weight decays step by
            factors, with backtracking) or ``"additive"`` (the paper's step), as for
            :class:`~hyperoptim.FDSSGD`; :math:`\beta_1, \beta_2` step additively either way
            (under ``"log"`` up at most halfway to 1, as FDSSGD's momentum) (default:
            ``"log"``). One difference under ``"log"``: a far step of a decade followed by an
            episode that asks for a full decade again doubles, to two decades (``far_growth =
            2``; FDSSGD's stay at one). Adam's step is bounded by its learning rate, so a rate
            somewhat too large costs little (the versus tasks end as well or better at 1e-2 as
            at 4e-3), while from 1e-5 two decades in the two outer steps of a 3-episode budget
            left every task at 1e-3 (MLP 94.5% against 97.0% from the good start, CNN 94.6
            against 98.2%, LSTM 17.4 against 10.5 perplexity); a decade then two reach 1e-2.
            FDSSGD's CNN died from its poor start with the same growth.
        val_closure (callable, optional): returns the validation loss from the live parameters,
            evaluated by :meth:`hyperstep`; may be overridden there (default: None).
        hvp (str, optional): how :math:`H Z` is computed, as for :class:`~hyperoptim.FDSSGD`
            (default: ``"auto"``).
        hvp_columns (str, optional): batched, per-column or measured :math:`H Z` on the exact
            route, as for :class:`~hyperoptim.FDSSGD` (default: ``"batched"``).
        decoupled_weight_decay (bool, optional): AdamW's decay (default: False; see
            :class:`FDSAdamW`).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(96, 3), torch.randn(96, 1)
        >>> model = torch.nn.Linear(3, 1)
        >>> init = {k: v.clone() for k, v in model.state_dict().items()}
        >>> loss_fn = torch.nn.functional.mse_loss
        >>> opt = FDSAdam(model.parameters(), lr=0.01, horizon=8, lr_windows=2, tune=("lr",),
        ...               val_closure=lambda: loss_fn(model(x[64:]), y[64:]))
        >>> for episode in range(4):
        ...     _ = model.load_state_dict(init)  # every episode starts from the same weights
        ...     for t in range(8):
        ...         batch = slice(8 * t, 8 * t + 8)
        ...         _ = opt.step(lambda: loss_fn(model(x[batch]), y[batch]))
        ...     _ = opt.hyperstep()
        >>> # Far below its rate (the episode's gain nearly linear in lr): a far step, x9.4.
        >>> [round(a, 4) for a in opt.history[0]["lr"][0]]
        [0.0943, 0.0943]
        >>> opt.history[0]["val_loss"][-1] < opt.history[0]["val_loss"][0]
        True

    References:
        P. Micaelli, A. Storkey. Gradient-based Hyperparameter Optimization Over Long Horizons.
        NeurIPS 2021.

        D. P. Kingma, J. Ba. Adam: A Method for Stochastic Optimization. ICLR 2015.
    """

    rule = ADAM
    names = NAMES
    default_step_sizes = DEFAULT_STEP_SIZES
    buffer_tangent_keys = {"exp_avg": "fds_m", "exp_avg_sq": "fds_v"}
    bounds = {"beta1": (0.0, _BETA_MAX), "beta2": (0.0, _BETA_MAX)}
    far_growth = 2.0

    @renamed_keywords(renamed_options("fds"))
    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        horizon: int,
        lr_windows: int = 1,
        beta1_windows: int = 1,
        beta2_windows: int = 1,
        weight_decay_windows: int = 1,
        tune: Iterable[str] = ("lr", "weight_decay"),
        hyper_lr: float | Mapping[str, float] | None = None,
        hz_clip: float | None = None,
        outer_step: str = "log",
        val_closure: Closure | None = None,
        hvp: str = "auto",
        hvp_columns: str = "batched",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        check_rule_arguments("adam", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             amsgrad=amsgrad, maximize=maximize,
                             decoupled_weight_decay=decoupled_weight_decay)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=float(eps), weight_decay=weight_decay, amsgrad=False,
            decoupled_weight_decay=decoupled_weight_decay, horizon=horizon,
            lr_windows=lr_windows, beta1_windows=beta1_windows, beta2_windows=beta2_windows,
            weight_decay_windows=weight_decay_windows, tune=tune, hyper_lr=hyper_lr,
            hz_clip=hz_clip,
            outer_step=outer_step,
        )
        super().__init__(params, defaults, val_closure=val_closure, hvp=hvp,
                         hvp_columns=hvp_columns, maximize=maximize,
                         foreach=foreach, fused=fused, differentiable=differentiable)

    @classmethod
    def _checked_options(cls, group: dict[str, Any], horizon: int) -> dict[str, Any]:
        group = super()._checked_options(group, horizon)
        # The Adam rule's own options, checked by the one options table (hyperoptim.core.options).
        check_rule_arguments("adam", eps=group["eps"], amsgrad=group["amsgrad"],
                             decoupled_weight_decay=group["decoupled_weight_decay"])
        return group

    @classmethod
    def _get_value(cls, group: dict[str, Any], name: str) -> Any:
        if name in ("beta1", "beta2"):
            betas = group["betas"]
            ok = isinstance(betas, (tuple, list)) and len(betas) == 2
            check_value("betas", betas, ok)
            return betas[name == "beta2"]
        return group[name]

    @classmethod
    def _set_value(cls, group: dict[str, Any], name: str, value: float) -> None:
        if name in ("beta1", "beta2"):
            betas = list(group.get("betas", (value, value)))
            betas[name == "beta2"] = value
            group["betas"] = tuple(betas)
        else:
            group[name] = value


class FDSAdamW(FDSAdam):
    r"""AdamW whose learning-rate and weight-decay schedules learn non-greedily (FDS):
    :class:`FDSAdam` with decoupled weight decay (``torch.optim.AdamW``'s signature and default
    ``weight_decay=1e-2``).

    The decay :math:`w \leftarrow (1 - a\lambda) w` is part of the rule, so its Jacobian and its
    derivatives with respect to the learning rate and the weight decay enter the tangents.
    Arguments as :class:`FDSAdam`.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = FDSAdamW(model.parameters(), horizon=10, weight_decay_windows=2)
        >>> opt.schedule("weight_decay"), opt.param_groups[0]["decoupled_weight_decay"]
        ([0.01, 0.01], True)
    """

    @renamed_keywords(renamed_options("fds"))
    @adamw_signature(FDSAdam.__init__)
    def __init__(self, params: ParamsT, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, horizon: int,
                 **options: Any) -> None:
        refuse_unexpected(FDSAdamW.__init__, options)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, horizon=horizon,
                         **options, decoupled_weight_decay=True)
