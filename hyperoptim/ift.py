r"""One-pass hyperparameter optimisation by implicit differentiation (Clarke et al., 2022)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._base import LEARNED_LIMIT, HyperOptimizer, check_sgd_arguments, check_value, is_real
from ._hvp import SecondOrder
from ._types import Closure, ParamsT
from ._update import apply_update_, sgd_direction

__all__ = ["IFTOptimizer"]

_NAMES = ("lr", "momentum", "weight_decay")

WEIGHT_DECAY_FLOOR = 1e-7
"""The smallest weight decay a tuned run holds (log10 of 0 is -inf): Table 5's lowest initial
value."""

MOMENTUM_RANGE = (1e-3, 1.0 - 1e-3)
"""The interval a tuned momentum is held to when set from a float (logit of 0 or 1 is infinite)."""

HyperOptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]


def _into_domain(name: str, value: float, lr_bounds: tuple[float, float]) -> float:
    """``value`` moved into the domain where its transform is finite (a no-op inside it)."""
    value = float(value)
    if name == "lr":
        return min(max(value, lr_bounds[0]), lr_bounds[1])
    if name == "weight_decay":
        return max(value, WEIGHT_DECAY_FLOOR)
    return min(max(value, MOMENTUM_RANGE[0]), MOMENTUM_RANGE[1])


def _transform(name: str, value: float) -> float:
    """Table 5's optimisation space: log10 for lr and weight decay, logit for momentum."""
    if name == "momentum":
        return math.log(value / (1.0 - value))
    return math.log10(value)


def _natural(name: str, x: Tensor) -> Tensor:
    """The inverse of :func:`_transform`, differentiable: ``10 ** x`` or ``sigmoid(x)``."""
    if name == "momentum":
        return torch.sigmoid(x)
    return torch.pow(10.0, x)


class IFTOptimizer(HyperOptimizer):
    r"""SGD whose learning rate, momentum and weight decay learn from implicit hypergradients.

    A drop-in replacement for ``torch.optim.SGD`` (heavy-ball momentum, no dampening): every step
    is PyTorch's SGD step with the current hyperparameters, and every ``update_interval`` weight
    updates the hyperparameters :math:`\lambda` take one step of a hyper optimizer (Adam by
    default) on an approximate hypergradient of the validation loss :math:`L_V`. Training never
    restarts (one pass). This is Algorithm 1 of Clarke et al. (2022); with
    ``tune=("weight_decay",)`` it is Lorraine et al.'s (2020) method, the paper's baseline.

    **The update function.** With the momentum buffer :math:`v` held constant (detached, Appendix
    A.4), the weight update of PyTorch's SGD is a differentiable function of the hyperparameters
    and the weights,

    .. math::

        \mathbf u(\lambda, w) = a\,\big(b\, v + \nabla L_T(w) + c\, w\big), \qquad
        w \leftarrow w - \mathbf u(\lambda, w),

    written here with :func:`hyperoptim._update.sgd_direction`, the rule the step itself applies.

    **The hypergradient** (Eq. 6 with Eq. 2; the direct term :math:`\partial L_V/\partial\lambda`
    is 0 because the validation loss depends on the weights only). With lookback :math:`i` and
    :math:`J = \partial\mathbf u/\partial w` (which holds the training Hessian),

    .. math::

        \frac{dL_V}{d\lambda} \approx -\nabla L_V(w)^\top
            \sum_{0 \le j < i} (I - J)^j\, \frac{\partial \mathbf u}{\partial \lambda},

    computed without forming :math:`J`: :math:`q = p = \nabla L_V(w)`, then :math:`i - 1` times
    :math:`q \leftarrow q - J^\top q,\ p \leftarrow p + q` (vector-Jacobian products by double
    backward through the training gradient), then one product
    :math:`-(\partial\mathbf u/\partial\lambda)^\top p`. As :math:`i \to \infty` the sum tends to
    :math:`-\nabla L_V^\top J^{-1}\, \partial\mathbf u/\partial\lambda`, the implicit function
    theorem's best-response derivative (Section 2.3), when the series converges. Eq. 6 and the
    authors' code sum :math:`i` terms, so lookback :math:`i` matches the exact hypergradient
    through the last :math:`i` updates whenever the weights stay put (at a fixed point of
    :math:`\mathbf u` with no momentum); Algorithm 1 as printed loops :math:`i` times, one term
    more. ``lookback=1`` is the one-step (greedy) hypergradient and needs no second derivatives.

    **When.** The hyper-update runs at the start of every ``update_interval``-th step, at the
    current weights :math:`w_t`: it differentiates the update :math:`\mathbf u(\lambda, w_t)` that
    the step is about to take (with the buffer :math:`v_t` of the previous step), against
    :math:`\nabla L_V(w_t)`, then the step applies PyTorch's SGD with the new hyperparameters.
    Algorithm 1 likewise evaluates everything at the current :math:`(\lambda, w)`; the authors'
    code instead pairs the previous update at :math:`w_{t-1}` with :math:`\nabla L_V(w_t)`. The two
    agree under the method's constant-weight assumption (in four UCI Energy runs of 4000 steps
    they ended within 5% of each other's test loss), and the latter, with in-place weight
    updates, would need the graph of the previous step's gradient kept alive across the update.

    **Transforms** (Table 5). The hyper optimizer works on :math:`\log_{10}` of the learning rate
    and the weight decay and on :math:`\operatorname{logit}` of the momentum, and the hypergradient
    is taken with respect to those values. The :math:`\log_{10}` learning rate is clamped to
    :math:`\log_{10}` of ``lr_bounds`` after every update (the paper clips to
    :math:`[10^{-10}, 1]`). Where a tuned value has no finite transform (weight decay 0, momentum
    0 or 1) it starts from the nearest point of :data:`WEIGHT_DECAY_FLOOR` (1e-7) or
    :data:`MOMENTUM_RANGE` ([1e-3, 0.999]), and ``param_groups`` shows that value from the start.

    **State.** ``param_groups[i]`` holds the current ``lr``, ``momentum`` and ``weight_decay`` as
    Python floats (each changes only when its transformed value moves, so with ``hyper_lr=0``
    and values inside their transformed domain the weights are bit-identical to
    ``torch.optim.SGD``'s); assigning a new value to one of them restarts
    its transformed value from there. With ``per_parameter_lr=True`` every weight has its own
    learning rate (the paper's WD+HDLR+M), kept in ``state[p]["lr"]`` with its :math:`\log_{10}`
    in ``state[p]["log10_lr"]``; the group's ``"lr"`` shows their mean, and assigning to it resets
    them all. The transformed scalars, the hyper optimizer's state and the step counter are saved
    by :meth:`state_dict`, so a resumed run continues exactly.

    **History.** ``history[i]`` gets one entry per hyper-update: ``"lr"``, ``"momentum"``,
    ``"weight_decay"`` (the values after the update), ``"hypergrad/<name>"`` for each tuned name
    (with respect to its transformed value; with ``per_parameter_lr`` the sum over weights, i.e. the
    derivative for a common shift of every :math:`\log_{10}` learning rate), ``"val_loss"``
    (:math:`L_V(w_t)`), ``"step"`` (weight updates so far) and ``"skipped"``.

    **Cost.** A step between hyper-updates is SGD's step, with no host synchronisation. A
    hyper-update step asks the closure for the graph of the training gradient (when
    ``lookback > 1``), takes one validation gradient, ``lookback - 1`` vector-Jacobian products
    with respect to the weights (each about one Hessian-vector product) and one with respect to
    :math:`\lambda`, and synchronises with the host once.

    **Non-finite values.** A non-finite validation loss or hypergradient at a hyper-update skips
    that whole step: neither hyperparameters (nor the hyper optimizer's state) nor weights change,
    a ``RuntimeWarning`` says so once, ``history`` records it as skipped, and the next step tries
    again. Between hyper-updates the validation loss is not computed.

    Args:
        params (iterable): parameters or param-group dicts, as for ``torch.optim.SGD``. A group may
            set its own ``lr``, ``momentum``, ``weight_decay``, ``tune``, ``per_parameter_lr`` and
            ``lr_bounds``.
        lr (float, optional): initial learning rate (default: 1e-3).
        momentum (float, optional): initial momentum factor (default: 0).
        weight_decay (float, optional): initial L2 penalty (default: 0).
        tune (sequence of str, optional): which of ``"lr"``, ``"momentum"``, ``"weight_decay"``
            learn; the others stay fixed (default: all three, the paper's WD+LR+M).
        per_parameter_lr (bool, optional): one learning rate per weight; needs ``"lr"`` in
            ``tune`` (default: False).
        update_interval (int, optional): weight updates between hyper-updates, :math:`T`
            (default: 10).
        lookback (int, optional): terms of the Neumann series, :math:`i` (default: 5).
        hyper_lr (float, optional): learning rate of the hyper optimizer, :math:`\kappa`; used when
            ``hyper_optimizer`` is None or a class (default: 0.05).
        hyper_optimizer (class or callable, optional): a ``torch.optim.Optimizer`` subclass (built
            as ``cls(groups, lr=hyper_lr)``) or a factory ``groups -> Optimizer`` over the
            transformed hyperparameters, one group per param group (default: None, Adam).
        lr_bounds (tuple of float, optional): :math:`(a_{\min}, a_{\max})` with
            :math:`0 < a_{\min} \le a_{\max}`, the range of a tuned learning rate (default:
            ``(1e-10, 1.0)``).
        val_closure (callable, optional): returns the validation loss from the live parameters;
            may be given to :meth:`step` instead (default: None).
        hvp (str, optional): how :math:`H Z` is computed (:mod:`hyperoptim._hvp`): ``"exact"``
            (double backward; the closure must return the loss without calling ``backward()``),
            ``"finite_difference"`` (central differences of gradients, two extra closure calls
            per tangent column; works with ``backward()`` in the closure, DDP,
            ``torch.compile``), or ``"auto"``: exact if the closure returns the loss without
            calling ``backward()``, finite differences if it calls it (default: ``"auto"``).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> xv, yv = torch.randn(16, 3), torch.randn(16, 1)
        >>> val = lambda: torch.nn.functional.mse_loss(model(xv), yv)
        >>> opt = IFTOptimizer(model.parameters(), lr=0.01, momentum=0.5, weight_decay=1e-4,
        ...                    update_interval=5, lookback=3, val_closure=val)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(20):
        ...     _ = opt.step(closure)
        >>> len(opt.history[0]["lr"]), sorted(k for k in opt.history[0] if k.startswith("hyper"))
        (3, ['hypergrad/lr', 'hypergrad/momentum', 'hypergrad/weight_decay'])

    References:
        R. M. Clarke, E. T. Oldewage, J. M. Hernández-Lobato. Scalable One-Pass Optimisation of
        High-Dimensional Weight-Update Hyperparameters by Implicit Differentiation. ICLR 2022.

        J. Lorraine, P. Vicol, D. Duvenaud. Optimizing Millions of Hyperparameters by Implicit
        Differentiation. AISTATS 2020.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        tune: Sequence[str] = _NAMES,
        per_parameter_lr: bool = False,
        update_interval: int = 10,
        lookback: int = 5,
        hyper_lr: float = 0.05,
        hyper_optimizer: type[Optimizer] | HyperOptimizerFactory | None = None,
        lr_bounds: tuple[float, float] = (1e-10, 1.0),
        val_closure: Closure | None = None,
        hvp: str = "auto",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        check_sgd_arguments(lr, momentum, dampening, weight_decay, nesterov)
        if dampening != 0 or nesterov:
            raise ValueError(f"Invalid {'dampening' if dampening != 0 else 'nesterov'} value: "
                             f"{dampening if dampening != 0 else nesterov} (IFTOptimizer implements "
                             "heavy-ball momentum without dampening, as Clarke et al. do)")
        check_value("update_interval", update_interval,
                    isinstance(update_interval, int) and not isinstance(update_interval, bool)
                    and update_interval >= 1)
        check_value("lookback", lookback,
                    isinstance(lookback, int) and not isinstance(lookback, bool) and lookback >= 1)
        check_value("hyper_lr", hyper_lr, is_real(hyper_lr) and hyper_lr >= 0)
        check_value("hyper_optimizer", hyper_optimizer,
                    hyper_optimizer is None or callable(hyper_optimizer))
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, tune=tune,
                        per_parameter_lr=per_parameter_lr, lr_bounds=lr_bounds)
        self._check_group(defaults)
        self.update_interval = update_interval
        self.lookback = lookback
        self._hyper_lr = float(hyper_lr)
        self._hyper_factory = hyper_optimizer
        self._hyper_opt: Optimizer | None = None
        super().__init__(params, self._normalised(defaults), val_closure=val_closure, hvp=hvp,
                         maximize=maximize, foreach=foreach, fused=fused,
                         differentiable=differentiable)
        self.hyper_state.update(since_update=0, steps=0)
        self._hyper_opt = self._build_hyper_optimizer()

    # ------------------------------------------------------------------ groups
    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        bounds = group["lr_bounds"]
        check_value("lr_bounds", bounds,
                    isinstance(bounds, (tuple, list)) and len(bounds) == 2
                    and all(isinstance(b, (int, float)) for b in bounds)
                    and 0.0 < bounds[0] <= bounds[1] < math.inf)
        tune = group["tune"]
        check_value("tune", tune,
                    isinstance(tune, (tuple, list)) and len(tune) > 0
                    and len(set(tune)) == len(tune) and all(n in _NAMES for n in tune))
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        check_sgd_arguments(lr, momentum, 0.0, wd, False)
        if "lr" in tune:  # log10 learning rate lives in the bounds
            check_value("lr", lr, bounds[0] <= lr <= bounds[1])
        if "momentum" in tune:  # logit momentum
            check_value("momentum", momentum, momentum <= 1.0)
        if group["per_parameter_lr"] and "lr" not in tune:
            raise ValueError(f"per_parameter_lr=True needs 'lr' in tune (tune={tuple(tune)})")

    @staticmethod
    def _normalised(group: dict[str, Any]) -> dict[str, Any]:
        out = dict(group)
        for name in _NAMES:
            out[name] = float(out[name])
        out["tune"] = tuple(n for n in _NAMES if n in out["tune"])
        out["per_parameter_lr"] = bool(out["per_parameter_lr"])
        out["lr_bounds"] = (float(out["lr_bounds"][0]), float(out["lr_bounds"][1]))
        return out

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_group(merged)
        normalised = self._normalised(merged)
        super().add_param_group({**param_group, **normalised})
        index = len(self.param_groups) - 1
        self._init_group(index, self.param_groups[index])
        if self._hyper_opt is not None:
            self._hyper_opt.add_param_group({"params": self._hyper_tensors(index)})

    def _init_group(self, index: int, group: dict[str, Any]) -> None:
        """Move tuned values into their transform's domain and create the transformed tensors."""
        device = next((p.device for p in group["params"]), None)
        transformed: dict[str, Tensor] = {}
        published: dict[str, float] = {}
        for name in group["tune"]:
            value = _into_domain(name, group[name], group["lr_bounds"])
            group[name] = published[name] = value
            if name == "lr" and group["per_parameter_lr"]:
                for p in group["params"]:
                    self.state[p]["lr"] = torch.full_like(p, value).detach()
                    self.state[p]["log10_lr"] = torch.full_like(p, math.log10(value)).detach()
            else:
                transformed[name] = torch.tensor(_transform(name, value), dtype=torch.float64,
                                                 device=device)
        self.hyper_state.setdefault("transformed", []).append(transformed)
        self.hyper_state.setdefault("published", []).append(published)

    def _hyper_tensors(self, index: int) -> list[Tensor]:
        """The tensors the hyper optimizer updates for group ``index``, in a fixed order."""
        group = self.param_groups[index]
        out: list[Tensor] = []
        for name in group["tune"]:
            if name == "lr" and group["per_parameter_lr"]:
                out.extend(self.state[p]["log10_lr"] for p in group["params"])
            else:
                out.append(self.hyper_state["transformed"][index][name])
        return out

    def _build_hyper_optimizer(self) -> Optimizer:
        groups = [{"params": self._hyper_tensors(i)} for i in range(len(self.param_groups))]
        factory = self._hyper_factory
        if factory is None:
            opt: Any = torch.optim.Adam(groups, lr=self._hyper_lr)
        elif isinstance(factory, type) and issubclass(factory, Optimizer):
            opt = factory(groups, lr=self._hyper_lr)
        else:
            opt = factory(groups)
        if not isinstance(opt, Optimizer):
            raise ValueError(f"Invalid hyper_optimizer value: {factory!r} (it returned {opt!r}, "
                             "not a torch.optim.Optimizer)")
        return opt

    def _sync_from_groups(self) -> None:
        """Respect values assigned to ``param_groups`` from outside: restart their transforms."""
        for index, group in enumerate(self.param_groups):
            published = self.hyper_state["published"][index]
            for name in group["tune"]:
                if group[name] == published[name]:
                    continue
                value = _into_domain(name, group[name], group["lr_bounds"])
                group[name] = published[name] = value
                if name == "lr" and group["per_parameter_lr"]:
                    for p in group["params"]:
                        self.state[p]["lr"].fill_(value)
                        self.state[p]["log10_lr"].fill_(math.log10(value))
                else:
                    self.hyper_state["transformed"][index][name].fill_(_transform(name, value))

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             val_closure: Closure | None = None) -> Any:
        """One step: a hyper-update every ``update_interval`` steps, then PyTorch's SGD step.

        Args:
            closure (callable, optional): recomputes and returns the training loss; it may call
                ``zero_grad()``/``backward()`` itself or not. Needed at hyper-update steps when
                ``lookback > 1`` (the graph of the training gradient gives the Hessian products).
            val_closure (callable, optional): overrides the constructor's ``val_closure`` for this
                step.

        Returns:
            The closure's loss, or None.
        """
        self._sync_from_groups()
        hyper = self.hyper_state["since_update"] >= self.update_interval
        second_order = hyper and self.lookback > 1
        if second_order and closure is None:
            if not any(p.grad is not None for p in self._all_params()):
                return None
            raise ValueError(
                f"{type(self).__name__} needs second-order information at its hyperparameter "
                f"updates (every update_interval={self.update_interval} steps, lookback="
                f"{self.lookback}): call step(closure) with a closure that recomputes and returns "
                "the training loss (it may call backward() itself), or use lookback=1."
            )
        loss, second = self._training_loss(closure, second_order=second_order)
        groups = [(group, self._params_with_grad(group)) for group in self.param_groups]
        if not any(params for _, params in groups):
            if second is not None:
                second.close()
            return loss
        if self._guard_step(loss, groups, worst_case=hyper) is not None:
            if second is not None:
                second.close()
            return loss
        if hyper:
            try:
                done = self._hyper_update(groups, second, val_closure)
            finally:
                if second is not None:
                    second.close()
            if not done:
                return loss
        for group, params in groups:
            if params:
                self._sgd_step(group, params)
        self.hyper_state["since_update"] = 1 if hyper else self.hyper_state["since_update"] + 1
        self.hyper_state["steps"] += 1
        return loss

    def _sgd_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """PyTorch's SGD step with the group's current (float) hyperparameters."""
        states = [self.state[p] for p in params]
        _, bufs, dirs = sgd_direction(
            params, [p.grad for p in params], [s.get("momentum_buffer") for s in states],
            group["momentum"], group["weight_decay"], inplace=True,
        )
        lr: float | list[Tensor] = group["lr"]
        if "lr" in group["tune"] and group["per_parameter_lr"]:
            lr = [s["lr"] for s in states]
        apply_update_(params, dirs, lr)
        for s, buf in zip(states, bufs):
            if buf is not None:
                s["momentum_buffer"] = buf

    def _hyper_update(self, groups: list[tuple[dict[str, Any], list[Tensor]]],
                      second: SecondOrder | None, val_closure: Closure | None) -> bool:
        """One hyperparameter update at the current weights; False where it was skipped."""
        val_closure = self._resolve_val_closure(val_closure, required=True)
        params = [p for _, ps in groups for p in ps]
        val_loss, val_grads = self._validation_grads(val_closure, params)

        # Per tuned hyperparameter: the stored tensors the hyper optimizer updates ("targets")
        # and detached copies of them that carry this step's graph ("leaves").
        active = [(index, group, ps) for index, (group, ps) in enumerate(groups) if ps]
        spans: list[tuple[int, str, int, int]] = []  # (group index, name, start, stop)
        targets: list[Tensor] = []
        leaves: list[Tensor] = []
        updates: list[Tensor] = []
        # The update as a function of (w, g): its vjp in w is (du/dw)^T q + H (du/dg)^T q, with
        # H (.) from the step's SecondOrder (either route).
        # Copies, not views: the finite-difference route moves the live weights in place.
        weight_leaves = [p.detach().clone().requires_grad_() for p in params]
        grad_leaves = [p.grad.detach().requires_grad_() for p in params]
        leaf_of = dict(zip(params, grad_leaves))
        weight_of = dict(zip(params, weight_leaves))
        with torch.enable_grad():
            for index, group, ps in active:
                values: dict[str, Any] = {n: group[n] for n in _NAMES}
                for name in group["tune"]:
                    per_weight = name == "lr" and group["per_parameter_lr"]
                    stored = ([self.state[p]["log10_lr"] for p in ps] if per_weight
                              else [self.hyper_state["transformed"][index][name]])
                    fresh = [x.detach().requires_grad_() for x in stored]
                    spans.append((index, name, len(leaves), len(leaves) + len(fresh)))
                    targets.extend(stored)
                    leaves.extend(fresh)
                    natural = [_natural(name, x) for x in fresh]
                    values[name] = natural if per_weight else natural[0]
                grads = [leaf_of[p] for p in ps]
                bufs = [self.state[p].get("momentum_buffer") for p in ps]
                # u(lambda, w) = lr * d(w; v, momentum, weight_decay), v detached (App. A.4).
                _, _, dirs = sgd_direction([weight_of[p] for p in ps], grads, bufs, values["momentum"],
                                           values["weight_decay"])
                lrs = values["lr"] if isinstance(values["lr"], list) else [values["lr"]] * len(ps)
                updates.extend(a * d for a, d in zip(lrs, dirs))

            # acc = sum_{j < i} ((I - J)^T)^j grad L_V by i - 1 vector-Jacobian products (Eq. 6).
            q = list(val_grads)  # fresh tensors, owned here: updated in place below
            acc = [g.clone() for g in val_grads]
            for _ in range(self.lookback - 1):
                jq = self._update_vjp(updates, params, weight_leaves, grad_leaves, q,
                                      cast(SecondOrder, second))
                for a, b, c in zip(q, jq, acc):
                    a.sub_(b)
                    c.add_(a)
            raw = torch.autograd.grad(updates, leaves, grad_outputs=acc, allow_unused=True)
        del updates
        hypergrads = [torch.zeros_like(x) if g is None else -g for x, g in zip(leaves, raw)]

        # The hyper optimizer steps before the step's one host sync; a skip restores the snapshot.
        before = [x.clone() for x in targets]
        snapshot = {k: {n: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)
                        for n, v in entry.items()}
                    for k, entry in self._hyper_opt.state.items()}
        for x, g in zip(targets, hypergrads):
            x.grad = g
        self._hyper_opt.step()
        for x in targets:
            x.grad = None

        reported: list[Tensor] = [val_loss.double().reshape(())]
        published: list[Tensor] = []  # (natural value, changed) per span
        new_lrs: dict[int, list[Tensor]] = {}
        for index, name, start, stop in spans:
            reported.append(torch.stack([g.sum() for g in hypergrads[start:stop]]).sum().double())
            group, ps = groups[index]
            if name == "lr":
                lo, hi = group["lr_bounds"]
                for x in targets[start:stop]:
                    x.clamp_(math.log10(lo), math.log10(hi))
            if name == "weight_decay":
                targets[start].clamp_(max=math.log10(LEARNED_LIMIT))
            if name == "lr" and group["per_parameter_lr"]:
                fresh = {p: _natural("lr", x) for p, x in zip(ps, targets[start:stop])}
                new_lrs[index] = list(fresh.values())
                every = [fresh.get(p, self.state[p]["lr"]) for p in group["params"]]
                mean = (torch.stack([a.sum().double() for a in every]).sum()
                        / sum(a.numel() for a in every))
                published += [mean, torch.ones((), dtype=torch.float64, device=mean.device)]
            else:
                x = targets[start]
                published += [_natural(name, x).double(), (x != before[start]).double()]
        device = reported[0].device
        values = torch.stack([t.to(device) for t in reported + published]).tolist()

        if not self._all_finite(*values):
            for x, old in zip(targets, before):
                x.copy_(old)
            self._hyper_opt.state.clear()
            self._hyper_opt.state.update(snapshot)
            self._warn_nonfinite("validation loss or hypergradient")
            for index, group, _ in active:
                self._record(index, skipped=True, **self._values(group), val_loss=values[0],
                             step=float(self.hyper_state["steps"]),
                             **{f"hypergrad/{n}": math.nan for n in group["tune"]})
            return False

        hyper_values = iter(values[1 : 1 + len(spans)])
        pairs = iter(values[1 + len(spans) :])
        hypers: dict[int, dict[str, float]] = {index: {} for index, _, _ in active}
        for index, name, _, _ in spans:
            group, ps = groups[index]
            hypers[index][f"hypergrad/{name}"] = next(hyper_values)
            natural, changed = next(pairs), next(pairs)
            if changed:
                group[name] = self.hyper_state["published"][index][name] = natural
                if name == "lr" and group["per_parameter_lr"]:
                    for p, a in zip(ps, new_lrs[index]):
                        self.state[p]["lr"].copy_(a)
        for index, group, _ in active:
            self._record(index, **self._values(group), val_loss=values[0],
                         step=float(self.hyper_state["steps"]), **hypers[index])
        return True

    @staticmethod
    def _update_vjp(updates: list[Tensor], params: list[Tensor], weights: list[Tensor],
                    grads: list[Tensor], q: list[Tensor], second: SecondOrder) -> list[Tensor]:
        r""":math:`(\partial u / \partial w)^\top q`, ``u`` a function of ``(w, g(w))``.

        The rule's own vjp gives the direct term and the gradient's cotangent; the latter goes
        through :math:`H` by the step's HVP route (averaged across ranks).
        """
        raw = torch.autograd.grad(updates, weights + grads, grad_outputs=q, retain_graph=True,
                                  allow_unused=True)
        n = len(params)
        direct = [torch.zeros_like(p) if j is None else j for p, j in zip(params, raw[:n])]
        through_g = {p: (torch.zeros_like(p) if j is None else j) for p, j in zip(params, raw[n:])}
        hq = second.hvp([through_g.get(p, torch.zeros_like(p)).unsqueeze(0) for p in second.params])
        by_param = dict(zip(second.params, hq))
        return [d + by_param[p][0] if p in by_param else d for p, d in zip(params, direct)]

    @staticmethod
    def _values(group: dict[str, Any]) -> dict[str, float]:
        return {name: group[name] for name in _NAMES}

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        """Everything :class:`HyperOptimizer` saves, plus the hyper optimizer's state dict."""
        sd = super().state_dict()
        sd["hyper_optimizer"] = copy.deepcopy(self._hyper_opt.state_dict())
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved; a resumed run continues exactly."""
        state_dict = dict(state_dict)
        hyper_opt_state = state_dict.pop("hyper_optimizer", None)
        super().load_state_dict(state_dict)
        self._hyper_opt = self._build_hyper_optimizer()
        if hyper_opt_state is not None:
            self._hyper_opt.load_state_dict(hyper_opt_state)
