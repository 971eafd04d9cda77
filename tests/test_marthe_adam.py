"""MartheAdam / MartheAdamW: exact at mu = 1 against the Adam oracle and torch's own trajectory,
HD at mu = 0, bit-identical to torch at a frozen learning rate, one implementation over rules."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_marthe import Net, _groups
from torch import nn

from hyperoptim import HypergradAdam, HypergradAdamW, MartheAdam, MartheAdamW, MartheSGD
from hyperoptim.methods.marthe import RuleMarthe
from hyperoptim.reference import adam_unrolled_hypergrad

F64 = torch.float64


def adam_objective(net: Net, horizon: int, lrs: list[float], groups: list[list[str]],
                   decoupled: bool, **config) -> float:
    """E(w_T) after ``horizon`` steps of torch.optim.Adam/AdamW with one lr per group of names."""
    p = net.params()
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([{"params": [p[k] for k in g], "lr": a} for g, a in zip(groups, lrs, strict=True)],
              foreach=False, **config)
    for t in range(horizon):
        opt.zero_grad()
        net.train_loss(p, t).backward()
        opt.step()
    with torch.no_grad():
        return float(net.val_loss(p))


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    horizon=st.integers(1, 6),
    decoupled=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.1]),
    betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9)]),
    eps=st.sampled_from([1e-8, 1e-3]),
    lr=st.sampled_from([0.01, 0.05]),
)
def test_mu_one_constant_lr_hypergradient_is_exact(seed, horizon, decoupled, weight_decay, betas,
                                                    eps, lr):
    r"""RTHO over Adam with a frozen learning rate: Delta_T = dE(w_T)/da exactly, against the
    reverse-mode oracle (1e-6) and central differences through torch.optim.Adam/AdamW."""
    config = dict(betas=betas, eps=eps, weight_decay=weight_decay)
    net = Net(seed)
    p = net.params()
    cls = MartheAdamW if decoupled else MartheAdam
    opt = cls(list(p.values()), lr=lr, mu=1.0, hyper_lr=0.0, adapt_hyper_lr=False,
              val_closure=lambda: net.val_loss(p), **config)
    for t in range(horizon + 1):  # step T computes Delta_T at w_T before it moves on
        opt.step(net.closure(p, opt, t, backward=False))
    delta = opt.history[0]["hypergrad/lr"][horizon]
    assert opt.history[0]["lr"] == [lr] * (horizon + 1)

    _, exact = adam_unrolled_hypergrad(net.train_loss, net.val_loss, net.init, horizon=horizon,
                                       lr=lr, decoupled_weight_decay=decoupled, **config)
    assert delta == pytest.approx(exact["lr"].item(), rel=1e-6, abs=1e-12)

    step, names = 1e-7, [list(Net.names)]
    fd = (adam_objective(net, horizon, [lr + step], names, decoupled, **config)
          - adam_objective(net, horizon, [lr - step], names, decoupled, **config)) / (2 * step)
    assert delta == pytest.approx(fd, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("decoupled", [False, True])
def test_mu_one_two_groups_each_column_is_exact(decoupled):
    """One tangent column per group over all weights (and both moments)."""
    net, horizon, lrs = Net(seed=3), 5, (0.05, 0.02)
    p = net.params()
    cls = MartheAdamW if decoupled else MartheAdam
    opt = cls(_groups(p, True, lrs), mu=1.0, hyper_lr=0.0, adapt_hyper_lr=False,
              weight_decay=0.05, val_closure=lambda: net.val_loss(p))
    for t in range(horizon + 1):
        opt.step(net.closure(p, opt, t, backward=False))
    groups, step = [["w1", "b1"], ["w2"]], 1e-7
    for i in range(2):
        up, down = list(lrs), list(lrs)
        up[i] += step
        down[i] -= step
        fd = (adam_objective(net, horizon, up, groups, decoupled, weight_decay=0.05)
              - adam_objective(net, horizon, down, groups, decoupled, weight_decay=0.05)) / (2 * step)
        assert opt.history[i]["hypergrad/lr"][horizon] == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_finite_difference_route_is_close_to_exact():
    """The same RTHO run with H·Z by central differences (closures that call backward())."""
    net = Net(seed=4)
    runs = []
    for backward in (False, True):
        p = net.params()
        opt = MartheAdam(list(p.values()), lr=0.05, mu=1.0, hyper_lr=0.0,
                         adapt_hyper_lr=False, val_closure=lambda p=p: net.val_loss(p))
        for t in range(5):
            opt.step(net.closure(p, opt, t, backward=backward))
        runs.append((opt.hvp_route, opt.history[0]["hypergrad/lr"]))
    assert [r[0] for r in runs] == ["exact", "finite_difference"]
    assert runs[1][1] == pytest.approx(runs[0][1], rel=1e-7, abs=1e-10)


@pytest.mark.parametrize("decoupled", [False, True])
def test_mu_zero_matches_hypergrad_adam_in_validation_mode(decoupled):
    net = Net(seed=1)
    pa, pb = net.params(), net.params()
    kappa = 1e-3
    hd_cls, m_cls = (HypergradAdamW, MartheAdamW) if decoupled else (HypergradAdam, MartheAdam)
    hd = hd_cls(_groups(pa, True), weight_decay=0.05, hyper_lr=kappa,
                val_closure=lambda: net.val_loss(pa))
    ma = m_cls(_groups(pb, True), weight_decay=0.05, mu=0.0, hyper_lr=kappa,
               adapt_hyper_lr=False, val_closure=lambda: net.val_loss(pb))
    for t in range(20):
        hd.step(net.closure(pa, hd, t))
        ma.step(net.closure(pb, ma, t))
    for h_hd, h_ma in zip(hd.history, ma.history, strict=True):
        assert max(abs(a - h_hd["lr"][0]) for a in h_hd["lr"]) > 1e-3  # the rate really moved
        torch.testing.assert_close(torch.tensor(h_ma["hypergrad/lr"], dtype=F64),
                                   torch.tensor(h_hd["hypergrad/lr"], dtype=F64),
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.tensor(h_ma["lr"], dtype=F64),
                                   torch.tensor(h_hd["lr"], dtype=F64), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("mu", [0.0, 0.9, "adaptive"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("decoupled", [False, True])
def test_frozen_learning_rate_is_bit_identical_to_torch_adam(decoupled, dtype, mu):
    net = Net(seed=4, dtype=dtype)
    pa, pb = net.params(), net.params()
    torch_cls, cls = (torch.optim.AdamW, MartheAdamW) if decoupled else (torch.optim.Adam, MartheAdam)
    ref = torch_cls(_groups(pa, True, (0.01, 0.005)), weight_decay=0.05, foreach=False)
    opt = cls(_groups(pb, True, (0.01, 0.005)), weight_decay=0.05, mu=mu, hyper_lr=0.0,
              val_closure=lambda: net.val_loss(pb))
    for t in range(10):
        ref.step(net.closure(pa, ref, t))
        opt.step(net.closure(pb, opt, t))
    for a, b in zip(pa.values(), pb.values(), strict=True):
        assert torch.equal(a, b)


class GenericMartheSGD(MartheSGD):
    """MartheSGD through the generic rule path (torch.func.jvp of the SGD rule)."""

    _advance = RuleMarthe._advance
    _previous_direction = staticmethod(RuleMarthe._previous_direction)


@pytest.mark.parametrize("config", [dict(momentum=0.9, weight_decay=0.01),
                                    dict(momentum=0.9, nesterov=True), dict(weight_decay=0.05)],
                         ids=str)
def test_one_implementation_over_rules(config):
    """The generic MARTHE (any rule, tangents by jvp) over the SGD rule gives MartheSGD's run,
    whose tangents take the linear fast path: the abstraction is the algorithm."""
    net = Net(seed=6)
    pa, pb = net.params(), net.params()
    oa = MartheSGD(_groups(pa, True), mu="adaptive", hyper_lr=1e-4,
                   val_closure=lambda: net.val_loss(pa), **config)
    ob = GenericMartheSGD(_groups(pb, True), mu="adaptive", hyper_lr=1e-4,
                          val_closure=lambda: net.val_loss(pb), **config)
    for t in range(12):
        oa.step(net.closure(pa, oa, t, backward=False))
        ob.step(net.closure(pb, ob, t, backward=False))
    for ha, hb in zip(oa.history, ob.history, strict=True):
        for key in ("lr", "hypergrad/lr", "mu"):
            assert hb[key] == pytest.approx(ha[key], rel=1e-9, abs=1e-12), key
    for a, b in zip(pa.values(), pb.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_nonfinite_tangent_is_skipped_then_forgotten():
    net = Net(seed=9)
    p = net.params()
    opt = MartheAdam(list(p.values()), lr=0.01, mu=1.0, val_closure=lambda: net.val_loss(p))
    for t in range(4):
        opt.step(net.closure(p, opt, t))
    opt.state[p["w1"]]["tangent"][0, 0, 0] = float("inf")
    before = [q.detach().clone() for q in p.values()]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(net.closure(p, opt, 4))
    assert all(torch.equal(a, b) for a, b in zip(before, p.values(), strict=True))
    for key in ("tangent", "tangent_exp_avg", "tangent_exp_avg_sq"):
        assert torch.isfinite(opt.state[p["w1"]][key]).all() and not opt.state[p["w1"]][key].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(5, 8):
            opt.step(net.closure(p, opt, t))
    assert opt.history[0]["skipped"][-3:] == [0.0, 0.0, 0.0]


def test_dead_units_keep_the_tangents_finite():
    """A ReLU unit that never fires has gradient 0 and second moment exactly 0: the tangents of
    its weights must stay finite (sqrt's derivative at 0 is 0/0 without care)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).to(F64)
    with torch.no_grad():
        model[0].bias[0] = -100.0  # unit 0 is dead for these inputs
    x, y = torch.randn(16, 3, dtype=F64), torch.randn(16, 1, dtype=F64)
    mse = nn.functional.mse_loss
    opt = MartheAdam(model.parameters(), lr=0.01, mu=1.0, hyper_lr=1e-6,
                     adapt_hyper_lr=False, val_closure=lambda: mse(model(x[:8]), y[:8]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            opt.step(lambda: mse(model(x), y))
    assert opt.state[model[0].weight]["exp_avg_sq"][0].eq(0).all()
    assert all(torch.isfinite(opt.state[q]["tangent"]).all() for q in model.parameters())
    assert opt.history[0]["skipped"] == [0.0] * 5
