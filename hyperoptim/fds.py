r"""Forward-mode differentiation with hyperparameter sharing (FDS; Micaelli & Storkey, 2021)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .core.base import LEARNED_LIMIT, HyperOptimizer
from .core.checks import check_torch_flags, check_value, is_real
from .core.schedule import window_of
from .core.types import Closure, ParamsT
from .core.warn import warn
from .rules.base import apply_update_
from .rules.sgd import sgd_direction, sgd_tangents

__all__ = ["FDSSGD"]

NAMES = ("lr", "momentum", "weight_decay")
"""The hyperparameters FDSSGD schedules, in the order used for columns and ``tune``."""

DEFAULT_STEP_SIZES = {"lr": 0.1, "momentum": 0.15, "weight_decay": 4e-4}
r"""Initial outer step sizes :math:`\gamma` (Micaelli & Storkey 2021, App. B)."""

_Z, _C, _BUF = "fds_z", "fds_c", "momentum_buffer"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _normalise_tune(tune: Any) -> tuple[str, ...] | None:
    """``tune`` as a tuple in :data:`NAMES` order, or None if it names anything else."""
    if isinstance(tune, str):
        tune = (tune,)
    if not isinstance(tune, Iterable):
        return None
    names = list(tune)
    if not all(isinstance(n, str) and n in NAMES for n in names):
        return None
    return tuple(n for n in NAMES if n in names)


def _normalise_step_sizes(step_sizes: Any) -> dict[str, float] | None:
    """``step_sizes`` merged into the defaults, or None if invalid."""
    if step_sizes is None:
        return dict(DEFAULT_STEP_SIZES)
    if not isinstance(step_sizes, Mapping):
        return None
    if not all(k in NAMES and is_real(v) and 0 < v <= LEARNED_LIMIT
               for k, v in step_sizes.items()):
        return None
    return {**DEFAULT_STEP_SIZES, **{k: float(v) for k, v in step_sizes.items()}}


def _first_step(k: int, horizon: int, n_windows: int) -> int:
    """The first step of window ``k``: the least t with ``window_of(t) == k``, ceil(kT/N)."""
    return -(-k * horizon // n_windows)


class FDSSGD(HyperOptimizer):
    r"""SGD whose learning-rate, momentum and weight-decay *schedules* learn non-greedily (FDS).

    Training is split into episodes of ``horizon`` (:math:`T`) inner steps, each started by the
    user from freshly initialised weights. Within an episode the optimizer is PyTorch's SGD
    (heavy ball or Nesterov, dampening 0) driven by piecewise-constant schedules: the learning
    rate has ``lr_windows`` values, window :math:`k` covering steps
    :math:`[kT/N, (k+1)T/N)` (likewise momentum and weight decay). Along the way it carries the
    forward-mode tangents of the weights and momentum buffers with respect to every tuned schedule
    value :math:`\lambda_j` (one column each; Micaelli & Storkey 2021, Eq. 4 and App. A), with
    :math:`a, b, c` the learning rate, momentum and weight decay in force at step :math:`t`:

    .. math::

        C_{t+1} &= b\, C_t + (H_t + c I) Z_t + e_b(t)\, v_t + e_c(t)\, w_t \\
        Z_{t+1} &= Z_t - a\, C_{t+1} - e_a(t)\, v_{t+1} \qquad\text{(heavy ball; Nesterov alike)}

    where :math:`H_t` is the Hessian of the training loss on step :math:`t`'s batch and
    :math:`e_x(t)` the one-hot column of the window of :math:`x` that step :math:`t` uses. Only the
    columns of windows already reached are stored, and of those only the ones that have been used
    (non-zero) enter :math:`H_t Z_t`, computed for all of them at once by one batched double
    backward through the closure's gradient (no loop over columns; it works with any closure,
    and ``benchmarks/fds_scaling.py`` measures it faster than forward-over-reverse, which would
    need a functional loss, in most settings). The tangent update itself is elementwise in the
    columns (see :meth:`_group_step`). With ``hz_clip`` the product is clipped elementwise to
    :math:`\pm` ``hz_clip`` (the paper uses 100), which trades exactness for robustness to a
    single batch with large curvature.

    After exactly :math:`T` steps, :meth:`hyperstep` takes the validation loss
    :math:`E(w_T)` and computes every hypergradient
    :math:`\partial E(w_T)/\partial\lambda_j = \langle \nabla E(w_T), Z_T[:, j] \rangle`.
    This is the *raw* derivative with respect to the shared value, i.e. the sum of the per-step
    hypergradients of the :math:`W_j` steps of its window; the paper's Algorithm 1 divides it
    by :math:`W_j` to report their mean. The outer update only uses its sign, so the two agree:
    each value moves by a fixed step against the sign, and the step halves whenever the sign flips
    between consecutive hypersteps (a zero sign neither moves nor counts as a flip):

    .. math::

        s_j = \operatorname{sign}\Big(\frac{\partial E}{\partial\lambda_j}\Big), \qquad
        \gamma_j \leftarrow \gamma_j / 2 \ \text{ if } s_j s_j^{\text{prev}} < 0, \qquad
        \lambda_j \leftarrow \lambda_j - \gamma_j s_j .

    The initial :math:`\gamma` are 0.1 (learning rate), 0.15 (momentum) and 4e-4 (weight decay)
    as in the paper, which starts every hyperparameter from 0; the values are not clipped (the
    paper's search ranges include negative ones). ``lr_windows == horizon`` gives one value per
    step: the exact non-greedy hypergradient without sharing.

    :meth:`hyperstep` then resets the tangents, the momentum buffers and the step counter for the
    next episode; re-initialising the model is left to the user (see the example). A non-finite
    validation loss or hypergradient leaves the schedules unchanged (one ``RuntimeWarning``,
    counted in ``history[i]["skipped"]``) and still starts a new episode.

    Schedules are per param group: ``group["lr_schedule"]`` (likewise ``"momentum_schedule"``,
    ``"weight_decay_schedule"``) is the list of values, also returned by :meth:`schedule`, and may
    be assigned between episodes; ``group["lr"]`` shows the value in force at the current step,
    and assigning to it sets the current window's value. With several groups, every group's
    values are columns of the same tangents (a group's learning rate moves the other groups'
    weights through the Hessian), so all hypergradients are exact. ``history[i]`` records, per
    hyperstep, the updated schedules (``"lr"``, ``"momentum"``, ``"weight_decay"``: one list of
    per-window values each), the raw hypergradients that moved them (``"hypergrad/lr"`` etc., for
    tuned hyperparameters), ``"val_loss"`` (:math:`E(w_T)`) and ``"skipped"``.

    Memory: the state is :math:`Z` and :math:`C` (one weights-sized tensor per tuned schedule
    value each; :math:`C` only where momentum is in play) and the momentum buffer, plus during a
    step :math:`H Z` and the new tangents: :math:`O(DN)`, independent of the horizon, where the
    exact reverse-mode unroll grows linearly with it. Everything, tangents included, is in
    :meth:`state_dict`, so a run checkpointed mid-episode resumes exactly. Under
    ``torch.distributed`` the gradients, :math:`H Z` and the validation gradient it takes are
    averaged across ranks.

    Args:
        params (iterable): parameters or param-group dicts, as for ``torch.optim.SGD``. A group
            may set its own values and ``*_windows``, ``tune``, ``step_sizes``, ``hz_clip``,
            ``nesterov`` and ``*_schedule`` lists; ``horizon`` is shared.
        lr (float, optional): initial value of every learning-rate window (default: 0).
        momentum (float, optional): initial value of every momentum window (default: 0).
        weight_decay (float, optional): initial value of every weight-decay window (default: 0).
        horizon (int): inner steps per episode, :math:`T`.
        lr_windows (int, optional): learning-rate values shared over contiguous steps,
            :math:`1 \le N \le T` (default: 1).
        momentum_windows (int, optional): momentum values (default: 1).
        weight_decay_windows (int, optional): weight-decay values (default: 1).
        tune (iterable of str, optional): which schedules learn, a subset of
            ``("lr", "momentum", "weight_decay")`` (default: all three).
        step_sizes (dict, optional): initial outer step sizes :math:`\gamma` by name; missing
            names keep the defaults (default: None, i.e. 0.1, 0.15, 4e-4).
        hz_clip (float, optional): clip :math:`H Z` elementwise to this magnitude (default: None,
            exact).
        nesterov (bool, optional): Nesterov momentum (default: False).
        val_closure (callable, optional): returns the validation loss from the live parameters,
            evaluated by :meth:`hyperstep`; may be overridden there (default: None).
        hvp (str, optional): how :math:`H Z` is computed (:mod:`hyperoptim.hvp`): ``"exact"``
            (double backward; the closure must return the loss without calling ``backward()``),
            ``"finite_difference"`` (central differences of gradients, two extra closure calls
            per tangent column; works with ``backward()`` in the closure, DDP,
            ``torch.compile``), or ``"auto"``: exact if the closure returns the loss without
            calling ``backward()``, finite differences if it calls it (default: ``"auto"``).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(96, 3), torch.randn(96, 1)
        >>> model = torch.nn.Linear(3, 1)
        >>> init = {k: v.clone() for k, v in model.state_dict().items()}
        >>> loss_fn = torch.nn.functional.mse_loss
        >>> opt = FDSSGD(model.parameters(), horizon=8, lr_windows=2, tune=("lr", "momentum"),
        ...              val_closure=lambda: loss_fn(model(x[64:]), y[64:]))
        >>> for episode in range(4):
        ...     _ = model.load_state_dict(init)  # every episode starts from the same weights
        ...     for t in range(8):
        ...         batch = slice(8 * t, 8 * t + 8)
        ...         _ = opt.step(lambda: loss_fn(model(x[batch]), y[batch]))
        ...     _ = opt.hyperstep()
        >>> opt.history[0]["lr"][0]  # from 0, each window moved up by its step size 0.1
        [0.1, 0.1]
        >>> opt.history[0]["val_loss"][-1] < opt.history[0]["val_loss"][0]
        True

    References:
        P. Micaelli, A. Storkey. Gradient-based Hyperparameter Optimization Over Long Horizons.
        NeurIPS 2021.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.0,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        horizon: int,
        lr_windows: int = 1,
        momentum_windows: int = 1,
        weight_decay_windows: int = 1,
        tune: Iterable[str] = NAMES,
        step_sizes: Mapping[str, float] | None = None,
        hz_clip: float | None = None,
        val_closure: Closure | None = None,
        hvp: str = "auto",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        check_value("horizon", horizon, _is_count(horizon) and horizon >= 1)
        check_value("dampening", dampening, is_real(dampening))
        if dampening != 0:
            raise ValueError(f"Invalid dampening value: {dampening} (FDSSGD implements "
                             "torch.optim.SGD's rule with dampening=0, the paper's; its "
                             "tangents assume it)")
        check_torch_flags("FDSSGD", foreach, fused, differentiable)
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, horizon=horizon,
            lr_windows=lr_windows, momentum_windows=momentum_windows,
            weight_decay_windows=weight_decay_windows, tune=tune, step_sizes=step_sizes,
            hz_clip=hz_clip, nesterov=nesterov,
        )
        defaults = self._checked_options(defaults, horizon)
        super().__init__(params, defaults, val_closure=val_closure, hvp=hvp, maximize=maximize,
                         foreach=foreach, fused=fused, differentiable=differentiable)
        self.hyper_state.update(step=0, episode=0, outer={}, episode_skipped=0)

    def _check_group(self, group: dict[str, Any]) -> None:
        # Learned schedule values may be negative (the paper's ranges include them), so the
        # base's SGD checks do not apply; add_param_group checks the options themselves.
        for name in NAMES:
            schedule = group.get(f"{name}_schedule")
            if schedule is not None:
                check_value(f"{name}_schedule", schedule, isinstance(schedule, (list, tuple))
                            and all(is_real(v) and abs(v) <= LEARNED_LIMIT for v in schedule))
        if group.get("maximize", False) != self.defaults.get("maximize", False):
            raise ValueError(f"Invalid maximize value: {group['maximize']} (every param group of "
                             "one optimizer shares one objective: set it in the constructor)")

    def _learned_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ()  # FDSSGD watches assignments to its schedules itself (_take_user_values)

    # ------------------------------------------------------------------ configuration
    @staticmethod
    def _checked_options(group: dict[str, Any], horizon: int) -> dict[str, Any]:
        """Validate a group's options (ValueError "Invalid <name> value") and normalise them."""
        group = dict(group)
        for name in NAMES:
            value = group[name]
            check_value(name, value, is_real(value) and value >= 0)
            group[name] = float(value)
        check_value("horizon", group["horizon"], group["horizon"] == horizon)
        for name in NAMES:
            key = f"{name}_windows"
            n = group[key]
            if not (_is_count(n) and 1 <= n <= horizon):
                raise ValueError(f"Invalid {key} value: {n} (expected 1 <= {key} <= "
                                 f"horizon={horizon})")
        tune = _normalise_tune(group["tune"])
        check_value("tune", group["tune"], tune is not None)
        group["tune"] = tune
        sizes = _normalise_step_sizes(group["step_sizes"])
        check_value("step_sizes", group["step_sizes"], sizes is not None)
        group["step_sizes"] = sizes
        clip = group["hz_clip"]
        check_value("hz_clip", clip, clip is None or (is_real(clip) and clip > 0))
        group["hz_clip"] = None if clip is None else float(clip)
        check_value("nesterov", group["nesterov"], isinstance(group["nesterov"], bool))
        return group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.hyper_state.get("step", 0):
            # A group's columns would land among those already carried by the tangents.
            raise RuntimeError("FDSSGD: add param groups between episodes (after hyperstep()), "
                               "not in the middle of one.")
        options = {k: v for k, v in param_group.items() if k != "params"}
        merged = self._checked_options({**self.defaults, **options}, self.defaults["horizon"])
        group = {**param_group, **{k: merged[k] for k in options if k in merged}}
        for name in NAMES:
            key, n = f"{name}_schedule", merged[f"{name}_windows"]
            schedule = group.get(key)
            if schedule is None:
                schedule = [merged[name]] * n
            check_value(key, schedule, isinstance(schedule, (list, tuple)) and len(schedule) == n
                        and all(is_real(v) for v in schedule))
            group[key] = [float(v) for v in schedule]
            group[name] = group[key][0]
        super().add_param_group(group)

    def schedule(self, name: str, group: int = 0) -> list[float]:
        """The current values of schedule ``name`` ("lr", "momentum", "weight_decay")."""
        check_value("name", name, name in NAMES)
        return list(self.param_groups[group][f"{name}_schedule"])

    @property
    def horizon(self) -> int:
        """Inner steps per episode."""
        return self.defaults["horizon"]

    @property
    def episode_step(self) -> int:
        """Inner steps taken in the current episode (``horizon`` when :meth:`hyperstep` is due)."""
        return self.hyper_state["step"]

    def _columns(self) -> list[tuple[int, int, int, int]]:
        """Every tuned schedule value as ``(first step, group, name index, window)``, sorted.

        Sorting by the step at which a value is first used makes the columns in use at step t a
        prefix of this list, so the tangents only ever grow at the end.
        """
        cols = []
        for gi, group in enumerate(self.param_groups):
            for name in group["tune"]:
                ni, n = NAMES.index(name), group[f"{name}_windows"]
                cols.extend((_first_step(k, self.horizon, n), gi, ni, k) for k in range(n))
        cols.sort()
        return cols

    def _window(self, group: dict[str, Any], name: str, t: int) -> int:
        return window_of(t, self.horizon, group[f"{name}_windows"])

    def _publish(self, t: int) -> None:
        """Show the values in force at step ``t`` (the last step's once the episode is over)."""
        t = min(t, self.horizon - 1)
        for group in self.param_groups:
            for name in NAMES:
                group[name] = group[f"{name}_schedule"][self._window(group, name, t)]

    @staticmethod
    def _needs_momentum(group: dict[str, Any]) -> bool:
        """Whether the group's velocity (and its tangent) can matter in this episode."""
        return "momentum" in group["tune"] or any(b != 0 for b in group["momentum_schedule"])

    # ------------------------------------------------------------------ inner step
    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None = None, *,
             val_closure: Closure | None = None) -> Any:
        """One inner SGD step with the schedule values in force, updating the tangents.

        Args:
            closure (callable): recomputes and returns the training loss (without weight decay,
                which the update adds); it may call ``zero_grad()``/``backward()`` itself or not.
                Required when anything is tuned (H Z needs the gradient's graph).
            val_closure: not used by the inner step; pass it to :meth:`hyperstep` or the
                constructor (giving one here raises ``ValueError``).

        Returns:
            The closure's loss, or None.
        """
        if val_closure is not None:
            raise ValueError("FDSSGD evaluates the validation loss only at the end of an episode: "
                             "pass val_closure to hyperstep() or to the constructor.")
        t = self.hyper_state["step"]
        if t >= self.horizon:
            raise RuntimeError(f"FDSSGD: the episode of horizon={self.horizon} steps is over; "
                               "call hyperstep() before the next step(). In a training framework "
                               "(PyTorch Lightning, a Trainer) end each episode from a callback "
                               "that runs when optimizer.episode_step == optimizer.horizon: "
                               "restore the episode's initial weights and call hyperstep() "
                               "(examples/lightning_fds.py, class EndEpisodes).")
        columns = self._columns()
        n_prev = sum(c[0] < t for c in columns)  # columns already used: Z may be non-zero
        n_active = sum(c[0] <= t for c in columns)  # plus those whose window starts now (Z = 0)
        index = {c[1:]: j for j, c in enumerate(columns[:n_active])}
        if n_active and closure is None:
            raise ValueError(
                "FDSSGD needs second-order information: call step(closure) with a closure that "
                "recomputes and returns the training loss (it may call backward() itself)."
            )
        loss, second = self._training_loss(closure, second_order=n_prev > 0)
        hz: dict[Tensor, Tensor] = {}
        if second is not None:
            with second:
                zs = [self._tangent(p, _Z, n_prev) for p in second.params]
                hz = dict(zip(second.params, second.hvp(zs), strict=True))
        self._take_user_values(t)
        groups = [(gi, group, self._params_with_grad(group))
                  for gi, group in enumerate(self.param_groups)]
        in_force = [{name: group[f"{name}_schedule"][self._window(group, name, t)]
                     for name in NAMES} for _, group, _ in groups]
        if self._guard_step(loss, [(g, ps) for _, g, ps in groups], in_force) is not None:
            # Skipped: weights, buffers and tangents stay (a skipped step is the identity, whose
            # tangent is Z itself); the episode clock still advances so that the loop's horizon
            # holds. hyperstep() records the count as "skipped_steps".
            self.hyper_state["episode_skipped"] = self.hyper_state.get("episode_skipped", 0) + 1
            self.hyper_state["step"] = t + 1
            self._publish(t + 1)
            return loss
        # Nothing changes before this line (the closure, the HVP and the guard may raise/skip).
        for gi, group, params in groups:
            if params:
                self._group_step(gi, group, params, t, n_active, index, hz)
        self.hyper_state["step"] = t + 1
        self._publish(t + 1)
        return loss

    def _take_user_values(self, t: int) -> None:
        """A value assigned to ``group["lr"]`` (etc.) replaces the current window's value.

        It rewrites the learned schedule, so the first time it happens a ``RuntimeWarning``
        says so (a scheduler stepping this optimizer does it at every call).
        """
        for gi, group in enumerate(self.param_groups):
            for name in NAMES:
                schedule, n = group[f"{name}_schedule"], group[f"{name}_windows"]
                check_value(f"{name}_schedule", schedule, len(schedule) == n)
                k = self._window(group, name, t)
                if group[name] != schedule[k]:
                    check_value(name, group[name], is_real(group[name])
                                and abs(group[name]) <= LEARNED_LIMIT)
                    if not self._watch.get("overwrite_warned"):
                        self._watch["overwrite_warned"] = True
                        warn(
                            f"FDSSGD: param_groups[{gi}]['{name}'] was set from outside (a "
                            f"scheduler?) and replaced window {k} of the learned {name} "
                            f"schedule ({schedule[k]:.4g} -> {group[name]:.4g}). FDSSGD learns "
                            "the schedule itself: do not attach a learning-rate scheduler; to set "
                            f"values on purpose, assign group['{name}_schedule'] between episodes. "
                            "This warning is shown once."
                        )
                    schedule[k] = float(group[name])

    def _tangent(self, p: Tensor, key: str, n: int) -> Tensor:
        """``state[p][key]`` with ``n`` columns (zeros for columns it does not have yet)."""
        z = self.state.get(p, {}).get(key)
        if z is None:
            return p.new_zeros((n, *p.shape))
        if z.shape[0] < n:
            return torch.cat([z, z.new_zeros((n - z.shape[0], *p.shape))])
        return z

    def _group_step(self, gi: int, group: dict[str, Any], params: list[Tensor], t: int,
                    n_active: int, index: dict[tuple[int, int, int], int],
                    hz: dict[Tensor, Tensor]) -> None:
        r"""This group's SGD step with the values in force, and its tangent update.

        For fixed hyperparameters the rule before the learning rate (:func:`sgd_direction`) is
        linear in (weights, gradients, buffers), so applied to the tangents (weights :math:`\to
        Z`, gradients :math:`\to H Z`, buffers :math:`\to C`) it *is* its own Jacobian-vector
        product, for every column at once, weight decay and Nesterov included: it gives
        :math:`C_{t+1}` and the direction's tangent :math:`D_t`, and :math:`Z \leftarrow Z - a_t
        D_t`. The hyperparameters' own terms :math:`B_t` go to the column of the window each is
        in: the learning rate's is :math:`-d_t` (from :math:`w_{t+1} = w_t - a_t d_t`); weight
        decay enters the gradient as :math:`c_t w_t`, so its column's gradient tangent gains
        :math:`w_t` before the linear pass; the momentum's, which Nesterov makes non-linear, is
        ``torch.func.jvp`` of the rule (:func:`sgd_tangents`) on one flat vector. The update is
        elementwise in the N columns plus a constant.
        """
        a, b, c = (group[f"{name}_schedule"][self._window(group, name, t)] for name in NAMES)
        nesterov = group["nesterov"]
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        momentum = self._needs_momentum(group)
        bufs = [s.get(_BUF) if momentum else None for s in states]
        gs, new_bufs, dirs = sgd_direction(params, grads, bufs, b, c, nesterov=nesterov)

        if n_active:
            column = {name: index[gi, ni, self._window(group, name, t)]
                      for ni, name in enumerate(NAMES) if name in group["tune"]}
            zs = [self._tangent(p, _Z, n_active) for p in params]
            hzs = [self._clipped(p, hz.get(p), n_active, group["hz_clip"]) for p in params]
            if "weight_decay" in column:
                for h, p in zip(hzs, params, strict=True):
                    h[column["weight_decay"]] += p
            cs = [self._tangent(p, _C, n_active) if buf is not None else None
                  for p, buf in zip(params, bufs, strict=True)]
            g_tan, c_next, d_tan = sgd_direction(zs, hzs, cs, b, c, nesterov=nesterov)
            z_next = [z - a * d if a != 0 else z for z, d in zip(zs, d_tan, strict=True)]
            if momentum:  # as for the buffers below: v_{t+1} = g_t where b = 0
                c_next = [cn if cn is not None else (g.clone() if g is h else g)
                          for cn, g, h in zip(c_next, g_tan, hzs, strict=True)]
            if "lr" in column:
                for z, d in zip(z_next, dirs, strict=True):
                    z[column["lr"]] -= d
            if "momentum" in column:
                dz, dc = _momentum_terms(params, grads, bufs, (a, b, c), nesterov)
                for z, cn, dzi, dci in zip(z_next, c_next, dz, dc, strict=True):
                    z[column["momentum"]] += dzi
                    cn[column["momentum"]] += dci
            for s, z, cn in zip(states, z_next, c_next, strict=True):
                s[_Z] = z
                if momentum:
                    s[_C] = cn

        apply_update_(params, dirs, a)
        if momentum:
            for s, g, grad, buf in zip(states, gs, grads, new_bufs, strict=True):
                # PyTorch keeps no buffer at b = 0, but v_{t+1} = g_t matters if b changes later.
                s[_BUF] = buf if buf is not None else (g.clone() if g is grad else g)

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

    # ------------------------------------------------------------------ outer step
    @torch.no_grad()
    def hyperstep(self, val_closure: Closure | None = None) -> Tensor:
        r"""End the episode: hypergradients, sign-based update of the schedules, reset.

        Must follow exactly ``horizon`` calls of :meth:`step`. Computes
        :math:`\partial E(w_T)/\partial\lambda_j = \langle\nabla E(w_T), Z_T[:, j]\rangle` for
        every tuned schedule value, records them with the updated schedules in ``history``,
        moves each value by :math:`-\gamma_j \operatorname{sign}` (halving :math:`\gamma_j` on a
        sign flip), and clears tangents, momentum buffers and the step counter. One host sync.

        Args:
            val_closure (callable, optional): returns the validation loss from the live
                parameters (default: the constructor's).

        Returns:
            The validation loss :math:`E(w_T)` (detached).
        """
        t = self.hyper_state["step"]
        if t != self.horizon:
            raise RuntimeError(f"FDSSGD.hyperstep() ends an episode of exactly horizon="
                               f"{self.horizon} steps, but {t} step(s) have been taken.")
        val_closure = self._resolve_val_closure(val_closure, required=True)
        columns = self._columns()
        params = [p for g in self.param_groups for p in g["params"] if _Z in self.state.get(p, {})]
        val_loss, val_grads = self._validation_grads(val_closure, params)
        hyper = torch.zeros(len(columns), dtype=torch.float64, device=val_loss.device)
        for p, g in zip(params, val_grads, strict=True):
            z = self.state[p][_Z]
            # dE/dlambda_j = <grad E(w_T), Z_T[:, j]>
            contrib = (z.reshape(z.shape[0], -1) @ g.reshape(-1)).double().to(hyper.device)
            hyper[: z.shape[0]] += contrib
        values = torch.cat([hyper, val_loss.double().reshape(1).to(hyper.device)]).tolist()
        hypergrads, loss = values[:-1], values[-1]

        skipped = not self._all_finite(*values)
        if skipped:
            self._warn_nonfinite("validation loss or hypergradient")
        per_group: list[dict[str, list[float]]] = [
            {name: [math.nan] * g[f"{name}_windows"] for name in g["tune"]}
            for g in self.param_groups
        ]
        for (_, gi, ni, k), h in zip(columns, hypergrads, strict=True):
            per_group[gi][NAMES[ni]][k] = h
        for gi, group in enumerate(self.param_groups):
            if not skipped:
                self._sign_update(gi, group, per_group[gi])
            self._record(gi, skipped=skipped, val_loss=loss,
                         skipped_steps=float(self.hyper_state.get("episode_skipped", 0)),
                         **{name: list(group[f"{name}_schedule"]) for name in NAMES},
                         **{f"hypergrad/{name}": h for name, h in per_group[gi].items()})
        self._reset_episode()
        return val_loss

    def _sign_update(self, gi: int, group: dict[str, Any], hypergrads: dict[str, list[float]]
                     ) -> None:
        outer = self.hyper_state["outer"].setdefault(gi, {})
        for name, hs in hypergrads.items():
            schedule = group[f"{name}_schedule"]
            n = len(schedule)
            state = outer.get(name)
            if state is None or len(state["step_size"]) != n:
                state = {"step_size": [group["step_sizes"][name]] * n, "sign": [0.0] * n}
                outer[name] = state
            for k, h in enumerate(hs):
                sign = float((h > 0) - (h < 0))
                if sign * state["sign"][k] < 0:
                    state["step_size"][k] *= 0.5
                state["sign"][k] = sign
                # Bounded (LEARNED_LIMIT): a learned value can never overflow the next episode.
                schedule[k] = min(max(schedule[k] - sign * state["step_size"][k], -LEARNED_LIMIT),
                                  LEARNED_LIMIT)

    def _reset_episode(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    for key in (_Z, _C, _BUF):
                        state.pop(key, None)
                    if not state:  # torch.optim keeps no empty entries
                        del self.state[p]
        self.hyper_state["step"] = 0
        self.hyper_state["episode_skipped"] = 0
        for key in ("first_loss", "min_loss"):  # each episode restarts from fresh weights
            self._watch.pop(key, None)
        self.hyper_state["episode"] += 1
        self._publish(0)


def _momentum_terms(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None],
                    values: tuple[float, float, float], nesterov: bool
                    ) -> tuple[list[Tensor], list[Tensor]]:
    r""":math:`\partial(w_{t+1}, v_{t+1}) / \partial b_t`: ``torch.func.jvp`` of the rule.

    Each transformed call has a fixed cost per tensor, so the group is flattened into one vector
    first (when dtypes and buffers allow).
    """
    ref = params[0]
    a, b, c = (torch.tensor(v, dtype=ref.dtype, device=ref.device) for v in values)
    seeds = (ref.new_zeros(1), ref.new_ones(1), ref.new_zeros(1))
    flat = (len({(p.dtype, p.device) for p in params}) == 1
            and len({buf is None for buf in bufs}) == 1)
    if flat and len(params) > 1:
        sizes = [p.numel() for p in params]
        cat = lambda ts: [torch.cat([x.reshape(-1) for x in ts])]  # noqa: E731
        zero = [ref.new_zeros((1, sum(sizes)))]
        with_buf = bufs[0] is not None
        dz, dc = sgd_tangents(cat(params), cat(grads), cat(bufs) if with_buf else [None],
                              a, b, c, zero, zero, zero if with_buf else [None], *seeds,
                              nesterov=nesterov)
        return ([x.view_as(p) for x, p in zip(dz[0][0].split(sizes), params, strict=True)],
                [x.view_as(p) for x, p in zip(dc[0][0].split(sizes), params, strict=True)])
    zeros = [p.new_zeros((1, *p.shape)) for p in params]
    dz, dc = sgd_tangents(params, grads, bufs, a, b, c, zeros, zeros,
                          [None if buf is None else z for buf, z in zip(bufs, zeros, strict=True)],
                          *seeds, nesterov=nesterov)
    return [x[0] for x in dz], [x[0] for x in dc]
