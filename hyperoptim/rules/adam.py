r"""The Adam/AdamW update rule, written once (docs/design.md §3).

``torch.optim.Adam`` (``amsgrad=False``, float hyperparameters, single-tensor path), with learning
rate :math:`a`, moment factors :math:`\beta_1, \beta_2`, :math:`\epsilon`, weight decay
:math:`\lambda`, at its :math:`t`-th step (:math:`t \ge 1`, counted per parameter):

.. math::

    g &= \nabla L(w) \ (\text{negated with } \texttt{maximize}) \ + \lambda w
        \quad \text{(Adam's L2 term; not with decoupled weight decay)} \\
    w &\leftarrow (1 - a\lambda)\, w \quad \text{(AdamW: decoupled weight decay)} \\
    m' &= \beta_1 m + (1 - \beta_1) g, \qquad v' = \beta_2 v + (1 - \beta_2) g^2 \\
    w' &= w - \frac{a}{1 - \beta_1^t} \cdot \frac{m'}{\sqrt{v'} / \sqrt{1 - \beta_2^t} + \epsilon}

with :math:`\epsilon` added *after* the bias correction of :math:`\sqrt{v'}`, exactly as torch
does. :func:`adam_step` is that rule as a pure function; with Python-float hyperparameters it does
torch's floating-point operations (``lerp``, ``mul``/``addcmul``, ``addcdiv`` with
``value=-a/(1-\beta_1^t)``), so weights are bit-identical to ``torch.optim.Adam``/``AdamW``
(``foreach=False``). With 0-d tensor hyperparameters it is differentiable in them (and always in
weights, gradients and moments), which is how :func:`hyperoptim.rules.rule_tangents` and
:func:`hyperoptim.rules.rule_vjp` get every tangent and reverse product: no derivative of Adam is
typed anywhere. The one exception is :math:`\sqrt{v}` at :math:`v = 0` (a weight whose gradient has
been exactly 0, e.g. a dead ReLU unit): its derivative is taken as 0 rather than
:math:`0/0`; this is the exact derivative of :math:`w'` there because :math:`\epsilon > 0`
keeps the denominator away from 0 and :math:`m' = 0` multiplies it.

:func:`adam_step_` is the same step in place (the optimizers' fast path). It also returns the
step's direction with respect to the learning rate,

.. math::

    d = -\frac{\partial w'}{\partial a} = \frac{1}{1 - \beta_1^t} \cdot
        \frac{m'}{\sqrt{v'} / \sqrt{1 - \beta_2^t} + \epsilon}\ \big(+\ \lambda w \text{ for AdamW}\big),

which hypergradient descent and MARTHE need (``tests/test_update.py`` checks it against
``torch.func.jvp`` of :func:`adam_step`).

:func:`adam_tangents` is the rule's Jacobian-vector product in closed form, registered as its
optional fast path (:attr:`~hyperoptim.rules.UpdateRule.tangents`): autograd of
:func:`adam_step` stays the reference, and ``tests/test_rule_closed_forms.py`` checks that the two
agree to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.types import Hyper
from .algebra import (
    _active,
    _axpy,
    _fits,
    _ith,
    _lr_list,
    _n_cols,
    _seed_columns,
    _tangent_out,
    _terms,
    _times,
)
from .base import Buffers, UpdateRule, register_rule

__all__ = ["ADAM", "adam_step", "adam_step_", "adam_tangents", "check_adam_arguments"]


def _sqrt(v: Tensor) -> Tensor:
    """``v.sqrt()`` (the same bits for v >= 0) whose derivative at v = 0 is 0 instead of inf."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, 1.0).sqrt(), 0.0)


def _is_t(x: Any) -> bool:
    return isinstance(x, Tensor)


def adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    counts: Sequence[float],
    lr: Hyper | Sequence[Tensor],
    beta1: Hyper = 0.9,
    beta2: Hyper = 0.999,
    weight_decay: Hyper = 0.0,
    *,
    eps: float = 1e-8,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    r"""One Adam/AdamW step as a pure function (nothing is modified in place).

    Args:
        params (sequence of Tensor): the weights :math:`w`.
        grads (sequence of Tensor): the loss gradients (without weight decay).
        exp_avgs, exp_avg_sqs (sequence of Tensor): the moments :math:`m, v` (zeros before the
            first step, as torch initialises them).
        counts (sequence of float): this step's number :math:`t \ge 1` per parameter (torch's
            ``state["step"]`` after its increment).
        lr (float, Tensor or sequence of Tensor): the learning rate :math:`a`; a sequence gives
            one (0-d or parameter-shaped) learning rate per parameter.
        beta1, beta2 (float or Tensor, optional): moment factors (default: 0.9, 0.999).
        weight_decay (float or Tensor, optional): :math:`\lambda` (default: 0).
        eps (float, optional): :math:`\epsilon` (default: 1e-8).
        decoupled_weight_decay (bool, optional): AdamW's decay (default: False).
        maximize (bool, optional): ascend instead (default: False).

    Returns:
        ``(new_params, new_exp_avgs, new_exp_avg_sqs)``.

    Example:
        >>> w, g, z = [torch.ones(2)], [torch.tensor([0.5, -2.0])], [torch.zeros(2)]
        >>> new_w, m, v = adam_step(w, g, z, z, [1.0], lr=0.1)
        >>> new_w[0]  # the first step moves each weight by about lr against its gradient's sign
        tensor([0.9000, 1.1000])
    """
    new_p, new_m, new_v = [], [], []
    for p, g, m, v, t, a in zip(params, grads, exp_avgs, exp_avg_sqs, counts,
                                _lr_list(lr, len(params))):
        grad = -g if maximize else g
        if _active(weight_decay):
            if decoupled_weight_decay:
                p = p * (1 - a * weight_decay)
            elif _is_t(weight_decay):
                grad = grad + weight_decay * p
            else:
                grad = grad.add(p, alpha=weight_decay)
        m = m.lerp(grad, 1 - beta1) if not _is_t(beta1) else m + (1 - beta1) * (grad - m)
        if _is_t(beta2):
            v = v * beta2 + (1 - beta2) * grad * grad
        else:
            v = v.mul(beta2).addcmul(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        step_size = a / bias_correction1
        denom = _sqrt(v) / bias_correction2**0.5 + eps
        if _is_t(step_size):
            p = p - step_size * m / denom
        else:
            p = p.addcdiv(m, denom, value=-step_size)
        new_p.append(p)
        new_m.append(m)
        new_v.append(v)
    return new_p, new_m, new_v


@torch.no_grad()
def adam_step_(
    params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor], counts: Sequence[float], lr: float | Sequence[Tensor],
    beta1: float = 0.9, beta2: float = 0.999, weight_decay: float = 0.0, *, eps: float = 1e-8,
    decoupled_weight_decay: bool = False, maximize: bool = False,
) -> list[Tensor]:
    r"""One Adam/AdamW step in place, exactly as ``torch.optim.Adam``'s single-tensor path.

    Arguments as :func:`adam_step` (float hyperparameters; ``lr`` may be a sequence of
    per-parameter tensors: per-weight learning rates). ``params``, ``exp_avgs`` and
    ``exp_avg_sqs`` are updated in place; ``counts`` are not touched (the caller advances
    ``state["step"]``).

    Returns:
        The directions :math:`d = -\partial w' / \partial a`, one new tensor per parameter.

    Example:
        >>> w, m, v = torch.ones(2), torch.zeros(2), torch.zeros(2)
        >>> d = adam_step_([w], [torch.tensor([0.5, -2.0])], [m], [v], [1.0], lr=0.1)
        >>> w, d[0]
        (tensor([0.9000, 1.1000]), tensor([ 1.0000, -1.0000]))
    """
    directions = []
    for p, g, m, v, t, a in zip(params, grads, exp_avgs, exp_avg_sqs, counts,
                                _lr_list(lr, len(params))):
        grad = -g if maximize else g
        decay = None
        if weight_decay != 0:
            if decoupled_weight_decay:
                decay = p.mul(weight_decay)  # the -lambda w_{t-1} term of dw'/da, before the decay
                p.mul_(1 - a * weight_decay)
            else:
                grad = grad.add(p, alpha=weight_decay)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        step_size = a / bias_correction1
        denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
        if _is_t(step_size):
            p.addcmul_(step_size, m / denom, value=-1)
        else:
            p.addcdiv_(m, denom, value=-step_size)
        d = m.div(denom).div_(bias_correction1)
        directions.append(d if decay is None else d.add_(decay))
    return directions


def adam_tangents(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Buffers,
    hypers: dict[str, Any],
    z: Sequence[Tensor] | None,
    hz: Sequence[Tensor] | None,
    buffer_tangents: Buffers,
    seeds: dict[str, Tensor],
    counts: Sequence[float],
    *,
    eps: float = 1e-8,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> tuple[list[Tensor], Buffers]:
    r"""The Adam/AdamW rule's Jacobian-vector product in closed form (:attr:`UpdateRule.tangents`).

    The tangents (capitals; :math:`e_x` the seed of hyperparameter :math:`x`) of each line of
    :func:`adam_step`, with :math:`G` the gradient's (:math:`\pm H Z`, plus :math:`\lambda Z +
    e_\lambda w` for Adam's L2 term) and :math:`s = \sqrt{v'}`, :math:`r = \sqrt{1-\beta_2^t}`:

    .. math::

        M' &= \beta_1 M + (1-\beta_1) G + e_{\beta_1} (m - g) \\
        V' &= \beta_2 V + 2 (1-\beta_2)\, g\, G + e_{\beta_2} (v - g^2) \\
        \delta &= \frac{S}{r} - \frac{s\, R}{r^2}, \quad S = \frac{V'}{2 s}\ (0 \text{ at } s = 0),
            \quad R = -\frac{t \beta_2^{t-1} e_{\beta_2}}{2 r} \\
        Z' &= P - \frac{a}{b_1} \cdot \frac{M' - q\,\delta}{s/r + \epsilon}
            - \Big(\frac{e_a}{b_1} + \frac{a\, t \beta_1^{t-1} e_{\beta_1}}{b_1^2}\Big) q,
            \qquad q = \frac{m'}{s/r + \epsilon},\ b_1 = 1 - \beta_1^t

    with :math:`P = Z` (Adam) or :math:`(1 - a\lambda) Z - (e_a \lambda + a e_\lambda) w`
    (AdamW). Arguments and results as :func:`~hyperoptim.rules.rule_tangents`; every
    hyperparameter may be a float, a tensor or a per-parameter list. Zero tangents (``None``)
    are skipped. Equal to the generic path (autograd of :func:`adam_step`) to rounding.
    """
    n_cols = _n_cols(z, hz, seeds)
    z_next: list[Tensor] = []
    m_next: list[Tensor | None] = []
    v_next: list[Tensor | None] = []
    for i, (p, g, m, v, t) in enumerate(zip(params, grads, buffers["exp_avg"],
                                            buffers["exp_avg_sq"], counts)):
        a, b1, b2, lam = (_ith(hypers[k], i) for k in ("lr", "beta1", "beta2", "weight_decay"))
        e = _seed_columns(seeds, p)
        zi, hzi = z[i] if z else None, hz[i] if hz else None
        mt, vt = buffer_tangents["exp_avg"][i], buffer_tangents["exp_avg_sq"][i]
        inputs = (zi, hzi, mt, vt)
        grad, gt = (-g, _times(hzi, -1)) if maximize else (g, hzi)
        pt = zi
        if "weight_decay" in e or _active(lam):
            grad, gt, pt = _decay_tangents(p, grad, gt, zi, a, lam, e, decoupled_weight_decay)
        # The primal moments by the rule's own operations (float hyperparameters: lerp, addcmul).
        m1 = m.lerp(grad, 1 - b1) if not _is_t(b1) else m + (1 - b1) * (grad - m)
        v1 = (v.mul(b2).addcmul_(grad, grad, value=1 - b2) if not _is_t(b2)
              else v * b2 + (1 - b2) * grad * grad)
        mt1 = _terms(_times(mt, b1), _times(gt, 1 - b1),
                     _times(e["beta1"], m - grad) if "beta1" in e else None)
        vt1 = _terms(_times(vt, b2), _times(gt, grad, 2 * (1 - b2)),
                     _times(e["beta2"], v - grad * grad) if "beta2" in e else None)
        moments = [m1, v1]
        del m1, v1  # _step_tangent frees them once consumed
        zt = _step_tangent(pt, moments, mt1, vt1, a, b1, b2, t, eps, e)
        z_next.append(_tangent_out(zt, p, n_cols, inputs))
        m_next.append(_tangent_out(mt1, p, n_cols, inputs))
        v_next.append(_tangent_out(vt1, p, n_cols, inputs))
    return z_next, {"exp_avg": m_next, "exp_avg_sq": v_next}


def _decay_tangents(p: Tensor, grad: Tensor, gt: Tensor | None, zi: Tensor | None, a: Any,
                    lam: Any, e: dict[str, Tensor], decoupled: bool
                    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`adam_tangents`' weight decay: the gradient and its tangent with Adam's L2 term, or
    the decayed weights' tangent :math:`P` (AdamW); ``(grad, G, P)``."""
    if decoupled:
        own = _terms(_times(e.get("lr"), lam), _times(e.get("weight_decay"), a))
        return grad, gt, _terms(_times(zi, 1 - a * lam), None if own is None else _times(own, -p))
    gt = _terms(gt, _times(zi, lam), _times(e.get("weight_decay"), p))
    return _axpy(grad, lam, p), gt, zi


def _step_tangent(pt: Tensor | None, moments: list[Tensor], mt1: Tensor | None,
                  vt1: Tensor | None, a: Any, b1: Any, b2: Any, t: float, eps: float,
                  e: dict[str, Tensor]) -> Tensor | None:
    r""":func:`adam_tangents`' last line: the tangent of :math:`w' = w - (a / b_1)\, q` from the
    moments' (``None``: zero); ``moments`` is :math:`[m', v']`, emptied here."""
    bc1 = 1 - b1**t
    q, qt = _quotient_tangent(moments, mt1, vt1, b2, t, eps, e)
    step_size = a / bc1
    # d(a / b_1) = e_a / b_1 + a t beta1^(t-1) e_beta1 / b_1^2
    sst = _terms(_times(e.get("lr"), 1 / bc1),
                 _times(e.get("beta1"), step_size * t * b1 ** (t - 1) / bc1))
    zt = pt if qt is None else (_times(qt, -step_size) if pt is None else _axpy(pt, -step_size, qt))
    del qt
    if sst is None:
        return zt
    own = _times(sst, -q)
    del q
    if zt is None or zt is pt or own is None or not _fits(zt, own):
        return _terms(zt, own)
    return zt.add_(own)  # zt was made here


def _quotient_tangent(moments: list[Tensor], mt1: Tensor | None, vt1: Tensor | None, b2: Any,
                      t: float, eps: float, e: dict[str, Tensor]
                      ) -> tuple[Tensor, Tensor | None]:
    r""":math:`q = m' / (s / r + \epsilon)` and its tangent (``None``: zero), from
    ``moments`` :math:`= [m', v']`, emptied here (:func:`_step_tangent`)."""
    bc2 = 1 - b2**t
    r = bc2**0.5
    # Temporaries (the new moments included) are freed or updated in place as soon as they are
    # consumed: under FSDP2 each is a whole shard of every column, and the step's memory peaks
    # here. The in-place ops are the same operations on the same operands as the out-of-place
    # ones (the same rounding).
    m1, v1 = moments
    moments.clear()
    s = v1.sqrt()  # v1 >= 0; the tangent of sqrt is taken as 0 where v1 = 0 (module docstring)
    zero = None if vt1 is None else (v1 > 0).logical_not_()
    del v1
    denom = (s / r).add_(eps)
    q = m1 / denom
    del m1
    dt = None
    if zero is not None:
        # torch.where(v1 > 0, 1 / s, 0.0), in s's storage where s is not needed after.
        inverse = (s.reciprocal() if "beta2" in e else s.reciprocal_()).masked_fill_(zero, 0.0)
        del zero
        dt = _times(vt1, inverse, 0.5 / r)
        del inverse
    if "beta2" in e:
        dt = _terms(dt, _times(e["beta2"], s, t * b2 ** (t - 1) / (2 * r * bc2)))
    del s
    qt = mt1 if dt is None else (_terms(mt1, _times(dt, -q)) if mt1 is None
                                 else torch.addcmul(mt1, q, dt, value=-1))
    del dt
    return q, None if qt is None else (qt / denom if qt is mt1 else qt.div_(denom))


def _rule_step(params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Buffers,
               hypers: dict[str, Any], counts: Sequence[float], **options: Any
               ) -> tuple[list[Tensor], Buffers]:
    new_p, m, v = adam_step(params, grads, buffers["exp_avg"], buffers["exp_avg_sq"], counts,
                            hypers["lr"], hypers["beta1"], hypers["beta2"],
                            hypers["weight_decay"], **options)
    return new_p, {"exp_avg": m, "exp_avg_sq": v}


def _rule_step_(params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Buffers,
                hypers: dict[str, Any], counts: Sequence[float], **options: Any
                ) -> tuple[Buffers, list[Tensor]]:
    dirs = adam_step_(params, grads, buffers["exp_avg"], buffers["exp_avg_sq"], counts,
                      hypers["lr"], hypers["beta1"], hypers["beta2"], hypers["weight_decay"],
                      **options)
    return {"exp_avg": list(buffers["exp_avg"]), "exp_avg_sq": list(buffers["exp_avg_sq"])}, dirs


def _init_state(p: Tensor) -> dict[str, Tensor]:
    # torch.optim.Adam's lazy state: a float32 CPU step counter and zero moments.
    return {
        "step": torch.tensor(0.0, dtype=torch.float32),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }


ADAM = register_rule(UpdateRule(
    name="adam",
    hyper_names=("lr", "beta1", "beta2", "weight_decay"),
    buffer_names=("exp_avg", "exp_avg_sq"),
    uses_counts=True,
    hypers=lambda g: dict(lr=g["lr"], beta1=g["betas"][0], beta2=g["betas"][1],
                          weight_decay=g["weight_decay"]),
    options=lambda g: dict(eps=g["eps"], decoupled_weight_decay=g["decoupled_weight_decay"],
                           maximize=g.get("maximize", False)),
    step=_rule_step,
    step_=_rule_step_,
    init_state=_init_state,
    elementwise=True,
    tangents=adam_tangents,
))
"""``torch.optim.Adam``'s rule (and AdamW's, with ``decoupled_weight_decay=True``)."""


def check_adam_arguments(lr: Any, betas: Any, eps: Any, weight_decay: Any, amsgrad: Any,
                         maximize: Any = False) -> None:
    """The checks ``torch.optim.Adam`` makes (float hyperparameters), in the package's wording,
    plus what the hyperoptim Adam optimizers do not support (``amsgrad``, ``maximize``)."""
    from ..core.options import check_rule_arguments

    check_rule_arguments("adam", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize)
