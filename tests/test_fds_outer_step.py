"""FDS's outer step: the log-space step (``outer_step="log"``, the default) and the paper's additive
one (``"additive"``): the rule, scale invariance, a start 100x too small, bounds, resuming."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fds import NAMES, Problem
from torch.nn import functional as F

from hyperoptim import FDSSGD, FDSAdam
from hyperoptim.core.base import LEARNED_LIMIT
from hyperoptim.core.warn import HyperoptimWarning
from hyperoptim.methods.fds import LOG_STEP, LOG_STEP_MAX
from hyperoptim.methods.fds_outer import (
    EDGE_RATIO,
    FAR_STEP_MAX,
    LINEAR_RATIO,
    LOST_BACK_OFF,
    STABLE_GAIN,
    STABLE_SHARE,
    far_step,
)
from hyperoptim.rules.sgd import sgd_edge


class Scaled(Problem):
    """:class:`Problem` with its training loss multiplied by ``scale``, and with ``both`` its
    validation loss too: the learning rate that suits it is ``1 / scale`` times the original's.
    Only the training loss (``both=False``) is a validation loss on another scale, as a
    training loss summed over its batch and a validation loss averaged give."""

    def __init__(self, scale: float = 1.0, seed: int = 0, both: bool = False):
        super().__init__(seed=seed)
        self.scale = scale
        self.both = both

    def train_loss(self, p, t):
        return self.scale * super().train_loss(p, t)

    def val_loss(self, p):
        return (self.scale if self.both else 1.0) * super().val_loss(p)


def exact_stable_rate(prob: Problem, momentum: float, weight_decay: float = 0.0) -> float:
    """Heavy-ball SGD's largest stable learning rate on the validation loss at the live
    weights, from its exact Hessian: 2 (1 + m) / (lambda_max + c)."""
    names = list(prob.live)
    shapes = [prob.live[k].shape for k in names]
    flat = torch.cat([prob.live[k].detach().reshape(-1) for k in names])

    def loss(v: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for k, shape in zip(names, shapes, strict=True):
            n = math.prod(shape)
            parts[k] = v[i : i + n].reshape(shape)
            i += n
        return prob.val_loss(parts)

    top = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat)).max().item()
    return 2.0 * (1.0 + momentum) / (top + weight_decay)


def aimed(stable: float, lr: float) -> float | None:
    """The documented far step read by the curvature: to a third of the stable rate, at most
    two decades; None (Rprop's own step) below Rprop's first step."""
    aim = math.log(STABLE_SHARE * stable / lr)
    return min(aim, FAR_STEP_MAX) if aim >= LOG_STEP else None


def run(prob: Problem, opt: FDSSGD, episodes: int) -> None:
    for _ in range(episodes):
        prob.reset()
        prob.episode(opt)


def _ratio(start_loss: float, end_loss: float, lrs: list[float], hs: list[float]) -> float:
    """The documented linear-regime ratio (LINEAR_RATIO), from the test's own numbers."""
    return -sum(a * h for a, h in zip(lrs, hs, strict=True)) / (start_loss - end_loss)


@pytest.mark.parametrize("lr", [0.05, 0.3, 0.5])
def test_the_default_is_the_log_step_and_the_additive_step_is_the_papers(lr):
    """A factor against the hypergradient's sign: where the episode was far below its learning
    rate (the ratio of LINEAR_RATIO, from the validation loss at the episode's initial weights)
    and gained STABLE_GAIN of its start loss, to a third of SGD's stable rate at the end weights
    (the exact Hessian's, here), else Rprop's first factor of 2; the paper's additive step moves
    by 0.1."""
    prob, other = Problem(), Problem()
    start_loss = prob.val_loss(prob.live).item()
    log = prob.optimizer(horizon=4, lr=lr, tune=("lr",))
    additive = other.optimizer(horizon=4, lr=lr, tune=("lr",), outer_step="additive")
    assert log.param_groups[0]["outer_step"] == "log"
    assert "outer_step: log" in repr(log)
    end_loss = prob.episode(log).item()
    other.episode(additive)
    h = log.history[0]["hypergrad/lr"][0][0]
    assert h != 0
    ratio = _ratio(start_loss, end_loss, [lr], [h])
    far = ratio >= LINEAR_RATIO
    assert far == (lr == 0.05)  # this problem: 0.05 is far below its rate; 0.3, 0.5 are not
    stable = log.history[0]["stable_lr"][0]
    if far:
        assert start_loss - end_loss >= STABLE_GAIN * start_loss  # trained: the curvature read
        assert stable == pytest.approx(exact_stable_rate(prob, 0.0), rel=1e-6)
        step = aimed(stable, lr)
        assert step is not None
    else:
        assert stable == 0.0  # not read
        step = None
    factor = math.exp(step) if step is not None else math.exp(-math.copysign(LOG_STEP, h))
    assert log.schedule("lr") == [lr * factor]
    assert additive.schedule("lr") == [lr - math.copysign(0.1, h)]
    # After a far step Rprop starts afresh: its first step, the sign forgotten.
    assert log.history[0]["log_step/lr"] == [[LOG_STEP]]
    assert log.hyper_state["outer"][0]["lr"]["sign"] == [0.0 if far else math.copysign(1.0, h)]
    assert "log_step/lr" not in additive.history[0] and "backtracked" not in additive.history[0]


def test_without_a_constructor_val_closure_the_sign_rule_alone():
    """The start loss needs the validation closure at the episode's first step: given only to
    hyperstep(), nothing is measured and the first step is Rprop's factor of 2."""
    prob = Problem()
    opt = prob.optimizer(horizon=4, lr=0.05, tune=("lr",), val_closure=None)
    for t in range(4):
        opt.step(prob.closure(opt, t))
    opt.hyperstep(lambda: prob.val_loss(prob.live))
    h = opt.history[0]["hypergrad/lr"][0][0]
    assert "start_loss" not in opt.hyper_state
    assert opt.schedule("lr") == [0.05 * math.exp(-math.copysign(LOG_STEP, h))]


def test_far_below_its_rate_two_episodes_cross_more_than_a_decade():
    """Training loss times 100 from lr 3e-5: the first episode, deep in the linear regime, steps
    up a decade, the second again by more than Rprop's growth (x2 then x4 before the rule). The
    saturation model's steps: the validation loss is not on the training loss's scale, so its
    curvature is not read (and the run says so)."""
    prob = Scaled(100.0, seed=5)
    opt = prob.optimizer(horizon=6, lr=3e-5, lr_windows=2, tune=("lr",))
    run(prob, opt, 1)
    assert opt.schedule("lr") == pytest.approx([3e-4, 3e-4], rel=1e-12)
    with pytest.warns(HyperoptimWarning, match="more than 4x apart"):
        run(prob, opt, 1)
    assert min(opt.schedule("lr")) > 3e-5 * 10 * 4
    assert opt.history[0]["stable_lr"] == [0.0, 0.0]


@pytest.mark.parametrize("value", ["exp", "Log", 1, None])
def test_an_invalid_outer_step_is_refused(value):
    prob = Problem()
    with pytest.raises(ValueError, match="Invalid outer_step value"):
        prob.optimizer(horizon=2, outer_step=value)
    opt = prob.optimizer(horizon=2)
    opt.param_groups[0]["outer_step"] = value
    with pytest.raises(ValueError, match="Invalid outer_step value"):
        opt.step(prob.closure(opt, 0))


def test_a_checkpoint_saved_before_outer_step_resumes_with_the_additive_step():
    prob = Problem()
    opt = prob.optimizer(horizon=3, lr=0.1, outer_step="additive")
    prob.episode(opt)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["outer_step"]
    fresh = Problem().optimizer(horizon=3)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["outer_step"] == "additive"


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(-6, 10))
def test_scaling_the_loss_scales_the_learned_learning_rates_exactly(k):
    """The log step reads signs, compares losses and reads the curvature: with the training and
    validation losses times 2**k and the start divided by 2**k, every learned learning rate is
    the original's divided by 2**k, bit for bit (powers of two scale floats exactly; the
    curvature by 2**k), backtracking included."""
    c = 2.0**k
    kwargs = dict(horizon=5, lr_windows=2, tune=("lr",), momentum=0.5)
    one, scaled = Scaled(1.0, seed=3, both=True), Scaled(c, seed=3, both=True)
    a = one.optimizer(lr=0.02, **kwargs)
    b = scaled.optimizer(lr=0.02 / c, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HyperoptimWarning)  # the divergence watch, both alike
        run(one, a, 7)
        run(scaled, b, 7)
    for x, y in zip(a.history[0]["lr"], b.history[0]["lr"], strict=True):
        assert [v / c for v in x] == y
    assert a.history[0]["backtracked"] == b.history[0]["backtracked"]


def test_from_a_start_100x_too_small_the_log_step_learns_in_few_episodes():
    """Losses times 100 (the right learning rate a hundredth of the original's), started 100x
    too small: five episodes of the default step reach a good schedule, where the paper's
    additive step of 0.1 (sized for the original problem) overshoots by decades."""
    results = {}
    for outer_step in ("log", "additive"):
        prob = Scaled(100.0, seed=5, both=True)
        opt = prob.optimizer(horizon=6, lr=3e-5, lr_windows=2, tune=("lr",),
                             outer_step=outer_step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HyperoptimWarning)
            run(prob, opt, 6)
        results[outer_step] = opt.history[0]["val_loss"]
    log = results["log"]
    assert min(log[-2:]) < 0.5 * log[0], log
    additive = results["additive"]
    assert not min(additive[-2:]) < 0.5 * additive[0], additive


def replay(hist: dict, start: float, n: int, start_loss: float) -> tuple[int, int]:
    """The documented log step on the recorded hypergradients and validation losses (``lr``
    alone tuned; every episode from the same weights, whose validation loss is ``start_loss``);
    returns how many backtracks it saw, and how many repeated raises it did not grow."""
    value, s, sign = [start] * n, [LOG_STEP] * n, [0.0] * n
    prev: list[float] | None = None
    ref = None
    backs = held = 0
    for hs, loss, back, recorded, stable in zip(hist["hypergrad/lr"], hist["val_loss"],
                                                hist["backtracked"], hist["lr"],
                                                hist["stable_lr"], strict=True):
        worse = prev is not None and ref is not None and loss > ref
        assert back == float(worse)
        if worse:
            backs += 1
            s = [x / 2 for x in s]
            sign = [0.0] * n
            value = [p * math.exp(-x) for p, x in zip(prev, s, strict=True)]  # probe below
        else:
            prev, ref = list(value), loss
            ratio = _ratio(start_loss, loss, value, hs) if start_loss > loss else None
            far = ratio is not None and ratio >= LINEAR_RATIO
            # The curvature is read exactly where a far step follows a trained episode.
            assert (stable > 0) == (far and start_loss - loss >= STABLE_GAIN * start_loss)
            step = far_step(ratio) if far else None
            if stable > 0:
                step = aimed(stable, max(prev))
            # Near or past its best: a repeated raise keeps its step (no growth).
            near = ratio is not None and (ratio <= 0 or (stable > 0 and step is None))
            for k, h in enumerate(hs):
                if step is not None and h < 0:  # the far step up; Rprop afresh
                    value[k] *= math.exp(step)
                    s[k], sign[k] = LOG_STEP, 0.0
                    continue
                sg = float((h > 0) - (h < 0))
                if sg * sign[k] < 0:
                    s[k] /= 2
                elif sg * sign[k] > 0 and near and sg < 0:
                    held += 1
                elif sg * sign[k] > 0:
                    s[k] = min(2 * s[k], LOG_STEP_MAX)
                sign[k] = sg
                value[k] *= math.exp(-sg * s[k])
        assert recorded == value
    return backs, held


@pytest.mark.parametrize("start_loss_known", [True, False], ids=["linear_test", "sign_rule"])
def test_the_log_step_follows_its_documented_rule(start_loss_known):
    """The replay of the documented rule matches the recorded schedules: with the constructor's
    val_closure (the start loss measured: decades while far below the rate), and with it given
    only to hyperstep() (Rprop's sign rule alone, up to its cap)."""
    prob = Problem(seed=4)
    start_loss = prob.val_loss(prob.live).item()
    opt = prob.optimizer(horizon=6, lr=1e-3, lr_windows=2, tune=("lr",),
                         **({} if start_loss_known else {"val_closure": None}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HyperoptimWarning)
        for _ in range(10):
            prob.reset()
            for t in range(opt.horizon):
                opt.step(prob.closure(opt, t))
            opt.hyperstep(lambda: prob.val_loss(prob.live))
    hist = opt.history[0]
    known = start_loss if start_loss_known else -math.inf
    backs, _ = replay(hist, 1e-3, 2, known)
    assert backs > 0  # the replay exercised a backtrack
    steps = [x for s in hist["log_step/lr"] for x in s]
    if start_loss_known:  # a first outer step of a decade (lr 1e-3 is far below this rate)
        assert hist["lr"][0] == pytest.approx([1e-2, 1e-2], rel=1e-12)
    else:
        assert max(steps) == LOG_STEP_MAX  # the growth's cap
    assert opt.hyper_state["outer"][0]["lr"]["log_step"] == hist["log_step/lr"][-1]


def test_a_raise_near_its_best_keeps_its_step_a_fall_still_grows():
    """Rprop's growth on a repeated sign applies to a raise of the learning rate only where the
    episode does not read the rate near or past its best: with ``near`` a window that asks for
    more again keeps its log step (x2, not x4), one that asks for less again still doubles its
    step. On a real run the replay of the rule (rho
    <= 0, or a far step the curvature declined) matches the recorded schedules, holds included."""
    opt, group = _adam(lr=0.1)
    opt._sign_update(0, group, {"lr": [-1.0, 1.0]})  # x2 up, /2 down
    assert group["lr_schedule"] == pytest.approx([0.2, 0.05], rel=1e-12)
    opt._sign_update(0, group, {"lr": [-1.0, 1.0]}, near=True)
    assert group["lr_schedule"] == pytest.approx([0.4, 0.0125], rel=1e-12)  # x2 kept; /4 grown
    assert opt.hyper_state["outer"][0]["lr"]["log_step"] == pytest.approx(
        [LOG_STEP, 2 * LOG_STEP], rel=1e-12)
    opt._sign_update(0, group, {"lr": [-1.0, 1.0]})  # not near: the raise grows again
    assert group["lr_schedule"][0] == pytest.approx(1.6, rel=1e-12)

    prob = Problem(seed=5)
    start_loss = prob.val_loss(prob.live).item()
    opt = prob.optimizer(horizon=6, lr=0.3, lr_windows=2, tune=("lr",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HyperoptimWarning)
        for _ in range(10):
            prob.reset()
            prob.episode(opt)
    backs, held = replay(opt.history[0], 0.3, 2, start_loss)
    assert held > 0 and backs > 0


def test_a_non_finite_first_episode_divides_the_learning_rates_by_a_hundred():
    prob = Problem()
    opt = prob.optimizer(horizon=3, lr=0.1, lr_windows=3, tune=("lr", "momentum"))
    for t in range(3):
        opt.step(prob.closure(opt, t))
    with pytest.warns(HyperoptimWarning, match="non-finite validation loss"):
        opt.hyperstep(lambda: prob.val_loss(prob.live) * float("inf"))
    assert opt.schedule("lr") == [0.1 / LOST_BACK_OFF] * 3 and LOST_BACK_OFF == 100
    assert opt.schedule("momentum") == [0.0]
    assert opt.history[0]["skipped"] == [1.0] and opt.skipped_steps == 1
    assert opt.history[0]["log_step/lr"] == [[LOG_STEP] * 3]  # recorded every hyperstep


def test_a_non_finite_episode_after_a_step_undoes_it():
    prob = Problem()
    opt = prob.optimizer(horizon=3, lr=0.1, lr_windows=3, tune=("lr", "momentum"))
    prob.episode(opt)
    before = {n: opt.schedule(n) for n in NAMES}
    prob.reset()
    for t in range(3):
        opt.step(prob.closure(opt, t))
    with pytest.warns(HyperoptimWarning, match="put the schedules back"):
        opt.hyperstep(lambda: prob.val_loss(prob.live) * float("nan"))
    assert before != {n: opt.schedule(n) for n in NAMES}
    # Back to the first episode's values, the learning rate probing below by the halved step
    # (Rprop's first: a decade far below the rate leaves Rprop starting afresh).
    assert opt.schedule("momentum") == [0.0]
    assert opt.schedule("lr") == [0.1 * math.exp(-LOG_STEP / 2)] * 3
    assert opt.history[0]["backtracked"] == [0.0, 1.0]


def test_learned_values_stay_within_their_bounds():
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = FDSSGD([w], horizon=1, lr=0.9 * LEARNED_LIMIT, weight_decay=1e-3, tune=("lr",
                 "weight_decay"), val_closure=lambda: (w**2).sum())
    group = opt.param_groups[0]
    for _ in range(6):  # more learning rate and weight decay, every time: the growth compounds
        opt._sign_update(0, group, {"lr": [-1.0], "weight_decay": [-1.0]})
    assert group["lr_schedule"] == [LEARNED_LIMIT]
    assert 0 < group["weight_decay_schedule"][0] <= LEARNED_LIMIT
    for _ in range(400):  # less, every time: positive values stay positive, never below 0
        opt._sign_update(0, group, {"lr": [1.0], "weight_decay": [1.0]})
    assert group["lr_schedule"][0] > 0 and group["weight_decay_schedule"][0] >= 0
    adam = FDSAdam([w], horizon=1, betas=(0.9, 0.999), tune=("lr", "beta1", "beta2"),
                   val_closure=lambda: (w**2).sum())
    group = adam.param_groups[0]
    for _ in range(40):
        adam._sign_update(0, group, {"lr": [-1.0], "beta1": [-1.0], "beta2": [-1.0]})
    assert group["lr_schedule"] == [LEARNED_LIMIT]
    assert all(0.0 <= b <= 1.0 - 1e-6 for n in ("beta1", "beta2") for b in group[f"{n}_schedule"])


def test_checkpoint_mid_run_resumes_the_log_step_exactly():
    kwargs = dict(horizon=5, lr=2e-3, momentum=0.5, lr_windows=2)
    ref = Problem(seed=4)
    opt = ref.optimizer(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HyperoptimWarning)
        run(ref, opt, 4)
        ref.reset()
        for t in range(3):
            opt.step(ref.closure(opt, t))
        assert "prev" in opt.hyper_state["outer"][0]["lr"]
        buffer = io.BytesIO()
        torch.save({"opt": opt.state_dict(), "model": {k: v.detach().clone()
                                                         for k, v in ref.live.items()}}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        resumed = Problem(seed=4)
        opt2 = resumed.optimizer(**{**kwargs, "lr": 0.3})
        with torch.no_grad():
            for k, v in resumed.live.items():
                v.copy_(saved["model"][k])
        opt2.load_state_dict(saved["opt"])
        for o, prob in ((opt, ref), (opt2, resumed)):
            for t in range(3, 5):
                o.step(prob.closure(o, t))
            o.hyperstep()
            run(prob, o, 3)
    assert opt2.history == opt.history
    assert opt2.hyper_state == opt.hyper_state
    assert [opt2.schedule(n) for n in NAMES] == [opt.schedule(n) for n in NAMES]


def test_a_momentum_stepped_in_log_one_minus_momentum_stays_in_its_range():
    """The hook a subclass can set (``log1m_names``; ``benchmarks/fds_outer_step.py``'s
    ``log-mu``): factors of 1 - momentum, a decrease stopping at 0, never reaching 1."""
    cls = type("LogMomentum", (FDSSGD,), {"log1m_names": ("momentum",)})
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = cls([w], horizon=1, lr=0.1, momentum=0.5, tune=("momentum",),
              val_closure=lambda: (w**2).sum())
    group = opt.param_groups[0]
    opt._sign_update(0, group, {"momentum": [-1.0]})  # more momentum: 1 - b halves
    assert group["momentum_schedule"] == [0.75]
    for _ in range(60):
        opt._sign_update(0, group, {"momentum": [-1.0]})
    assert group["momentum_schedule"] == [1.0 - 1e-6]
    for _ in range(60):
        opt._sign_update(0, group, {"momentum": [1.0]})
    assert group["momentum_schedule"] == [0.0]


def _adam(lr: float = 1e-5) -> tuple[FDSAdam, dict]:
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = FDSAdam([w], horizon=2, lr=lr, lr_windows=2, tune=("lr",),
                  val_closure=lambda: (w**2).sum())
    return opt, opt.param_groups[0]


def test_fdsadam_grows_a_far_step_repeated_in_the_linear_regime_fdssgd_does_not():
    """FDSAdam (``far_growth`` 2): a window whose last step was a far step, asked for a full
    decade again, doubles it in log space, up to two decades; a far step short of a decade is
    the model's, and a window that takes Rprop's step forgets its far step. FDSSGD's far steps
    stay at a decade."""
    opt, group = _adam()
    up = {"lr": [-1.0, -1.0]}
    opt._sign_update(0, group, up, far=LOG_STEP_MAX)  # the first: a decade
    assert group["lr_schedule"] == pytest.approx([1e-4] * 2, rel=1e-12)
    assert opt.hyper_state["outer"][0]["lr"]["far"] == [LOG_STEP_MAX] * 2
    opt._sign_update(0, group, up, far=LOG_STEP_MAX)  # repeated: two decades
    assert group["lr_schedule"] == pytest.approx([1e-2] * 2, rel=1e-12)
    opt._sign_update(0, group, up, far=LOG_STEP_MAX)  # capped at two
    assert group["lr_schedule"] == pytest.approx([1.0] * 2, rel=1e-12)
    # Below the linear regime the model's step, whatever came before.
    opt._sign_update(0, group, up, far=far_step(0.75))
    assert group["lr_schedule"] == pytest.approx([math.exp(far_step(0.75))] * 2, rel=1e-12)
    # A window that asks for less takes Rprop's step and forgets its far step.
    opt._sign_update(0, group, {"lr": [-1.0, 1.0]}, far=LOG_STEP_MAX)
    assert opt.hyper_state["outer"][0]["lr"]["far"] == [far_step(0.75) * 2, 0.0]
    # An Rprop step (no far step) resets it too.
    opt._sign_update(0, group, up)
    assert opt.hyper_state["outer"][0]["lr"]["far"] == [0.0, 0.0]
    sgd = FDSSGD([torch.nn.Parameter(torch.ones(2, dtype=torch.float64))], horizon=1, lr=1e-5,
                 tune=("lr",), val_closure=lambda: torch.zeros(()))
    for _ in range(2):
        sgd._sign_update(0, sgd.param_groups[0], {"lr": [-1.0]}, far=LOG_STEP_MAX)
    assert sgd.schedule("lr") == pytest.approx([1e-3], rel=1e-12)
    assert "far" not in sgd.hyper_state["outer"][0]["lr"]


def test_fdsadam_far_step_growth_end_to_end_and_resumed():
    """From a start far below its rate (the loss scaled up 1e4 for FDSAdam's lr 1e-6), two
    episodes in the linear regime step the learning rate by a decade, then by two; the state
    that says so survives a checkpoint, and a reverted step forgets it."""
    prob = Problem(seed=5)
    kwargs = dict(horizon=6, lr=1e-7, lr_windows=1, tune=("lr",),
                  val_closure=lambda: prob.val_loss(prob.live))
    opt = FDSAdam(list(prob.live.values()), **kwargs)
    run(prob, opt, 1)
    assert opt.schedule("lr") == pytest.approx([1e-6], rel=1e-12)
    saved = opt.state_dict()
    other = FDSAdam(list(prob.live.values()), **{**kwargs, "lr": 0.5})
    other.load_state_dict(saved)
    assert other.hyper_state["outer"] == opt.hyper_state["outer"]
    run(prob, opt, 1)
    assert opt.schedule("lr") == pytest.approx([1e-4], rel=1e-12)
    run(prob, other, 1)
    assert other.schedule("lr") == opt.schedule("lr")


def test_an_episode_that_gains_nothing_is_lost():
    """Under the log step a finite episode whose validation loss ends at or above where it
    started is treated as a non-finite one: the first divides the learning rates by 100, a later
    one undoes the step before it. The additive step (the paper's) does not read it."""
    prob, other = Problem(), Problem()
    log = prob.optimizer(horizon=3, lr=0.1, lr_windows=3, momentum=0.5, tune=("lr", "momentum"))
    additive = other.optimizer(horizon=3, lr=0.1, lr_windows=3, momentum=0.5,
                               tune=("lr", "momentum"), outer_step="additive")
    for opt, p in ((log, prob), (additive, other)):
        for t in range(3):
            opt.step(p.closure(opt, t))
        # The same hypergradients, the loss lifted above the episode's start.
        opt.hyperstep(lambda p=p: p.val_loss(p.live) + 100.0)
    assert log.schedule("lr") == [0.1 / LOST_BACK_OFF] * 3 and log.schedule("momentum") == [0.5]
    assert log.history[0]["skipped"] == [0.0] and log.skipped_steps == 0
    assert log.history[0]["lost"] == [1.0] and "lost" not in additive.history[0]
    assert "val_loss_ref" not in log.hyper_state
    assert additive.schedule("lr") != [0.1] * 3  # moved by the paper's rule as before
    # From lr 0 (the constructor's default) an episode gains nothing by itself: not lost.
    zp = Problem()
    zero = zp.optimizer(horizon=3, tune=("lr",))
    zero_start = zp.val_loss(zp.live).item()
    assert zp.episode(zero).item() == zero_start  # lr 0: nothing moved
    assert zero.schedule("lr") != [0.0] and zero.schedule("lr")[0] > 0
    # A step, then an episode that gains nothing: the step is undone.
    prob.reset()
    prob.episode(log)
    before = log.schedule("lr")
    prob.reset()
    for t in range(3):
        log.step(prob.closure(log, t))
    log.hyperstep(lambda: prob.val_loss(prob.live) + 100.0)
    assert log.history[0]["backtracked"][-1] == 1.0
    assert log.history[0]["lost"] == [1.0, 0.0, 1.0]
    assert log.schedule("lr") != before and log.schedule("momentum") == [0.5]


def test_a_momentum_step_under_the_log_step_goes_at_most_halfway_to_one():
    """The momentum keeps the additive step but stays below 1 under ``outer_step="log"``: a
    step up goes at most halfway to 1 (0.9 + 0.15 would be 1.05, where heavy ball diverges).
    The paper's additive step is unchanged."""
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))

    def make(**kw):
        opt = FDSSGD([w], horizon=1, lr=0.1, momentum=0.9, tune=("momentum",),
                     val_closure=lambda: (w**2).sum(), **kw)
        return opt, opt.param_groups[0]

    opt, group = make()
    more, less = {"momentum": [-1.0]}, {"momentum": [1.0]}
    opt._sign_update(0, group, more)
    assert group["momentum_schedule"] == [0.95]
    opt._sign_update(0, group, more)
    assert group["momentum_schedule"] == [0.975]
    for _ in range(60):
        opt._sign_update(0, group, more)
    assert group["momentum_schedule"][0] < 1.0
    group["momentum_schedule"] = [0.05]
    opt.hyper_state["outer"][0]["momentum"]["step_size"] = [0.15]
    opt.hyper_state["outer"][0]["momentum"]["sign"] = [0.0]
    opt._sign_update(0, group, less)  # below 0 as the paper's step (its ranges include it)
    assert group["momentum_schedule"] == [pytest.approx(-0.1)]
    paper, group = make(outer_step="additive")
    paper._sign_update(0, group, more)
    assert group["momentum_schedule"] == [pytest.approx(1.05)]


def test_at_the_edge_of_stability_only_the_learning_rate_moves_and_down():
    """|rho| > EDGE_RATIO (the end loss far more sensitive to the learning rates' scale than
    the episode's gain): every learning-rate window steps down by Rprop's step whatever its
    sign, the momentum holds; the same hypergradients with a real gain move both."""
    results = {}
    for gain in (1e-9, None):
        prob = Problem()
        start = prob.val_loss(prob.live).item()
        opt = prob.optimizer(horizon=3, lr=0.1, lr_windows=3, momentum=0.5,
                             tune=("lr", "momentum"))
        for t in range(3):
            opt.step(prob.closure(opt, t))

        def val(prob=prob, gain=gain, start=start):
            v = prob.val_loss(prob.live)
            return v if gain is None else v - v.detach() + (start - gain)

        opt.hyperstep(val)
        hs = opt.history[0]["hypergrad/lr"][0]
        results[gain] = opt
        if gain is not None:
            assert abs(_ratio(start, start - gain, [0.1] * 3, hs)) > EDGE_RATIO
            assert opt.schedule("lr") == [0.1 * math.exp(-LOG_STEP)] * 3
            assert opt.schedule("momentum") == [0.5]
            assert opt.hyper_state["outer"][0]["lr"]["prev"] == [0.1] * 3
    assert results[None].schedule("momentum") != [0.5]


def test_maximize_learns_the_schedules_of_minimising_the_negated_losses():
    """The log step compares the objective the hypergradients descend: with ``maximize=True``
    and every loss negated, the far step, the curvature it reads (of the negated losses), the
    backtracking and the lost-episode test read the same episodes the same way, so the
    schedules match the plain run's over many episodes."""
    kwargs = dict(horizon=5, lr=1e-3, momentum=0.5, lr_windows=2, tune=("lr", "momentum"))
    plain, neg = Problem(seed=4), Problem(seed=4)
    a = plain.optimizer(**kwargs)
    b = neg.optimizer(**kwargs, maximize=True, val_closure=lambda: -neg.val_loss(neg.live))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HyperoptimWarning)
        for _ in range(8):
            for prob, opt, sign in ((plain, a, 1.0), (neg, b, -1.0)):
                prob.reset()
                for t in range(5):
                    opt.step(lambda prob=prob, t=t, sign=sign: sign * prob.train_loss(prob.live, t))
                opt.hyperstep()
    assert max(a.history[0]["lr"][1]) >= 1e-2  # the far step ran
    assert sum(a.history[0]["backtracked"]) >= 1  # and a backtrack
    assert max(a.history[0]["stable_lr"]) > 0  # and the curvature's far step
    for name in ("lr", "momentum", "backtracked", "stable_lr"):
        for x, y in zip(a.history[0][name], b.history[0][name], strict=True):
            assert x == pytest.approx(y, rel=1e-9, abs=1e-15)
    assert b.history[0]["val_loss"] == pytest.approx([-v for v in a.history[0]["val_loss"]])


# ---------------------------------------------------------------------- the curvature's far step
def test_reading_the_curvature_leaves_weights_gradients_and_random_state_alone():
    """The far step's reading of the curvature (20 extra validation gradients at perturbed
    weights) puts the weights back bit for bit, leaves p.grad alone, and draws its dropout
    masks from the state the episode's own validation call drew from: the global generator
    ends where that one call leaves it."""
    # The episode's start loss is a dropout draw too: seeded, so that it reads a far step.
    torch.manual_seed(0)
    prob = Problem()

    def val():
        out = F.dropout(prob.f(prob.live, prob.xv), 0.1, training=True)
        return ((out - prob.yv) ** 2).mean()

    opt = prob.optimizer(horizon=4, lr=0.05, tune=("lr",), val_closure=val)
    for t in range(4):
        opt.step(prob.closure(opt, t))
    weights = {k: v.detach().clone() for k, v in prob.live.items()}
    marks = {k: torch.full_like(v, 7.0) for k, v in prob.live.items()}
    for k, v in prob.live.items():
        v.grad = marks[k].clone()
    torch.manual_seed(11)
    with torch.no_grad():
        val()  # what the episode's own validation call draws
    after_one_call = torch.get_rng_state()
    torch.manual_seed(11)
    opt.hyperstep()
    assert opt.history[0]["stable_lr"][0] > 0  # the curvature was read
    assert torch.equal(torch.get_rng_state(), after_one_call)
    for k, v in prob.live.items():
        assert torch.equal(v.detach(), weights[k]) and torch.equal(v.grad, marks[k])


def test_a_training_loss_on_another_scale_keeps_the_saturation_model_and_says_so():
    """A training loss 100x its validation loss (as a sum over the batch against a mean): the
    validation loss's curvature would put the stable rate 100x too high, so the far step keeps
    the saturation model, with one warning; the run trains as before the curvature's step."""
    prob = Scaled(100.0, seed=5)
    opt = prob.optimizer(horizon=6, lr=3e-5, lr_windows=2, tune=("lr",))
    with pytest.warns(HyperoptimWarning, match="more than 4x apart"):
        run(prob, opt, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HyperoptimWarning)  # said once
        run(prob, opt, 2)
    hist = opt.history[0]
    assert hist["stable_lr"] == [0.0] * 4
    assert all(math.isfinite(v) for v in hist["val_loss"])
    assert hist["val_loss"][-1] < 0.5 * hist["val_loss"][0]


def test_a_rule_without_an_edge_of_stability_never_reads_the_curvature():
    """Adam's step has no edge of stability (its steps are bounded by its rate): FDSAdam's far
    steps keep the saturation model and its growth, and nothing is read."""
    prob = Problem(seed=4)
    opt = FDSAdam(list(prob.live.values()), horizon=6, lr=1e-5, lr_windows=2, tune=("lr",),
                  val_closure=lambda: prob.val_loss(prob.live))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HyperoptimWarning)
        run(prob, opt, 4)
    hist = opt.history[0]
    assert hist["stable_lr"] == [0.0] * 4
    assert max(hist["lr"][-1]) >= 1e-3  # far steps were taken: two decades in four episodes


def test_an_error_while_reading_the_curvature_changes_nothing():
    """The validation closure raising during the curvature's extra calls: hyperstep() raises,
    and the weights, schedules, history and outer state are as before it; the same hyperstep
    then completes as an uninterrupted one does."""
    twin, prob = Problem(), Problem()
    calls = {"n": 0, "fail": None}

    def val():
        calls["n"] += 1
        if calls["n"] == calls["fail"]:
            raise RuntimeError("boom")
        return prob.val_loss(prob.live)

    ref = twin.optimizer(horizon=4, lr=0.05, tune=("lr",))
    opt = prob.optimizer(horizon=4, lr=0.05, tune=("lr",), val_closure=val)
    twin.episode(ref)
    for t in range(4):
        opt.step(prob.closure(opt, t))
    weights = {k: v.detach().clone() for k, v in prob.live.items()}
    snapshot = lambda: copy.deepcopy((opt.schedule("lr"), opt.history, opt.hyper_state))  # noqa: E731
    before = snapshot()
    calls["fail"] = calls["n"] + 6  # inside the Lanczos products
    with pytest.raises(RuntimeError, match="boom"):
        opt.hyperstep()
    assert snapshot() == before
    for k, v in prob.live.items():
        assert torch.equal(v.detach(), weights[k])
    opt.hyperstep()
    assert opt.history[0]["stable_lr"] == ref.history[0]["stable_lr"] != [0.0]
    assert opt.schedule("lr") == ref.schedule("lr")


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_stable_rate_is_the_rules_edge_over_the_curvature_and_the_weight_decay(nesterov):
    """With momentum and weight decay: the stable rate read is SGD's edge at the episode's
    momentum (Nesterov's too) over the validation Hessian's largest eigenvalue (exact, here)
    plus the weight decay, and the far step aims at a third of it."""
    prob = Problem()
    opt = prob.optimizer(horizon=4, lr=0.02, momentum=0.5, weight_decay=1e-3, nesterov=nesterov,
                         tune=("lr",))
    prob.episode(opt)
    stable = opt.history[0]["stable_lr"][0]
    assert stable > 0
    exact = exact_stable_rate(prob, 0.0, 1e-3) / 2.0  # 2 / (lambda + c)
    assert stable == pytest.approx(exact * sgd_edge({"momentum": 0.5}, {"nesterov": nesterov}),
                                   rel=1e-6)
    step = aimed(stable, 0.02)
    assert step is not None and opt.schedule("lr") == pytest.approx([0.02 * math.exp(step)],
                                                                    rel=1e-12)


def test_after_the_back_off_the_next_step_raises_or_holds_the_learning_rate():
    """A lost first episode divides the learning rates by 100, below the stable range on
    purpose: the next outer step holds a window whose hypergradient asks for less (0.3 stays,
    where Rprop would halve it) and raises the others; the momentum moves as ever. The mark
    survives a checkpoint and is cleared after that step."""
    results = []
    for resume in (False, True):
        prob = Problem()
        opt = prob.optimizer(horizon=4, lr=30.0, lr_windows=2, tune=("lr", "momentum"))
        for t in range(4):
            opt.step(prob.closure(opt, t))
        with pytest.warns(HyperoptimWarning, match="non-finite validation loss"):
            opt.hyperstep(lambda prob=prob: prob.val_loss(prob.live) * float("inf"))
        assert opt.schedule("lr") == [0.3, 0.3] and opt.hyper_state["backed_off"] == [0]
        if resume:
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            for p in prob.live.values():
                p.grad = None  # as in a fresh process (a .grad there is one the user prepared)
            opt = prob.optimizer(horizon=4, lr=1.0, lr_windows=2, tune=("lr", "momentum"))
            opt.load_state_dict(torch.load(buffer, weights_only=True))
        prob.reset()
        prob.episode(opt)
        h = opt.history[0]["hypergrad/lr"][-1]
        assert h[0] > 0 > h[1]  # the first window asks for less, the second for more
        assert opt.schedule("lr") == [0.3, 0.6]
        assert opt.schedule("momentum") != [0.0]
        assert opt.hyper_state["backed_off"] == []
        results.append((opt.schedule("lr"), opt.schedule("momentum")))
    assert results[0] == results[1]
