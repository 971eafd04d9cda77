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
- While the closure runs *watched*, a thread-local ``TorchFunctionMode`` clears the gradient of
  any other leaf that requires grad when it first enters an operation (the forward pass reads a
  weight before ``backward()`` can write its gradient). Another thread's operations are not seen.

The watch is the costly part: any Python ``TorchFunctionMode`` costs about 10 us per operation it
intercepts and more in a backward under it, a tenth of a small MLP's validation step; the rest
(clearing, restoring, a walk of the step's training graph and one of the returned graph) is a
few tens of microseconds. So a kind of closure
(``"val_closure"``, ``"closure"``) runs watched only until one watched call finds nothing beyond
the leaves already known (and returns a graph that can be checked); from then on its calls run
unwatched, and the walk of each call's returned graph, which :meth:`ReachedLeaves.learn` does
anyway, checks that they still reach no leaf beyond the known ones:

- A leaf the closure uses outside the graph it returns (an auxiliary loss it backpropagates, a
  weight read under ``no_grad``) is never known, so its closure is found by the watch at every
  call and never runs unwatched.
- A dynamic graph that reaches a new leaf in an unwatched call may have accumulated into that
  leaf's ``.grad``: if the leaf holds a gradient after the call, a ``HyperoptimWarning`` says so
  (once), and every later call of that optimizer runs watched. An unwatched call whose return
  value has no graph to walk (``loss.detach()``, ``loss.item()``) cannot be checked: every later
  call runs watched too.
- A kind of closure whose calls never called ``backward()`` (it returns the loss, and the
  optimizer takes its gradient with ``torch.autograd.grad``, which writes no ``.grad``) cannot
  accumulate into any leaf: once settled, its calls walk no graph at all (a walk of a fresh graph
  costs about 1 us a node, most of the isolation's cost on a small model); the known leaves are
  still cleared. The first such call that does call ``backward()`` (a cleared gradient is found
  written after it) walks the step's training graph and its own graph as above, and every later
  call of that kind walks both: only a leaf new in that step's training graph (not known yet)
  was not cleared before that one call, and is warned about as above if its graph reached it.
- Not caught: a closure that, after running unwatched, starts backpropagating through a new leaf
  outside the graph it returns (for which it would have to be watched at every call).

Known leaves stay known while they live (weak references), so the set of cleared leaves only
grows; copies and pickles start empty, and watch again.

A cheaper watch would not remove the cost: a mode that passes every operation straight through
cost about 60% of this one on a small MLP's validation call (the dispatch into Python per
operation is the cost), and one that acted only on ``Tensor.backward`` would miss
``torch.autograd.backward``, which does not dispatch to ``__torch_function__``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode

from .warn import warn

__all__ = ["GradIsolation", "ReachedLeaves"]


def _graph_leaves(root: Any) -> list[Tensor]:
    """The leaves (``AccumulateGrad`` nodes' tensors) of the graph under autograd node ``root``."""
    # Twice a step where an extra closure runs, so kept to a few builtin calls per node: the
    # stack holds next_functions' (node, input) pairs as they come (one extend per node), and
    # ``seen`` holds the nodes themselves (hashed by identity), which also keeps their Python
    # objects alive: one that died could hand its id to another node.
    seen: set[Any] = set()
    stack: list[tuple[Any, int]] = [(root, 0)]
    pop, extend, add = stack.pop, stack.extend, seen.add
    leaves: list[Tensor] = []
    while stack:
        node, _ = pop()
        if node is None or node in seen:
            continue
        add(node)
        children = node.next_functions
        if children:
            extend(children)
        else:  # AccumulateGrad has no inputs (so do a few nodes without .variable)
            leaf = getattr(node, "variable", None)
            if leaf is not None:
                leaves.append(leaf)
    return leaves


class ReachedLeaves:
    """Weak references to the leaves reached by the loss graphs an optimizer has seen, and which
    kinds of closure need not be watched (see the module).

    Not part of the optimizer's state: it is rebuilt from the next step's graph, so copies and
    pickles start empty.
    """

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref[Tensor]] = {}
        self._pending: Any = None
        # others(): the known leaves outside the owned ones, for the owned ids it was asked for
        # (None: to be recomputed, as after any change of _refs).
        self._others: tuple[tuple[int, ...], list[weakref.ref[Tensor]]] | None = None
        self._settled: set[str] = set()  # closure kinds that run unwatched
        # Closure kinds seen calling backward(): only their calls can accumulate into a leaf.
        self._accumulating: set[str] = set()
        self._always_watch = False  # an unwatched call could not be vouched for

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

    def learn(self, loss: Any) -> list[Tensor] | None:
        """Add the leaves of ``loss``'s graph (nodes stay walkable after ``backward()``).

        Returns:
            Those leaves, or ``None`` when ``loss`` has no graph to walk.
        """
        root = loss.grad_fn if isinstance(loss, Tensor) else None
        return None if root is None else self._add(_graph_leaves(root))

    def _add(self, leaves: list[Tensor]) -> list[Tensor]:
        refs = self._refs
        for leaf in leaves:
            refs[id(leaf)] = weakref.ref(leaf)
        self._others = None
        return leaves

    def learn_pending(self) -> None:
        """Add the leaves of the graph :meth:`note` remembered (if not walked yet)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._add(_graph_leaves(pending))

    def leaves(self, *, walk: bool = True) -> list[Tensor]:
        """The known leaves that are alive; with ``walk``, the noted graph's leaves first added."""
        if walk:
            self.learn_pending()
        out = []
        for key, ref in list(self._refs.items()):
            leaf = ref()
            if leaf is None:
                del self._refs[key]
                self._others = None
            else:
                out.append(leaf)
        return out

    def others(self, owned: list[Tensor]) -> list[Tensor]:
        """The known leaves that are alive and not among ``owned``, without walking a graph.

        Kept between calls while neither the known leaves nor ``owned`` change (a settled call
        that walks nothing asks this at every step, and mostly gets an empty list: the optimizer
        owns every leaf its closures reach)."""
        key = tuple(map(id, owned))
        if self._others is None or self._others[0] != key:
            mine = set(key)
            self._others = key, [ref for k, ref in self._refs.items() if k not in mine]
        out = [ref() for ref in self._others[1]]
        if any(leaf is None for leaf in out):  # some died: forget them
            self.leaves(walk=False)
            return self.others(owned)
        return out  # type: ignore[return-value]

    def watching(self, kind: str) -> bool:
        """Whether a call of this kind of closure runs under the watch."""
        return self._always_watch or kind not in self._settled

    def walks(self, kind: str) -> bool:
        """Whether a call of this kind walks the loss graphs around it (see :class:`GradIsolation`)."""
        return kind in self._accumulating or self.watching(kind)

    def settle(self, kind: str) -> None:
        self._settled.add(kind)

    def accumulates(self, kind: str) -> None:
        self._accumulating.add(kind)

    def watch_always(self) -> None:
        self._always_watch = True


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
    """``with GradIsolation(owned, reached, kind, owner) as iso: loss = iso.call(closure)``.

    On entry, the gradient of every owned and every remembered leaf is set to ``None``; during
    :meth:`call`, if ``reached`` still watches closures of this ``kind``, so is that of any other
    leaf the closure uses; on exit (also on error) each of them gets its original gradient tensor
    back, and the leaves of the returned loss are remembered for the next call. ``owner`` (the
    optimizer's class name) and ``kind`` name the closure in the warning.
    """

    def __init__(self, owned: Iterable[Tensor], reached: ReachedLeaves, kind: str,
                 owner: str) -> None:
        self._reached = reached
        self._kind = kind
        self._owner = owner
        self._walks = reached.walks(kind)
        owned = list(owned)
        saved = self._saved = {id(t): (t, t.grad) for t in owned}
        for t in reached.leaves() if self._walks else reached.others(owned):
            if id(t) not in saved:
                saved[id(t)] = (t, t.grad)

    def __enter__(self) -> GradIsolation:
        for t, _ in self._saved.values():
            t.grad = None
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        reached, saved = self._reached, self._saved
        if not reached.watching(self._kind):
            out = fn()
            if self._walks:
                self._check(reached.learn(out))
            elif self._accumulated():
                # The first call of this kind to call backward() since its calls settled: the
                # leaves of the step's training graph were not cleared before it (nor walked);
                # its own graph is checked as any unwatched call's.
                reached.accumulates(self._kind)
                reached.learn_pending()
                self._check(reached.learn(out))
            elif getattr(out, "grad_fn", None) is None:
                reached.watch_always()  # as _check: nothing to vouch for this call with
            return out
        known = len(saved)
        with _FirstUse(saved):
            out = fn()
        if self._accumulated():
            reached.accumulates(self._kind)
        leaves = reached.learn(out)
        # Settled when the watch found no leaf beyond the known ones, nor did the graph's walk.
        if (leaves is not None and len(saved) == known
                and all(id(leaf) in saved for leaf in leaves)):
            reached.settle(self._kind)
        return out

    def _accumulated(self) -> bool:
        """Did the call write a gradient (call ``backward()``) into a tensor cleared for it?"""
        return any(t.grad is not None for t, _ in self._saved.values())

    def _check(self, leaves: list[Tensor] | None) -> None:
        """After an unwatched call: every leaf of the returned graph must have been cleared."""
        saved = self._saved
        if leaves is None:
            self._reached.watch_always()  # nothing to check this call against
            return
        new = [leaf for leaf in leaves if id(leaf) not in saved]
        if not new:
            return
        self._reached.watch_always()
        touched = [leaf for leaf in new if leaf.grad is not None]
        if touched:
            described = ", ".join(f"shape {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                                  for t in touched[:3])
            more = f" and {len(touched) - 3} more" if len(touched) > 3 else ""
            warn(
                f"{self._owner}'s {self._kind} reached {len(touched)} tensor(s) that the "
                f"optimizer does not own and its earlier calls' graphs did not reach "
                f"({described}{more}). Once a "
                "closure's graphs reach no new tensor, its extra calls run without watching for "
                "new ones; this call's backward() may have accumulated into their .grad, which "
                "then differs from what torch.optim would leave by this extra evaluation's "
                "gradient. Every later extra evaluation of this optimizer watches again (as at "
                "its first calls: slower on small models). Shown once."
            )

    def __exit__(self, *exc: object) -> None:
        for t, g in self._saved.values():
            t.grad = g
