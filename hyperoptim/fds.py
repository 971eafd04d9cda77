r"""FDSSGD: forward-mode differentiation with hyperparameter sharing (FDS; Micaelli & Storkey, 2021)
over torch.optim.SGD's rule."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from .core.checks import check_torch_flags, check_value, is_real
from .core.options import renamed_options
from .core.signatures import renamed_keywords
from .core.types import Closure, ParamsT
from .methods.fds import RuleFDS
from .rules.base import apply_update_, rule_tangents
from .rules.sgd import SGD, sgd_direction

__all__ = ["FDSSGD"]

NAMES = ("lr", "momentum", "weight_decay")
"""The hyperparameters FDSSGD schedules, in the order used for columns and ``tune``."""

DEFAULT_STEP_SIZES = {"lr": 0.1, "momentum": 0.15, "weight_decay": 4e-4}
r"""Initial outer step sizes :math:`\gamma` (Micaelli & Storkey 2021, App. B)."""

_Z, _C, _BUF = "fds_z", "fds_c", "momentum_buffer"


class FDSSGD(RuleFDS):
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
    columns (see :meth:`_group_step`): FDSSGD is the FDS method written once over any update rule
    (:class:`~hyperoptim.methods.fds.RuleFDS`) paired with the SGD rule, with this hand-written
    update as a fast path of the generic one. With ``hz_clip`` the product is clipped elementwise to
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

    That is ``outer_step="additive"``. A fixed :math:`\gamma` is sized for one problem: 0.1 is
    right for a learning rate near 0.1 and takes 0.0001 on full-batch diabetes to 0.1 in one
    episode, where it diverges. The default ``outer_step="log"`` moves a positive learning
    rate or weight decay by factors instead, from the same signs:

    .. math::

        s_j \leftarrow 2 s_j \ (\le \ln 10) \text{ if } s_j s_j^{\text{prev}} > 0, \quad
        s_j / 2 \text{ if } < 0, \qquad \log\lambda_j \leftarrow \log\lambda_j - s_j
        \operatorname{sign}\Big(\frac{\partial E}{\partial\lambda_j}\Big),

    from :math:`s_j = \ln 2` (Rprop's growth: 100x takes 4 episodes of one sign, and a first step
    of 2x does not spoil a good start). An episode far below its learning rate, where the
    validation loss gained over the episode is nearly linear in the learning rate
    (:data:`~hyperoptim.methods.fds_outer.LINEAR_RATIO`: :math:`\rho = -\sum_j a_j\,
    \partial E_T/\partial a_j \,/\, (E_0 - E_T) \ge 0.5`, with :math:`E_0` the validation loss
    at the episode's first step, measured when the constructor has the ``val_closure``), steps
    every window of the learning rate that asks for more up by
    :func:`~hyperoptim.methods.fds_outer.far_step` of :math:`\rho` (a decade deep in the linear
    regime, less as :math:`\rho` falls to 0.5): from 100x too small two episodes instead of
    four, while a good start, where :math:`\rho` is small, keeps the factor of 2 (a decade
    regardless killed FDSAdamW's digits CNN from its good start); after such a step Rprop
    starts afresh (its first step, the sign forgotten), and where the episode reads its rate near
    or past its best (:math:`\rho \le 0`, or a far step the curvature declined) a window of the
    learning rate that asks for more again keeps its step instead of doubling it
    (:meth:`~hyperoptim.methods.fds_outer.FDSOuterStep._near_best`). Once an episode has
    trained (its validation loss ended at least 10% below :math:`E_0`) the far step reads the curvature
    instead: it aims at a third of SGD's stable learning rate :math:`2 (1 + \mu) / (\lambda +
    c)`, :math:`\lambda` the largest eigenvalue of the validation loss's Hessian at the
    episode's end weights, up to two decades
    (:meth:`~hyperoptim.methods.fds_outer.FDSOuterStep._stable_rate`; the character LSTM from
    100x too small: perplexity 19.35 -> 9.45 in 3 episodes, its good start 10.01). It is
    invariant to the decade of the start and to the scale of the loss (signs, comparisons of
    losses and a curvature are read: the training and validation losses times :math:`c` learn
    the learning rates divided by :math:`c`). Because a few
    large steps can overshoot, an episode that ends with a higher (or non-finite) validation loss than the one
    before it undoes the last outer step of every schedule, halves every step, forgets the
    signs, and probes the learning rate below the restored value by the halved step (iRprop+'s
    backtracking, plus the asymmetry that a learning rate too large costs the run and one too
    small only time; a worse probe is undone in turn); a non-finite first episode divides the
    learning rates by 100 (:data:`~hyperoptim.methods.fds_outer.LOST_BACK_OFF`: below the
    stable range costs a far step, at its edge the run), and so does a first episode that
    gained nothing (its validation loss ended at or above :math:`E_0`: from lr 1 the digits
    CNN's ReLUs die and the loss stays at chance; a later one is undone as a worse one;
    ``history`` marks it in ``"lost"``); the outer step after such a back-off raises or holds
    the learning rate, never lowers it further. At the edge of stability, where
    :math:`|\rho| > 10` (:data:`~hyperoptim.methods.fds_outer.EDGE_RATIO`: the end loss far
    more sensitive to the learning rates than the episode's gain), the signs are chaos: every
    learning-rate window steps down by its step and the other values hold. The momentum keeps
    the additive step, up at most halfway to 1 (0.9 + 0.15 would be 1.05, where heavy ball
    diverges; its range [0, 1) has no decade to be wrong by; stepping :math:`\log(1 - \mu)`
    instead lost 3 points on the digits MLP and 28% MSE on diabetes from the poor start in
    ``benchmarks/fds_outer_step.py``), and so does a value at or below 0 (how the default start
    at 0 leaves it). ``history`` adds
    ``"log_step/<name>"`` (the :math:`s_j` after the step), ``"backtracked"``, ``"lost"`` and
    ``"stable_lr"`` (the stable rate a far step read; 0 where none);
    the state is in ``hyper_state["outer"]``, ``hyper_state["val_loss_ref"]`` and
    ``hyper_state["backed_off"]`` (the groups whose next step may not lower the rate). From the
    versus starts (lr 1e-3, 0.1, 1.0) on the digits MLP and diabetes, 4 episodes, the log step
    matched or beat the additive one from every start and the additive step diverged on
    diabetes from all three (README, FDSSGD). The step is FDS's own option rather than a policy of
    :mod:`hyperoptim.hyperstep`: those turn one hypergradient's size into the next value once
    per step, with a scale normaliser and the inner momentum; FDS reads only the sign, once per
    episode and per window, and compares whole episodes.

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
            may set its own values and ``*_windows``, ``tune``, ``hyper_lr``, ``hz_clip``,
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
        hyper_lr (float or dict, optional): initial outer step sizes :math:`\gamma`: one for
            every schedule, or a dict by name where missing names keep the defaults (default:
            None, i.e. 0.1, 0.15, 4e-4). Formerly ``step_sizes`` (a dict), still accepted for
            one release with a ``DeprecationWarning``.
        hz_clip (float, optional): clip :math:`H Z` elementwise to this magnitude (default: None,
            exact).
        outer_step (str, optional): ``"log"``: positive learning rates and weight decays step by
            factors, with backtracking after a worse episode; ``"additive"``: the paper's step,
            every value moves by :math:`\gamma` (default: ``"log"``; see above).
        nesterov (bool, optional): Nesterov momentum (default: False).
        val_closure (callable, optional): returns the validation loss from the live parameters,
            evaluated by :meth:`hyperstep`; may be overridden there (default: None).
        hvp (str, optional): how :math:`H Z` is computed (:mod:`hyperoptim.hvp`): ``"exact"``
            (double backward; the closure must return the loss without calling ``backward()``),
            ``"finite_difference"`` (central differences of gradients, two extra closure calls
            per tangent column; works with ``backward()`` in the closure, DDP,
            ``torch.compile``), or ``"auto"``: exact if the closure returns the loss without
            calling ``backward()``, finite differences if it calls it (default: ``"auto"``).
        hvp_columns (str, optional): on the exact route, ``"batched"`` takes :math:`H Z` for
            all columns in one batched double backward, ``"loop"`` one double backward per
            column, ``"auto"`` measures both the first time each number of columns is in use
            and keeps the cheaper (``hyper_state["loop_columns"]``; it is saved, so a resumed
            run takes the same route). Both are exact and agree to rounding, not bit for bit:
            ``"auto"``, like ``torch.backends.cudnn.benchmark``, can pick differently on
            another machine. On a CPU the loop was cheaper for layers of width 256 and more,
            the batch for small models and the character LSTM of ``benchmarks/versus.py``
            (``benchmarks/fds_scaling.py``). Default: ``"batched"``.

    Example:
        >>> import torch
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
        >>> opt.history[0]["lr"][0]  # from 0, each window moved up by the additive step 0.1
        [0.1, 0.1]
        >>> opt.history[0]["val_loss"][-1] < opt.history[0]["val_loss"][0]
        True

    References:
        P. Micaelli, A. Storkey. Gradient-based Hyperparameter Optimization Over Long Horizons.
        NeurIPS 2021.
    """

    rule = SGD
    names = NAMES
    default_step_sizes = DEFAULT_STEP_SIZES
    buffer_tangent_keys = {"momentum_buffer": _C}

    @renamed_keywords(renamed_options("fds"))
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
        hyper_lr: float | Mapping[str, float] | None = None,
        hz_clip: float | None = None,
        outer_step: str = "log",
        val_closure: Closure | None = None,
        hvp: str = "auto",
        hvp_columns: str = "batched",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        check_value("horizon", horizon, isinstance(horizon, int) and not isinstance(horizon, bool)
                    and horizon >= 1)
        check_value("dampening", dampening, is_real(dampening))
        if dampening != 0:
            raise ValueError(f"Invalid dampening value: {dampening} (FDSSGD implements "
                             "torch.optim.SGD's rule with dampening=0, the paper's; its "
                             "tangents assume it)")
        check_torch_flags("FDSSGD", foreach, fused, differentiable)
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, horizon=horizon,
            lr_windows=lr_windows, momentum_windows=momentum_windows,
            weight_decay_windows=weight_decay_windows, tune=tune, hyper_lr=hyper_lr,
            hz_clip=hz_clip, nesterov=nesterov, dampening=0.0,
            outer_step=outer_step,
        )
        super().__init__(params, defaults, val_closure=val_closure, hvp=hvp,
                         hvp_columns=hvp_columns, maximize=maximize,
                         foreach=foreach, fused=fused, differentiable=differentiable)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("dampening", 0.0)  # saved before the SGD rule's options were kept

    @classmethod
    def _checked_options(cls, group: dict[str, Any], horizon: int) -> dict[str, Any]:
        group = super()._checked_options(group, horizon)
        check_value("nesterov", group["nesterov"], isinstance(group["nesterov"], bool))
        check_value("dampening", group.get("dampening", 0.0), group.get("dampening", 0.0) == 0)
        return group

    @staticmethod
    def _needs_momentum(group: dict[str, Any]) -> bool:
        """Whether the group's velocity (and its tangent) can matter in this episode."""
        return "momentum" in group["tune"] or any(b != 0 for b in group["momentum_schedule"])

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
        the rule's one-step tangent (its closed form, :func:`rule_tangents`). The update is
        elementwise in the N columns plus a constant.

        This replaces the generic :meth:`RuleFDS._group_step` (``rule_tangents``, one reverse pass
        per column) for two reasons. Speed: ``benchmarks/fds_scaling.py`` (table 3) measures it
        1.0x, 1.4x, 2.3x and 4x faster with 3, 5, 11 and 29 columns on a 64-32-32-10 MLP; the
        two agree to rounding (``tests/test_fds_method.py``). Semantics: a window of momentum 0
        keeps the velocity :math:`v_{t+1} = g_t` for the next window, as the schedule's
        recursion (and the oracle) have it, where PyTorch's SGD rule keeps no buffer.
        """
        a, b, c = (group[f"{name}_schedule"][self._window(group, name, t)] for name in NAMES)
        nesterov = group["nesterov"]
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        momentum = self._needs_momentum(group)
        bufs = [s.get(_BUF) if momentum else None for s in states]
        gs, new_bufs, dirs = sgd_direction(params, grads, bufs, b, c, nesterov=nesterov)

        if n_active:
            self._fast_tangents(gi, group, params, t, n_active, index, hz, bufs, dirs)

        apply_update_(params, dirs, a)
        if momentum:
            for s, g, grad, buf in zip(states, gs, grads, new_bufs, strict=True):
                # PyTorch keeps no buffer at b = 0, but v_{t+1} = g_t matters if b changes later.
                s[_BUF] = buf if buf is not None else (g.clone() if g is grad else g)

    def _fast_tangents(self, gi: int, group: dict[str, Any], params: list[Tensor], t: int,
                       n_active: int, index: dict[tuple[int, int, int], int],
                       hz: dict[Tensor, Tensor], bufs: list[Tensor | None],
                       dirs: list[Tensor]) -> None:
        """The tangent update of :meth:`_group_step` (see there), from the buffers ``bufs``
        before the step and its directions ``dirs``; stores :math:`Z_{t+1}, C_{t+1}`."""
        values = a, b, c = tuple(group[f"{name}_schedule"][self._window(group, name, t)]
                                 for name in NAMES)
        nesterov = group["nesterov"]
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        momentum = self._needs_momentum(group)
        column = {name: index[gi, ni, self._window(group, name, t)]
                  for ni, name in enumerate(NAMES) if name in group["tune"]}
        # The momentum's own terms depend on the state before the step alone: taken first, so
        # that their (flat, shard-sized) temporaries are gone before the N-column tangents are
        # built, where the step's memory peaks under FSDP2. Added where they were (same sums).
        own = (_momentum_terms(params, grads, bufs, values, nesterov)
               if "momentum" in column else None)
        zs, hzs, cs = self._incoming(group, params, n_active, hz, bufs, column)
        g_tan, c_next, d_tan = sgd_direction(zs, hzs, cs, b, c, nesterov=nesterov)
        # In place: Z_t is not read again (stored back below), and a new Z_{t+1} beside it would
        # be N more columns at the step's memory peak. Same operation as z - a * d.
        z_next = [z.sub_(a * d) if a != 0 else z for z, d in zip(zs, d_tan, strict=True)]
        if momentum:  # as for the buffers in _group_step: v_{t+1} = g_t where b = 0
            c_next = _kept_velocity(c_next, g_tan, hzs)
        _add_own_terms(column, z_next, c_next, dirs, own)
        for s, z, cn in zip(states, z_next, c_next, strict=True):
            s[_Z] = z
            if momentum:
                s[_C] = cn

    def _incoming(self, group: dict[str, Any], params: list[Tensor], n_active: int,
                  hz: dict[Tensor, Tensor], bufs: list[Tensor | None], column: dict[str, int]
                  ) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
        """The tangents a step starts from, with ``n_active`` columns: :math:`Z_t`, :math:`H_t
        Z_t` (clipped; the weight decay's own term :math:`w_t` added to its column, as it enters
        the gradient) and :math:`C_t` (``None`` where there is no buffer)."""
        zs = [self._tangent(p, _Z, n_active) for p in params]
        hzs = [self._clipped(p, hz.get(p), n_active, group["hz_clip"]) for p in params]
        if "weight_decay" in column:
            for h, p in zip(hzs, params, strict=True):
                h[column["weight_decay"]] += p
        cs = [self._tangent(p, _C, n_active) if buf is not None else None
              for p, buf in zip(params, bufs, strict=True)]
        return zs, hzs, cs


def _kept_velocity(new: list[Tensor | None], gs: list[Tensor], raw: list[Tensor]) -> list[Tensor]:
    """:math:`v_{t+1}` (or its tangent) where the rule made one, else :math:`g_t` (a copy where it
    is the caller's ``raw`` tensor): PyTorch keeps no buffer at :math:`b = 0`, but the schedule's
    recursion needs it if :math:`b` changes later."""
    return [v if v is not None else (g.clone() if g is r else g)
            for v, g, r in zip(new, gs, raw, strict=True)]


def _add_own_terms(column: dict[str, int], z_next: list[Tensor], c_next: list[Tensor | None],
                   dirs: list[Tensor], own: tuple[list[Tensor], list[Tensor]] | None) -> None:
    r"""Add the learning rate's and the momentum's own terms :math:`B_t` to their columns, in
    place (the weight decay's entered the gradient's tangent before the linear pass); ``own``:
    the momentum's, from :func:`_momentum_terms` (``None`` where it is not tuned)."""
    if "lr" in column:
        for z, d in zip(z_next, dirs, strict=True):
            z[column["lr"]] -= d
    if "momentum" in column and own is not None:
        dz, dc = own
        for z, cn, dzi, dci in zip(z_next, c_next, dz, dc, strict=True):
            z[column["momentum"]] += dzi
            cn[column["momentum"]] += dci


def _momentum_terms(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None],
                    values: tuple[float, float, float], nesterov: bool
                    ) -> tuple[list[Tensor], list[Tensor]]:
    r""":math:`\partial(w_{t+1}, v_{t+1}) / \partial b_t` with the state before the step held
    constant: the SGD rule's one-step tangent seeded by the momentum (its closed form,
    :func:`~hyperoptim.rules.sgd.sgd_closed_tangents`, tested equal to ``torch.func.jvp`` of the
    rule)."""
    lr, momentum, weight_decay = values
    dz, dc = rule_tangents(SGD, params, grads, {_BUF: bufs},
                           dict(lr=lr, momentum=momentum, weight_decay=weight_decay), None, None,
                           {_BUF: [None] * len(params)}, {"momentum": params[0].new_ones(1)},
                           nesterov=nesterov)
    return [x[0] for x in dz], [x[0] for x in dc[_BUF]]  # type: ignore[index]
