r"""Distributed data parallelism, written once (docs/design.md §8).

Every vector an optimizer obtains itself (training and validation gradients, Hessian-vector
products) is linear in the data, so N ranks that each hold 1/N of the batch recover the
one-process value by averaging it *after* it has been differentiated locally. c10d collectives
return tensors without a graph: a tensor that is still to be differentiated is never reduced.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_mean", "check_supported_parameters", "ddp_synced_ids", "world_size"]


def world_size() -> int:
    """The number of ranks (1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_mean(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Average tensors across ranks; a no-op (the same tensors) with one rank.

    One flat collective per dtype. The inputs must not need differentiating afterwards: the
    result carries no graph.

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
        dist.all_reduce(flat)
        flat.div_(world)
        for i, chunk in zip(index, flat.split([tensors[i].numel() for i in index])):
            out[i] = chunk.view_as(tensors[i])
    return out


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
    that pass ``fsdp2=True`` (the hypergradient-descent family), whose inner products are sums of
    per-shard partial sums (:mod:`hyperoptim.core.shard`). The others take Hessian-vector
    products and tangents over whole parameters and refuse it. FSDP1 (``FullyShardedDataParallel``,
    flat parameters) is refused by every class: FSDP2 is the way. DistributedDataParallel
    (replicated parameters) is supported by all.
    """
    from .shard import check_fsdp2_parameters, is_sharded

    params = list(params)
    # torch's FlatParameter(...) returns an nn.Parameter marked _is_flat_param (its metaclass's
    # isinstance check reads the mark): the type's name is Parameter.
    if any(getattr(p, "_is_flat_param", False) for p in params):
        raise ValueError(
            f"{owner} does not support FSDP1 (FullyShardedDataParallel): its flat parameters "
            "concatenate many tensors and pad them. Shard the model with FSDP2 instead "
            "(torch.distributed.fsdp.fully_shard, supported by HypergradSGD, HypergradAdam and "
            "HypergradAdamW), or wrap it in torch.nn.parallel.DistributedDataParallel."
        )
    if any(is_sharded(p) for p in params):
        if not fsdp2:
            raise ValueError(
                f"{owner} does not support FSDP2 (fully_shard) yet: it takes Hessian-vector "
                "products and tangents over whole parameters. HypergradSGD, HypergradAdam and "
                "HypergradAdamW support FSDP2; or wrap the model in "
                "torch.nn.parallel.DistributedDataParallel (supported by every class)."
            )
        check_fsdp2_parameters(owner, params)
