"""HD learning the momentum (``tune=("lr", "momentum")``): the one-step hypergradient against
finite differences, an independent autograd computation and the oracle; the SGD fast path against
the generic tangent; bit-identity without the option; resume; the options."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor

from hyperoptim import HypergradAdam, HypergradAdamW, HypergradSGD
from hyperoptim.methods.hd import MOMENTUM_BOUNDS, RuleHypergrad
from hyperoptim.reference import rule_unrolled_hypergrad
from hyperoptim.rules import SGD

F64 = torch.float64


class Problem:
    """A small tanh network as a dict of float64 tensors, with fixed batches and a validation set."""

    def __init__(self, seed: int = 0, steps: int = 5):
        gen = torch.Generator().manual_seed(seed)
        self.init = {"w1": 0.5 * torch.randn(3, 5, generator=gen, dtype=F64),
                     "b1": 0.1 * torch.randn(5, generator=gen, dtype=F64),
                     "w2": 0.5 * torch.randn(5, 2, generator=gen, dtype=F64)}
        self.batches = [(torch.randn(7, 3, generator=gen, dtype=F64),
                         torch.randn(7, 2, generator=gen, dtype=F64)) for _ in range(steps)]
        self.val_data = (torch.randn(11, 3, generator=gen, dtype=F64),
                         torch.randn(11, 2, generator=gen, dtype=F64))

    @staticmethod
    def loss(p: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        return ((torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2).mean()

    def train(self, p: dict[str, Tensor], t: int) -> Tensor:
        return self.loss(p, self.batches[t])

    def val(self, p: dict[str, Tensor]) -> Tensor:
        return self.loss(p, self.val_data)

    def leaves(self) -> dict[str, Tensor]:
        return {k: v.clone().requires_grad_() for k, v in self.init.items()}


def _run(problem: Problem, opt, params: dict[str, Tensor], steps: int, snapshot_at: int | None = None
         ) -> dict[str, object] | None:
    """``steps`` steps on the problem's batches; the state before step ``snapshot_at`` is kept."""
    snap = None
    for t in range(steps):
        opt.zero_grad()
        problem.train(params, t).backward()
        if t == snapshot_at:
            snap = {"w": {k: v.detach().clone() for k, v in params.items()},
                    "g": {k: v.grad.clone() for k, v in params.items()},
                    "state": copy.deepcopy({k: dict(opt.state[v]) for k, v in params.items()})}
        opt.step()
        if t == snapshot_at:
            snap["group"] = dict(opt.param_groups[0])  # the values step t used
    return snap


SGD_CASES = [
    dict(momentum=0.7),
    dict(momentum=0.7, nesterov=True),
    dict(momentum=0.6, dampening=0.3),
    dict(momentum=0.8, weight_decay=0.1),
    dict(momentum=0.5, weight_decay=0.05, nesterov=True),
]


def _sgd_one_step(w, g, buf, *, lr, momentum, weight_decay=0.0, dampening=0.0, nesterov=False):
    """torch's SGD step written out by hand, differentiable in ``momentum`` (gdtuo's way)."""
    out = {}
    for k in w:
        g1 = g[k] + weight_decay * w[k]
        v = g1 if buf is None or buf.get(k) is None else momentum * buf[k] + (1 - dampening) * g1
        d = g1 + momentum * v if nesterov else v
        out[k] = w[k] - lr * d
    return out


def _objective(problem: Problem, t: int, val: bool, weight_decay: float):
    """E(w) at step t: the validation loss, or the training loss of batch t with SGD's L2 term
    (HD's training-loss objective, whose gradient is the one SGD descends)."""
    if val:
        return problem.val
    return lambda p: problem.train(p, t) + 0.5 * weight_decay * sum((v ** 2).sum() for v in p.values())


@pytest.mark.parametrize("val", [True, False], ids=["val", "train"])
@pytest.mark.parametrize("case", SGD_CASES, ids=str)
def test_sgd_momentum_hypergradient_is_exact(case, val):
    problem = Problem()
    params = problem.leaves()
    t = 2
    opt = HypergradSGD(list(params.values()), lr=0.1, hyper_lr=0.0, tune=("lr", "momentum"),
                       momentum_phase="run",
                       val_closure=(lambda: problem.val(params)) if val else None, **case)
    snap = _run(problem, opt, params, t + 2, snapshot_at=t)
    h = opt.history[0]["hypergrad/momentum"][t + 1]  # dE(w_{t+1}) / dmu_t
    assert opt.history[0]["hypergrad/momentum"][0] == 0.0  # no tangent before the first step
    buf = {k: s.get("momentum_buffer") for k, s in snap["state"].items()}
    hyper = dict(lr=0.1, weight_decay=case.get("weight_decay", 0.0),
                 dampening=case.get("dampening", 0.0), nesterov=case.get("nesterov", False))
    E = _objective(problem, t + 1, val, hyper["weight_decay"])

    def e_of(mu):
        return E(_sgd_one_step(snap["w"], snap["g"], buf, momentum=mu, **hyper))

    mu0 = case["momentum"]
    # gradient-descent-the-ultimate-optimizer's way: w_{t+1} as a function of a mu tensor
    mu = torch.tensor(mu0, dtype=F64, requires_grad=True)
    (auto,) = torch.autograd.grad(e_of(mu), mu)
    eps = 1e-5
    fd = (e_of(mu0 + eps) - e_of(mu0 - eps)).item() / (2 * eps)
    assert h == pytest.approx(auto.item(), rel=1e-10, abs=1e-14)
    assert h == pytest.approx(fd, rel=1e-7, abs=1e-12)
    if val:  # the oracle: one unrolled step of the SGD rule from the same state
        _, hg = rule_unrolled_hypergrad(
            SGD, lambda p, _: problem.train(p, t), problem.val, snap["w"], horizon=1,
            hypers=dict(lr=0.1, momentum=mu0, weight_decay=hyper["weight_decay"]),
            options=dict(dampening=hyper["dampening"], nesterov=hyper["nesterov"]),
            buffers={"momentum_buffer": buf})
        assert h == pytest.approx(hg["momentum"].item(), rel=1e-10, abs=1e-14)


def _adam_one_step(w, g, state, *, lr, beta1, beta2=0.999, eps=1e-8, weight_decay=0.0,
                   decoupled=False):
    """torch's Adam/AdamW step written out by hand, differentiable in ``beta1``."""
    out = {}
    for k in w:
        step = float(state[k]["step"]) + 1
        p, grad = w[k], g[k]
        if decoupled:
            p = p * (1 - lr * weight_decay)
        elif weight_decay:
            grad = grad + weight_decay * p
        m = beta1 * state[k]["exp_avg"] + (1 - beta1) * grad
        v = beta2 * state[k]["exp_avg_sq"] + (1 - beta2) * grad * grad
        denom = v.sqrt() / math.sqrt(1 - beta2 ** step) + eps
        out[k] = p - lr / (1 - beta1 ** step) * m / denom
    return out


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_adam_beta1_hypergradient_is_exact(decoupled):
    problem = Problem()
    params = problem.leaves()
    t = 2
    cls = HypergradAdamW if decoupled else HypergradAdam
    opt = cls(list(params.values()), lr=0.01, betas=(0.8, 0.99), weight_decay=0.05,
              hyper_lr=0.0, tune=("lr", "momentum"), momentum_phase="run",
              val_closure=lambda: problem.val(params))
    snap = _run(problem, opt, params, t + 2, snapshot_at=t)
    h = opt.history[0]["hypergrad/momentum"][t + 1]

    def e_of(b1):
        return problem.val(_adam_one_step(snap["w"], snap["g"], snap["state"], lr=0.01, beta1=b1,
                                          beta2=0.99, weight_decay=0.05, decoupled=decoupled))

    b1 = torch.tensor(0.8, dtype=F64, requires_grad=True)
    (auto,) = torch.autograd.grad(e_of(b1), b1)
    eps = 1e-5
    fd = (e_of(0.8 + eps) - e_of(0.8 - eps)).item() / (2 * eps)
    assert h != 0.0
    assert h == pytest.approx(auto.item(), rel=1e-9)
    assert h == pytest.approx(fd, rel=1e-7)


class _Generic(HypergradSGD):
    """HypergradSGD with the generic tangent (RuleHypergrad's) instead of its closed form."""

    _momentum_tangents = RuleHypergrad._momentum_tangents


@pytest.mark.parametrize("per_parameter", [False, True], ids=["group", "per_weight"])
@pytest.mark.parametrize("case", SGD_CASES, ids=str)
def test_sgd_fast_path_equals_generic_tangent(case, per_parameter):
    problem = Problem()
    runs = []
    for cls in (HypergradSGD, _Generic):
        params = problem.leaves()
        opt = cls(list(params.values()), lr=0.05, hyper_lr=0.01, tune=("lr", "momentum"),
                  momentum_phase="run", per_parameter=per_parameter, **case)
        _run(problem, opt, params, 5)
        runs.append((params, opt))
    (p1, o1), (p2, o2) = runs
    for k in p1:
        torch.testing.assert_close(o1.state[p1[k]]["momentum_tangent"],
                                   o2.state[p2[k]]["momentum_tangent"], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-12, atol=1e-15)
    assert o1.history[0]["momentum"] == pytest.approx(o2.history[0]["momentum"], rel=1e-12)


def _mlp_run(cls, steps=8, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen))
            for _ in range(steps)]
    opt = cls(model.parameters(), **kwargs)
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("cls, kwargs", [
    (HypergradSGD, dict(lr=0.05, momentum=0.9)),
    (HypergradSGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (HypergradAdam, dict(lr=0.01)),
])
def test_without_momentum_in_tune_nothing_changes(cls, kwargs):
    """``tune=("lr",)`` is today's optimizer; learning the momentum with a zero hyper-step
    leaves the weights bit-identical to it (the tangents never touch the step)."""
    m0, o0 = _mlp_run(cls, hyper_lr=1e-3, **kwargs)
    m1, o1 = _mlp_run(cls, hyper_lr=1e-3, tune=("lr",), **kwargs)
    for a, b in zip(m0.parameters(), m1.parameters()):
        assert torch.equal(a, b)
    assert o0.history == o1.history
    assert "momentum" not in o1.history[0]
    assert all("momentum_tangent" not in s for s in o1.state.values())
    m2, o2 = _mlp_run(cls, hyper_lr=0.0, tune=("lr",), **kwargs)
    m3, o3 = _mlp_run(cls, hyper_lr=0.0, tune=("lr", "momentum"), momentum_phase="run", **kwargs)
    for a, b in zip(m2.parameters(), m3.parameters()):
        assert torch.equal(a, b)
    assert len(set(o3.history[0]["momentum"])) == 1


@pytest.mark.parametrize("cls, kwargs", [
    (HypergradSGD, dict(lr=0.05, momentum=0.5, hyper_lr=0.01)),
    (HypergradSGD, dict(lr=0.05, momentum=0.5, nesterov=True, hyper_step="growth")),
    (HypergradSGD, dict(lr=0.05, momentum=0.5, hyper_step="scale_free")),
    (HypergradSGD, dict(lr=0.05, momentum=0.5, hyper_lr=0.01, per_parameter=True)),
    (HypergradAdam, dict(lr=0.01, betas=(0.5, 0.999), hyper_step="adam_log")),
])
def test_resume_mid_run_is_bit_exact(cls, kwargs):
    kwargs = dict(kwargs, tune=("lr", "momentum"), momentum_phase="run")
    m_full, o_full = _mlp_run(cls, steps=10, **kwargs)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen))
            for _ in range(10)]
    opt = cls(model.parameters(), **kwargs)
    for i, (x, y) in enumerate(data):
        if i == 5:
            saved = copy.deepcopy(opt.state_dict())
            fresh = copy.deepcopy(model)
            opt = cls(fresh.parameters(), **kwargs)
            opt.load_state_dict(saved)
            model = fresh
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for a, b in zip(m_full.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert opt.history == o_full.history
    assert opt.param_groups[0].get("momentum") == o_full.param_groups[0].get("momentum")
    assert opt.param_groups[0].get("betas") == o_full.param_groups[0].get("betas")
    # the momentum moved, within its bounds
    moved = o_full.history[0]["momentum"]
    assert len(set(moved)) > 1
    assert all(MOMENTUM_BOUNDS[0] <= m <= MOMENTUM_BOUNDS[1] for m in moved)


def test_state_dict_without_tune_loads_as_lr_only():
    """A checkpoint saved before HD learned momentum tuned the learning rate alone."""
    _, opt = _mlp_run(HypergradSGD, lr=0.05, momentum=0.9)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["tune"]
    fresh = HypergradSGD(torch.nn.Linear(4, 6).parameters(), lr=0.05, momentum=0.9)
    _, other = _mlp_run(HypergradSGD, lr=0.05, momentum=0.9)
    other.load_state_dict(saved)
    assert other.param_groups[0]["tune"] == ("lr",)
    del fresh


def test_momentum_starts_from_zero_and_is_held_to_its_bounds():
    """From momentum 0 (no buffer yet) the first hyper-step takes it into its range; a large
    hyper-step holds it at the top."""
    _, opt = _mlp_run(HypergradSGD, lr=0.05, hyper_lr=1e6, lr_bounds=(0.05, 0.05),
                      tune=("lr", "momentum"), momentum_phase="run")
    momenta = opt.history[0]["momentum"]
    assert all(MOMENTUM_BOUNDS[0] <= m <= MOMENTUM_BOUNDS[1] for m in momenta)
    assert opt.param_groups[0]["momentum"] in MOMENTUM_BOUNDS


def test_skipped_step_records_nan_and_keeps_the_momentum():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    bad = {"on": False}

    def val():
        out = model(torch.ones(2, 3)).pow(2).mean()
        return out * math.nan if bad["on"] else out

    opt = HypergradSGD(model.parameters(), lr=0.1, momentum=0.5, tune=("lr", "momentum"),
                       momentum_phase="run", val_closure=val)
    for i in range(4):
        bad["on"] = i == 3
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).mean().backward()
        if bad["on"]:
            with pytest.warns(RuntimeWarning):
                opt.step()
        else:
            opt.step()
    hist = opt.history[0]
    assert hist["skipped"][-1] == 1.0 and math.isnan(hist["hypergrad/momentum"][-1])
    assert hist["momentum"][-1] == hist["momentum"][-2] == opt.param_groups[0]["momentum"]


@pytest.mark.parametrize("tune", [("momentum",), ("lr", "weight_decay"), ("lr", "lr"), "lr",
                                  ("lr", "beta1")])
def test_invalid_tune_is_refused(tune):
    with pytest.raises(ValueError, match="Invalid tune value"):
        HypergradSGD(torch.nn.Linear(2, 1).parameters(), momentum=0.9, tune=tune)


def test_tune_is_fixed_after_the_group_is_added():
    opt = HypergradSGD(torch.nn.Linear(2, 1).parameters(), momentum=0.9, tune=("lr",))
    opt.param_groups[0]["tune"] = ("lr", "momentum")
    with pytest.raises(ValueError, match="Invalid tune value"):
        opt.step()
    other = HypergradAdam(torch.nn.Linear(2, 1).parameters())
    other.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))],
                           "tune": ["lr", "momentum"]})
    assert list(other.param_groups[1]["tune"]) == ["lr", "momentum"]


def test_learning_momentum_on_an_ill_conditioned_quadratic():
    """Not an assertion of speed: on a quadratic with condition number 1000 from a small
    learning rate, more momentum helps, and the learned momentum rises from 0.5 (the losses are
    reported with ``-s``)."""
    scales = torch.logspace(-3, 0, 50, dtype=F64)
    report = []
    for policy in (dict(hyper_lr=1e-2), dict(hyper_step="growth")):
        for tune in (("lr",), ("lr", "momentum")):
            w = torch.ones(50, dtype=F64, requires_grad=True)
            opt = HypergradSGD([w], lr=0.01, momentum=0.5, tune=tune, momentum_phase="run", **policy)
            for _ in range(300):
                opt.zero_grad()
                loss = 0.5 * (scales * w * w).sum()
                loss.backward()
                opt.step()
            momentum = opt.param_groups[0]["momentum"]
            report.append(f"{policy} tune={tune}: loss {loss.item():.2e}, lr "
                          f"{opt.param_groups[0]['lr']:.3g}, momentum {momentum:.3f}")
            if "momentum" in tune:
                assert momentum > 0.5
    print("\nquadratic, 300 steps from lr 0.01, momentum 0.5:\n" + "\n".join(report))
