"""The reference estimators: the exact oracle against finite differences, closed forms and
torch.optim.SGD; DrMAD where it is exact and where it is not."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hyperoptim.core.schedule import window_of
from hyperoptim.reference import (
    adam_finite_difference_hypergrad,
    adam_unroll,
    adam_unrolled_hypergrad,
    drmad_hypergrad,
    finite_difference_hypergrad,
    unroll,
    unrolled_hypergrad,
)

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
@given(h=st.floats(0.1, 3.0), w0=st.floats(-2.0, 2.0, allow_subnormal=False), horizon=st.integers(1, 8),
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
# DrMAD: exact where the iterates are equally spaced on the segment w_0 -> w_T, approximate elsewhere


class LinearTrain:
    """A constant training gradient (L_t(w) = <g, w>): without weight decay, SGD with one learning
    rate takes equal steps along a line, also with momentum when the buffer starts at its fixed
    point v* = b v* + (1 - dampening) g. The validation loss is not linear."""

    def __init__(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.g = {"W": torch.randn(3, 2, generator=gen, dtype=F64),
                  "b": torch.randn(2, generator=gen, dtype=F64)}
        self.params = {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in self.g.items()}
        self.target = torch.randn(4, 2, generator=gen, dtype=F64)
        self.x = torch.randn(4, 3, generator=gen, dtype=F64)

    def train(self, p, t):
        return sum((p[k] * self.g[k]).sum() for k in p)

    def val(self, p):
        return ((torch.tanh(self.x @ p["W"] + p["b"]) - self.target) ** 2).mean()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), horizon=st.integers(1, 8), lr=st.floats(0.01, 0.5),
       momentum=st.sampled_from([0.0, 0.5, 0.9]), nesterov=st.booleans(),
       dampening=st.sampled_from([0.0, 0.3]), data=st.data())
def test_drmad_is_exact_on_equally_spaced_path(seed, horizon, lr, momentum, nesterov, dampening,
                                                data):
    prob = LinearTrain(seed)
    if nesterov or momentum == 0:
        dampening = 0.0
    # one learning rate and one momentum value, possibly repeated over several windows
    lrs = [lr] * data.draw(st.integers(1, horizon))
    moms = [momentum] * data.draw(st.integers(1, horizon))
    decays = [0.0] * data.draw(st.integers(1, horizon))
    bufs = None
    if momentum > 0:
        bufs = {k: (1 - dampening) * g / (1 - momentum) for k, g in prob.g.items()}
    run = dict(horizon=horizon, lr=lrs, momentum=moms, weight_decay=decays, dampening=dampening,
               nesterov=nesterov, momentum_buffers=bufs)
    # the premise: the iterates are equally spaced on the segment
    steps = [prob.params]
    for t in range(horizon):
        steps.append(unroll(prob.train, prob.params, **dict(run, horizon=t + 1, lr=[lr],
                                                               momentum=[momentum],
                                                               weight_decay=[0.0]))[0])
    for t, w in enumerate(steps):
        for k in w:
            line = torch.lerp(prob.params[k], steps[-1][k], t / horizon)
            torch.testing.assert_close(w[k], line, rtol=1e-12, atol=1e-12)
    e, exact = unrolled_hypergrad(prob.train, prob.val, prob.params, **run)
    e_dr, approx = drmad_hypergrad(prob.train, prob.val, prob.params, **run)
    torch.testing.assert_close(e_dr, e, rtol=1e-12, atol=0.0)
    for name in NAMES:
        torch.testing.assert_close(approx[name], exact[name], rtol=1e-9, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(run=runs(), seed=st.integers(0, 2**16), with_buffers=st.booleans())
def test_drmad_is_exact_for_one_step(run, seed, with_buffers):
    """With T = 1 the line is the run itself (w~_0 = w_0, v~_0 = v_0), for any problem."""
    prob = Problem(seed)
    lr = run["lr"][0] if isinstance(run["lr"], list) else run["lr"]
    run = dict(run, horizon=1, lr=max(lr, 0.01), momentum=run["momentum"] if isinstance(
        run["momentum"], float) else run["momentum"][0], weight_decay=0.05)
    if run["momentum"] == 0:
        run["dampening"] = 0.0
    bufs = prob.buffers if with_buffers else None
    _, exact = unrolled_hypergrad(prob.train, prob.val, prob.params, momentum_buffers=bufs, **run)
    _, approx = drmad_hypergrad(prob.train, prob.val, prob.params, momentum_buffers=bufs, **run)
    for name in NAMES:
        torch.testing.assert_close(approx[name], exact[name], rtol=1e-10, atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(h=st.floats(0.2, 3.0), ah=st.floats(0.05, 0.95), horizon=st.integers(2, 10),
       dim=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_drmad_on_isotropic_quadratic_is_straight_but_not_exact(h, ah, horizon, dim, seed):
    """L = E = h |w|^2 / 2, no momentum or weight decay (their hypergradients taken at 0). The path
    is straight, but its steps shrink by q = 1 - a h: x_t = q^t w_0. With S = |w_0|^2 and the
    adjoint w^_{t+1} = q^(T-1-t) h q^T w_0 (exact in DrMAD too: the Hessian is constant),

        exact: dE/da = -T h^2 q^(2T-1) S,  dE/db = -a h^2 (T-1) q^(2T-2) S,  dE/dc = -a h T q^(2T-1) S
        DrMAD: the states w~_t = s_t w_0 with s_t = 1 - (t/T)(1 - q^T), and v~_t = (w_0 - w_T)/(T a):
               dE/da = -h^2 q^T S sum_t q^(T-1-t) s_t,   dE/dc = -a h q^T S sum_t q^(T-1-t) s_t,
               dE/db = -h q^T (1 - q^T) / T * S * sum_{t>=1} q^(T-1-t).
    """
    a = ah / h
    q = 1 - ah
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(dim, generator=gen, dtype=F64)
    big_s = float(w0 @ w0)
    T = horizon
    s = [1 - (t / T) * (1 - q ** T) for t in range(T)]
    line_sum = sum(q ** (T - 1 - t) * s[t] for t in range(T))
    exact_cf = {"lr": -T * h * h * q ** (2 * T - 1) * big_s,
                "momentum": -a * h * h * (T - 1) * q ** (2 * T - 2) * big_s,
                "weight_decay": -a * h * T * q ** (2 * T - 1) * big_s}
    drmad_cf = {"lr": -h * h * q ** T * big_s * line_sum,
                "momentum": -h * q ** T * (1 - q ** T) / T * big_s
                * sum(q ** (T - 1 - t) for t in range(1, T)),
                "weight_decay": -a * h * q ** T * big_s * line_sum}

    def loss(p, t=0):
        return 0.5 * h * (p["w"] ** 2).sum()

    run = dict(horizon=T, lr=a)
    _, exact = unrolled_hypergrad(loss, loss, {"w": w0}, **run)
    _, approx = drmad_hypergrad(loss, loss, {"w": w0}, **run)
    for name in NAMES:
        torch.testing.assert_close(exact[name], torch.tensor([exact_cf[name]], dtype=F64),
                                   rtol=1e-10, atol=1e-300)
        torch.testing.assert_close(approx[name], torch.tensor([drmad_cf[name]], dtype=F64),
                                   rtol=1e-10, atol=1e-300)
        assert torch.sign(approx[name]) == torch.sign(exact[name])
    # not exact: a straight path is not enough (the closed forms differ whenever T >= 2)
    assert abs(drmad_cf["lr"] - exact_cf["lr"]) > 1e-6 * abs(exact_cf["lr"])


class Logistic:
    """Logistic regression on 64 generated points, 4 batches of 16 cycled, from w = 0."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 5, generator=gen, dtype=F64)
        w = torch.randn(5, generator=gen, dtype=F64)
        self.y = (self.x @ w + 0.5 * torch.randn(64, generator=gen, dtype=F64) > 0).to(F64)
        self.xv = torch.randn(64, 5, generator=gen, dtype=F64)
        self.yv = (self.xv @ w > 0).to(F64)
        self.params = {"w": torch.zeros(5, dtype=F64), "b": torch.zeros((), dtype=F64)}

    def train(self, p, t):
        i = (t % 4) * 16
        z = self.x[i:i + 16] @ p["w"] + p["b"]
        return torch.nn.functional.binary_cross_entropy_with_logits(z, self.y[i:i + 16])

    def val(self, p):
        z = self.xv @ p["w"] + p["b"]
        return torch.nn.functional.binary_cross_entropy_with_logits(z, self.yv)


@pytest.mark.parametrize("run", [dict(lr=0.5), dict(lr=0.2, momentum=0.9),
                                 dict(lr=0.2, momentum=0.9, nesterov=True)], ids=str)
def test_drmad_approximates_elsewhere(run):
    """20 steps of logistic regression: the path bends and the steps shrink, so DrMAD is not exact.
    Measured relative errors (lr / momentum / weight decay): plain 0.057 / 0.018 / 0.235; heavy ball
    0.070 / 0.050 / 0.001; Nesterov 0.073 / 0.101 / 0.105. The signs all agree."""
    prob = Logistic()
    _, exact = unrolled_hypergrad(prob.train, prob.val, prob.params, horizon=20, **run)
    _, approx = drmad_hypergrad(prob.train, prob.val, prob.params, horizon=20, **run)
    for name in NAMES:
        assert torch.equal(torch.sign(approx[name]), torch.sign(exact[name]))
        rel = float((approx[name] - exact[name]).norm() / exact[name].norm())
        assert rel < 0.3, (name, rel)
    assert float((approx["lr"] - exact["lr"]).norm() / exact["lr"].norm()) > 0.01


def test_drmad_with_schedules_misplaces_hypergradient_between_windows():
    """A decaying learning rate shrinks the steps, which the uniform spacing ignores. Measured:
    relative errors 1.60 / 0.86 / 0.50 and cosines 0.941 / 0.785 / 0.950 (lr / momentum / weight
    decay); the signs still agree."""
    prob = Logistic()
    run = dict(horizon=20, lr=[0.5, 0.3, 0.1, 0.05], momentum=[0.5, 0.9],
               weight_decay=[1e-3, 1e-2])
    _, exact = unrolled_hypergrad(prob.train, prob.val, prob.params, **run)
    _, approx = drmad_hypergrad(prob.train, prob.val, prob.params, **run)
    for name in NAMES:
        assert torch.equal(torch.sign(approx[name]), torch.sign(exact[name]))
        assert torch.nn.functional.cosine_similarity(approx[name], exact[name], dim=0) > 0.7
    assert float((approx["lr"] - exact["lr"]).norm() / exact["lr"].norm()) > 1.0


class _SavedBytes:
    """Peak bytes of the tensors autograd keeps for backward, counted while they are alive."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, tensor):
        counter = self

        class Box:
            def __init__(self):
                self.tensor, self.n = tensor, tensor.numel() * tensor.element_size()
                counter.live += self.n
                counter.peak = max(counter.peak, counter.live)

            def __del__(self):
                counter.live -= self.n

        return Box()


def _peak_saved_bytes(fn, horizon: int) -> int:
    prob, saved = Logistic(), _SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda box: box.tensor):
        fn(prob.train, prob.val, prob.params, horizon=horizon, lr=0.3, momentum=0.9)
    return saved.peak


def test_memory_grows_with_horizon_for_the_oracle_only():
    """The documented costs: the unrolled graph grows linearly with T, DrMAD's stays flat.
    Measured (bytes saved for backward at T = 5, 10, 20): oracle 11560, 19600, 35680; DrMAD
    3584 for each."""
    oracle = [_peak_saved_bytes(unrolled_hypergrad, t) for t in (5, 10, 20)]
    drmad = [_peak_saved_bytes(drmad_hypergrad, t) for t in (5, 10, 20)]
    assert oracle[2] - oracle[1] == 2 * (oracle[1] - oracle[0]) > 0
    assert drmad[0] == drmad[1] == drmad[2] < oracle[0]


def test_drmad_needs_positive_learning_rates():
    with pytest.raises(ValueError, match="Invalid lr value.*every learning rate value > 0"):
        drmad_hypergrad(_loss, _loss, {"w": torch.ones(2)}, horizon=2, lr=[0.1, 0.0])


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


@pytest.mark.parametrize("fn", [unrolled_hypergrad, finite_difference_hypergrad, unroll,
                                drmad_hypergrad],
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


# ---------------------------------------------------------------------- Adam / AdamW
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("config", [dict(), dict(weight_decay=0.1),
                                    dict(weight_decay=0.1, decoupled_weight_decay=True),
                                    dict(betas=(0.5, 0.9), eps=1e-3)], ids=str)
def test_adam_unroll_is_bit_identical_to_torch_adam(config, dtype):
    prob = Problem(1, dtype=dtype)
    lrs = [0.05, 0.02, 0.01]
    w_T, moments = adam_unroll(prob.train, prob.params, horizon=MAX_T, lr=lrs, **config)
    p = {k: v.clone().requires_grad_() for k, v in prob.params.items()}
    decoupled = config.get("decoupled_weight_decay", False)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    kwargs = {k: v for k, v in config.items() if k != "decoupled_weight_decay"}
    kwargs.setdefault("weight_decay", 0.0)
    opt = cls(list(p.values()), lr=lrs[0], foreach=False, **kwargs)
    for t in range(MAX_T):
        opt.param_groups[0]["lr"] = lrs[window_of(t, MAX_T, len(lrs))]
        opt.zero_grad()
        prob.train(p, t).backward()
        opt.step()
    for k in p:
        assert torch.equal(w_T[k], p[k].detach())
        assert torch.equal(moments["exp_avg_sq"][k], opt.state[p[k]]["exp_avg_sq"])


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    horizon=st.integers(1, MAX_T),
    n_lr=st.integers(1, 3),
    beta1=st.floats(0.3, 0.95),
    beta2=st.floats(0.8, 0.999),
    weight_decay=st.floats(0.0, 0.2),
    eps=st.sampled_from([1e-8, 1e-3]),
    decoupled=st.booleans(),
)
@example(seed=20880, horizon=1, n_lr=1, beta1=0.5, beta2=0.875, weight_decay=0.15478852119424147,
         eps=1e-8, decoupled=False)  # a bend on the scale of eps (see below)
def test_adam_oracle_matches_finite_differences(seed, horizon, n_lr, beta1, beta2, weight_decay,
                                                eps, decoupled):
    """dE/d(lr windows, beta1, beta2, weight decay) through unrolled Adam/AdamW, two ways."""
    prob = Problem(seed)
    kwargs = dict(horizon=horizon, lr=[0.05 / (k + 1) for k in range(min(n_lr, horizon))],
                  betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                  decoupled_weight_decay=decoupled)
    e_exact, exact = adam_unrolled_hypergrad(prob.train, prob.val, prob.params, **kwargs)
    e_fd, fd = adam_finite_difference_hypergrad(prob.train, prob.val, prob.params, **kwargs)
    assert e_exact.item() == pytest.approx(e_fd.item(), rel=1e-12)
    # Adam's g / (sqrt(v) + eps) bends on the scale of eps where an element's gradient is near 0
    # (eps=1e-8, coupled weight decay moving g' through 0): central differences with a step of
    # 1e-6 then carry a truncation error of 1e-4 (seed 20880, horizon 1), and a step of 1e-7,
    # which agrees with the oracle, is the reference.
    _, fd_fine = adam_finite_difference_hypergrad(prob.train, prob.val, prob.params, step=1e-7,
                                                  **kwargs)
    for name in ("lr", "beta1", "beta2", "weight_decay"):
        smooth = torch.allclose(fd[name], fd_fine[name], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(exact[name], fd[name] if smooth else fd_fine[name], rtol=1e-5,
                                   atol=1e-7, msg=name)


def test_adam_oracle_errors():
    prob = Problem(0)
    with pytest.raises(ValueError, match="Invalid betas value"):
        adam_unrolled_hypergrad(prob.train, prob.val, prob.params, horizon=2, lr=0.1, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="Invalid horizon value"):
        adam_unroll(prob.train, prob.params, horizon=0, lr=0.1)
    with pytest.raises(ValueError, match="Invalid lr value"):
        adam_unroll(prob.train, prob.params, horizon=2, lr=[0.1, 0.1, 0.1])
