"""MartheSGD: HD at mu = 0, the exact hypergradient at mu = 1, Appendix A's mu, the beta rule."""

from __future__ import annotations

import copy
import functools
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optim_db import SGD_CONFIGS
from torch import nn
from torch.nn import functional as F

from hyperoptim import HypergradSGD
from hyperoptim.hvp import SecondOrder
from hyperoptim.marthe import MartheSGD
from hyperoptim.methods.marthe import adaptive_mu
from hyperoptim.reference import unrolled_hypergrad
from hyperoptim.rules.sgd import sgd_tangents

F64 = torch.float64


class Net:
    """A smooth problem as plain tensors, w -> tanh(x W1 + b1) W2, squared error.

    ``loss_at`` is a function of a parameter dict, so the same problem feeds the optimizers (live
    ``nn.Parameter``\\ s), the exact oracle and ``torch.optim.SGD`` finite differences.
    """

    names = ("w1", "b1", "w2")

    def __init__(self, seed: int = 0, n_in: int = 3, hidden: int = 4, n_out: int = 2,
                 n_batches: int = 8, dtype: torch.dtype = F64):
        gen = torch.Generator().manual_seed(seed)
        self.init = {
            "w1": 0.7 * torch.randn(n_in, hidden, generator=gen, dtype=dtype),
            "b1": 0.1 * torch.randn(hidden, generator=gen, dtype=dtype),
            "w2": 0.7 * torch.randn(hidden, n_out, generator=gen, dtype=dtype),
        }
        self.batches = [
            (torch.randn(6, n_in, generator=gen, dtype=dtype),
             torch.randn(6, n_out, generator=gen, dtype=dtype))
            for _ in range(n_batches)
        ]
        self.val = (torch.randn(9, n_in, generator=gen, dtype=dtype),
                    torch.randn(9, n_out, generator=gen, dtype=dtype))

    def params(self) -> dict[str, nn.Parameter]:
        return {k: nn.Parameter(v.clone()) for k, v in self.init.items()}

    @staticmethod
    def loss_at(p: dict[str, torch.Tensor], batch) -> torch.Tensor:
        x, y = batch
        return ((torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2).mean()

    def train_loss(self, p, t: int) -> torch.Tensor:
        return self.loss_at(p, self.batches[t % len(self.batches)])

    def val_loss(self, p) -> torch.Tensor:
        return self.loss_at(p, self.val)

    def closure(self, p, opt, t: int, backward: bool = True):
        def closure() -> torch.Tensor:
            loss = self.train_loss(p, t)
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss

        return closure

    def sgd_objective(self, horizon: int, lrs: list[float], groups: list[list[str]],
                      **config) -> float:
        """E(w_T) after ``horizon`` steps of torch.optim.SGD with one lr per group of names."""
        p = self.params()
        sgd = torch.optim.SGD([{"params": [p[k] for k in g], "lr": a}
                               for g, a in zip(groups, lrs, strict=True)], **config)
        for t in range(horizon):
            sgd.zero_grad()
            self.train_loss(p, t).backward()
            sgd.step()
        with torch.no_grad():
            return float(self.val_loss(p))


def _groups(p: dict[str, nn.Parameter], split: bool, lrs=(0.1, 0.05)):
    if not split:
        return [{"params": list(p.values()), "lr": lrs[0]}]
    return [{"params": [p["w1"], p["b1"]], "lr": lrs[0]}, {"params": [p["w2"]], "lr": lrs[1]}]


# ---------------------------------------------------------------------- mu = 0 is HD
@pytest.mark.parametrize("split", [False, True], ids=["one_group", "two_groups"])
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=str)
def test_mu_zero_matches_hypergrad_sgd_in_validation_mode(config, split):
    net = Net(seed=1)
    pa, pb = net.params(), net.params()
    kappa = 0.02
    hd = HypergradSGD(_groups(pa, split), hyper_lr=kappa, val_closure=lambda: net.val_loss(pa),
                      **config)
    ma = MartheSGD(_groups(pb, split), mu=0.0, hyper_lr=kappa, adapt_hyper_lr=False,
                   val_closure=lambda: net.val_loss(pb), **config)
    for t in range(25):
        hd.step(net.closure(pa, hd, t))
        ma.step(net.closure(pb, ma, t))
    for h_hd, h_ma in zip(hd.history, ma.history, strict=True):
        moved = max(abs(a - h_hd["lr"][0]) for a in h_hd["lr"])
        assert moved > 1e-3  # the learning rate really moved: the comparison means something
        torch.testing.assert_close(torch.tensor(h_ma["hypergrad/lr"], dtype=F64),
                                   torch.tensor(h_hd["hypergrad/lr"], dtype=F64),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.tensor(h_ma["lr"], dtype=F64),
                                   torch.tensor(h_hd["lr"], dtype=F64), rtol=1e-12, atol=1e-14)
        assert h_ma["mu"] == [0.0] * 25 and h_ma["hypergrad_lr"] == [kappa] * 25
    for a, b in zip(pa.values(), pb.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


# ---------------------------------------------------------------------- mu = 1 is exact
@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    horizon=st.integers(1, 6),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.01, 0.1]),
    dampening=st.sampled_from([0.0, 0.3]),
    lr=st.sampled_from([0.05, 0.2]),
)
def test_mu_one_constant_lr_hypergradient_is_exact(seed, horizon, momentum, nesterov,
                                                    weight_decay, dampening, lr):
    r"""RTHO with a frozen learning rate: Delta_T = dE(w_T)/da for the constant a, exactly."""
    nesterov = nesterov and momentum > 0
    dampening = dampening if momentum > 0 and not nesterov else 0.0
    config = dict(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                  dampening=dampening)
    net = Net(seed)
    p = net.params()
    opt = MartheSGD(list(p.values()), lr=lr, mu=1.0, hyper_lr=0.0, adapt_hyper_lr=False,
                    val_closure=lambda: net.val_loss(p), **config)
    for t in range(horizon + 1):  # step T computes Delta_T at w_T before it moves on
        opt.step(net.closure(p, opt, t, backward=t % 2 == 0))
    delta = opt.history[0]["hypergrad/lr"][horizon]
    assert opt.history[0]["lr"] == [lr] * (horizon + 1)

    _, exact = unrolled_hypergrad(net.train_loss, net.val_loss, net.init, horizon=horizon, lr=lr,
                                  **config)
    assert delta == pytest.approx(exact["lr"].item(), rel=1e-6, abs=1e-12)

    eps = 1e-6
    names = [list(Net.names)]
    fd = (net.sgd_objective(horizon, [lr + eps], names, **config)
          - net.sgd_objective(horizon, [lr - eps], names, **config)) / (2 * eps)
    assert delta == pytest.approx(fd, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=str)
def test_mu_one_two_groups_each_column_is_exact(config):
    r"""One tangent column per group, over *all* weights: a group's learning rate also moves the
    other group's weights, and Delta of each group is exactly dE(w_T)/da_group."""
    net, horizon, lrs = Net(seed=3), 5, (0.1, 0.05)
    p = net.params()
    opt = MartheSGD(_groups(p, True, lrs), mu=1.0, hyper_lr=0.0, adapt_hyper_lr=False,
                    val_closure=lambda: net.val_loss(p), **config)
    for t in range(horizon + 1):
        opt.step(net.closure(p, opt, t))
    groups, eps = [["w1", "b1"], ["w2"]], 1e-6
    for i in range(2):
        up, down = list(lrs), list(lrs)
        up[i] += eps
        down[i] -= eps
        fd = (net.sgd_objective(horizon, up, groups, **config)
              - net.sgd_objective(horizon, down, groups, **config)) / (2 * eps)
        assert opt.history[i]["hypergrad/lr"][horizon] == pytest.approx(fd, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=str)
def test_tangent_update_is_the_jvp_of_the_sgd_rule(config):
    r"""One step's (Z, C) update equals sgd_tangents (torch.func.jvp of the shared SGD rule) fed
    mu Z, H (mu Z) and mu C, with the step's new learning rates and one column per group."""
    net, mu = Net(seed=11), 0.7
    p = net.params()
    opt = MartheSGD(_groups(p, True), mu=mu, hyper_lr=0.005, adapt_hyper_lr=False,
                    val_closure=lambda: net.val_loss(p), **config)
    t = 4  # closures that return the loss: the exact HVP route, as the check below computes
    _run(net, p, opt, 0, t, backward=False)
    names = list(p)
    state = [opt.state[p[k]] for k in names]

    def cloned(key):
        return [None if s.get(key) is None else s[key].clone() for s in state]

    w, z, c, v = [p[k].detach().clone() for k in names], cloned("tangent"), \
        cloned("tangent_buffer"), cloned("momentum_buffer")
    opt.step(net.closure(p, opt, t, backward=False))
    for h in opt.history:  # a_t is a new value, not 0
        assert 0 < h["lr"][t] != h["lr"][t - 1]

    leaves = [x.clone().requires_grad_() for x in w]
    grads = torch.autograd.grad(net.train_loss(dict(zip(names, leaves, strict=True)), t), leaves,
                                create_graph=True)
    columns = [torch.autograd.grad(grads, leaves, [mu * zk[j] for zk in z], retain_graph=True)
               for j in range(2)]
    hz = [torch.stack([col[k] for col in columns]) for k in range(len(names))]
    scalar = functools.partial(torch.tensor, dtype=F64)
    for i, keys in enumerate([["w1", "b1"], ["w2"]]):
        idx = [names.index(k) for k in keys]
        z_next, c_next = sgd_tangents(
            [w[k] for k in idx], [grads[k].detach() for k in idx], [v[k] for k in idx],
            scalar(opt.param_groups[i]["lr"]), scalar(config.get("momentum", 0.0)),
            scalar(config.get("weight_decay", 0.0)), [mu * z[k] for k in idx], [hz[k] for k in idx],
            [None if c[k] is None else mu * c[k] for k in idx], torch.eye(2, dtype=F64)[i],
            torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64),
            dampening=config.get("dampening", 0.0), nesterov=config.get("nesterov", False))
        for k, zn, cn in zip(idx, z_next, c_next, strict=True):
            torch.testing.assert_close(state[k]["tangent"], zn, rtol=1e-12, atol=1e-14)
            if config.get("momentum", 0.0):
                torch.testing.assert_close(state[k]["tangent_buffer"], cn, rtol=1e-12, atol=1e-14)
            else:
                assert "tangent_buffer" not in state[k]


# ---------------------------------------------------------------------- Appendix A by hand
def _hand_marthe(h, targets, u, w, a, kappa, steps):
    r"""Algorithm 1 with Appendix A's mu and the derived beta rule, for plain SGD on
    L_t(w) = sum_k h_k (w_k - m_{t,k})^2 / 2 and E(w) = |w - u|^2 / 2, written out by hand:
    H = diag(h), so A_t Z = Z - a_t H Z and B_t = -d_t = -H (w_t - m_t)."""
    z, mu, c, beta, s, d_prev = [0.0, 0.0], 0.0, 0.0, 0.0, 0.0, None
    rows = []
    for t in range(steps):
        delta = 0.0
        if t > 0:
            grad_e = [wk - uk for wk, uk in zip(w, u, strict=True)]
            delta = sum(g * zk for g, zk in zip(grad_e, z, strict=True))
            g1 = -sum(g * dk for g, dk in zip(grad_e, d_prev, strict=True))
            ratio = min(max(delta * g1 / g1**2, 0.0), 1.0)
            mu, c = ratio ** (1.0 / (c + 1.0)), mu * (1.0 + c)
            beta = max(beta + kappa * delta * (-s), 0.0)
            raw = a - beta * delta
            s, a = (-delta if raw >= 0 else 0.0), max(raw, 0.0)
        d = [hk * (wk - mk) for hk, wk, mk in zip(h, w, targets[t], strict=True)]
        z = [mu * (zk - a * hk * zk) - dk for zk, hk, dk in zip(z, h, d, strict=True)]
        w = [wk - a * dk for wk, dk in zip(w, d, strict=True)]
        d_prev = d
        rows.append(dict(lr=a, delta=delta, mu=mu, count=c, beta=beta))
    return rows


@pytest.mark.parametrize("a0", [0.2, 0.3], ids=["interior_mu", "lr_clipped_then_mu_zero"])
def test_adaptive_mu_and_beta_reproduce_appendix_a_by_hand(a0):
    h, u, kappa, steps = [1.0, 3.0], [0.5, -0.2], 0.1, 5
    targets = [(0.0, 0.0), (1.0, -0.5), (-0.5, 0.8), (0.3, 0.2), (0.5, -0.5)]
    rows = _hand_marthe(h, targets, u, [1.0, 1.0], a0, kappa, steps)

    w = nn.Parameter(torch.ones(2, dtype=F64))
    ht, ut = torch.tensor(h, dtype=F64), torch.tensor(u, dtype=F64)
    opt = MartheSGD([w], lr=a0, hyper_lr=kappa, val_closure=lambda: 0.5 * ((w - ut) ** 2).sum())
    for t in range(steps):
        m = torch.tensor(targets[t], dtype=F64)
        opt.step(lambda m=m: 0.5 * (ht * (w - m) ** 2).sum())
    hist = opt.history[0]
    for key, name in [("lr", "lr"), ("delta", "hypergrad/lr"), ("mu", "mu"), ("beta", "hypergrad_lr")]:
        assert hist[name] == pytest.approx([r[key] for r in rows], rel=1e-12, abs=1e-15), name
    # The case exercises what it claims: a discount strictly inside (0, 1) under an exponent
    # 1/(c+1) < 1, and (second case) a learning rate clipped at 0 and a negative ratio.
    assert any(0 < r["mu"] < 1 and r["count"] > 0 for r in rows)
    if a0 == 0.3:
        assert any(r["lr"] == 0 for r in rows) and rows[-1]["mu"] == 0.0
    assert opt.hyper_state["groups"][0]["count"] == pytest.approx(rows[-1]["count"], rel=1e-12)


def test_adaptive_mu_guards_and_clips():
    assert adaptive_mu(1.0, 0.0, 3.0) == 0.0  # g'_1 = 0: no one-step signal, forget
    assert adaptive_mu(-1.0, 2.0, 0.0) == 0.0  # not a one-step descent direction
    assert adaptive_mu(5.0, 2.0, 0.0) == 1.0
    assert adaptive_mu(-1.0, -4.0, 2.0) == pytest.approx(0.25 ** (1 / 3))


# ---------------------------------------------------------------------- the beta rule
def _run(net, p, opt, start, n, backward=True):
    for t in range(start, start + n):
        opt.step(net.closure(p, opt, t, backward))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_beta_update_descends_the_one_step_objective(momentum):
    r"""beta_{t+1} - beta_t = -kappa dE(w_{t+1})/dbeta_t, with the derivative by central
    differences through the optimizer itself (mu = 0, so Delta_{t+1} is exactly dE/da_t)."""
    net, kappa = Net(seed=5), 1e-3
    p = net.params()
    opt = MartheSGD(list(p.values()), lr=0.1, momentum=momentum, mu=0.0, hyper_lr=kappa,
                    val_closure=lambda: net.val_loss(p))
    t = 6
    _run(net, p, opt, 0, t)
    beta_prev = opt.hyper_state["groups"][0]["beta"]

    def val_after_step_t(shift: float) -> float:
        q, o = copy.deepcopy((p, opt))
        o.val_closure = lambda: net.val_loss(q)
        o.hyper_state["groups"][0]["beta"] += shift  # beta_{t-1}: shifts beta_t one-for-one
        o.step(net.closure(q, o, t))
        assert o.history[0]["hypergrad_lr"][t] > 0 and o.history[0]["lr"][t] > 0  # unclipped
        with torch.no_grad():
            return float(net.val_loss(q))

    eps = 1e-7
    derivative = (val_after_step_t(eps) - val_after_step_t(-eps)) / (2 * eps)
    _run(net, p, opt, t, 2)
    hist = opt.history[0]
    assert hist["hypergrad_lr"][t - 1] == beta_prev
    assert abs(derivative) > 1e-3
    assert hist["hypergrad_lr"][t + 1] - hist["hypergrad_lr"][t] == pytest.approx(
        -kappa * derivative, rel=1e-5)
    # ... which is +kappa * Delta_{t+1} * Delta_t: the printed Algorithm 1 has the other sign.
    assert hist["hypergrad_lr"][t + 1] - hist["hypergrad_lr"][t] == pytest.approx(
        kappa * hist["hypergrad/lr"][t + 1] * hist["hypergrad/lr"][t], rel=1e-12)


def test_beta_grows_when_hypergradients_agree_and_shrinks_when_they_disagree():
    net = Net(seed=2)
    p = net.params()
    opt = MartheSGD(list(p.values()), lr=0.05, momentum=0.5, hyper_lr=1e-3,
                    val_closure=lambda: net.val_loss(p))
    _run(net, p, opt, 0, 40)
    hist = opt.history[0]
    seen = set()
    for t in range(2, 40):
        if hist["lr"][t - 1] > 0 and hist["hypergrad_lr"][t] > 0:  # neither a nor beta clipped
            agree = hist["hypergrad/lr"][t] * hist["hypergrad/lr"][t - 1]
            change = hist["hypergrad_lr"][t] - hist["hypergrad_lr"][t - 1]
            if agree != 0:
                assert (change > 0) == (agree > 0), t
                seen.add(agree > 0)
    assert seen == {True, False}  # both cases occurred


def test_beta_does_not_grow_while_the_learning_rate_rests_at_zero():
    w = nn.Parameter(torch.tensor([2.0], dtype=F64))
    # Training pulls w to 0, E to 5: Delta > 0 at every step (lower the lr) and the lr hits 0.
    opt = MartheSGD([w], lr=0.1, mu=0.0, hyper_lr=1e-3,
                    val_closure=lambda: ((w - 5.0) ** 2).sum())
    for _ in range(12):
        opt.step(lambda: (w**2).sum())
    hist = opt.history[0]
    rest = [t for t in range(1, 12) if hist["lr"][t - 1] == 0.0]
    assert len(rest) > 5, hist["lr"]
    for t in rest[1:]:
        # Consecutive hypergradients agree, but a_t = max(., 0) does not depend on beta there.
        assert hist["hypergrad/lr"][t] * hist["hypergrad/lr"][t - 1] > 0
        assert hist["hypergrad_lr"][t] == hist["hypergrad_lr"][t - 1] > 0


# ---------------------------------------------------------------------- the SGD step itself
@pytest.mark.parametrize("mu", [0.0, 0.9, "adaptive"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=str)
def test_frozen_learning_rate_is_bit_identical_to_torch_sgd(config, dtype, mu):
    net = Net(seed=4, dtype=dtype)
    pa, pb = net.params(), net.params()
    sgd = torch.optim.SGD(_groups(pa, True), **config)
    opt = MartheSGD(_groups(pb, True), mu=mu, hyper_lr=0.0,
                    val_closure=lambda: net.val_loss(pb), **config)
    for t in range(12):
        sgd.step(net.closure(pa, sgd, t))
        opt.step(net.closure(pb, opt, t))
    for a, b in zip(pa.values(), pb.values(), strict=True):
        assert torch.equal(a, b)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.05]


def test_cost_one_validation_gradient_and_one_hvp_per_step(monkeypatch):
    calls = {"val": 0, "train": 0, "hvp": 0}
    real = SecondOrder.hvp

    def counting_hvp(self, vectors):
        calls["hvp"] += 1
        return real(self, vectors)

    monkeypatch.setattr(SecondOrder, "hvp", counting_hvp)
    net = Net(seed=6)
    for mu in (0.0, 1.0, "adaptive"):
        p = net.params()

        def val(p=p):
            calls["val"] += 1
            return net.val_loss(p)

        opt = MartheSGD(_groups(p, True), mu=mu, hyper_lr=1e-4, val_closure=val)
        calls.update(val=0, train=0, hvp=0)
        for t in range(10):
            inner = net.closure(p, opt, t, backward=False)  # the exact route

            def closure(inner=inner):
                calls["train"] += 1
                return inner()

            opt.step(closure)
        # Step 0 has no tangent yet; afterwards one validation gradient per step, and one
        # batched HVP (both groups' columns together) per step with some mu_t > 0.
        assert calls["train"] == 10 and calls["val"] == 9
        expected = sum(any(h["mu"][t] > 0 for h in opt.history) for t in range(1, 10))
        assert calls["hvp"] == expected
        assert expected == (0 if mu == 0.0 else expected) and (mu == 0.0 or expected > 0)


@pytest.mark.parametrize("route,extra_calls", [("finite_difference", 2)])
def test_finite_difference_route_costs_its_closure_calls(route, extra_calls):
    """Each HVP of one tangent column costs 2 extra closure calls (central differences; a
    retry after a kink costs 2 more, which this smooth problem never needs)."""
    net = Net(seed=6)
    p = net.params()
    opt = MartheSGD([{"params": list(p.values())}], mu=1.0, hyper_lr=1e-4, hvp=route,
                    val_closure=lambda: net.val_loss(p))
    calls = 0
    for t in range(6):
        inner = net.closure(p, opt, t)

        def closure(inner=inner):
            nonlocal calls
            calls += 1
            return inner()

        opt.step(closure)
    assert opt.hvp_route == route
    assert calls == 6 + extra_calls * 5  # no tangent (Z = 0) at step 0: no product there


def test_validation_pass_leaves_training_gradients_alone():
    net = Net(seed=7)
    p = net.params()
    opt = MartheSGD(list(p.values()), lr=0.1, val_closure=lambda: net.val_loss(p))
    _run(net, p, opt, 0, 3)
    expected = torch.autograd.grad(net.train_loss(p, 3), list(p.values()))
    opt.step(net.closure(p, opt, 3, backward=False))
    # p.grad holds the training gradient at w_3 (taken before the step moved the weights).
    for g, e in zip((q.grad for q in p.values()), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------- options and errors
def test_needs_a_closure_unless_mu_is_zero():
    net = Net()
    p = net.params()
    opt = MartheSGD(list(p.values()), lr=0.1, val_closure=lambda: net.val_loss(p))
    net.train_loss(p, 0).backward()
    with pytest.raises(ValueError, match="needs second-order information.*closure"):
        opt.step()
    hd = MartheSGD(list(p.values()), lr=0.1, mu=0.0, val_closure=lambda: net.val_loss(p))
    for t in range(3):
        hd.zero_grad()
        net.train_loss(p, t).backward()
        hd.step()
    assert len(hd.history[0]["lr"]) == 3


def test_needs_a_validation_closure():
    net = Net()
    p = net.params()
    opt = MartheSGD(list(p.values()), lr=0.1)
    with pytest.raises(ValueError, match="needs a validation loss"):
        opt.step(net.closure(p, opt, 0))
    opt.step(net.closure(p, opt, 0), val_closure=lambda: net.val_loss(p))  # per-step override


def test_hypergrad_clip_bounds_the_learning_rate_move():
    net = Net(seed=8)
    p = net.params()
    opt = MartheSGD(list(p.values()), lr=0.1, mu=1.0, hyper_lr=0.01,
                    adapt_hyper_lr=False, hypergrad_clip=0.05,
                    val_closure=lambda: net.val_loss(p))
    _run(net, p, opt, 0, 10)
    hist = opt.history[0]
    assert max(abs(d) for d in hist["hypergrad/lr"]) > 0.05  # the raw value is recorded
    for t in range(1, 10):
        clipped = min(max(hist["hypergrad/lr"][t], -0.05), 0.05)
        assert hist["lr"][t] == pytest.approx(max(hist["lr"][t - 1] - 0.01 * clipped, 0.0))


def test_nonfinite_tangent_is_skipped_then_forgotten():
    net = Net(seed=9)
    p = net.params()
    opt = MartheSGD(list(p.values()), lr=0.1, momentum=0.9, mu=1.0,
                    val_closure=lambda: net.val_loss(p))
    _run(net, p, opt, 0, 4)
    opt.state[p["w1"]]["tangent"][0, 0, 0] = float("inf")
    before = [q.detach().clone() for q in p.values()]
    lr = opt.param_groups[0]["lr"]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(net.closure(p, opt, 4))
    assert all(torch.equal(a, b) for a, b in zip(before, p.values(), strict=True))
    assert opt.param_groups[0]["lr"] == lr and opt.history[0]["skipped"][-1] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(net, p, opt, 5, 3)  # the reset tangent lets training go on
    assert opt.history[0]["skipped"][-3:] == [0.0, 0.0, 0.0]
    assert not all(torch.equal(a, b) for a, b in zip(before, p.values(), strict=True))
    assert opt.history[0]["hypergrad/lr"][5] == 0.0  # Z was reset to 0


def test_two_groups_resume_mid_run_exactly():
    net = Net(seed=10)
    pa = net.params()
    opt = MartheSGD(_groups(pa, True), momentum=0.9, nesterov=True, weight_decay=0.01,
                    hyper_lr=1e-4, val_closure=lambda: net.val_loss(pa))
    _run(net, pa, opt, 0, 7)
    saved_model = {k: v.detach().clone() for k, v in pa.items()}
    saved = copy.deepcopy(opt.state_dict())
    _run(net, pa, opt, 7, 6)

    pb = {k: nn.Parameter(v) for k, v in saved_model.items()}
    opt2 = MartheSGD(_groups(pb, True, lrs=(1.0, 1.0)), momentum=0.9, nesterov=True,
                     weight_decay=0.01, hyper_lr=1e-4, val_closure=lambda: net.val_loss(pb))
    opt2.load_state_dict(saved)
    _run(net, pb, opt2, 7, 6)
    for a, b in zip(pa.values(), pb.values(), strict=True):
        assert torch.equal(a, b)
    assert opt2.history == opt.history and opt2.hyper_state == opt.hyper_state


def test_learns_a_useful_schedule_on_a_small_problem():
    """From a too-small learning rate, MARTHE raises it and beats SGD on the validation loss."""
    torch.manual_seed(0)
    x = torch.randn(256, 5, dtype=F64)
    y = x @ torch.randn(5, 1, dtype=F64) + 0.1 * torch.randn(256, 1, dtype=F64)
    xt, yt, xv, yv = x[:192], y[:192], x[192:], y[192:]
    results = {}
    for name in ("sgd", "marthe"):
        model = nn.Linear(5, 1).to(F64)
        torch.manual_seed(1)
        nn.init.normal_(model.weight)
        val = lambda model=model: F.mse_loss(model(xv), yv)  # noqa: E731
        if name == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        else:
            opt = MartheSGD(model.parameters(), lr=1e-3, hyper_lr=1e-6, val_closure=val)
        for t in range(60):
            i = (t * 32) % 192
            xb, yb = xt[i : i + 32], yt[i : i + 32]

            def closure(model=model, opt=opt, xb=xb, yb=yb):
                opt.zero_grad()
                loss = F.mse_loss(model(xb), yb)
                loss.backward()
                return loss

            opt.step(closure)
        with torch.no_grad():
            results[name] = float(val())
        if name == "marthe":
            assert max(opt.history[0]["lr"]) > 1e-2
    assert math.isfinite(results["marthe"]) and results["marthe"] < 0.5 * results["sgd"], results


def test_param_group_added_mid_run_gets_its_own_column():
    net = Net(seed=12)
    p = net.params()
    opt = MartheSGD([p["w1"], p["b1"]], lr=0.1, mu=1.0, hyper_lr=0.0,
                    adapt_hyper_lr=False, val_closure=lambda: net.val_loss(p))
    p["w2"].requires_grad_(False)
    _run(net, p, opt, 0, 3)
    p["w2"].requires_grad_(True)
    opt.add_param_group({"params": [p["w2"]], "lr": 0.05})
    _run(net, p, opt, 3, 4)
    assert opt.state[p["w1"]]["tangent"].shape[0] == 2
    hist = opt.history[1]
    assert len(hist["lr"]) == 4 and hist["hypergrad/lr"][0] == 0.0 != hist["hypergrad/lr"][1]
    assert all(math.isfinite(v) for h in opt.history for v in h["hypergrad/lr"])


def test_learning_rate_overflowing_float32_is_skipped_not_a_crash():
    """A diverging learning rate that no longer fits float32 skips the step instead of raising
    (found with RTHO and an adapted hyper-learning rate on digits)."""
    w = torch.nn.Parameter(torch.zeros(4))
    # A scaled validation loss stays finite (-4) at w = -1e38, so only the learning rate overflows.
    opt = MartheSGD([w], lr=1e38, mu=0.0, hyper_lr=1e69, adapt_hyper_lr=False,
                    val_closure=lambda: (w * 1e-30).sum())
    opt.step(lambda: w.sum())  # no tangent yet: lr stays, w = -1e38
    before = w.detach().clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: w.sum())  # Delta = -4e-30: lr would be 1e38 + 4e39
    assert torch.equal(w, before) and opt.param_groups[0]["lr"] == 1e38
    assert opt.history[0]["skipped"][-1] == 1.0


def test_a_failed_first_step_leaves_no_state_entry_and_no_hyper_state():
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = MartheSGD([w], lr=0.1, val_closure=lambda: (w**2).sum())
    empty = copy.deepcopy(opt.state_dict())

    def failing():
        raise KeyError("the data loader failed")

    with pytest.raises(KeyError):
        opt.step(failing)
    assert len(opt.state) == 0 and opt.hyper_state == {}
    assert opt.state_dict() == empty
    opt.step(lambda: (w**3).sum())  # and the retried step works
    assert "direction" in opt.state[w] and len(opt.hyper_state["groups"]) == 1


# ----------------------------------------------------------------- the runaway, in its own step
@pytest.mark.filterwarnings("ignore:.*training looks divergent:hyperoptim.HyperoptimWarning")
@pytest.mark.parametrize("closure_backward", [False, True], ids=["returns", "backward"])
def test_scale_free_meets_a_runaway_in_the_step_that_sees_it(closure_backward):
    """ScaleFree's watch reads the training loss at w_t in the step whose update it sets (as
    HD's does): at the first step whose loss :func:`~hyperoptim.hyperstep.react` flags, the
    learning rate that step uses is the previous one divided by 10, exactly. (Read a step late,
    as before, the first division came when full-batch diabetes' loss was 15-470x its start.)"""
    from hyperoptim.hyperstep import RUNAWAY_STATE, react

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(5, generator=gen, dtype=torch.float64)
    w = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = MartheSGD([w], lr=5.0, momentum=0.9, val_closure=lambda: 0.5 * ((x @ w - y) ** 2).mean())

    def closure():
        loss = 0.5 * ((x @ w - y) ** 2).mean()
        if closure_backward:
            opt.zero_grad()
            loss.backward()
        return loss

    watch, lr = dict(RUNAWAY_STATE), opt.param_groups[0]["lr"]
    for t in range(30):
        loss = opt.step(closure).item()
        divisor, watch = react(loss, watch)
        if divisor == 10.0:
            assert opt.param_groups[0]["lr"] == lr / 10.0, t
            break
        lr = opt.param_groups[0]["lr"]
    else:
        pytest.fail("the loss never ran away")
    assert t >= 1
    assert {k: opt.hyper_state["hyper_step"][0][k] for k in watch} == watch
