"""FDSAdam and FDSAdamW: exact hypergradients against the oracle and finite differences, both HVP
routes, torch.optim.Adam(W) bit for bit with frozen schedules, learned values in range."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_fds import Problem, assert_rel_close  # the same tanh MLP and batches as FDSSGD's tests

from hyperoptim import FDSAdam, FDSAdamW
from hyperoptim.fds_adam import NAMES
from hyperoptim.reference import (
    adam_finite_difference_hypergrad,
    adam_unrolled_hypergrad,
    rule_unrolled_hypergrad,
)
from hyperoptim.rules import ADAM

F64 = torch.float64
CLASSES = {False: FDSAdam, True: FDSAdamW}


def make(prob: Problem, decoupled: bool, groups=None, **kwargs) -> FDSAdam:
    kwargs.setdefault("val_closure", lambda: prob.val_loss(prob.live))
    return CLASSES[decoupled](groups if groups is not None else list(prob.live.values()), **kwargs)


def set_schedules(opt: FDSAdam, schedules: dict[str, list[float]], group: int = 0) -> None:
    """Assign whole schedules between episodes, and show their first values as a step would."""
    g = opt.param_groups[group]
    for name, values in schedules.items():
        g[f"{name}_schedule"] = [float(v) for v in values]
    g["lr"], g["weight_decay"] = g["lr_schedule"][0], g["weight_decay_schedule"][0]
    g["betas"] = (g["beta1_schedule"][0], g["beta2_schedule"][0])


def episode(prob: Problem, opt: FDSAdam, backward: bool = False) -> torch.Tensor:
    for t in range(opt.horizon):
        opt.step(prob.closure(opt, t, backward))
    return opt.hyperstep()


def hypergrads(opt: FDSAdam, group: int = 0) -> dict[str, torch.Tensor]:
    hist = opt.history[group]
    return {n: torch.tensor(hist[f"hypergrad/{n}"][-1], dtype=F64)
            for n in NAMES if f"hypergrad/{n}" in hist}


# ---------------------------------------------------------------- exact hypergradients
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("route,tol", [("exact", 1e-12), ("finite_difference", 1e-8)])
def test_hypergrads_match_the_unrolled_adam_oracle(decoupled, route, tol):
    """lr schedule of 3 windows; one value each for beta1, beta2, weight decay (the oracle's
    support). The exact HVP route is reverse mode to rounding; finite differences of gradients
    are accurate to their truncation error."""
    horizon, lr = 6, [0.05, 0.02, 0.04]
    betas, wd, eps = (0.8, 0.95), 0.03, 1e-8
    prob = Problem(seed=7)
    opt = make(prob, decoupled, lr=lr[0], betas=betas, weight_decay=wd, eps=eps,
               horizon=horizon, lr_windows=3, tune=NAMES, hvp=route)
    opt.param_groups[0]["lr_schedule"] = list(lr)
    val = episode(prob, opt, backward=route == "finite_difference")
    e, exact = adam_unrolled_hypergrad(prob.train_loss, prob.val_loss, prob.init, horizon=horizon,
                                       lr=lr, betas=betas, eps=eps, weight_decay=wd,
                                       decoupled_weight_decay=decoupled)
    torch.testing.assert_close(val, e, rtol=1e-12, atol=0)
    ours = hypergrads(opt)
    assert set(ours) == set(NAMES) and ours["lr"].shape == (3,)
    assert all((v != 0).all() for v in exact.values())
    assert_rel_close(ours, exact, tol)
    # Per name too: the smallest hypergradient is not drowned by the largest.
    for name in NAMES:
        assert_rel_close({name: ours[name]}, {name: exact[name]}, 100 * tol)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_lr_schedules_match_the_oracle(data):
    """Any horizon, number of lr windows, tuned subset, Adam or AdamW, on the exact route."""
    horizon = data.draw(st.integers(1, 6), label="horizon")
    n = data.draw(st.integers(1, horizon), label="lr_windows")
    tune = data.draw(st.sets(st.sampled_from(NAMES), min_size=1), label="tune")
    # One Adam step from zero moments is g / (|g| + eps): it depends on the betas and on an L2
    # weight decay only through eps, so their hypergradients are 0 up to rounding, with no scale
    # to be relative to.
    assume(horizon > 1 or "lr" in tune)
    decoupled = data.draw(st.booleans(), label="decoupled")
    lr = [data.draw(st.floats(0.001, 0.1), label="lr") for _ in range(n)]
    betas = (data.draw(st.floats(0.0, 0.95), label="beta1"),
             data.draw(st.floats(0.5, 0.999), label="beta2"))
    wd = data.draw(st.sampled_from([0.0, 0.05]), label="weight_decay")
    prob = Problem(seed=horizon)
    opt = make(prob, decoupled, lr=lr[0], betas=betas, weight_decay=wd, horizon=horizon,
               lr_windows=n, tune=tune)
    opt.param_groups[0]["lr_schedule"] = list(lr)
    episode(prob, opt)
    _, exact = adam_unrolled_hypergrad(prob.train_loss, prob.val_loss, prob.init, horizon=horizon,
                                       lr=lr, betas=betas, weight_decay=wd,
                                       decoupled_weight_decay=decoupled)
    ours = hypergrads(opt)
    assert set(ours) == set(tune)
    # Relative to the largest hypergradient of the episode, not of the tuned ones alone: a beta's
    # can cancel to 1e-3 of the lr's (horizon 4, beta2 0.964: -9.9e-4 against 1.31), and then
    # forward mode (ours, closed form and autograd alike) and the oracle's reverse mode, both
    # exact, differ in the last bits of the terms (1.1e-15 absolute, 1.1e-12 of the beta's).
    scale = max(v.abs().max() for v in exact.values())
    assert_rel_close(ours, {name: exact[name] for name in tune}, 1e-12, scale)


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_one_window_per_step_is_the_exact_unshared_lr_hypergradient(decoupled):
    horizon = 5
    lr = [0.03, 0.06, 0.01, 0.05, 0.02]
    prob = Problem(seed=8)
    opt = make(prob, decoupled, lr=lr[0], weight_decay=0.02, horizon=horizon,
               lr_windows=horizon, tune=("lr",))
    opt.param_groups[0]["lr_schedule"] = list(lr)
    episode(prob, opt)
    _, exact = adam_unrolled_hypergrad(prob.train_loss, prob.val_loss, prob.init, horizon=horizon,
                                       lr=lr, weight_decay=0.02,
                                       decoupled_weight_decay=decoupled)
    assert_rel_close(hypergrads(opt), {"lr": exact["lr"]}, 1e-12)


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_every_schedule_matches_the_rule_oracle(decoupled):
    """Several windows for all four names at once, against reverse mode through the unrolled run
    of the Adam rule (``rule_unrolled_hypergrad``, a schedule for every hyperparameter)."""
    horizon = 6
    hypers = {"lr": [0.03, 0.01, 0.02], "beta1": [0.9, 0.5], "beta2": [0.99, 0.9, 0.999],
              "weight_decay": [0.05, 0.0]}
    prob = Problem(seed=11)
    opt = make(prob, decoupled, horizon=horizon, tune=NAMES,
               **{f"{n}_windows": len(v) for n, v in hypers.items()})
    set_schedules(opt, hypers)
    val = episode(prob, opt)
    e, exact = rule_unrolled_hypergrad(
        ADAM, prob.train_loss, prob.val_loss, prob.init, horizon=horizon, hypers=hypers,
        options=dict(eps=1e-8, decoupled_weight_decay=decoupled, maximize=False))
    torch.testing.assert_close(val, e, rtol=1e-12, atol=0)
    assert_rel_close(hypergrads(opt), exact, 1e-12)


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_weight_decay_and_beta_schedules_match_finite_differences(decoupled):
    """Schedules of several windows for every name, two param groups with their own schedules:
    central differences of the validation loss over whole float64 episodes (``tune=()``)."""
    horizon, h = 5, 1e-6
    base = [{"lr": [0.04, 0.02], "beta1": [0.9, 0.6], "beta2": [0.99], "weight_decay": [0.05, 0.0, 0.1]},
            {"lr": [0.03], "beta1": [0.7], "beta2": [0.9, 0.999], "weight_decay": [0.02, 0.08]}]

    def run(schedules, tune):
        prob = Problem(seed=9)
        groups = [{"params": [prob.live["w1"], prob.live["b1"]]}, {"params": [prob.live["w2"]]}]
        for g, sch in zip(groups, schedules, strict=True):
            g.update({f"{n}_windows": len(v) for n, v in sch.items()})
        opt = make(prob, decoupled, groups, horizon=horizon, tune=tune)
        for i, sch in enumerate(schedules):
            set_schedules(opt, sch, group=i)
        val = episode(prob, opt)
        return val.item(), [hypergrads(opt, i) for i in range(2)]

    _, ours = run(base, NAMES)
    for i in range(2):
        for name in NAMES:
            for k in range(len(base[i][name])):
                ends = []
                for sign in (1, -1):
                    sch = copy.deepcopy(base)
                    sch[i][name][k] += sign * h
                    ends.append(run(sch, ())[0])
                fd = (ends[0] - ends[1]) / (2 * h)
                assert ours[i][name][k].item() == pytest.approx(fd, rel=1e-6, abs=1e-9), (i, name, k)


def test_the_oracle_finite_differences_agree_for_adamw_weight_decay():
    """A second, independent check of the decoupled decay's column: the package's own
    finite-difference oracle (the paper's weight decay of one value)."""
    prob = Problem(seed=10)
    opt = make(prob, True, lr=0.03, weight_decay=0.1, horizon=4, tune=("weight_decay",))
    episode(prob, opt)
    _, fd = adam_finite_difference_hypergrad(prob.train_loss, prob.val_loss, prob.init,
                                             horizon=4, lr=0.03, weight_decay=0.1,
                                             decoupled_weight_decay=True)
    assert_rel_close(hypergrads(opt), {"weight_decay": fd["weight_decay"]}, 1e-6)


def test_param_groups_share_tangents_exactly():
    """Two groups with the same settings split the one-group hypergradient (chain rule)."""
    kwargs = dict(lr=0.03, betas=(0.8, 0.99), weight_decay=0.02, horizon=4, lr_windows=2,
                  tune=NAMES)
    one = Problem(seed=1)
    opt = make(one, False, **kwargs)
    episode(one, opt)
    whole = hypergrads(opt)
    two = Problem(seed=1)
    groups = [{"params": [two.live["w1"], two.live["b1"]]}, {"params": [two.live["w2"]]}]
    opt2 = make(two, False, groups, **kwargs)
    episode(two, opt2)
    split = [hypergrads(opt2, 0), hypergrads(opt2, 1)]
    assert_rel_close({n: split[0][n] + split[1][n] for n in NAMES}, whole, 1e-10)
    assert all((s[n].abs() > 0).all() for s in split for n in NAMES)


# ---------------------------------------------------------------- the inner step
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_frozen_schedules_are_torch_adam_bit_for_bit(decoupled, dtype):
    """Within an episode the schedules do not move: with everything tuned (tangents carried) and
    with nothing tuned (the drop-in call without a closure), every step's weights equal
    torch.optim.Adam's (AdamW's), and so does each new episode's against a fresh torch
    optimizer."""
    torch_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    kwargs = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.05)
    for tune in (NAMES, ()):
        a = Problem(dtype=dtype)
        opt = make(a, decoupled, horizon=4, tune=tune, lr_windows=2, **kwargs)
        for _ in range(2):
            a.reset()
            b = Problem(dtype=dtype)
            ref = torch_cls(list(b.live.values()), foreach=False, **kwargs)
            for t in range(4):
                if tune:
                    opt.step(a.closure(opt, t))
                else:
                    opt.zero_grad()
                    a.train_loss(a.live, t).backward()
                    opt.step()
                ref.zero_grad()
                b.train_loss(b.live, t).backward()
                ref.step()
                for k in a.live:
                    assert torch.equal(a.live[k], b.live[k]), (tune, t, k)
            opt.hyperstep()
            if tune:
                break  # the schedules moved: the next episode is not torch's run any more


def test_values_in_force_follow_the_windows_and_betas_show_them():
    prob = Problem()
    opt = make(prob, False, horizon=6, lr_windows=3, beta1_windows=2, beta2_windows=1,
               weight_decay_windows=6, tune=("lr",))
    sched = {"lr": [0.01, 0.02, 0.03], "beta1": [0.5, 0.9], "beta2": [0.99],
             "weight_decay": [0.01 * k for k in range(6)]}
    set_schedules(opt, sched)
    group = opt.param_groups[0]
    for t in range(6):
        b1 = sched["beta1"][t * 2 // 6]
        assert group["lr"] == sched["lr"][t * 3 // 6] and group["betas"] == (b1, 0.99)
        assert group["weight_decay"] == sched["weight_decay"][t]
        opt.step(prob.closure(opt, t))
    opt.hyperstep()
    assert opt.schedule("beta1") == [0.5, 0.9]
    assert "exp_avg" not in opt.state[prob.live["w1"]]  # a new episode starts fresh moments


def test_learned_betas_stay_in_range():
    prob = Problem(seed=2)
    opt = make(prob, False, lr=0.02, betas=(0.05, 0.999), horizon=4, tune=("beta1", "beta2"),
               hyper_lr={"beta1": 0.4, "beta2": 0.4})
    for _ in range(3):
        prob.reset()
        episode(prob, opt)
        for name in ("beta1", "beta2"):
            assert all(0.0 <= b <= 1.0 - 1e-6 for b in opt.schedule(name))
    assert all(math.isfinite(p.sum().item()) for p in prob.live.values())
    with pytest.raises(ValueError, match="Invalid beta1_schedule value"):
        opt.param_groups[0]["beta1_schedule"] = [1.5]
        opt.load_state_dict(opt.state_dict())


def test_learns_the_learning_rate_from_a_small_start():
    prob = Problem(seed=5)
    opt = make(prob, True, lr=1e-3, horizon=10, lr_windows=2, tune=("lr",),
               hyper_lr={"lr": 0.01})
    for _ in range(6):
        prob.reset()
        episode(prob, opt)
    losses = opt.history[0]["val_loss"]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(v > 1e-3 for v in opt.schedule("lr"))


def test_arguments_are_torch_adams_positional_ones():
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = FDSAdam(p, 0.02, (0.5, 0.6), 1e-6, 0.1, False, horizon=3)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        0.02, (0.5, 0.6), 1e-6, 0.1)
    assert FDSAdamW(p, horizon=3).param_groups[0]["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="Invalid betas value"):
        FDSAdam(p, betas=(0.9, 1.0), horizon=3)
    with pytest.raises(ValueError, match="Invalid amsgrad value"):
        FDSAdam(p, amsgrad=True, horizon=3)
    with pytest.raises(ValueError, match="Invalid tune value"):
        FDSAdam(p, tune=("momentum",), horizon=3)
    with pytest.raises(ValueError, match="Invalid beta2_windows value: 4"):
        FDSAdam(p, beta2_windows=4, horizon=3)
    extra = [torch.nn.Parameter(torch.zeros(2))]
    for bad, message in (({"eps": -1.0}, "Invalid eps value"),
                         ({"betas": (0.9, 1.0)}, "Invalid beta2 value"),
                         ({"betas": 0.9}, "Invalid betas value"),
                         ({"amsgrad": True}, "Invalid amsgrad value")):
        with pytest.raises(ValueError, match=message):
            opt.add_param_group({"params": extra, **bad})
