"""The hyper-step policies (hyperoptim.hyperstep) and HD over them: additive bit-identity with the
rule before the policies existed, scale invariance, resume mid-growth, bounds, repr and history."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from hyperoptim import HypergradAdam, HypergradSGD
from hyperoptim.hyperstep import (
    POLICIES,
    AdamLog,
    Additive,
    Growth,
    Multiplicative,
    ScaleFree,
    resolve,
)

# ScaleFree(streak=3): its fast decrease acts within these tests' few steps (the default's 20
# would not).
NORMALISED = [Multiplicative(), Growth(), AdamLog(), ScaleFree(), ScaleFree(accel=1.5),
              ScaleFree(accel=1.5, streak=20), ScaleFree(streak=3)]


class Net:
    """tanh(x W1) W2 against targets, float64, as plain parameters; a fixed list of batches."""

    def __init__(self, seed: int, steps: int = 12):
        gen = torch.Generator().manual_seed(seed)
        self.params = [
            nn.Parameter(0.5 * torch.randn(4, 6, generator=gen, dtype=torch.float64)),
            nn.Parameter(0.5 * torch.randn(6, 2, generator=gen, dtype=torch.float64)),
        ]
        self.batches = [(torch.randn(8, 4, generator=gen, dtype=torch.float64),
                         torch.randn(8, 2, generator=gen, dtype=torch.float64))
                        for _ in range(steps)]

    @staticmethod
    def loss_at(w, batch) -> torch.Tensor:
        x, y = batch
        return ((torch.tanh(x @ w[0]) @ w[1] - y) ** 2).mean()

    def loss(self, t: int, params=None) -> torch.Tensor:
        return self.loss_at(self.params if params is None else params,
                            self.batches[t % len(self.batches)])


def _run(opt, net: Net, steps: int, scale: float = 1.0, start: int = 0) -> None:
    for t in range(start, start + steps):
        opt.step(lambda t=t: scale * net.loss(t))


# ----------------------------------------------------------------------------- additive


def _reference_hd(net: Net, lr: float, kappa: float, momentum: float, steps: int) -> list[float]:
    """Baydin et al.'s rule over torch.optim.SGD, written out as HypergradSGD computed it before
    the policies existed: h_t = -fsum_p <g_t, d_{t-1}>, a_t = clamp(a_{t-1} - kappa h_t)."""
    sgd = torch.optim.SGD(net.params, lr=lr, momentum=momentum)
    prev: list[torch.Tensor | None] = [None] * len(net.params)
    lrs = []
    for t in range(steps):
        sgd.zero_grad()
        net.loss(t).backward()
        grads = [p.grad for p in net.params]
        if momentum:
            prev = [sgd.state[p].get("momentum_buffer") for p in net.params]
        terms = [torch.dot(g.reshape(-1), d.reshape(-1)) for g, d in zip(grads, prev)
                 if d is not None]
        h = -math.fsum(torch.stack(terms).tolist()) if terms else -math.fsum([])
        lr = min(max(lr - kappa * h, 0.0), max(1e3, lr))
        sgd.param_groups[0]["lr"] = lr
        sgd.step()
        if not momentum:
            prev = [g.clone() for g in grads]
        lrs.append(lr)
    return lrs


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("spelling", ["hyper_lr", "Additive", "name"])
def test_additive_is_bit_identical_to_the_rule_before_policies(momentum, spelling):
    kappa, steps = 0.05, 15
    ref_net, net = Net(0), Net(0)
    expected = _reference_hd(ref_net, 0.1, kappa, momentum, steps)
    option = {"hyper_lr": dict(hyper_lr=kappa),
              "Additive": dict(hyper_step=Additive(kappa)),
              "name": dict(hyper_step="additive")}[spelling]
    cls = type("Hd", (HypergradSGD,), {"default_hyper_lr": kappa}) if spelling == "name" \
        else HypergradSGD
    opt = cls(net.params, lr=0.1, momentum=momentum, **option)
    _run(opt, net, steps)
    assert opt.history[0]["lr"] == expected
    for a, b in zip(net.params, ref_net.params):
        assert torch.equal(a, b)
    assert "hyper_step/phase" not in opt.history[0]  # the history is what it was
    assert "hyper_step" not in opt.hyper_state


def test_additive_group_kappa_is_the_groups_hypergrad_lr():
    """A group's own hyper_lr (and a later assignment to it) is the additive kappa."""
    net = Net(1)
    opt = HypergradSGD([{"params": [net.params[0]], "hyper_lr": 0.0},
                        {"params": [net.params[1]]}], lr=0.1, hyper_lr=0.05)
    _run(opt, net, 5)
    assert opt.history[0]["lr"] == [0.1] * 5
    assert opt.history[1]["lr"][-1] != 0.1
    opt.param_groups[1]["hyper_lr"] = 0.0
    before = opt.param_groups[1]["lr"]
    _run(opt, net, 3, start=5)
    assert opt.history[1]["lr"][-3:] == [before] * 3


# ----------------------------------------------------------------------------- invariance


@settings(max_examples=20, deadline=None)
@given(index=st.integers(0, len(NORMALISED) - 1), k=st.integers(-8, 8),
       momentum=st.sampled_from([0.0, 0.9]), seed=st.integers(0, 2**16))
def test_loss_scale_leaves_the_learned_lr_trajectory_unchanged(index, k, momentum, seed):
    """SGD on c*L from lr a/c takes exactly SGD's steps on L from a; a normalised policy then
    learns exactly a_t / c (c = 2^k, so every scaling is exact in floating point)."""
    policy, c = NORMALISED[index], 2.0 ** k
    net_a, net_b = Net(seed), Net(seed)
    oa = HypergradSGD(net_a.params, lr=0.05, momentum=momentum, hyper_step=policy)
    ob = HypergradSGD(net_b.params, lr=0.05 / c, momentum=momentum, hyper_step=policy)
    _run(oa, net_a, 12)
    _run(ob, net_b, 12, scale=c)
    assert [a / c for a in oa.history[0]["lr"]] == ob.history[0]["lr"]
    for a, b in zip(net_a.params, net_b.params):
        assert torch.equal(a, b)


@settings(max_examples=10, deadline=None)
@given(index=st.integers(0, len(NORMALISED) - 1), k=st.integers(-8, 8),
       seed=st.integers(0, 2**16))
def test_adam_loss_scale_leaves_the_learned_lr_trajectory_unchanged(index, k, seed):
    """Adam's direction does not see the loss's scale (eps=0), nor does a normalised policy."""
    policy, c = NORMALISED[index], 2.0 ** k
    net_a, net_b = Net(seed), Net(seed)
    oa = HypergradAdam(net_a.params, lr=1e-2, eps=0.0, hyper_step=policy)
    ob = HypergradAdam(net_b.params, lr=1e-2, eps=0.0, hyper_step=policy)
    _run(oa, net_a, 10)
    _run(ob, net_b, 10, scale=c)
    assert oa.history[0]["lr"] == ob.history[0]["lr"]


@settings(max_examples=40, deadline=None)
# A first step whose Adam ratio rounded to just above -1 at one decade and to -1 at the other:
# only the second counted as a capped growth step, and the accelerated growth parted.
@example(index=4, k=-4, momentum=0.0, signals=[(-0.75, 1.0, 1.0), (-1.0, 1.0, 1.0)])
@given(index=st.integers(0, len(NORMALISED) - 1), k=st.integers(-4, 4),
       momentum=st.sampled_from([0.0, 0.5, 0.9]),
       signals=st.lists(st.tuples(st.floats(-1.0, 1.0).filter(lambda c: c == 0 or abs(c) > 1e-6),
                                  st.floats(0.5, 2.0), st.floats(0.1, 3.0)),
                        min_size=1, max_size=40))
def test_a_start_ten_to_the_k_away_follows_the_same_trajectory_scaled(index, k, momentum,
                                                                      signals):
    r"""Every normalised policy is homogeneous in the value: fed the same signals (cosine,
    hypergradient's scale, loss), a start 10^k times larger stays 10^k times larger, growth phase
    included; so a start a decade off is the same run once that decade is made up."""
    policy, factor = NORMALISED[index], 10.0 ** k
    a, b = 1e-2, 1e-2 * factor
    sa, sb = policy.init_state(a), policy.init_state(b)
    for cos, norm, loss in signals:
        a, sa = policy.update(a, cos * norm, norm, sa, momentum=momentum, loss=loss)
        b, sb = policy.update(b, cos * norm, norm, sb, momentum=momentum, loss=loss)
        assert b == pytest.approx(a * factor, rel=1e-9)
        assert policy.phase(sa) == policy.phase(sb)


def test_scale_free_brings_a_runaway_loss_down_fast():
    """While the loss is above its smoothed minimum by the run's own scale and rising, the value
    is divided by ``shrink`` per step; minibatch noise far below the first loss does not trip
    it."""
    policy = ScaleFree()
    value, state = 1.0, policy.init_state(1.0)
    for loss in (1.0, 0.8, 0.6, 0.5):
        value, state = policy.update(value, 0.0, 0.0, state, loss=loss)
    assert value == 1.0
    for loss in (2.0, 4.0, 8.0):
        value, state = policy.update(value, 0.0, 0.0, state, loss=loss)
    # each above 0.90 + max(1 - 0.90, 0.90) (the EMA's low) and rising
    assert value == pytest.approx(policy.shrink ** -3, rel=1e-12)
    value, state = policy.update(value, -1.0, 1.0, state, loss=7.0)  # falling: held, no growth
    assert value == pytest.approx(policy.shrink ** -3, rel=1e-12)

    value, state = 1.0, policy.init_state(1.0)
    gen = torch.Generator().manual_seed(0)
    for t in range(300):  # from 2.3 down to a noisy 0.01-0.2
        loss = 2.3 * 0.97 ** t + 0.2 * float(torch.rand((), generator=gen))
        value, state = policy.update(value, 0.0, 0.0, state, loss=loss)
    assert value == 1.0


def test_scale_free_restarts_its_moments_after_a_runaway():
    """The runaway's hypergradients would dominate Adam's second moment for hundreds of steps."""
    policy = ScaleFree()
    value, state = 1.0, policy.init_state(1.0)
    for loss in (1.0, 0.5, 0.4):
        value, state = policy.update(value, -1.0, 1.0, state, loss=loss)
    grown = value
    assert grown > 1.0 and state["v"] > 0.0
    value, state = policy.update(value, 1e6, 1.0, state, loss=50.0)
    assert value < grown / 1.9 and (state["m"], state["v"], state["t"]) == (0.0, 0.0, 0.0)
    value, state = policy.update(value, -1.0, 1.0, state, loss=0.4)  # full steps again
    assert state["t"] == 1.0


def test_scale_free_takes_no_step_on_a_runaways_hypergradient():
    """Above the run's own scale the one-step hypergradient can still ask for more (the loss of a
    catapult keeps falling along the last step): the value is held and nothing enters the
    moments until the loss is back below."""
    policy = ScaleFree()
    value, state = 1.0, policy.init_state(1.0)
    for loss in (1.0, 0.5, 0.4):
        value, state = policy.update(value, -1.0, 1.0, state, loss=loss)
    value, state = policy.update(value, -1.0, 1.0, state, loss=50.0)  # rising: shrink
    shrunk = value
    for loss in (40.0, 20.0, 5.0):  # falling but still far above: held
        value, state = policy.update(value, -1e6, 1.0, state, loss=loss)
        assert value == shrunk and (state["m"], state["v"], state["t"]) == (0.0, 0.0, 0.0)


def test_scale_free_shrinks_again_only_at_a_new_high():
    """A run the runaway broke sits at a high, noisy loss: each rise of that noise is no new
    runaway, and shrinking at each would take the value to 0 (MartheSGD on the digits MLP went
    to 1e-188); only a new high since the alarm began shrinks again."""
    policy = ScaleFree()
    value, state = 1.0, policy.init_state(1.0)
    for loss in (1.0, 0.5, 0.4, 20.0, 30.0):  # two new highs: two shrinks
        value, state = policy.update(value, 0.0, 0.0, state, loss=loss)
    assert value == pytest.approx(policy.shrink ** -2, rel=1e-12)
    for loss in (8.0, 9.0, 7.0, 9.5, 8.0, 9.9):  # stuck high, rising half the time
        value, state = policy.update(value, 0.0, 0.0, state, loss=loss)
    assert value == pytest.approx(policy.shrink ** -2, rel=1e-12)
    value, state = policy.update(value, 0.0, 0.0, state, loss=31.0)
    assert value == pytest.approx(policy.shrink ** -3, rel=1e-12)


def test_scale_free_growth_is_capped_at_up_per_step():
    """g = a h grows with a: Adam's ratio then exceeds 1 (its second moment remembers the
    smaller values), and uncapped the digits MLP's lr grew 37x in 8 steps past its edge."""
    policy = ScaleFree()
    value, state = 1.0, policy.init_state(1.0)
    for t in range(30):
        new, state = policy.update(value, -(3.0 ** t), 1.0, state)
        assert math.log(new / value) <= policy.up * (1 + 1e-12)
        value = new
    assert math.log(value) == pytest.approx(30 * policy.up)


def test_scale_free_accelerates_growth_only_while_the_run_is_stalled():
    """While the training loss stays within ``gate`` of its first value and the growth signal
    keeps hitting the cap, each step grows by ``accel`` times the last, up to ``reach`` times the
    capped step; once the loss has fallen by more than ``gate``, growth is back to ``up``."""
    policy = ScaleFree(accel=1.5)
    value, state = 1.0, policy.init_state(1.0)
    steps = []
    for t in range(10):  # a flat loss: stalled; the signal grows with the value (capped)
        new, state = policy.update(value, -(3.0 ** t), 1.0, state, loss=2.0)
        steps.append(math.log(new / value))
        value = new
    expected = [policy.up * min(1.5 ** k, policy.reach) for k in range(10)]
    assert steps == pytest.approx(expected, rel=1e-12)
    assert expected[-1] == policy.up * policy.reach  # reach bounds it: at most e^1.6 a step
    # The loss falls below 97% of its first value: the last accelerated step, taken before the
    # loss could answer it, is stepped back, and growth is back to ``up`` for good.
    new, state = policy.update(value, -(3.0 ** 10), 1.0, state, loss=1.9)
    assert math.log(new / value) == pytest.approx(-expected[-1]) and state["settled"] == 1.0
    value = new
    for t in range(11, 40):
        new, state = policy.update(value, -(3.0 ** t), 1.0, state, loss=2.0)  # stalled again
        value, last = new, math.log(new / value)
    assert last == pytest.approx(policy.up) and state["run"] == 0.0


def test_scale_free_acceleration_ends_when_the_loss_rises_too():
    """A stalled climb that overshoots shows as a loss *above* its first value (the digits CNN
    under MartheAdamW: 2.30 -> 2.87 after a step at lr 0.078, below the runaway alarm); that ends
    the acceleration and steps its last step back, as a fall does."""
    policy = ScaleFree(accel=1.5)
    value, state = 1.0, policy.init_state(1.0)
    for t in range(6):
        value, state = policy.update(value, -(3.0 ** t), 1.0, state, loss=2.30)
    climbed = value
    value, state = policy.update(value, -(3.0 ** 6), 1.0, state, loss=2.30 * 1.04)
    assert value == pytest.approx(climbed / math.exp(policy.up * min(1.5 ** 5, policy.reach)))
    assert state["settled"] == 1.0 and state["run"] == 0.0
    value, state = 1.0, policy.init_state(1.0)
    for loss in (2.30, 2.30 * 1.02, 2.30 * 0.98, 2.30 * 1.029):  # within the gate: still climbing
        value, state = policy.update(value, -1.0, 1.0, state, loss=loss)
    assert state["settled"] == 0.0 and state["run"] == 4.0


def test_scale_free_acceleration_restarts_at_each_break_of_the_signal():
    """An unsaturated step, a runaway or a step without a loss ends the run of capped steps."""
    policy = ScaleFree(accel=2.0, reach=100.0)

    def grown(signals):
        value, state = 1.0, policy.init_state(1.0)
        for h, loss in signals:
            value, state = policy.update(value, h, 1.0, state, loss=loss)
        return math.log(value), state

    base = [(-1.0, 1.0)] * 3  # steps of up, 2 up, 4 up
    assert grown(base)[0] == pytest.approx(7 * policy.up)
    _, state = grown(base + [(1.0, 1.0)])  # the signal turns: no acceleration left
    assert state["run"] == 0.0
    log_value, state = grown(base + [(-1.0, None)])  # no loss: a plain capped step
    assert log_value == pytest.approx(8 * policy.up) and state["run"] == 0.0
    _, state = grown(base + [(-1.0, 50.0)])  # a runaway ends acceleration for good
    assert state["run"] == 0.0 and state["t"] == 0.0 and state["settled"] == 1.0
    log_value, _ = grown(base + [(-1.0, 50.0)] + [(-1.0, 1.0)] * 3)
    assert log_value == pytest.approx(7 * policy.up - math.log(policy.shrink) + 3 * policy.up)


def test_scale_free_without_acceleration_is_the_capped_rule_bit_for_bit():
    """``accel=1`` (ScaleFree's default, MARTHE's policy) steps exactly as before the
    acceleration existed: ``up * max(r, -cap)`` when growing, ``down * r`` when shrinking."""
    policy = ScaleFree()
    gen = torch.Generator().manual_seed(3)
    value, state = 0.01, policy.init_state(0.01)
    m = v = 0.0
    for t in range(1, 60):
        h = float(torch.randn((), generator=gen)) - 0.5
        g = value * h
        m, v = 0.5 * m + (1.0 - 0.5) * g, 0.999 * v + (1.0 - 0.999) * g * g
        r = (m / (1.0 - 0.5 ** t)) / math.sqrt(v / (1.0 - 0.999 ** t))
        step = policy.up * max(r, -policy.cap) if r < 0.0 else policy.down * r
        expected = value * math.exp(-step)
        value, state = policy.update(value, h, 1.0, state, loss=1.0)
        assert value == expected


def test_scale_free_fast_decrease_after_a_streak_of_signals_to_decrease():
    """Until ``streak`` hypergradients in a row ask for a lower value the policy is the plain rule
    bit for bit; from then on its step down is normalised by the short-memory second moment
    (bias-corrected, held to ``cap * down``), and the first hypergradient that does not ask for
    less ends it. Early, large hypergradients hold the plain rule's late steps small (its second
    moment remembers them for about 1000 steps); the fast decrease forgets them within tens."""
    policy, plain = ScaleFree(streak=5), ScaleFree()
    gen = torch.Generator().manual_seed(5)
    early = [float(torch.randn((), generator=gen)) * 20.0 for _ in range(10)]
    late = [0.5 + 0.1 * float(torch.rand((), generator=gen)) for _ in range(60)]
    value, state = 0.01, policy.init_state(0.01)
    plain_value, plain_state = value, plain.init_state(value)
    m = v = vf = 0.0
    run = fast_steps = 0
    fast_moves, plain_moves = [], []
    for t, h in enumerate(early + [-0.2] + late + [-0.3, 0.4], start=1):
        g = value * h
        m, v = 0.5 * m + (1.0 - 0.5) * g, 0.999 * v + (1.0 - 0.999) * g * g
        vf = 0.9 * vf + (1.0 - 0.9) * g * g
        run = run + 1 if g > 0.0 else 0
        m_hat = m / (1.0 - 0.5 ** t)
        r = m_hat / math.sqrt(v / (1.0 - 0.999 ** t))
        if run >= 5:
            r = min(m_hat / math.sqrt(vf / (1.0 - 0.9 ** t)), policy.cap)
            fast_steps += 1
        step = policy.up * max(r, -policy.cap) if r < 0.0 else policy.down * r
        expected = value * math.exp(-step)
        one_plain, _ = plain.update(value, h, 1.0, state, loss=1.0)
        new, state = policy.update(value, h, 1.0, state, loss=1.0)
        new_plain, plain_state = plain.update(plain_value, h, 1.0, plain_state, loss=1.0)
        assert new == expected and state["streak"] == run
        assert (new == one_plain) == (run < 5)  # the plain rule, except within a streak
        fast_moves.append(math.log(value / new))
        plain_moves.append(math.log(plain_value / new_plain))
        value, plain_value = new, new_plain
    assert fast_steps == len(late) - 4 and state["streak"] == 1.0
    # The streak's last 20 steps: the fast decrease moves at least 3x the plain rule's pace.
    end = len(early) + 1 + len(late)
    assert sum(fast_moves[end - 20:end]) > 3.0 * sum(plain_moves[end - 20:end]) > 0.0


@pytest.mark.parametrize("bad", [dict(streak=-1), dict(streak=2.5), dict(streak=True),
                                 dict(fast_beta2=1.0), dict(fast_beta2=-0.1)])
def test_scale_free_rejects_a_bad_streak(bad):
    with pytest.raises(ValueError, match="Invalid"):
        ScaleFree(**bad)
    (key, value), = bad.items()
    with pytest.raises(ValueError, match="Invalid hyper_step"):
        HypergradSGD(Net(0).params, lr=0.1, hyper_step=f"ScaleFree({key}={value!r})")


def test_scale_free_runaway_clears_the_streak():
    policy = ScaleFree(streak=2)
    value, state = 1.0, policy.init_state(1.0)
    for loss in (1.0, 0.9, 0.8):
        value, state = policy.update(value, 1.0, 1.0, state, loss=loss)
    assert state["streak"] == 3.0 and state["vf"] > 0.0
    value, state = policy.update(value, 1.0, 1.0, state, loss=50.0)  # a runaway
    assert state["streak"] == 0.0 and state["vf"] == 0.0 and state["t"] == 0.0


def test_defaults_fast_decrease_stops_a_full_batch_overfit_sooner():
    """Full-batch Adam from lr 1e-2 on scikit-learn's diabetes (265 training rows, an MLP
    10-50-1, a validation set: the benchmark's task), where the plain rule took HypergradAdam's
    learning rate down about 1% a step while the run overfit for hundreds of steps: once the
    validation gradient opposes every step, the default's fast decrease takes the learning rate
    down by decades, and the run ends at a lower validation loss."""
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32)[:, None]
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = perm[:265], perm[265:353]
    mse = torch.nn.functional.mse_loss
    out = {}
    for name, policy in (("default", None), ("plain", "ScaleFree(accel=1.5)")):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 1))
        opt = HypergradAdam(model.parameters(), lr=1e-2, hyper_step=policy,
                            val_closure=lambda m=model: mse(m(x[val]), y[val]))
        for _ in range(600):
            opt.step(lambda m=model: mse(m(x[train]), y[train]))
        with torch.no_grad():
            out[name] = float(mse(model(x[val]), y[val])), opt.param_groups[0]["lr"]
    (val_loss, lr), (plain_val_loss, plain_lr) = out["default"], out["plain"]
    assert lr < plain_lr / 1e3 and val_loss < plain_val_loss - 0.05


def test_scale_free_default_survives_a_catapult_on_a_tiny_full_batch_regression():
    """HypergradSGD(lr=0.05) at ScaleFree on a 24-row regression (test_robustness's Task): the
    one-step hypergradient asks for more until the lr reaches about 2.9, where one step throws
    the loss from 0.27 to 11; halving per step, and a full step up after each restart of the
    moments, then ran it to 489 (the divergence warning). Now the loss stays far below that
    and the run ends below its start."""
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(24, k, generator=gen, dtype=torch.float64) for k in (4, 1))
    for momentum in (0.0, 0.9):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(torch.float64)
        opt = HypergradSGD(model.parameters(), lr=0.05, momentum=momentum,
                           hyper_step="scale_free")
        losses = [float(opt.step(lambda m=model: torch.nn.functional.mse_loss(m(x), y)))
                  for _ in range(200)]  # a divergence warning is an error here
        assert max(losses) < 50.0 and losses[-1] < losses[0]


def test_scale_free_steps_are_normalised():
    policy = ScaleFree(up=0.2, down=0.3)
    for h, expected in ((-1e-9, 0.2), (-1e9, 0.2), (1.0, -0.3)):
        value, state = 1.0, policy.init_state(1.0)
        value, state = policy.update(value, h, 1.0, state, momentum=0.9)
        assert math.log(value) == pytest.approx(expected)  # the first normalised step is +-1


def test_growth_grows_at_the_momentum_pace_then_steps_back_once():
    policy = Growth(beta=0.05, factor=2.0)
    value, state = 1.0, policy.init_state(1.0)
    for _ in range(10):  # cos < 0: a larger value would have helped
        value, state = policy.update(value, -0.5, 1.0, state, momentum=0.9)
    assert value == pytest.approx(2.0 ** (10 * 0.1)) and state["phase"] == 0.0
    value, state = policy.update(value, 0.5, 1.0, state, momentum=0.9)
    assert value == pytest.approx(2.0 ** (9 * 0.1)) and state["phase"] == 1.0
    value, state = policy.update(value, 0.5, 1.0, state, momentum=0.9)
    assert value == pytest.approx(2.0 ** 0.9 * (1 - 0.05 * 0.5))


# ----------------------------------------------------------------------------- state, bounds


@pytest.mark.parametrize(("policy", "lr"), [(Growth(), 1e-4), (ScaleFree(), 1e-4),
                                           (ScaleFree(accel=1.5), 1e-4), (AdamLog(), 1e-4),
                                           (ScaleFree(streak=2), 0.3)], ids=repr)
def test_resume_mid_growth_is_bit_exact(policy, lr):
    net, net2 = Net(2, steps=30), Net(2, steps=30)
    opt = HypergradSGD(net.params, lr=lr, momentum=0.5, hyper_step=policy)
    _run(opt, net, 6)
    if isinstance(policy, Growth):
        assert opt.hyper_state["hyper_step"][0]["phase"] == 0.0  # still growing
    if isinstance(policy, ScaleFree) and policy.streak:
        assert opt.hyper_state["hyper_step"][0]["streak"] == policy.streak  # mid-streak
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved_weights = [p.detach().clone() for p in net.params]
    _run(opt, net, 14, start=6)

    with torch.no_grad():
        for p, w in zip(net2.params, saved_weights):
            p.copy_(w)
    resumed = HypergradSGD(net2.params, lr=lr, momentum=0.5, hyper_step=policy)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    _run(resumed, net2, 14, start=6)
    assert resumed.history[0]["lr"] == opt.history[0]["lr"]
    assert resumed.hyper_state["hyper_step"] == opt.hyper_state["hyper_step"]
    for a, b in zip(net.params, net2.params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("policy", NORMALISED + [Growth(factor=64.0)], ids=repr)
@pytest.mark.parametrize("start", [1e-6, 0.5])
def test_learned_lr_stays_within_bounds(policy, start):
    net = Net(3)
    bounds = (1e-4, 0.2) if start < 0.2 else (1e-4, 1.0)
    opt = HypergradSGD(net.params, lr=max(start, bounds[0]), momentum=0.9, hyper_step=policy,
                       lr_bounds=bounds)
    _run(opt, net, 30)
    assert all(bounds[0] <= a <= bounds[1] for a in opt.history[0]["lr"])


def test_learned_lr_stays_below_the_learned_limit():
    net = Net(4)
    opt = HypergradSGD(net.params, lr=1e-3, hyper_step=Growth(factor=1e6))
    _run(opt, net, 10)
    assert max(opt.history[0]["lr"]) <= 1e3


def test_policy_in_repr_history_and_state_dict():
    net = Net(5)
    opt = HypergradSGD(net.params, lr=0.1, momentum=0.9, hyper_step="growth")
    assert "hyper_step: Growth(beta=0.05, factor=2.0)" in repr(opt)
    _run(opt, net, 4)
    hist = opt.history[0]
    assert len(hist["hyper_step/phase"]) == len(hist["hypergrad/lr_cosine"]) == len(hist["lr"]) == 4
    assert all(-1.0 <= c <= 1.0 for c in hist["hypergrad/lr_cosine"])
    sd = opt.state_dict()
    assert sd["param_groups"][0]["hyper_step"] == "Growth(beta=0.05, factor=2.0)"
    assert set(sd["hyper_state"]["hyper_step"][0]) == {"phase", "direction"}


def test_deepcopy_continues_identically():
    net = Net(6)
    opt = HypergradSGD(net.params, lr=1e-3, momentum=0.9, hyper_step="scale_free")
    _run(opt, net, 5)
    net2 = copy.deepcopy(net)
    clone = HypergradSGD(net2.params, lr=1e-3, momentum=0.9, hyper_step="scale_free")
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    _run(opt, net, 5, start=5)
    _run(clone, net2, 5, start=5)
    assert clone.history[0]["lr"] == opt.history[0]["lr"]


# ----------------------------------------------------------------------------- names, errors


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_resolve_round_trips_names_and_reprs(name):
    policy = resolve(name)
    assert resolve(repr(policy)) == policy
    assert resolve(policy) is policy


@pytest.mark.parametrize("bad", ["nope", "ScaleFree(lr=)", "os.system('x')", "ScaleFree(1)",
                                 "ScaleFree(nope=1.0)", 3])
def test_invalid_hyper_step_raises(bad):
    with pytest.raises(ValueError, match="Invalid hyper_step value"):
        HypergradSGD(Net(0).params, hyper_step=bad)


@pytest.mark.parametrize("name", ["HypergradSGD", "HypergradAdam", "HypergradAdamW", "MartheSGD",
                                  "MartheAdam", "MartheAdamW"])
def test_default_policy_is_scale_free_and_a_float_hyper_lr_is_the_additive_rule(name):
    import hyperoptim

    cls = getattr(hyperoptim, name)
    net = Net(0)
    # Growth accelerates while the run is stalled for every class (MartheSGD since it learns its
    # momentum in the same stall: accelerated alone, it killed the digits CNN).
    expected = ScaleFree(accel=1.5, streak=20)
    assert resolve(cls(net.params).param_groups[0]["hyper_step"]) == expected
    assert cls(net.params, hyper_lr=1e-3).param_groups[0]["hyper_step"] == "additive"
    assert cls(net.params, hyper_lr=0.0).param_groups[0]["hyper_step"] == "additive"
    if name.startswith("Hypergrad"):  # per-weight rates: the additive rule, their only one
        assert cls(net.params, per_parameter=True).param_groups[0]["hyper_step"] == "additive"


def test_hypergrad_lr_and_hyper_step_conflict():
    with pytest.raises(ValueError, match="hyper_lr.*hyper_step"):
        HypergradSGD(Net(0).params, hyper_lr=0.01, hyper_step="growth")


def test_per_parameter_takes_the_additive_policy_only():
    with pytest.raises(ValueError, match="per_parameter"):
        HypergradSGD(Net(0).params, per_parameter=True, hyper_step="growth")
    HypergradSGD(Net(0).params, per_parameter=True, hyper_lr=0.01)


def test_old_checkpoint_without_hyper_step_is_additive():
    net = Net(7)
    opt = HypergradSGD(net.params, lr=0.1, hyper_lr=0.02)
    _run(opt, net, 3)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        del group["hyper_step"]
    net2 = copy.deepcopy(net)
    resumed = HypergradSGD(net2.params, lr=0.1, hyper_step="scale_free")
    resumed.load_state_dict(sd)
    _run(opt, net, 3, start=3)
    _run(resumed, net2, 3, start=3)
    assert resumed.history[0]["lr"] == opt.history[0]["lr"]


def test_checkpoint_of_the_old_default_resumes_without_the_streak():
    """A checkpoint saved before ``streak`` existed names ``ScaleFree(..., gate=0.03)``: it
    resumes that policy (``streak=0``), step for step, not the new default."""
    old = ("ScaleFree(up=0.2, down=0.2, beta1=0.5, beta2=0.999, shrink=10.0, smooth=0.1, cap=1.0, "
           "accel=1.5, reach=8.0, gate=0.03)")
    net = Net(7, steps=30)
    opt = HypergradSGD(net.params, lr=0.3, momentum=0.5, hyper_step=old)
    _run(opt, net, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # a copy: the live state_dict shares momentum buffers
    buffer.seek(0)
    net2 = copy.deepcopy(net)
    resumed = HypergradSGD(net2.params, lr=0.3, momentum=0.5)  # the new default
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resolve(resumed.param_groups[0]["hyper_step"]) == ScaleFree(accel=1.5)
    _run(opt, net, 20, start=3)
    _run(resumed, net2, 20, start=3)
    assert resumed.history[0]["lr"] == opt.history[0]["lr"]


# ----------------------------------------------------------------------------- MARTHE


def _marthe(net: Net, lr: float, policy, scale: float = 1.0, **kw):
    from hyperoptim import MartheSGD

    val = net.batches[-1]
    return MartheSGD(net.params, lr=lr, momentum=0.5, hyper_step=policy,
                     val_closure=lambda: scale * Net.loss_at(net.params, val), **kw)


@pytest.mark.parametrize("policy", NORMALISED, ids=repr)
def test_marthe_policy_is_loss_scale_invariant(policy):
    """MARTHE's Delta_t over ||grad E|| ||Z_t||: c*L from lr a/c learns a_t / c (c = 4)."""
    c = 4.0
    net_a, net_b = Net(8), Net(8)
    oa = _marthe(net_a, 0.05, policy)
    ob = _marthe(net_b, 0.05 / c, policy, scale=c)
    _run(oa, net_a, 10)
    _run(ob, net_b, 10, scale=c)
    assert [a / c for a in oa.history[0]["lr"]] == pytest.approx(ob.history[0]["lr"], rel=1e-9)
    assert oa.history[0]["lr"][-1] != 0.05


def test_marthe_default_is_scale_free_its_own_step_when_sized_and_resume_mid_growth_is_exact():
    from hyperoptim import MartheSGD

    default = _marthe(Net(9), 1e-3, None)
    assert isinstance(default, MartheSGD)
    assert resolve(default.param_groups[0]["hyper_step"]) == ScaleFree(accel=1.5, streak=20)
    for sized in (dict(hyper_lr=1e-6), dict(adapt_hyper_lr=False), dict(hypergrad_lr=1e-6)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # hypergrad_lr: the old name
            own = _marthe(Net(9), 1e-3, None, **sized)
        assert own.param_groups[0]["hyper_step"] == "additive"
    net2 = Net(9, steps=30)
    net = Net(9, steps=30)
    opt = _marthe(net, 1e-4, Growth())
    _run(opt, net, 5)
    assert opt.hyper_state["hyper_step"][0]["phase"] == 0.0
    sd = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in net.params]
    _run(opt, net, 10, start=5)
    with torch.no_grad():
        for p, w in zip(net2.params, weights):
            p.copy_(w)
    resumed = _marthe(net2, 1e-4, Growth())
    resumed.load_state_dict(sd)
    _run(resumed, net2, 10, start=5)
    assert resumed.history[0]["lr"] == opt.history[0]["lr"]


def test_marthe_rejects_an_additive_kappa():
    from hyperoptim import MartheSGD

    with pytest.raises(ValueError, match="hyper_lr and adapt_hyper_lr"):
        MartheSGD(Net(0).params, hyper_step=Additive(0.1))


@pytest.mark.parametrize("cls", [HypergradSGD, HypergradAdam])
def test_hd_default_climbs_decades_before_the_loss_moves(cls):
    """From a learning rate far too small the loss does not move, so the default accelerates:
    more than 50x within 12 steps, where ``ScaleFree()`` is held to e^(0.2 * 12) = 11x; and once
    the loss falls, the growth is back to at most ``up`` per step."""
    start = 1e-3 if cls is HypergradSGD else 1e-4  # about 100x and 1000x below this net's
    net, ref = Net(4, steps=1), Net(4, steps=1)  # one batch: a steady signal
    opt = cls(net.params, lr=start)
    plain = cls(ref.params, lr=start, hyper_step=ScaleFree())
    _run(opt, net, 12)
    _run(plain, ref, 12)
    assert max(opt.history[0]["lr"]) > 50 * start
    assert max(plain.history[0]["lr"]) <= math.exp(12 * 0.2) * start * (1 + 1e-9)
    _run(opt, net, 28, start=12)
    state = opt.hyper_state["hyper_step"][0]
    assert state["settled"] == 1.0  # its loss fell: no acceleration any more
    lrs = opt.history[0]["lr"]
    settled_at = next(t for t in range(1, len(lrs)) if lrs[t] < lrs[t - 1])  # the step back
    assert all(b / a <= math.exp(0.2) * (1 + 1e-9) for a, b in zip(lrs[settled_at:],
                                                                   lrs[settled_at + 1:]))
