r"""The gradient contract: which gradient a step uses (README, "The gradient contract").

The gradient a step uses is what ``p.grad`` holds when ``step()`` is called, as in
``torch.optim``: accumulation, ``clip_grad_norm_``, a GradScaler's unscaling and DDP's averaging
all apply to it. A closure that returns the loss (without calling ``backward()``) is differentiated
by the optimizer itself; what it gives is used as the step's gradient only where the user
prepared none. The gradients each step used (whoever wrote them: the optimizer, the closure's
``backward()``, the user before ``step()``) are remembered (tensor and version counter), so that
at the next ``step(closure)`` they are told apart from gradients prepared since: one left exactly
as it was is stale, and is dropped rather than stepped again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["GradLedger"]


class GradLedger:
    """The gradients the latest step used, to tell them from gradients prepared since.

    Attributes:
        written (list of tuple): ``(param, grad, version)`` for every ``p.grad`` the latest step
            used (``grad._version`` when it was used).
    """

    def __init__(self) -> None:
        self.written: list[tuple[Tensor, Tensor, int]] = []

    def remember(self, params: Iterable[Tensor]) -> None:
        """Record the current ``p.grad`` of ``params`` as used by this step."""
        self.written = [(p, p.grad, p.grad._version) for p in params if p.grad is not None]

    def drop_stale(self) -> None:
        """Set ``p.grad = None`` where it still holds, unchanged, what the latest step used.

        Such a gradient belongs to an earlier step's batch; stepping it again would move a
        parameter that gets no gradient now (momentum and weight decay included), which neither
        ``torch.optim`` nor the ``backward()`` closure style does.
        """
        for p, g, version in self.written:
            if p.grad is g and g._version == version:
                p.grad = None
        self.written = []

    @staticmethod
    def prepared(params: Sequence[Tensor]) -> list[Tensor]:
        """The parameters whose ``p.grad`` the user prepared before ``step()`` (call after
        :meth:`drop_stale`): an empty list where there is none or every entry is exactly 0 (as
        ``zero_grad(set_to_none=False)`` leaves them; the closure's gradient is then used)."""
        have = [p for p in params if p.grad is not None]
        if not have:
            return []
        if not bool(torch.stack([p.grad.ne(0).any().to("cpu") for p in have]).any()):
            return []
        return have
