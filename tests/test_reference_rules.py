"""The reference oracle over any update rule: the same numbers as the SGD and Adam oracles, finite
differences of its own forward runs with a schedule for every hyperparameter, torch's arithmetic."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reference import MAX_T, Problem, runs

from hyperoptim.core.schedule import window_of
from hyperoptim.reference import (
    adam_finite_difference_hypergrad,
    adam_unroll,
    adam_unrolled_hypergrad,
    finite_difference_hypergrad,
    rule_finite_difference_hypergrad,
    rule_unroll,
    rule_unrolled_hypergrad,
    unroll,
    unrolled_hypergrad,
)
from hyperoptim.rules import ADAM, SGD

F64 = torch.float64


def _sgd_hypers(run: dict) -> dict:
    return {name: run[name] for name in SGD.hyper_names}


# ------------------------------------------------------------- the generic oracle is the old one
@settings(max_examples=20, deadline=None)
@given(run=runs(), seed=st.integers(0, 2**16), with_buffers=st.booleans())
def test_generic_oracle_equals_the_sgd_oracle_bit_for_bit(run, seed, with_buffers):
    prob = Problem(seed)
    bufs = prob.buffers if with_buffers else None
    e_sgd, sgd = unrolled_hypergrad(prob.train, prob.val, prob.params, momentum_buffers=bufs, **run)
    e_rule, rule = rule_unrolled_hypergrad(
        SGD, prob.train, prob.val, prob.params, horizon=run["horizon"], hypers=_sgd_hypers(run),
        options=dict(dampening=run["dampening"], nesterov=run["nesterov"]),
        buffers={"momentum_buffer": bufs})
    assert torch.equal(e_sgd, e_rule)
    assert list(rule) == list(SGD.hyper_names)
    for name in SGD.hyper_names:
        assert torch.equal(sgd[name], rule[name]), name


@pytest.mark.parametrize("config", [dict(), dict(weight_decay=0.1, betas=(0.5, 0.9), eps=1e-3),
                                    dict(weight_decay=0.1, decoupled_weight_decay=True)], ids=str)
def test_generic_oracle_equals_the_adam_oracle_bit_for_bit(config):
    prob = Problem(4)
    lrs = [0.05, 0.02, 0.01]
    betas = config.get("betas", (0.9, 0.999))
    hypers = dict(lr=lrs, beta1=betas[0], beta2=betas[1], weight_decay=config.get("weight_decay", 0.0))
    options = dict(eps=config.get("eps", 1e-8),
                   decoupled_weight_decay=config.get("decoupled_weight_decay", False))
    args = dict(horizon=MAX_T, hypers=hypers, options=options)
    w_adam, m_adam = adam_unroll(prob.train, prob.params, horizon=MAX_T, lr=lrs, **config)
    w_rule, m_rule = rule_unroll(ADAM, prob.train, prob.params, **args)
    for k in prob.params:
        assert torch.equal(w_adam[k], w_rule[k])
        for name in ADAM.buffer_names:
            assert torch.equal(m_adam[name][k], m_rule[name][k])
    for adam_fn, rule_fn in ((adam_unrolled_hypergrad, rule_unrolled_hypergrad),
                             (adam_finite_difference_hypergrad, rule_finite_difference_hypergrad)):
        e_adam, adam = adam_fn(prob.train, prob.val, prob.params, horizon=MAX_T, lr=lrs, **config)
        e_rule, rule = rule_fn(ADAM, prob.train, prob.val, prob.params, **args)
        assert torch.equal(e_adam, e_rule)
        for name in ADAM.hyper_names:
            assert torch.equal(adam[name], rule[name]), name


# ------------------------------------------------------------ against its own finite differences
@st.composite
def windows(draw, lo: float, hi: float, horizon: int):
    n = draw(st.integers(1, horizon))
    return draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), horizon=st.integers(1, MAX_T), data=st.data(),
       decoupled=st.booleans())
def test_adam_schedules_for_every_hyperparameter_match_finite_differences(seed, horizon, data,
                                                                           decoupled):
    """What the Adam oracle could not do: windows of beta1, beta2 and the weight decay too."""
    prob = Problem(seed)
    hypers = dict(lr=data.draw(windows(0.01, 0.05, horizon)),
                  beta1=data.draw(windows(0.3, 0.95, horizon)),
                  beta2=data.draw(windows(0.8, 0.999, horizon)),
                  weight_decay=data.draw(windows(0.01, 0.2, horizon)))
    args = dict(horizon=horizon, hypers=hypers,
                options=dict(eps=1e-3, decoupled_weight_decay=decoupled))
    e_exact, exact = rule_unrolled_hypergrad(ADAM, prob.train, prob.val, prob.params, **args)
    # beta2 up to 0.999: the bias correction 1 / (1 - beta2^t) bends on the scale 1 - beta2 =
    # 1e-3, where a central difference of 1e-6 errs by 1e-4 relative (seed 0, beta2 0.999 at
    # t = 1: 7.43544 against the exact 7.43626) and one of 1e-7 by 1e-6; its rounding error in
    # float64 stays near 1e-9.
    e_fd, fd = rule_finite_difference_hypergrad(ADAM, prob.train, prob.val, prob.params,
                                                step=1e-7, **args)
    assert e_exact.item() == pytest.approx(e_fd.item(), rel=1e-12)
    for name in ADAM.hyper_names:
        assert exact[name].shape == (len(hypers[name]),)
        torch.testing.assert_close(exact[name], fd[name], rtol=1e-5, atol=1e-7, msg=name)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), horizon=st.integers(1, MAX_T), data=st.data(),
       nesterov=st.booleans())
def test_sgd_matches_finite_differences_through_the_generic_path(seed, horizon, data, nesterov):
    prob = Problem(seed)
    hypers = dict(lr=data.draw(windows(0.05, 0.5, horizon)),
                  momentum=data.draw(windows(0.05, 0.95, horizon)),
                  weight_decay=data.draw(windows(0.01, 0.2, horizon)))
    args = dict(horizon=horizon, hypers=hypers, options=dict(nesterov=nesterov),
                buffers={"momentum_buffer": prob.buffers})
    _, exact = rule_unrolled_hypergrad(SGD, prob.train, prob.val, prob.params, **args)
    _, fd = rule_finite_difference_hypergrad(SGD, prob.train, prob.val, prob.params, **args)
    for name in SGD.hyper_names:
        torch.testing.assert_close(exact[name], fd[name], rtol=1e-5, atol=1e-7, msg=name)
    # the SGD-named estimator of the same run agrees
    _, named = finite_difference_hypergrad(prob.train, prob.val, prob.params, horizon=horizon,
                                           nesterov=nesterov, momentum_buffers=prob.buffers,
                                           **hypers)
    for name in SGD.hyper_names:
        assert torch.equal(named[name], fd[name]), name


# ----------------------------------------------------------------------- torch's arithmetic
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_generic_unroll_follows_torch_sgd_through_a_window_of_zero_momentum(dtype):
    """The rule's float step is torch's: a window of momentum 0 leaves the buffer alone and the next
    window resumes from it (the SGD-named ``unroll`` takes the limit b -> 0+ there instead)."""
    prob = Problem(5, dtype=dtype)
    horizon, momentum = MAX_T, [0.5, 0.0, 0.9]
    final, bufs = rule_unroll(SGD, prob.train, prob.params, horizon=horizon,
                              hypers=dict(lr=0.2, momentum=momentum, weight_decay=[0.0, 0.05]))
    names = list(prob.params)
    leaves = [prob.params[k].clone().requires_grad_() for k in names]
    opt = torch.optim.SGD(leaves, lr=0.2, momentum=0.5, foreach=False)
    for t in range(horizon):
        opt.param_groups[0]["momentum"] = momentum[window_of(t, horizon, 3)]
        opt.param_groups[0]["weight_decay"] = [0.0, 0.05][window_of(t, horizon, 2)]
        opt.zero_grad()
        prob.train(dict(zip(names, leaves, strict=True)), t).backward()
        opt.step()
    for k, p in zip(names, leaves, strict=True):
        assert torch.equal(final[k], p.detach())
        assert torch.equal(bufs["momentum_buffer"][k], opt.state[p]["momentum_buffer"])
    limit, _ = unroll(prob.train, prob.params, horizon=horizon, lr=0.2, momentum=momentum,
                      weight_decay=[0.0, 0.05])
    assert any(not torch.equal(final[k], limit[k]) for k in names)


def test_fresh_state_and_given_buffers():
    prob = Problem(6)
    hypers = dict(lr=0.1, momentum=0.9, weight_decay=0.0)
    _, fresh = rule_unroll(SGD, prob.train, prob.params, horizon=1, hypers=hypers)
    leaves = {k: v.clone().requires_grad_() for k, v in prob.params.items()}
    g0 = dict(zip(leaves, torch.autograd.grad(prob.train(leaves, 0), list(leaves.values()))))
    for k in prob.params:  # torch's first step: v_1 = g_0
        assert torch.equal(fresh["momentum_buffer"][k], g0[k])
    given = {k: v.clone() for k, v in prob.buffers.items()}
    _, from_given = rule_unroll(SGD, prob.train, prob.params, horizon=1, hypers=hypers,
                                buffers={"momentum_buffer": given})
    for k in prob.params:  # v_1 = g_0 fresh; v_1 = 0.9 v_0 + g_0 from v_0
        torch.testing.assert_close(from_given["momentum_buffer"][k] - fresh["momentum_buffer"][k],
                                   0.9 * prob.buffers[k], rtol=1e-12, atol=1e-12)
        assert torch.equal(given[k], prob.buffers[k])  # not modified


BAD = [
    (dict(hypers=dict(lr=0.1, momentum=0.0)), "Invalid hypers value.*'sgd' rule takes a schedule"),
    (dict(hypers=dict(lr=0.1, momentum=0.0, weight_decay=0.0, beta1=0.9)), "Invalid hypers value"),
    (dict(hypers=dict(lr=[0.1] * 4, momentum=0.0, weight_decay=0.0)),
     "Invalid lr value.*4 windows for a horizon of 3"),
    (dict(hypers=dict(lr=float("inf"), momentum=0.0, weight_decay=0.0)), "Invalid lr value"),
    (dict(horizon=0), "Invalid horizon value"),
    (dict(buffers={"exp_avg": {}}), "Invalid buffers value.*'sgd' rule's buffers are momentum_buffer"),
    (dict(buffers={"momentum_buffer": {"v": torch.zeros(2)}}), "Invalid buffers value.*keys of params"),
]


@pytest.mark.parametrize("fn", [rule_unroll, rule_unrolled_hypergrad, rule_finite_difference_hypergrad],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize(("kwargs", "regex"), BAD, ids=[r for _, r in BAD])
def test_errors(fn, kwargs, regex):
    args = dict(horizon=3, hypers=dict(lr=0.1, momentum=0.0, weight_decay=0.0))
    args.update(kwargs)
    loss = lambda p, t=0: (p["w"] ** 2).sum()  # noqa: E731
    params = {"w": torch.ones(2, dtype=F64)}
    with pytest.raises(ValueError, match=regex):
        if fn is rule_unroll:
            fn(SGD, loss, params, **args)
        else:
            fn(SGD, loss, loss, params, **args)


def test_negative_values_are_the_rule_s_business():
    """The generic oracle checks finiteness only: FDS's weight decay may go below 0."""
    prob = Problem(7)
    hypers = dict(lr=0.1, momentum=0.5, weight_decay=[-0.01, 0.02])
    _, exact = rule_unrolled_hypergrad(SGD, prob.train, prob.val, prob.params, horizon=4,
                                       hypers=hypers)
    _, fd = rule_finite_difference_hypergrad(SGD, prob.train, prob.val, prob.params, horizon=4,
                                             hypers=hypers)
    torch.testing.assert_close(exact["weight_decay"], fd["weight_decay"], rtol=1e-5, atol=1e-7)
