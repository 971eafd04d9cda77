"""IFT's reactive decrease (``reactive_decrease``, on by default): a learned learning rate is
divided by 10 at each new high of a runaway training loss, in the step that sees it; nothing else
changes, the step stays atomic, a resume is exact, and every rank decides alike."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from hyperoptim import IFTOptimizer
from hyperoptim.hyperstep import RUNAWAY_STATE, react
from hyperoptim.methods.ift import RUNAWAY_MARGIN

RUNAWAY = "ignore:.*the training loss ran away:hyperoptim.HyperoptimWarning"
DIVERGENT = "ignore:.*training looks divergent:hyperoptim.HyperoptimWarning"


class Ridge:
    """Full-batch least squares in float64: SGD at lr 5 with momentum 0.9 runs away."""

    def __init__(self, seed: int = 0, n: int = 40, d: int = 5):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=gen, dtype=torch.float64)
        self.y = self.x @ torch.randn(d, generator=gen, dtype=torch.float64)
        self.xv = torch.randn(n // 2, d, generator=gen, dtype=torch.float64)
        self.yv = self.xv @ torch.randn(d, generator=gen, dtype=torch.float64)
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def train(self) -> torch.Tensor:
        return 0.5 * ((self.x @ self.w - self.y) ** 2).mean()

    def val(self) -> torch.Tensor:
        return 0.5 * ((self.xv @ self.w - self.yv) ** 2).mean()

    def closure(self, opt: torch.optim.Optimizer):
        def closure():
            opt.zero_grad()
            loss = self.train()
            loss.backward()
            return loss
        return closure


LARGE = dict(lr=5.0, momentum=0.9, weight_decay=0.0)


def _ift(prob: Ridge, **kwargs) -> IFTOptimizer:
    # hyper_lr=0, no hyper-update in the run and no stability guard (its own tests are in
    # test_ift_stability.py): the reactive decrease is the only thing that moves the learning
    # rate.
    options = dict(LARGE, tune=("lr",), lr_bounds=(1e-10, 10.0), hyper_lr=0.0,
                   update_interval=100, update_schedule="fixed", lookback=1,
                   stability_guard=False, val_closure=prob.val) | kwargs
    return IFTOptimizer([prob.w], **options)


@pytest.mark.filterwarnings(DIVERGENT)
def test_the_runaway_is_met_in_the_step_that_sees_it():
    """Bit for bit torch.optim.SGD until the first loss :func:`react` flags (at IFT's margin); that
    step already uses lr / 10, and the run stays finite where SGD's (and the option off) does
    not."""
    ref_prob, prob, off_prob = Ridge(), Ridge(), Ridge()
    ref = torch.optim.SGD([ref_prob.w], **LARGE)
    opt, off = _ift(prob), _ift(off_prob, reactive_decrease=False)
    watch, first = dict(RUNAWAY_STATE), None
    with pytest.warns(Warning, match="the training loss ran away"):
        for t in range(40):
            before = ref_prob.w.detach().clone()
            loss = ref.step(ref_prob.closure(ref))
            off.step(off_prob.closure(off))
            divisor, watch = react(loss.item(), watch, margin=RUNAWAY_MARGIN)
            if divisor == 10.0:
                first = t
                break
            opt.step(prob.closure(opt))
            assert torch.equal(prob.w, ref_prob.w) and opt.param_groups[0]["lr"] == 5.0
        assert first is not None and first >= 1  # SGD ran away (the test's premise)
        assert torch.equal(prob.w, before)
        opt.step(prob.closure(opt))
    assert opt.param_groups[0]["lr"] == 0.5
    assert opt.hyper_state["transformed"][0]["lr"].item() == pytest.approx(math.log10(0.5))
    assert opt.hyper_state["runaway"] == watch
    for _ in range(60):
        ref.step(ref_prob.closure(ref))
        off.step(off_prob.closure(off))
    losses = [opt.step(prob.closure(opt)).item() for _ in range(60)]
    assert not math.isfinite(ref_prob.train().item()) or ref_prob.train().item() > 1e20
    assert not math.isfinite(off_prob.train().item()) or off_prob.train().item() > 1e20
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] < 0.5


@pytest.mark.filterwarnings(RUNAWAY, DIVERGENT)
def test_a_group_whose_lr_is_not_learned_keeps_it():
    prob = Ridge()
    opt = _ift(prob, tune=("weight_decay",), weight_decay=1e-3)
    for _ in range(12):
        opt.step(prob.closure(opt))
    assert opt.param_groups[0]["lr"] == 5.0


@pytest.mark.filterwarnings(RUNAWAY, DIVERGENT)
def test_maximize_watches_the_negated_objective():
    a, b = Ridge(), Ridge()
    lo, hi = _ift(a), _ift(b, maximize=True)
    for _ in range(15):
        lo.step(a.closure(lo))

        def negated():
            hi.zero_grad()
            loss = -b.train()
            loss.backward()
            return loss
        hi.step(negated)
    assert lo.param_groups[0]["lr"] < 5.0
    assert torch.equal(a.w, b.w) and hi.param_groups[0]["lr"] == lo.param_groups[0]["lr"]
    assert hi.hyper_state["runaway"] == lo.hyper_state["runaway"]


@pytest.mark.filterwarnings(RUNAWAY, DIVERGENT)
@pytest.mark.parametrize("per_parameter", [False, True], ids=["group", "per_parameter"])
def test_a_failing_step_leaves_the_learning_rate_and_the_watch_as_they_were(per_parameter):
    """A hyper-update whose validation closure raises, at the step the watch shrinks the
    learning rate: the step commits nothing (lr, transformed and per-parameter values, watch);
    the retry equals a clean run."""
    def build(prob: Ridge) -> IFTOptimizer:
        return _ift(prob, hyper_lr=0.01, update_interval=1, per_parameter_lr=per_parameter)

    clean_prob, prob = Ridge(), Ridge()
    clean, opt = build(clean_prob), build(prob)
    for _ in range(40):
        lr = clean.param_groups[0]["lr"]
        clean.step(clean_prob.closure(clean))
        if clean.param_groups[0]["lr"] < lr / 5:  # the step where the watch shrank it
            break
        opt.step(prob.closure(opt))
    else:
        pytest.fail("the watch never acted")
    saved = (opt.param_groups[0]["lr"], dict(opt.hyper_state["runaway"]),
             opt.hyper_state["transformed"][0].get("lr"),
             opt.state[prob.w].get("log10_lr"), opt.state[prob.w].get("lr"))
    saved = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in saved)
    weights = prob.w.detach().clone()

    def failing():
        raise RuntimeError("validation data unavailable")

    with pytest.raises(RuntimeError, match="validation data unavailable"):
        opt.step(prob.closure(opt), val_closure=failing)
    now = (opt.param_groups[0]["lr"], opt.hyper_state["runaway"],
           opt.hyper_state["transformed"][0].get("lr"),
           opt.state[prob.w].get("log10_lr"), opt.state[prob.w].get("lr"))
    for x, y in zip(saved, now):
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y)
    assert torch.equal(prob.w, weights)
    opt.step(prob.closure(opt))
    assert torch.equal(prob.w, clean_prob.w)
    assert opt.param_groups[0]["lr"] == clean.param_groups[0]["lr"]
    assert opt.hyper_state["runaway"] == clean.hyper_state["runaway"]


@pytest.mark.filterwarnings(RUNAWAY, DIVERGENT)
@pytest.mark.parametrize("per_parameter", [False, True], ids=["group", "per_parameter"])
def test_resume_mid_runaway_is_exact(per_parameter):
    def build(prob: Ridge) -> IFTOptimizer:
        return _ift(prob, hyper_lr=0.05, update_interval=3, per_parameter_lr=per_parameter)

    a = Ridge()
    opt = build(a)
    for _ in range(8):
        opt.step(a.closure(opt))
    assert opt.hyper_state["runaway"]["alarmed"] == 1.0  # mid-runaway: the watch has a peak
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    b = Ridge()
    with torch.no_grad():
        b.w.copy_(a.w)
    opt2 = build(b)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(20):
        opt.step(a.closure(opt))
        opt2.step(b.closure(opt2))
    assert torch.equal(a.w, b.w)
    assert opt2.hyper_state["runaway"] == opt.hyper_state["runaway"]
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_state_dicts_with_and_without_the_watch():
    prob = Ridge()
    opt = _ift(prob, lr=0.01)
    opt.step(prob.closure(opt))
    sd = opt.state_dict()
    assert sd["hyper_state"]["runaway"]["seen"] == 1.0
    bad = dict(sd, hyper_state={**sd["hyper_state"], "runaway": {"seen": 1.0}})
    with pytest.raises(ValueError, match="runaway"):
        _ift(Ridge(), lr=0.01).load_state_dict(bad)
    # Saved without the watch (the option off, or a release before it): a fresh watch.
    old = dict(sd, hyper_state={k: v for k, v in sd["hyper_state"].items() if k != "runaway"})
    fresh = _ift(Ridge(), lr=0.01)
    fresh.load_state_dict(old)
    assert fresh.hyper_state["runaway"] == RUNAWAY_STATE
    off = _ift(Ridge(), lr=0.01, reactive_decrease=False)
    off.load_state_dict(sd)
    assert "runaway" not in off.hyper_state
    with pytest.raises(ValueError, match="reactive_decrease"):
        _ift(Ridge(), reactive_decrease="yes")
