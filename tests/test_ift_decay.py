"""IFT's accelerated weight decay (``decay_accel``, 1.5 for IFTOptimizer, off for the Adam
classes): while a group's weight-decay hypergradient keeps asking for more, the k-th hyper-update
in a row moves it with min(1.5 ** max(k - 3, 0), 8) times the hyper optimizer's step; a request
for less ends the run and is never accelerated. Resumed exactly, checked on load, per group."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from hyperoptim import IFTAdam, IFTAdamW, IFTOptimizer, SignSGD
from hyperoptim.methods.ift_schedule import DECAY_PATIENCE, WARMUP_REACH, decay_scale

STEP = 0.01  # SignSGD's step on log10 weight decay


class Overfit:
    r"""Full-batch least squares in float64 whose training targets are noise. ``sign=-1``: the
    validation targets are 0, so with :math:`\nabla L_V \cdot w = \|X w\|^2 / n > 0` the one-step
    hypergradient of the decay, :math:`-a \nabla L_V \cdot w`, asks for more at every step.
    ``sign=+1``: the weights start at the training optimum and the validation targets are 3x
    the training ones, so it asks for less."""

    def __init__(self, sign: int = -1, seed: int = 0, n: int = 32, d: int = 8):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=gen, dtype=torch.float64)
        self.y = torch.randn(n, generator=gen, dtype=torch.float64)
        if sign < 0:
            self.yv = torch.zeros(n, dtype=torch.float64)
            start = torch.randn(d, generator=gen, dtype=torch.float64)
        else:
            self.yv = 3.0 * self.y
            start = torch.linalg.lstsq(self.x, self.y.unsqueeze(1)).solution.squeeze(1)
        self.w = nn.Parameter(start)

    def train(self) -> torch.Tensor:
        return 0.5 * ((self.x @ self.w - self.y) ** 2).mean()

    def val(self) -> torch.Tensor:
        return 0.5 * ((self.x @ self.w - self.yv) ** 2).mean()


def _sign_steps(groups):
    return SignSGD(groups, lr=STEP)


def _ift(prob: Overfit, **kwargs) -> IFTOptimizer:
    options = dict(lr=0.05, momentum=0.0, weight_decay=1e-3, tune=("weight_decay",),
                   update_interval=1, update_schedule="fixed", lookback=1,
                   hyper_optimizer=_sign_steps, val_closure=prob.val)
    return IFTOptimizer([prob.w], **(options | kwargs))


def _log_steps(opt: IFTOptimizer) -> list[float]:
    decays = opt.history[0]["weight_decay"]
    return [round((math.log10(b) - math.log10(a)) / STEP, 6) for a, b in zip(decays, decays[1:])]


def test_the_scale_follows_the_run():
    assert [decay_scale([k], 0, 1.5) for k in range(DECAY_PATIENCE + 2)] == [1, 1, 1, 1, 1.5]
    assert decay_scale([40], 0, 1.5) == WARMUP_REACH
    assert decay_scale(None, 0, 1.5) == 1.0


def test_a_decay_asked_for_again_and_again_climbs_faster():
    prob = Overfit(sign=-1)
    opt = _ift(prob)
    for _ in range(12):
        opt.step(prob.train)
    assert all(h < 0 for h in opt.history[0]["hypergrad/weight_decay"])
    # The k-th update moves by min(1.5 ** max(k - 3, 0), 8) sign steps, k = the run before it.
    expected = [min(1.5 ** max(k - DECAY_PATIENCE, 0), WARMUP_REACH) for k in range(1, 12)]
    assert _log_steps(opt) == pytest.approx(expected, rel=1e-6)
    assert opt.hyper_state["decay"] == [12]


def test_a_decay_asked_down_is_never_accelerated():
    prob = Overfit(sign=+1)
    opt = _ift(prob)
    for _ in range(12):
        opt.step(prob.train)
    assert all(h > 0 for h in opt.history[0]["hypergrad/weight_decay"])
    assert _log_steps(opt) == pytest.approx([-1.0] * 11, rel=1e-6)
    assert opt.hyper_state["decay"] == [0]


def test_off_is_the_plain_hyper_step():
    prob = Overfit(sign=-1)
    opt = _ift(prob, decay_accel=1.0)
    for _ in range(12):
        opt.step(prob.train)
    assert _log_steps(opt) == pytest.approx([1.0] * 11, rel=1e-6)
    assert "decay" not in opt.hyper_state


def test_a_request_for_less_ends_the_run():
    prob = Overfit(sign=-1)
    opt = _ift(prob)
    for _ in range(8):
        opt.step(prob.train)
    assert opt.hyper_state["decay"] == [8]
    # Validation targets far beyond the current predictions: now it asks for less decay.
    prob.yv = 100.0 * (prob.x @ prob.w).detach()
    opt.step(prob.train)
    assert opt.history[0]["hypergrad/weight_decay"][-1] > 0
    assert opt.hyper_state["decay"] == [0]
    opt.step(prob.train)
    assert _log_steps(opt)[-1] == pytest.approx(-1.0)


def test_each_group_keeps_its_own_run():
    a, b = Overfit(sign=-1, seed=1), Overfit(sign=+1, seed=2)
    opt = IFTOptimizer([{"params": [a.w]}, {"params": [b.w]}], lr=0.05, weight_decay=1e-3,
                       tune=("weight_decay",), update_interval=1, update_schedule="fixed",
                       lookback=1, hyper_optimizer=_sign_steps,
                       val_closure=lambda: a.val() + b.val())
    for _ in range(8):
        opt.step(lambda: a.train() + b.train())
    assert opt.hyper_state["decay"] == [8, 0]
    extra = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt.add_param_group({"params": [extra]})
    assert opt.hyper_state["decay"] == [8, 0, 0]


def test_resume_is_exact_and_the_state_is_checked():
    def run(split: int | None):
        prob = Overfit(sign=-1)
        opt = _ift(prob, hyper_optimizer=None, hyper_lr=0.05)
        for t in range(14):
            if t == split:  # a checkpoint, loaded as torch.load's default does
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                weights = prob.w.detach().clone()
                prob = Overfit(sign=-1)
                with torch.no_grad():
                    prob.w.copy_(weights)
                opt = _ift(prob, hyper_optimizer=None, hyper_lr=0.05)
                opt.load_state_dict(torch.load(buffer, weights_only=True))
            opt.step(prob.train)
        return prob.w.detach().clone(), opt.param_groups[0]["weight_decay"], opt.hyper_state

    whole, resumed = run(None), run(7)
    assert torch.equal(whole[0], resumed[0])
    assert whole[1] == resumed[1]
    assert whole[2]["decay"] == resumed[2]["decay"]

    prob = Overfit()
    opt = _ift(prob)
    opt.step(prob.train)
    state = opt.state_dict()
    for bad in ([-1], [1, 2], [True], "3"):
        broken = {**state, "hyper_state": {**state["hyper_state"], "decay": bad}}
        with pytest.raises(ValueError, match=r"hyper_state\['decay'\] is malformed"):
            _ift(Overfit()).load_state_dict(broken)
    # Saved without the runs (the option off, or a release before it): they start at 0.
    older = {**state, "hyper_state": {k: v for k, v in state["hyper_state"].items()
                                      if k != "decay"}}
    fresh = _ift(Overfit())
    fresh.load_state_dict(older)
    assert fresh.hyper_state["decay"] == [0]


def test_defaults_per_class_and_bad_values():
    w = nn.Parameter(torch.zeros(2))
    assert IFTOptimizer([w], lr=0.1).decay_accel == 1.5
    assert IFTAdam([w], lr=0.1).decay_accel == 1.0
    assert "decay" not in IFTAdamW([w], lr=0.1).hyper_state
    assert IFTAdamW([w], lr=0.1, decay_accel=2.0).hyper_state["decay"] == [0]
    for bad in (0.5, math.nan, "fast"):
        with pytest.raises(ValueError, match="Invalid decay_accel value"):
            IFTOptimizer([w], lr=0.1, decay_accel=bad)
