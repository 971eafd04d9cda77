r"""The base every hyperoptim optimizer shares (docs/design.md §2).

It owns what is the same for all four methods: argument checks, the closure contract (training
``closure`` and ``val_closure``), gradients the optimizer takes itself (averaged across ranks under
``torch.distributed``), the ``history`` record, the non-finite guard, and a ``state_dict`` that
carries everything a resumed run needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from ..hvp import HVP_ROUTES
from .batchnorm import frozen_batchnorm_stats
from .checks import check_sgd_arguments, check_torch_flags, check_value, is_real
from .closures import _Closures
from .dist import AGREEMENT_TIMEOUT, all_reduce_mean, check_supported_parameters
from .guard import LEARNED_LIMIT, _Guard
from .ledger import GradLedger
from .options import (
    check_group,
    coerce_group,
    fixed_values,
    refresh_passed,
    renamed_group,
    validate_groups,
)
from .replicas import check_replicas_once
from .serialization import HISTORY_LIMIT, _Serialization
from .types import Closure, ParamsT
from .watch import _Watchers

__all__ = [
    "HISTORY_LIMIT", "LEARNED_LIMIT", "HyperOptimizer", "all_reduce_mean", "check_sgd_arguments",
    "check_value", "frozen_batchnorm_stats", "is_real",
]


class HyperOptimizer(_Guard, _Closures, _Watchers, _Serialization, Optimizer):
    r"""Base class of the hyperoptim optimizers: a ``torch.optim.Optimizer`` with hyperparameters
    that learn from hypergradients.

    Subclasses implement :meth:`_step`; :meth:`step` is the base's pipeline around it. They read
    and write hyperparameters as plain floats in ``param_groups`` (so assignment by the user works
    as with any torch optimizer), keep per-parameter tensors in ``self.state[p]``, and keep anything
    else a resumed run needs in ``self.hyper_state`` (a dict that :meth:`state_dict` saves and
    :meth:`load_state_dict` restores).

    What the base does around every ``step()`` (written once, for every subclass):

    - **Checks.** Every param group is validated the way the constructor validates its defaults
      (constructor, per-group dicts, :meth:`add_param_group`, loaded state dicts); a value
      assigned later (by the user or a scheduler) must still be a finite number, or ``step()``
      raises ``ValueError`` before anything moves. Complex parameters are refused when added,
      sparse gradients when they first appear, each with a ``ValueError`` that says why.
    - **The guard.** A non-finite training gradient, validation loss or hypergradient, or a
      learned value that would make the step non-finite in the weights' dtype, skips the whole
      step before anything is committed; ``history`` counts it and a ``RuntimeWarning`` says how
      many steps were skipped so far (at the 1st, 10th, 100th, ... skip).
    - **Silent no-ops.** A validation loss that does not depend on the parameters (computed
      under ``torch.no_grad()``, or on a copied/EMA model) raises ``ValueError`` at the first
      hyper-update instead of giving a hypergradient of 0 forever.
    - **Schedulers.** A learned value that something else overwrites at several consecutive
      steps, not by a constant factor of what the optimizer set (an absolute scheduler such as
      ``LambdaLR`` or ``OneCycleLR``), gets one ``RuntimeWarning`` naming what composes instead.
    - **Divergence.** A training loss far above its running minimum (and above its first
      value), or a learning rate 1e4 times its first value, gets one ``RuntimeWarning`` pointing
      at the hyper-step size.
    - ``maximize=True`` maximizes the training loss and, for the hyperparameters, the
      validation loss (both are negated), as ``torch.optim.SGD(maximize=True)`` does.

    Attributes:
        history (list of dict): one dict per param group, name -> list of floats, appended by
            :meth:`_record` (values of hyperparameters and raw hypergradients ``"hypergrad/<name>"``,
            and ``"skipped"``: 1.0 where the guard skipped the update, else 0.0). Each list keeps
            the most recent :attr:`history_limit` entries (older ones are dropped in chunks of a
            tenth of it).
        history_limit (int or None): entries kept per name and group (default:
            :data:`HISTORY_LIMIT`, 10,000); ``None`` keeps everything.
        val_closure (callable or None): the default validation closure.
        train_closure (callable or None): a training closure that ``step()`` uses when it is
            called without one (default: None). Loops that call ``optimizer.step()`` with no
            arguments (Hugging Face's Trainer) set it once per step; see
            ``examples/hf_trainer_hyper.py``.
        local_batch_size (int or None): under ``torch.distributed``, the number of examples in
            this rank's batch (default: None, not declared). Declared on every rank (once, or
            before each step), the ranks compare it in the step's agreement at no extra cost
            and warn once if the batches differ, since every rank's average weighs the same
            (README, "Distributed training").
        agreement_timeout (float or None): under ``torch.distributed``, the seconds a rank
            waits for the others at the step's agreement before raising (default:
            :data:`~hyperoptim.core.dist.AGREEMENT_TIMEOUT`, 300; None: the process group's
            own timeout).
    """

    history: list[dict[str, list[Any]]]
    _learned_names_default: tuple[str, ...] = ("lr",)
    _supports_grad_scaler = False
    #: Whether a skip caused by the learned rate divides it by guard.BACK_OFF (HD, MARTHE).
    _backs_off = False
    # FSDP2 (fully_shard): every reduction the class takes goes through hyperoptim.core.shard.
    _supports_fsdp2 = False
    # torch.amp.GradScaler hands the optimizer grad_scale/found_inf instead of unscaling for it;
    # the base unscales (HypergradSGD) or refuses with an error that names bf16 autocast.
    _step_supports_amp_scaling = True
    # Old name -> new name of the method's options renamed in this release (core.options).
    _renamed_options: dict[str, str] = {}

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *,
                 val_closure: Closure | None = None, hvp: str = "auto", maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None,
                 differentiable: bool = False) -> None:
        if val_closure is not None and not callable(val_closure):
            raise ValueError(f"Invalid val_closure value: {val_closure!r}")
        check_value("hvp", hvp, isinstance(hvp, str) and hvp in HVP_ROUTES)
        check_value("maximize", maximize, isinstance(maximize, bool))
        check_torch_flags(type(self).__name__, foreach, fused, differentiable)
        self.history = []
        self.history_limit: int | None = HISTORY_LIMIT
        self.hyper_state: dict[str, Any] = {}
        self.val_closure = val_closure
        self.train_closure: Closure | None = None
        self.local_batch_size: int | None = None
        self.agreement_timeout: float | None = AGREEMENT_TIMEOUT
        self.hvp = hvp
        self._hvp_route: str | None = None
        self._fd_rough = False
        self._flipped: list[tuple[Tensor, Tensor]] = []
        self._grad_ledger = GradLedger()
        self._watch: dict[str, Any] = {}
        self._val_checked = False
        self._ddp_synced: frozenset[int] = frozenset()
        super().__init__(params, {**defaults, "maximize": maximize})

    @property
    def hvp_route(self) -> str | None:
        """The Hessian-vector-product route of the latest step that needed one (``None`` before)."""
        return self._hvp_route

    @property
    def skipped_steps(self) -> int:
        """Steps the guard has skipped since construction (kept in :meth:`state_dict`)."""
        return int(self.hyper_state.get("skipped_steps", 0))

    def __repr__(self) -> str:
        text = super().__repr__()
        if self.hvp != "auto" or self._hvp_route is not None:
            ran = f", last step: {self._hvp_route}" if self._hvp_route is not None else ""
            text = text[:-1] + f"hvp: {self.hvp}{ran}\n)"
        return text

    # ------------------------------------------------------------------ groups, history
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Before torch fills the group from the defaults, which hold only the new names.
        param_group = renamed_group(type(self).__name__, param_group, self._renamed_options,
                                    where=" as a param group key")
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            coerce_group(group)
            check_supported_parameters(type(self).__name__, [p for g in self.param_groups
                                                             for p in g["params"]],
                                       fsdp2=self._supports_fsdp2)
            if any(p.is_complex() for p in group["params"]):
                raise ValueError(
                    f"{type(self).__name__} does not support complex parameters: its "
                    "hypergradients are real inner products of real tensors. Keep the real and "
                    "imaginary parts as two real parameters (torch.complex(re, im) in the "
                    "forward pass), or pass torch.view_as_real(p) views of them."
                )
            self._check_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        self.history.append({})
        self.__dict__.setdefault("_fixed_options", []).append(fixed_values(self, group))

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError("Invalid <name> value: ...")`` for any value a group may not hold.

        Subclasses with options of their own extend this; every group goes through it, however
        it was given (constructor defaults, a per-group dict, :meth:`add_param_group`, a loaded
        state dict).
        """
        check_group(self, group, getattr(self, "defaults", None))

    def _learned_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The names in ``group`` that this optimizer learns (watched for outside overwrites)."""
        return tuple(group.get("tune", self._learned_names_default))

    def _record(self, group_index: int, *, skipped: bool = False, **values: float | list[float]) -> None:
        """Append one entry per name to ``history[group_index]``; ``skipped`` is always recorded."""
        hist = self.history[group_index]
        values["skipped"] = 1.0 if skipped else 0.0
        limit = self.history_limit
        for name, value in values.items():
            entries = hist.setdefault(name, [])
            entries.append(value)
            if limit is not None and len(entries) > limit + max(1, limit // 10):
                del entries[: len(entries) - limit]

    @staticmethod
    def _params_with_grad(group: dict[str, Any]) -> list[Tensor]:
        """The group's parameters that have a gradient; the others are skipped."""
        return [p for p in group["params"] if p.grad is not None]

    # ------------------------------------------------------------------ around every step
    def _begin_step(self) -> bool:
        """Checks before a step; False when a GradScaler found inf/NaN (the step is skipped)."""
        validate_groups(self)
        check_replicas_once(self)
        self._detect_overwrites()
        if hasattr(self, "found_inf"):
            if not self._supports_grad_scaler:
                raise ValueError(
                    f"{type(self).__name__} does not support torch.amp.GradScaler: its "
                    "hypergradients and Hessian-vector products would mix scaled and unscaled "
                    "gradients. Use bf16 autocast (torch.autocast(device_type, "
                    "dtype=torch.bfloat16)) without a GradScaler: bfloat16 has float32's range "
                    "and needs no loss scaling."
                )
            if float(self.found_inf) != 0.0:
                return False
            scale = getattr(self, "grad_scale", None)
            if scale is not None:
                inv = scale.double().reciprocal().float()
                for p in self._all_params():
                    if p.grad is not None:
                        p.grad.mul_(inv.to(p.grad.device))
        return True

    def _end_step(self) -> None:
        """Undo what the step did to ``p.grad`` for ``maximize`` (also after an exception)."""
        for p, g in self._flipped:
            p.grad = g
        self._flipped = []
        self._reached().forget_pending()

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], Any] | None = None, *,
             val_closure: Closure | None = None) -> Any:
        r"""Perform one optimization step, and update the learned hyperparameters.

        The same pipeline for every method (docs/design.md, "The step"):

        1. **begin** (:meth:`_begin_step`): groups re-checked (values assigned since the last
           step), outside overwrites noticed, a ``torch.amp.GradScaler``'s gradients unscaled
           (or the step skipped where it found inf/NaN, as torch.optim does);
        2. the method's :meth:`_step`: it runs the closure, computes its hypergradients and
           proposed values without writing anything, asks the guard, then commits weights,
           buffers, tangents and hyperparameters together and records ``history``;
        3. **end** (:meth:`_end_step`, also after an exception): ``p.grad`` as the user left it
           (``maximize``), and the learned values remembered to notice who overwrites them.

        Args:
            closure (callable, optional): recomputes and returns the training loss; it may call
                ``zero_grad()``/``backward()`` itself or not. Without one, :attr:`train_closure`
                is used if set, else the gradients already in ``p.grad``.
            val_closure (callable, optional): overrides the constructor's ``val_closure`` for this
                step.

        Returns:
            The closure's loss, or None.
        """
        if not self._begin_step():
            return None  # GradScaler found inf/NaN: torch.optim skips the step too
        if closure is None:
            closure = self.train_closure
        self._skip_reason: str | None = None
        returned = False
        try:
            loss = self._step(closure, val_closure=val_closure)
            returned = True
        finally:
            self._end_step()
            self._count_differences(returned)
        if self._skip_reason is not None:
            self._back_off(self._skip_reason)
        self._published()
        refresh_passed(self, self._learned_names)
        return loss

    def _step(self, closure: Closure | None, *, val_closure: Closure | None = None) -> Any:
        """The method's step (see :meth:`step`); every subclass implements it."""
        raise NotImplementedError


