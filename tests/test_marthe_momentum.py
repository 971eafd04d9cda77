"""MARTHE learning the momentum (``tune=("lr", "momentum")``): the one-step hypergradient
:math:`h^b_{t+1} = \\partial E(w_{t+1}) / \\partial b_t` against finite differences, an
independent autograd computation and the oracle, whatever the discount; ``mu=0`` is HD's learned
momentum on the validation loss; the SGD fast path against the generic tangent; bit-identity
without the option; resume; old checkpoints; the guard."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_hd_momentum import SGD_CASES, Problem, _adam_one_step, _sgd_one_step

from hyperoptim import HypergradSGD, MartheAdam, MartheAdamW, MartheSGD
from hyperoptim.methods.hd import MOMENTUM_BOUNDS
from hyperoptim.methods.marthe import RuleMarthe
from hyperoptim.reference import rule_unrolled_hypergrad
from hyperoptim.rules import SGD

F64 = torch.float64


def _run(problem: Problem, opt, params: dict[str, torch.Tensor], steps: int,
         snapshot_at: int | None = None) -> dict[str, object] | None:
    """``steps`` steps with closures that return the training loss (exact HVPs); the weights,
    training gradient and state before step ``snapshot_at`` are kept."""
    snap = None
    for t in range(steps):
        if t == snapshot_at:
            w = {k: v.detach().clone() for k, v in params.items()}
            grads = torch.autograd.grad(problem.train(params, t), list(params.values()))
            snap = {"w": w, "g": dict(zip(params, grads)),
                    "state": copy.deepcopy({k: dict(opt.state[v]) for k, v in params.items()})}
        opt.step(lambda t=t: problem.train(params, t))
    return snap


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("mu", [0.0, 1.0, "adaptive"], ids=lambda m: f"mu={m}")
@pytest.mark.parametrize("case", SGD_CASES, ids=str)
def test_sgd_momentum_hypergradient_is_exact(case, mu):
    """Whatever the discount of the learning rate's tangent, ``hypergrad/momentum`` at step
    t + 1 is dE(w_{t+1})/db_t with w_t, g_t and v_t held: gradient-descent-the-ultimate-optimizer's
    autograd, central differences and one unrolled step of the oracle agree."""
    problem = Problem()
    params = problem.leaves()
    t = 2
    opt = MartheSGD(list(params.values()), lr=0.1, mu=mu, hyper_lr=0.0, adapt_hyper_lr=False,
                    tune=("lr", "momentum"), momentum_phase="run",
                    val_closure=lambda: problem.val(params), **case)
    snap = _run(problem, opt, params, t + 2, snapshot_at=t)
    h = opt.history[0]["hypergrad/momentum"][t + 1]
    assert opt.history[0]["hypergrad/momentum"][0] == 0.0  # no tangent before the first step
    buf = {k: s.get("momentum_buffer") for k, s in snap["state"].items()}
    hyper = dict(lr=0.1, weight_decay=case.get("weight_decay", 0.0),
                 dampening=case.get("dampening", 0.0), nesterov=case.get("nesterov", False))

    def e_of(b):
        return problem.val(_sgd_one_step(snap["w"], snap["g"], buf, momentum=b, **hyper))

    b0 = case["momentum"]
    b = torch.tensor(b0, dtype=F64, requires_grad=True)
    (auto,) = torch.autograd.grad(e_of(b), b)
    eps = 1e-5
    fd = (e_of(b0 + eps) - e_of(b0 - eps)).item() / (2 * eps)
    _, oracle = rule_unrolled_hypergrad(
        SGD, lambda p, _: problem.train(p, t), problem.val, snap["w"], horizon=1,
        hypers=dict(lr=0.1, momentum=b0, weight_decay=hyper["weight_decay"]),
        options=dict(dampening=hyper["dampening"], nesterov=hyper["nesterov"]),
        buffers={"momentum_buffer": buf})
    assert h != 0.0
    assert h == pytest.approx(auto.item(), rel=1e-10, abs=1e-14)
    assert h == pytest.approx(fd, rel=1e-7, abs=1e-12)
    assert h == pytest.approx(oracle["momentum"].item(), rel=1e-10, abs=1e-14)
    assert opt.history[0]["momentum"] == [b0] * (t + 2)  # beta = 0: nothing moved


@pytest.mark.parametrize("cls", [MartheAdam, MartheAdamW], ids=lambda c: c.__name__)
def test_adam_beta1_hypergradient_is_exact(cls):
    problem = Problem()
    params = problem.leaves()
    t = 2
    opt = cls(list(params.values()), lr=0.01, betas=(0.8, 0.99), weight_decay=0.05, mu=1.0,
              hyper_lr=0.0, adapt_hyper_lr=False, tune=("lr", "momentum"), momentum_phase="run",
              val_closure=lambda: problem.val(params))
    snap = _run(problem, opt, params, t + 2, snapshot_at=t)
    h = opt.history[0]["hypergrad/momentum"][t + 1]

    def e_of(b1):
        return problem.val(_adam_one_step(snap["w"], snap["g"], snap["state"], lr=0.01, beta1=b1,
                                          beta2=0.99, weight_decay=0.05,
                                          decoupled=cls is MartheAdamW))

    b1 = torch.tensor(0.8, dtype=F64, requires_grad=True)
    (auto,) = torch.autograd.grad(e_of(b1), b1)
    eps = 1e-5
    fd = (e_of(0.8 + eps) - e_of(0.8 - eps)).item() / (2 * eps)
    assert h != 0.0
    assert h == pytest.approx(auto.item(), rel=1e-9)
    assert h == pytest.approx(fd, rel=1e-7)


@pytest.mark.parametrize("case", SGD_CASES[:3], ids=str)
def test_mu_zero_is_hd_learning_the_momentum_on_the_validation_loss(case):
    """``mu=0`` with a fixed beta is HypergradSGD(tune=("lr", "momentum")) with a val_closure:
    the same learning rates, momenta and hypergradients."""
    problem = Problem(steps=12)
    pa, pb = problem.leaves(), problem.leaves()
    kappa = 0.05
    hd = HypergradSGD(list(pa.values()), lr=0.05, hyper_lr=kappa, tune=("lr", "momentum"),
                      momentum_phase="run",
                      val_closure=lambda: problem.val(pa), **case)
    ma = MartheSGD(list(pb.values()), lr=0.05, mu=0.0, hyper_lr=kappa, adapt_hyper_lr=False,
                   tune=("lr", "momentum"), momentum_phase="run", val_closure=lambda: problem.val(pb), **case)
    for t in range(12):
        hd.zero_grad()
        problem.train(pa, t).backward()
        hd.step()
        ma.step(lambda t=t: problem.train(pb, t))
    h_hd, h_ma = hd.history[0], ma.history[0]
    assert len(set(h_ma["momentum"])) > 2  # it moved: the comparison means something
    for key in ("lr", "momentum", "hypergrad/lr", "hypergrad/momentum"):
        torch.testing.assert_close(torch.tensor(h_ma[key], dtype=F64),
                                   torch.tensor(h_hd[key], dtype=F64), rtol=1e-10, atol=1e-13)
    for a, b in zip(pa.values(), pb.values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


class _Generic(MartheSGD):
    """MartheSGD with the generic one-step tangent (RuleMarthe's) instead of its closed form."""

    _momentum_tangents = RuleMarthe._momentum_tangents


@pytest.mark.parametrize("case", SGD_CASES, ids=str)
def test_sgd_fast_path_equals_generic_tangent(case):
    problem = Problem()
    runs = []
    for cls in (MartheSGD, _Generic):
        params = problem.leaves()
        opt = cls(list(params.values()), lr=0.05, hyper_step="growth", tune=("lr", "momentum"),
                  momentum_phase="run", val_closure=lambda params=params: problem.val(params), **case)
        _run(problem, opt, params, 5)
        runs.append((params, opt))
    (p1, o1), (p2, o2) = runs
    for k in p1:
        torch.testing.assert_close(o1.state[p1[k]]["momentum_tangent"],
                                   o2.state[p2[k]]["momentum_tangent"], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-12, atol=1e-15)
    assert o1.history[0]["momentum"] == pytest.approx(o2.history[0]["momentum"], rel=1e-12)


# ---------------------------------------------------------------------- the option
def _mlp(steps: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen))
            for _ in range(steps + 1)]
    return model, data


def _loss(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def _mlp_run(cls, steps=8, resume_at=None, **kwargs):
    model, data = _mlp(steps)
    val = data[-1]
    opt = cls(model.parameters(), val_closure=lambda: _loss(model, val), **kwargs)
    for i in range(steps):
        if i == resume_at:
            saved = copy.deepcopy(opt.state_dict())
            model = copy.deepcopy(model)
            opt = cls(model.parameters(), val_closure=lambda m=model: _loss(m, val), **kwargs)
            opt.load_state_dict(saved)
        opt.step(lambda b=data[i], m=model: _loss(m, b))
    return model, opt


@pytest.mark.parametrize("cls, kwargs", [
    (MartheSGD, dict(lr=0.05, momentum=0.9)),
    (MartheSGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, mu=1.0)),
    (MartheAdam, dict(lr=0.01)),
])
def test_without_momentum_in_tune_nothing_changes(cls, kwargs):
    """``tune=("lr",)`` is today's optimizer; learning the momentum with a zero step leaves the
    weights bit-identical to it (the momentum tangents never touch the step)."""
    m0, o0 = _mlp_run(cls, **kwargs)
    m1, o1 = _mlp_run(cls, tune=("lr",), **kwargs)
    if cls is MartheSGD:  # with a momentum, its default learns it while the run is stalled
        assert o0.param_groups[0]["tune"] == ("lr", "momentum") and "momentum" in o0.history[0]
    else:
        for a, b in zip(m0.parameters(), m1.parameters()):
            assert torch.equal(a, b)
        assert o0.history == o1.history
    assert "momentum" not in o1.history[0]
    assert all("momentum_tangent" not in s for s in o1.state.values())
    fixed = dict(kwargs, hyper_lr=1e-3, adapt_hyper_lr=False)
    m2, o2 = _mlp_run(cls, tune=("lr",), **fixed)
    m3, o3 = _mlp_run(cls, tune=("lr", "momentum"), momentum_phase="run", **dict(fixed, hyper_lr=0.0))
    m4, o4 = _mlp_run(cls, tune=("lr",), **dict(fixed, hyper_lr=0.0))
    for a, b in zip(m4.parameters(), m3.parameters()):
        assert torch.equal(a, b)
    assert len(set(o3.history[0]["momentum"])) == 1
    assert o2.history[0]["lr"] != o4.history[0]["lr"]


@pytest.mark.parametrize("cls, kwargs", [
    (MartheSGD, dict(lr=0.05, momentum=0.5, hyper_lr=1e-2)),
    (MartheSGD, dict(lr=0.05, momentum=0.5, nesterov=True, hyper_step="growth")),
    (MartheSGD, dict(lr=0.05, momentum=0.5, mu=1.0, hyper_step="scale_free")),
    (MartheAdamW, dict(lr=0.01, betas=(0.5, 0.999), hyper_step="adam_log")),
])
def test_resume_mid_run_is_bit_exact(cls, kwargs):
    kwargs = dict(kwargs, tune=("lr", "momentum"), momentum_phase="run")
    m_full, o_full = _mlp_run(cls, steps=10, **kwargs)
    model, opt = _mlp_run(cls, steps=10, resume_at=5, **kwargs)
    for a, b in zip(m_full.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert opt.history == o_full.history
    assert opt.param_groups[0].get("momentum") == o_full.param_groups[0].get("momentum")
    assert opt.param_groups[0].get("betas") == o_full.param_groups[0].get("betas")
    moved = o_full.history[0]["momentum"]
    assert len(set(moved)) > 1  # the momentum moved, within its bounds
    assert all(MOMENTUM_BOUNDS[0] <= m <= MOMENTUM_BOUNDS[1] for m in moved)


def test_state_dict_without_tune_loads_as_lr_only():
    """A checkpoint saved before MARTHE learned momentum tuned the learning rate alone."""
    _, opt = _mlp_run(MartheSGD, lr=0.05, momentum=0.9)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["tune"]
    _, other = _mlp_run(MartheSGD, lr=0.05, momentum=0.9, tune=("lr", "momentum"), momentum_phase="run")
    other.load_state_dict(saved)
    assert other.param_groups[0]["tune"] == ("lr",)


@pytest.mark.parametrize("tune", [("momentum",), ("lr", "weight_decay"), ("lr", "lr"), "lr"])
def test_invalid_tune_is_refused(tune):
    with pytest.raises(ValueError, match="Invalid tune value"):
        MartheSGD(torch.nn.Linear(2, 1).parameters(), momentum=0.9, tune=tune)


def test_skipped_step_records_nan_keeps_the_momentum_and_forgets_an_overflowed_tangent():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    bad = {"on": False}

    def val():
        out = model(torch.ones(2, 3)).pow(2).mean()
        return out * math.nan if bad["on"] else out

    opt = MartheSGD(model.parameters(), lr=0.1, momentum=0.5, tune=("lr", "momentum"), momentum_phase="run",
                    hyper_step="growth", val_closure=val)
    for i in range(5):
        bad["on"] = i == 3
        x = torch.randn(5, 3)
        if bad["on"]:
            with pytest.warns(RuntimeWarning):
                opt.step(lambda x=x: model(x).pow(2).mean())
        else:
            opt.step(lambda x=x: model(x).pow(2).mean())
    hist = opt.history[0]
    assert hist["skipped"] == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert math.isnan(hist["hypergrad/momentum"][3])
    assert hist["momentum"][3] == hist["momentum"][2]
    # An overflowed momentum tangent with a finite validation loss is forgotten (as MARTHE
    # forgets an overflowed lr tangent), so the next step proceeds.
    weight = next(iter(model.parameters()))
    opt.state[weight]["momentum_tangent"].fill_(math.inf)
    opt.step(lambda: model(torch.randn(5, 3)).pow(2).mean())  # skipped (warned once above)
    assert opt.history[0]["skipped"][-1] == 1.0
    assert "momentum_tangent" not in opt.state[weight]
    opt.step(lambda: model(torch.randn(5, 3)).pow(2).mean())
    assert opt.history[0]["skipped"][-1] == 0.0


def test_the_guard_checks_the_proposed_momentum():
    """The guard sees the momentum the step would use (the proposed one), not the old one."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = MartheSGD(model.parameters(), lr=0.1, momentum=0.5, tune=("lr", "momentum"), momentum_phase="run",
                    hyper_lr=0.5, adapt_hyper_lr=False, val_closure=lambda: model(
                        torch.ones(2, 3)).pow(2).mean())
    seen = []
    guard = opt._guard_step

    def spy(loss, plans, hypers=None, **kw):
        seen.append(hypers)
        return guard(loss, plans, hypers, **kw)

    opt._guard_step = spy
    for _ in range(3):
        opt.step(lambda: model(torch.randn(5, 3)).pow(2).mean())
    # the first step proposes none (no tangent yet): the momentum stays 0.5
    assert [h[0].get("momentum", 0.5) for h in seen] == opt.history[0]["momentum"]
    assert len(set(opt.history[0]["momentum"])) > 1
