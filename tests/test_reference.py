"""The reference estimators: the exact oracle against finite differences, closed forms and
torch.optim.SGD; DrMAD where it is exact and where it is not."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperoptim._schedule import window_of
from hyperoptim.reference import finite_difference_hypergrad, unroll, unrolled_hypergrad

F64 = torch.float64
MAX_T = 6
NAMES = ("lr", "momentum", "weight_decay")


class Problem:
    """A small smooth problem on a parameter dict: tanh(x W + b), squared error, a batch a step."""

    def __init__(self, seed: int, dtype: torch.dtype = F64, n_in: int = 3, n_out: int = 2):
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape, scale=1.0):
            return scale * torch.randn(*shape, generator=gen, dtype=F64).to(dtype)

        self.params = {"W": randn(n_in, n_out, scale=0.5), "b": randn(n_out, scale=0.1)}
        self.buffers = {"W": randn(n_in, n_out, scale=0.3), "b": randn(n_out, scale=0.3)}
        self.xs, self.ys = randn(MAX_T, 4, n_in), randn(MAX_T, 4, n_out)
        self.xv, self.yv = randn(8, n_in), randn(8, n_out)

    @staticmethod
    def _model(p, x):
        return torch.tanh(x @ p["W"] + p["b"])

    def train(self, p, t):
        xs, ys = self.xs.to(p["W"].dtype), self.ys.to(p["W"].dtype)
        return ((self._model(p, xs[t]) - ys[t]) ** 2).mean()

    def val(self, p):
        xv, yv = self.xv.to(p["W"].dtype), self.yv.to(p["W"].dtype)
        return ((self._model(p, xv) - yv) ** 2).mean()


@st.composite
def schedules(draw, lo: float, hi: float, horizon: int, allow_scalar: bool = True):
    """One float (a single shared window), or a list of 1..horizon values."""
    n = draw(st.integers(1, horizon))
    values = draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n))
    if n == 1 and allow_scalar and draw(st.booleans()):
        return values[0]
    return values


@st.composite
def runs(draw, torch_compatible: bool = False):
    """Keyword arguments of one inner run; ``torch_compatible``: momentum all > 0 or all 0."""
    horizon = draw(st.integers(1, MAX_T))
    lr = draw(schedules(0.0, 0.5, horizon))
    kind = draw(st.sampled_from(["none", "positive"] if torch_compatible
                                else ["none", "positive", "mixed"]))
    if kind == "none":
        momentum = 0.0
    elif kind == "positive":
        momentum = draw(schedules(0.05, 0.95, horizon))
    else:
        momentum = draw(schedules(0.0, 0.95, horizon, allow_scalar=False))
        momentum[draw(st.integers(0, len(momentum) - 1))] = 0.0
    positive = kind == "positive"
    nesterov = draw(st.booleans()) and (positive or not torch_compatible)
    dampening = draw(st.sampled_from([0.0, 0.3])) if positive and not nesterov else 0.0
    weight_decay = draw(schedules(0.0, 0.2, horizon))
    return dict(horizon=horizon, lr=lr, momentum=momentum, weight_decay=weight_decay,
                dampening=dampening, nesterov=nesterov)


def _windows(value) -> int:
    return 1 if isinstance(value, float) else len(value)


# ---------------------------------------------------------------------------------------------
# The exact oracle


@settings(max_examples=40, deadline=None)
@given(run=runs(), seed=st.integers(0, 2**16), with_buffers=st.booleans())
def test_unrolled_matches_finite_differences(run, seed, with_buffers):
    prob = Problem(seed)
    bufs = prob.buffers if with_buffers else None
    e, hg = unrolled_hypergrad(prob.train, prob.val, prob.params, momentum_buffers=bufs, **run)
    e_fd, hg_fd = finite_difference_hypergrad(prob.train, prob.val, prob.params,
                                              momentum_buffers=bufs, **run)
    torch.testing.assert_close(e, e_fd, rtol=1e-12, atol=0.0)
    for name in NAMES:
        assert hg[name].dtype == F64
        assert hg[name].shape == (_windows(run[name]),)
        # rel. error <= 1e-6, with a floor at the differences' round-off (about 1e-16 |E| / eps).
        torch.testing.assert_close(hg[name], hg_fd[name], rtol=1e-6, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(run=runs(), seed=st.integers(0, 2**16))
def test_window_hypergradient_is_sum_of_its_steps(run, seed):
    """A window's value is shared by its steps, so its derivative is the sum of per-step ones."""
    prob = Problem(seed)
    horizon = run["horizon"]
    per_step = dict(run)
    for name in NAMES:
        values = [run[name]] if isinstance(run[name], float) else run[name]
        per_step[name] = [values[window_of(t, horizon, len(values))] for t in range(horizon)]
    _, hg = unrolled_hypergrad(prob.train, prob.val, prob.params, **run)
    _, hg_steps = unrolled_hypergrad(prob.train, prob.val, prob.params, **per_step)
    for name in NAMES:
        n = _windows(run[name])
        summed = torch.zeros(n, dtype=F64).index_add_(
            0, torch.tensor([window_of(t, horizon, n) for t in range(horizon)]), hg_steps[name])
        torch.testing.assert_close(hg[name], summed, rtol=1e-10, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(h=st.floats(0.1, 3.0), w0=st.floats(-2.0, 2.0), horizon=st.integers(1, 8),
       data=st.data())
def test_closed_form_quadratic_lr_windows(h, w0, horizon, data):
    """E = L = h w^2 / 2, no momentum: w_T = prod_k (1 - a_k h)^(n_k) w_0, and
    dE/da_k = -h^2 w_T^2 n_k / (1 - a_k h) with n_k the steps of window k."""
    n = data.draw(st.integers(1, horizon))
    lrs = data.draw(st.lists(st.floats(0.0, 0.9 / h), min_size=n, max_size=n))
    counts = [sum(window_of(t, horizon, n) == k for t in range(horizon)) for k in range(n)]
    w_T = w0 * math.prod((1 - a * h) ** c for a, c in zip(lrs, counts, strict=True))
    expected = [-h * h * w_T * w_T * c / (1 - a * h) for a, c in zip(lrs, counts, strict=True)]

    def loss(p, t=0):
        return 0.5 * h * (p["w"] ** 2).sum()

    params = {"w": torch.tensor([w0], dtype=F64)}
    e, hg = unrolled_hypergrad(loss, loss, params, horizon=horizon, lr=lrs)
    torch.testing.assert_close(e, torch.tensor(0.5 * h * w_T * w_T, dtype=F64))
    torch.testing.assert_close(hg["lr"], torch.tensor(expected, dtype=F64), rtol=1e-10,
                               atol=1e-13)
    final, _ = unroll(loss, params, horizon=horizon, lr=lrs)
    torch.testing.assert_close(final["w"], torch.tensor([w_T], dtype=F64), rtol=1e-12, atol=0.0)


@settings(max_examples=20, deadline=None)
@given(h=st.floats(0.1, 2.0), c=st.floats(0.0, 1.0), a=st.floats(0.01, 0.3),
       w0=st.floats(0.5, 2.0), horizon=st.integers(1, 8))
def test_closed_form_weight_decay(h, c, a, w0, horizon):
    """L = E = h w^2 / 2 with weight decay c: w_T = q^T w_0 with q = 1 - a (h + c), so
    dE/dc = h w_T * T q^(T-1) (-a) w_0 and dE/da = h w_T * T q^(T-1) (-(h + c)) w_0."""
    q = 1 - a * (h + c)
    w_T = q ** horizon * w0

    def loss(p, t=0):
        return 0.5 * h * (p["w"] ** 2).sum()

    _, hg = unrolled_hypergrad(loss, loss, {"w": torch.tensor([w0], dtype=F64)},
                               horizon=horizon, lr=a, weight_decay=c)
    d_wT = horizon * q ** (horizon - 1) * w0
    torch.testing.assert_close(hg["weight_decay"], torch.tensor([h * w_T * d_wT * -a], dtype=F64),
                               rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(hg["lr"], torch.tensor([h * w_T * d_wT * -(h + c)], dtype=F64),
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("nesterov", [False, True])
def test_closed_form_momentum_two_steps(nesterov):
    """Two steps on L = E = h w^2 / 2 by hand: v_1 = g_0 = h w_0, w_1 = w_0 - a d_0,
    v_2 = b v_1 + h w_1, w_2 = w_1 - a d_1 (heavy ball d = v; Nesterov d = g + b v)."""
    h, a, b, w0 = 1.5, 0.2, 0.7, 1.3

    def final(b):
        v1 = h * w0
        w1 = w0 - a * ((h * w0 + b * v1) if nesterov else v1)
        v2 = b * v1 + h * w1
        return w1 - a * ((h * w1 + b * v2) if nesterov else v2)

    w2 = final(b)
    if nesterov:  # dw_1/db = -a v_1; d(h w_1 + b v_2)/db = h w1' + v_2 + b (v_1 + h w1')
        v1, w1p = h * w0, -a * h * w0
        w1 = w0 - a * (h * w0 + b * v1)
        v2 = b * v1 + h * w1
        dw2 = w1p - a * (h * w1p + v2 + b * (v1 + h * w1p))
    else:  # w_1 does not depend on b; dv_2/db = v_1
        dw2 = -a * h * w0

    def loss(p, t=0):
        return 0.5 * h * (p["w"] ** 2).sum()

    _, hg = unrolled_hypergrad(loss, loss, {"w": torch.tensor([w0], dtype=F64)}, horizon=2,
                               lr=a, momentum=b, nesterov=nesterov)
    torch.testing.assert_close(hg["momentum"], torch.tensor([h * w2 * dw2], dtype=F64),
                               rtol=1e-12, atol=0.0)
    # the hand-written derivative itself, against a difference quotient of the hand formula
    assert abs(dw2 - (final(b + 1e-6) - final(b - 1e-6)) / 2e-6) < 1e-8


def test_scalar_schedule_is_one_shared_window():
    prob = Problem(0)
    _, scalar = unrolled_hypergrad(prob.train, prob.val, prob.params, horizon=4, lr=0.3,
                                   momentum=0.5, weight_decay=0.01)
    _, listed = unrolled_hypergrad(prob.train, prob.val, prob.params, horizon=4, lr=[0.3],
                                   momentum=[0.5], weight_decay=[0.01])
    for name in NAMES:
        assert scalar[name].shape == (1,)
        torch.testing.assert_close(scalar[name], listed[name], rtol=0, atol=0)


def test_inputs_are_not_modified_and_dtype():
    prob = Problem(1, dtype=torch.float32)
    before = {k: v.clone() for k, v in prob.params.items()}
    bufs = {k: v.clone() for k, v in prob.buffers.items()}
    e, hg = unrolled_hypergrad(prob.train, prob.val, prob.params, horizon=3, lr=[0.1, 0.2],
                               momentum=0.9, momentum_buffers=bufs)
    assert e.dtype == F64 and all(v.dtype == F64 for v in hg.values())
    final, new_bufs = unroll(prob.train, prob.params, horizon=3, lr=[0.1, 0.2], momentum=0.9,
                             momentum_buffers=bufs)
    assert final["W"].dtype == torch.float32 and new_bufs["W"].dtype == torch.float32
    for k in before:
        assert torch.equal(prob.params[k], before[k])
        assert torch.equal(bufs[k], prob.buffers[k])


# ---------------------------------------------------------------------------------------------
# The forward pass against torch.optim.SGD


@settings(max_examples=30, deadline=None)
@given(run=runs(torch_compatible=True), seed=st.integers(0, 2**16), with_buffers=st.booleans(),
       dtype=st.sampled_from([torch.float32, F64]))
def test_unroll_is_bit_identical_to_torch_sgd(run, seed, with_buffers, dtype):
    prob = Problem(seed, dtype=dtype)
    bufs = prob.buffers if with_buffers else None
    final, final_bufs = unroll(prob.train, prob.params, momentum_buffers=bufs, **run)

    horizon = run["horizon"]
    sched = {name: [run[name]] if isinstance(run[name], float) else run[name] for name in NAMES}
    names = list(prob.params)
    leaves = [prob.params[k].clone().requires_grad_() for k in names]
    opt = torch.optim.SGD(leaves, lr=sched["lr"][0], momentum=sched["momentum"][0],
                          dampening=run["dampening"], nesterov=run["nesterov"],
                          weight_decay=sched["weight_decay"][0])
    if bufs is not None:
        for k, p in zip(names, leaves, strict=True):
            opt.state[p]["momentum_buffer"] = bufs[k].clone()
    for t in range(horizon):
        for name in NAMES:
            values = sched[name]
            opt.param_groups[0][name] = values[window_of(t, horizon, len(values))]
        opt.zero_grad()
        prob.train(dict(zip(names, leaves, strict=True)), t).backward()
        opt.step()
    for k, p in zip(names, leaves, strict=True):
        assert torch.equal(final[k], p.detach())
        if max(sched["momentum"]) > 0:
            assert torch.equal(final_bufs[k], opt.state[p]["momentum_buffer"])
        else:  # no momentum: PyTorch leaves a given buffer alone, the limit b -> 0+ keeps it
            assert (final_bufs is None) == (bufs is None)


def test_zero_momentum_window_is_the_limit_of_small_momentum():
    """The documented convention: a window of momentum 0 keeps the buffer (the limit b -> 0+)."""
    prob = Problem(2)
    run = dict(horizon=4, lr=0.3, weight_decay=0.01)
    at_zero, _ = unroll(prob.train, prob.params, momentum=[0.0, 0.8], **run)
    near_zero, _ = unroll(prob.train, prob.params, momentum=[1e-9, 0.8], **run)
    for k in at_zero:
        torch.testing.assert_close(at_zero[k], near_zero[k], rtol=0, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Errors


def _loss(p, t=0):
    return (p["w"] ** 2).sum()


BAD = [
    (dict(horizon=0), "Invalid horizon value"),
    (dict(horizon=2.0), "Invalid horizon value"),
    (dict(horizon=True), "Invalid horizon value"),
    (dict(lr=-0.1), "Invalid lr value"),
    (dict(lr=[0.1, 0.1, 0.1, 0.1]), "Invalid lr value.*4 windows for a horizon of 3"),
    (dict(lr=[]), "Invalid lr value"),
    (dict(lr=float("nan")), "Invalid lr value"),
    (dict(lr="fast"), "Invalid lr value"),
    (dict(momentum=[0.5, -0.1]), "Invalid momentum value"),
    (dict(weight_decay=-1e-4), "Invalid weight_decay value"),
    (dict(momentum=0.9, dampening=0.1, nesterov=True), "Nesterov momentum requires zero dampening"),
    (dict(momentum=[0.9, 0.0], dampening=0.1), "Invalid dampening value"),
    (dict(momentum_buffers={"v": torch.zeros(2)}), "Invalid momentum_buffers value"),
]


@pytest.mark.parametrize("fn", [unrolled_hypergrad, finite_difference_hypergrad, unroll],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize(("kwargs", "regex"), BAD, ids=[r for _, r in BAD])
def test_errors(fn, kwargs, regex):
    args = dict(horizon=3, lr=0.1)
    args.update(kwargs)
    params = {"w": torch.ones(2, dtype=F64)}
    with pytest.raises(ValueError, match=regex):
        if fn is unroll:
            fn(_loss, params, **args)
        else:
            fn(_loss, _loss, params, **args)


def test_finite_difference_eps_error():
    with pytest.raises(ValueError, match="Invalid eps value"):
        finite_difference_hypergrad(_loss, _loss, {"w": torch.ones(2)}, horizon=1, lr=0.1, eps=0)
