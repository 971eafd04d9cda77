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

__all__ = ["all_reduce_mean", "check_supported_parameters", "world_size"]


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


def _is_sharded(p: Tensor) -> bool:
    # FSDP2 (fully_shard) turns parameters into DTensors; FSDP1 flattens them into FlatParameters.
    name = type(p).__name__
    return name in ("DTensor", "FlatParameter") or hasattr(p, "_local_tensor")


def check_supported_parameters(owner: str, params: Iterable[Tensor]) -> None:
    """Refuse parameters sharded by FSDP with an error that says what is supported.

    A hyperoptim optimizer takes inner products and Hessian-vector products over whole
    parameters and steps them in place; sharded parameters would need every one of those to be
    sharding-aware. DistributedDataParallel (replicated parameters) is supported.
    """
    if any(_is_sharded(p) for p in params):
        raise ValueError(
            f"{owner} does not support FSDP (fully_shard / FullyShardedDataParallel): its "
            "parameters are sharded. Wrap the model in torch.nn.parallel.DistributedDataParallel "
            "(supported: gradients and Hessian-vector products are averaged across ranks), or "
            "train it in one process."
        )
