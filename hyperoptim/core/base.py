r"""The base every hyperoptim optimizer shares (docs/design.md §2).

It owns what is the same for all four methods: argument checks, the closure contract (training
``closure`` and ``val_closure``), gradients the optimizer takes itself (averaged across ranks under
``torch.distributed``), the ``history`` record, the non-finite guard, and a ``state_dict`` that
carries everything a resumed run needs.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..hvp import HVP_ROUTES, RngReplay, SecondOrder, exact_route_error
from .batchnorm import frozen_batchnorm_stats
from .checks import check_sgd_arguments, check_torch_flags, check_value, is_real
from .dist import all_reduce_mean, check_supported_parameters, ddp_synced_ids
from .grads import GradIsolation, ReachedLeaves
from .ledger import GradLedger
from .migrate import from_torch
from .options import (
    check_group,
    check_hyper_state,
    check_param_state,
    coerce_group,
    fixed_values,
    validate_groups,
)
from .replicas import check_replicas_once
from .schedulers import detect_overwrites, outside_factor
from .shard import any_nonzero, check_sharded_closure, is_sharded, tensor_norms
from .types import Closure, ParamsT
from .warn import warn

__all__ = [
    "HISTORY_LIMIT", "LEARNED_LIMIT", "HyperOptimizer", "all_reduce_mean", "check_sgd_arguments",
    "check_value", "frozen_batchnorm_stats", "is_real",
]

# float16's range, the narrowest floating dtype's: values within it fit every parameter.
_SMALLEST_FLOAT_MAX = torch.finfo(torch.float16).max

LEARNED_LIMIT = 1e3
"""Every learned hyperparameter value stays within [-1e3, 1e3] (learning rates, weight decays and
momenta within their own, narrower ranges inside it), so that a learned value can never overflow a
float16 tensor, let alone a wider one: a runaway hyper-step is bounded, not caught afterwards."""

HISTORY_LIMIT = 10_000
"""The default of :attr:`HyperOptimizer.history_limit`: entries kept per name and param group."""

# A training loss above this multiple of its running minimum (and above its first value), or a
# learning rate this many times its first value, is reported as a likely divergence.
_DIVERGED_LOSS_RATIO = 100.0
_DIVERGED_LR_RATIO = 1e4


def _grad_snapshot(params: Sequence[Tensor]) -> list[tuple[Tensor | None, int]]:
    # Holding the tensors keeps their ids from being reused; the version catches in-place accumulation.
    return [(p.grad, p.grad._version if p.grad is not None else -1) for p in params]


def _grads_changed(before: list[tuple[Tensor | None, int]], params: Sequence[Tensor]) -> bool:
    return any(p.grad is not g or (g is not None and g._version != v)
               for p, (g, v) in zip(params, before))


class HyperOptimizer(Optimizer):
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
    """

    history: list[dict[str, list[Any]]]
    _learned_names_default: tuple[str, ...] = ("lr",)
    _supports_grad_scaler = False
    # FSDP2 (fully_shard): every reduction the class takes goes through hyperoptim.core.shard.
    _supports_fsdp2 = False
    # torch.amp.GradScaler hands the optimizer grad_scale/found_inf instead of unscaling for it;
    # the base unscales (HypergradSGD) or refuses with an error that names bf16 autocast.
    _step_supports_amp_scaling = True

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

    def declare_ddp(self, model: torch.nn.Module) -> None:
        """Declare that ``model``, a ``DistributedDataParallel``, averages the gradients that
        ``backward()`` writes for this optimizer's parameters, so that the optimizer does not
        all-reduce them a second time (once per optimizer; see README, "Distributed training").

        Gradients the optimizer takes itself with ``torch.autograd.grad`` (closures that return
        the loss) bypass DDP's hooks and are still averaged here, as are parameters DDP ignores.

        Raises:
            ValueError: ``model`` is not a ``DistributedDataParallel`` over the default process
                group, or holds none of this optimizer's parameters.
        """
        self._ddp_synced = ddp_synced_ids(type(self).__name__, model, self._all_params())

    def _synced(self, params: Sequence[Tensor], called_backward: bool) -> list[bool]:
        """Per parameter: is its gradient already averaged (by DDP's hooks, see :meth:`declare_ddp`,
        or FSDP2's reduce-scatter)?"""
        return [called_backward and (id(p) in self._ddp_synced or is_sharded(p)) for p in params]

    @staticmethod
    def _average(tensors: Sequence[Tensor], synced: Sequence[bool]) -> list[Tensor]:
        """:func:`all_reduce_mean` of the tensors whose ``synced`` entry is False (one collective);
        the others, already averaged, are returned as they are."""
        own = [i for i, done in enumerate(synced) if not done]
        out = list(tensors)
        for i, mean in zip(own, all_reduce_mean([tensors[i] for i in own])):
            out[i] = mean
        return out

    def __repr__(self) -> str:
        text = super().__repr__()
        if self.hvp != "auto" or self._hvp_route is not None:
            ran = f", last step: {self._hvp_route}" if self._hvp_route is not None else ""
            text = text[:-1] + f"hvp: {self.hvp}{ran}\n)"
        return text

    # ------------------------------------------------------------------ groups, history
    def add_param_group(self, param_group: dict[str, Any]) -> None:
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

    def _warn_nonfinite(self, what: str) -> None:
        """Count a skipped step; warn at the 1st, 10th, 100th, ... with how many so far."""
        count = self.skipped_steps + 1
        self.hyper_state["skipped_steps"] = count
        if count == 10 ** round(math.log10(count)):
            warn(
                f"{type(self).__name__}: non-finite {what}; the step was skipped and neither "
                f"weights nor hyperparameters changed ({count} step{'s' if count > 1 else ''} "
                "skipped so far; history[...]['skipped'] marks them). If every step is skipped, "
                "the weights or the data are non-finite; if it happens after the learning rate "
                "grew, lower the hyper-step size."
            )

    @staticmethod
    def _all_finite(*values: float) -> bool:
        return all(math.isfinite(v) for v in values)

    def _representable(self, *values: float) -> bool:
        """Finite, and within range of every parameter's dtype.

        A learned value that is finite as a Python float can still overflow a float32 tensor
        (``torch.add(..., alpha=1e39)`` raises): such a hyper-update counts as non-finite.
        """
        if all(abs(v) <= _SMALLEST_FLOAT_MAX for v in values):  # the usual case: no dtype lookup
            return True
        limit = self._dtype_max()
        return all(math.isfinite(v) and abs(v) <= limit for v in values)

    def _dtype_max(self) -> float:
        return min((torch.finfo(p.dtype).max for g in self.param_groups for p in g["params"]
                    if p.is_floating_point()), default=math.inf)

    @staticmethod
    def _params_with_grad(group: dict[str, Any]) -> list[Tensor]:
        """The group's parameters that have a gradient; the others are skipped."""
        return [p for p in group["params"] if p.grad is not None]

    # ------------------------------------------------------------------ the guard
    def _guard_tensors(self, plans: Sequence[tuple[dict[str, Any], list[Tensor]]]
                       ) -> list[tuple[list[Tensor], list[Tensor], list[Tensor]]]:
        """Per group, the weights, training gradients and momentum buffers the guard bounds."""
        every = []
        for _, params in plans:
            bufs = [b for b in (self.state.get(p, {}).get("momentum_buffer") for p in params)
                    if b is not None]
            every.append((params, [p.grad for p in params], bufs))
        return every

    def _guard_scalars(self, loss: Tensor | None,
                       plans: Sequence[tuple[dict[str, Any], list[Tensor]]],
                       norms: Sequence[Tensor] | None = None) -> list[Tensor]:
        r"""Device scalars the guard needs, to join the step's one host sync.

        The training loss (0 without one), then per group bounds of :math:`\max|w|`,
        :math:`\max|g|` and :math:`\max|v|` (weights, training gradients, momentum buffers: the
        largest 2-norm of their tensors; NaN propagates, so a non-finite gradient shows here).
        Float64, one fused reduction for all groups. ``norms``: the 2-norms of
        :meth:`_guard_tensors`' tensors in order, if the caller took them already (under FSDP2,
        in the step's one all-reduce).
        """
        device = next((p.device for _, ps in plans for p in ps), None)
        out = [loss.detach().double().reshape(()) if loss is not None
               else torch.zeros((), dtype=torch.float64, device=device)]
        every = self._guard_tensors(plans)
        # One fused reduction over every list (as torch.nn.utils.clip_grad_norm_ does), with one
        # all-reduce of the squared shard norms under FSDP2. The 2-norm bounds the largest element
        # and is 20x faster on a CPU than the inf-norm; NaN and inf propagate through it.
        all_norms = (list(norms) if norms is not None else
                     tensor_norms([t for kinds in every for ts in kinds for t in ts]))
        at = 0
        for kinds in every:
            norms = all_norms[at:at + sum(len(ts) for ts in kinds)]
            at += len(norms)
            start = 0
            for ts in kinds:
                part = norms[start:start + len(ts)]
                start += len(ts)
                out.append(torch.stack(part).max().double() if part else
                           torch.zeros((), dtype=torch.float64, device=device))
        return [t.to(out[0].device) for t in out]

    def _guard_verdict(self, values: Sequence[float],
                       plans: Sequence[tuple[dict[str, Any], list[Tensor]]],
                       hypers: Sequence[dict[str, float]] | None = None) -> str | None:
        r"""Why the step must be skipped (``None``: it is safe), from :meth:`_guard_scalars`' values.

        ``hypers[i]`` overrides group ``i``'s ``lr``, ``momentum``, ``weight_decay`` (the values
        the step is about to use; a per-weight learning rate is given by its largest element).
        The bound follows PyTorch's SGD rule with absolute values,
        :math:`|g'| \le |g| + c|w|`, :math:`|v'| \le b|v| + |1-\delta||g'|`,
        :math:`|d| \le |g'| + b|v'|`, :math:`|w'| \le |w| + a|d|`; every bound must stay below
        the largest finite value of the parameters' dtype. On success it also feeds the
        divergence watch.
        """
        loss = values[0]
        if not math.isfinite(loss):
            return "training loss"
        limit = self._dtype_max()
        for i, (group, params) in enumerate(plans):
            w, g, v = values[1 + 3 * i: 4 + 3 * i]
            if not params:
                continue
            if not math.isfinite(g):
                return "training gradient"
            h = {**group, **(hypers[i] if hypers is not None else {})}
            a, b, c = abs(h["lr"]), abs(h.get("momentum", 0.0)), abs(h.get("weight_decay", 0.0))
            damp = abs(1.0 - h.get("dampening", 0.0))
            g1 = g + c * w
            v1 = b * v + max(damp, 1.0) * g1
            d = g1 + b * v1 if h.get("nesterov") else max(v1, g1)
            if not all(math.isfinite(x) and x <= limit for x in (a, b, c, g1, v1, d, w + a * d)):
                return "step (a learned value would overflow the weights' dtype)"
        self._watch_divergence(loss, [group["lr"] if hypers is None else hypers[i].get("lr", group["lr"])
                                      for i, (group, _) in enumerate(plans)])
        return None

    def _guard_step(self, loss: Tensor | None, plans: Sequence[tuple[dict[str, Any], list[Tensor]]],
                    hypers: Sequence[dict[str, float]] | None = None, *,
                    worst_case: bool = False) -> str | None:
        """:meth:`_guard_scalars` and :meth:`_guard_verdict` with a host sync of their own; on a
        skip it counts and warns (see :meth:`_warn_nonfinite`) and returns the reason.

        With ``worst_case=True`` every learned value is taken at the top of its range (a
        hyper-update about to run may move it anywhere inside): ``lr_bounds[1]`` (else
        :data:`LEARNED_LIMIT`) for a learning rate, 1 for a momentum, :data:`LEARNED_LIMIT` for a
        weight decay.
        """
        if worst_case:
            top = {"momentum": 1.0, "weight_decay": LEARNED_LIMIT}
            hypers = [{name: max(group[name], group["lr_bounds"][1] if name == "lr" and
                                 "lr_bounds" in group else top.get(name, LEARNED_LIMIT))
                       for name in self._learned_names(group)} for group, _ in plans]
        values = torch.stack(self._guard_scalars(loss, plans)).tolist()
        reason = self._guard_verdict(values, plans, hypers)
        if reason is not None:
            self._warn_nonfinite(reason)
        return reason

    def _watch_divergence(self, loss: float, lrs: Sequence[float]) -> None:
        """One warning when the training loss or a learning rate runs away."""
        watch = self._watch
        if watch.get("warned"):
            return
        first_lrs = watch.setdefault("first_lrs", list(lrs))
        message = None
        for i, (lr, first) in enumerate(zip(lrs, first_lrs)):
            # Growth from outside (a warm-up schedule) is not the hyper-step's doing.
            if first > 0 and lr > _DIVERGED_LR_RATIO * first * outside_factor(watch, i):
                message = (f"the learning rate of param group {i} grew from {first:.3g} to "
                           f"{lr:.3g}")
        if loss != 0.0 or "first_loss" in watch:
            first_loss = watch.setdefault("first_loss", loss)
            low = min(watch.get("min_loss", loss), loss)
            watch["min_loss"] = low
            # Far above the lowest loss on the scale of the run itself (its first value and its
            # lowest), so that losses near 0 or below it (maximize) do not look divergent.
            scale = max(abs(first_loss - low), abs(low))
            if scale > 0 and loss - low > _DIVERGED_LOSS_RATIO * scale:
                message = (f"the training loss is {loss:.4g}; it started at {first_loss:.4g} "
                           f"and its lowest so far is {low:.4g}")
        if message is not None:
            watch["warned"] = True
            warn(
                f"{type(self).__name__}: training looks divergent: {message}. The hyper-step "
                "size is probably too large for this problem's gradient scale: divide it by 10 "
                "(see README, 'Choosing the hyper-step size'). This warning is shown once."
            )

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

    def _published(self) -> None:
        """Remember the learned values the step left, to notice who overwrites them."""
        self._watch["published"] = [
            {name: group[name] for name in self._learned_names(group) if name in group}
            for group in self.param_groups
        ]

    def _detect_overwrites(self) -> None:
        """Warn once if a schedule overwrites learned values rather than scaling them (judged by
        what it does to the values: :mod:`hyperoptim.core.schedulers`)."""
        detect_overwrites(self)

    # ------------------------------------------------------------------ closures
    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _training_loss(self, closure: Closure | None, *, second_order: bool = False
                       ) -> tuple[Tensor | None, SecondOrder | None]:
        r"""Run the training ``closure`` so that ``p.grad`` holds the gradient of its loss.

        The closure recomputes the loss from the live parameters and returns it; it may call
        ``zero_grad()``/``backward()`` itself (the torch.optim pattern) or not: if it did not, the
        gradients are taken here with ``autograd.grad`` and written to ``p.grad``. Either way the
        gradients are averaged across ranks under ``torch.distributed`` (for a
        ``DistributedDataParallel`` model, whose hooks already averaged them, this changes
        nothing). Without a closure, the gradients already in ``p.grad`` are used as they are.

        With ``second_order=True`` the second value is a :class:`~hyperoptim.hvp.SecondOrder`
        giving :math:`H Z` by the route ``self.hvp`` selects (``"auto"``: exact if the closure
        returned the loss without calling ``backward()``, finite differences if it called it).
        Callers close it when done.

        Returns:
            ``(loss, second)``: the closure's loss (``None`` without a closure) and the
            second-order handle (``None`` unless ``second_order``).

        Raises:
            ValueError: no closure where one is needed, a closure that returns no tensor, or
                ``hvp="exact"`` with a closure that calls ``backward()`` itself.
        """
        if closure is None:
            if second_order:
                raise ValueError(
                    f"{type(self).__name__} needs second-order information: call "
                    "step(closure) with a closure that recomputes and returns the training loss "
                    "(it may call backward() itself)."
                )
            self._check_dense()
            used = [p for p in self._all_params() if p.grad is not None]
            self._grad_ledger.remember(used)
            self._flip_for_maximize(used)
            return None, None
        params = self._all_params()
        if not params:
            return self._nothing_to_train(closure)
        self._grad_ledger.drop_stale()
        before = _grad_snapshot(params)
        rng = RngReplay([p.device for p in params]) if second_order else None
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor):
            raise ValueError(f"Invalid closure return value: {loss!r} (expected the loss tensor)")
        self._reached().note(loss)
        called_backward = _grads_changed(before, params)
        check_sharded_closure(type(self).__name__, params, called_backward, "closure")
        route = self._route(called_backward) if second_order else None
        graph_grads: list[Tensor] | None = None
        origin_grads: list[Tensor] | None = None
        # A closure that calls backward() replaces p.grad (as for torch.optim); one that does not
        # leaves it as the user prepared it, and only then is it looked at (one host sync).
        if not called_backward:
            self._check_dense()
        prepared = [] if called_backward else GradLedger.prepared(params)
        if prepared:
            used, graph_grads, origin_grads = self._prepared_gradients(loss, prepared, route)
        elif called_backward:
            used = [p for p in params if p.grad is not None]
            grads = [p.grad for p in used]
            for g, mean in zip(grads, self._average(grads, self._synced(used, True))):
                if mean is not g:
                    g.copy_(mean)
        else:
            if not loss.requires_grad:
                raise ValueError("Invalid closure return value: the loss does not require grad")
            exact = route == "exact"
            try:
                grads = torch.autograd.grad(loss, params, allow_unused=True, create_graph=exact)
            except RuntimeError as err:
                if not exact:
                    raise
                raise exact_route_error(err) from err
            pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
            used = [p for p, _ in pairs]
            # Averaged after differentiating: the local gradients keep their graph for H·Z.
            for p, mean in zip(used, all_reduce_mean([g.detach() for _, g in pairs])):
                p.grad = mean
            if exact:
                graph_grads = [g for _, g in pairs]
        self._check_dense()
        # Stepped once: left unchanged, these gradients are stale at the next step(closure).
        self._grad_ledger.remember(used)
        self._flip_for_maximize(used)
        if route is None:
            return loss.detach(), None
        rng = cast(RngReplay, rng)
        rng.mark_after()
        self._hvp_route = route
        if self.defaults.get("maximize"):
            if graph_grads is not None:
                graph_grads = [-g for g in graph_grads]  # H of -L
            if origin_grads is not None:
                origin_grads = [-g for g in origin_grads]
        gradient_at = None if route == "exact" else (lambda: self._gradient_at(closure, used))
        return loss.detach(), SecondOrder(used, route, graph_grads=graph_grads,
                                          gradient_at=gradient_at, rng=rng,
                                          kink_check=not self._fd_rough,
                                          on_rough=self._note_rough_differences,
                                          origin_grads=origin_grads)

    def _prepared_gradients(self, loss: Tensor, prepared: list[Tensor], route: str | None
                            ) -> tuple[list[Tensor], list[Tensor] | None, list[Tensor] | None]:
        """The gradient contract for a closure that returns the loss while ``p.grad`` already
        holds gradients the user prepared (accumulated, clipped): those are the step's gradient,
        averaged across ranks like any other; the closure's loss gives only the second-order
        information (its gradient's graph for the exact route, its gradient at the unperturbed
        weights for the finite-difference route's kink check).

        Returns:
            ``(used, graph_grads, origin_grads)``: the parameters stepped, and the closure's
            gradients for :class:`~hyperoptim.hvp.SecondOrder` (``None`` where not needed).
        """
        used = list(prepared)
        for g, mean in zip([p.grad for p in used], all_reduce_mean([p.grad for p in used])):
            if mean is not g:
                g.copy_(mean)
        if route is None:
            return used, None, None
        if not loss.requires_grad:
            raise ValueError("Invalid closure return value: the loss does not require grad")
        exact = route == "exact"
        try:
            grads = torch.autograd.grad(loss, used, allow_unused=True, create_graph=exact)
        except RuntimeError as err:
            if not exact:
                raise
            raise exact_route_error(err) from err
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(used, grads)]
        if exact:
            return used, grads, None
        return used, None, all_reduce_mean([g.detach() for g in grads])

    def _nothing_to_train(self, closure: Closure) -> tuple[Tensor | None, None]:
        """No parameter requires grad (all frozen, empty groups, integer tensors): as with
        ``torch.optim.SGD``, the closure runs and nothing else happens."""
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor):
            raise ValueError(f"Invalid closure return value: {loss!r} (expected the loss tensor)")
        return loss.detach(), None

    def _note_rough_differences(self) -> None:
        """The finite-difference route could not find a step where the gradient is smooth.

        Warn once, with what to do, and stop retrying (each retry costs two closure calls and
        the answer would not improve): from then on, this optimizer's products are central
        differences at the first step size.
        """
        if self._fd_rough:
            return
        self._fd_rough = True
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in self._all_params()})
        warn(
            f"{type(self).__name__}: the finite-difference Hessian-vector products are unreliable "
            "here: even at a 100x smaller step the two one-sided differences of the gradient "
            "disagree. Either the model has kinks within the step (ReLU, max-pooling, clamping) "
            f"or the gradient's rounding dominates (weights in {', '.join(dtypes)}; under "
            "torch.autocast the forward pass rounds to bfloat16/float16, far coarser); on a "
            "784-512-512-10 ReLU MLP in float32 the products were 20x off. Prefer the exact "
            "route: a closure that returns the loss without calling backward() (hvp='exact'), "
            "or train in float64 without autocast. Continuing without further retries."
        )

    def _route(self, called_backward: bool) -> str:
        """The HVP route for this step (docs/design.md §8), or a ValueError saying what to change."""
        if self.hvp == "auto":
            return "finite_difference" if called_backward else "exact"
        if self.hvp == "exact" and called_backward:
            raise ValueError(
                f"{type(self).__name__}(hvp='exact') takes H·Z by double backward through the "
                "training gradient, but the closure called backward() itself, which frees that "
                "graph. Return the loss from the closure without calling backward(), or pass "
                "hvp='finite_difference' (first-order gradients only: works with backward() in "
                "the closure, DDP, torch.compile and Lightning)."
            )
        return self.hvp

    def _isolated_gradient(self, closure: Closure, params: Sequence[Tensor], name: str
                           ) -> tuple[Tensor, list[Tensor | None] | None, bool]:
        """Run ``closure`` with the ``p.grad`` of every leaf it reaches cleared, this optimizer's
        or not (:class:`~hyperoptim.core.grads.GradIsolation`), and put the original gradient
        tensors back afterwards (also on error): the step's own gradients, and those of a model
        another optimizer trains, are never touched, and a closure that accumulates without
        ``zero_grad()`` is still right.

        Returns:
            ``(loss, grads, called_backward)``: ``grads[i]`` is the gradient of ``params[i]``
            (``None`` where it got none), taken from ``p.grad`` if the closure called
            ``backward()`` and with ``autograd.grad`` otherwise; ``grads`` is ``None`` when the
            loss carries no graph at all.
        """
        everything = self._all_params()
        with GradIsolation(everything, self._reached()) as isolation, torch.enable_grad():
            loss = isolation.call(closure)
            if not isinstance(loss, Tensor):
                raise ValueError(f"Invalid {name} return value: {loss!r} (expected a tensor)")
            if any(p.grad is not None for p in everything):
                return loss, [p.grad for p in params], True
            if not loss.requires_grad:
                return loss, None, False
            # A parameter frozen since (requires_grad_(False)) gets no gradient, as with backward().
            live = [i for i, p in enumerate(params) if p.requires_grad]
            if not live:
                return loss, [None] * len(params), False
            grads: list[Tensor | None] = [None] * len(params)
            for i, g in zip(live, torch.autograd.grad(loss, [params[i] for i in live], allow_unused=True)):
                grads[i] = g
            return loss, grads, False

    def _reached(self) -> ReachedLeaves:
        """The leaves outside this optimizer that its closures reach (:mod:`.grads`)."""
        return self.__dict__.setdefault("_reached_leaves", ReachedLeaves())

    def _gradient_at(self, closure: Closure, params: list[Tensor]) -> list[Tensor]:
        """The closure's training gradient at the live (perturbed) weights, averaged across
        ranks; ``p.grad`` is left exactly as it was (:meth:`_isolated_gradient`)."""
        _, raw, called_backward = self._isolated_gradient(closure, params, "closure")
        if raw is None:
            raise ValueError("Invalid closure return value: the loss does not require grad")
        out = [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw)]
        out = self._average([g.detach() for g in out], self._synced(params, called_backward))
        return [-g for g in out] if self.defaults.get("maximize") else out

    def _resolve_val_closure(self, val_closure: Closure | None, *, required: bool) -> Closure | None:
        val_closure = val_closure if val_closure is not None else self.val_closure
        if val_closure is None and required:
            raise ValueError(
                f"{type(self).__name__} needs a validation loss: pass val_closure= to the "
                "constructor or to step()."
            )
        return val_closure

    def _validation_grads(self, val_closure: Closure, params: Sequence[Tensor], *,
                          average_loss: bool = True) -> tuple[Tensor, list[Tensor]]:
        r"""Validation loss and its gradient with respect to ``params``, without touching ``p.grad``.

        The ``val_closure`` may call ``backward()`` itself or just return the loss. The training
        gradients in ``p.grad`` are put back afterwards (also on error). Unused parameters get a
        zero gradient. The loss and the gradients are averaged across ranks; with
        ``average_loss=False`` the loss is this rank's, for a caller that averages it in a
        collective of its own (FSDP2's one all-reduce of scalars per step).
        """
        params = list(params)
        loss, raw, called_backward = self._isolated_gradient(val_closure, params, "val_closure")
        check_sharded_closure(type(self).__name__, params, called_backward, "val_closure")
        if raw is None and params:
            raise ValueError(self._no_graph_message("does not require grad"))
        if params and not called_backward and all(g is None for g in (raw or [])):
            raise ValueError(self._no_graph_message("does not depend on the parameters"))
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw or [])]
        # The loss is averaged too (it is a mean over the data as well): every rank records the
        # same value, and skips the same steps.
        *grads, loss = self._average([g.detach() for g in grads] + [loss.detach()],
                                     self._synced(params, called_backward) + [not average_loss])
        if self.defaults.get("maximize"):
            grads = [-g for g in grads]
        if not self._val_checked and grads:
            # Once, at the first hyper-update: a gradient of exactly 0 everywhere means the loss
            # does not see these weights (a copied model), and every hypergradient would be 0.
            if not any_nonzero(grads):
                raise ValueError(self._no_graph_message("has a gradient of exactly 0 for every "
                                                        "parameter"))
            self._val_checked = True
        return loss.detach(), grads

    def _no_graph_message(self, what: str) -> str:
        return (
            f"{type(self).__name__}: the validation loss {what}, so every hypergradient would be "
            "0 and nothing would be learned. The val_closure must compute the loss from the live "
            "parameters of the model being trained, with autograd on: do not wrap it in "
            "torch.no_grad() or torch.inference_mode() (model.eval() is fine), and do not "
            "evaluate a copy of the model (an EMA model, copy.deepcopy). The optimizer takes the "
            "gradient itself and leaves p.grad unchanged."
        )

    def _check_dense(self) -> None:
        for p in self._all_params():
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(
                    f"{type(self).__name__} does not support sparse gradients (e.g. "
                    "nn.Embedding(sparse=True)): hypergradients are inner products of dense "
                    "update directions. Use sparse=False, or train those parameters with "
                    "torch.optim.SparseAdam / SGD in a second optimizer."
                )

    def _flip_for_maximize(self, params: Sequence[Tensor]) -> None:
        """With ``maximize``, ``p.grad`` holds a negated copy of the gradient during the step
        (the original tensor is put back after it): the optimizer then minimizes ``-loss``,
        exactly as torch.optim.SGD does. The user's tensor is never written (its version counter
        stays, so a graph that uses it can still be differentiated)."""
        if not self.defaults.get("maximize"):
            return
        for p in params:
            if p.grad is not None and all(p is not q for q, _ in self._flipped):
                self._flipped.append((p, p.grad))
                p.grad = torch.neg(p.grad)

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        """Torch's state dict plus the class name, ``history`` and ``hyper_state``.

        ``history`` is copied list by list (its entries are immutable floats or lists never
        changed after they are recorded), not deep-copied, so the call stays cheap; its length is
        bounded by :attr:`history_limit`. State-dict post-hooks see the whole dict.
        """
        hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            sd = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = hooks
        sd["optimizer_class"] = type(self).__name__
        sd["history"] = [{k: list(v) for k, v in h.items()} for h in self.history]
        sd["history_limit"] = self.history_limit
        sd["hyper_state"] = copy.deepcopy(self.hyper_state)
        for hook in hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved; a resumed run continues exactly.

        A plain ``torch.optim`` state dict of the matching kind (SGD for the SGD-based classes,
        Adam/AdamW for the Adam family) migrates: torch's values and per-parameter state are
        kept, the hyper state starts fresh, and ``history[i]["note"]`` says so
        (:mod:`hyperoptim.core.migrate`).

        Refused with ``ValueError`` naming the offending key before anything changes
        (:meth:`_check_loadable`): a state dict saved by another optimizer class, param groups
        that lack this class's options or hold invalid values, per-parameter state of the wrong
        shape or dtype or with NaN/inf, a malformed ``history`` or ``hyper_state``. Group keys
        that older state dicts may lack (``maximize``, ``dampening``, ``nesterov``, torch's
        switches) take this optimizer's values. A load that fails anyway leaves the optimizer
        exactly as it was. Load pre-hooks see, and post-hooks run after, the whole state
        (history included).
        """
        state_dict = dict(state_dict)
        pre, post = (self._optimizer_load_state_dict_pre_hooks,
                     self._optimizer_load_state_dict_post_hooks)
        for hook in pre.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        state_dict = from_torch(self, state_dict)  # a torch.optim checkpoint: migrate it
        state_dict = self._check_loadable(state_dict)
        with self._all_or_nothing():
            self._load_checked(state_dict, pre, post)
        for hook in post.values():
            hook(self)

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """On an exception, put every attribute back as it was (then re-raise): torch's load
        rebinds ``state`` and ``param_groups`` to new objects, so the old ones are intact."""
        saved = dict(self.__dict__)
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    def _load_checked(self, state_dict: dict[str, Any], pre: Any, post: Any) -> None:
        history = state_dict.pop("history", None)
        hyper_state = state_dict.pop("hyper_state", None)
        limit = state_dict.pop("history_limit", self.history_limit)
        state_dict.pop("optimizer_class", None)
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        if history is not None:
            self.history = [{k: list(v) for k, v in h.items()} for h in history]
        self._fixed_options = [fixed_values(self, group) for group in self.param_groups]
        self.history_limit = limit
        if hyper_state is not None:
            device = next((p.device for g in self.param_groups for p in g["params"]), None)
            self.hyper_state = _to_device(copy.deepcopy(hyper_state), device)
        self._watch = {}

    def _check_loadable(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """ValueError unless ``state_dict`` fits this optimizer (checked before any change):
        the class, the param groups (every option, :mod:`hyperoptim.core.options`), every
        parameter's state (shapes, dtypes, finiteness), ``history`` and ``hyper_state``.

        Returns the state dict to load: group keys a state dict saved before they existed may
        lack (:data:`_OPTIONAL_KEYS`) filled from this optimizer's groups; the caller's dict is
        not modified."""
        name = type(self).__name__
        saved = state_dict.get("optimizer_class")
        if saved is not None and saved != name:
            raise ValueError(f"{name}.load_state_dict: the state dict was saved by {saved}, not "
                             f"{name}; load it into a {saved}.")
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
            raise ValueError(f"{name}.load_state_dict: not an optimizer state dict (no "
                             "'state'/'param_groups')")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the state dict has {len(groups)} param "
                             f"groups, this optimizer {len(self.param_groups)}")
        if not all(isinstance(g, dict) for g in groups):
            raise ValueError(f"{name}.load_state_dict: a param group of the state dict is not a "
                             "dict")
        groups = [{**{k: v for k, v in group.items() if k in _OPTIONAL_KEYS and k != "params"},
                   **{k: v for k, v in _LEGACY_VALUES.items() if k in group},
                   **saved_group} for saved_group, group in zip(groups, self.param_groups)]
        state_dict = {**state_dict, "param_groups": groups}
        for i, (saved_group, group) in enumerate(zip(groups, self.param_groups)):
            missing = sorted(k for k in group if k not in saved_group and k not in _OPTIONAL_KEYS)
            if missing:
                raise ValueError(f"{name}.load_state_dict: param group {i} of the state dict lacks "
                                 f"{missing}: it was not saved by a {name}")
            if len(saved_group.get("params", ())) != len(group["params"]):
                raise ValueError(f"{name}.load_state_dict: param group {i} has "
                                 f"{len(saved_group.get('params', ()))} parameters in the state "
                                 f"dict, {len(group['params'])} here")
            try:
                self._check_group({k: v for k, v in saved_group.items() if k != "params"})
            except ValueError as err:
                raise ValueError(f"{name}.load_state_dict: param_groups[{i}]: {err}") from None
        params = {k: p for g, group in zip(groups, self.param_groups)
                  for k, p in zip(g["params"], group["params"])}
        for key, state in state_dict["state"].items():
            if key not in params:
                raise ValueError(f"{name}.load_state_dict: state[{key!r}] belongs to no parameter "
                                 "of the state dict's param groups")
            check_param_state(name, key, state, params[key])
        history = state_dict.get("history")
        if history is not None and (not isinstance(history, list) or len(history) != len(groups)
                                    or not all(isinstance(h, dict) and all(
                                        isinstance(v, list) for v in h.values()) for h in history)):
            raise ValueError(f"{name}.load_state_dict: history does not have one dict of lists "
                             "per param group")
        if state_dict.get("hyper_state") is not None:
            check_hyper_state(self, state_dict["hyper_state"], len(groups))
        return state_dict

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults/state/param_groups; ours must survive deepcopy too.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict also calls this with state/param_groups only: keep what we have.
        missing = {
            "history": [{} for _ in state.get("param_groups", [])],
            "history_limit": HISTORY_LIMIT,
            "hyper_state": {},
            "val_closure": None,
            "train_closure": None,
            "hvp": "auto",
            "_hvp_route": None,
            "_fd_rough": False,
            "_flipped": [],
            "_grad_ledger": GradLedger(),
            "_watch": {},
            "_val_checked": False,
            "_ddp_synced": frozenset(),
        }
        for key, value in missing.items():
            if key not in state and key not in self.__dict__:
                state[key] = value
        super().__setstate__(state)

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
        try:
            loss = self._step(closure, val_closure=val_closure)
        finally:
            self._end_step()
        self._published()
        return loss

    def _step(self, closure: Closure | None, *, val_closure: Closure | None = None) -> Any:
        """The method's step (see :meth:`step`); every subclass implements it."""
        raise NotImplementedError


# Group keys that a state dict saved before they existed may lack (filled from the defaults).
_OPTIONAL_KEYS = frozenset({"maximize", "dampening", "nesterov", "foreach", "differentiable",
                           "fused", "param_names", "hyper_step"})
# Optional keys whose absence means what the package did before they existed, whatever this
# optimizer's value: a checkpoint saved before hyper-step policies took the additive step.
_LEGACY_VALUES = {"hyper_step": "additive"}


def _to_device(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    return obj
