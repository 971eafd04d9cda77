"""IFT's stability guard (``stability_guard``, on by default where the rule has an edge of
stability): a learned learning rate that puts the step past the rule's edge is cut to 0.8 of it,
in the step that sees it. The edge is the rule's (SGD's heavy-ball and Nesterov bounds, checked
against the iteration's spectral radius), the cut is exact on a quadratic on both HVP routes, the
guard never acts below the edge, checks only the warm-up's steps and the hyper-updates, leaves
untuned learning rates alone, keeps the step atomic, and rescues a ReLU network started 10x too
large that dies without it."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hyperoptim import IFTAdam, IFTAdamW, IFTOptimizer
from hyperoptim.methods.ift import (
    EDGE_GROWTH,
    EDGE_MAX_CUT,
    EDGE_MAX_SKIP,
    EDGE_TARGET,
    EDGE_WARN_CUT,
    edge_skip,
)
from hyperoptim.rules.sgd import sgd_edge

EDGE = "ignore:.*past the edge of stability:hyperoptim.HyperoptimWarning"
DIVERGENT = "ignore:.*training looks divergent:hyperoptim.HyperoptimWarning"
RUNAWAY = "ignore:.*the training loss ran away:hyperoptim.HyperoptimWarning"


# ---------------------------------------------------------------- the rule's edge
def _spectral_radius(a_lambda: float, m: float, dampening: float, nesterov: bool) -> float:
    """Of PyTorch's SGD iteration on f(w) = lambda w^2 / 2, state (w, buf), buf already set."""
    if nesterov:
        # buf' = m buf + g; w' = w - a (g + m buf') with g = lambda w; only a lambda matters.
        k = a_lambda
        matrix = [[1.0 - k * (1.0 + m), -m * m], [k, m]]
    else:
        # buf' = m buf + (1 - tau) g; w' = w - a buf'
        k = a_lambda * (1.0 - dampening)
        matrix = [[1.0 - k, -m], [k, m]]
    return float(max(abs(np.linalg.eigvals(np.array(matrix)))))


@settings(max_examples=200, deadline=None)
@given(m=st.floats(0.0, 0.99), dampening=st.floats(0.0, 0.9), nesterov=st.booleans(),
       side=st.sampled_from([0.98, 1.02]))
def test_sgd_edge_is_where_the_iteration_turns_unstable(m, dampening, nesterov, side):
    dampening = 0.0 if nesterov else dampening
    edge = sgd_edge({"momentum": m}, {"nesterov": nesterov})
    # The edge is a bound on the Rayleigh quotient of du/dw: a (1 - tau) lambda for heavy ball,
    # a (1 + m) lambda for Nesterov.
    rho = side * edge
    a_lambda = rho / (1.0 + m) if nesterov else rho / (1.0 - dampening)
    radius = _spectral_radius(a_lambda, m, dampening, nesterov)
    if side < 1.0:
        assert radius < 1.0, (m, dampening, nesterov, radius)
    else:
        assert radius > 1.0, (m, dampening, nesterov, radius)


def test_the_adam_rule_has_no_edge_and_refuses_the_guard():
    w = nn.Parameter(torch.zeros(2))
    assert IFTAdam([w], lr=0.01).stability_guard is False
    assert IFTAdamW([w], lr=0.01, stability_guard=None).stability_guard is False
    with pytest.raises(ValueError, match="Invalid stability_guard value: True .*no edge of stab"):
        IFTAdam([w], lr=0.01, stability_guard=True)
    with pytest.raises(ValueError, match="Invalid stability_guard value"):
        IFTOptimizer([w], lr=0.01, stability_guard="yes")
    assert IFTOptimizer([w], lr=0.01).stability_guard is True


# ---------------------------------------------------------------- on a quadratic
class Quadratic:
    """f(w) = (w - t)^T H (w - t) / 2 in float64 with a known diagonal H; the validation loss
    is another quadratic."""

    def __init__(self, h=(10.0, 1.0, 0.1), seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.h = torch.tensor(h, dtype=torch.float64)
        self.t = torch.randn(len(h), generator=gen, dtype=torch.float64)
        self.tv = self.t + 0.1 * torch.randn(len(h), generator=gen, dtype=torch.float64)
        self.w = nn.Parameter(torch.zeros(len(h), dtype=torch.float64))

    def train(self) -> torch.Tensor:
        return 0.5 * (self.h * (self.w - self.t) ** 2).sum()

    def val(self) -> torch.Tensor:
        return 0.5 * (self.h * (self.w - self.tv) ** 2).sum()

    def rho(self, lr: float, weight_decay: float) -> float:
        """a g^T (H + c I) g / g^T g at the current weights (the gradient of the train loss)."""
        with torch.no_grad():
            g = self.h * (self.w - self.t) + weight_decay * self.w
            return lr * float(((self.h + weight_decay) * g * g).sum() / (g * g).sum())


def _closure(prob: Quadratic, opt: torch.optim.Optimizer, backward: bool):
    def closure():
        loss = prob.train()
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss
    return closure


def _ift(prob: Quadratic, lr: float, **kwargs) -> IFTOptimizer:
    # No hyper-update moves the learning rate here (hyper_lr=0) and no loss watch: the guard is
    # the only thing that does.
    options = dict(momentum=0.9, weight_decay=1e-3, tune=("lr",), hyper_lr=0.0, lookback=2,
                   reactive_decrease=False, lr_bounds=(1e-10, 10.0), val_closure=prob.val)
    return IFTOptimizer([prob.w], lr=lr, **(options | kwargs))


@pytest.mark.filterwarnings(EDGE, DIVERGENT)
@pytest.mark.parametrize("backward", [False, True], ids=["exact", "finite_difference"])
def test_a_learning_rate_past_the_edge_is_cut_to_its_fraction_of_it(backward):
    prob = Quadratic()
    # rho ~ 0.5 * 10 = 5 > 3.8 = 2 (1 + 0.9) along a gradient dominated by the sharp direction.
    lr = 0.5
    opt = _ift(prob, lr)
    rho = prob.rho(lr, 1e-3)
    edge = 2.0 * 1.9
    assert edge < rho < EDGE_MAX_CUT * EDGE_TARGET * edge
    expected = lr * EDGE_TARGET * edge / rho
    before = prob.w.detach().clone()
    opt.step(_closure(prob, opt, backward))
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9 if not backward else 1e-5)
    # ... and the step itself used the cut value: SGD's first step is w - a (g + c w).
    with torch.no_grad():
        g = prob.h * (before - prob.t) + 1e-3 * before
        torch.testing.assert_close(prob.w.detach(), before - opt.param_groups[0]["lr"] * g)


@pytest.mark.filterwarnings(EDGE, DIVERGENT)
def test_one_cut_is_at_most_ten_fold():
    prob = Quadratic(h=(1000.0, 1.0))
    opt = _ift(prob, 1.0)
    assert prob.rho(1.0, 1e-3) / 3.8 > 10 * EDGE_MAX_CUT
    opt.step(_closure(prob, opt, False))
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0 / EDGE_MAX_CUT)


@pytest.mark.parametrize("lr, hyper_lr", [(0.05, 0.05), (0.33, 0.0)],
                         ids=["learning", "near_the_edge"])
def test_below_the_edge_nothing_changes_bit_for_bit(lr, hyper_lr):
    # At lr 0.33 the largest Rayleigh quotient of a (H + c I) is 0.33 * 10.001 = 0.87 of the edge
    # 3.8, whatever the gradient's direction.
    runs = []
    for guard in (True, False):
        prob = Quadratic()
        opt = _ift(prob, lr, hyper_lr=hyper_lr, tune=("lr", "momentum", "weight_decay"),
                   update_interval=3, stability_guard=guard)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(20):
                opt.step(_closure(prob, opt, False))
        runs.append((prob.w.detach().clone(), opt.param_groups[0]["lr"], opt.history[0]["lr"]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1:] == runs[1][1:]


@pytest.mark.filterwarnings(EDGE, DIVERGENT)
def test_after_the_warmup_only_hyper_updates_are_checked():
    # A fixed schedule has no warm-up: the guard acts at the first hyper-update (the 4th step),
    # not before, and needs no closure's second-order information in between.
    prob = Quadratic()
    opt = _ift(prob, 0.5, update_schedule="fixed", update_interval=4)
    lrs = []
    for _ in range(4):
        opt.step(_closure(prob, opt, False))
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:3] == [0.5, 0.5, 0.5]
    assert lrs[3] < 0.5
    # In the warm-up (the default schedule), every step is checked: the first one cuts.
    prob = Quadratic()
    opt = _ift(prob, 0.5, update_interval=4)
    opt.step(_closure(prob, opt, False))
    assert opt.param_groups[0]["lr"] < 0.5


@settings(max_examples=200, deadline=None)
@given(ratio=st.floats(-10.0, 10.0))
def test_the_checks_skipped_stay_below_the_edge_at_the_growth_allowed(ratio):
    n = edge_skip(ratio)
    assert 0 <= n <= EDGE_MAX_SKIP
    if ratio > 0:
        # every skipped step stays below the edge, and one more would not (unless capped)
        assert ratio * EDGE_GROWTH ** n < 1.0 or n == 0
        assert n == EDGE_MAX_SKIP or ratio * EDGE_GROWTH ** (n + 1) >= 1.0
    else:
        assert n == EDGE_MAX_SKIP


def test_far_below_the_edge_the_warmup_checks_are_spaced():
    # lr 0.01: rho / edge <= 0.01 * 10.001 / 3.8 = 0.026, so a check lets 2 steps pass (0.026 * 16
    # < 1 <= 0.026 * 64). The finite-difference route shows it: a checked step calls the closure
    # three times (the step, and one Hessian product's two), an unchecked one once.
    prob = Quadratic()
    opt = _ift(prob, 0.01, update_interval=100)
    calls = []
    for _ in range(7):
        count = [0]
        inner = _closure(prob, opt, True)

        def closure(inner=inner, count=count):
            count[0] += 1
            return inner()

        opt.step(closure)
        calls.append(count[0])
        assert opt._warming_up()
    assert calls == [3, 1, 1, 3, 1, 1, 3]
    assert opt.hyper_state["edge"] == {"skip": 2}
    # A malformed spacing is refused on load, by name.
    state = opt.state_dict()
    for bad in ({"skip": -1}, {"skip": EDGE_MAX_SKIP + 1}, {"skip": 1.0}, {"wait": 0}):
        broken = {**state, "hyper_state": {**state["hyper_state"], "edge": bad}}
        with pytest.raises(ValueError, match=r"hyper_state\['edge'\] is malformed"):
            _ift(Quadratic(), 0.01).load_state_dict(broken)


def test_a_warning_says_so_once_for_a_cut_of_2x_or_more():
    prob = Quadratic()
    opt = _ift(prob, 1.0)  # rho / edge ~ 2.6: cut ~3.3x
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(_closure(prob, opt, False))
    edge = [w for w in caught if "past the edge of stability" in str(w.message)]
    assert len(edge) == 1
    assert "stability_guard=False" in str(edge[0].message)
    # A smaller cut holds a learning rate at the edge (where lr_accel's climb can take it)
    # without a word; it is still made.
    prob = Quadratic()
    opt = _ift(prob, 0.5)  # rho / edge ~ 1.3: cut ~1.65x
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(_closure(prob, opt, False))
    assert 1.0 < 0.5 / opt.param_groups[0]["lr"] < EDGE_WARN_CUT
    assert not [w for w in caught if "past the edge of stability" in str(w.message)]


def test_the_guards_cut_is_not_reported_as_a_runaway():
    # Without momentum the cut (to 0.8 of the edge 2) makes the loss fall at once: nothing ran
    # away, and the reactive decrease (the default's watch, reading every loss) says nothing.
    # It named the guard's cuts as its own before.
    prob = Quadratic()
    opt = _ift(prob, 0.5, momentum=0.0, reactive_decrease=True)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            losses.append(float(opt.step(_closure(prob, opt, False))))
    assert losses == sorted(losses, reverse=True), losses
    assert opt.param_groups[0]["lr"] < 0.5  # the guard did cut
    assert [w for w in caught if "past the edge of stability" in str(w.message)]
    assert not [w for w in caught if "ran away" in str(w.message)], caught


@pytest.mark.filterwarnings(EDGE, DIVERGENT)
def test_a_group_whose_lr_is_not_learned_or_is_within_the_edge_keeps_it():
    sharp = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    flat = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    fixed = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def train():
        return 0.5 * (10 * (sharp - 1) ** 2).sum() + 0.5 * (0.1 * (flat - 1) ** 2).sum() \
            + 0.5 * (10 * (fixed - 1) ** 2).sum()

    opt = IFTOptimizer([{"params": [sharp]}, {"params": [flat]},
                        {"params": [fixed], "tune": ("weight_decay",)}],
                       lr=0.5, momentum=0.9, hyper_lr=0.0, lookback=2, reactive_decrease=False,
                       lr_bounds=(1e-10, 10.0), val_closure=lambda: train() * 2)
    opt.step(train)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == pytest.approx(0.5 * EDGE_TARGET * 3.8 / 5.0)
    assert lrs[1:] == [0.5, 0.5]


def test_without_a_closure_the_guard_sits_the_step_out():
    prob = Quadratic()
    opt = _ift(prob, 0.5, lookback=1)
    for _ in range(3):
        opt.zero_grad()
        prob.train().backward()
        opt.step()
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.filterwarnings(EDGE, DIVERGENT)
def test_a_failing_step_leaves_the_learning_rate_as_it_was():
    prob = Quadratic()

    def failing():
        raise RuntimeError("boom")

    opt = _ift(prob, 0.5, update_interval=1, update_schedule="fixed", val_closure=failing)
    before = prob.w.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(_closure(prob, opt, False))
    assert opt.param_groups[0]["lr"] == 0.5
    assert opt.hyper_state["published"][0]["lr"] == 0.5
    assert torch.equal(prob.w.detach(), before)
    # The next step, with a working validation loss, cuts as the first would have.
    opt.step(_closure(prob, opt, False), val_closure=prob.val)
    assert opt.param_groups[0]["lr"] < 0.5


@pytest.mark.filterwarnings(EDGE, DIVERGENT)
def test_resume_is_exact_across_a_cut():
    def run(split: int | None):
        prob = Quadratic()
        opt = _ift(prob, 0.5, hyper_lr=0.05, update_interval=3)
        for t in range(12):
            if t == split:  # a checkpoint, loaded as torch.load's default does
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                weights = prob.w.detach().clone()
                prob = Quadratic()
                with torch.no_grad():
                    prob.w.copy_(weights)
                opt = _ift(prob, 0.5, hyper_lr=0.05, update_interval=3)
                opt.load_state_dict(torch.load(buffer, weights_only=True))
            opt.step(_closure(prob, opt, False))
        return prob.w.detach().clone(), opt.param_groups[0]["lr"], opt.history[0]

    whole, resumed = run(None), run(5)
    assert torch.equal(whole[0], resumed[0])
    assert whole[1] == resumed[1]
    assert whole[2] == resumed[2]


# ---------------------------------------------------------------- the reason it exists
@pytest.mark.filterwarnings(EDGE, DIVERGENT, RUNAWAY)
def test_a_relu_cnn_started_ten_times_too_large_survives():
    sklearn = pytest.importorskip("sklearn.datasets")
    digits = sklearn.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    train_idx, val_idx = perm[:1000], perm[1000:1400]

    def run(guard: bool) -> float:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1),
                              nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                              nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10))
        loss_fn = nn.functional.cross_entropy
        opt = IFTOptimizer(model.parameters(), lr=1.0, momentum=0.9, weight_decay=1e-4,
                           stability_guard=guard,
                           val_closure=lambda: loss_fn(model(x[val_idx]), y[val_idx]))
        batches = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).split(64)
        for idx in [*batches, *batches][:30]:
            b = train_idx[idx]
            opt.step(lambda b=b: loss_fn(model(x[b]), y[b]))
        with torch.no_grad():
            return float((model(x[val_idx]).argmax(1) == y[val_idx]).float().mean())

    assert run(False) < 0.2  # dead ReLUs: chance
    assert run(True) > 0.8
