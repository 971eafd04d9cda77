r"""Hessian-vector products, batched over tangent columns, by explicitly chosen routes.

Every second-order method (MARTHE, IFT, FDS and their Adam variants) gets :math:`H Z` for a batch
of tangents :math:`Z` (leading dimension ``N``) from a :class:`SecondOrder`, which the base's
``_training_loss`` returns for the training closure of the step. Two routes, chosen by the
optimizer's ``hvp=`` argument (never by patching ``Tensor.backward``):

- ``"exact"``: double backward through the graph of the training gradient. The base takes that
  gradient itself with ``create_graph=True``, so the closure must *return* the loss without calling
  ``backward()``. :func:`hvp_from_grads` does the product; H is symmetric, so the vector-Jacobian
  product of the gradient is :math:`H Z`, and ``is_grads_batched`` batches the columns.
- ``"finite_difference"``: central differences of gradients along each column,

  .. math::

      H z \approx \frac{\nabla L(w + h z) - \nabla L(w - h z)}{2 h},
      \qquad h = \sqrt{\epsilon}\, \frac{1 + \lVert w \rVert}{\lVert z \rVert},

  with two extra closure calls per non-zero column at perturbed weights (restored bit-for-bit;
  ``p.grad`` too; dropout draws the same masks as in the step's own call, from a thread-local copy
  of the random-number state it started from, so the global generator, which other threads
  share, is not touched: :class:`RngReplay`). :math:`\epsilon` is the machine epsilon of the
  parameters' dtype. The step is the forward-difference one, smaller than the central optimum
  :math:`\epsilon^{1/3}`: with piecewise-linear activations (ReLU) the gradient has kinks, and a
  perturbation that switches an activation makes the quotient jump. Such a crossing shows as
  disagreeing one-sided differences :math:`g_+ - g_0` and :math:`g_0 - g_-` (``g_0`` is the step's
  own gradient, free); the column is then redone with a 10x smaller step, at most twice. Measured
  relative errors against the exact route on small MLPs (``tests/test_hvp.py``): about 1e-8 in
  float64; in float32 about 2e-4 with smooth activations and up to 2e-2 with ReLU, where a kink
  forced a 100x smaller step and float32 rounding grew with it (without the check: 25x off). On
  a larger ReLU network in float32 (784-512-512-10, batch 128, random labels) no step size works:
  kinks dominate large steps and rounding small ones, the products were 20x off, and the check
  fails at every step; the optimizer then warns once (use the exact route or float64) and stops
  retrying. The exact route is the one to prefer wherever the closure can return the loss. It
  needs only first-order gradients, so it works when the closure calls ``backward()`` itself
  (the ``torch.optim`` idiom, Lightning's automatic optimization), under
  ``DistributedDataParallel``'s own gradient hooks, with ``torch.compile``\ d models, and with
  kernels that have no double backward. Also: under ``torch.distributed`` the perturbed gradients
  are averaged as they come, so every rank makes the same retry decision.
  (Forward differences would save one call per column, but cannot see a kink: on a ReLU network
  in float32 they were off by 50x on 2 of 3 seeds here, so they are not offered.)
- ``"auto"`` (the default of every optimizer): ``"exact"`` when the closure returns the loss
  without calling ``backward()``, ``"finite_difference"`` when it calls ``backward()`` itself. The
  choice follows the closure's style alone, so the same loop always gets the same route; the
  optimizer's ``hvp_route`` and ``repr`` show which one ran.

Under ``torch.distributed`` each rank differentiates its own data, and the products (exact) or
the perturbed gradients (finite differences) are averaged after differentiation
(:func:`hyperoptim.core.dist.all_reduce_mean`). Under FSDP2 (``fully_shard``, parameters sharded
as ``DTensor``\ s) only finite differences work (double backward finds no graph to the shards):
each rank perturbs its own shard of the weights along its shard of each column, FSDP2 gathers
the perturbed weights for the extra forward passes and reduce-scatters their gradients, and the
norms behind the step sizes and the kink check are per-shard partial sums completed by one
all-reduce of scalars each (:mod:`hyperoptim.core.shard`); the products come back as this
rank's shards (plain tensors).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from ..core.dist import all_reduce_mean
from ..core.shard import any_sharded, local, sum_across_shards
from ..core.threads import FORWARD_AD_LOCK

__all__ = ["HVP_ROUTES", "SecondOrder", "exact_route_error", "grad_and_hvp", "hvp_from_grads",
           "top_curvature"]

HVP_ROUTES = ("auto", "exact", "finite_difference")
"""The values of every second-order optimizer's ``hvp=`` argument."""


_ROUTE_HINT = (
    "Models compiled with torch.compile and kernels without a double backward (fused/flash "
    "attention) need first-order gradients only: pass hvp='finite_difference' to the optimizer."
)

# What autograd says when a graph cannot be differentiated twice (a compiled graph, an op or
# a custom Function without a double backward): the finite-difference route is the answer.
_NO_DOUBLE_BACKWARD = re.compile(
    r"double backward|not implemented|does not require grad|once_differentiable|differentiate twice"
    r"|create_graph|aot_autograd|torch\.compile", re.IGNORECASE)


def exact_route_error(err: RuntimeError) -> Exception:
    """What to raise for an error in the double backward of the exact route.

    Autograd's refusal to differentiate twice becomes a ``ValueError`` naming the route that
    works (the original chained as its cause). Any other error (``torch.OutOfMemoryError``, an
    error raised by the model's own code) is the original exception, type and traceback kept,
    with the route hint added as a note (Python 3.11+; on 3.10, appended to its message). Raise
    the result with ``raise exact_route_error(err) from err`` in the ``except`` block (an
    exception that is its own cause prints once).
    """
    if _NO_DOUBLE_BACKWARD.search(str(err)):
        return ValueError(
            "the exact Hessian-vector product (double backward through the training gradient) "
            f"failed: {err}. {_ROUTE_HINT}"
        )
    hint = (f"hyperoptim: raised by the exact Hessian-vector product (double backward through "
            f"the training gradient). {_ROUTE_HINT}")
    if hasattr(err, "add_note"):
        if hint not in getattr(err, "__notes__", ()):
            err.add_note(hint)
    elif err.args and isinstance(err.args[0], str) and hint not in err.args[0]:
        err.args = (f"{err.args[0]}\n{hint}", *err.args[1:])  # Python 3.10: no notes
    return err


KINK_RETRIES = 2
"""Central differences retried with a 10x smaller step when the two sides disagree."""

KINK_TOLERANCE = 0.01
"""How far the one-sided differences may disagree, relative to their sum, before a retry."""


def _asymmetric(plus: Sequence[Tensor], minus: Sequence[Tensor], origin: Sequence[Tensor],
                sharded: bool = False) -> Tensor:
    r"""Did the step cross a kink? Compares :math:`g_+ - g_0` with :math:`g_0 - g_-`.

    On a smooth loss the two one-sided differences agree up to :math:`O(h)`; where a ReLU (or any
    piecewise-linear activation) switches inside :math:`[w - hz, w + hz]`, one side jumps and the
    central difference would be off by that jump over :math:`2h`. A 0-d bool tensor, left on the
    device so that the verdicts of every column come back in one host read; ``sharded`` (FSDP2
    shards): the two squared norms summed across ranks, in one all-reduce.
    """
    diff = sum(torch.linalg.vector_norm((a - g) - (g - b)).double() ** 2
               for a, b, g in zip(plus, minus, origin))
    total = sum(torch.linalg.vector_norm(a - b).double() ** 2 for a, b in zip(plus, minus))
    if sharded:
        diff, total = sum_across_shards([torch.as_tensor(diff), torch.as_tensor(total)])
    return torch.as_tensor(diff > (KINK_TOLERANCE ** 2) * total)


class _PrivateCpuGenerator(TorchDispatchMode):
    """Random CPU ops of this thread draw from a private generator instead of the global one.

    Thread-local (a dispatch mode): another thread drawing from the global generator meanwhile
    sees neither a rewound nor an advanced state. Ops that take a ``generator`` argument
    (``bernoulli_`` behind CPU dropout, ``rand``, ``normal_``, ...) get the private one.
    """

    def __init__(self, state: Tensor) -> None:
        super().__init__()
        self._generator = torch.Generator()
        self._generator.set_state(state)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if kwargs.get("generator") is None and _on_cpu(args, kwargs) and any(
                a.name == "generator" for a in func._schema.arguments):
            kwargs["generator"] = self._generator
        return func(*args, **kwargs)


def _on_cpu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    device = kwargs.get("device")
    if device is not None and torch.device(device).type != "cpu":
        return False
    return all(a.device.type == "cpu" for a in args if isinstance(a, Tensor))


class RngReplay:
    """The random-number state around the step's closure call, to replay it for extra calls.

    Only used where the closure drew random numbers (dropout): a deterministic closure runs
    as it is. The replay never touches the global CPU generator: each extra call draws, in its
    own thread, from a private generator started at the state the step's call started from
    (:class:`_PrivateCpuGenerator`), so other threads see no repeated numbers. CUDA generators
    (whose fused dropout takes no generator argument) are replayed in place and left as the
    step's own call left them.
    """

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self._cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
        self.before = self._get()
        self.after: tuple[Tensor, list[Tensor]] | None = None

    def _get(self) -> tuple[Tensor, list[Tensor]]:
        return torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in self._cuda]

    def _set_cuda(self, states: list[Tensor]) -> None:
        for i, s in zip(self._cuda, states):
            torch.cuda.set_rng_state(s, i)

    def mark_after(self) -> None:
        """Record the state the step's own closure call left."""
        after = self._get()
        same = torch.equal(after[0], self.before[0]) and all(
            torch.equal(a, b) for a, b in zip(after[1], self.before[1]))
        self.after = None if same else after

    def replay(self) -> contextlib.AbstractContextManager[Any]:
        """A context in which the closure draws what the step's own call drew."""
        if self.after is None:
            return contextlib.nullcontext()
        self._set_cuda(self.before[1])
        return _PrivateCpuGenerator(self.before[0])

    def restore(self) -> None:
        """Leave the CUDA generators as the step's own closure call left them."""
        if self.after is not None:
            self._set_cuda(self.after[1])


class SecondOrder:
    r""":math:`H Z` for the training loss of one step, by one route (see the module docstring).

    Built by ``HyperOptimizer._training_loss(closure, second_order=True)``; optimizers only call
    :meth:`hvp` (as often as they need: a Neumann series calls it once per term) and
    :meth:`close`.

    Attributes:
        params (list of Tensor): the parameters that received a gradient, in a fixed order;
            :meth:`hvp` takes and returns one tensor per entry.
        route (str): ``"exact"`` or ``"finite_difference"``.
        columns (int): finite-difference columns taken so far (two closure calls each).
        retried (int): of those, the ones redone with a 10x smaller step after a kink.
    """

    def __init__(self, params: list[Tensor], route: str, *,
                 graph_grads: list[Tensor] | None = None,
                 gradient_at: Callable[[], list[Tensor]] | None = None,
                 rng: RngReplay | None = None,
                 kink_check: bool = True,
                 on_rough: Callable[[], None] | None = None,
                 origin_grads: list[Tensor] | None = None) -> None:
        self.params = params
        #: Finite differences taken so far: columns, and columns redone with a smaller step
        #: (a kink); each costs two closure calls.
        self.columns = 0
        self.retried = 0
        self._origin_grads = origin_grads
        self.route = route
        self._graph_grads = graph_grads
        self._gradient_at = gradient_at
        self._rng = rng
        self._kink_check = kink_check
        self._on_rough = on_rough

    def __enter__(self) -> SecondOrder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the gradient's graph (exact route) and the closure (finite differences)."""
        self._graph_grads = None
        self._gradient_at = None

    def hvp(self, vectors: Sequence[Tensor], *, loop: bool = False) -> list[Tensor]:
        r"""Batched :math:`H Z`, averaged across ranks.

        Args:
            vectors (sequence of Tensor): ``vectors[i]`` of shape ``(N, *params[i].shape)``;
                under FSDP2, this rank's shard of each column (``(N, *shard.shape)``, plain or
                a ``DTensor``).
            loop (bool): on the exact route, one double backward per column in a Python loop
                instead of one batched double backward over all columns (``is_grads_batched``).
                Both are exact and agree to rounding; which is cheaper depends on the model and
                the device (:meth:`cheaper_columns` measures it). The finite-difference route
                differentiates column by column either way.

        Returns:
            :math:`H Z`, shaped like ``vectors`` (under FSDP2: this rank's shards, plain).

        Raises:
            ValueError: the exact route could not differentiate twice (``torch.compile``\ d
                models, kernels without a double backward); the message names the
                finite-difference route. Any other error of the double backward
                (``torch.OutOfMemoryError`` included) propagates as itself, with that hint as a
                note.
        """
        if len(vectors) != len(self.params):
            raise ValueError(f"expected {len(self.params)} tangent tensors, got {len(vectors)}")
        if self.route == "exact":
            if self._graph_grads is None:
                raise RuntimeError("SecondOrder.hvp() after close()")
            return all_reduce_mean(self._exact_local(vectors, loop))
        return self._finite_difference(vectors)

    def _exact_local(self, vectors: Sequence[Tensor], loop: bool) -> list[Tensor]:
        """This rank's :math:`H Z` by double backward; an error names the other route."""
        try:
            return _local_hvp(cast(list[Tensor], self._graph_grads), self.params, vectors,
                              retain_graph=True, loop=loop)
        except RuntimeError as err:
            raise exact_route_error(err) from err

    def cheaper_columns(self, vectors: Sequence[Tensor], repeats: int = 2) -> bool:
        r"""Whether the per-column loop computes this :math:`H Z` faster than the batched
        double backward, measured on this rank's data (``True``: the loop).

        Each way runs ``repeats`` times, alternating, and the faster time of each counts (the
        first call of either pays one-off costs). On CUDA the device is synchronised around
        each timing. Under ``torch.distributed`` the times are averaged across ranks first, so
        every rank takes the same route and the averaged products stay in lockstep. Only the
        exact route has the choice (``False`` on the finite-difference route). The products
        computed here are discarded: the caller asks :meth:`hvp` for the one it uses.
        """
        if self.route != "exact" or self._graph_grads is None or not vectors:
            return False
        device = vectors[0].device

        def timed(loop: bool) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            self._exact_local(vectors, loop)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        best = [math.inf, math.inf]
        for _ in range(repeats):
            for way in (0, 1):
                best[way] = min(best[way], timed(bool(way)))
        (mean,) = all_reduce_mean([torch.tensor(best, dtype=torch.float64, device=device)])
        batched, looped = mean.tolist()
        return looped < batched

    def _finite_difference(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        if self._gradient_at is None:
            raise RuntimeError("SecondOrder.hvp() after close()")
        # FSDP2: each rank perturbs its own shard (the storage FSDP2 gathers from) along its
        # shard of each column; norms are completed across the shards.
        sharded = any_sharded(self.params)
        params = [local(p) for p in self.params]
        vectors = [local(v) for v in vectors]
        n = vectors[0].shape[0] if vectors else 0
        out = _zeros_side_by_side(vectors, n)
        if not n:
            return out
        steps = _step_sizes(params, vectors, n, sharded)
        origin = [p.detach().clone() for p in params]
        # The closure's gradient at w (averaged across ranks): the step's own gradient unless
        # the user prepared p.grad before step() (the gradient contract).
        at_origin = [local(g) for g in (self._origin_grads if self._origin_grads is not None
                                        else [p.grad for p in self.params])]
        try:
            self._central_differences(out, origin, vectors, at_origin, steps, sharded)
        finally:
            with torch.no_grad():
                for p, w in zip(params, origin):
                    p.copy_(w)
            if self._rng is not None:
                self._rng.restore()
        return out

    def _central_differences(self, out: list[Tensor], origin: list[Tensor],
                             vectors: Sequence[Tensor], at_origin: Sequence[Tensor],
                             steps: Sequence[float], sharded: bool) -> None:
        """Every column of :math:`H Z` into ``out``; the columns whose one-sided differences
        disagree (a kink) are redone with a 10x smaller step, at most ``KINK_RETRIES`` times.

        Column by column the same steps and verdicts as one column at a time, but the kink
        verdicts of all the columns of a round come back in one host read."""
        pending = [(j, h) for j, h in enumerate(steps) if h != 0.0]
        self.columns += len(pending)
        for retry in range(KINK_RETRIES + 1):
            if retry:
                self.retried += len(pending)
            flags = [self._central_difference(out, origin, vectors, at_origin, j, h, sharded)
                     for j, h in pending]
            if not self._kink_check or not pending:
                return
            verdicts = torch.stack(cast(list[Tensor], flags)).tolist()
            pending = [(j, h * 0.1) for (j, h), rough in zip(pending, verdicts, strict=True)
                       if rough]
            if retry == KINK_RETRIES and self._on_rough is not None:
                for _ in pending:
                    self._on_rough()  # still rough at the smallest step: say so

    def _central_difference(self, out: list[Tensor], origin: list[Tensor],
                            vectors: Sequence[Tensor], at_origin: Sequence[Tensor], j: int,
                            h: float, sharded: bool) -> Tensor | None:
        """Column ``j`` of :math:`H Z` into ``out`` with step ``h``; the kink verdict on the
        device (None without the kink check)."""
        # Averaged as they come (gradient_at), so every rank decides alike.
        plus = self._perturbed(origin, vectors, j, h)
        minus = self._perturbed(origin, vectors, j, -h)
        for o, a, b in zip(out, plus, minus):
            torch.sub(a, b, out=o[j]).div_(2.0 * h)
        return _asymmetric(plus, minus, at_origin, sharded) if self._kink_check else None

    def _perturbed(self, origin: list[Tensor], vectors: Sequence[Tensor], j: int, h: float
                   ) -> list[Tensor]:
        gradient_at = cast(Callable[[], list[Tensor]], self._gradient_at)
        with torch.no_grad():
            for p, w, v in zip(self.params, origin, vectors):
                torch.add(w, v[j], alpha=h, out=local(p))
        if self._rng is None:
            return [local(g) for g in gradient_at()]
        with self._rng.replay():
            return [local(g) for g in gradient_at()]


def top_curvature(product: Callable[[list[Tensor]], list[Tensor]], like: Sequence[Tensor], *,
                  iterations: int, sharded: bool = False) -> float:
    r"""The largest eigenvalue of a symmetric operator (a Hessian) by ``iterations`` steps of
    Lanczos from a fixed random start.

    Lanczos builds the tridiagonal matrix :math:`T_k` of the operator on the Krylov space of the
    start vector; the largest eigenvalue of :math:`T_k` approaches the operator's largest from
    below, fast where it stands apart from the rest (the top of a network's Hessian does). The
    three-term recurrence keeps three vectors, without reorthogonalisation: a loss of
    orthogonality repeats converged eigenvalues but does not move the largest. The recurrence's
    scalars stay on the device: one host read, of the result.

    Args:
        product: maps a vector of unit norm (one tensor per entry of ``like``) to the operator
            times it.
        like (sequence of Tensor): the vector's layout (shapes, dtypes, devices); under FSDP2
            this rank's shards, and ``product`` takes and returns shards.
        iterations (int): the Krylov dimension :math:`k` (``product`` is called k times).
        sharded (bool): the vectors are shards, whose inner products are completed across the
            ranks (one all-reduce of a scalar each).

    Returns:
        float: the largest Ritz value (NaN if a product was not finite). Every rank gets the
        same value where ``product`` averages across ranks.

    Example:
        >>> a = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
        >>> round(top_curvature(lambda v: [a @ v[0]], [torch.zeros(3, dtype=torch.float64)],
        ...                     iterations=3), 6)
        3.0
    """
    gen = torch.Generator().manual_seed(0)
    q = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)
         for t in like]

    def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        partial = torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b)]).sum()
        return sum_across_shards([partial])[0] if sharded else partial

    def scaled(a: Sequence[Tensor], c: Tensor) -> list[Tensor]:
        return [x * c.to(x.dtype) for x in a]

    q = scaled(q, dot(q, q).rsqrt())
    previous: list[Tensor] | None = None
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    alive = [torch.ones((), dtype=torch.bool, device=q[0].device if q else None)]
    for j in range(iterations):
        w = [x.detach().clone() for x in product(q)]
        alpha = dot(w, q)
        alphas.append(alpha)
        if j == iterations - 1:
            break
        for x, y in zip(w, q):
            x.sub_(y * alpha.to(x.dtype))
        if previous is not None:
            for x, y in zip(w, previous):
                x.sub_(y * betas[-1].to(x.dtype))
        beta = dot(w, w).clamp_min(0.0).sqrt()
        # A breakdown (w = 0 up to rounding: the Krylov space is invariant, its Ritz values
        # exact) ends the recurrence; the vectors after it are rounding noise, and their
        # entries of T are masked out below (without a host read to stop the loop).
        scale = torch.stack(alphas).abs().max()
        alive.append(alive[-1] & (beta > 1e-10 * scale))
        betas.append(beta)
        previous, q = q, scaled(w, 1.0 / beta.clamp_min(torch.finfo(torch.float64).tiny))
    keep = torch.stack(alive[: len(alphas)])
    # A masked diagonal entry is the first Rayleigh quotient, never above the largest.
    diagonal = torch.where(keep, torch.stack(alphas), alphas[0])
    t = torch.diag(diagonal)
    if betas:
        off = torch.where(keep[1:], torch.stack(betas), torch.zeros_like(betas[0]))
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    finite = t.isfinite().all()
    top = torch.linalg.eigvalsh(torch.where(finite, t, torch.zeros_like(t))).max()
    return float(torch.where(finite, top, torch.full_like(top, math.nan)))


def _zeros_side_by_side(vectors: Sequence[Tensor], n: int) -> list[Tensor]:
    """Zeros shaped like ``vectors``: for one column, views of one buffer back to back, which a
    rule's flat tangent step (:func:`hyperoptim.rules.rule_tangents`) reads as one vector
    without a copy of its own (under FSDP2 a whole shard, at the step's memory peak)."""
    first = vectors[0] if vectors else None
    if first is None or n != 1 or any(
            v.dtype != first.dtype or v.device != first.device for v in vectors):
        return [torch.zeros_like(v) for v in vectors]
    flat = first.new_zeros(sum(v.numel() for v in vectors))
    return [part.view(v.shape) for part, v in zip(flat.split([v.numel() for v in vectors]),
                                                  vectors, strict=True)]


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
    return all_reduce_mean(_local_hvp(grads, params, vectors, retain_graph=retain_graph))


def _local_hvp(grads: Sequence[Tensor], params: Sequence[Tensor], vectors: Sequence[Tensor],
               *, retain_graph: bool, loop: bool = False) -> list[Tensor]:
    """:func:`hvp_from_grads` on this rank's data alone (no averaging); ``loop``: one double
    backward per column (see :meth:`SecondOrder.hvp`)."""
    out = [torch.zeros_like(v) for v in vectors]
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if not live:
        return out
    n = vectors[live[0]].shape[0]
    if loop and n > 1:
        for j in range(n):
            prods = torch.autograd.grad(
                [grads[i] for i in live], list(params),
                grad_outputs=[vectors[i][j] for i in live], allow_unused=True,
                retain_graph=retain_graph or j < n - 1,
            )
            for o, p in zip(out, prods):
                if p is not None:
                    o[j] = p
        return out
    # One column: a plain double backward, without vmap over the autograd engine (its per-call
    # overhead is not worth it for a batch of one).
    single = all(vectors[i].shape[0] == 1 for i in live)
    prods = torch.autograd.grad(
        [grads[i] for i in live], list(params),
        grad_outputs=[vectors[i][0] if single else vectors[i] for i in live],
        is_grads_batched=not single, allow_unused=True, retain_graph=retain_graph,
    )
    if single:
        prods = tuple(None if p is None else p.unsqueeze(0) for p in prods)
    return [o if p is None else p for p, o in zip(prods, out)]


def _step_sizes(params: Sequence[Tensor], vectors: Sequence[Tensor], n: int,
                sharded: bool = False) -> list[float]:
    r"""Each column's finite-difference step :math:`h_j = \sqrt{\epsilon}\, (1 + \lVert w
    \rVert) / \lVert z_j \rVert` (0 for a zero or non-finite column), with one host sync for
    every norm; ``sharded`` (FSDP2 shards): the squared norms summed across ranks first, in one
    all-reduce."""
    eps = max(torch.finfo(p.dtype).eps for p in params if p.is_floating_point())
    norm = torch.linalg.vector_norm
    norm_w = norm(torch.stack([norm(p.detach()).double() for p in params]))
    norm_z = norm(torch.stack([norm(v.reshape(n, v.numel() // n), dim=1).double()
                               for v in vectors]), dim=0)
    sizes = torch.cat([norm_w.reshape(1), norm_z])
    if sharded:
        sizes = torch.stack(sum_across_shards(list(sizes.square().unbind()))).sqrt()
    norms = sizes.tolist()
    return [math.sqrt(eps) * (1.0 + norms[0]) / s if s > 0 and math.isfinite(s) else 0.0
            for s in norms[1:]]


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

    with FORWARD_AD_LOCK:  # forward-AD levels are process-wide: one thread at a time
        grads, hz = torch.func.vmap(one_column, out_dims=(None, 0))(vectors)
    keys = list(params)
    reduced = all_reduce_mean([grads[k] for k in keys] + [hz[k] for k in keys])
    return dict(zip(keys, reduced[: len(keys)])), dict(zip(keys, reduced[len(keys):]))
