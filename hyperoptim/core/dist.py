r"""Distributed data parallelism, written once (docs/design.md §8).

Every vector an optimizer obtains itself (training and validation gradients, Hessian-vector
products) is linear in the data, so N ranks that each hold 1/N of the batch recover the
one-process value by averaging it *after* it has been differentiated locally. c10d collectives
return tensors without a graph: a tensor that is still to be differentiated is never reduced.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["AGREEMENT_TIMEOUT", "FSDP2_CLASSES", "RankFailedError", "all_reduce_mean", "all_reduce_sum",
           "check_supported_parameters", "ddp_synced_ids", "settle", "uneven_batches", "verdict",
           "world_size"]

AGREEMENT_TIMEOUT = 300.0
"""Seconds a rank waits, by default, for the others at a collective that carries the step's
agreement (docs/design.md §8) before it gives up on them (``optimizer.agreement_timeout``)."""

FSDP2_CLASSES = ("HypergradSGD, HypergradAdam, HypergradAdamW, MartheSGD, MartheAdam, MartheAdamW, "
                 "FDSSGD, FDSAdam, FDSAdamW, IFTOptimizer, IFTAdam and IFTAdamW")
"""The classes that support FSDP2 (``fully_shard``), as the refusals name them."""

_CAUSE_CHARS = 300  # of each failing rank's "Type: message", shared on the failure path only


def world_size() -> int:
    """The number of ranks (1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_mean(tensors: Sequence[Tensor], *, timeout: float | None = None) -> list[Tensor]:
    """Average tensors across ranks; a no-op (the same tensors) with one rank.

    One flat collective per dtype. The inputs must not need differentiating afterwards: the
    result carries no graph. With ``timeout`` (seconds), a rank that waits longer than that for
    the others raises ``RuntimeError`` instead of waiting for the process group's timeout.

    Example:
        >>> t = [torch.ones(2)]
        >>> all_reduce_mean(t)[0] is t[0]  # no process group: nothing to average
        True
    """
    tensors = list(tensors)
    world = world_size()
    if not tensors or world == 1:
        return tensors
    out: list[Tensor] = list(tensors)
    kinds: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):  # one collective per dtype: a cat would promote
        kinds.setdefault((t.dtype, t.device), []).append(i)
    for index in kinds.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in index])
        _all_reduce(flat, timeout)
        flat.div_(world)
        for i, chunk in zip(index, flat.split([tensors[i].numel() for i in index])):
            out[i] = chunk.view_as(tensors[i])
    return out


def all_reduce_sum(flat: Tensor, *, timeout: float | None = None) -> None:
    """Sum ``flat`` across ranks in place (one collective), waiting at most ``timeout`` seconds
    for the others if given (then ``RuntimeError``, as :func:`all_reduce_mean`)."""
    _all_reduce(flat, timeout)


def _all_reduce(flat: Tensor, timeout: float | None) -> None:
    """``dist.all_reduce(flat)`` (a sum), waiting at most ``timeout`` seconds if given."""
    if timeout is None:
        dist.all_reduce(flat)
        return
    work = dist.all_reduce(flat, async_op=True)
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as err:
        raise RuntimeError(
            f"rank {dist.get_rank()}: the other ranks did not reach this step's collective within "
            f"{timeout:g} s (a rank died, hangs, or is stuck in another collective); the process "
            "group can no longer be trusted: destroy it and restart from a checkpoint (raise "
            "optimizer.agreement_timeout if a rank is merely that slow)") from err


# ---------------------------------------------------------------- the step's agreement (§8)
class RankFailedError(RuntimeError):
    """Raised on every rank whose own part of a step went fine when the step failed on another
    rank: no rank committed anything, so ``step()`` called again on every rank retries it."""


def verdict(failure: BaseException | None, like: Tensor | None, device: torch.device,
            batch: int | None = None) -> Tensor:
    """This rank's slot in a collective that carries the step's agreement: 1 if its step failed
    so far, else 0.

    With ``like`` (the first tensor of the collective it rides in) it is one element of that
    tensor's dtype and device, so it joins that collective at no cost; without, it is a float64
    ``[failed, n, n*n]`` of its own (``n``: the local batch size the user declared, 0 if none),
    which also shows whether the ranks' batches differ (:func:`uneven_batches`).
    """
    failed = 0.0 if failure is None else 1.0
    if like is not None:
        return torch.full((1,), failed, dtype=like.dtype, device=like.device)
    n = float(batch or 0)
    return torch.tensor([failed, n, n * n], dtype=torch.float64, device=device)


def settle(owner: str, slot: Tensor, failure: BaseException | None, *,
           timeout: float | None) -> list[float]:
    """After the collective: ``slot`` (a :func:`verdict`) averaged over the ranks. If any rank
    failed, every rank raises here, at the same collective: the failing ranks their own
    exception (with a note), the others :class:`RankFailedError` naming each failing rank and its
    cause (one more collective, on this path only). Else returns the averaged slot's values.
    """
    values = slot.tolist()
    if values[0] == 0.0:
        return values
    world, rank = dist.get_world_size(), dist.get_rank()
    causes = torch.zeros(world, _CAUSE_CHARS + 1, dtype=torch.int32, device=slot.device)
    if failure is not None:
        text = f"{type(failure).__name__}: {failure}"[:_CAUSE_CHARS]
        causes[rank, 0] = 1
        causes[rank, 1:1 + len(text)] = torch.tensor([ord(c) for c in text], dtype=torch.int32)
    _all_reduce(causes, timeout)
    failed = {r: "".join(chr(c) for c in row[1:] if c) for r, row in enumerate(causes.tolist())
              if row[0]}
    which = ", ".join(f"rank {r} ({cause})" for r, cause in failed.items())
    if failure is not None:
        if hasattr(failure, "add_note"):  # Python 3.11+
            failure.add_note(
                f"{owner}: the step failed on {which} of {world}; every rank raises at the same "
                "point (the others RankFailedError) and none committed it: call step() again "
                "on every rank to retry.")
        raise failure
    raise RankFailedError(
        f"{owner}: the step failed on {which} of {world} ranks; this rank (rank {rank}) raises "
        "too, at the same point, and no rank committed the step. Fix the failing rank's cause "
        "and call step() again on every rank to retry.")


def uneven_batches(values: Sequence[float], world: int) -> float | None:
    """From a standalone :func:`verdict` averaged over ``world`` ranks: the mean of the local
    batch sizes the ranks declared if they differ, else ``None`` (also when none declared)."""
    total, squares = round(values[1] * world), round(values[2] * world)
    if total == 0 or world * squares == total * total:  # Cauchy-Schwarz: equal iff all equal
        return None
    return total / world


def ddp_synced_ids(owner: str, model: object, params: Iterable[Tensor]) -> frozenset[int]:
    """The ids of ``params`` whose gradients ``model``'s hooks average when ``backward()`` runs.

    ``model`` must be a ``DistributedDataParallel`` over the default process group (the one the
    optimizer averages over); parameters that DDP ignores (``_ddp_params_and_buffers_to_ignore``)
    are not among them, so the optimizer keeps averaging those itself.

    Raises:
        ValueError: ``model`` is not a ``DistributedDataParallel``, averages over another group,
            or holds none of ``params``.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        raise ValueError(f"{owner}.declare_ddp: expected the DistributedDataParallel model, got "
                         f"{type(model).__name__}")
    group_size = dist.get_world_size(model.process_group)
    if group_size != world_size():
        raise ValueError(
            f"{owner}.declare_ddp: the model's DDP averages over a process group of {group_size} "
            f"ranks, the optimizer over the default group of {world_size()}: give DDP the default "
            "group."
        )
    theirs = {id(p) for p in model.module.parameters()
              if p.requires_grad and not getattr(p, "_ddp_ignored", False)}
    synced = frozenset(id(p) for p in params if id(p) in theirs)
    if not synced:
        raise ValueError(f"{owner}.declare_ddp: none of the optimizer's parameters belong to the "
                         "model (pass the model whose parameters the optimizer trains)")
    return synced


def check_supported_parameters(owner: str, params: Iterable[Tensor], *, fsdp2: bool = False) -> None:
    """Refuse parameters sharded by FSDP with an error that says what is supported.

    FSDP2 (``fully_shard``: ``DTensor`` parameters sharded on dim 0) is supported by the classes
    that pass ``fsdp2=True`` (:data:`FSDP2_CLASSES`: every public class; the second-order ones
    on the finite-difference HVP route), whose inner products are sums of per-shard partial sums
    (:mod:`hyperoptim.core.shard`). A subclass that does not declare it refuses it. FSDP1
    (``FullyShardedDataParallel``, flat parameters) is refused by every class: FSDP2 is the way.
    DistributedDataParallel (replicated parameters) is supported by all.
    """
    from .shard import any_sharded, check_fsdp2_parameters

    params = list(params)
    # torch's FlatParameter(...) returns an nn.Parameter marked _is_flat_param (its metaclass's
    # isinstance check reads the mark): the type's name is Parameter.
    if any(getattr(p, "_is_flat_param", False) for p in params):
        raise ValueError(
            f"{owner} does not support FSDP1 (FullyShardedDataParallel): its flat parameters "
            "concatenate many tensors and pad them. Shard the model with FSDP2 instead "
            f"(torch.distributed.fsdp.fully_shard, supported by {FSDP2_CLASSES}), or wrap it in "
            "torch.nn.parallel.DistributedDataParallel."
        )
    if any_sharded(params):
        if not fsdp2:
            raise ValueError(
                f"{owner} does not support FSDP2 (fully_shard): it does not declare "
                "(_supports_fsdp2) that its reductions over parameters are taken as per-shard "
                "partial sums. "
                f"{FSDP2_CLASSES} support FSDP2; or wrap the model in "
                "torch.nn.parallel.DistributedDataParallel (supported by every class)."
            )
        check_fsdp2_parameters(owner, params)
