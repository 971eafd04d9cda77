"""HypergradSGD: bit-identity with torch.optim.SGD, and its hypergradient against finite differences."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optim_db import SGD_CONFIGS
from torch import nn
from torch.nn import functional as F

from hyperoptim import HypergradSGD


def _mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=str)
def test_frozen_learning_rate_is_bit_identical_to_torch_sgd(config, dtype):
    m1 = _mlp(dtype)
    m2 = copy.deepcopy(m1)
    groups1 = [{"params": m1[0].parameters()}, {"params": m1[2].parameters(), "lr": 0.02}]
    groups2 = [{"params": m2[0].parameters()}, {"params": m2[2].parameters(), "lr": 0.02}]
    o1 = torch.optim.SGD(groups1, lr=0.05, **config)
    o2 = HypergradSGD(groups2, lr=0.05, hyper_lr=0.0, **config)
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        x = torch.randn(8, 5, generator=gen, dtype=dtype)
        y = torch.randn(8, 2, generator=gen, dtype=dtype)
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert [g["lr"] for g in o2.param_groups] == [0.05, 0.02]


class Quad:
    """A random smooth problem as plain tensors: w -> tanh(x W1) W2, squared error."""

    def __init__(self, seed: int, n_in: int, hidden: int, n_out: int):
        gen = torch.Generator().manual_seed(seed)
        self.params = [
            nn.Parameter(0.5 * torch.randn(n_in, hidden, generator=gen, dtype=torch.float64)),
            nn.Parameter(0.5 * torch.randn(hidden, n_out, generator=gen, dtype=torch.float64)),
        ]
        self.batches = [
            (torch.randn(6, n_in, generator=gen, dtype=torch.float64),
             torch.randn(6, n_out, generator=gen, dtype=torch.float64))
            for _ in range(6)
        ]
        self.val = (torch.randn(9, n_in, generator=gen, dtype=torch.float64),
                    torch.randn(9, n_out, generator=gen, dtype=torch.float64))

    @staticmethod
    def loss_at(params, batch) -> torch.Tensor:
        x, y = batch
        return ((torch.tanh(x @ params[0]) @ params[1] - y) ** 2).mean()

    def train_loss(self, t: int, params=None) -> torch.Tensor:
        return self.loss_at(self.params if params is None else params, self.batches[t])

    def val_loss(self, params=None) -> torch.Tensor:
        return self.loss_at(self.params if params is None else params, self.val)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 3)),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.03]),
    validation=st.booleans(),
    t=st.integers(1, 4),
)
def test_hypergradient_matches_finite_differences(
    seed, shape, momentum, nesterov, weight_decay, validation, t
):
    r"""h_t = dE(w_t)/da_{t-1}, with w_t(a) rebuilt by torch.optim.SGD from a snapshot of w_{t-1}."""
    nesterov = nesterov and momentum > 0
    prob = Quad(seed, *shape)
    # The lower bound keeps a_{t-1} away from 0, so the central difference has room on both sides.
    opt = HypergradSGD(prob.params, lr=0.1, momentum=momentum, nesterov=nesterov,
                       weight_decay=weight_decay, hyper_lr=0.05, lr_bounds=(0.01, math.inf),
                       val_closure=prob.val_loss if validation else None)
    for k in range(t - 1):
        opt.step(lambda k=k: prob.train_loss(k))
    snapshot = [p.detach().clone() for p in prob.params]
    buffers = [opt.state[p].get("momentum_buffer") for p in prob.params]
    buffers = [None if b is None else b.clone() for b in buffers]
    opt.step(lambda: prob.train_loss(t - 1))
    a_prev = opt.param_groups[0]["lr"]
    opt.step(lambda: prob.train_loss(t))
    h = opt.history[0]["hypergrad/lr"][t]

    def objective(a: float) -> float:
        w = [nn.Parameter(s.clone()) for s in snapshot]
        sgd = torch.optim.SGD(w, lr=a, momentum=momentum, nesterov=nesterov,
                              weight_decay=weight_decay)
        for p, b in zip(w, buffers):
            if b is not None:
                sgd.state[p]["momentum_buffer"] = b.clone()
        sgd.zero_grad()
        prob.train_loss(t - 1, w).backward()
        sgd.step()
        with torch.no_grad():
            if validation:
                return prob.val_loss(w).item()
            penalty = 0.5 * weight_decay * sum((p**2).sum() for p in w)
            return (prob.train_loss(t, w) + penalty).item()

    eps = 1e-6
    fd = (objective(a_prev + eps) - objective(a_prev - eps)) / (2 * eps)
    assert h == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_learning_rate_follows_the_rule_and_is_a_float():
    prob = Quad(0, 3, 4, 2)
    kappa = 0.02
    opt = HypergradSGD(prob.params, lr=0.1, hyper_lr=kappa)
    lrs, hs = [], []
    for k in range(5):
        opt.step(lambda k=k: prob.train_loss(k))
        lrs.append(opt.param_groups[0]["lr"])
        hs.append(opt.history[0]["hypergrad/lr"][-1])
    assert all(isinstance(a, float) for a in lrs)
    assert hs[0] == 0.0  # d_{-1} = 0
    assert lrs == opt.history[0]["lr"]
    for k in range(1, 5):
        assert lrs[k] == pytest.approx(lrs[k - 1] - kappa * hs[k], rel=1e-15)
    assert lrs[-1] != 0.1


def test_learning_rate_stays_in_bounds():
    prob = Quad(3, 3, 4, 2)
    opt = HypergradSGD(prob.params, lr=0.5, momentum=0.9, hyper_lr=50.0,
                       lr_bounds=(0.01, 0.6))
    for k in range(30):
        opt.step(lambda k=k: prob.train_loss(k % 6))
        assert 0.01 <= opt.param_groups[0]["lr"] <= 0.6
    assert {min(opt.history[0]["lr"]), max(opt.history[0]["lr"])} & {0.01, 0.6}


def test_each_group_has_its_own_hypergradient():
    prob = Quad(5, 3, 4, 2)
    opt = HypergradSGD([{"params": [prob.params[0]]}, {"params": [prob.params[1]], "lr": 0.05}],
                       lr=0.1, hyper_lr=0.01)
    opt.step(lambda: prob.train_loss(0))
    d0 = [p.grad.clone() for p in prob.params]  # no momentum: d_0 = g_0
    opt.zero_grad()
    prob.train_loss(1).backward()
    g1 = [p.grad.clone() for p in prob.params]
    opt.step()
    for i in range(2):
        assert opt.history[i]["hypergrad/lr"][1] == pytest.approx(-(g1[i] * d0[i]).sum().item())
    assert opt.param_groups[0]["lr"] != opt.param_groups[1]["lr"]


def test_validation_mode_leaves_training_gradients_alone():
    prob = Quad(7, 3, 4, 2)
    opt = HypergradSGD(prob.params, lr=0.1, hyper_lr=0.01, val_closure=prob.val_loss)
    opt.zero_grad()
    prob.train_loss(0).backward()
    expected = [p.grad.clone() for p in prob.params]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(prob.params, expected))


def test_val_closure_per_step_override_and_backward_inside():
    prob = Quad(8, 3, 4, 2)
    calls = []

    def val_with_backward():
        calls.append(1)
        loss = prob.val_loss()
        loss.backward()
        return loss

    a = HypergradSGD(prob.params, lr=0.1, hyper_lr=0.01)
    for k in range(3):
        a.step(lambda k=k: prob.train_loss(k), val_closure=val_with_backward)
    assert len(calls) == 3
    prob2 = Quad(8, 3, 4, 2)
    b = HypergradSGD(prob2.params, lr=0.1, hyper_lr=0.01, val_closure=prob2.val_loss)
    for k in range(3):
        b.step(lambda k=k: prob2.train_loss(k))
    assert a.history == b.history


def test_per_parameter_rule():
    prob = Quad(9, 3, 4, 2)
    kappa = 0.05
    opt = HypergradSGD(prob.params, lr=0.1, hyper_lr=kappa, per_parameter=True)
    opt.step(lambda: prob.train_loss(0))
    d0 = [p.grad.clone() for p in prob.params]
    opt.zero_grad()
    prob.train_loss(1).backward()
    g1 = [p.grad.clone() for p in prob.params]
    opt.step()
    expected = [(0.1 + kappa * g * d).clamp(min=0.0) for g, d in zip(g1, d0)]
    for p, e in zip(prob.params, expected):
        torch.testing.assert_close(opt.state[p]["lr"], e, rtol=1e-14, atol=0)
    n = sum(e.numel() for e in expected)
    assert opt.param_groups[0]["lr"] == pytest.approx(sum(e.sum().item() for e in expected) / n)
    assert opt.history[0]["hypergrad/lr"][1] == pytest.approx(
        -sum((g * d).sum().item() for g, d in zip(g1, d0)))
    # Assigning the group's lr resets every per-weight learning rate to it.
    opt.param_groups[0]["lr"] = 0.01
    opt.step(lambda: prob.train_loss(2))
    lrs = torch.cat([opt.state[p]["lr"].reshape(-1) for p in prob.params])
    assert lrs.sub(0.01).abs().max() < 0.01  # one hypergradient step away from 0.01, not from ~0.1


def test_per_parameter_first_steps_agree_with_scalar_mode():
    a, b = Quad(4, 3, 4, 2), Quad(4, 3, 4, 2)
    oa = HypergradSGD(a.params, lr=0.1, momentum=0.9, hyper_lr=0.01, per_parameter=True)
    ob = HypergradSGD(b.params, lr=0.1, momentum=0.9, hyper_lr=0.01)
    for k in range(2):
        oa.step(lambda k=k: a.train_loss(k))
        ob.step(lambda k=k: b.train_loss(k))
    assert oa.history[0]["hypergrad/lr"] == pytest.approx(ob.history[0]["hypergrad/lr"], rel=1e-12)


def test_drop_in_swap_in_a_stock_loop():
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = HypergradSGD(model.parameters(), lr=0.01, momentum=0.9)  # was torch.optim.SGD
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    first = None
    for _ in range(40):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first
    assert len(optimizer.history[0]["lr"]) == 40
    assert optimizer.history[0]["lr"][-1] == optimizer.param_groups[0]["lr"] != 0.01


def test_nonfinite_training_gradient_skips_step():
    prob = Quad(2, 3, 4, 2)
    opt = HypergradSGD(prob.params, lr=0.1, hyper_lr=0.01)
    opt.step(lambda: prob.train_loss(0))
    before = [p.detach().clone() for p in prob.params]
    lr = opt.param_groups[0]["lr"]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: prob.train_loss(1) * math.inf)
    assert all(torch.equal(a, b) for a, b in zip(before, prob.params))
    assert opt.param_groups[0]["lr"] == lr and opt.history[0]["skipped"] == [0.0, 1.0]


def test_learning_rate_overflowing_float32_is_skipped_not_a_crash():
    """A finite Python float can overflow float32 weights' arithmetic: the guard catches it."""
    w = nn.Parameter(torch.zeros(4))
    opt = HypergradSGD([w], lr=1e38, hyper_lr=1e38)
    opt.step(lambda: w.sum())  # h_0 = 0: lr stays 1e38, w = -1e38
    before = w.detach().clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: w.sum())  # would set lr = 1e38 + 1e38 * 4 > float32 max
    assert torch.equal(w, before) and opt.param_groups[0]["lr"] == 1e38
    assert opt.history[0]["skipped"] == [0.0, 1.0]


def test_overflowing_hypergradient_products_skip_the_step_instead_of_crashing_fsum():
    # <grad, d_prev> overflows float32 to +inf for one parameter and -inf for the other: the
    # exact sum (math.fsum) would raise "-inf + inf in fsum"; the guard skips the step instead.
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = HypergradSGD([a, b], lr=0.01, hyper_lr=1e-3)
    opt.step(lambda: 1e20 * (a.sum() + b.sum()))  # d_prev = 1e20 for both
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: 1e20 * (a.sum() - b.sum()))
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert opt.param_groups[0]["lr"] == 0.01 and opt.history[0]["skipped"] == [0.0, 1.0]
    opt.step(lambda: (a ** 2 + b ** 2).sum())  # and the run goes on
    assert opt.history[0]["skipped"][-1] == 0.0

