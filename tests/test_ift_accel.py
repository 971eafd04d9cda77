"""IFT's accelerated warm-up (``warmup_accel``, 1.5 by default): while every training loss is
within 3% of the first, the warm-up's k-th hyper-update moves the learning rate with
min(1.5**max(k - 3, 0), 8) times the hyper optimizer's step size; the first loss outside that
band ends it for good. Atomic, resumed exactly, decided alike on every rank, and ``warmup_accel=1`` is the
plain warm-up."""

from __future__ import annotations

import datetime
import io
import math
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hyperoptim import IFTAdam, IFTOptimizer
from hyperoptim.methods import ift_schedule
from hyperoptim.methods.ift_schedule import WARMUP_GATE, WARMUP_PATIENCE, WARMUP_REACH

# These runs start 1e4x below the learning rate their problem wants, on purpose: the guard's
# one-time warning that a learning rate grew 1e4x is their premise, not a finding.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*training looks divergent:hyperoptim.HyperoptimWarning")


class Regression:
    """Full-batch least squares in float64 whose rows split in two halves: ``near`` (targets
    within 1e-3 of the initial prediction, so its own loss is tiny and moves at once, in relative
    terms) and ``far`` (a loss of about 1 that a tiny learning rate leaves within 3% for many
    steps). The mean over all rows is the far half's, nearly."""

    def __init__(self, seed: int = 0, n: int = 16, d: int = 4, scale: float = 1.0):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=gen, dtype=torch.float64)
        target = self.x @ torch.randn(d, generator=gen, dtype=torch.float64)
        target[: n // 2] = 1e-3 * torch.randn(n // 2, generator=gen, dtype=torch.float64)
        self.y = target
        self.xv = torch.randn(n // 2, d, generator=gen, dtype=torch.float64)
        self.yv = self.xv @ torch.randn(d, generator=gen, dtype=torch.float64)
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))
        self.scale = scale

    def train(self, rows: slice = slice(None)) -> torch.Tensor:
        return self.scale * 0.5 * ((self.x[rows] @ self.w - self.y[rows]) ** 2).mean()

    def val(self) -> torch.Tensor:
        return self.scale * 0.5 * ((self.xv @ self.w - self.yv) ** 2).mean()

    def closure(self, opt: torch.optim.Optimizer, rows: slice = slice(None)):
        def closure():
            opt.zero_grad()
            loss = self.train(rows)
            loss.backward()
            return loss
        return closure


def factor(k: int, accel: float = 1.5) -> float:
    """The documented factor of the warm-up's k-th hyper-update (from 0) while stalled."""
    return min(accel ** max(k - 3, 0), 8.0)


def _adam(prob: Regression, **kwargs) -> IFTAdam:
    # Learning rate only, one hyper-update per warm-up step, no runaway watch: the acceleration
    # is the only thing that reads the loss.
    options = dict(lr=1e-6, tune=("lr",), lookback=1, reactive_decrease=False,
                   val_closure=prob.val) | kwargs
    return IFTAdam([prob.w], **options)


def _run(opt, prob: Regression, steps: int, rows: slice = slice(None)) -> list[float]:
    return [float(opt.step(prob.closure(opt, rows))) for _ in range(steps)]


# ----------------------------------------------------------------- the schedule's functions
def test_the_stall_ends_at_the_first_loss_outside_the_band_either_way_or_without_one():
    state = ift_schedule.new_stall()
    state = ift_schedule.watch_stall(state, 2.0)
    assert state == {"first": 2.0, "stalled": True}
    inside = 2.0 * (1 + WARMUP_GATE) - 1e-12
    assert ift_schedule.watch_stall(state, inside)["stalled"]
    assert ift_schedule.watch_stall(state, 2.0 * (1 - WARMUP_GATE) + 1e-12)["stalled"]
    for out in (2.0 * (1 + WARMUP_GATE) + 1e-9, 2.0 * (1 - WARMUP_GATE) - 1e-9, None, math.nan,
                math.inf):
        ended = ift_schedule.watch_stall(state, out)
        assert ended == {"first": 2.0, "stalled": False}, out
        assert ift_schedule.watch_stall(ended, 2.0) == ended  # for good
    assert ift_schedule.watch_stall(ift_schedule.new_stall(), None)["stalled"] is False
    assert state == {"first": 2.0, "stalled": True}  # nothing modified in place
    # A negative loss (a maximised objective, a log-likelihood): the band is relative to |L_0|.
    negative = ift_schedule.watch_stall(ift_schedule.new_stall(), -4.0)
    assert ift_schedule.watch_stall(negative, -4.1)["stalled"]
    assert not ift_schedule.watch_stall(negative, -3.8)["stalled"]


def test_the_factor_grows_while_stalled_and_warming_and_is_bounded():
    warmup = ift_schedule.new_state([("lr",)])
    stalled, moved = {"first": 1.0, "stalled": True}, {"first": 1.0, "stalled": False}
    factors = []
    for _ in range(12):
        factors.append(ift_schedule.accel_scale("warmup", warmup, stalled, 1.5))
        assert ift_schedule.accel_scale("warmup", warmup, moved, 1.5) == 1.0
        assert ift_schedule.accel_scale("warmup", warmup, None, 1.5) == 1.0
        assert ift_schedule.accel_scale("fixed", warmup, stalled, 1.5) == 1.0
        ift_schedule.advance(warmup, {0: -1.0})
    assert factors == [factor(k) for k in range(12)]
    assert factors[:4] == [1.0] * 4 and factors[4] == 1.5 and WARMUP_PATIENCE == 3
    assert factors[-1] == WARMUP_REACH == 8.0
    ift_schedule.advance(warmup, {0: 1.0})  # the sign changed: the warm-up is over
    assert ift_schedule.accel_scale("warmup", warmup, stalled, 1.5) == 1.0


# ----------------------------------------------------------------- in the optimizer
def test_the_warmup_climbs_faster_while_the_loss_is_flat():
    """From lr 1e-6 the plain warm-up moves log10 lr by about 0.05 per hyper-update; accelerated,
    the k-th moves it by up to factor(k) * 0.05, and history records the factor used."""
    runs = {}
    for accel in (1.0, 1.5):
        prob = Regression()
        opt = _adam(prob, warmup_accel=accel)
        _run(opt, prob, 11)
        runs[accel] = opt
    plain, fast = runs[1.0].history[0], runs[1.5].history[0]
    assert "update_schedule/accel" not in plain and "stall" not in runs[1.0].hyper_state
    assert fast["update_schedule/accel"] == [factor(k) for k in range(11)]
    assert runs[1.5].hyper_state["stall"]["stalled"]  # the loss is still within 3%
    climb = {a: math.log10(h["lr"][-1] / 1e-6) for a, h in ((1.0, plain), (1.5, fast))}
    assert climb[1.0] < 11 * 0.05 * 1.05
    assert climb[1.5] > 3 * climb[1.0] and climb[1.5] > 1.5  # 1.5 decades in 11 steps
    # The patience: the first hyper-updates are the plain warm-up's, bit for bit.
    assert fast["lr"][:4] == plain["lr"][:4]
    steps = [b - a for a, b in zip([-6.0] + [math.log10(x) for x in fast["lr"]],
                                   [math.log10(x) for x in fast["lr"]])]
    for k, step in enumerate(steps):  # Adam's step is at most about its size (here: its lr)
        assert step <= 0.05 * factor(k) * 1.05, (k, step)
    # The hyper optimizer's own step size is left as it was.
    assert [g["lr"] for g in runs[1.5]._hyper_opt.param_groups] == [0.05]


def test_a_loss_that_leaves_the_band_ends_the_acceleration_for_good():
    prob = Regression()
    opt = _adam(prob, lr=1e-6, update_interval=1000)
    losses = _run(opt, prob, 40)
    history = opt.history[0]
    first = losses[0]
    out = next(t for t, loss in enumerate(losses) if abs(loss - first) > WARMUP_GATE * first)
    factors = history["update_schedule/accel"]
    # The step whose loss left the band already takes its hyper-update at 1, as do all after it.
    assert out > 6 and factors[:out] == [factor(k) for k in range(out)]
    assert all(f == 1.0 for f in factors[out:])
    assert opt.hyper_state["stall"] == {"first": first, "stalled": False}


def test_warmup_accel_one_is_the_plain_warmup_and_an_early_move_never_accelerates():
    """warmup_accel=1 keeps no state and records nothing; a run whose loss leaves the band at its
    second step never accelerates, and is bit for bit the plain warm-up."""
    weights, lrs = [], []
    for accel in (1.0, 1.5):
        prob = Regression()
        opt = _adam(prob, lr=0.05, warmup_accel=accel)  # the loss falls at once
        _run(opt, prob, 15)
        weights.append(prob.w.detach().clone())
        lrs.append(opt.history[0]["lr"])
        if accel == 1.5:
            assert set(opt.history[0]["update_schedule/accel"]) == {1.0}
    assert torch.equal(weights[0], weights[1]) and lrs[0] == lrs[1]


def test_a_closure_without_a_loss_never_accelerates():
    """torch's step() without a closure (the loss computed outside): nothing to gate on."""
    prob = Regression()
    opt = _adam(prob)
    for _ in range(5):
        opt.zero_grad()
        prob.train().backward()
        opt.step()
    assert opt.history[0]["update_schedule/accel"] == [1.0] * 5
    assert opt.hyper_state["stall"] == {"first": None, "stalled": False}


@pytest.mark.parametrize("scale", [1e-3, 1e4])
def test_the_trajectory_ignores_the_loss_scale(scale):
    """The band is relative and Adam's hyper-step normalised: scaling the training and validation
    losses by c leaves the learned learning rates unchanged, to rounding (with both Adams'
    epsilon at 0: at 1e-8 it is a few percent of these hypergradients of about 1e-6)."""
    def adam(groups):
        return torch.optim.Adam(groups, lr=0.05, eps=0.0)

    runs = []
    for c in (1.0, scale):
        prob = Regression(scale=c)
        opt = _adam(prob, hyper_optimizer=adam, eps=0.0)
        _run(opt, prob, 30)
        runs.append(opt.history[0])
    assert runs[0]["update_schedule/accel"] == runs[1]["update_schedule/accel"]
    assert runs[0]["update_schedule/accel"][9] == 8.0  # it did accelerate, then stopped
    assert 1.0 in runs[0]["update_schedule/accel"][7:]
    torch.testing.assert_close(torch.tensor(runs[1]["lr"], dtype=torch.float64),
                               torch.tensor(runs[0]["lr"], dtype=torch.float64),
                               rtol=1e-9, atol=0)


def test_sgd_accelerates_at_its_momentum_pace():
    """IFTOptimizer's warm-up at momentum 0.5 takes a hyper-update every other step; the factor
    counts hyper-updates, not steps."""
    prob = Regression()
    opt = IFTOptimizer([prob.w], lr=1e-6, momentum=0.5, tune=("lr",), lookback=1,
                       reactive_decrease=False, val_closure=prob.val)
    _run(opt, prob, 12)
    history = opt.history[0]
    assert history["step"] == [2.0 * k for k in range(1, 7)]
    assert history["update_schedule/accel"] == [factor(k) for k in range(6)]


def test_a_failing_step_leaves_the_stall_and_the_hyper_optimizer_as_they_were():
    prob = Regression()
    opt = _adam(prob)
    _run(opt, prob, 4)
    before = {"stall": dict(opt.hyper_state["stall"]),
              "warmup": {k: list(v) if isinstance(v, list) else v
                         for k, v in opt.hyper_state["warmup"].items()},
              "w": prob.w.detach().clone(), "lr": opt.param_groups[0]["lr"]}

    def failing():
        raise RuntimeError("validation failed")

    with pytest.raises(RuntimeError, match="validation failed"):
        opt.step(prob.closure(opt), val_closure=failing)
    assert opt.hyper_state["stall"] == before["stall"]
    assert opt.hyper_state["warmup"] == before["warmup"]
    assert torch.equal(prob.w, before["w"]) and opt.param_groups[0]["lr"] == before["lr"]
    assert [g["lr"] for g in opt._hyper_opt.param_groups] == [0.05]
    assert "_accel_scale" not in opt.__dict__
    # And the run goes on as if the failure had not happened.
    ref = Regression()
    ref_opt = _adam(ref)
    _run(ref_opt, ref, 6)
    _run(opt, prob, 2)
    assert torch.equal(prob.w, ref.w) and opt.history == ref_opt.history


def test_resume_mid_acceleration_is_exact():
    a = Regression()
    opt = _adam(a)
    _run(opt, a, 8)
    assert opt.hyper_state["stall"]["stalled"] and opt.history[0]["update_schedule/accel"][-1] > 4
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    b = Regression()
    with torch.no_grad():
        b.w.copy_(a.w)
    opt2 = _adam(b)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    _run(opt, a, 22)
    _run(opt2, b, 22)
    assert not opt.hyper_state["stall"]["stalled"]  # it ended after the resume
    assert torch.equal(a.w, b.w) and opt2.history == opt.history
    assert opt2.hyper_state["stall"] == opt.hyper_state["stall"]


def test_state_dicts_without_the_stall_resume_unaccelerated_and_malformed_ones_are_refused():
    prob = Regression()
    plain = _adam(prob, warmup_accel=1.0)
    _run(plain, prob, 3)
    fresh = _adam(Regression())
    fresh.load_state_dict(plain.state_dict())  # saved without acceleration (or before it)
    assert fresh.hyper_state["stall"] == {"first": None, "stalled": False}
    back = _adam(Regression(), warmup_accel=1.0)
    back.load_state_dict(fresh.state_dict())
    assert "stall" not in back.hyper_state
    for bad in ({"first": None}, {"first": "1", "stalled": True}, {"first": 1.0, "stalled": 1},
                {"first": math.nan, "stalled": True}, [1.0, True]):
        sd = fresh.state_dict()
        sd["hyper_state"]["stall"] = bad
        with pytest.raises(ValueError, match=r"hyper_state\['stall'\] is malformed"):
            fresh.load_state_dict(sd)
    assert fresh.hyper_state["stall"] == {"first": None, "stalled": False}  # nothing loaded


@pytest.mark.parametrize("value", [0.5, 0.0, math.inf, math.nan, "1.5", True])
def test_a_bad_warmup_accel_is_refused(value):
    prob = Regression()
    with pytest.raises(ValueError, match="warmup_accel"):
        _adam(prob, warmup_accel=value)


# ----------------------------------------------------------------- across real ranks
def _ranked(rank: int, world: int) -> slice:
    n = Regression().x.shape[0]
    return slice(rank * n // world, (rank + 1) * n // world)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        prob = Regression()
        opt = _adam(prob)
        _run(opt, prob, 30, _ranked(rank, world))
        torch.save({"w": prob.w.detach().clone(), "history": opt.history,
                    "stall": opt.hyper_state["stall"]}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_every_rank_reads_the_mean_loss_and_accelerates_alike():
    """Rank 0 holds the rows whose own loss leaves the band at once, rank 1 the rest: each rank
    gates on the loss's mean over the ranks (it rides in the step's agreement, though
    reactive_decrease is off), so both follow the single-process run on all rows."""
    world = 2
    ref = Regression()
    ref_opt = _adam(ref)
    halves: list[list[float]] = [[], []]

    def closure():
        ref_opt.zero_grad()
        for r, part in enumerate(halves):
            part.append(ref.train(_ranked(r, world)).item())
        loss = ref.train()
        loss.backward()
        return loss

    stalls = [ift_schedule.new_stall() for _ in range(3)]
    exits = [None, None, None]
    for t in range(30):
        loss = ref_opt.step(closure).item()
        for k, value in enumerate((halves[0][-1], halves[1][-1], loss)):
            stalls[k] = ift_schedule.watch_stall(stalls[k], value)
            if not stalls[k]["stalled"] and exits[k] is None:
                exits[k] = t
    # The premise: gated on its own rows' loss, rank 0 would stop accelerating steps before the
    # run on all rows does (and rank 1 would not).
    assert exits[0] is not None and exits[2] is not None and exits[0] < exits[2], exits
    assert exits[1] != exits[0]
    assert max(ref_opt.history[0]["update_schedule/accel"]) == 8.0  # it did accelerate
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), tmp), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True)
                 for r in range(world)]
    assert torch.equal(ranks[0]["w"], ranks[1]["w"])
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["stall"] == ranks[1]["stall"]
    assert ranks[0]["history"][0]["update_schedule/accel"] == \
        ref_opt.history[0]["update_schedule/accel"]
    torch.testing.assert_close(ranks[0]["w"], ref.w.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", [IFTOptimizer, IFTAdam])
def test_a_start_far_below_the_lr_bound_is_not_reported_as_divergence(cls):
    """IFT's guard bounds a hyper-update's step with every learning rate at the top of
    ``lr_bounds`` (1 by default). That worst case is not a learning rate the run reached: a start
    below 1e-4 (1e4x under it) was reported as divergent at its first hyper-update. The run's
    own growth still is (a sign step of a decade per step below, 1e-8 to above 1e-2)."""
    from hyperoptim.ift import SignSGD

    for hyper_lr, expected in ((0.05, False), (1.0, True)):
        prob = Regression()
        sign = dict(hyper_optimizer=SignSGD, update_schedule="fixed", update_interval=1)
        opt = cls([prob.w], lr=1e-8, tune=("lr",), lookback=1, hyper_lr=hyper_lr,
                  **(sign if hyper_lr == 1.0 else {}), val_closure=prob.val)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _run(opt, prob, 8)
        messages = [str(w.message) for w in caught]
        assert any("training looks divergent" in m for m in messages) == expected, messages
        assert (opt.param_groups[0]["lr"] > 1e-2) == expected  # the premise: it grew or not
