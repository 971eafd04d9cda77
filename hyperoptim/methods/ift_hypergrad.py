r"""IFT's hyper-update (a part of :class:`~hyperoptim.methods.ift.RuleIFT`, kept in its own
module; not meant to be used on its own): the hypergradient of the update function
:math:`\mathbf u(\lambda, w)` by the Neumann series of Eq. 6, one step of the hyper optimizer on
the transformed values, and what the step then publishes, records or undoes.

With :math:`J = \partial\mathbf u/\partial w` and look-back :math:`i`,

.. math::

    \frac{dL_V}{d\lambda} \approx -\nabla L_V^\top
        \sum_{0 \le j < i} (I - J)^j\, \frac{\partial \mathbf u}{\partial \lambda},

taken without forming :math:`J`: :math:`i - 1` products :math:`J^\top q` (each one Hessian-vector
product by the step's HVP route), then one product with :math:`\partial\mathbf u/\partial\lambda`.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..core.base import LEARNED_LIMIT
from ..core.shard import complete_sums, is_sharded, local
from ..core.warn import warn
from ..hvp import SecondOrder
from . import ift_schedule

_PINNED_UPDATES = 5
"""Consecutive hyper-updates with a learned learning rate at an end of ``lr_bounds`` before the
optimizer warns that the bound sets it."""


def _natural(name: str, x: Tensor) -> Tensor:
    """The inverse of ``hyperoptim.methods.ift._transform``, differentiable: ``10 ** x`` or
    ``sigmoid(x)``."""
    if name == "momentum":
        return torch.sigmoid(x)
    return torch.pow(10.0, x)


def _clamp(name: str, group: dict[str, Any], xs: Sequence[Tensor]) -> None:
    """Stored transformed values held in range: a log10 learning rate within log10 of
    ``lr_bounds`` (the paper clips to [1e-10, 1]), a log10 weight decay below the learned limit."""
    if name == "lr":
        lo, hi = group["lr_bounds"]
        for x in xs:
            x.clamp_(math.log10(lo), math.log10(hi))
    if name == "weight_decay":
        for x in xs:
            x.clamp_(max=math.log10(LEARNED_LIMIT))


@dataclass
class _Tuned:
    """The tuned values of one hyper-update, in spans ``(group index, name, start, stop)`` of the
    lists: the stored transformed tensors the hyper optimizer updates (``targets``), detached
    copies of them that carry this step's graph (``leaves``), their hypergradients, and what a
    skip restores (``before``, ``snapshot``) or a commit writes (``naturals``)."""

    spans: list[tuple[int, str, int, int]] = field(default_factory=list)
    targets: list[Tensor] = field(default_factory=list)
    leaves: list[Tensor] = field(default_factory=list)
    hypergrads: list[Tensor] = field(default_factory=list)
    before: list[Tensor] = field(default_factory=list)
    snapshot: dict[Any, dict[str, Any]] = field(default_factory=dict)
    naturals: dict[tuple[int, str], list[Tensor]] = field(default_factory=dict)


def _mean_over_weights(values: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """Mean of per-parameter hyperparameters over the weights they apply to (float64, 0-d)."""
    total = sum(p.numel() for p in params)
    return torch.stack([a.sum().double() * (p.numel() / a.numel())
                        for a, p in zip(values, params)]).sum() / total


def vjp_through_update(updates: Sequence[Tensor], params: Sequence[Tensor],
                       weights: Sequence[Tensor], grads: Sequence[Tensor],
                       q: Sequence[Tensor], second: SecondOrder,
                       diagonals: tuple[list[Tensor], list[Tensor]] | None = None) -> list[Tensor]:
    r""":math:`(\partial\mathbf u/\partial w)^\top q`, ``u`` a function of ``(w, g(w))``: every
    second-order product IFT takes.

    The rule's own vector-Jacobian product gives the direct term (weight decay) and the
    gradient's cotangent; the latter goes through :math:`H` by the step's HVP route
    (:class:`hyperoptim.hvp.SecondOrder`, averaged across ranks):
    :math:`(\partial u/\partial w)^\top q + H (\partial u/\partial g)^\top q`. With
    ``diagonals`` (the rule's diagonal Jacobians of ``u``, per parameter) the first two products
    are elementwise, with no pass through the update's graph. ``params`` (the parameters, which
    key ``second``'s products) may be FSDP2 DTensors; everything else is then this rank's
    shards, plain tensors, and so is the result.
    """
    if diagonals is not None:
        direct = [qi * d for qi, d in zip(q, diagonals[0])]
        through_g = {p: qi * d for p, qi, d in zip(params, q, diagonals[1])}
    else:
        raw = torch.autograd.grad(list(updates), list(weights) + list(grads), grad_outputs=list(q),
                                  retain_graph=True, allow_unused=True)
        n = len(params)
        direct = [torch.zeros_like(w) if j is None else j for w, j in zip(weights, raw[:n])]
        through_g = {p: (torch.zeros_like(w) if j is None else j)
                     for p, w, j in zip(params, weights, raw[n:])}
    hq = second.hvp([through_g.get(p, torch.zeros_like(local(p))).unsqueeze(0)
                     for p in second.params])
    by_param = dict(zip(second.params, hq))
    return [d + by_param[p][0] if p in by_param else d for p, d in zip(params, direct)]


def neumann_hypergrad(updates: Sequence[Tensor], leaves: Sequence[Tensor],
                      val_grads: list[Tensor], lookback: int,
                      vjp: Callable[[list[Tensor]], list[Tensor]]) -> tuple[Tensor | None, ...]:
    r""":math:`(\partial\mathbf u/\partial\lambda)^\top \sum_{j < i} ((I - J)^\top)^j\,\nabla L_V`
    with respect to ``leaves`` (None where ``u`` does not depend on one), by ``lookback - 1``
    products ``vjp(q)`` :math:`= J^\top q` (Eq. 6). ``val_grads`` is owned here: updated in place."""
    q = val_grads
    acc = [g.clone() for g in val_grads]
    for _ in range(lookback - 1):
        jq = vjp(q)
        for a, b, c in zip(q, jq, acc):
            a.sub_(b)
            c.add_(a)
    return torch.autograd.grad(list(updates), list(leaves), grad_outputs=acc, allow_unused=True)


def internal_step(opt: Optimizer) -> None:
    """Step the hyper optimizer without ``torch.optim``'s hook wrapper.

    ``Optimizer.step`` is wrapped to run the process-wide hooks
    (``torch.optim.optimizer.register_optimizer_step_pre_hook``) and the profiler's record: they
    belong to the user's optimizers, not to an Adam that lives inside this one. The wrapped
    function is the same arithmetic, so the result is bit-identical.
    """
    step = type(opt).step
    raw = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    if raw is None:
        opt.step()
    else:
        raw(opt)


class _HyperUpdate:
    """IFT's hyper-update, a part of :class:`~hyperoptim.methods.ift.RuleIFT`: it reaches the
    tuned values through the host's ``_stored``/``_per_parameter``, the update function through
    its ``_update_functions``, the schedule through ``_advance_schedule``/``_schedule_record``,
    and ``lookback``, ``_hyper_opt`` and the base's guard and history."""

    def _hyper_update(self, groups: list[tuple[dict[str, Any], list[Tensor]]],
                      second: SecondOrder | None, val_loss: Tensor,
                      val_grads: list[Tensor], taken: bool, originals: Sequence[Tensor]) -> bool:
        """The hypergradient of the update u(lambda, w) at the live weights and buffers against
        ``val_grads``, and one hyper-optimizer step; False (nothing changed) where non-finite.

        ``groups`` hold the parameters the rule steps and ``originals`` the optimizer's own, in
        the same order: the same tensors, or under FSDP2 views of this rank's shards (with the
        state and ``val_grads`` local too) beside the DTensors that key the HVPs. The
        hypergradients are then per-shard partial sums and ``val_loss`` this rank's: one
        all-reduce of scalars completes them all."""
        active = [(index, group, ps) for index, (group, ps) in enumerate(groups) if ps]
        tuned = self._hypergradients(groups, active, second, val_grads, originals)
        val_loss = self._complete_shards(tuned, val_loss, any(is_sharded(p) for p in originals))
        # The hyper optimizer steps before the step's one host sync; a skip restores the snapshot.
        self._hyper_optimizer_step(tuned)
        values = self._read_back(groups, tuned, val_loss)
        steps = float(self.hyper_state["steps"] + (1 if taken else 0))
        if not self._all_finite(*values):
            self._undo_hyper_update(tuned, active, values[0], steps)
            return False
        self._publish(groups, tuned, active, values, steps)
        self._advance_schedule(tuned.spans, values[1 : 1 + len(tuned.spans)])
        self._watch_pinned_lr(active)
        return True

    @staticmethod
    def _complete_shards(tuned: _Tuned, val_loss: Tensor, sharded: bool) -> Tensor:
        """Under FSDP2: the hypergradients' partial sums summed across ranks and the ranks'
        validation losses averaged, in one all-reduce (in place of ``tuned.hypergrads``); the
        validation loss to report."""
        if not sharded:
            return val_loss
        hypergrads = tuned.hypergrads
        device = hypergrads[0].device if hypergrads else val_loss.device
        flat = torch.cat([*(h.detach().double().reshape(-1) for h in hypergrads),
                          val_loss.detach().double().reshape(1).to(device)])
        done = complete_sums(flat, True)
        parts = done[:-1].split([h.numel() for h in hypergrads])
        tuned.hypergrads = [d.to(h.dtype).reshape(h.shape) for d, h in zip(parts, hypergrads)]
        return done[-1]

    def _hypergradients(self, groups: list[tuple[dict[str, Any], list[Tensor]]],
                        active: Sequence[tuple[int, dict[str, Any], list[Tensor]]],
                        second: SecondOrder | None, val_grads: list[Tensor],
                        originals: Sequence[Tensor]) -> _Tuned:
        """The tuned values' leaves and their hypergradients (Eq. 6 by :func:`neumann_hypergrad`);
        under FSDP2 this rank's partial sums (see :meth:`_hyper_update`)."""
        params = [p for _, ps in groups for p in ps]
        tuned = _Tuned()
        # u as a function of (w, g): copies, not views (the finite-difference route moves the
        # live weights in place while it runs).
        weight_leaves = [p.detach().clone().requires_grad_() for p in params]
        grad_leaves = [p.grad.detach().requires_grad_() for p in params]
        weight_of = dict(zip(params, weight_leaves))
        grad_of = dict(zip(params, grad_leaves))
        updates: list[Tensor] = []
        # The rule's closed-form Jacobians, when it has them and the series has terms.
        diagonals: tuple[list[Tensor], list[Tensor]] | None = ([], []) if self.lookback > 1 else None
        with torch.enable_grad():
            for index, group, ps in active:
                values = self._tuned_leaves(index, group, ps, tuned)
                ws, gs = [weight_of[p] for p in ps], [grad_of[p] for p in ps]
                updates.extend(self._update_functions(group, ps, ws, gs, values))
                if diagonals is not None:
                    d = self._update_diagonals(group, ps, ws, gs, values)
                    diagonals = None if d is None else (diagonals[0] + d[0], diagonals[1] + d[1])
            vjp = functools.partial(vjp_through_update, updates, list(originals), weight_leaves,
                                    grad_leaves, second=cast(SecondOrder, second),
                                    diagonals=diagonals)
            raw = neumann_hypergrad(updates, tuned.leaves, list(val_grads), self.lookback, vjp)
        del updates, vjp
        tuned.hypergrads = [torch.zeros_like(x) if g is None else -g
                            for x, g in zip(tuned.leaves, raw)]
        return tuned

    def _tuned_leaves(self, index: int, group: dict[str, Any], ps: list[Tensor],
                      tuned: _Tuned) -> dict[str, Any]:
        """Group ``index``'s values for the update function, each tuned one a natural value of a
        fresh leaf (appended to ``tuned``) that carries this step's graph."""
        values: dict[str, Any] = {n: group[n] for n in self._tunable}
        for name in group["tune"]:
            stored = self._stored(index, name, ps)
            fresh = [x.detach().requires_grad_() for x in stored]
            tuned.spans.append((index, name, len(tuned.leaves), len(tuned.leaves) + len(fresh)))
            tuned.targets.extend(stored)
            tuned.leaves.extend(fresh)
            natural = [_natural(name, x) for x in fresh]
            values[name] = natural if self._per_parameter(group, name) else natural[0]
        return values

    def _hyper_optimizer_step(self, tuned: _Tuned) -> None:
        """One step of the hyper optimizer on the stored values, after snapshots for a skip."""
        tuned.before = [x.clone() for x in tuned.targets]
        tuned.snapshot = {k: {n: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)
                              for n, v in entry.items()}
                          for k, entry in self._hyper_opt.state.items()}
        for x, g in zip(tuned.targets, tuned.hypergrads):
            x.grad = g
        # The accelerated warm-up (or lr_accel's climb) scales the learning rates' step size for
        # this step alone, and decay_accel the weight decays' (the hyper optimizer's groups
        # follow the param groups, one per tuned name: _build_hyper_optimizer).
        scale = self.__dict__.get("_accel_scale", 1.0)
        climbs = self.__dict__.get("_climb_scales", {})
        runs = self.hyper_state.get("decay")
        owners = [(index, name) for index, group in enumerate(self.param_groups)
                  for name in group["tune"]]
        scaled = []
        for position, g in enumerate(self._hyper_opt.param_groups):
            name = g.get("name")
            factor = scale if name == "lr" else 1.0
            if name == "lr" and position < len(owners) and owners[position][1] == name:
                factor *= climbs.get(owners[position][0], 1.0)  # 1 where accel is in force
            # A factory that reorders its groups loses decay_accel and lr_accel, never scales
            # the wrong one.
            if name == "weight_decay" and position < len(owners) and owners[position][1] == name:
                factor = ift_schedule.decay_scale(runs, owners[position][0], self.decay_accel)
            if factor != 1.0 and "lr" in g:
                scaled.append((g, factor))
        sizes = [g["lr"] for g, _ in scaled]
        try:
            for g, f in scaled:
                g["lr"] = g["lr"] * f
            internal_step(self._hyper_opt)
        finally:
            for (g, _), size in zip(scaled, sizes):
                g["lr"] = size
            for x in tuned.targets:
                x.grad = None

    def _read_back(self, groups: list[tuple[dict[str, Any], list[Tensor]]], tuned: _Tuned,
                   val_loss: Tensor) -> list[float]:
        """The stored values clamped, and in one host sync: the validation loss, the summed
        hypergradient per span, then per span its natural value and whether it changed."""
        reported: list[Tensor] = [val_loss.double().reshape(())]
        published: list[Tensor] = []  # (natural value, changed) per span
        for index, name, start, stop in tuned.spans:
            reported.append(torch.stack([g.sum() for g in tuned.hypergrads[start:stop]]).sum()
                            .double())
            group, ps = groups[index]
            xs = tuned.targets[start:stop]
            _clamp(name, group, xs)
            if self._per_parameter(group, name):
                fresh = {p: _natural(name, x) for p, x in zip(ps, xs)}
                tuned.naturals[index, name] = list(fresh.values())
                every = [fresh.get(p, self.state[p][name]) for p in group["params"]]
                published += [_mean_over_weights(every, group["params"]),
                              torch.ones((), dtype=torch.float64, device=every[0].device)]
            else:
                published += [_natural(name, xs[0]).double(),
                              (xs[0] != tuned.before[start]).double()]
        device = reported[0].device
        return torch.stack([t.to(device) for t in reported + published]).tolist()

    def _undo_hyper_update(self, tuned: _Tuned,
                           active: Sequence[tuple[int, dict[str, Any], list[Tensor]]],
                           val_loss: float, steps: float) -> None:
        """A non-finite hyper-update: the stored values and the hyper optimizer put back, the
        skip warned about and recorded."""
        for x, old in zip(tuned.targets, tuned.before):
            x.copy_(old)
        self._hyper_opt.state.clear()
        self._hyper_opt.state.update(tuned.snapshot)
        self._warn_nonfinite("validation loss or hypergradient")
        for index, group, _ in active:
            self._record(index, skipped=True, **self._values(group), val_loss=val_loss,
                         step=steps, **{f"hypergrad/{n}": math.nan for n in group["tune"]},
                         **self._schedule_record(index))

    def _publish(self, groups: list[tuple[dict[str, Any], list[Tensor]]], tuned: _Tuned,
                 active: Sequence[tuple[int, dict[str, Any], list[Tensor]]],
                 values: list[float], steps: float) -> None:
        """The values that changed into ``param_groups`` (and per-parameter ``state[p]``), and the
        hyper-update into ``history``."""
        spans = tuned.spans
        hyper_values = iter(values[1 : 1 + len(spans)])
        pairs = iter(values[1 + len(spans) :])
        hypers: dict[int, dict[str, float]] = {index: {} for index, _, _ in active}
        for index, name, _, _ in spans:
            group, ps = groups[index]
            hypers[index][f"hypergrad/{name}"] = next(hyper_values)
            natural, changed = next(pairs), next(pairs)
            if changed:
                group[name] = self.hyper_state["published"][index][name] = natural
                if self._per_parameter(group, name):
                    for p, a in zip(ps, tuned.naturals[index, name]):
                        self.state[p][name].copy_(a)
        for index, group, _ in active:
            self._record(index, **self._values(group), val_loss=values[0], step=steps,
                         **hypers[index], **self._schedule_record(index))

    def _watch_pinned_lr(self, active: Sequence[tuple[int, dict[str, Any], Any]]) -> None:
        """Warn once when a learned learning rate sits at an end of ``lr_bounds`` for
        :data:`_PINNED_UPDATES` consecutive hyper-updates: the bound, not the hypergradient, then
        sets it (IFTAdam's default upper bound of 1.0 is far above a useful Adam rate)."""
        runs = self._watch.setdefault("pinned", {})
        for index, group, _ in active:
            if "lr" not in group["tune"] or self._watch.get("pinned_warned"):
                continue
            lo, hi = group["lr_bounds"]
            end = next((e for e in (("upper", 1, hi), ("lower", 0, lo))
                        if math.isclose(group["lr"], e[2], rel_tol=1e-9)), None)
            runs[index] = runs.get(index, 0) + 1 if end is not None else 0
            if end is not None and runs[index] >= _PINNED_UPDATES:
                self._watch["pinned_warned"] = True
                warn(
                    f"{type(self).__name__}: the learned learning rate of param group {index} has "
                    f"sat at its {end[0]} bound lr_bounds[{end[1]}]={end[2]:g} for {runs[index]} "
                    "consecutive hyper-updates: the bound, not the hypergradient, sets it. If the "
                    "bound is deliberate, ignore this; otherwise widen lr_bounds or lower hyper_lr. "
                    "This warning is shown once."
                )

    def _values(self, group: dict[str, Any]) -> dict[str, float]:
        return {name: group[name] for name in self._tunable}

