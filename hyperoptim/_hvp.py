r"""Hessian-vector products, batched over tangent columns.

Two routes to :math:`H Z` for a batch of tangents :math:`Z` (leading dimension ``N``):

- :func:`hvp_from_grads`: double backward through the graph of a gradient that was computed with
  ``create_graph=True`` from live ``nn.Parameter``\ s (what a user closure gives). H is symmetric, so
  the vector-Jacobian product of the gradient is H Z; ``is_grads_batched`` batches the columns.
- :func:`grad_and_hvp`: forward-over-reverse, ``jvp(grad(loss))`` for a loss that is a function of
  a parameter dict (``torch.func.functional_call``), giving the gradient and H Z in one pass;
  ``vmap`` batches the columns.

Both average their result across ranks under ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._base import all_reduce_mean

__all__ = ["grad_and_hvp", "hvp_from_grads"]


def hvp_from_grads(grads: Sequence[Tensor], params: Sequence[Tensor], vectors: Sequence[Tensor],
                   *, retain_graph: bool = False) -> list[Tensor]:
    r"""Batched Hessian-vector products :math:`H Z` from gradients that carry their graph.

    Args:
        grads (sequence of Tensor): :math:`\nabla L(w)` computed with ``create_graph=True``; a
            gradient without a graph (the loss is linear in that parameter) contributes nothing.
        params (sequence of Tensor): the parameters :math:`w`, in the same order.
        vectors (sequence of Tensor): :math:`Z`, ``vectors[i]`` of shape ``(N, *params[i].shape)``.
        retain_graph (bool, optional): keep the graph for another product (default: False).

    Returns:
        :math:`H Z` shaped like ``vectors``.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> (g,) = torch.autograd.grad((w ** 3).sum(), w, create_graph=True)
        >>> hvp_from_grads([g], [w], [torch.eye(2)])[0]  # diag(6 w)
        tensor([[ 6.,  0.],
                [ 0., 12.]])
    """
    out = [torch.zeros_like(v) for v in vectors]
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if live and all(vectors[i].shape[0] == 1 for i in live):
        # One column: a plain double backward, without vmap over the autograd engine (its
        # per-call overhead is not worth it for a batch of one).
        single = torch.autograd.grad(
            [grads[i] for i in live], list(params),
            grad_outputs=[vectors[i][0] for i in live],
            allow_unused=True, retain_graph=retain_graph,
        )
        out = [p.unsqueeze(0) if p is not None else o for p, o in zip(single, out)]
    elif live:
        prods = torch.autograd.grad(
            [grads[i] for i in live], list(params),
            grad_outputs=[vectors[i] for i in live],
            is_grads_batched=True, allow_unused=True, retain_graph=retain_graph,
        )
        out = [p if p is not None else o for p, o in zip(prods, out)]
    return all_reduce_mean(out)


def grad_and_hvp(loss_fn: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor],
                 vectors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    r"""Gradient and batched Hessian-vector products of a functional loss, in one pass.

    Args:
        loss_fn (callable): ``params -> scalar loss`` (e.g. a ``functional_call`` of a module);
            pass copies of buffers that the forward pass mutates (train-mode BatchNorm).
        params (dict of Tensor): where to evaluate.
        vectors (dict of Tensor): :math:`Z`, each of shape ``(N, *params[k].shape)``.

    Returns:
        ``(grad, hz)``: :math:`\nabla L(w)` and :math:`H Z` (shaped like ``vectors``).

    Example:
        >>> f = lambda p: (p["w"] ** 3).sum()
        >>> g, hz = grad_and_hvp(f, {"w": torch.tensor([1.0, 2.0])}, {"w": torch.eye(2)})
        >>> g["w"], hz["w"]
        (tensor([ 3., 12.]), tensor([[ 6.,  0.],
                [ 0., 12.]]))
    """
    grad_fn = torch.func.grad(loss_fn)

    def one_column(v: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return torch.func.jvp(grad_fn, (params,), (v,))

    grads, hz = torch.func.vmap(one_column, out_dims=(None, 0))(vectors)
    keys = list(params)
    reduced = all_reduce_mean([grads[k] for k in keys] + [hz[k] for k in keys])
    return dict(zip(keys, reduced[: len(keys)])), dict(zip(keys, reduced[len(keys):]))
