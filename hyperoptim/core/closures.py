r"""The closure contract: training and validation closures, the gradients it takes, HVP routes.

A part of :class:`~hyperoptim.core.base.HyperOptimizer` (docs/design.md §7), kept in its own module;
it is not meant to be used on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from ..hvp import RngReplay, SecondOrder, exact_route_error
from .dist import (
    AGREEMENT_TIMEOUT,
    all_reduce_mean,
    all_reduce_sum,
    ddp_synced_ids,
    settle,
    uneven_batches,
    verdict,
    world_size,
)
from .grads import GradIsolation, ReachedLeaves
from .ledger import GradLedger
from .shard import any_nonzero, check_sharded_closure, is_sharded, sum_across_shards
from .types import Closure
from .warn import warn

_T = TypeVar("_T")


def _loss_scalar(loss: Any, params: Sequence[Tensor]) -> Tensor:
    """The closure's loss as a float64 0-d tensor to average across ranks (NaN where it is not a
    one-element tensor: a closure may return any value where nothing is differentiated)."""
    if isinstance(loss, Tensor) and loss.numel() == 1:
        return loss.detach().reshape(()).double()
    return torch.full((), float("nan"), dtype=torch.float64, device=params[0].device)


def _grad_snapshot(params: Sequence[Tensor]) -> list[tuple[Tensor | None, int]]:
    # Holding the tensors keeps their ids from being reused; the version catches in-place accumulation.
    return [(p.grad, p.grad._version if p.grad is not None else -1) for p in params]

def _grads_changed(before: list[tuple[Tensor | None, int]], params: Sequence[Tensor]) -> bool:
    return any(p.grad is not g or (g is not None and g._version != v)
               for p, (g, v) in zip(params, before))


class _Closures:
    """The closure contract: training and validation closures, the gradients it takes, HVP routes."""

    def declare_ddp(self, model: torch.nn.Module) -> None:
        """Declare that ``model``, a ``DistributedDataParallel``, averages the gradients that
        ``backward()`` writes for this optimizer's parameters, so that the optimizer does not
        all-reduce them a second time (once per optimizer; see README, "Distributed training").

        Gradients the optimizer takes itself with ``torch.autograd.grad`` (closures that return
        the loss) bypass DDP's hooks and are still averaged here, as are parameters DDP ignores.

        Raises:
            ValueError: ``model`` is not a ``DistributedDataParallel`` over the default process
                group, or holds none of this optimizer's parameters.
        """
        self._ddp_synced = ddp_synced_ids(type(self).__name__, model, self._all_params())

    def _synced(self, params: Sequence[Tensor], called_backward: bool) -> list[bool]:
        """Per parameter: is its gradient already averaged (by DDP's hooks, see :meth:`declare_ddp`,
        or FSDP2's reduce-scatter)?"""
        return [called_backward and (id(p) in self._ddp_synced or is_sharded(p)) for p in params]

    @staticmethod
    def _average(tensors: Sequence[Tensor], synced: Sequence[bool], *,
                 timeout: float | None = None) -> list[Tensor]:
        """:func:`all_reduce_mean` of the tensors whose ``synced`` entry is False (one collective);
        the others, already averaged, are returned as they are."""
        own = [i for i, done in enumerate(synced) if not done]
        out = list(tensors)
        for i, mean in zip(own, all_reduce_mean([tensors[i] for i in own], timeout=timeout)):
            out[i] = mean
        return out

    def _agreed(self, failure: Exception | None, tensors: Sequence[Tensor] = (),
                synced: Sequence[bool] = (), scalars: Sequence[Tensor] = ()) -> list[Tensor]:
        """:meth:`_average` of ``tensors`` carrying this rank's verdict on its step so far
        (docs/design.md §8, "A step that fails on one rank"): one element more in the collective
        of the first tensor averaged, or one scalar all-reduce where nothing is averaged. Raises
        on every rank, here, if the step failed on any (:func:`~hyperoptim.core.dist.settle`).
        Only under ``torch.distributed``; ``tensors`` of a failed rank are placeholders of the
        same shapes, so that every rank sends the same collective. ``scalars`` (0-d tensors)
        ride in the verdict's slot; their means over the ranks are left, as floats, in
        ``_agreed_scalars`` (read on the host with the verdict: no sync of their own)."""
        if failure is None:  # a training closure that failed under a deferred verdict
            failure = self.__dict__.get("_pending_failure")
        own = next((t for t, done in zip(tensors, synced) if not done), None)
        params = self._all_params()
        device = own.device if own is not None else (params[0].device if params else None)
        batch = self.__dict__.get("local_batch_size")
        slot = verdict(failure, own, device or torch.device("cpu"), batch)
        width = slot.numel()
        if scalars:
            slot = torch.cat([slot, torch.stack([s.detach().reshape(()).to(slot) for s in scalars])])
        timeout = self.__dict__.get("agreement_timeout", AGREEMENT_TIMEOUT)
        *out, slot = self._failing_first(
            lambda: self._average([*tensors, slot], [*synced, False], timeout=timeout), failure)
        values = settle(type(self).__name__, slot, failure, timeout=timeout)
        if own is None:
            self._check_batches(values[:width], batch)
        self.__dict__["_agreed_scalars"] = values[width:]
        return out

    def _defers_verdict(self, params: Sequence[Tensor]) -> bool:
        """Can the training closure's verdict ride in the step's one all-reduce of scalars
        (:meth:`_sum_with_verdict`) instead of a collective of its own? When no collective of
        the optimizer's follows the closure: under FSDP2 (every parameter sharded: a closure
        that succeeds has called ``backward()``, whose reduce-scatter averaged every gradient),
        or under declared DDP over every parameter while the closure calls ``backward()`` (its
        style at the last step); and from the second such all-reduce on, whose size a rank
        whose closure failed then knows and sends as zeros. Decided before the closure runs,
        the same way on every rank."""
        if world_size() == 1 or "_verdict_size" not in self.__dict__ or not params:
            return False
        if all(is_sharded(p) for p in params):
            return True
        return (bool(self.__dict__.get("_closure_backward"))
                and all(id(p) in self._ddp_synced for p in params))

    def _settle_pending(self) -> None:
        """Where the step's all-reduce of scalars comes next: a rank whose closure failed under
        a deferred verdict (:meth:`_defers_verdict`) joins it here, with zeros, and raises with
        the others (:meth:`_send_deferred_verdict`); nothing for a rank whose step went fine."""
        failure = self.__dict__.get("_pending_failure")
        if failure is not None:
            self._send_deferred_verdict(failure, self._all_params())

    def _deferred_slots(self, failed: bool, deviated: bool) -> Tensor:
        """The verdict's four slots in :meth:`_sum_with_verdict`'s all-reduce: failed, the layout
        deviated from the last step's, and the local batch size and its square
        (:func:`~hyperoptim.core.dist.uneven_batches`)."""
        n = float(self.__dict__.get("local_batch_size") or 0)
        return torch.tensor([float(failed), float(deviated), n, n * n], dtype=torch.float64)

    def _send_deferred_verdict(self, failure: Exception, params: Sequence[Tensor]) -> None:
        """A rank whose closure failed, under a deferred verdict: joins the all-reduce
        the others send at :meth:`_sum_with_verdict` (zeros of the last step's size, then its
        verdict) and raises there with them."""
        size = self.__dict__["_verdict_size"]
        device = params[0].device
        flat = torch.cat([torch.zeros(size, dtype=torch.float64, device=device),
                          self._deferred_slots(True, False).to(device)])
        self._settle_deferred(flat, failure)

    def _settle_deferred(self, flat: Tensor, failure: Exception | None) -> list[float]:
        """All-reduce ``flat`` (partial sums, then :meth:`_deferred_slots`) and settle the
        verdict in its last four slots: raises on every rank if a closure failed on any."""
        timeout = self.__dict__.get("agreement_timeout", AGREEMENT_TIMEOUT)
        self._failing_first(lambda: all_reduce_sum(flat, timeout=timeout), failure)
        slots = flat[-4:] / world_size()
        values = settle(type(self).__name__, slots[[0, 2, 3]], failure, timeout=timeout)
        self._check_batches(values, self.__dict__.get("local_batch_size"))
        return slots.tolist()

    def _sum_with_verdict(self, partials: Sequence[Tensor]) -> list[Tensor]:
        """:func:`~hyperoptim.core.shard.sum_across_shards` of the step's partial sums (one
        all-reduce, float64), carrying the ranks' verdict on the training closure when it was
        deferred (:meth:`_defers_verdict`): every rank then sends the last step's number of sums
        and four slots more. A rank whose own layout changed since sends zeros and says so, and
        then every rank sends its sums again (that step only)."""
        deferred = self.__dict__.pop("_pending_verdict", False)
        if not deferred:
            out = sum_across_shards(partials)
        else:
            # A step whose closure left no gradient has nothing to sum: zeros, then its verdict.
            flat = (torch.stack([t.detach().double().reshape(()) for t in partials]) if partials
                    else torch.zeros(0, dtype=torch.float64, device=self._all_params()[0].device))
            size = self.__dict__["_verdict_size"]
            deviated = flat.numel() != size
            payload = torch.zeros(size, dtype=torch.float64, device=flat.device) if deviated else flat
            sent = torch.cat([payload, self._deferred_slots(False, deviated).to(flat.device)])
            if self._settle_deferred(sent, None)[1] == 0.0:
                out = list(sent[:size].unbind())
            else:
                out = sum_across_shards(partials)
        self.__dict__["_verdict_size"] = len(out)
        return out

    @staticmethod
    def _failing_first(collective: Callable[[], _T], failure: Exception | None) -> _T:
        """``collective()``; if it raises (a timeout) on a rank whose own step failed, that
        rank's exception is raised instead, with the collective's error as a note."""
        try:
            return collective()
        except RuntimeError as err:
            if failure is None:
                raise
            if hasattr(failure, "add_note"):  # Python 3.11+
                failure.add_note(f"(then, at the step's agreement: {err})")
            raise failure from None

    def _check_batches(self, values: list[float], batch: int | None) -> None:
        """Warn once when the local batch sizes the ranks declared differ."""
        mean = uneven_batches(values, world_size())
        if mean is not None and not self.__dict__.get("_uneven_warned"):
            self.__dict__["_uneven_warned"] = True
            warn(
                f"{type(self).__name__}: the ranks declared different local batch sizes "
                f"(local_batch_size: {batch} here, {mean:g} on average). "
                "Gradients, validation gradients and Hessian-vector products are averaged with "
                "one weight per rank, so each example of a smaller batch weighs more than in a "
                "one-process run over the same data. Give every rank the same number of examples "
                "(DistributedSampler, drop_last=True), or make each rank's closures return the sum "
                "of its examples' losses times world_size / (examples over all ranks). Shown once."
            )

    @staticmethod
    def _run_local(local: Callable[[], _T], placeholder: Callable[[], _T]
                   ) -> tuple[_T, Exception | None]:
        """``(local(), None)``; under ``torch.distributed`` an exception of ``local`` is caught and
        returned beside ``placeholder()``, for :meth:`_agreed` to send this rank's verdict (in
        one process it propagates as it is)."""
        try:
            return local(), None
        except Exception as err:
            if world_size() == 1:
                raise
            return placeholder(), err

    # ------------------------------------------------------------------ closures
    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _training_loss(self, closure: Closure | None, *, second_order: bool = False,
                       defer: bool = False, share_loss: bool = False
                       ) -> tuple[Tensor | None, SecondOrder | None]:
        r"""Run the training ``closure`` so that ``p.grad`` holds the gradient of its loss.

        The closure recomputes the loss from the live parameters and returns it; it may call
        ``zero_grad()``/``backward()`` itself (the torch.optim pattern) or not: if it did not, the
        gradients are taken here with ``autograd.grad`` and written to ``p.grad``. Either way the
        gradients are averaged across ranks under ``torch.distributed`` (for a
        ``DistributedDataParallel`` model, whose hooks already averaged them, this changes
        nothing). Without a closure, the gradients already in ``p.grad`` are used as they are.

        With ``second_order=True`` the second value is a :class:`~hyperoptim.hvp.SecondOrder`
        giving :math:`H Z` by the route ``self.hvp`` selects (``"auto"``: exact if the closure
        returned the loss without calling ``backward()``, finite differences if it called it).
        Callers close it when done.

        With ``share_loss=True`` under ``torch.distributed`` (and a verdict that is not
        deferred), the loss's mean over the ranks rides in the step's agreement and is left in
        ``_agreed_scalars`` (NaN where a closure returned no tensor), for a caller whose
        decisions read the loss and must be the same on every rank.

        Returns:
            ``(loss, second)``: the closure's loss (``None`` without a closure) and the
            second-order handle (``None`` unless ``second_order``).

        Raises:
            ValueError: no closure where one is needed, a closure that returns no tensor, or
                ``hvp="exact"`` with a closure that calls ``backward()`` itself.
        """
        # A step that raised left these behind (on every rank alike).
        self.__dict__.pop("_shared_loss", None)
        self.__dict__.pop("_pending_verdict", None)
        self.__dict__.pop("_pending_failure", None)
        if closure is None:
            return self._without_closure(second_order)
        params = self._all_params()
        if not params:
            return self._nothing_to_train(closure)
        self._grad_ledger.drop_stale()
        before = _grad_snapshot(params)
        rng = RngReplay([p.device for p in params]) if second_order else None
        (loss, called_backward, route), failure = self._run_local(
            lambda: self._call_training_closure(closure, params, before, second_order),
            lambda: (torch.zeros(()), False, None))
        if defer and self._defers_verdict(params):
            self.__dict__["_pending_verdict"] = True
            if failure is not None:
                # The caller goes on to the step's all-reduce of scalars (_settle_pending), through
                # the validation call whose collectives (DDP's, FSDP2's) the others run meanwhile.
                self.__dict__["_pending_failure"] = failure
                return loss, None
            self.__dict__["_closure_backward"] = called_backward
        elif world_size() > 1:
            # The step's scalar agreement: which gradients this closure left is not known on a
            # rank where it failed, so no average below can carry the verdict.
            self._agreed(failure, scalars=[_loss_scalar(loss, params)] if share_loss else ())
            if share_loss:
                self.__dict__["_shared_loss"] = self.__dict__["_agreed_scalars"][0]
            self.__dict__["_closure_backward"] = called_backward
        used, graph_grads, origin_grads = self._step_gradients(loss, params, called_backward, route)
        self._check_dense()
        # Stepped once: left unchanged, these gradients are stale at the next step(closure).
        self._grad_ledger.remember(used)
        self._flip_for_maximize(used)
        if route is None:
            return loss.detach(), None
        return loss.detach(), self._second_order(closure, used, route, cast(RngReplay, rng),
                                                 graph_grads, origin_grads)

    def _without_closure(self, second_order: bool) -> tuple[None, None]:
        """``step()`` without a closure: the gradients already in ``p.grad`` are the step's."""
        if second_order:
            raise ValueError(
                f"{type(self).__name__} needs second-order information: call "
                "step(closure) with a closure that recomputes and returns the training loss "
                "(it may call backward() itself)."
            )
        self._check_dense()
        used = [p for p in self._all_params() if p.grad is not None]
        self._grad_ledger.remember(used)
        self._flip_for_maximize(used)
        return None, None

    def _step_gradients(self, loss: Tensor, params: list[Tensor], called_backward: bool,
                        route: str | None
                        ) -> tuple[list[Tensor], list[Tensor] | None, list[Tensor] | None]:
        """Put the step's gradient, averaged across ranks, in ``p.grad`` after the closure ran.

        A closure that calls backward() replaces p.grad (as for torch.optim); one that does not
        leaves it as the user prepared it, and only then is it looked at (one host sync).

        Returns:
            ``(used, graph_grads, origin_grads)`` as :meth:`_prepared_gradients` does.
        """
        if called_backward:
            return self._backward_gradients(params), None, None
        self._check_dense()
        prepared = GradLedger.prepared(params)
        if prepared:
            return self._prepared_gradients(loss, prepared, route)
        if not loss.requires_grad and any(p.grad is not None for p in params):
            return self._constant_loss(params, route)
        grads = self._closure_grads(loss, params, route)
        pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
        used = [p for p, _ in pairs]
        # Averaged after differentiating: the local gradients keep their graph for H·Z.
        for p, mean in zip(used, all_reduce_mean([g.detach() for _, g in pairs])):
            p.grad = mean
        return used, ([g for _, g in pairs] if route == "exact" else None), None

    @staticmethod
    def _constant_loss(params: list[Tensor], route: str | None
                       ) -> tuple[list[Tensor], list[Tensor] | None, None]:
        """A constant loss over gradients that are all exactly 0 (torch's zero-gradient step):
        those zeros are the step's gradient, as for torch.optim; a constant's Hessian is 0."""
        used = [p for p in params if p.grad is not None]
        return used, ([torch.zeros_like(p) for p in used] if route == "exact" else None), None

    def _backward_gradients(self, params: list[Tensor]) -> list[Tensor]:
        """The gradients the closure's ``backward()`` wrote, averaged in place where DDP did not."""
        used = [p for p in params if p.grad is not None]
        grads = [p.grad for p in used]
        for g, mean in zip(grads, self._average(grads, self._synced(used, True))):
            if mean is not g:
                g.copy_(mean)
        return used

    @staticmethod
    def _closure_grads(loss: Tensor, params: list[Tensor], route: str | None
                       ) -> tuple[Tensor | None, ...]:
        """``autograd.grad`` of the closure's ``loss``, with its graph kept for the exact route."""
        if not loss.requires_grad:
            raise ValueError("Invalid closure return value: the loss does not require grad")
        exact = route == "exact"
        try:
            return torch.autograd.grad(loss, params, allow_unused=True, create_graph=exact)
        except RuntimeError as err:
            if not exact:
                raise
            raise exact_route_error(err) from err

    def _second_order(self, closure: Closure, used: list[Tensor], route: str, rng: RngReplay,
                      graph_grads: list[Tensor] | None, origin_grads: list[Tensor] | None
                      ) -> SecondOrder:
        """The :class:`~hyperoptim.hvp.SecondOrder` handle for this step's training loss."""
        rng.mark_after()
        self._hvp_route = route
        if self.defaults.get("maximize"):
            if graph_grads is not None:
                # H of -L: negated inside the graph (step() runs under no_grad, where a plain
                # negation would cut it and leave H·Z = 0).
                with torch.enable_grad():
                    graph_grads = [-g for g in graph_grads]
            if origin_grads is not None:
                origin_grads = [-g for g in origin_grads]
        gradient_at = None if route == "exact" else (lambda: self._gradient_at(closure, used))
        handle = SecondOrder(used, route, graph_grads=graph_grads, gradient_at=gradient_at,
                             rng=rng, kink_check=not self._fd_rough,
                             on_rough=self._note_rough_differences, origin_grads=origin_grads)
        if route != "exact":  # its columns and kink retries are counted when the step returns
            self.__dict__.setdefault("_differences", []).append(handle)
        return handle

    def _count_differences(self, commit: bool) -> None:
        """Add this step's finite-difference columns and kink retries to
        ``hyper_state["finite_differences"]`` (``commit``: the step returned, taken or skipped;
        otherwise they are dropped with the step)."""
        handles = self.__dict__.pop("_differences", None)
        if not commit or not handles:
            return
        columns = sum(h.columns for h in handles)
        retried = sum(h.retried for h in handles)
        if columns or retried:
            counts = self.hyper_state.get("finite_differences", {"columns": 0, "retried": 0})
            self.hyper_state["finite_differences"] = {"columns": counts["columns"] + columns,
                                                      "retried": counts["retried"] + retried}

    def _call_training_closure(self, closure: Closure, params: list[Tensor],
                               before: list[tuple[Tensor | None, int]], second_order: bool
                               ) -> tuple[Tensor, bool, str | None]:
        """Run the training ``closure``: its loss, whether it called ``backward()``, the HVP route."""
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor):
            raise ValueError(f"Invalid closure return value: {loss!r} (expected the loss tensor)")
        self._reached().note(loss)
        called_backward = _grads_changed(before, params)
        check_sharded_closure(type(self).__name__, params, called_backward, "closure")
        return loss, called_backward, self._route(called_backward) if second_order else None

    def _prepared_gradients(self, loss: Tensor, prepared: list[Tensor], route: str | None
                            ) -> tuple[list[Tensor], list[Tensor] | None, list[Tensor] | None]:
        """The gradient contract for a closure that returns the loss while ``p.grad`` already
        holds gradients the user prepared (accumulated, clipped): those are the step's gradient,
        averaged across ranks like any other; the closure's loss gives only the second-order
        information (its gradient's graph for the exact route, its gradient at the unperturbed
        weights for the finite-difference route's kink check).

        Returns:
            ``(used, graph_grads, origin_grads)``: the parameters stepped, and the closure's
            gradients for :class:`~hyperoptim.hvp.SecondOrder` (``None`` where not needed).
        """
        used = list(prepared)
        for g, mean in zip([p.grad for p in used], all_reduce_mean([p.grad for p in used])):
            if mean is not g:
                g.copy_(mean)
        if route is None:
            return used, None, None
        grads = self._closure_grads(loss, used, route)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(used, grads)]
        if route == "exact":
            return used, grads, None
        return used, None, all_reduce_mean([g.detach() for g in grads])

    def _nothing_to_train(self, closure: Closure) -> tuple[Any, None]:
        """No parameter requires grad (all frozen, empty groups, integer tensors): as with
        ``torch.optim.SGD``, the closure runs and nothing else happens."""
        with torch.enable_grad():
            loss = closure()
        # Nothing is differentiated: whatever the closure returns is returned, as torch does.
        return (loss.detach() if isinstance(loss, Tensor) else loss), None

    def _note_rough_differences(self) -> None:
        """The finite-difference route could not find a step where the gradient is smooth.

        Warn once, with what to do, and stop retrying (each retry costs two closure calls and
        the answer would not improve): from then on, this optimizer's products are central
        differences at the first step size.
        """
        if self._fd_rough:
            return
        self._fd_rough = True
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in self._all_params()})
        warn(
            f"{type(self).__name__}: the finite-difference Hessian-vector products are unreliable "
            "here: even at a 100x smaller step the two one-sided differences of the gradient "
            "disagree. Either the model has kinks within the step (ReLU, max-pooling, clamping) "
            f"or the gradient's rounding dominates (weights in {', '.join(dtypes)}; under "
            "torch.autocast the forward pass rounds to bfloat16/float16, far coarser); on a "
            "784-512-512-10 ReLU MLP in float32 the products were 20x off. "
            + ("Under FSDP2 the exact route is not available: train in float64 without autocast, "
               "or use smooth activations (GELU, SiLU). " if any(is_sharded(p) for p in
                                                                 self._all_params()) else
               "Prefer the exact route: a closure that returns the loss without calling "
               "backward() (hvp='exact'), or train in float64 without autocast. ")
            + "Continuing without further retries."
        )

    def _route(self, called_backward: bool) -> str:
        """The HVP route for this step (docs/design.md §8), or a ValueError saying what to change."""
        if self.hvp == "auto":
            return "finite_difference" if called_backward else "exact"
        if self.hvp == "exact" and called_backward:
            raise ValueError(
                f"{type(self).__name__}(hvp='exact') takes H·Z by double backward through the "
                "training gradient, but the closure called backward() itself, which frees that "
                "graph. Return the loss from the closure without calling backward(), or pass "
                "hvp='finite_difference' (first-order gradients only: works with backward() in "
                "the closure, DDP, torch.compile and Lightning)."
            )
        return self.hvp

    def _isolated_gradient(self, closure: Closure, params: Sequence[Tensor], name: str
                           ) -> tuple[Tensor, list[Tensor | None] | None, bool]:
        """Run ``closure`` with the ``p.grad`` of every leaf it reaches cleared, this optimizer's
        or not (:class:`~hyperoptim.core.grads.GradIsolation`), and put the original gradient
        tensors back afterwards (also on error): the step's own gradients, and those of a model
        another optimizer trains, are never touched, and a closure that accumulates without
        ``zero_grad()`` is still right.

        Returns:
            ``(loss, grads, called_backward)``: ``grads[i]`` is the gradient of ``params[i]``
            (``None`` where it got none), taken from ``p.grad`` if the closure called
            ``backward()`` and with ``autograd.grad`` otherwise; ``grads`` is ``None`` when the
            loss carries no graph at all.
        """
        everything = self._all_params()
        isolation = GradIsolation(everything, self._reached(), name, type(self).__name__)
        with isolation, torch.enable_grad():
            loss = isolation.call(closure)
            if not isinstance(loss, Tensor):
                raise ValueError(f"Invalid {name} return value: {loss!r} (expected a tensor)")
            if any(p.grad is not None for p in everything):
                return loss, [p.grad for p in params], True
            if not loss.requires_grad:
                return loss, None, False
            # A parameter frozen since (requires_grad_(False)) gets no gradient, as with backward().
            live = [i for i, p in enumerate(params) if p.requires_grad]
            if not live:
                return loss, [None] * len(params), False
            grads: list[Tensor | None] = [None] * len(params)
            for i, g in zip(live, torch.autograd.grad(loss, [params[i] for i in live], allow_unused=True)):
                grads[i] = g
            return loss, grads, False

    def _reached(self) -> ReachedLeaves:
        """The leaves outside this optimizer that its closures reach (:mod:`.grads`)."""
        reached = self.__dict__.get("_reached_leaves")
        if reached is None:  # not setdefault: that would build one at every call
            reached = self.__dict__["_reached_leaves"] = ReachedLeaves()
        return reached

    def _gradient_at(self, closure: Closure, params: list[Tensor]) -> list[Tensor]:
        """The closure's training gradient at the live (perturbed) weights, averaged across
        ranks; ``p.grad`` is left exactly as it was (:meth:`_isolated_gradient`)."""
        def local() -> tuple[list[Tensor], bool]:
            _, raw, called_backward = self._isolated_gradient(closure, params, "closure")
            if raw is None:
                raise ValueError("Invalid closure return value: the loss does not require grad")
            return [torch.zeros_like(p) if g is None else g.detach()
                    for p, g in zip(params, raw)], called_backward

        # The placeholders' style: the step's training call's, the same closure on every rank.
        (out, called_backward), failure = self._run_local(local, lambda: (
            [torch.zeros_like(p) for p in params], self.__dict__.get("_closure_backward", False)))
        synced = self._synced(params, called_backward)
        out = (self._agreed(failure, out, synced) if world_size() > 1 else
               self._average(out, synced))
        return [-g for g in out] if self.defaults.get("maximize") else out

    def _resolve_val_closure(self, val_closure: Closure | None, *, required: bool) -> Closure | None:
        val_closure = val_closure if val_closure is not None else self.val_closure
        if val_closure is None and required:
            raise ValueError(
                f"{type(self).__name__} needs a validation loss: pass val_closure= to the "
                "constructor or to step()."
            )
        return val_closure

    def _validation_grads(self, val_closure: Closure, params: Sequence[Tensor], *,
                          average_loss: bool = True) -> tuple[Tensor, list[Tensor]]:
        r"""Validation loss and its gradient with respect to ``params``, without touching ``p.grad``.

        The ``val_closure`` may call ``backward()`` itself or just return the loss. The training
        gradients in ``p.grad`` are put back afterwards (also on error). Unused parameters get a
        zero gradient. The loss and the gradients are averaged across ranks; with
        ``average_loss=False`` the loss is this rank's, for a caller that averages it in a
        collective of its own (FSDP2's one all-reduce of scalars per step).
        """
        params = list(params)
        # Placeholders shaped as the other ranks' collective: their closure's style is the one
        # the last validation call had (it decides which gradients DDP averaged).
        (loss, grads, called_backward), failure = self._run_local(
            lambda: self._local_validation(val_closure, params),
            lambda: (torch.zeros(()), [torch.zeros_like(p) for p in params],
                     bool(self.__dict__.get("_val_backward"))))
        # The loss is averaged too (it is a mean over the data as well): every rank records the
        # same value, and skips the same steps.
        synced = self._synced(params, called_backward) + [not average_loss]
        if world_size() == 1:
            *grads, loss = self._average(grads + [loss.detach()], synced)
        else:
            *grads, loss = self._agreed_validation(failure, params, grads, loss, synced)
            self.__dict__["_val_backward"] = called_backward
        if self.defaults.get("maximize"):
            grads = [-g for g in grads]
        if not self._val_checked and grads:
            self._check_val_nonzero(grads)
        return loss.detach(), grads

    def _local_validation(self, val_closure: Closure, params: list[Tensor]
                          ) -> tuple[Tensor, list[Tensor], bool]:
        """This rank's validation loss, its gradients (zeros where unused) and whether the
        closure called ``backward()``; ``ValueError`` for a loss that trains nothing."""
        loss, raw, called_backward = self._isolated_gradient(val_closure, params, "val_closure")
        check_sharded_closure(type(self).__name__, params, called_backward, "val_closure")
        self._check_val_graph(params, raw, called_backward)
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, raw or [])]
        return loss, grads, called_backward

    def _check_val_graph(self, params: list[Tensor], raw: list[Tensor | None] | None,
                        called_backward: bool) -> None:
        """ValueError unless the validation loss has a graph that reaches ``params``."""
        if raw is None and params:
            raise ValueError(self._no_graph_message("does not require grad"))
        if params and not called_backward and all(g is None for g in (raw or [])):
            raise ValueError(self._no_graph_message("does not depend on the parameters"))

    def _check_val_nonzero(self, grads: list[Tensor]) -> None:
        """Once, at the first hyper-update: a gradient of exactly 0 everywhere means the loss
        does not see these weights (a copied model), and every hypergradient would be 0."""
        if not any_nonzero(grads):
            raise ValueError(self._no_graph_message("has a gradient of exactly 0 for every "
                                                    "parameter"))
        self._val_checked = True

    def _agreed_validation(self, failure: Exception | None, params: list[Tensor],
                           grads: list[Tensor], loss: Tensor, synced: list[bool]) -> list[Tensor]:
        """The validation gradients and loss averaged with the ranks' verdict (docs/design.md
        §8). The loss travels in the first averaged gradient's dtype, so that a rank whose
        closure failed knows the collective's layout."""
        carrier = next((g for g, done in zip(grads, synced) if not done), None)
        loss = loss.detach().to(carrier.dtype if carrier is not None else torch.float64)
        if self._rides_deferred(synced):
            if failure is not None and "_pending_failure" not in self.__dict__:
                self.__dict__["_pending_failure"] = failure
            return grads + [loss]
        if "_val_backward" in self.__dict__ or not any(self._synced(params, True)):
            return self._agreed(failure, grads + [loss], synced)
        # The first call, with gradients DDP or FSDP2 may average: the layout depends on a
        # closure style not seen yet, so the verdict travels alone, once.
        self._agreed(failure)
        return self._average(grads + [loss], synced)

    def _rides_deferred(self, synced: list[bool]) -> bool:
        """Does the validation call's verdict wait for the step's all-reduce of scalars too? When
        nothing of it is averaged here (its gradients averaged by DDP or FSDP2, its loss left to
        that all-reduce) and the training closure's verdict waits there (:meth:`_defers_verdict`);
        not at the first call, whose style is unknown, nor before its gradient was checked
        (:meth:`_check_val_nonzero`, a collective under FSDP2)."""
        return (all(synced) and bool(self.__dict__.get("_pending_verdict"))
                and self._val_checked and "_val_backward" in self.__dict__)

    def _no_graph_message(self, what: str) -> str:
        return (
            f"{type(self).__name__}: the validation loss {what}, so every hypergradient would be "
            "0 and nothing would be learned. The val_closure must compute the loss from the live "
            "parameters of the model being trained, with autograd on: do not wrap it in "
            "torch.no_grad() or torch.inference_mode() (model.eval() is fine), and do not "
            "evaluate a copy of the model (an EMA model, copy.deepcopy). The optimizer takes the "
            "gradient itself and leaves p.grad unchanged."
        )

    def _check_dense(self) -> None:
        for p in self._all_params():
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(
                    f"{type(self).__name__} does not support sparse gradients (e.g. "
                    "nn.Embedding(sparse=True)): hypergradients are inner products of dense "
                    "update directions. Use sparse=False, or train those parameters with "
                    "torch.optim.SparseAdam / SGD in a second optimizer."
                )

    def _flip_for_maximize(self, params: Sequence[Tensor]) -> None:
        """With ``maximize``, ``p.grad`` holds a negated copy of the gradient during the step
        (the original tensor is put back after it): the optimizer then minimizes ``-loss``,
        exactly as torch.optim.SGD does. The user's tensor is never written (its version counter
        stays, so a graph that uses it can still be differentiated)."""
        if not self.defaults.get("maximize"):
            return
        for p in params:
            if p.grad is not None and all(p is not q for q, _ in self._flipped):
                self._flipped.append((p, p.grad))
                p.grad = torch.neg(p.grad)
