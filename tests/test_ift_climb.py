"""IFT's accelerated climb (``lr_accel``, 1.5 for IFTOptimizer, off for the Adam classes): in
the warm-up, once the accelerated warm-up's factor is no longer in force (the loss has left its
band), the k-th hyper-update in a row whose learning-rate hypergradient asks for more moves it
with min(1.5 ** max(k - 3, 0), 8) times the hyper optimizer's step. A cut of the learning rate
(stability guard, reactive decrease) ends the run; the warm-up's end ends the climb. Resumed
exactly, checked on load, per group, all or nothing."""

from __future__ import annotations

import io
import math

import pytest
import torch
from test_ift_accel import Regression, _run, factor
from test_ift_stability import Quadratic, _closure

from hyperoptim import IFTAdam, IFTAdamW, IFTOptimizer
from hyperoptim.methods.ift_schedule import climb_scale

DIVERGENT = "ignore:.*training looks divergent:hyperoptim.HyperoptimWarning"
EDGE = "ignore:.*past the edge of stability:hyperoptim.HyperoptimWarning"
RUNAWAY = "ignore:.*the training loss ran away:hyperoptim.HyperoptimWarning"


def _sgd(prob: Regression, **kwargs) -> IFTOptimizer:
    # Learning rate only, a hyper-update every warm-up step (no momentum), nothing else that
    # reads the loss or cuts the learning rate.
    options = dict(lr=1e-6, momentum=0.0, tune=("lr",), lookback=1, reactive_decrease=False,
                   stability_guard=False, val_closure=prob.val) | kwargs
    return IFTOptimizer([prob.w], **options)


def test_the_scale_is_the_decays_rule():
    assert [climb_scale([k], 0, 1.5) for k in range(6)] == [factor(k) for k in range(6)]
    assert climb_scale([40], 0, 1.5) == 8.0 and climb_scale(None, 0, 1.5) == 1.0


@pytest.mark.filterwarnings(DIVERGENT)
def test_the_climb_takes_over_where_the_stall_ends_and_stops_with_the_warmup():
    runs = {}
    for accel in (1.0, 1.5):
        prob = Regression()
        opt = _sgd(prob, lr_accel=accel)
        losses = _run(opt, prob, 40)
        runs[accel] = (opt, losses)
    plain, climbing = runs[1.0][0].history[0], runs[1.5][0].history[0]
    assert "update_schedule/climb" not in plain and "climb" not in runs[1.0][0].hyper_state
    accel, climb = climbing["update_schedule/accel"], climbing["update_schedule/climb"]
    warm = [k for k, w in enumerate(climbing["update_schedule/warmup"]) if w == 1.0]
    stalled = [k for k, f in enumerate(accel) if f != 1.0 or k < 4]  # patience: 1 while stalled
    out = len(stalled)  # the first hyper-update after the loss left the band
    assert 10 < out < len(warm) - 1, (out, len(warm))
    # While the stall's factor is in force the climb's is 1, and both runs are bit for bit equal.
    assert climb[:out] == [1.0] * out
    assert climbing["lr"][:out] == plain["lr"][:out]
    # Then the k-th hyper-update of the warm-up (all asking for more) takes factor(k), until the
    # warm-up ends; after it, 1.
    assert all(h < 0 for h in climbing["hypergrad/lr"][: len(warm) - 1])
    assert climb[out : len(warm)] == [factor(k) for k in range(out, len(warm))]
    assert set(climb[len(warm) :]) == {1.0}
    assert climbing["lr"][out] > 2 * plain["lr"][out]  # the climb did move it further
    # The hyper optimizer's own step size is left as it was.
    assert [g["lr"] for g in runs[1.5][0]._hyper_opt.param_groups] == [0.05]


def test_defaults_per_class_and_bad_values():
    prob = Regression()
    assert IFTOptimizer([prob.w], val_closure=prob.val).lr_accel == 1.5
    assert "climb" in IFTOptimizer([prob.w], val_closure=prob.val).hyper_state
    for cls in (IFTAdam, IFTAdamW):
        opt = cls([prob.w], val_closure=prob.val)
        assert opt.lr_accel == 1.0 and "climb" not in opt.hyper_state
    # Only the warm-up climbs: the paper's fixed schedule keeps no state.
    fixed = IFTOptimizer([prob.w], update_schedule="fixed", val_closure=prob.val)
    assert "climb" not in fixed.hyper_state
    for bad in (0.5, 0.0, math.inf, math.nan, "1.5", True):
        with pytest.raises(ValueError, match="lr_accel"):
            IFTOptimizer([prob.w], lr_accel=bad, val_closure=prob.val)


def _edge_opt(prob: Quadratic, lr: float, **kwargs) -> IFTOptimizer:
    # The warm-up runs (hyper_lr=0 moves nothing, the hypergradient keeps its sign), every step
    # a hyper-update, and the guard checks the first step.
    options = dict(momentum=0.0, tune=("lr",), hyper_lr=0.0, lookback=2, update_interval=1,
                   reactive_decrease=False, lr_bounds=(1e-10, 10.0), val_closure=prob.val)
    return IFTOptimizer([prob.w], lr=lr, **(options | kwargs))


def _with_climb(opt: IFTOptimizer, runs: list[int]) -> None:
    state = opt.state_dict()
    state["hyper_state"]["climb"] = list(runs)
    opt.load_state_dict(state)


@pytest.mark.filterwarnings(EDGE, DIVERGENT)
def test_a_guard_cut_ends_the_run_and_a_failed_step_keeps_it():
    prob = Quadratic()
    opt = _edge_opt(prob, 0.5)  # rho ~ 5 > 2, the edge without momentum
    _with_climb(opt, [6])

    def failing():
        raise RuntimeError("validation failed")

    with pytest.raises(RuntimeError, match="validation failed"):
        opt.step(_closure(prob, opt, False), val_closure=failing)
    assert opt.hyper_state["climb"] == [6] and opt.param_groups[0]["lr"] == 0.5  # nothing
    assert "_climb_scales" not in opt.__dict__
    # At momentum 0.9 the warm-up's first hyper-update comes at step 10 (its pace), and the
    # guard checks step 1 (rho ~ 5 > 3.8): the cut alone ends the run.
    prob = Quadratic()
    opt = _edge_opt(prob, 0.5, momentum=0.9, update_interval=10)
    _with_climb(opt, [6])
    opt.step(_closure(prob, opt, False))
    assert not opt.history[0]  # no hyper-update
    assert opt.param_groups[0]["lr"] < 0.5  # the guard cut it
    assert opt.hyper_state["climb"] == [0]


@pytest.mark.filterwarnings(DIVERGENT, RUNAWAY)
def test_a_runaway_cut_ends_every_run():
    prob = Quadratic()
    opt = _edge_opt(prob, 0.3, stability_guard=False, reactive_decrease=True)
    losses = []
    for _ in range(3):
        _with_climb(opt, [6])
        losses.append(float(opt.step(_closure(prob, opt, False))))
        if opt.hyper_state["runaway"]["alarmed"]:
            break
    assert opt.hyper_state["runaway"]["alarmed"], losses  # the loss ran away
    assert opt.hyper_state["climb"] == [0]


@pytest.mark.filterwarnings(DIVERGENT)
def test_resume_mid_climb_is_exact_and_the_state_is_checked():
    a = Regression()
    opt = _sgd(a)
    _run(opt, a, 21)
    assert opt.history[0]["update_schedule/climb"][-1] > 1.0  # in the climb
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    b = Regression()
    with torch.no_grad():
        b.w.copy_(a.w)
    opt2 = _sgd(b)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    _run(opt, a, 10)
    _run(opt2, b, 10)
    assert torch.equal(a.w, b.w) and opt2.history == opt.history
    assert opt2.hyper_state["climb"] == opt.hyper_state["climb"]
    # Saved without it (lr_accel off, or a release before it): the runs start at 0; loaded
    # into an optimizer without it, the state goes.
    off = _sgd(Regression(), lr_accel=1.0)
    fresh = _sgd(Regression())
    fresh.load_state_dict(off.state_dict())
    assert fresh.hyper_state["climb"] == [0]
    off.load_state_dict(opt.state_dict())
    assert "climb" not in off.hyper_state
    for bad in ([-1], [1.5], [True], [0, 0], "0", {"0": 1}):
        state = fresh.state_dict()
        state["hyper_state"]["climb"] = bad
        with pytest.raises(ValueError, match=r"hyper_state\['climb'\] is malformed"):
            fresh.load_state_dict(state)
    assert fresh.hyper_state["climb"] == [0]  # nothing loaded


@pytest.mark.filterwarnings(DIVERGENT)
def test_each_group_keeps_its_own_run_and_a_group_added_later_starts_at_zero():
    prob = Regression()
    other = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = _sgd(prob)
    _run(opt, prob, 5)
    opt.add_param_group({"params": [other], "lr": 1e-3, "tune": ("lr",)})
    assert opt.hyper_state["climb"][1] == 0 and opt.hyper_state["climb"][0] >= 5
