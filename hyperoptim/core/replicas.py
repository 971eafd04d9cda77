r"""At the first step under ``torch.distributed``: every rank holds the same parameters and
hyperparameters, or every rank refuses to step.

A ``DistributedDataParallel`` model is broadcast from rank 0 when it is wrapped; a plain model is
not, and ranks that start from different weights (or hyperparameters) would average gradients
of different models and drift apart without a word. One all-reduce of a checksum per parameter
and per numeric hyperparameter, at the first step only, finds that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .dist import world_size
from .shard import is_sharded

__all__ = ["check_replicas_once"]


def check_replicas_once(optimizer: Any) -> None:
    """:func:`check_replicas` at ``optimizer``'s first step (a no-op in one process)."""
    if optimizer.__dict__.get("_replicas_checked") or world_size() == 1:
        return
    check_replicas(type(optimizer).__name__, optimizer.param_groups)
    optimizer.__dict__["_replicas_checked"] = True


def _checksums(p: Tensor) -> Tensor:
    # The sum and a position-weighted sum: equal weights give equal values, bit for bit, on
    # every rank; a different or permuted tensor almost surely does not.
    flat = p.detach().reshape(-1).double()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    return torch.stack([flat.sum(), torch.dot(flat, weights)])


def _numbers(value: Any) -> list[float] | None:
    if isinstance(value, (bool, int, float)):
        return [float(value)]
    if isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float)) for v in value):
        return [float(v) for v in value]
    return None


def check_replicas(owner: str, param_groups: Sequence[dict[str, Any]]) -> None:
    """Raise the same ``ValueError`` on every rank, naming the first parameter or hyperparameter
    whose value differs between ranks. Two all-reduces (sizes, then checksums)."""
    names: list[str] = []
    parts: list[Tensor] = []
    device = next((p.device for g in param_groups for p in g["params"]), torch.device("cpu"))
    for i, group in enumerate(param_groups):
        for key in sorted(k for k in group if k != "params"):
            numbers = _numbers(group[key])
            if numbers is not None:
                names += [f"param_groups[{i}][{key!r}]"] * len(numbers)
                parts.append(torch.tensor(numbers, dtype=torch.float64, device=device))
        for j, p in enumerate(group["params"]):
            # An FSDP2 shard differs across ranks by design (fully_shard broadcast the whole
            # parameter from rank 0 when it sharded it).
            if p.is_floating_point() and not is_sharded(p):
                names += [f"param_groups[{i}]['params'][{j}] (shape {tuple(p.shape)})"] * 2
                parts.append(_checksums(p).to(device))
    world = world_size()
    size = torch.tensor([len(names), -len(names)], dtype=torch.float64, device=device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    if size[0] != -size[1]:
        raise ValueError(
            f"{owner}: the ranks hold different param groups at the first step ({int(-size[1])} "
            f"to {int(size[0])} checked values across {world} ranks, {len(names)} on this one). "
            "Every rank must build the optimizer over the same parameters with the same options.")
    if not names:
        return
    local = torch.nan_to_num(torch.cat(parts), nan=1e300)
    both = torch.cat([local, -local])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = both[: len(names)], -both[len(names):]
    differ = (high != low).nonzero()
    if differ.numel():
        k = int(differ[0])
        raise ValueError(
            f"{owner}: the ranks disagree at the first step: {names[k]} differs across the "
            f"{world} ranks (checksum on rank {dist.get_rank()}: {float(local[k]):.17g}; lowest "
            f"{float(low[k]):.17g}, highest {float(high[k]):.17g}). Every rank must start from "
            "the same weights and hyperparameters: seed the model identically on every rank or "
            "wrap it in DistributedDataParallel (which broadcasts rank 0's weights), and pass "
            "the same optimizer arguments; otherwise the ranks drift apart.")
