r"""Keeping BatchNorm's running statistics out of a validation pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch  # noqa: F401  (the example uses it)
from torch import Tensor, nn

__all__ = ["frozen_batchnorm_stats"]


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
