r"""Forward-mode differentiation with hyperparameter sharing (FDS; Micaelli & Storkey, 2021), written
once over any update rule (docs/design.md §3, §4).

:class:`RuleFDS` is the method: episodes of ``horizon`` inner steps of an
:class:`~hyperoptim.rules.UpdateRule` driven by piecewise-constant schedules of the rule's
hyperparameters, the forward-mode tangents of the weights and of every buffer of the rule with
respect to each tuned schedule value, and at the end of an episode the sign-based outer update.
The public classes pair it with a rule: :class:`~hyperoptim.FDSSGD` (SGD),
:class:`~hyperoptim.FDSAdam` and :class:`~hyperoptim.FDSAdamW` (Adam/AdamW).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from ..core.base import LEARNED_LIMIT, HyperOptimizer
from ..core.checks import check_value, is_real
from ..core.dist import all_reduce_mean, world_size
from ..core.options import check_group, components, is_number, renamed_group, renamed_options
from ..core.schedule import window_of
from ..core.shard import (
    any_nonzero,
    any_sharded,
    check_sharded_hvp,
    complete_sums,
    local,
    local_parameters,
)
from ..core.types import Closure, ParamsT
from ..core.warn import warn
from ..hvp import SecondOrder
from ..rules.base import UpdateRule, rule_tangents
from .fds_outer import LOG_STEP, LOG_STEP_MAX, OUTER_STEPS, FDSOuterStep

__all__ = ["LOG_STEP", "LOG_STEP_MAX", "OUTER_STEPS", "RuleFDS"]

_Z = "fds_z"
#: How :math:`H Z` runs over its columns on the exact route: one batched double backward, a
#: per-column loop, or whichever a measurement at each new column count finds cheaper.
HVP_COLUMNS = ("batched", "loop", "auto")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _first_step(k: int, horizon: int, n_windows: int) -> int:
    """The first step of window ``k``: the least t with ``window_of(t) == k``, ceil(kT/N)."""
    return -(-k * horizon // n_windows)


def _one_hot(like: Tensor, n: int, j: int) -> Tensor:
    """Column ``j`` of ``n`` as a seed vector in ``like``'s dtype and device."""
    seed = like.new_zeros(n)
    seed[j] = 1.0
    return seed


class RuleFDS(FDSOuterStep, HyperOptimizer):
    r"""FDS over an inner update rule :math:`\Phi`: the algorithm of :class:`~hyperoptim.FDSSGD`,
    written once.

    Every hyperparameter :math:`x` in :attr:`names` follows a schedule of ``x_windows`` values
    shared over contiguous steps of the episode; the values in force at step :math:`t` are
    :math:`\lambda(t)`. With :math:`Z` the tangent of the weights and :math:`S` those of the rule's
    buffers (SGD's velocity; Adam's two moments), one column per tuned schedule value
    :math:`\lambda_j`,

    .. math::

        (Z, S)_{t+1} = \frac{\partial \Phi}{\partial (w, s)} (Z, S)_t
            + \frac{\partial \Phi}{\partial g} H_t Z_t
            + \sum_x \frac{\partial \Phi}{\partial x}\, e_x(t),
        \qquad \frac{\partial E(w_T)}{\partial \lambda_j} = \langle \nabla E(w_T), Z_T[:, j] \rangle,

    with :math:`e_x(t)` the one-hot column of the window of :math:`x` that step :math:`t` uses
    (Micaelli & Storkey 2021, Eq. 4 and App. A). The Jacobian-vector products come from autograd
    of the rule (:func:`hyperoptim.rules.rule_tangents`), so nothing here knows its formula; the
    weights themselves move by the rule's in-place step with float hyperparameters, bit for bit
    the torch optimizer's. :math:`H_t Z_t` is one batched product over the columns already used
    (``hvp=``), optionally clipped elementwise to ``hz_clip``. Only the columns of windows already
    reached are stored. At the end of an episode, :meth:`hyperstep` moves every tuned value
    against the sign of its hypergradient, halving the step on a sign flip: by a fixed step
    (``outer_step="additive"``, the paper's) or, for the positive values of :attr:`log_names`,
    by a factor that grows while the sign repeats, undone after a worse episode
    (``outer_step="log"``; :meth:`_sign_update`, :meth:`_log_outer`).

    Subclasses set :attr:`rule`, :attr:`names` (the schedulable hyperparameters, a subset of the
    rule's ``hyper_names``), :attr:`default_step_sizes`, :attr:`buffer_tangent_keys` (the
    ``state[p]`` key of the tangent of each of the rule's buffers), where a value must stay in
    a range, :attr:`bounds`, and, where they differ from the learning rate and weight decay,
    :attr:`log_names`; they check their own constructor arguments and pass the group defaults
    (the initial value of every name, ``horizon``, ``<name>_windows``, ``tune``, ``hyper_lr``,
    ``hz_clip``, ``outer_step`` and the rule's options) to ``__init__``. A subclass whose param
    groups show a value under another key (Adam's ``betas``) overrides
    :meth:`_get_value`/:meth:`_set_value`.

    Args:
        params (iterable): parameters or param-group dicts.
        defaults (dict): the group defaults described above.
        val_closure, hvp, maximize, foreach, fused, differentiable: as for
            :class:`~hyperoptim.HyperOptimizer`.

    Example:
        >>> from hyperoptim import FDSAdam
        >>> issubclass(FDSAdam, RuleFDS), FDSAdam.names
        (True, ('lr', 'beta1', 'beta2', 'weight_decay'))

    References:
        P. Micaelli, A. Storkey. Gradient-based Hyperparameter Optimization Over Long Horizons.
        NeurIPS 2021.
    """

    rule: ClassVar[UpdateRule]
    names: ClassVar[tuple[str, ...]]
    default_step_sizes: ClassVar[dict[str, float]]
    buffer_tangent_keys: ClassVar[dict[str, str]]
    bounds: ClassVar[dict[str, tuple[float, float]]] = {}
    _renamed_options = renamed_options("fds")
    # FSDP2: tangents sharded beside each parameter shard (docs/design.md §8).
    _supports_fsdp2 = True

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *,
                 val_closure: Closure | None = None, hvp: str = "auto",
                 hvp_columns: str = "batched", maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None,
                 differentiable: bool = False) -> None:
        horizon = defaults["horizon"]
        check_value("horizon", horizon, _is_count(horizon) and horizon >= 1)
        check_value("hvp_columns", hvp_columns,
                    isinstance(hvp_columns, str) and hvp_columns in HVP_COLUMNS)
        self.hvp_columns = hvp_columns
        # A subclass that does not pass outer_step (written before it existed) keeps the
        # paper's step, as IFT's _setup keeps the paper's interval; the public classes pass "log".
        defaults = self._checked_options({"outer_step": "additive", **defaults}, horizon)
        super().__init__(params, defaults, val_closure=val_closure, hvp=hvp, maximize=maximize,
                         foreach=foreach, fused=fused, differentiable=differentiable)
        self.hyper_state.update(step=0, episode=0, outer={}, episode_skipped=0)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Pickled before the choice existed: "batched". torch's load_state_dict calls this too,
        # with state and param_groups only: the optimizer's own choice stays.
        if "hvp_columns" not in state and "hvp_columns" not in self.__dict__:
            state["hvp_columns"] = "batched"
        super().__setstate__(state)

    def __repr__(self) -> str:
        text = super().__repr__()
        if self.hvp_columns != "batched":
            text = text[:-1] + f"hvp_columns: {self.hvp_columns}\n)"
        return text

    # ------------------------------------------------------------------ values in groups
    @classmethod
    def _bounds(cls, name: str) -> tuple[float, float]:
        """The range a learned value of ``name`` stays in (default: :data:`LEARNED_LIMIT`)."""
        return cls.bounds.get(name, (-LEARNED_LIMIT, LEARNED_LIMIT))

    @classmethod
    def _get_value(cls, group: dict[str, Any], name: str) -> Any:
        """The value of ``name`` that ``group`` shows (``group[name]``)."""
        return group[name]

    @classmethod
    def _set_value(cls, group: dict[str, Any], name: str, value: float) -> None:
        group[name] = value

    def _check_group(self, group: dict[str, Any]) -> None:
        # Learned schedule values may be negative (the paper's ranges include them), so the
        # base's SGD checks do not apply. A class in the options table (FDSSGD) gets its checks
        # (hyperoptim.core.options); every class checks its schedules against its rule's ranges.
        check_sharded_hvp(type(self).__name__, self.hvp, group.get("params", ()))
        if components(self) is not None:
            check_group(self, group, self.defaults)
        elif group.get("maximize", False) != self.defaults.get("maximize", False):
            raise ValueError(f"Invalid maximize value: {group['maximize']} (every param group of "
                             "one optimizer shares one objective: set it in the constructor)")
        if "hyper_lr" in group:  # read at the next hyperstep(): refused now, not then
            check_value("hyper_lr", group["hyper_lr"],
                        self._normalise_step_sizes(group["hyper_lr"]) is not None)
        if "outer_step" in group:
            check_value("outer_step", group["outer_step"], group["outer_step"] in OUTER_STEPS)
        for name in self.names:
            schedule = group.get(f"{name}_schedule")
            if schedule is not None:
                lo, hi = self._bounds(name)
                check_value(f"{name}_schedule", schedule, isinstance(schedule, (list, tuple))
                            and all(is_real(v) and lo <= v <= hi for v in schedule))
            # The value in force too: a checkpoint holding NaN is refused when it is loaded, not
            # at the next step (where it would look assigned by a scheduler).
            if name in group:
                check_value(name, group[name], is_real(group[name])
                            and abs(group[name]) <= LEARNED_LIMIT)

    def _learned_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ()  # the schedules are watched here (_take_user_values), not by the base

    # ------------------------------------------------------------------ configuration
    @classmethod
    def _normalise_tune(cls, tune: Any) -> tuple[str, ...] | None:
        """``tune`` as a tuple in :attr:`names` order, or None if it names anything else."""
        if isinstance(tune, str):
            tune = (tune,)
        if not isinstance(tune, Iterable):
            return None
        names = list(tune)
        if not all(isinstance(n, str) and n in cls.names for n in names):
            return None
        return tuple(n for n in cls.names if n in names)

    @classmethod
    def _normalise_step_sizes(cls, hyper_lr: Any) -> dict[str, float] | None:
        """``hyper_lr`` as one step size per name, or None if invalid: a number is every name's,
        a dict is merged into :attr:`default_step_sizes`, None is the defaults."""
        if hyper_lr is None:
            return dict(cls.default_step_sizes)
        if not isinstance(hyper_lr, Mapping):
            hyper_lr = dict.fromkeys(cls.default_step_sizes, hyper_lr)
        if not all(k in cls.names and is_real(v) and 0 < v <= LEARNED_LIMIT
                   for k, v in hyper_lr.items()):
            return None
        return {**cls.default_step_sizes, **{k: float(v) for k, v in hyper_lr.items()}}

    @classmethod
    def _checked_options(cls, group: dict[str, Any], horizon: int) -> dict[str, Any]:
        """Validate a group's options (ValueError "Invalid <name> value") and normalise them."""
        group = dict(group)
        for name in cls.names:
            value = cls._get_value(group, name)
            check_value(name, value, is_number(value) and 0 <= float(value) <= cls._bounds(name)[1])
            cls._set_value(group, name, float(value))
        check_value("horizon", group["horizon"], group["horizon"] == horizon)
        for name in cls.names:
            key = f"{name}_windows"
            n = group[key]
            if not (_is_count(n) and 1 <= n <= horizon):
                raise ValueError(f"Invalid {key} value: {n} (expected 1 <= {key} <= "
                                 f"horizon={horizon})")
        tune = cls._normalise_tune(group["tune"])
        check_value("tune", group["tune"], tune is not None)
        group["tune"] = tune
        sizes = cls._normalise_step_sizes(group["hyper_lr"])
        check_value("hyper_lr", group["hyper_lr"], sizes is not None)
        group["hyper_lr"] = sizes
        clip = group["hz_clip"]
        check_value("hz_clip", clip, clip is None or (is_real(clip) and clip > 0))
        group["hz_clip"] = None if clip is None else float(clip)
        check_value("outer_step", group["outer_step"], group["outer_step"] in OUTER_STEPS)
        return group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.hyper_state.get("step", 0):
            # A group's columns would land among those already carried by the tangents.
            raise RuntimeError(f"{type(self).__name__}: add param groups between episodes (after "
                               "hyperstep()), not in the middle of one.")
        param_group = renamed_group(type(self).__name__, param_group, self._renamed_options,
                                    where=" as a param group key")
        options = {k: v for k, v in param_group.items() if k != "params"}
        merged = self._checked_options({**self.defaults, **options}, self.defaults["horizon"])
        group = {**param_group, **{k: merged[k] for k in options if k in merged}}
        for name in self.names:
            key, n = f"{name}_schedule", merged[f"{name}_windows"]
            schedule = group.get(key)
            if schedule is None:
                schedule = [self._get_value(merged, name)] * n
            check_value(key, schedule, isinstance(schedule, (list, tuple)) and len(schedule) == n
                        and all(is_real(v) for v in schedule))
            group[key] = [float(v) for v in schedule]
            self._set_value(group, name, group[key][0])
        super().add_param_group(group)

    def schedule(self, name: str, group: int = 0) -> list[float]:
        """The current values of schedule ``name`` (one of :attr:`names`)."""
        check_value("name", name, name in self.names)
        return list(self.param_groups[group][f"{name}_schedule"])

    @property
    def horizon(self) -> int:
        """Inner steps per episode."""
        return self.defaults["horizon"]

    @property
    def episode_step(self) -> int:
        """Inner steps taken in the current episode (``horizon`` when :meth:`hyperstep` is due)."""
        return self.hyper_state["step"]

    def _watch_divergence(self, loss: float, lrs: Any) -> None:
        # With the log outer step an episode that runs away is part of the search: the next
        # hyperstep undoes the step that led to it (history's "backtracked"), so the base's
        # advice to lower a hyper-step size does not apply.
        if not any(g.get("outer_step") == "log" for g in self.param_groups):
            super()._watch_divergence(loss, lrs)

    def _columns(self) -> list[tuple[int, int, int, int]]:
        """Every tuned schedule value as ``(first step, group, name index, window)``, sorted.

        Sorting by the step at which a value is first used makes the columns in use at step t a
        prefix of this list, so the tangents only ever grow at the end.
        """
        cols = []
        for gi, group in enumerate(self.param_groups):
            for name in group["tune"]:
                ni, n = self.names.index(name), group[f"{name}_windows"]
                cols.extend((_first_step(k, self.horizon, n), gi, ni, k) for k in range(n))
        cols.sort()
        return cols

    def _window(self, group: dict[str, Any], name: str, t: int) -> int:
        return window_of(t, self.horizon, group[f"{name}_windows"])

    def _in_force(self, group: dict[str, Any], t: int) -> dict[str, float]:
        """The schedule values step ``t`` uses, by name."""
        return {name: group[f"{name}_schedule"][self._window(group, name, t)]
                for name in self.names}

    def _publish(self, t: int) -> None:
        """Show the values in force at step ``t`` (the last step's once the episode is over)."""
        t = min(t, self.horizon - 1)
        for group in self.param_groups:
            for name, value in self._in_force(group, t).items():
                self._set_value(group, name, value)

    # ------------------------------------------------------------------ inner step
    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None = None, *,
              val_closure: Closure | None = None) -> Any:
        """One inner step of the rule with the schedule values in force, updating the tangents.

        Args:
            closure (callable): recomputes and returns the training loss (without weight decay,
                which the update adds); it may call ``zero_grad()``/``backward()`` itself or not.
                Required when anything is tuned (H Z needs the gradient's graph).
            val_closure: not used by the inner step; pass it to :meth:`hyperstep` or the
                constructor (giving one here raises ``ValueError``).

        Returns:
            The closure's loss, or None.
        """
        name = type(self).__name__
        if val_closure is not None:
            raise ValueError(f"{name} evaluates the validation loss only at the end of an "
                             "episode: pass val_closure to hyperstep() or to the constructor.")
        t = self.hyper_state["step"]
        if t >= self.horizon:
            raise RuntimeError(f"{name}: the episode of horizon={self.horizon} steps is over; "
                               "call hyperstep() before the next step(). In a training framework "
                               "(PyTorch Lightning, a Trainer) end each episode from a callback "
                               "that runs when optimizer.episode_step == optimizer.horizon: "
                               "restore the episode's initial weights and call hyperstep() "
                               "(examples/lightning_fds.py, class EndEpisodes).")
        n_prev, n_active, index = self._column_plan(t)
        if closure is None and self._dcp_creates_state():
            self._create_state(t, n_active, index)
            return None
        if n_active and closure is None:
            raise ValueError(
                f"{name} needs second-order information: call step(closure) with a closure that "
                "recomputes and returns the training loss (it may call backward() itself)."
            )
        loss, second = self._training_loss(closure, second_order=n_prev > 0)
        if t == 0:  # after the closure: its checks (sparse gradients, ...) speak first
            self._measure_start(loss)
        hz: dict[Tensor, Tensor] = {}
        measured: dict[str, bool] = {}
        if second is not None:
            with second:
                zs = [self._tangent(p, _Z, n_prev) for p in second.params]
                loop, measured = self._loop_columns(second, zs, n_prev)
                hz = dict(zip(second.params, second.hvp(zs, loop=loop), strict=True))
        self._take_user_values(t)
        groups = [(gi, group, self._params_with_grad(group))
                  for gi, group in enumerate(self.param_groups)]
        in_force = [self._in_force(group, t) for _, group, _ in groups]
        if self._guard_step(loss, [(g, ps) for _, g, ps in groups], in_force) is not None:
            # Skipped: weights, buffers and tangents stay (a skipped step is the identity, whose
            # tangent is Z itself); the episode clock still advances so that the loop's horizon
            # holds. hyperstep() records the count as "skipped_steps".
            self.hyper_state["episode_skipped"] = self.hyper_state.get("episode_skipped", 0) + 1
            self._commit_columns(measured)
            self.hyper_state["step"] = t + 1
            self._publish(t + 1)
            return loss
        # Nothing changes before this line (the closure, the HVP and the guard may raise/skip).
        for gi, group, params in groups:
            if params:
                # FSDP2: the rule and its tangents are elementwise, run on this rank's shards.
                with local_parameters(self.state, params, hz) as shards:
                    self._group_step(gi, group, shards, t, n_active, index, hz)
        self._commit_columns(measured)
        self.hyper_state["step"] = t + 1
        self._publish(t + 1)
        return loss

    def _measure_start(self, train_loss: Tensor | None) -> None:
        r"""At an episode's first step, with ``outer_step="log"`` tuning a learning rate and the
        constructor's ``val_closure``: the validation loss :math:`E(w_0)` at the episode's initial
        weights (averaged over the ranks; one validation gradient per episode), kept in
        ``hyper_state["start_loss"]`` (negated under ``maximize``, as the outer step compares
        it) for the outer step's linear-regime test
        (:meth:`~hyperoptim.methods.fds_outer.FDSOuterStep._linear_ratio`), and the step's
        training loss ``train_loss`` (averaged over the ranks too) in
        ``hyper_state["start_train_loss"]``, whose scale the curvature's reading checks
        (:meth:`~hyperoptim.methods.fds_outer.FDSOuterStep._stable_rate`). Both in one host
        read. Without a ``val_closure`` here (one given only to :meth:`hyperstep`) nothing is
        measured and the outer step keeps its sign rule."""
        self.hyper_state.pop("start_loss", None)
        self.hyper_state.pop("start_train_loss", None)
        val_closure = self.val_closure
        if val_closure is None or not any(
                g.get("outer_step") == "log" and "lr" in g["tune"] for g in self.param_groups):
            return
        params = self._all_params()
        loss, _ = self._validation_grads(val_closure, params)
        pair = [loss.detach().double().reshape(())]
        if isinstance(train_loss, Tensor) and train_loss.numel() == 1:
            train = train_loss.detach().double().reshape(()).to(pair[0].device)
            pair.append(all_reduce_mean([train])[0] if world_size() > 1 else train)
        values = [self._objective(v) for v in torch.stack(pair).tolist()]
        if math.isfinite(values[0]):
            self.hyper_state["start_loss"] = values[0]
        if len(values) > 1 and math.isfinite(values[1]):
            self.hyper_state["start_train_loss"] = values[1]

    def _loop_columns(self, second: SecondOrder, zs: list[Tensor], n: int
                      ) -> tuple[bool, dict[str, bool]]:
        """Whether :math:`H Z` of ``n`` columns runs as a per-column loop (``hvp_columns``), and
        a new measurement to keep (``"auto"`` measures once per column count, on the exact
        route; :meth:`~hyperoptim.hvp.SecondOrder.cheaper_columns`)."""
        if self.hvp_columns != "auto":
            return self.hvp_columns == "loop", {}
        if second.route != "exact" or n < 2:
            return False, {}
        chosen = self.hyper_state.get("loop_columns", {})
        if str(n) in chosen:
            return bool(chosen[str(n)]), {}
        loop = second.cheaper_columns(zs)
        return loop, {str(n): loop}

    def _commit_columns(self, measured: dict[str, bool]) -> None:
        """Keep a measured choice with the step (``hyper_state["loop_columns"]``: column count
        -> loop or not), so that a resumed run takes the same route."""
        if measured:
            self.hyper_state["loop_columns"] = {**self.hyper_state.get("loop_columns", {}),
                                                **measured}

    def _dcp_creates_state(self) -> bool:
        """Is this ``step()`` without a closure torch.distributed.checkpoint's, which creates a
        fresh optimizer's state for its load to have keys to fill (``_init_optim_state``: every
        learning rate 0, every gradient a zero tensor)? Anything else without a closure is
        refused as before."""
        params = self._all_params()
        return (not self.state and bool(params) and all(g["lr"] == 0 for g in self.param_groups)
                and all(p.grad is not None for p in params)
                and not any_nonzero([cast(Tensor, p.grad) for p in params]))

    def _create_state(self, t: int, n_active: int, index: dict[tuple[int, int, int], int]
                      ) -> None:
        """DCP's state-creating step: the rule's step and its tangent update at learning rate 0
        on the zero gradients DCP gives, so that ``state[p]`` holds the keys (and, with one
        window per hyperparameter, the shapes) a checkpoint taken within an episode has. The
        weights do not move, and the episode clock, the schedules and ``history`` are left as
        they are: DCP's 0 is not a value set from outside (the load that follows replaces the
        state)."""
        for gi, group in enumerate(self.param_groups):
            params = self._params_with_grad(group)
            if not params:
                continue
            schedule = group["lr_schedule"]
            group["lr_schedule"] = [0.0] * len(schedule)  # the rule's step reads the schedule
            try:
                with local_parameters(self.state, params, {}) as shards:
                    self._group_step(gi, group, shards, t, n_active, index, {})
            finally:
                group["lr_schedule"] = schedule

    def _column_plan(self, t: int) -> tuple[int, int, dict[tuple[int, int, int], int]]:
        """At step ``t``: the columns already used (:math:`Z` may be non-zero), those in use
        (plus the windows that start now, :math:`Z = 0`), and the position of each in use by
        ``(group, name index, window)``."""
        columns = self._columns()
        n_prev = sum(c[0] < t for c in columns)
        n_active = sum(c[0] <= t for c in columns)
        return n_prev, n_active, {c[1:]: j for j, c in enumerate(columns[:n_active])}

    def _take_user_values(self, t: int) -> None:
        """A value assigned to ``group["lr"]`` (etc.) replaces the current window's value.

        It rewrites the learned schedule, so the first time it happens a ``RuntimeWarning``
        says so (a scheduler stepping this optimizer does it at every call).
        """
        cls = type(self).__name__
        for gi, group in enumerate(self.param_groups):
            for name in self.names:
                schedule, n = group[f"{name}_schedule"], group[f"{name}_windows"]
                check_value(f"{name}_schedule", schedule, len(schedule) == n)
                k = self._window(group, name, t)
                value = self._get_value(group, name)
                if value != schedule[k]:
                    lo, hi = self._bounds(name)
                    check_value(name, value, is_real(value) and lo <= value <= hi)
                    if not self._watch.get("overwrite_warned"):
                        self._watch["overwrite_warned"] = True
                        warn(
                            f"{cls}: param_groups[{gi}]['{name}'] was set from outside (a "
                            f"scheduler?) and replaced window {k} of the learned {name} "
                            f"schedule ({schedule[k]:.4g} -> {value:.4g}). {cls} learns "
                            "the schedule itself: do not attach a learning-rate scheduler; to set "
                            f"values on purpose, assign group['{name}_schedule'] between episodes. "
                            "This warning is shown once."
                        )
                    schedule[k] = float(value)

    def _tangent(self, p: Tensor, key: str, n: int) -> Tensor:
        """``state[p][key]`` with ``n`` columns (zeros for columns it does not have yet); under
        FSDP2 this rank's shard of it."""
        z, shard = self.state[p].get(key), local(p)
        if z is None:
            return shard.new_zeros((n, *shard.shape))
        z = local(z)
        if z.shape[0] < n:
            return torch.cat([z, z.new_zeros((n - z.shape[0], *shard.shape))])
        return z

    @staticmethod
    def _clipped(p: Tensor, h: Tensor | None, n: int, clip: float | None) -> Tensor:
        """:math:`H Z` for ``n`` columns: clipped, zero for columns whose window starts now."""
        if h is None:
            return p.new_zeros((n, *p.shape))
        if clip is not None:
            h = h.clamp(-clip, clip)
        if h.shape[0] < n:
            h = torch.cat([h, h.new_zeros((n - h.shape[0], *p.shape))])
        return h

    def _group_step(self, gi: int, group: dict[str, Any], params: list[Tensor], t: int,
                    n_active: int, index: dict[tuple[int, int, int], int],
                    hz: dict[Tensor, Tensor]) -> None:
        r"""This group's step of the rule with the values in force, and its tangent update.

        :func:`~hyperoptim.rules.rule_tangents` pushes :math:`(Z, S)_t` and :math:`H_t Z_t`
        (clipped) through the rule's Jacobian, with each tuned hyperparameter seeded by the
        one-hot column of the window it is in; then the rule's in-place step moves the weights
        and buffers with float hyperparameters (the torch optimizer's operations).
        """
        rule = self.rule
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        buffers, counts = rule.read_state(states, params)
        values = self._in_force(group, t)
        hypers = {**rule.hypers(group), **{k: v for k, v in values.items() if k in rule.hyper_names}}
        options = rule.options(group)
        if n_active:
            # e_x(t): each tuned hyperparameter seeds the column of the window it is in.
            seeds = {name: _one_hot(params[0], n_active, index[gi, ni, self._window(group, name, t)])
                     for ni, name in enumerate(self.names) if name in group["tune"]}
            zs = [self._tangent(p, _Z, n_active) for p in params]
            hzs = [self._clipped(p, hz.get(p), n_active, group["hz_clip"]) for p in params]
            buffer_tangents = {
                name: [None if b is None or key not in s else self._tangent(p, key, n_active)
                       for p, s, b in zip(params, states, buffers[name], strict=True)]
                for name, key in self.buffer_tangent_keys.items()}
            z_next, s_next = rule_tangents(rule, params, grads, buffers, hypers, zs, hzs,
                                           buffer_tangents, seeds, counts=counts, **options)
            self._store_tangents(states, z_next, s_next)
        new_buffers, _ = rule.step_(params, grads, buffers, hypers, counts, **options)
        rule.write_state(states, new_buffers)

    def _store_tangents(self, states: list[dict[str, Any]], z_next: list[Tensor],
                        s_next: dict[str, list[Tensor | None]]) -> None:
        """Keep :math:`Z_{t+1}` and each buffer's tangent (none where the buffer has none)."""
        for i, s in enumerate(states):
            s[_Z] = z_next[i]
            for name, key in self.buffer_tangent_keys.items():
                c = s_next[name][i]
                if c is None:
                    s.pop(key, None)
                else:
                    s[key] = c


    # ------------------------------------------------------------------ end of an episode
    def _episode_hypergradients(self, val_closure: Closure, n_columns: int
                                ) -> tuple[Tensor, list[float], float]:
        r"""The validation loss :math:`E(w_T)` (detached), and as floats the hypergradient
        :math:`\langle\nabla E(w_T), Z_T[:, j]\rangle` of each of the ``n_columns`` tuned values
        and the loss: one validation gradient and one host sync (the outer step,
        :meth:`hyperstep`, takes them)."""
        params = [p for g in self.param_groups for p in g["params"] if _Z in self.state[p]]
        # FSDP2: partial sums over this rank's shards, completed by one all-reduce below.
        sharded = any_sharded(params)
        val_loss, val_grads = self._validation_grads(val_closure, params, average_loss=not sharded)
        hyper = torch.zeros(n_columns, dtype=torch.float64, device=val_loss.device)
        for p, g in zip(params, val_grads, strict=True):
            z, g = local(self.state[p][_Z]), local(g)
            # dE/dlambda_j = <grad E(w_T), Z_T[:, j]>
            contrib = (z.reshape(z.shape[0], g.numel()) @ g.reshape(-1)).double().to(hyper.device)
            hyper[: z.shape[0]] += contrib
        values = complete_sums(torch.cat([hyper, val_loss.double().reshape(1).to(hyper.device)]),
                               sharded).tolist()
        return val_loss, values[:-1], values[-1]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """:meth:`HyperOptimizer.load_state_dict`; a tangent at an episode's start (where this
        class holds none) is what torch.distributed.checkpoint's state-creating step left in a
        fresh optimizer's target (``DefaultLoadPlanner(allow_partial_load=True)`` loads a
        checkpoint taken at an episode's end into it): that per-parameter state is dropped. A
        ``torch.optim`` checkpoint's (migrated: no tangents) is kept."""
        super().load_state_dict(state_dict)
        if self.hyper_state.get("step") == 0 and any(
                isinstance(s, dict) and _Z in s for s in self.state.values()):
            self._drop_episode_state()

    def _drop_episode_state(self) -> None:
        """No tangents, and the rule's state (buffers, step counts) fresh."""
        keys = (_Z, *self.buffer_tangent_keys.values(), *self.rule.buffer_names,
                *(("step",) if self.rule.uses_counts else ()))
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    for key in keys:
                        state.pop(key, None)
                    if not state:  # torch.optim keeps no empty entries
                        del self.state[p]

    def _reset_episode(self) -> None:
        """A new episode: no tangents, and the rule's state (buffers, step counts) starts fresh."""
        self._drop_episode_state()
        self.hyper_state["step"] = 0
        self.hyper_state["episode_skipped"] = 0
        for key in ("first_loss", "min_loss"):  # each episode restarts from fresh weights
            self._watch.pop(key, None)
        self.hyper_state["episode"] += 1
        self._publish(0)
