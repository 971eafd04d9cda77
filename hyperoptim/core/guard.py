r"""The step guard and the divergence watch: what decides that a step is skipped.

A part of :class:`~hyperoptim.core.base.HyperOptimizer` (docs/design.md §7), kept in its own module;
it is not meant to be used on its own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .dist import world_size
from .schedulers import outside_factor
from .shard import any_sharded, local, tensor_norms
from .warn import warn

# float16's range, the narrowest floating dtype's: values within it fit every parameter.
_SMALLEST_FLOAT_MAX = torch.finfo(torch.float16).max

LEARNED_LIMIT = 1e3
"""Every learned hyperparameter value stays within [-1e3, 1e3] (learning rates, weight decays and
momenta within their own, narrower ranges inside it), so that a learned value can never overflow a
float16 tensor, let alone a wider one: a runaway hyper-step is bounded, not caught afterwards."""

# A training loss above this multiple of its running minimum (and above its first value), or a
# learning rate this many times its first value, is reported as a likely divergence.
_DIVERGED_LOSS_RATIO = 100.0

_DIVERGED_LR_RATIO = 1e4

# After a step skipped because the update the learned values propose would overflow the weights'
# dtype, each learned learning rate is divided by this: a skip must not leave the value where it
# caused the skip (otherwise every later step proposes the same update and is skipped too).
BACK_OFF = 10.0

_OVERFLOW = "step (a learned value would overflow the weights' dtype)"


@functools.cache
def _finfo_max(dtype: torch.dtype) -> float:
    """The largest finite value of a floating ``dtype`` (read at every step's guard)."""
    return torch.finfo(dtype).max


def _largest_abs(tensors: Sequence[Tensor]) -> float:
    """The largest ``|x|`` over every element of ``tensors`` (whole FSDP2 parameters), in float64."""
    shards = [local(t) for t in tensors]
    tops = [s.detach().abs().amax().double() for s in shards if s.numel()]
    top = (torch.stack(tops).amax() if tops else
           torch.zeros((), dtype=torch.float64, device=tensors[0].device if tensors else None))
    if any_sharded(tensors) and world_size() > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return float(top)


class _Guard:
    """The step guard and the divergence watch: what decides that a step is skipped."""

    def _warn_nonfinite(self, what: str) -> None:
        """Count a skipped step; warn at the 1st, 10th, 100th, ... with how many so far."""
        count = self.skipped_steps + 1
        self.hyper_state["skipped_steps"] = count
        self._skip_reason = what
        if count == 10 ** round(math.log10(count)):
            changed = ("the learned learning rates were divided by "
                       f"{BACK_OFF:g}" if what == _OVERFLOW and self._backs_off else
                       "neither weights nor hyperparameters changed")
            warn(
                f"{type(self).__name__}: non-finite {what}; the step was skipped and {changed} "
                f"({count} step{'s' if count > 1 else ''} "
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
        return min((_finfo_max(p.dtype) for g in self.param_groups for p in g["params"]
                    if p.is_floating_point()), default=math.inf)

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
                       norms: Sequence[Tensor] | None = None) -> Tensor:
        r"""What the guard reads, as one float64 vector to join the step's one host sync.

        The training loss (0 without one), then the 2-norm of every weight, training gradient
        and momentum buffer of :meth:`_guard_tensors`, group by group (the largest 2-norm of each
        kind bounds its largest element; NaN propagates, so a non-finite gradient shows here).
        One fused reduction for all groups, one ``stack``: the maxima per kind are taken on the
        host by :meth:`_guard_verdict`, which reads the layout this call leaves. ``norms``: the
        2-norms of :meth:`_guard_tensors`' tensors in order, if the caller took them already
        (under FSDP2, in the step's one all-reduce).
        """
        every = self._guard_tensors(plans)
        self._guard_layout = [tuple(len(ts) for ts in kinds) for kinds in every]
        # One fused reduction over every list (as torch.nn.utils.clip_grad_norm_ does), with one
        # all-reduce of the squared shard norms under FSDP2. The 2-norm bounds the largest element
        # and is 20x faster on a CPU than the inf-norm; NaN and inf propagate through it.
        all_norms = (list(norms) if norms is not None else
                     tensor_norms([t for kinds in every for ts in kinds for t in ts]))
        # A closure with nothing to differentiate may return any value (as torch allows): 0 then.
        if isinstance(loss, Tensor):
            head = loss.detach().double().reshape(())
        else:
            device = next((p.device for _, ps in plans for p in ps), None)
            head = torch.zeros((), dtype=torch.float64, device=device)
        # A Tensor.to() that changes nothing still costs a dispatch: only where a device differs.
        device = head.device
        if any(n.device != device for n in all_norms):
            all_norms = [n.to(device) for n in all_norms]
        # One stack; the float64 loss promotes the norms (exactly) to float64.
        return torch.stack([head, *all_norms])

    def _guard_verdict(self, values: Sequence[float],
                       plans: Sequence[tuple[dict[str, Any], list[Tensor]]],
                       hypers: Sequence[dict[str, float]] | None = None, *,
                       bounds_only: bool = False) -> str | None:
        r"""Why the step must be skipped (``None``: it is safe), from :meth:`_guard_scalars`' values
        (on the host).

        ``hypers[i]`` overrides group ``i``'s ``lr``, ``momentum``, ``weight_decay`` (the values
        the step is about to use; a per-weight learning rate is given by its largest element).
        The bound follows PyTorch's SGD rule with absolute values,
        :math:`|g'| \le |g| + c|w|`, :math:`|v'| \le b|v| + |1-\delta||g'|`,
        :math:`|d| \le |g'| + b|v'|`, :math:`|w'| \le |w| + a|d|`; every bound must stay below
        the largest finite value of the parameters' dtype. On success it also feeds the
        divergence watch, with the learning rates of ``hypers``, or of the groups where
        ``bounds_only`` (``hypers`` are a worst case: the top of each range, which no run has
        reached).
        """
        loss = values[0]
        if not math.isfinite(loss):
            return "training loss"
        at = 1
        for i, (group, params) in enumerate(plans):
            w, g, v = _largest_per_kind(values, at, self._guard_layout[i])
            at += sum(self._guard_layout[i])
            if not params:
                continue
            if not self._all_finite(w, g, v):
                w, g, v = self._exact_bounds(plans[i], (w, g, v))
            if not math.isfinite(g):
                return "training gradient"
            over = hypers[i] if hypers is not None else {}

            def value(name: str, default: Any, group: dict[str, Any] = group,
                      over: dict[str, float] = over) -> Any:
                return over[name] if name in over else group.get(name, default)

            a, b, c = (abs(value("lr", None)), abs(value("momentum", 0.0)),
                       abs(value("weight_decay", 0.0)))
            damp = abs(1.0 - value("dampening", 0.0))
            g1 = g + c * w
            v1 = b * v + max(damp, 1.0) * g1
            d = g1 + b * v1 if value("nesterov", False) else max(v1, g1)
            bounds = (a, b, c, g1, v1, d, w + a * d)
            # Within float16's range every dtype holds them (NaN fails the comparison): only
            # otherwise is the parameters' narrowest range looked up.
            if not all(x <= _SMALLEST_FLOAT_MAX for x in bounds):
                limit = self._dtype_max()
                if not all(math.isfinite(x) and x <= limit for x in bounds):
                    return _OVERFLOW
        self._watch_divergence(loss, [group["lr"] if hypers is None or bounds_only
                                      else hypers[i].get("lr", group["lr"])
                                      for i, (group, _) in enumerate(plans)])
        return None

    def _exact_bounds(self, plan: tuple[dict[str, Any], list[Tensor]],
                      bounds: tuple[float, float, float]) -> tuple[float, float, float]:
        r"""The non-finite ones of ``bounds`` (a group's :math:`\max|w|`, :math:`\max|g|`,
        :math:`\max|v|`) taken again as the largest absolute element, which cannot overflow.

        The fast path's 2-norm squares the elements in their dtype: a float32 tensor with an
        element above about 1.8e19 has an infinite norm although every element is finite. Only
        then (rare: one more host sync, and under FSDP2 one all-reduce, on every rank alike since
        the norms were) is the bound recomputed; NaN and inf elements stay non-finite.
        """
        kinds = self._guard_tensors([plan])[0]
        return tuple(b if math.isfinite(b) else _largest_abs(ts)  # type: ignore[return-value]
                     for b, ts in zip(bounds, kinds))

    def _back_off(self, reason: str) -> None:
        """After a skip because the proposed update would overflow the weights' dtype, divide each
        learned learning rate by :data:`BACK_OFF` (not below ``lr_bounds[0]``), so that the next
        step does not propose the same update (docs/design.md §7); other skips (a non-finite
        loss, gradient or hypergradient: the data or the weights, not the rate) change
        nothing."""
        if reason != _OVERFLOW or not self._backs_off:
            return
        for group in self.param_groups:
            if "lr" in self._learned_names(group) and group["lr"] > 0.0:
                low = group.get("lr_bounds", (0.0, None))[0]
                group["lr"] = max(group["lr"] / BACK_OFF, low)

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
        return self._guard_read(loss, plans, hypers, worst_case=worst_case)[0]

    def _guard_read(self, loss: Tensor | None, plans: Sequence[tuple[dict[str, Any], list[Tensor]]],
                    hypers: Sequence[dict[str, float]] | None = None, *,
                    worst_case: bool = False, extra: Tensor | None = None
                    ) -> tuple[str | None, list[float]]:
        """:meth:`_guard_step`, also returning the values it read on the host (the training loss
        first, 0 without one), for a caller that reads the loss without a sync of its own.
        ``extra`` (a 1-d float64 tensor) rides in the same sync; its values end the list."""
        if worst_case:
            top = {"momentum": 1.0, "weight_decay": LEARNED_LIMIT}
            hypers = [{name: max(group[name], group["lr_bounds"][1] if name == "lr" and
                                 "lr_bounds" in group else top.get(name, LEARNED_LIMIT))
                       for name in self._learned_names(group)} for group, _ in plans]
        scalars = self._guard_scalars(loss, plans)
        if extra is not None:
            scalars = torch.cat([scalars, extra.to(scalars.device)])
        values = scalars.tolist()
        head = values[:len(values) - (0 if extra is None else extra.numel())]
        reason = self._guard_verdict(head, plans, hypers, bounds_only=worst_case)
        if reason is not None:
            self._warn_nonfinite(reason)
        return reason, values

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


def _largest_per_kind(values: Sequence[float], at: int, layout: tuple[int, ...]
                      ) -> tuple[float, ...]:
    """Per kind (weights, gradients, buffers) the largest of its ``layout[k]`` norms in
    ``values`` from ``at`` on, as ``torch.max`` would give it (NaN wins; 0 for none)."""
    out = []
    for count in layout:
        part = values[at:at + count]
        at += count
        out.append(0.0 if not part else math.nan if any(x != x for x in part) else max(part))
    return tuple(out)
