r"""FSDP2 (``fully_shard``) parameters, written once (README, "Distributed training").

Under FSDP2 every parameter is a ``DTensor`` sharded on dim 0 over a 1-D device mesh, and a
``backward()`` leaves in ``p.grad`` this rank's shard of the gradient already averaged across
ranks (FSDP2's reduce-scatter). Elementwise work (the update rules, their state) then runs on the
DTensors as it is, with no communication. A reduction over a whole parameter is a sum of
per-shard partial sums: each rank takes its local part (``to_local()``) and one all-reduce of a
few scalars completes them. Nothing here gathers a parameter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from itertools import repeat
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .dist import world_size

__all__ = ["any_nonzero", "any_sharded", "check_fsdp2_parameters", "check_sharded_closure",
           "check_sharded_hvp", "complete_sums", "is_sharded", "local", "local_parameters",
           "local_state", "local_states", "reshard_state", "sum_across_shards", "sums_and_norms",
           "tensor_norms"]


# DTensor, imported at the first is_sharded call (the import takes seconds), None without
# torch.distributed; _UNKNOWN until then. is_sharded runs dozens of times per step: a cached class
# costs an isinstance, an import statement a microsecond.
_UNKNOWN: Any = object()
_dtensor: type | None = _UNKNOWN


def _dtensor_type() -> type | None:
    global _dtensor
    if _dtensor is _UNKNOWN:
        if dist.is_available():
            from torch.distributed.tensor import DTensor

            _dtensor = DTensor
        else:
            _dtensor = None
    return _dtensor


def is_sharded(p: Tensor) -> bool:
    """Is ``p`` an FSDP2 parameter (or its gradient, or state kept beside it): a ``DTensor``?"""
    cls = _dtensor if _dtensor is not _UNKNOWN else _dtensor_type()
    return cls is not None and isinstance(p, cls)


def any_sharded(tensors: Iterable[Tensor]) -> bool:
    """Is any of ``tensors`` sharded (:func:`is_sharded`)? One call for a whole list."""
    cls = _dtensor if _dtensor is not _UNKNOWN else _dtensor_type()
    return cls is not None and any(map(isinstance, tensors, repeat(cls)))


def local(t: Tensor) -> Tensor:
    """This rank's shard of ``t`` (``t`` itself unless it is a ``DTensor``); shares its storage."""
    # is_sharded inlined: this runs for every parameter, gradient and tangent of a step.
    cls = _dtensor if _dtensor is not _UNKNOWN else _dtensor_type()
    return t.to_local() if cls is not None and isinstance(t, cls) else t  # type: ignore[attr-defined]


def local_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (a ``state[p]`` dict) with every ``DTensor`` value replaced, in place, by its
    local shard (shared storage); undone by :func:`reshard_state`."""
    cls = _dtensor if _dtensor is not _UNKNOWN else _dtensor_type()
    if cls is None:
        return state
    for key, value in state.items():
        if isinstance(value, cls):
            state[key] = value.to_local()
    return state


@contextlib.contextmanager
def local_states(state: MutableMapping[Tensor, dict[str, Any]], params: Sequence[Tensor]
                 ) -> Iterator[None]:
    """While inside, each parameter's ``state[p]`` holds local shards (:func:`local_state`);
    afterwards, also on error, the FSDP2 parameters' state is sharded again
    (:func:`reshard_state`). Nothing changes for plain parameters."""
    try:
        for p in params:
            local_state(state[p])
        yield
    finally:
        if any_sharded(params):
            for p in params:
                if is_sharded(p):
                    reshard_state(state[p], p)


def complete_sums(flat: Tensor, sharded: bool) -> Tensor:
    """``flat`` (float64: per-shard partial sums, then this rank's mean of something last)
    completed across ranks when ``sharded``: the sums summed, the last entry averaged, in one
    all-reduce; ``flat`` itself otherwise."""
    if not sharded:
        return flat
    done = torch.stack(sum_across_shards(list(flat.unbind())))
    done[-1] /= world_size()
    return done


def reshard_state(state: dict[str, Any], p: Tensor) -> None:
    """Wrap, in place, every plain tensor of ``state`` that holds this rank's shard of a tensor
    laid out like the FSDP2 parameter ``p`` (its local shape, after any leading dimensions: a
    tangent's columns) as a ``DTensor`` sharded like ``p`` on the dimension after the leading
    ones, so that torch.distributed.checkpoint saves and reshards it (torch.optim's own state
    under FSDP2 is such DTensors). Scalars (Adam's ``step``) stay plain, as torch keeps them."""
    from torch.distributed.tensor import DTensor, Shard

    shard = local(p)
    for key, value in state.items():
        if not isinstance(value, Tensor) or is_sharded(value):
            continue
        lead = value.dim() - shard.dim()
        if shard.dim() == 0 or lead < 0 or value.shape[lead:] != shard.shape:
            continue
        shape = (*value.shape[:lead], *p.shape)
        state[key] = DTensor.from_local(value, p.device_mesh,  # type: ignore[attr-defined]
                                        [Shard(lead)], run_check=False, shape=torch.Size(shape),
                                        stride=torch.empty(shape, device="meta").stride())


@contextlib.contextmanager
def local_parameters(state: MutableMapping[Tensor, dict[str, Any]], params: Sequence[Tensor],
                     *keyed: MutableMapping[Tensor, Any]) -> Iterator[list[Tensor]]:
    """Per-parameter code written for plain tensors, run on this rank's FSDP2 shards.

    Yields one tensor per parameter: the parameter itself if it is plain, else a new view of its
    local shard (the storage FSDP2 gathers from, so in-place updates reach the parameter) with
    ``.grad`` the local shard of its gradient. While inside, ``state`` (the optimizer's) and
    each dict in ``keyed`` hold a sharded parameter's entry under its view, with the state's
    ``DTensor`` values as local shards (:func:`local_state`); afterwards, also on error, the
    entries are back under the parameters and the state sharded again (:func:`reshard_state`).
    """
    views = []
    moved: list[tuple[Tensor, Tensor]] = []
    try:
        for p in params:
            if not is_sharded(p):
                views.append(p)
                continue
            shard = local(p)
            view = shard.view_as(shard)  # our own tensor object, sharing the shard's storage
            if p.grad is not None:
                view.grad = local(p.grad)
            moved.append((p, view))
            views.append(view)
            if p in state:
                state[view] = local_state(state.pop(p))
            for d in keyed:
                if p in d:
                    d[view] = d.pop(p)
        yield views
    finally:
        _move_back(state, moved, keyed)


def _move_back(state: MutableMapping[Tensor, dict[str, Any]], moved: list[tuple[Tensor, Tensor]],
               keyed: Sequence[MutableMapping[Tensor, Any]]) -> None:
    """:func:`local_parameters`' exit: each entry back under its parameter, sharded again."""
    for p, view in moved:
        view.grad = None
        if view in state:
            state[p] = state.pop(view)
            reshard_state(state[p], p)
        for d in keyed:
            if view in d:
                d[p] = d.pop(view)


def check_sharded_hvp(owner: str, hvp: str, params: Iterable[Tensor]) -> None:
    """``ValueError`` for ``hvp="exact"`` over FSDP2 parameters: double backward finds no graph
    to them (FSDP2 frees the unsharded parameters, the graph's leaves, after the forward)."""
    if hvp == "exact" and any_sharded(params):
        raise ValueError(
            f"{owner}(hvp='exact') does not support FSDP2 (fully_shard): the exact route "
            "differentiates the training gradient a second time, and under FSDP2 that gradient "
            "has no graph to the sharded parameters (its leaves are the unsharded parameters "
            "FSDP2 frees after the forward). Pass hvp='finite_difference' (or the default "
            "'auto'): two extra first-order gradient evaluations per tangent column."
        )


def check_fsdp2_parameters(owner: str, params: Iterable[Tensor]) -> None:
    """``ValueError`` unless ``params`` are all plain tensors, or all DTensors sharded as FSDP2
    shards them: dim 0 over a 1-D mesh of all ranks (the default group, which the optimizer
    averages over)."""
    from torch.distributed.tensor import Shard

    params = list(params)
    sharded = [is_sharded(p) for p in params]
    if any(sharded) and not all(sharded):
        raise ValueError(
            f"{owner} got both FSDP2 (DTensor) and plain parameters: apply fully_shard to the "
            "root module too, so that every parameter the optimizer trains is sharded."
        )
    for p in params:
        if not is_sharded(p):
            continue
        mesh, placements = p.device_mesh, tuple(p.placements)  # type: ignore[attr-defined]
        if mesh.ndim != 1 or placements != (Shard(0),) or mesh.size() != world_size():
            raise ValueError(
                f"{owner} supports DTensor parameters as fully_shard (FSDP2) makes them: sharded "
                f"on dim 0 over a 1-D mesh of all {world_size()} ranks; got placements "
                f"{placements} over a mesh of shape {tuple(mesh.shape)} (HSDP and tensor "
                "parallelism are not supported)."
            )


def check_sharded_closure(owner: str, params: Sequence[Tensor], called_backward: bool,
                          name: str) -> None:
    """``ValueError`` for a closure that returned an FSDP2 model's loss without ``backward()``."""
    if not called_backward and any_sharded(params):
        raise ValueError(
            f"{owner} under FSDP2 (fully_shard) takes gradients from backward(), whose hooks "
            f"reduce-scatter them into the shards: the {name} must call zero_grad() and "
            "backward() itself (the torch.optim idiom), not only return the loss."
        )


def sum_across_shards(partials: Sequence[Tensor]) -> list[Tensor]:
    """Complete per-shard partial sums (0-d tensors) with one all-reduce; float64 results.

    Example:
        >>> sum_across_shards([torch.tensor(2.0)])  # one process: nothing to add
        [tensor(2., dtype=torch.float64)]
    """
    if not partials:
        return []
    flat = torch.stack([t.detach().double().reshape(()) for t in partials])
    if world_size() > 1:
        dist.all_reduce(flat)
    return list(flat.unbind())


def tensor_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The 2-norm of each whole tensor: ``torch._foreach_norm``, or for ``DTensor`` shards the
    square root of their squared local norms summed across ranks (one all-reduce)."""
    if not any_sharded(tensors):
        return list(torch._foreach_norm(list(tensors))) if tensors else []
    return sums_and_norms([], tensors)[1]


def sums_and_norms(partials: Sequence[Tensor], tensors: Sequence[Tensor],
                   reduce: Callable[[Sequence[Tensor]], list[Tensor]] = sum_across_shards
                   ) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`sum_across_shards` of ``partials`` and the 2-norms of the sharded ``tensors``, in
    one all-reduce (float64); ``reduce`` takes that all-reduce (an optimizer's, which may carry
    the step's verdict in it)."""
    local_norms = torch._foreach_norm([local(t) for t in tensors]) if tensors else []
    done = reduce(list(partials) + [n.double().square() for n in local_norms])
    return done[:len(partials)], [s.sqrt() for s in done[len(partials):]]


def any_nonzero(tensors: Sequence[Tensor]) -> bool:
    """Is any element of any tensor nonzero, on any rank's shard (the same answer everywhere)?"""
    if not tensors:
        return False
    flag = torch.stack([local(t).ne(0).any() for t in tensors]).any().double()
    if any_sharded(tensors):
        flag = sum_across_shards([flag])[0]
    return bool(flag > 0)
