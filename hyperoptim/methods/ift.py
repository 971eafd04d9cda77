r"""One-pass hyperparameter optimisation by implicit differentiation (Clarke et al., 2022) over any
update rule.

:class:`RuleIFT` is Algorithm 1 written once against an :class:`~hyperoptim.rules.UpdateRule`:
every ``update_interval`` steps, with :math:`\mathbf u(\lambda, w) = w - w'` the update the rule
takes (its state held constant) and :math:`J = \partial\mathbf u/\partial w`,

.. math::

    \frac{dL_V}{d\lambda} \approx -\nabla L_V^\top
        \sum_{0 \le j < i} (I - J)^j\, \frac{\partial \mathbf u}{\partial \lambda},

then one step of a hyper optimizer on the transformed hyperparameters. The public classes pair it
with a rule: ``IFTOptimizer`` (SGD, :mod:`hyperoptim.ift`) and ``IFTAdam``/``IFTAdamW`` (Adam,
:mod:`hyperoptim.ift_adam`). This module holds the construction, the groups and their
transforms, the step and the weight step; the hyper-update (the Neumann series, the hyper
optimizer's step, publishing and undoing it) is in :mod:`hyperoptim.methods.ift_hypergrad`.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..core.base import HyperOptimizer
from ..core.checks import check_value
from ..core.dist import world_size
from ..core.options import check_group, check_rule_arguments
from ..core.serialization import repeat_extras
from ..core.shard import check_sharded_hvp, complete_sums, is_sharded, local, local_parameters
from ..core.signatures import bind_keywords, declared
from ..core.types import Closure, ParamsT
from ..core.warn import warn
from ..hvp import SecondOrder
from ..hyperstep import RUNAWAY_STATE, react
from ..rules.base import Buffers, UpdateRule, rule_diagonals
from . import ift_schedule
from .ift_hypergrad import _HyperUpdate, vjp_through_update

__all__ = ["MOMENTUM_RANGE", "WEIGHT_DECAY_FLOOR", "RuleIFT"]

_NAMES = ("lr", "momentum", "weight_decay")
_PER_PARAMETER = {"lr": "per_parameter_lr", "weight_decay": "per_parameter_weight_decay"}
SHARINGS = ("weight", "unit")
TIMINGS = ("taken", "next")

WEIGHT_DECAY_FLOOR = 1e-7
"""The smallest weight decay a tuned run holds (log10 of 0 is -inf): Table 5's lowest initial
value."""

MOMENTUM_RANGE = (1e-3, 1.0 - 1e-3)
"""The interval a tuned momentum is held to when set from a float (logit of 0 or 1 is infinite)."""

HyperOptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]

def _ift_keywords(*, update_interval: int = 10, lookback: int = 5, hyper_lr: float = 0.05,
                  hyper_optimizer: type[Optimizer] | HyperOptimizerFactory | None = None,
                  lr_bounds: tuple[float, float] = (1e-10, 1.0), update_timing: str = "taken",
                  update_schedule: str = "warmup", reactive_decrease: bool = True,
                  stability_guard: bool | None = None, decay_accel: float | None = None,
                  lr_accel: float | None = None, warmup_accel: float = 1.5,
                  val_closure: Closure | None = None,
                  hvp: str = "auto", maximize: bool = False, foreach: bool | None = None,
                  fused: bool | None = None, differentiable: bool = False) -> None:
    """IFT's keyword arguments and their defaults, declared once: every public class's signature
    ends with them (:func:`~hyperoptim.core.signatures.with_keywords`) and its ``**options``
    takes them (:func:`ift_keywords`)."""


IFT_KEYWORDS = declared(_ift_keywords)


def ift_keywords(init: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """``options``, the keywords ``init`` took as ``**options``, completed with IFT's defaults."""
    return bind_keywords(init, options, IFT_KEYWORDS)


RUNAWAY_MARGIN = 2.0
r"""How far above its own scale the training loss must be for ``reactive_decrease`` to act:
:math:`L_t > \ell + 2 \max(L_0 - \ell, |\ell|)` (3x the smoothed running minimum early on),
twice :class:`~hyperoptim.ScaleFree`'s margin. IFT reads every step's loss, where ``ScaleFree``
reads it with a hypergradient beside it; measured (``benchmarks/versus.py``'s large starts, 5
seeds, and 50 tiny regressions with random targets whose 7-row batches differ up to 4x): at
ScaleFree's margin the watch tripped on 12 of the 50 noise-only runs, at 2x on 5, at 4x on none;
from SGD's lr 1.0 with momentum 0.9 diabetes ended at 0.577 (1x), 0.483 (2x), 0.901 (4x) against
0.471 from the good start, and the digits CNN kept 4, 2 and 0 of 5 seeds alive."""


EDGE_TARGET = 0.8
r"""Where ``stability_guard`` puts a learning rate it cuts: at 0.8 of the rule's edge of stability,
:math:`a \leftarrow a \cdot 0.8\, E / \rho`. Measured (``benchmarks/versus.py``, SGD from lr 1.0
with momentum 0.9, 5 seeds): the digits CNN ended at 98.1% (0.8), 97.7% (0.5) and 96.0% (1.0,
where the next step's sharpening trips it again at once) against 97.9% from the good start."""

EDGE_MAX_CUT = 10.0
"""The most ``stability_guard`` divides a learning rate by in one step: a single batch whose
gradient lies along a sharp direction (the character LSTM's, late in a run from lr 1.0) gave
:math:`\rho` 70x the edge, and a cut to 0.013 left that seed at perplexity 9.86 against 9.0-9.4;
at most 10x per step, it ended at 9.67, and a genuine runaway trips the guard again the next
step."""


EDGE_GROWTH = 4.0
r"""The fastest growth per step of :math:`\rho / E` that ``stability_guard``'s spacing of its
warm-up checks allows for (:func:`edge_skip`): on the digits CNN from lr 1.0 with momentum 0.9 it
went 0.12, 0.51, 1.30 at steps 5, 7 and 8 (2.5x in the last step), and later in the same run
0.18 to 2.7 in two steps (3.9x a step). At 3 another seed's check came a step late and its run
ended 5 points lower (92.8%); at 4 the versus benchmark's runs ended within seed noise of those
checked at every step of the warm-up."""

EDGE_MAX_SKIP = 7
"""The most warm-up steps ``stability_guard`` lets pass between two checks."""

EDGE_WARN_CUT = 2.0
"""The smallest cut (divisor) ``stability_guard``'s one warning speaks for. A smaller one holds a
learning rate the hyper-updates raised to the edge (``lr_accel``'s climb takes a learning rate
there on small full-batch problems: a 1.3x cut at step 139 of a tanh regression, its loss
falling); a start 10x too large is cut 2-10x (the digits CNN from lr 1.0: 3-10x)."""


def edge_skip(ratio: float) -> int:
    r"""The warm-up steps the stability guard may leave unchecked after a check whose largest
    :math:`\rho / E` (after any cut) is ``ratio``: the most :math:`n` with
    :math:`\text{ratio} \cdot G^{n} < 1` for every skipped step, :math:`G` =
    :data:`EDGE_GROWTH`, at most :data:`EDGE_MAX_SKIP`; 0 (check the next step) from 1/4 up, the
    most for a direction of zero or negative curvature. Why: a check costs a Hessian-vector
    product, and the character LSTM of ``benchmarks/versus.py`` spends its whole 100-step run in
    the warm-up at :math:`\rho / E` of 0.001-0.05: checked at every step, ``IFTOptimizer``'s run
    took 2.5x as long; spaced, it checks 31 of the 100 steps.

    Example:
        >>> edge_skip(0.8), edge_skip(0.2), edge_skip(0.02), edge_skip(-0.1)
        (0, 1, 2, 7)
    """
    if not ratio > 0.0:
        return EDGE_MAX_SKIP
    n = 0
    while n < EDGE_MAX_SKIP and ratio * EDGE_GROWTH ** (n + 1) < 1.0:
        n += 1
    return n


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


def _hyper_shape(p: Tensor, sharing: str) -> tuple[int, ...]:
    """Shape of a per-parameter hyperparameter of ``p``: one per weight, or one per output unit
    (shared over every dimension but the first, i.e. over a unit's incoming weights or a
    convolution kernel; tensors of dimension <= 1 have one value per entry either way)."""
    if sharing == "unit" and p.dim() >= 2:
        return (p.shape[0],) + (1,) * (p.dim() - 1)
    return tuple(p.shape)


def _rule_call(fn: Callable[..., tuple[Any, Any]], params: Sequence[Tensor],
               grads: Sequence[Tensor], buffers: Buffers, hypers: dict[str, Any],
               counts: Sequence[float] | None, options: dict[str, Any]) -> tuple[Any, Any]:
    """``fn(params, grads, buffers, hypers, counts, **options)``, a rule's ``step`` or ``step_``;
    where a hyperparameter is a list (one tensor per parameter) the rule steps one parameter at a
    time with that parameter's values, and the per-parameter results are joined back in order."""
    if not any(isinstance(v, list) for v in hypers.values()):
        return fn(params, grads, buffers, hypers, counts, **options)
    parts = [fn([p], [g], {name: [b[i]] for name, b in buffers.items()},
                {k: v[i] if isinstance(v, list) else v for k, v in hypers.items()},
                counts and [counts[i]], **options) for i, (p, g) in enumerate(zip(params, grads))]
    return _join([a for a, _ in parts]), _join([b for _, b in parts])


def _floor_as_zero(weight_decay: float | list[Tensor]) -> float | list[Tensor]:
    """``weight_decay`` (a float or one tensor per parameter) with values at or below
    :data:`WEIGHT_DECAY_FLOOR` set to 0."""
    if isinstance(weight_decay, list):
        return [w.masked_fill(w <= WEIGHT_DECAY_FLOOR, 0.0) for w in weight_decay]
    return 0.0 if weight_decay <= WEIGHT_DECAY_FLOOR else weight_decay


def _join(pieces: list[Any]) -> Any:
    """Per-parameter results of a rule, each a list or a dict of lists, joined in order."""
    if isinstance(pieces[0], dict):
        return {k: [x for piece in pieces for x in piece[k]] for k in pieces[0]}
    return [x for piece in pieces for x in piece]


class RuleIFT(_HyperUpdate, HyperOptimizer):
    r"""IFT over an inner update rule: the algorithm of :class:`~hyperoptim.IFTOptimizer`, written
    once (a base class; see ``IFTOptimizer`` over SGD, ``IFTAdam`` and ``IFTAdamW`` over Adam).

    Subclasses set ``rule`` (an :class:`~hyperoptim.rules.UpdateRule`) and ``_tunable`` (which of
    the rule's ``"lr"``, ``"momentum"``, ``"weight_decay"`` ``tune`` may name: Table 5's
    transforms are :math:`\log_{10}` for the first and last, logit for momentum), check their
    arguments (``_check_rule_group``) and call :meth:`_setup` from their constructor. The rule is
    reached only through its interface: its in-place step for every weight step, the same step on
    copies for the update a hyper-update judges, and its pure step for the update function

    .. math::

        \mathbf u(\lambda, w) = w - \Phi\big(w, \nabla L_T(w), s; \lambda\big)_w,

    the rule's new weights with its state :math:`s` before the step held constant (detached,
    Appendix A.4; Eq. 11 for Adam). Autograd through that step gives
    :math:`J = \partial\mathbf u/\partial w` (through :math:`\nabla L_T(w)`, hence the training
    Hessian, by the step's HVP route) for the Neumann series and
    :math:`\partial\mathbf u/\partial\lambda` for the hypergradient
    :math:`-\nabla L_V^\top \sum_{0 \le j < i} (I - J)^j\, \partial\mathbf u/\partial\lambda`;
    no derivative of a rule is typed here. Per-parameter values (a list of tensors for a name)
    step the rule one parameter at a time. Everything else (transforms, look-back, timing, the
    hyper optimizer, state, history, non-finite skips) is written once, here and, for the
    hyper-update, in :mod:`hyperoptim.methods.ift_hypergrad`.

    Example:
        >>> from hyperoptim.rules import SGD
        >>> class PlainIFT(RuleIFT):  # IFT over SGD with a fixed momentum
        ...     rule, _tunable = SGD, ("lr", "weight_decay")
        ...     def __init__(self, params, lr=0.01, weight_decay=1e-4, **kwargs):
        ...         defaults = dict(lr=lr, momentum=0.0, weight_decay=weight_decay,
        ...                         dampening=0.0, nesterov=False, tune=self._tunable,
        ...                         per_parameter_lr=False, per_parameter_weight_decay=False,
        ...                         sharing="weight", lr_bounds=(1e-10, 1.0))
        ...         self._setup(params, defaults, update_interval=2, lookback=2, hyper_lr=0.05,
        ...                     hyper_optimizer=None, update_timing="taken", hvp="auto", **kwargs)
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = PlainIFT([w], val_closure=lambda: (w ** 2).sum())
        >>> for _ in range(4):
        ...     _ = opt.step(lambda: ((w - 2) ** 2).sum())
        >>> len(opt.history[0]["lr"])
        2
    """

    rule: ClassVar[UpdateRule]
    # FSDP2: the hyper-update runs on this rank's shards (docs/design.md §8).
    _supports_fsdp2 = True

    # ------------------------------------------------------------------ the inner rule
    # What a public class gives: the rule, the names it can tune and the rule's argument checks.
    _tunable: tuple[str, ...] = _NAMES
    """The hyperparameters ``tune`` may name, in their canonical order (also recorded in
    ``history``)."""

    decay_accel_default: ClassVar[float] = 1.0
    """``decay_accel`` where the constructor gets None: off (the paper's) unless a class measured
    that it pays (:class:`~hyperoptim.IFTOptimizer`: 1.5)."""

    lr_accel_default: ClassVar[float] = 1.0
    """``lr_accel`` where the constructor gets None: off unless a class measured that it pays
    (:class:`~hyperoptim.IFTOptimizer`: 1.5)."""

    def _setup(self, params: ParamsT, defaults: dict[str, Any], *, update_interval: int,
               lookback: int, hyper_lr: float,
               hyper_optimizer: type[Optimizer] | HyperOptimizerFactory | None,
               update_timing: str, val_closure: Closure | None, hvp: str,
               update_schedule: str = "fixed", reactive_decrease: bool = False,
               warmup_accel: float = 1.0, stability_guard: bool | None = False,
               decay_accel: float | None = 1.0, lr_accel: float | None = 1.0,
               **flags: Any) -> None:
        """The rule-independent part of the constructor: IFT's own arguments, then the groups.
        ``update_schedule``, ``reactive_decrease``, ``warmup_accel``, ``stability_guard``,
        ``decay_accel`` and ``lr_accel`` default to the paper's behaviour here so that a rule
        written before those options (whose constructor does not pass them) keeps it; the public
        classes pass theirs (``decay_accel=None``, ``lr_accel=None``: the class's
        :attr:`decay_accel_default`, :attr:`lr_accel_default`)."""
        check_rule_arguments("ift", update_interval=update_interval, lookback=lookback,
                             hyper_lr=hyper_lr, hyper_optimizer=hyper_optimizer,
                             update_timing=update_timing, update_schedule=update_schedule,
                             reactive_decrease=reactive_decrease, warmup_accel=warmup_accel,
                             stability_guard=stability_guard, decay_accel=decay_accel,
                             lr_accel=lr_accel)
        if stability_guard and self.rule.edge is None:
            raise ValueError(f"Invalid stability_guard value: True ({type(self).__name__}'s "
                             f"{self.rule.name!r} rule has no edge of stability to guard; pass "
                             "None or False)")
        self.stability_guard = self.rule.edge is not None if stability_guard is None \
            else stability_guard
        self.decay_accel = float(self.decay_accel_default if decay_accel is None
                                 else decay_accel)
        self.lr_accel = float(self.lr_accel_default if lr_accel is None else lr_accel)
        self._check_group(defaults)
        self.update_interval = update_interval
        self.lookback = lookback
        self.update_timing = update_timing
        self.update_schedule = update_schedule
        self.reactive_decrease = reactive_decrease
        self.warmup_accel = float(warmup_accel)
        self._hyper_lr = float(hyper_lr)
        self._hyper_factory = hyper_optimizer
        self._hyper_opt: Optimizer | None = None
        super().__init__(params, self._normalised(defaults), val_closure=val_closure, hvp=hvp,
                         **flags)
        self.hyper_state.update(since_update=0, steps=0)
        if update_schedule == "warmup":
            self.hyper_state["warmup"] = ift_schedule.new_state(
                [group["tune"] for group in self.param_groups])
        if reactive_decrease:
            self.hyper_state["runaway"] = dict(RUNAWAY_STATE)
        if self._accelerates():
            self.hyper_state["stall"] = ift_schedule.new_stall()
        if self.decay_accel != 1.0:
            self.hyper_state["decay"] = [0] * len(self.param_groups)
        if self._climbs():
            self.hyper_state["climb"] = [0] * len(self.param_groups)
        if self.stability_guard:
            self.hyper_state["edge"] = {"skip": 0}
        self._hyper_opt = self._build_hyper_optimizer()

    # ------------------------------------------------------------------ groups
    @staticmethod
    def _check_rule_group(group: dict[str, Any]) -> None:
        """The inner rule's checks of a group's values (the public classes give their torch
        optimizer's)."""

    def _check_group(self, group: dict[str, Any]) -> None:
        # Every option (hyperoptim.core.options; a tuned lr within lr_bounds, a tuned momentum
        # within [0, 1], per-parameter values only for tuned names), what this rule tunes, and
        # the checks a rule outside the options table brings (_check_rule_group).
        check_group(self, group, getattr(self, "defaults", None))
        tune = group.get("tune", ())
        check_value("tune", tune, all(n in self._tunable for n in tune))
        self._check_rule_group(group)
        params = group.get("params", ())
        check_sharded_hvp(type(self).__name__, getattr(self, "hvp", "auto"), params)
        per_parameter = [key for name, key in _PER_PARAMETER.items()
                         if name in tune and group.get(key)]
        if per_parameter and any(is_sharded(p) for p in params):
            raise ValueError(f"{type(self).__name__}({per_parameter[0]}=True) does not support "
                             "FSDP2 (fully_shard) yet: use one value per param group.")

    @classmethod
    def _normalised(cls, group: dict[str, Any]) -> dict[str, Any]:
        out = dict(group)
        for name in cls._tunable:
            out[name] = float(out[name])
        out["tune"] = tuple(n for n in cls._tunable if n in out["tune"])
        for key in _PER_PARAMETER.values():
            out[key] = bool(out[key])
        out["lr_bounds"] = (float(out["lr_bounds"][0]), float(out["lr_bounds"][1]))
        return out

    @staticmethod
    def _per_parameter(group: dict[str, Any], name: str) -> bool:
        return name in _PER_PARAMETER and bool(group.get(_PER_PARAMETER[name], False))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_group(merged)
        normalised = self._normalised(merged)
        super().add_param_group({**param_group, **normalised})
        index = len(self.param_groups) - 1
        self._init_group(index, self.param_groups[index])
        ift_schedule.add_group(self.hyper_state.get("warmup"), self.param_groups[index]["tune"])
        if "decay" in self.hyper_state:
            self.hyper_state["decay"].append(0)
        if "climb" in self.hyper_state:
            self.hyper_state["climb"].append(0)
        if self._hyper_opt is not None:
            for group in self._hyper_groups(index):
                self._hyper_opt.add_param_group(group)

    def _init_group(self, index: int, group: dict[str, Any]) -> None:
        """Move tuned values into their transform's domain and create the transformed tensors."""
        device = next((p.device for p in group["params"]), None)
        transformed: dict[str, Tensor] = {}
        published: dict[str, float] = {}
        for name in group["tune"]:
            value = _into_domain(name, group[name], group["lr_bounds"])
            group[name] = published[name] = value
            if self._per_parameter(group, name):
                for p in group["params"]:
                    shape = _hyper_shape(p, group["sharing"])
                    self.state[p][name] = torch.full(shape, value, dtype=p.dtype, device=p.device)
                    self.state[p][f"log10_{name}"] = torch.full(shape, math.log10(value),
                                                                dtype=p.dtype, device=p.device)
            else:
                transformed[name] = torch.tensor(_transform(name, value), dtype=torch.float64,
                                                 device=device)
        self.hyper_state.setdefault("transformed", []).append(transformed)
        self.hyper_state.setdefault("published", []).append(published)

    def _stored(self, index: int, name: str, params: Sequence[Tensor] | None = None) -> list[Tensor]:
        """The transformed tensors of one tuned name of group ``index`` (for ``params``)."""
        group = self.param_groups[index]
        if self._per_parameter(group, name):
            return [self.state[p][f"log10_{name}"]
                    for p in (group["params"] if params is None else params)]
        return [self.hyper_state["transformed"][index][name]]

    def _hyper_groups(self, index: int) -> list[dict[str, Any]]:
        """The hyper optimizer's param groups for group ``index``: one per tuned name."""
        return [{"params": self._stored(index, name), "name": name}
                for name in self.param_groups[index]["tune"]]

    def _build_hyper_optimizer(self) -> Optimizer:
        groups = [g for i in range(len(self.param_groups)) for g in self._hyper_groups(i)]
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
                if self._per_parameter(group, name):
                    for p in group["params"]:
                        self.state[p][name].fill_(value)
                        self.state[p][f"log10_{name}"].fill_(math.log10(value))
                else:
                    self.hyper_state["transformed"][index][name].fill_(_transform(name, value))

    # ------------------------------------------------------------------ schedule
    def _warming_up(self) -> bool:
        """Whether this step is in the warm-up of ``update_schedule="warmup"``."""
        return ift_schedule.warming(self.update_schedule, self.hyper_state.get("warmup"))

    def _accelerates(self) -> bool:
        """Whether this optimizer's warm-up accelerates (``warmup_accel`` above 1)."""
        return self.update_schedule == "warmup" and self.warmup_accel != 1.0

    def _climbs(self) -> bool:
        """Whether this optimizer's warm-up has ``lr_accel``'s climb (above 1; it acts only in
        the warm-up of ``update_schedule="warmup"``)."""
        return self.update_schedule == "warmup" and self.lr_accel != 1.0

    def _watching_stall(self) -> bool:
        """Whether this step's training loss is read for the accelerated warm-up (it runs and no
        loss has left the band yet): under ``torch.distributed`` its mean rides in the step's
        agreement, as ``reactive_decrease``'s does."""
        stall = self.hyper_state.get("stall")
        return stall is not None and stall["stalled"] and self._warming_up()

    def _warmup_interval(self) -> int:
        """Steps between the warm-up's hyper-updates: 1 (a rule whose step moves each weight by
        about the learning rate, as Adam's does); heavy-ball SGD paces it by its momentum
        (:func:`~hyperoptim.methods.ift_schedule.momentum_pace`)."""
        return 1

    def _schedule_record(self, index: int | None = None) -> dict[str, float]:
        """What ``history`` records of the schedule at a hyper-update: under ``"warmup"``,
        ``"update_schedule/warmup"`` (1.0 for a hyper-update of the warm-up, 0.0 after it), the
        accelerated warm-up's factor (``"update_schedule/accel"``) and ``lr_accel``'s for param
        group ``index`` (``"update_schedule/climb"``)."""
        if self.update_schedule != "warmup":
            return {}
        record = {"update_schedule/warmup": 1.0 if self._warming_up() else 0.0}
        if self._accelerates():
            record["update_schedule/accel"] = self.__dict__.get("_accel_scale", 1.0)
        if self._climbs():
            record["update_schedule/climb"] = self.__dict__.get("_climb_scales", {}).get(
                index, 1.0)
        return record

    def _climb_scales(self) -> dict[int, float]:
        """``lr_accel``'s factor on each param group's learning-rate step at this step's
        hyper-update (:func:`~hyperoptim.methods.ift_schedule.climb_scale`); empty where it does
        not act (off, after the warm-up, or while the accelerated warm-up's factor is in
        force)."""
        climb = self.hyper_state.get("climb")
        if (climb is None or not self._warming_up()
                or self.__dict__.get("_accel_scale", 1.0) != 1.0):
            return {}
        return {index: ift_schedule.climb_scale(climb, index, self.lr_accel)
                for index in range(len(climb))}

    def _advance_schedule(self, spans: Sequence[tuple[int, str, int, int]],
                          hypergrads: Sequence[float]) -> None:
        """After an applied hyper-update: the warm-up reads each group's learning-rate
        hypergradient (the summed one ``history`` records) and ends once each has changed sign;
        ``decay_accel``'s runs read the weight decays' and, in the warm-up, ``lr_accel``'s the
        learning rates' (:func:`~hyperoptim.methods.ift_schedule.advance_decay`)."""
        runs = self.hyper_state.get("decay")
        if runs is not None:
            ift_schedule.advance_decay(runs, {index: h for (index, name, _, _), h
                                              in zip(spans, hypergrads) if name == "weight_decay"})
        if not self._warming_up():
            return
        lrs = {index: h for (index, name, _, _), h in zip(spans, hypergrads) if name == "lr"}
        climb = self.hyper_state.get("climb")
        if climb is not None:
            ift_schedule.advance_decay(climb, lrs)
        ift_schedule.advance(self.hyper_state["warmup"], lrs)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None = None, *,
             val_closure: Closure | None = None) -> Any:
        """One step: the rule's step (PyTorch's), and a hyper-update every ``update_interval`` steps
        (more often during the warm-up of ``update_schedule="warmup"``).

        Args:
            closure (callable, optional): recomputes and returns the training loss; it may call
                ``zero_grad()``/``backward()`` itself or not. Needed at hyper-update steps when
                ``lookback > 1`` (the graph of the training gradient gives the Hessian products).
            val_closure (callable, optional): overrides the constructor's ``val_closure`` for this
                step.

        Returns:
            The closure's loss, or None.
        """
        creating = self._creates_state(closure)
        self._sync_from_groups()
        taken = self.update_timing == "taken"
        since = self.hyper_state["since_update"]
        every = ift_schedule.interval(self.update_schedule, self.hyper_state.get("warmup"),
                                      self.update_interval, self._warmup_interval())
        hyper = (since + 1 >= every if taken else since >= every) and not creating
        second_order = hyper and self.lookback > 1
        if second_order and closure is None:
            self._refuse_missing_closure()
            return None
        # The stability guard reads H g at every step of the warm-up and at every hyper-update,
        # where a closure gives it (without one it sits the step out).
        second_order = second_order or (closure is not None and not creating
                                        and self._guarding(hyper))
        loss, second = self._training_loss(closure, second_order=second_order,
                                           share_loss=self.reactive_decrease
                                           or self._watching_stall())
        try:
            stepped = self._step_groups(loss, second, val_closure, hyper=hyper, taken=taken)
        finally:
            if second is not None:
                second.close()
        if stepped:
            self.hyper_state["since_update"] = (0 if taken else 1) if hyper else since + 1
            self.hyper_state["steps"] += 1
        return loss

    def _begin_step(self) -> bool:
        # Read before the group checks move an lr of 0 into lr_bounds (see _creates_state).
        self._lr_all_zero = all(g["lr"] == 0 for g in self.param_groups)
        return super()._begin_step()

    def _creates_state(self, closure: Callable[[], Any] | None) -> bool:
        """Is this torch.distributed.checkpoint's state-creating step (its ``_init_optim_state``:
        a fresh optimizer, no closure, every learning rate set to 0)? It is taken as a weight
        step without a hyper-update (none could run without a closure), to create the state
        whose keys DCP loads; the load then replaces the state, hyperparameters and
        ``hyper_state``."""
        return (closure is None and not self.state
                and bool(self.__dict__.get("_lr_all_zero", False)))

    def _refuse_missing_closure(self) -> None:
        """A hyper-update that needs the training gradient's graph, called without a closure:
        refused, unless no parameter has a gradient (then the step does nothing, as torch's)."""
        if any(p.grad is not None for p in self._all_params()):
            when = f"every update_interval={self.update_interval} steps"
            if self._warming_up():
                pace = min(self._warmup_interval(), self.update_interval)
                steps = "every step" if pace == 1 else f"every {pace} steps"
                when = (f"{steps} until the learning rate's hypergradient changes sign "
                        f"(update_schedule='warmup'), then {when}")
            raise ValueError(
                f"{type(self).__name__} needs second-order information at its hyperparameter "
                f"updates ({when}, lookback={self.lookback}): call step(closure) with a closure "
                "that recomputes and returns the training loss (it may call backward() itself), "
                "or use lookback=1."
            )

    def _step_groups(self, loss: Tensor | None, second: SecondOrder | None,
                     val_closure: Closure | None, *, hyper: bool, taken: bool) -> bool:
        """The guard, then the weight step (with the hyper-update where one is due); False where
        nothing was written (no gradients, a guarded or a skipped step)."""
        groups = [(group, self._params_with_grad(group)) for group in self.param_groups]
        if not any(params for _, params in groups):
            return False
        # The stability guard's sums ride in the guard's host sync.
        sums = self._edge_sums(groups, second) if self._guarding(hyper) else None
        reason, values = self._guard_read(loss, groups, worst_case=hyper, extra=sums)
        if reason is not None:
            return False
        value = self._step_loss(loss, values[0])
        undo, watched = self._runaway(value)
        ran_away = undo is not None  # the guard's cut below joins undo, not this warning
        skip, cut = None, []
        if sums is not None:
            undo, skip, cut = self._guard_stability(groups, values[len(values) - sums.numel():],
                                                    undo)
        stall = self._stall(value)
        # The accelerated warm-up's factor for this step's hyper-update (read by
        # _hyper_optimizer_step and _schedule_record; gone after the step).
        self.__dict__["_accel_scale"] = ift_schedule.accel_scale(
            self.update_schedule, self.hyper_state.get("warmup"), stall, self.warmup_accel)
        # lr_accel's, per param group, where the accelerated warm-up's is not in force.
        self.__dict__["_climb_scales"] = self._climb_scales() if hyper else {}
        try:
            stepped = True
            if hyper:
                stepped = self._hyper_step(groups, second, val_closure, taken)
            else:
                self._weight_steps(groups)
        except BaseException:
            if undo is not None:
                undo()
            raise
        finally:
            self.__dict__.pop("_accel_scale", None)
            self.__dict__.pop("_climb_scales", None)
        if not stepped and undo is not None:
            undo()
        if stepped and watched is not None:
            self.hyper_state["runaway"] = watched
            if ran_away:
                self._warn_runaway(values[0])
        if stepped and stall is not None:
            self.hyper_state["stall"] = stall
        if stepped and "climb" in self.hyper_state and (ran_away or cut):
            # A cut ends lr_accel's climb: the learning rate it was raising is past where it can
            # go (after the hyper-update's own count, so a cut at a hyper-update ends it too).
            self.hyper_state["climb"] = [0 if ran_away or k in cut else n
                                         for k, n in enumerate(self.hyper_state["climb"])]
        if stepped and "edge" in self.hyper_state:
            left = self.hyper_state["edge"]["skip"]
            self.hyper_state["edge"] = {"skip": skip if skip is not None else max(left - 1, 0)}
        return stepped

    def _step_loss(self, loss: Tensor | None, host_loss: float) -> float | None:
        """This step's training loss as the watches read it: its mean over ranks under
        ``torch.distributed`` (it rode in the step's agreement), else ``host_loss``, the guard's
        host copy (no sync of its own); ``None`` where the closure gave no single-valued loss."""
        shared = self.__dict__.pop("_shared_loss", None)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return None
        return shared if world_size() > 1 and shared is not None else host_loss

    def _stall(self, value: float | None) -> dict[str, Any] | None:
        """The accelerated warm-up's next stall state after this step's loss ``value``
        (:func:`~hyperoptim.methods.ift_schedule.watch_stall`), for the caller to commit if the
        step is taken; ``None`` where nothing is watched (no acceleration, or it has ended)."""
        if not self._watching_stall():
            return None
        return ift_schedule.watch_stall(self.hyper_state["stall"], value)

    def _warn_runaway(self, loss: float) -> None:
        """Say once that the reactive decrease cut the learning rates, and how to turn it off."""
        if self._watch.get("runaway_warned"):
            return
        self._watch["runaway_warned"] = True
        first = self.hyper_state["runaway"]["first"]
        warn(f"{type(self).__name__}: the training loss ran away ({loss:.4g}, from {first:.4g} at "
             "the first step): every learned learning rate was divided by 10 for this step "
             "(reactive_decrease), and will be again at each new high of the runaway. If this "
             "loss varies that much between batches by nature, pass reactive_decrease=False. "
             "This warning is shown once.")

    # ------------------------------------------------------------------ reactive decrease
    def _runaway(self, value: float | None
                 ) -> tuple[Callable[[], None] | None, dict[str, float] | None]:
        r"""``reactive_decrease``: the runaway watch of :func:`~hyperoptim.hyperstep.react` on
        this step's training loss ``value`` (:meth:`_step_loss`; ``None``: none).
        On a new high of a runaway every learned learning rate is divided by 10 before this
        step's update uses it. Returns ``(undo, state)``: how to restore the learning rates
        (``None`` where none changed) and the watch's next state (``None``: nothing to commit),
        both for the caller to apply only if the step is taken.

        Why: the hyper-updates come every ``update_interval`` steps (in the warm-up every
        :func:`~hyperoptim.methods.ift_schedule.momentum_pace` steps) and move :math:`\log_{10}`
        lr by about ``hyper_lr`` each, so a learning rate 10x too large runs away first: on
        full-batch diabetes from SGD's lr 1.0 with momentum 0.9 the loss overflowed at step 5,
        before any hyper-update; on the digits CNN the ReLUs died within 15 steps."""
        state = self.hyper_state.get("runaway")
        if state is None or value is None:
            return None, None
        if not math.isfinite(value):
            return None, None
        divisor, watched = react(-value if self.defaults["maximize"] else value, state,
                                 margin=RUNAWAY_MARGIN)
        if divisor is None or divisor == 1.0:
            return None, watched
        return self._shrink_lrs(divisor), watched  # None where no group learns its lr

    def _shrink_lrs(self, divisor: float | Sequence[float]) -> Callable[[], None] | None:
        """Divide every learned learning rate by ``divisor`` (held to ``lr_bounds``; one divisor
        per param group, 1 leaving a group alone): in ``param_groups`` and their transformed (or
        per-parameter) values alike, so the step's update and its hyper-update both read it.
        Returns the undo (``None`` where no group learns its learning rate: nothing changed)."""
        divisors = [divisor] * len(self.param_groups) if isinstance(divisor, (int, float)) \
            else list(divisor)
        saved: list[tuple[dict[str, Any], dict[str, float], float, list[Tensor], list[Tensor]]] = []
        for index, group in enumerate(self.param_groups):
            divisor = divisors[index]
            if "lr" not in group["tune"] or divisor == 1.0:
                continue
            published = self.hyper_state["published"][index]
            logs = self._stored(index, "lr")
            per_parameter = self._per_parameter(group, "lr")
            naturals = [self.state[p]["lr"] for p in group["params"]] if per_parameter else []
            tensors = [*logs, *naturals]
            saved.append((group, published, group["lr"], tensors, [t.clone() for t in tensors]))
            lo, hi = group["lr_bounds"]
            value = _into_domain("lr", group["lr"] / divisor, group["lr_bounds"])
            group["lr"] = published["lr"] = value
            if per_parameter:
                for log, natural in zip(logs, naturals):
                    natural.div_(divisor).clamp_(lo, hi)
                    log.copy_(natural.log10())
            else:
                logs[0].fill_(_transform("lr", value))

        def undo() -> None:
            for group, published, lr, tensors, copies in saved:
                group["lr"] = published["lr"] = lr
                for t, c in zip(tensors, copies):
                    t.copy_(c)

        return undo if saved else None

    # ------------------------------------------------------------------ stability guard
    def _guarding(self, hyper: bool) -> bool:
        """Whether ``stability_guard`` checks this step: in the warm-up, where the learning rate
        is still being found and moves fastest (and where a start 10x too large dies), as often
        as the last check's margin requires (:func:`edge_skip`), and at every hyper-update, the
        only steps that raise the learning rate after it (the reactive decrease only lowers it);
        never for groups that do not learn their learning rate."""
        edge = self.hyper_state.get("edge")
        due = hyper or (self._warming_up() and edge is not None and edge["skip"] == 0)
        return (self.stability_guard and due
                and any("lr" in group["tune"] for group in self.param_groups))

    def _edge_sums(self, groups: Sequence[tuple[dict[str, Any], list[Tensor]]],
                   second: SecondOrder | None) -> Tensor | None:
        r"""``stability_guard``'s numbers for this step, on the device: per param group
        :math:`g^\top J g` and :math:`g^\top g` (:meth:`_guard_stability`), summed across
        shards under FSDP2; ``None`` where the guard does not run this step (off, or no closure
        gave the gradient's second-order information)."""
        if second is None:
            return None
        params = [p for _, ps in groups for p in ps]
        sharded = any(is_sharded(p) for p in params)
        with local_parameters(self.state, params) as views:
            shards = iter(views)
            local_groups = [(group, [next(shards) for _ in ps]) for group, ps in groups]
            sums = self._local_edge_sums(local_groups, params, second)
        # complete_sums averages its last entry (a mean of something): a zero rides there.
        return complete_sums(torch.cat([sums, sums.new_zeros(1)]), sharded)[:-1]

    def _local_edge_sums(self, groups: Sequence[tuple[dict[str, Any], list[Tensor]]],
                         params: Sequence[Tensor], second: SecondOrder) -> Tensor:
        """:meth:`_edge_sums` on this rank's tensors (``groups`` hold what the rule steps,
        ``params`` the optimizer's own, in the same order): one Hessian-vector product."""
        weights = [p.detach() for _, ps in groups for p in ps]
        grads = [p.grad.detach() for _, ps in groups for p in ps]
        dw: list[Tensor] = []
        dg: list[Tensor] = []
        updates: list[Tensor] = []
        weight_leaves: list[Tensor] = []
        grad_leaves: list[Tensor] = []
        with torch.enable_grad():
            n = 0
            for group, ps in groups:
                ws, gs = weights[n:n + len(ps)], grads[n:n + len(ps)]
                n += len(ps)
                values = self._hypers(group, ps)
                diagonals = self._update_diagonals(group, ps, ws, gs, values) if ps else ([], [])
                if diagonals is not None:
                    dw += diagonals[0]
                    dg += diagonals[1]
                    continue
                # A rule without closed-form tangents: autograd through its update function.
                wl = [w.clone().requires_grad_() for w in ws]
                gl = [g.clone().requires_grad_() for g in gs]
                updates += self._update_functions(group, ps, wl, gl, values)
                weight_leaves += wl
                grad_leaves += gl
            if updates:
                jg = vjp_through_update(updates, params, weight_leaves, grad_leaves, grads, second)
            else:
                jg = vjp_through_update([], params, weights, grads, grads, second,
                                        diagonals=(dw, dg))
        zero = grads[0].new_zeros((), dtype=torch.float64)
        sums: list[Tensor] = []
        n = 0
        for _, ps in groups:
            pieces = range(n, n + len(ps))
            n += len(ps)
            sums.append(sum((torch.vdot(grads[i].flatten(), jg[i].flatten()).double()
                             for i in pieces), zero))
            sums.append(sum((torch.vdot(grads[i].flatten(), grads[i].flatten()).double()
                             for i in pieces), zero))
        return torch.stack(sums)

    def _guard_stability(self, groups: Sequence[tuple[dict[str, Any], list[Tensor]]],
                         sums: Sequence[float], undo: Callable[[], None] | None
                         ) -> tuple[Callable[[], None] | None, int, list[int]]:
        r"""``stability_guard``: each learned learning rate that puts this step's update past the
        rule's edge of stability is cut to :data:`EDGE_TARGET` of it, before the step uses it.

        With :math:`g` the step's training gradient and :math:`J = \partial u / \partial w` the
        Jacobian of the update function (the same one the Neumann series multiplies by; for SGD
        :math:`a (H + c I)`), the group's :math:`\rho = g^\top J g / g^\top g` (one Hessian-vector
        product by the step's HVP route, averaged across ranks; ``sums`` holds the numerator
        and denominator per group, :meth:`_edge_sums`, read in the guard's host sync) is the
        sharpness the update meets along the gradient, in units of the step. Where it exceeds
        the rule's edge :math:`E` (:attr:`~hyperoptim.rules.base.UpdateRule.edge`: :math:`2 (1 +
        m)` for heavy-ball SGD), the update grows along that direction instead of shrinking, and
        the learning rate is divided by :math:`\min(\rho / (0.8 E), 10)` (:data:`EDGE_MAX_CUT`).
        Returns the undo of everything this step changed so far (``undo``, the reactive
        decrease's, composed with the guard's), for the caller to apply if the step is not
        taken, the warm-up steps the next check may skip (:func:`edge_skip` of the largest
        :math:`\rho / E` left after the cut), and the param groups it cut.

        Why: from a learning rate 10x too large the loss stays flat for a few steps while the
        sharpness along the gradient grows (progressive sharpening), then one step throws the
        network over the edge and kills its ReLUs, before a hyper-update (every 10 steps at
        momentum 0.9) or a loss watch sees anything: on the digits CNN of
        ``benchmarks/versus.py`` from SGD's lr 1.0 with momentum 0.9 (seed 0), :math:`\rho / E`
        went 0.12, 0.51 and 1.30 at steps 5, 7 and 8, and the runs that died did so at steps
        11-16. From the good start (lr 0.1) it stayed below 0.4 for the whole run, so the guard
        never acts there."""
        ratios = []
        for k, (group, ps) in enumerate(groups):
            num, den = sums[2 * k], sums[2 * k + 1]
            if "lr" not in group["tune"] or not ps or not den > 0.0:
                ratios.append(0.0)
                continue
            edge = self.rule.edge(self.rule.hypers(group), self._options(group))
            ratios.append(num / den / edge)
        divisors = [min(r / EDGE_TARGET, EDGE_MAX_CUT) if r > 1.0 and math.isfinite(r) else 1.0
                    for r in ratios]
        skip = edge_skip(max(r / d for r, d in zip(ratios, divisors)))
        cut = self._shrink_lrs(divisors) if any(d != 1.0 for d in divisors) else None
        if cut is None:
            return undo, skip, []
        if max(divisors) >= EDGE_WARN_CUT:
            self._warn_edge(max(r for r, d in zip(ratios, divisors) if d >= EDGE_WARN_CUT))
        groups_cut = [k for k, d in enumerate(divisors) if d != 1.0]
        if undo is None:
            return cut, skip, groups_cut
        first = undo

        def both() -> None:
            cut()
            first()

        return both, skip, groups_cut

    def _warn_edge(self, worst: float) -> None:
        """Say once that the stability guard cut a learning rate, and how to turn it off."""
        if self._watch.get("edge_warned"):
            return
        self._watch["edge_warned"] = True
        warn(f"{type(self).__name__}: the learning rate put this step past the edge of stability "
             f"(the update's sharpness along the gradient was {worst:.3g}x the rule's edge): it "
             f"was cut to {EDGE_TARGET:g} of the edge for this step (stability_guard), and will "
             "be at every checked step that crosses it. Pass stability_guard=False to turn the "
             "guard off. This warning is shown once.")

    def _per_parameter_values(self, group: dict[str, Any], params: Sequence[Tensor], name: str
                              ) -> float | list[Tensor]:
        if name in group["tune"] and self._per_parameter(group, name):
            return [self.state[p][name] for p in params]
        return group[name]

    def _hypers(self, group: dict[str, Any], params: Sequence[Tensor]) -> dict[str, Any]:
        """The group's float hyperparameters for the rule, per-parameter values as lists.

        A tuned weight decay at or below :data:`WEIGHT_DECAY_FLOOR` (where a tuned 0 starts: its
        log needs a positive value) steps as 0, so a weight whose gradient is 0 stays where the
        torch optimizer with ``weight_decay=0`` leaves it (Adam's normalisation would turn even
        1e-7 into a step of about the learning rate). The hypergradient is still taken at the
        floor value (:meth:`_update_functions`), so the decay can learn away from it."""
        hypers = self.rule.hypers(group)
        for name in self._tunable:
            hypers[name] = self._per_parameter_values(group, params, name)
        if "weight_decay" in group["tune"]:
            hypers["weight_decay"] = _floor_as_zero(hypers["weight_decay"])
        return hypers

    def _options(self, group: dict[str, Any]) -> dict[str, Any]:
        """The rule's static options for ``group``."""
        return self.rule.options(group)

    def _peek_state(self, params: Sequence[Tensor]
                    ) -> tuple[list[dict[str, Any]], Buffers, list[float] | None]:
        """Each parameter's state as the rule sees it (a fresh one as the rule would start it,
        e.g. Adam's zero moments), its buffers and this step's counts; nothing is written."""
        keys = {*self.rule.buffer_names, *(("step",) if self.rule.uses_counts else ())}
        # init_state allocates (Adam: two moments), so only for a parameter that lacks a key.
        states = [s if keys <= s.keys() else {**self.rule.init_state(p), **s}
                  for p, s in zip(params, (self.state.get(p, {}) for p in params))]
        buffers: Buffers = {name: [s.get(name) for s in states] for name in self.rule.buffer_names}
        counts = [float(s["step"]) + 1.0 for s in states] if self.rule.uses_counts else None
        return states, buffers, counts

    def _weight_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """The rule's step (the torch optimizer's) with the group's current values, in place."""
        states = [self.state[p] for p in params]
        buffers, counts = self.rule.read_state(states, params)
        new, _ = _rule_call(self.rule.step_, params, [p.grad for p in params], buffers,
                            self._hypers(group, params), counts, self._options(group))
        self.rule.write_state(states, new)
        for p in params:  # torch.optim keeps no empty entries (SGD without momentum)
            if not self.state[p]:
                del self.state[p]

    def _weight_values(self, group: dict[str, Any], params: list[Tensor]
                       ) -> tuple[list[Tensor], list[dict[str, Any]]]:
        """The same step on copies, nothing written (so bit-identical to it): the new weights
        and, per parameter, the ``state[p]`` entries the step sets."""
        states, buffers, counts = self._peek_state(params)
        copies = {name: [None if b is None else b.clone() for b in bufs]
                  for name, bufs in buffers.items()}
        new = [p.detach().clone() for p in params]
        new_buffers, _ = _rule_call(self.rule.step_, new, [p.grad for p in params], copies,
                                    self._hypers(group, params), counts, self._options(group))
        entries = [{name: b for name, bs in new_buffers.items() if (b := bs[i]) is not None}
                   for i in range(len(params))]
        if self.rule.uses_counts:
            for entry, s in zip(entries, states):
                entry["step"] = s["step"] + 1
        return new, entries

    def _update_functions(self, group: dict[str, Any], params: Sequence[Tensor],
                          weights: Sequence[Tensor], grads: Sequence[Tensor],
                          values: dict[str, Any]) -> list[Tensor]:
        """``u = w - w'`` per parameter with ``w'`` the rule's pure step at ``(weights, grads)``,
        differentiable in ``weights``, ``grads`` and the tensors in ``values`` (the tuned
        hyperparameters; the others are the group's floats), the rule's state before the step
        held constant (App. A.4, Eq. 11)."""
        _, buffers, counts = self._peek_state(params)
        new, _ = _rule_call(self.rule.step, list(weights), list(grads), buffers,
                            {**self.rule.hypers(group), **values}, counts, self._options(group))
        return [w - n for w, n in zip(weights, new)]

    def _update_diagonals(self, group: dict[str, Any], params: Sequence[Tensor],
                          weights: Sequence[Tensor], grads: Sequence[Tensor],
                          values: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]] | None:
        r"""The diagonals of :math:`\partial u / \partial w` and :math:`\partial u / \partial g`
        at what :meth:`_update_functions` differentiates, from the rule's closed form
        (:func:`~hyperoptim.rules.rule_diagonals`): an elementwise rule's Jacobians are diagonal,
        so each Neumann term's product is two multiplications. ``None`` for a rule without a
        closed form (autograd of the update then)."""
        rule = self.rule
        if rule.tangents is None or not rule.elementwise:
            return None
        _, buffers, counts = self._peek_state(params)
        dw, dg = _rule_call(functools.partial(rule_diagonals, rule), list(weights), list(grads),
                            buffers, {**rule.hypers(group), **values}, counts, self._options(group))
        return [1 - x for x in dw], [x.neg_() for x in dg]

    def _weight_steps(self, groups: Sequence[tuple[dict[str, Any], list[Tensor]]]) -> None:
        """:meth:`_weight_step` for every group with gradients."""
        for group, params in groups:
            if params:
                self._weight_step(group, params)

    def _hyper_step(self, groups: list[tuple[dict[str, Any], list[Tensor]]],
                    second: SecondOrder | None, val_closure: Closure | None,
                    taken: bool) -> bool:
        """A step with a hyper-update; False where it was skipped (nothing changed).

        Under FSDP2 all of it runs on this rank's shards (:func:`local_parameters`): the rule
        and its diagonal Jacobians are elementwise, the Neumann series' vectors stay local and
        only the hypergradients' partial sums cross ranks (:meth:`_hyper_update`)."""
        val_closure = self._resolve_val_closure(val_closure, required=True)
        params = [p for _, ps in groups for p in ps]
        with local_parameters(self.state, params) as views:
            shards = iter(views)
            local_groups = [(group, [next(shards) for _ in ps]) for group, ps in groups]
            return self._hyper_step_on(local_groups, params, second, val_closure, taken)

    def _hyper_step_on(self, groups: list[tuple[dict[str, Any], list[Tensor]]],
                       params: list[Tensor], second: SecondOrder | None, val_closure: Closure,
                       taken: bool) -> bool:
        """:meth:`_hyper_step` with ``groups`` holding the tensors the rule steps (under FSDP2
        views of the local shards) and ``params`` the optimizer's own, in the same order."""
        sharded = any(is_sharded(p) for p in params)
        news = None
        if taken:
            # The update this step takes, as new tensors; the Hessian products below are then
            # taken at w_{t-1} by either route.
            news = [self._weight_values(group, ps) if ps else ([], []) for group, ps in groups]
            val_loss, val_grads = self._validation_grads_at([w for ws, _ in news for w in ws],
                                                            val_closure, params, sharded)
        else:
            val_loss, val_grads = self._validation_grads(val_closure, params,
                                                         average_loss=not sharded)
        val_grads = [local(g) for g in val_grads]
        if not self._hyper_update(groups, second, val_loss, val_grads, taken, params):
            return False
        # Commit the weights (and buffers) after every fallible call of the step.
        if news is None:
            self._weight_steps(groups)
        else:
            self._write_weights(groups, news)
        return True

    def _validation_grads_at(self, weights: Sequence[Tensor], val_closure: Closure,
                             params: list[Tensor], sharded: bool = False
                             ) -> tuple[Tensor, list[Tensor]]:
        """The validation loss and gradient with ``weights`` in the parameters' storage, the live
        weights put back bit for bit afterwards (through ``.data``: the version counters, and the
        training graph at the live weights that the exact HVP route differentiates, stay valid).
        Under FSDP2 (``sharded``) ``weights`` are this rank's shards and the loss is this
        rank's (:meth:`_hyper_update` averages it)."""
        previous = [local(p.data).clone() for p in params]
        try:
            for p, w in zip(params, weights):
                local(p.data).copy_(w)
            return self._validation_grads(val_closure, params, average_loss=not sharded)
        finally:
            for p, w in zip(params, previous):
                local(p.data).copy_(w)

    def _write_weights(self, groups: Sequence[tuple[dict[str, Any], list[Tensor]]],
                       news: Sequence[tuple[list[Tensor], list[dict[str, Any]]]]) -> None:
        """Write what :meth:`_weight_values` computed: the new weights and ``state[p]`` entries."""
        for (_, ps), (ws, entries) in zip(groups, news):
            for p, w, entry in zip(ps, ws, entries):
                p.copy_(w)
                if entry:
                    self.state[p].update(entry)

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        """Everything :class:`HyperOptimizer` saves, plus the hyper optimizer's state dict."""
        sd = super().state_dict()
        sd["hyper_optimizer"] = copy.deepcopy(self._hyper_opt.state_dict())
        repeat_extras(sd)  # torch.distributed.checkpoint keeps only state and param_groups
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved; a resumed run continues exactly."""
        state_dict = self._with_extras(dict(state_dict))
        saved = state_dict.get("hyper_state")
        warmup = saved.get("warmup") if isinstance(saved, dict) else None
        if warmup is not None and not ift_schedule.check_state(
                warmup, len(state_dict.get("param_groups", ()))):
            raise ValueError(f"{type(self).__name__}.load_state_dict: hyper_state['warmup'] is "
                             f"malformed: {warmup!r}")
        edge = saved.get("edge") if isinstance(saved, dict) else None
        if edge is not None and not (isinstance(edge, dict) and set(edge) == {"skip"}
                                     and isinstance(edge["skip"], int)
                                     and not isinstance(edge["skip"], bool)
                                     and 0 <= edge["skip"] <= EDGE_MAX_SKIP):
            raise ValueError(f"{type(self).__name__}.load_state_dict: hyper_state['edge'] is "
                             f"malformed: {edge!r}")
        for key in ("decay", "climb"):
            runs = saved.get(key) if isinstance(saved, dict) else None
            if runs is not None and not ift_schedule.check_decay(
                    runs, len(state_dict.get("param_groups", ()))):
                raise ValueError(f"{type(self).__name__}.load_state_dict: hyper_state[{key!r}] "
                                 f"is malformed: {runs!r}")
        stall = saved.get("stall") if isinstance(saved, dict) else None
        if stall is not None and not ift_schedule.check_stall(stall):
            raise ValueError(f"{type(self).__name__}.load_state_dict: hyper_state['stall'] is "
                             f"malformed: {stall!r}")
        runaway = saved.get("runaway") if isinstance(saved, dict) else None
        if runaway is not None and not (isinstance(runaway, dict)
                                        and set(runaway) == set(RUNAWAY_STATE)):
            raise ValueError(f"{type(self).__name__}.load_state_dict: hyper_state['runaway'] is "
                             f"malformed: {runaway!r}")
        hyper_opt_state = state_dict.pop("hyper_optimizer", None)
        with self._all_or_nothing():
            super().load_state_dict(state_dict)
            # The watch follows this optimizer's option: a state dict saved without it (the
            # option off, or a release before it) starts a fresh watch.
            if self.reactive_decrease:
                self.hyper_state.setdefault("runaway", dict(RUNAWAY_STATE))
            else:
                self.hyper_state.pop("runaway", None)
            # So does the accelerated warm-up's state: a state dict saved without it resumes
            # without acceleration (the run it continues had none).
            if self._accelerates():
                self.hyper_state.setdefault("stall", {**ift_schedule.new_stall(), "stalled": False})
            else:
                self.hyper_state.pop("stall", None)
            # The stability guard's spacing: one saved without it checks the next step.
            if self.stability_guard:
                self.hyper_state.setdefault("edge", {"skip": 0})
            else:
                self.hyper_state.pop("edge", None)
            # And decay_accel's runs: a state dict saved without them starts them at 0.
            if self.decay_accel != 1.0:
                self.hyper_state.setdefault("decay", [0] * len(self.param_groups))
            else:
                self.hyper_state.pop("decay", None)
            # And lr_accel's: one saved without them starts them at 0.
            if self._climbs():
                self.hyper_state.setdefault("climb", [0] * len(self.param_groups))
            else:
                self.hyper_state.pop("climb", None)
            self._hyper_opt = self._build_hyper_optimizer()
            if hyper_opt_state is not None:
                try:
                    self._hyper_opt.load_state_dict(hyper_opt_state)
                except (ValueError, KeyError, TypeError, RuntimeError) as err:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: hyper_optimizer: "
                                     f"{err!r}") from err
