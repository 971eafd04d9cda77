r"""The SGD update rule, written once, and its forward-mode tangents.

PyTorch's SGD with learning rate :math:`a`, momentum :math:`b`, dampening :math:`\delta`,
weight decay :math:`c` (docs/design.md §3):

.. math::

    g_t &= \nabla L_t(w_t) + c\, w_t \\
    v_{t+1} &= b\, v_t + (1 - \delta)\, g_t \qquad (v_1 = g_0) \\
    d_t &= v_{t+1} \ \text{(heavy ball)} \quad\text{or}\quad g_t + b\, v_{t+1} \ \text{(Nesterov)} \\
    w_{t+1} &= w_t - a\, d_t

:func:`sgd_step` is that rule as a pure function of lists of tensors (:func:`sgd_direction` is
everything before the learning rate, :func:`apply_update_` the last line done in place). With Python-float
hyperparameters it performs exactly the floating-point operations of ``torch.optim.SGD``
(single-tensor path), so frozen hyperparameters give bit-identical weights. With tensor
hyperparameters it is differentiable, and :func:`sgd_tangents` gets the tangent recursion

.. math::

    C_{t+1} &= b\, C_t + (1-\delta)\big((H_t + c I) Z_t + e_c w_t\big) + e_b v_t \\
    Z_{t+1} &= Z_t - a\, D_t - e_a d_t

(with :math:`D_t` the tangent of :math:`d_t`) from :func:`torch.func.jvp` of the same function,
batched over tangent columns with :func:`torch.func.vmap`: the reference. The rule registers the
same recursion as its closed form (:func:`sgd_closed_tangents`, :attr:`UpdateRule.tangents`),
which :func:`~hyperoptim.rules.rule_tangents` and :func:`~hyperoptim.rules.rule_vjp` use;
``tests/test_rule_closed_forms.py`` checks it against both autograd routes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core.threads import FORWARD_AD_LOCK
from ..core.types import Hyper
from .algebra import _active, _axpy, _ith, _lr_list, _n_cols, _seed_columns, _tangent_out, _terms, _times
from .base import Buffers, UpdateRule, apply_update_, register_rule

__all__ = ["SGD", "sgd_closed_tangents", "sgd_direction", "sgd_edge", "sgd_momentum_tangents", "sgd_step",
           "sgd_tangents"]


def sgd_direction(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor | None],
    momentum: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    *,
    dampening: float = 0.0,
    nesterov: bool = False,
    inplace: bool = False,
) -> tuple[list[Tensor], list[Tensor | None], list[Tensor]]:
    r"""The part of the SGD step that does not involve the learning rate.

    Args:
        params (sequence of Tensor): the weights :math:`w_t`.
        grads (sequence of Tensor): the loss gradients :math:`\nabla L_t(w_t)`, without weight decay.
        bufs (sequence of Tensor or None): momentum buffers :math:`v_t`; ``None`` before the first
            step, where PyTorch sets :math:`v_1 = g_0`.
        momentum (float or Tensor): momentum factor (default: 0).
        weight_decay (float or Tensor): L2 penalty (default: 0).
        dampening (float, optional): dampening for momentum (default: 0).
        nesterov (bool, optional): Nesterov momentum (default: False).
        inplace (bool, optional): update existing momentum buffers in place, exactly as
            ``torch.optim.SGD`` does (float momentum only; not differentiable). Otherwise the
            function is pure (default: False).

    Returns:
        ``(g, new_bufs, directions)``: :math:`g_t` (with weight decay), :math:`v_{t+1}` (``None``
        where momentum is off) and :math:`d_t`. ``g[i]`` *is* ``grads[i]`` when there is no weight
        decay, and ``directions[i]`` may be ``g[i]`` or ``new_bufs[i]``: copy before keeping them.

    Example:
        >>> g, v, d = sgd_direction([torch.ones(2)], [torch.ones(2)], [None], momentum=0.9,
        ...                         weight_decay=0.5)
        >>> d[0]
        tensor([1.5000, 1.5000])
    """
    gs: list[Tensor] = []
    new_bufs: list[Tensor | None] = []
    directions: list[Tensor] = []
    for param, grad, buf in zip(params, grads, bufs):
        g = _axpy(grad, weight_decay, param) if _active(weight_decay) else grad
        if _active(momentum):
            if buf is None:
                v = g.clone()
            elif inplace:
                v = buf.mul_(momentum).add_(g, alpha=1 - dampening)
            else:
                scaled = buf * momentum if isinstance(momentum, Tensor) else buf.mul(momentum)
                v = _axpy(scaled, 1 - dampening, g)
            d = _axpy(g, momentum, v) if nesterov else v
        else:
            v, d = None, g
        gs.append(g)
        new_bufs.append(v)
        directions.append(d)
    return gs, new_bufs, directions


def sgd_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor | None],
    lr: Hyper | Sequence[Tensor],
    momentum: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    *,
    dampening: float = 0.0,
    nesterov: bool = False,
) -> tuple[list[Tensor], list[Tensor | None], list[Tensor]]:
    r"""One SGD step as a pure function (nothing is modified in place): :math:`w_{t+1} = w_t - a d_t`.

    Args:
        params, grads, bufs, momentum, weight_decay, dampening, nesterov: as in
            :func:`sgd_direction`.
        lr (float, Tensor or sequence of Tensor): learning rate; a sequence gives one learning
            rate per parameter tensor (0-d or shaped like it: per-weight learning rates).

    Returns:
        ``(new_params, new_bufs, directions)``: :math:`w_{t+1}`, :math:`v_{t+1}` and :math:`d_t`.

    Example:
        >>> new_w, new_v, d = sgd_step([torch.ones(2)], [torch.full((2,), 0.5)], [None], lr=0.1,
        ...                            momentum=0.9)
        >>> new_w[0]
        tensor([0.9500, 0.9500])
    """
    _, new_bufs, directions = sgd_direction(params, grads, bufs, momentum, weight_decay,
                                            dampening=dampening, nesterov=nesterov)
    new_params = [_axpy(p, -a, d) for p, d, a in zip(params, directions, _lr_list(lr, len(params)))]
    return new_params, new_bufs, directions


def sgd_tangents(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor | None],
    lr: Tensor,
    momentum: Tensor,
    weight_decay: Tensor,
    z: Sequence[Tensor],
    hz: Sequence[Tensor],
    c: Sequence[Tensor | None],
    e_lr: Tensor,
    e_momentum: Tensor,
    e_weight_decay: Tensor,
    *,
    dampening: float = 0.0,
    nesterov: bool = False,
) -> tuple[list[Tensor], list[Tensor | None]]:
    r"""Propagate batched tangents through one SGD step: :math:`(Z, C)_t \mapsto (Z, C)_{t+1}`.

    The tangents have a leading column dimension ``N`` (one column per hyperparameter, or per
    schedule value): ``z[i]``, ``hz[i]`` and ``c[i]`` have shape ``(N, *params[i].shape)``;
    ``e_lr``, ``e_momentum``, ``e_weight_decay`` have shape ``(N,)`` and hold the derivative of
    this step's hyperparameter value with respect to each column (the one-hot :math:`e_x(t)` of
    docs/design.md §3, or any other seed).

    Args:
        params, grads, bufs: the primal state as in :func:`sgd_step`.
        lr, momentum, weight_decay (Tensor): 0-d tensors with this step's values.
        z (sequence of Tensor): :math:`Z_t = \partial w_t / \partial\lambda`.
        hz (sequence of Tensor): :math:`H_t Z_t`, the tangent of the loss gradient.
        c (sequence of Tensor or None): :math:`C_t = \partial v_t / \partial\lambda`; ``None``
            where ``bufs`` is ``None``.
        e_lr, e_momentum, e_weight_decay (Tensor): the hyperparameter seeds, shape ``(N,)``.
        dampening (float, optional): as in :func:`sgd_step` (default: 0).
        nesterov (bool, optional): as in :func:`sgd_step` (default: False).

    Returns:
        ``(z_next, c_next)``, both shaped like ``z`` (``momentum`` is a tensor here, so every
        parameter has a buffer after the step and ``c_next`` holds no ``None``).

    Example:
        >>> w, g = [torch.ones(2)], [torch.ones(2)]
        >>> z = [torch.zeros(1, 2)]
        >>> one, zero = torch.tensor(0.1), torch.tensor(0.0)
        >>> zn, cn = sgd_tangents(w, g, [None], one, zero, zero, z, z, [None],
        ...                       torch.ones(1), torch.zeros(1), torch.zeros(1))
        >>> zn[0]  # d w_1 / d lr = -g
        tensor([[-1., -1.]])
    """
    has_buf = [b is not None for b in bufs]
    buf_primals = tuple(b for b in bufs if b is not None)

    def step(ps, gs, bs, a, b, wd):
        it = iter(bs)
        full = [next(it) if h else None for h in has_buf]
        new_p, new_b, _ = sgd_step(ps, gs, full, a, b, wd, dampening=dampening, nesterov=nesterov)
        return tuple(new_p), tuple(new_b)

    primals = (tuple(params), tuple(grads), buf_primals, lr, momentum, weight_decay)
    c_tangents = tuple(ci for ci, h in zip(c, has_buf) if h)

    def one_column(zs, hzs, cs, ea, eb, ec):
        _, (dp, db) = torch.func.jvp(step, primals, (zs, hzs, cs, ea, eb, ec))
        return dp, db

    with FORWARD_AD_LOCK:  # forward-AD levels are process-wide: one thread at a time
        z_next, c_next = torch.func.vmap(one_column)(tuple(z), tuple(hz), c_tangents,
                                                       e_lr, e_momentum, e_weight_decay)
    return list(z_next), list(c_next)


def sgd_closed_tangents(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Buffers,
    hypers: dict[str, Hyper | Sequence[Tensor]],
    z: Sequence[Tensor] | None,
    hz: Sequence[Tensor] | None,
    buffer_tangents: Buffers,
    seeds: dict[str, Tensor],
    counts: Sequence[float] | None = None,
    *,
    dampening: float = 0.0,
    nesterov: bool = False,
) -> tuple[list[Tensor], Buffers]:
    r"""The SGD rule's Jacobian-vector product in closed form (:attr:`UpdateRule.tangents`).

    With :math:`G_t = H_t Z_t + c Z_t + e_c w_t` the tangent of :math:`g_t`:

    .. math::

        C_{t+1} &= b\, C_t + e_b v_t + (1 - \delta) G_t \quad (C_1 = G_0) \\
        D_t &= C_{t+1} \quad\text{or (Nesterov)}\quad G_t + b\, C_{t+1} + e_b v_{t+1} \\
        Z_{t+1} &= Z_t - a D_t - e_a d_t

    Arguments and results as :func:`~hyperoptim.rules.rule_tangents` (``counts`` unused);
    every hyperparameter may be a float, a tensor or a per-parameter list. Terms whose tangent
    is zero (``None``: no incoming ``z``/``hz``, no buffer tangent, an unseeded
    hyperparameter) are skipped, so a one-step tangent of a fixed state costs a few
    elementwise products. Equal to :func:`sgd_tangents` and to the generic path to rounding.
    """
    n_cols = _n_cols(z, hz, seeds)
    z_next: list[Tensor] = []
    c_next: list[Tensor | None] = []
    for i, (p, g, v) in enumerate(zip(params, grads, buffers["momentum_buffer"])):
        a, b, c = (_ith(hypers[k], i) for k in ("lr", "momentum", "weight_decay"))
        e = _seed_columns(seeds, p)
        zi, hzi = z[i] if z else None, hz[i] if hz else None
        ci = buffer_tangents["momentum_buffer"][i] if v is not None else None
        gw, gt = g, hzi
        if "weight_decay" in e or _active(c):
            gw = _axpy(g, c, p)
            gt = _terms(hzi, _times(zi, c), _times(e.get("weight_decay"), p))
        if "momentum" in e or _active(b):
            if v is None:  # torch's first step: v_1 = g_0
                vn, cn = gw, gt
            else:
                vn = v * b + (1 - dampening) * gw
                cn = _terms(_times(ci, b), _times(e.get("momentum"), v), _times(gt, 1 - dampening))
            d, dt = vn, cn
            if nesterov:
                d = gw + b * vn
                dt = _terms(gt, _times(cn, b), _times(e.get("momentum"), vn))
            c_next.append(_tangent_out(cn, p, n_cols, (zi, hzi, ci)))
        else:
            d, dt = gw, gt
            c_next.append(None)
        zn = _terms(zi, _times(dt, -a), _times(-e["lr"], d) if "lr" in e else None)
        z_next.append(_tangent_out(zn, p, n_cols, (zi, hzi, ci)))
    return z_next, {"momentum_buffer": c_next}


def sgd_momentum_tangents(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor | None],
    lrs: Sequence[float | Tensor],
    momentum: float,
    weight_decay: float = 0.0,
    *,
    dampening: float = 0.0,
    nesterov: bool = False,
) -> list[Tensor]:
    r""":math:`\partial w_{t+1} / \partial \mu_t` of one SGD step, the weights and the buffer
    :math:`v_t` before it held constant: :math:`-a\, \partial d_t / \partial \mu` with
    :math:`\partial d_t / \partial \mu = v_t` (heavy ball: :math:`d_t = v_{t+1} = \mu v_t +
    (1 - \tau) g'_t`) or :math:`2 \mu v_t + (1 - \tau) g'_t` (Nesterov: :math:`d_t = g'_t + \mu
    v_{t+1}`), 0 (heavy ball) or :math:`g'_t` (Nesterov) at the first step, where no buffer
    exists yet. The closed form of the generic one-step tangent
    (:func:`hyperoptim.methods.hd.one_step_momentum_tangents`), tested equal to it. Call it before
    the in-place step (a buffer may be the live one the step updates); ``lrs`` has one rate (or
    per-weight tensor) per parameter.
    """
    out = []
    for p, g, v, a in zip(params, grads, bufs, lrs, strict=True):
        if nesterov:
            g1 = g.add(p, alpha=weight_decay) if weight_decay != 0 else g
            dd = g1.clone() if v is None else v.mul(2.0 * momentum).add_(g1, alpha=1 - dampening)
        else:
            dd = torch.zeros_like(p) if v is None else v
        # -a * dd as a new tensor (dd may be the live buffer)
        out.append(dd.mul(a).neg_() if isinstance(a, Tensor) else dd.mul(-a))
    return out


def sgd_edge(hypers: dict[str, float], options: dict[str, float]) -> float:
    r"""The edge of stability of PyTorch's SGD in terms of its update's weight Jacobian.

    On a quadratic with curvature :math:`\lambda` (weight decay included) along an eigenvector,
    heavy-ball momentum :math:`m` with dampening :math:`\tau`, :math:`v \leftarrow m v + (1 -
    \tau) g,\ w \leftarrow w - a v`, moves :math:`(w, v)` by a matrix with trace
    :math:`1 + m - a (1 - \tau) \lambda` and determinant :math:`m`; by Jury's criterion it is
    stable exactly while :math:`a (1 - \tau) \lambda < 2 (1 + m)`. With the buffer held
    constant the update :math:`u = a (m v + (1 - \tau) g)` has :math:`\partial u / \partial w
    = a (1 - \tau) H`, whose Rayleigh quotient along the eigenvector is that product: the edge
    is :math:`2 (1 + m)`, plain SGD's :math:`a \lambda < 2` at :math:`m = 0`. Nesterov's
    :math:`d = g + m (m v + g)` gives trace :math:`(1 + m)(1 - a \lambda) + m` and determinant
    :math:`m (1 - a \lambda) + a m^2 \lambda`, stable while :math:`a \lambda (1 + 2m) < 2 (1 +
    m)`; there :math:`\partial u / \partial w = a (1 + m) H`, so the edge is
    :math:`2 (1 + m)^2 / (1 + 2 m)`.

    Args:
        hypers (dict): the rule's hyperparameters (``"momentum"`` is read).
        options (dict): ``"nesterov"`` (``"dampening"`` is inside the Jacobian already).

    Returns:
        float: the largest stable Rayleigh quotient of :math:`\partial u / \partial w`.

    Example:
        >>> sgd_edge({"momentum": 0.9}, {"nesterov": False})
        3.8
        >>> round(sgd_edge({"momentum": 0.0}, {"nesterov": True}), 6)
        2.0
    """
    m = float(hypers["momentum"])
    if options.get("nesterov", False):
        return 2.0 * (1.0 + m) ** 2 / (1.0 + 2.0 * m)
    return 2.0 * (1.0 + m)


# ------------------------------------------------------------------ the SGD rule as a value
def _sgd_rule_step(params, grads, buffers, hypers, counts, *, dampening=0.0, nesterov=False):
    new_p, new_b, _ = sgd_step(params, grads, buffers["momentum_buffer"], hypers["lr"],
                               hypers["momentum"], hypers["weight_decay"],
                               dampening=dampening, nesterov=nesterov)
    return new_p, {"momentum_buffer": new_b}


def _sgd_rule_step_(params, grads, buffers, hypers, counts, *, dampening=0.0, nesterov=False):
    _, new_b, dirs = sgd_direction(params, grads, buffers["momentum_buffer"], hypers["momentum"],
                                   hypers["weight_decay"], dampening=dampening,
                                   nesterov=nesterov, inplace=True)
    apply_update_(params, dirs, hypers["lr"])
    dirs = [d.clone() if d is g else d for d, g in zip(dirs, grads)]
    return {"momentum_buffer": new_b}, dirs


SGD = register_rule(UpdateRule(
    name="sgd",
    hyper_names=("lr", "momentum", "weight_decay"),
    buffer_names=("momentum_buffer",),
    uses_counts=False,
    hypers=lambda g: {k: g[k] for k in ("lr", "momentum", "weight_decay")},
    options=lambda g: {"dampening": g["dampening"], "nesterov": g["nesterov"]},
    step=_sgd_rule_step,
    step_=_sgd_rule_step_,
    elementwise=True,
    tangents=sgd_closed_tangents,
    edge=sgd_edge,
))
"""``torch.optim.SGD``'s rule (:func:`sgd_step`)."""
