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
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from ._types import Closure, ParamsT

__all__ = [
    "HyperOptimizer", "check_sgd_arguments", "check_value", "frozen_batchnorm_stats", "is_real",
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


def all_reduce_mean(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Average tensors across ranks (a no-op unless ``torch.distributed`` runs with >1 rank).

    Every vector an optimizer computes itself (validation gradients, Hessian-vector products,
    training gradients it takes with ``autograd.grad``) goes through here, so that N ranks with the
    batch split N ways follow the trajectory of one rank with the whole batch. One flat collective.
    """
    tensors = list(tensors)
    if not tensors or not (dist.is_available() and dist.is_initialized()):
        return tensors
    world = dist.get_world_size()
    if world == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat.div_(world)
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


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


class _BackwardRecorder:
    """Within the context, ``Tensor.backward`` keeps the graph of the gradient it computes.

    Second-order methods need H·Z from the gradient graph; a torch.optim-style closure that calls
    ``loss.backward()`` itself would free it. Forcing ``create_graph=True`` there lets both kinds of
    closure work without a second forward pass.
    """

    def __init__(self) -> None:
        self.called = False
        self._orig = torch.Tensor.backward

    def __enter__(self) -> _BackwardRecorder:
        orig = self._orig
        recorder = self

        def backward(tensor: Tensor, gradient: Tensor | None = None, retain_graph: bool | None = None,
                     create_graph: bool = False, inputs: Any = None) -> None:
            recorder.called = True
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*create_graph=True.*reference cycle.*")
                orig(tensor, gradient, retain_graph=True, create_graph=True, inputs=inputs)

        torch.Tensor.backward = backward  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.backward = self._orig  # type: ignore[method-assign]


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
                 val_closure: Closure | None = None) -> None:
        if val_closure is not None and not callable(val_closure):
            raise ValueError(f"Invalid val_closure value: {val_closure!r}")
        self.history = []
        self.hyper_state: dict[str, Any] = {}
        self.val_closure = val_closure
        self._warned_nonfinite = False
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups, history
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
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

    def _training_loss(self, closure: Closure | None, *, create_graph: bool = False
                       ) -> tuple[Tensor | None, dict[Tensor, Tensor] | None]:
        r"""Run the training ``closure`` so that ``p.grad`` holds the gradient of its loss.

        The closure recomputes the loss from the live parameters and returns it; it may call
        ``zero_grad()``/``backward()`` itself (the torch.optim pattern) or not: if it did not, the
        gradients are taken here with ``autograd.grad`` (averaged across ranks) and written to
        ``p.grad``. Without a closure, the gradients already in ``p.grad`` are used.

        With ``create_graph=True`` (second-order methods) the returned dict maps every parameter
        with a gradient to that gradient *with its graph*, from which H·Z is taken; ``p.grad`` holds
        the detached value. Callers must drop the dict when done.

        Returns:
            ``(loss, graph_grads)``: the closure's loss (``None`` without a closure) and, with
            ``create_graph``, the gradients with their graph (``None`` otherwise).
        """
        if closure is None:
            if create_graph:
                raise ValueError(
                    f"{type(self).__name__} needs second-order information: call "
                    "step(closure) with a closure that recomputes and returns the training loss "
                    "(it may call backward() itself)."
                )
            return None, None
        params = self._all_params()
        before = _grad_snapshot(params)
        recorder = _BackwardRecorder() if create_graph else contextlib.nullcontext()
        with torch.enable_grad(), recorder:
            loss = closure()
        called_backward = _grads_changed(before, params)
        if not isinstance(loss, Tensor):
            raise ValueError(f"Invalid closure return value: {loss!r} (expected the loss tensor)")
        if create_graph and called_backward and not recorder.called:  # type: ignore[union-attr]
            raise ValueError(
                f"{type(self).__name__} needs the graph of the training gradient, but the closure "
                "computed gradients without Tensor.backward() (e.g. torch.autograd.backward). "
                "Return the loss from the closure, or call loss.backward() in it."
            )
        graph_grads: dict[Tensor, Tensor] | None = None
        if not called_backward:
            if not loss.requires_grad:
                raise ValueError("Invalid closure return value: the loss does not require grad")
            grads = torch.autograd.grad(loss, params, allow_unused=True, create_graph=create_graph)
            used = [(p, g) for p, g in zip(params, grads) if g is not None]
            reduced = all_reduce_mean([g for _, g in used])
            for (p, _), g in zip(used, reduced):
                p.grad = g.detach()
            if create_graph:
                graph_grads = {p: g for (p, _), g in zip(used, reduced)}
        elif create_graph:
            graph_grads = {}
            for p in params:
                if p.grad is not None:
                    graph_grads[p] = p.grad
                    p.grad = p.grad.detach()
        return loss.detach(), graph_grads

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
