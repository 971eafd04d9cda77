"""HypergradAdam / HypergradAdamW: bit-identity with torch.optim.Adam/AdamW, and the exact one-step
hypergradient against finite differences through torch's own step and against the oracle."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from hyperoptim import HypergradAdam, HypergradAdamW
from hyperoptim.reference import adam_unrolled_hypergrad

F64 = torch.float64

#: (our class, torch's class, constructor keywords) that must agree bit for bit.
ADAM_CASES = [
    (HypergradAdam, torch.optim.Adam, dict()),
    (HypergradAdam, torch.optim.Adam, dict(weight_decay=0.1)),
    (HypergradAdam, torch.optim.Adam, dict(betas=(0.5, 0.9), eps=1e-4, weight_decay=0.01)),
    (HypergradAdamW, torch.optim.AdamW, dict()),
    (HypergradAdamW, torch.optim.AdamW, dict(weight_decay=0.3, betas=(0.8, 0.99))),
]


def _mlp(dtype=F64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).to(dtype)


def _groups(m):
    return [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.02}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", ADAM_CASES, ids=lambda c: f"{c[0].__name__}-{c[2]}")
def test_frozen_learning_rate_is_bit_identical_to_torch_adam(case, dtype):
    cls, torch_cls, config = case
    m1 = _mlp(dtype)
    m2 = copy.deepcopy(m1)
    o1 = torch_cls(_groups(m1), lr=0.05, foreach=False, **config)
    o2 = cls(_groups(m2), lr=0.05, hyper_lr=0.0, **config)
    gen = torch.Generator().manual_seed(1)
    for t in range(25):
        x = torch.randn(8, 5, generator=gen, dtype=dtype)
        y = torch.randn(8, 2, generator=gen, dtype=dtype)
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            if t % 5 != 4:  # every fifth step the last layer gets no gradient: its count lags
                F.mse_loss(m(x), y).backward()
            else:
                F.mse_loss(m[:2](x).sum(1, keepdim=True).expand(-1, 2), y).backward()
            o.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(o1.state[p1]["step"], o2.state[p2]["step"])
    assert [g["lr"] for g in o2.param_groups] == [0.05, 0.02]


def test_resumes_from_a_torch_adam_checkpoint():
    """torch's state names and step counter: a torch.optim.Adam checkpoint loads and continues."""
    m1 = _mlp()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.Adam(m1.parameters(), lr=0.05, foreach=False)
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(8, 5, generator=gen, dtype=F64), torch.randn(8, 2, generator=gen, dtype=F64))
            for _ in range(10)]
    for x, y in data[:5]:
        o1.zero_grad()
        F.mse_loss(m1(x), y).backward()
        o1.step()
    m2.load_state_dict(m1.state_dict())
    o2 = HypergradAdam(m2.parameters(), lr=0.05, hyper_lr=0.0)
    sd = copy.deepcopy(o1.state_dict())  # in memory, torch would share the step tensors
    sd["param_groups"] = [dict(g, **{k: v for k, v in o2.param_groups[0].items() if k not in g})
                          for g in sd["param_groups"]]
    o2.load_state_dict(sd)
    for x, y in data[5:]:
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


class Quad:
    """A random smooth problem as plain tensors: w -> tanh(x W1) W2, squared error."""

    def __init__(self, seed: int, n_in: int, hidden: int, n_out: int):
        gen = torch.Generator().manual_seed(seed)
        self.params = [
            nn.Parameter(0.5 * torch.randn(n_in, hidden, generator=gen, dtype=F64)),
            nn.Parameter(0.5 * torch.randn(hidden, n_out, generator=gen, dtype=F64)),
        ]
        self.batches = [
            (torch.randn(6, n_in, generator=gen, dtype=F64), torch.randn(6, n_out, generator=gen, dtype=F64))
            for _ in range(6)
        ]
        self.val = (torch.randn(9, n_in, generator=gen, dtype=F64),
                    torch.randn(9, n_out, generator=gen, dtype=F64))

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
    decoupled=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.05]),
    betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9)]),
    eps=st.sampled_from([1e-8, 1e-3]),
    validation=st.booleans(),
    t=st.integers(1, 4),
)
def test_hypergradient_matches_finite_differences_through_torch_adam(
    seed, shape, decoupled, weight_decay, betas, eps, validation, t
):
    r"""h_t = dE(w_t)/da_{t-1}, with w_t(a) rebuilt by torch.optim.Adam/AdamW (its own bias
    corrections, eps placement and decoupled decay) from a snapshot of w_{t-1} and its state."""
    prob = Quad(seed, *shape)
    cls, torch_cls = (HypergradAdamW, torch.optim.AdamW) if decoupled else \
        (HypergradAdam, torch.optim.Adam)
    opt = cls(prob.params, lr=0.05, betas=betas, eps=eps, weight_decay=weight_decay,
              hyper_lr=1e-3, lr_bounds=(0.01, math.inf),
              val_closure=prob.val_loss if validation else None)
    for k in range(t - 1):
        opt.step(lambda k=k: prob.train_loss(k))
    snapshot = [p.detach().clone() for p in prob.params]
    states = [{k: v.clone() for k, v in opt.state[p].items() if k in ("step", "exp_avg", "exp_avg_sq")}
              for p in prob.params]
    opt.step(lambda: prob.train_loss(t - 1))
    a_prev = opt.param_groups[0]["lr"]
    opt.step(lambda: prob.train_loss(t))
    h = opt.history[0]["hypergrad/lr"][t]

    def objective(a: float) -> float:
        w = [nn.Parameter(s.clone()) for s in snapshot]
        adam = torch_cls(w, lr=a, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        for p, s in zip(w, states):
            if s:
                adam.state[p].update({k: v.clone() for k, v in s.items()})
        adam.zero_grad()
        prob.train_loss(t - 1, w).backward()
        adam.step()
        with torch.no_grad():
            if validation:
                return prob.val_loss(w).item()
            l2 = 0.0 if decoupled else 0.5 * weight_decay * sum((p**2).sum() for p in w)
            return (prob.train_loss(t, w) + l2).item()

    step = 1e-6
    fd = (objective(a_prev + step) - objective(a_prev - step)) / (2 * step)
    assert h == pytest.approx(fd, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("decoupled", [False, True])
def test_first_hypergradient_is_the_oracle_one_step_derivative(decoupled):
    """h_1 = dE(w_1)/da_0, the reverse-mode derivative through one Adam step (reference oracle)."""
    prob = Quad(3, 3, 4, 2)
    init = {"0": prob.params[0].detach().clone(), "1": prob.params[1].detach().clone()}
    cls = HypergradAdamW if decoupled else HypergradAdam
    opt = cls(prob.params, lr=0.05, weight_decay=0.1, hyper_lr=0.0, val_closure=prob.val_loss)
    opt.step(lambda: prob.train_loss(0))
    opt.step(lambda: prob.train_loss(1))
    _, exact = adam_unrolled_hypergrad(lambda p, t: prob.train_loss(t, [p["0"], p["1"]]),
                                       lambda p: prob.val_loss([p["0"], p["1"]]), init, horizon=1,
                                       lr=0.05, weight_decay=0.1, decoupled_weight_decay=decoupled)
    assert opt.history[0]["hypergrad/lr"][1] == pytest.approx(exact["lr"].item(), rel=1e-6, abs=1e-12)


def test_one_learning_rate_per_group_not_per_parameter():
    """Baydin's AdamHD updated the rate inside the per-parameter loop, so each parameter ended up
    with its own; here the group's hypergradient sums over its parameters and all share one."""
    prob = Quad(5, 3, 4, 2)
    kappa = 1e-3
    opt = HypergradAdam(prob.params, lr=0.05, hyper_lr=kappa)
    opt.step(lambda: prob.train_loss(0))
    dirs = [opt.state[p]["direction"].clone() for p in prob.params]
    opt.zero_grad()
    prob.train_loss(1).backward()
    g1 = [p.grad.clone() for p in prob.params]
    opt.step()
    h = -sum((g * d).sum().item() for g, d in zip(g1, dirs))
    assert opt.history[0]["hypergrad/lr"][1] == pytest.approx(h, rel=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 - kappa * h, rel=1e-14)
    assert len(opt.param_groups) == 1 and isinstance(opt.param_groups[0]["lr"], float)
    assert all("lr" not in opt.state[p] for p in prob.params)


def test_learning_rate_stays_non_negative_and_in_bounds():
    prob = Quad(3, 3, 4, 2)
    opt = HypergradAdam(prob.params, lr=0.05, hyper_lr=10.0)
    low = HypergradAdam(Quad(3, 3, 4, 2).params, lr=0.05, hyper_lr=10.0, lr_bounds=(0.01, 0.06))
    with pytest.warns(RuntimeWarning, match="divergent"):  # hyper_lr=10 is meant to be wild
        for k in range(30):
            opt.step(lambda k=k: prob.train_loss(k % 6))
            assert opt.param_groups[0]["lr"] >= 0.0
    assert min(opt.history[0]["lr"]) == 0.0  # it did hit the floor and stayed a float there
    for k in range(10):
        low.step(lambda k=k: low.param_groups[0]["params"][0].pow(2).sum() * (k % 2 * 2 - 1))
        assert 0.01 <= low.param_groups[0]["lr"] <= 0.06


def test_per_parameter_rule():
    prob = Quad(9, 3, 4, 2)
    kappa = 1e-3
    opt = HypergradAdamW(prob.params, lr=0.05, weight_decay=0.1, hyper_lr=kappa,
                         per_parameter=True)
    opt.step(lambda: prob.train_loss(0))
    d0 = [opt.state[p]["direction"].clone() for p in prob.params]
    opt.zero_grad()
    prob.train_loss(1).backward()
    g1 = [p.grad.clone() for p in prob.params]
    w1 = [p.detach().clone() for p in prob.params]
    states = [{k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in prob.params]
    opt.step()
    expected = [(0.05 + kappa * g * d).clamp(min=0.0) for g, d in zip(g1, d0)]
    for p, e in zip(prob.params, expected):
        torch.testing.assert_close(opt.state[p]["lr"], e, rtol=1e-14, atol=0)
    # The step used the per-weight rates: AdamW with a tensor learning rate, written out.
    for p, w, g, s, a in zip(prob.params, w1, g1, states, expected):
        m = 0.9 * s["exp_avg"] + 0.1 * g
        v = 0.999 * s["exp_avg_sq"] + 0.001 * g * g
        ref = w * (1 - a * 0.1) - a / (1 - 0.9**2) * m / ((v / (1 - 0.999**2)).sqrt() + 1e-8)
        torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-14)
    n = sum(e.numel() for e in expected)
    assert opt.param_groups[0]["lr"] == pytest.approx(sum(e.sum().item() for e in expected) / n)


def test_drop_in_swap_in_a_stock_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = HypergradAdamW(model.parameters(), lr=1e-3, hyper_lr=1e-5)  # was AdamW
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert optimizer.history[0]["lr"][-1] == optimizer.param_groups[0]["lr"] > 1e-3


def test_unsupported_options_are_refused():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="Invalid amsgrad value: True"):
        HypergradAdam(p, 1e-3, (0.9, 0.999), 1e-8, 0.0, True)
    with pytest.raises(ValueError, match="Invalid maximize value"):
        HypergradAdamW(p, maximize=True)
    with pytest.raises(ValueError, match="Invalid betas value"):
        HypergradAdam(p, betas=(0.9, 1.0))
