r"""``p.grad`` of every tensor an extra evaluation reaches, owned or not, left as it was.

The optimizer runs the user's closures more often than a ``torch.optim`` optimizer would: the
validation closure once per hyper-update, the training closure twice per finite-difference
column. A closure that calls ``backward()`` accumulates into the ``.grad`` of every leaf its loss
reaches, also leaves of another optimizer (a backbone fine-tuned beside the head this optimizer
trains). :class:`GradIsolation` sets those gradients to ``None`` for the call and puts the very
same tensors back afterwards, so such a leaf ends the step with exactly the gradient a run with
``torch.optim`` would leave (the training closure's own call, nothing else).

Which leaves are reached is found two ways, both before a closure can accumulate into them:

- :class:`ReachedLeaves` remembers the leaves of every loss graph the optimizer has seen (the
  training loss of each step, each validation loss): they are cleared before the call, so a
  closure that calls ``zero_grad()`` on them first is covered too.
- While the closure runs, a thread-local ``TorchFunctionMode`` clears the gradient of any other
  leaf that requires grad when it first enters an operation (the forward pass reads a weight
  before ``backward()`` can write its gradient). Another thread's operations are not seen.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["GradIsolation", "ReachedLeaves"]


class ReachedLeaves:
    """Weak references to the leaves reached by the loss graphs an optimizer has seen.

    Not part of the optimizer's state: it is rebuilt from the next step's graph, so copies and
    pickles start empty.
    """

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref[Tensor]] = {}
        self._pending: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def __deepcopy__(self, memo: dict[int, Any]) -> ReachedLeaves:
        return ReachedLeaves()

    def note(self, loss: Any) -> None:
        """Remember ``loss``'s graph, walked only when an extra evaluation needs it."""
        self._pending = loss.grad_fn if isinstance(loss, Tensor) else None

    def forget_pending(self) -> None:
        """Drop the noted graph (at the end of a step: it must not keep activations alive)."""
        self._pending = None

    def learn(self, loss: Any) -> None:
        """Add the leaves of ``loss``'s graph (nodes stay walkable after ``backward()``)."""
        if isinstance(loss, Tensor):
            self._walk(loss.grad_fn)

    def _walk(self, root: Any) -> None:
        # Twice a step on the validation path: bound methods and no generator halve its cost.
        refs = self._refs
        seen: set[int] = set()
        stack = [root] if root is not None else []
        pop, push, add = stack.pop, stack.append, seen.add
        while stack:
            node = pop()
            if id(node) in seen:
                continue
            add(id(node))
            leaf = getattr(node, "variable", None)
            if isinstance(leaf, Tensor):
                refs[id(leaf)] = weakref.ref(leaf)
            for child, _ in node.next_functions:
                if child is not None:
                    push(child)

    def leaves(self) -> list[Tensor]:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._walk(pending)
        out = []
        for key, ref in list(self._refs.items()):
            leaf = ref()
            if leaf is None:
                del self._refs[key]
            else:
                out.append(leaf)
        return out


class _FirstUse(TorchFunctionMode):
    """Clears a leaf's gradient (saving it) when the leaf first enters an operation."""

    def __init__(self, saved: dict[int, tuple[Tensor, Tensor | None]]) -> None:
        super().__init__()
        self._saved = saved

    def _see(self, values: list[Any] | tuple[Any, ...]) -> None:
        saved = self._saved
        for value in values:
            if isinstance(value, Tensor):
                if value.requires_grad and value.is_leaf and id(value) not in saved:
                    saved[id(value)] = (value, value.grad)
                    value.grad = None
            elif isinstance(value, (list, tuple)):
                self._see(value)

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        self._see(args)
        if kwargs:
            self._see(tuple(kwargs.values()))
        return func(*args, **kwargs)


class GradIsolation:
    """``with GradIsolation(owned, reached) as iso: loss = iso.call(closure)``.

    On entry, the gradient of every owned and every remembered leaf is set to ``None``; during
    :meth:`call`, so is that of any other leaf the closure uses; on exit (also on error) each of
    them gets its original gradient tensor back, and the leaves of the returned loss are
    remembered for the next call.
    """

    def __init__(self, owned: Iterable[Tensor], reached: ReachedLeaves) -> None:
        self._reached = reached
        self._saved: dict[int, tuple[Tensor, Tensor | None]] = {}
        for t in [*owned, *reached.leaves()]:
            if id(t) not in self._saved:
                self._saved[id(t)] = (t, t.grad)

    def __enter__(self) -> GradIsolation:
        for t, _ in self._saved.values():
            t.grad = None
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        with _FirstUse(self._saved):
            out = fn()
        self._reached.learn(out)
        return out

    def __exit__(self, *exc: object) -> None:
        for t, g in self._saved.values():
            t.grad = g
