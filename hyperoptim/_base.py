r"""The base every hyperoptim optimizer shares (DESIGN.md §2).

It owns what is the same for all four methods: argument checks, the closure contract (training
``closure`` and ``val_closure``), gradients the optimizer takes itself (averaged across ranks under
``torch.distributed``), the ``history`` record, the non-finite guard, and a ``state_dict`` that
carries everything a resumed run needs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._dist import all_reduce_mean, check_supported_parameters
from ._hvp import HVP_ROUTES, RngReplay, SecondOrder
from ._types import Closure, ParamsT

__all__ = [
    "HyperOptimizer", "all_reduce_mean", "check_sgd_arguments", "check_value",
    "frozen_batchnorm_stats", "is_real",
]

# float16's range, the narrowest floating dtype's: values within it fit every parameter.
_SMALLEST_FLOAT_MAX = torch.finfo(torch.float16).max


def check_value(name: str, value: Any, ok: bool) -> None:
    """Raise ``ValueError("Invalid <name> value: <value>")`` unless ``ok``, as torch.optim does."""
    if not ok:
        raise ValueError(f"Invalid {name} value: {value}")


def is_real(value: Any) -> bool:
    """A finite Python number (``bool`` excluded): what a float hyperparameter may be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sgd_arguments(lr: Any, momentum: Any, dampening: Any, weight_decay: Any,
                        nesterov: Any) -> None:
    """The checks ``torch.optim.SGD`` makes, for every optimizer with SGD's arguments."""
    check_value("lr", lr, is_real(lr) and lr >= 0.0)
    check_value("momentum", momentum, is_real(momentum) and momentum >= 0.0)
    check_value("dampening", dampening, is_real(dampening))
    check_value("weight_decay", weight_decay, is_real(weight_decay) and weight_decay >= 0.0)
    check_value("nesterov", nesterov, isinstance(nesterov, bool))
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


@contextlib.contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[nn.Module]:
    """Leave BatchNorm running statistics unchanged by whatever runs inside.

    A validation forward pass in train mode normalises with batch statistics and, by default,
    also updates ``running_mean``, ``running_var`` and ``num_batches_tracked``: validation data
    would leak into the model. Inside this context those buffers are scratch copies, and the
    originals are put back on exit (also when an exception is raised), so the loss may still be
    differentiated after the context ends; the forward pass itself is unchanged. Use ``module.eval()`` instead
    if the validation pass should normalise with the running statistics.

    Args:
        module (nn.Module): the model; every ``_BatchNorm`` submodule is covered.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> before = model[1].running_mean.clone()
        >>> with frozen_batchnorm_stats(model):
        ...     _ = model(torch.randn(8, 3))
        >>> torch.equal(model[1].running_mean, before)
        True
    """
    # Swap in scratch copies rather than restoring in place: the validation graph saved the
    # buffers it normalised with, and an in-place restore would break its backward pass.
    saved: list[tuple[nn.Module, str, Tensor]] = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = m._buffers.get(name)
                if buf is not None:
                    saved.append((m, name, buf))
                    m._buffers[name] = buf.clone()
    try:
        yield module
    finally:
        for m, name, buf in saved:
            m._buffers[name] = buf


def _grad_snapshot(params: Sequence[Tensor]) -> list[tuple[Tensor | None, int]]:
    # Holding the tensors keeps their ids from being reused; the version catches in-place accumulation.
    return [(p.grad, p.grad._version if p.grad is not None else -1) for p in params]


def _grads_changed(before: list[tuple[Tensor | None, int]], params: Sequence[Tensor]) -> bool:
    return any(p.grad is not g or (g is not None and g._version != v)
               for p, (g, v) in zip(params, before))


class HyperOptimizer(Optimizer):
    r"""Base class of the hyperoptim optimizers: a ``torch.optim.Optimizer`` with hyperparameters
    that learn from hypergradients.

    Subclasses implement :meth:`step`. They read and write hyperparameters as plain floats in
    ``param_groups`` (so assignment by the user works as with any torch optimizer), keep
    per-parameter tensors in ``self.state[p]``, and keep anything else a resumed run needs in
    ``self.hyper_state`` (a dict that :meth:`state_dict` saves and :meth:`load_state_dict`
    restores).

    Attributes:
        history (list of dict): one dict per param group, name -> list of floats, appended by
            :meth:`_record` (values of hyperparameters and raw hypergradients ``"hypergrad/<name>"``,
            and ``"skipped"``: 1.0 where the non-finite guard skipped the update, else 0.0).
        val_closure (callable or None): the default validation closure.
    """

    history: list[dict[str, list[Any]]]

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *,
                 val_closure: Closure | None = None, hvp: str = "auto") -> None:
        if val_closure is not None and not callable(val_closure):
            raise ValueError(f"Invalid val_closure value: {val_closure!r}")
        check_value("hvp", hvp, isinstance(hvp, str) and hvp in HVP_ROUTES)
        self.history = []
        self.hyper_state: dict[str, Any] = {}
        self.val_closure = val_closure
        self.hvp = hvp
        self._hvp_route: str | None = None
        self._warned_nonfinite = False
        super().__init__(params, defaults)

    @property
    def hvp_route(self) -> str | None:
        """The Hessian-vector-product route of the latest step that needed one (``None`` before)."""
        return self._hvp_route

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
            check_supported_parameters(type(self).__name__, self.param_groups[-1]["params"])
        except ValueError:
            self.param_groups.pop()
            raise
        self.history.append({})

    def _record(self, group_index: int, *, skipped: bool = False, **values: float | list[float]) -> None:
        """Append one entry per name to ``history[group_index]``; ``skipped`` is always recorded."""
        hist = self.history[group_index]
        for name, value in values.items():
            hist.setdefault(name, []).append(value)
        hist.setdefault("skipped", []).append(1.0 if skipped else 0.0)

    def _warn_nonfinite(self, what: str) -> None:
        """Warn once per optimizer that a non-finite value made it skip an update."""
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: non-finite {what}; the update was skipped and neither "
                "weights nor hyperparameters changed (counted in history[...]['skipped']). "
                "This warning is shown once.",
                RuntimeWarning,
                stacklevel=3,
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
        limit = min((torch.finfo(p.dtype).max for g in self.param_groups for p in g["params"]
                     if p.is_floating_point()), default=math.inf)
        return all(math.isfinite(v) and abs(v) <= limit for v in values)

    @staticmethod
    def _params_with_grad(group: dict[str, Any]) -> list[Tensor]:
        """The group's parameters that have a gradient; the others are skipped."""
        return [p for p in group["params"] if p.grad is not None]

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

        With ``second_order=True`` the second value is a :class:`~hyperoptim._hvp.SecondOrder`
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
            return None, None
        params = self._all_params()
        before = _grad_snapshot(params)
        rng = RngReplay([p.device for p in params]) if second_order else None
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor):
            raise ValueError(f"Invalid closure return value: {loss!r} (expected the loss tensor)")
        called_backward = _grads_changed(before, params)
        route = self._route(called_backward) if second_order else None
        graph_grads: list[Tensor] | None = None
        if called_backward:
            used = [p for p in params if p.grad is not None]
            for g, mean in zip([p.grad for p in used], all_reduce_mean([p.grad for p in used])):
                if mean is not g:
                    g.copy_(mean)
        else:
            if not loss.requires_grad:
                raise ValueError("Invalid closure return value: the loss does not require grad")
            exact = route == "exact"
            grads = torch.autograd.grad(loss, params, allow_unused=True, create_graph=exact)
            pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
            used = [p for p, _ in pairs]
            # Averaged after differentiating: the local gradients keep their graph for H·Z.
            for p, mean in zip(used, all_reduce_mean([g.detach() for _, g in pairs])):
                p.grad = mean
            if exact:
                graph_grads = [g for _, g in pairs]
        if route is None:
            return loss.detach(), None
        rng = cast(RngReplay, rng)
        rng.mark_after()
        self._hvp_route = route
        gradient_at = None if route == "exact" else (lambda: self._gradient_at(closure, used))
        return loss.detach(), SecondOrder(used, route, graph_grads=graph_grads,
                                          gradient_at=gradient_at, rng=rng)

    def _route(self, called_backward: bool) -> str:
        """The HVP route for this step (DESIGN.md §3), or a ValueError saying what to change."""
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

    def _gradient_at(self, closure: Closure, params: list[Tensor]) -> list[Tensor]:
        """The closure's training gradient at the live (perturbed) weights, local to this rank.

        ``p.grad`` of every parameter is left exactly as it was: the closure runs with no
        gradients present (so one that accumulates without ``zero_grad()`` is still right), and
        the original gradient tensors are put back afterwards.
        """
        everything = self._all_params()
        saved = [p.grad for p in everything]
        for p in everything:
            p.grad = None
        try:
            with torch.enable_grad():
                loss = closure()
            if any(p.grad is not None for p in everything):
                return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if not isinstance(loss, Tensor) or not loss.requires_grad:
                raise ValueError("Invalid closure return value: the loss does not require grad")
            raw = torch.autograd.grad(loss, params, allow_unused=True)
            return [g if g is not None else torch.zeros_like(p) for p, g in zip(params, raw)]
        finally:
            for p, g in zip(everything, saved):
                p.grad = g

    def _resolve_val_closure(self, val_closure: Closure | None, *, required: bool) -> Closure | None:
        val_closure = val_closure if val_closure is not None else self.val_closure
        if val_closure is None and required:
            raise ValueError(
                f"{type(self).__name__} needs a validation loss: pass val_closure= to the "
                "constructor or to step()."
            )
        return val_closure

    def _validation_grads(self, val_closure: Closure, params: Sequence[Tensor]
                          ) -> tuple[Tensor, list[Tensor]]:
        r"""Validation loss and its gradient with respect to ``params``, without touching ``p.grad``.

        The ``val_closure`` may call ``backward()`` itself or just return the loss. The training
        gradients in ``p.grad`` are put back afterwards (also on error). Unused parameters get a
        zero gradient. The gradients are averaged across ranks.
        """
        params = list(params)
        everything = self._all_params()
        saved = [p.grad for p in everything]
        for p in everything:
            p.grad = None
        try:
            with torch.enable_grad():
                loss = val_closure()
            if not isinstance(loss, Tensor):
                raise ValueError(f"Invalid val_closure return value: {loss!r} (expected a tensor)")
            if any(p.grad is not None for p in params):
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            elif loss.requires_grad and params:
                raw = torch.autograd.grad(loss, params, allow_unused=True)
                grads = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, raw)]
            else:
                grads = [torch.zeros_like(p) for p in params]
        finally:
            for p, g in zip(everything, saved):
                p.grad = g
        return loss.detach(), all_reduce_mean([g.detach() for g in grads])

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        """Torch's state dict plus ``history`` and ``hyper_state`` (deep copies)."""
        sd = super().state_dict()
        sd["history"] = copy.deepcopy(self.history)
        sd["hyper_state"] = copy.deepcopy(self.hyper_state)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved; a resumed run continues exactly."""
        state_dict = dict(state_dict)
        history = state_dict.pop("history", None)
        hyper_state = state_dict.pop("hyper_state", None)
        super().load_state_dict(state_dict)
        if history is not None:
            self.history = copy.deepcopy(history)
        if hyper_state is not None:
            device = next((p.device for g in self.param_groups for p in g["params"]), None)
            self.hyper_state = _to_device(copy.deepcopy(hyper_state), device)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults/state/param_groups; ours must survive deepcopy too.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict also calls this with state/param_groups only: keep what we have.
        missing = {
            "history": [{} for _ in state.get("param_groups", [])],
            "hyper_state": {},
            "val_closure": None,
            "hvp": "auto",
            "_hvp_route": None,
            "_warned_nonfinite": False,
        }
        for key, value in missing.items():
            if key not in state and key not in self.__dict__:
                state[key] = value
        super().__setstate__(state)

    def step(self, closure: Callable[[], Any] | None = None, *,
             val_closure: Closure | None = None) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


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
