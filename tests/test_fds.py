"""FDSSGD: exact hypergradients against the oracle, schedules, the outer update, memory, resuming."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import hyperoptim.fds as fds_module
import hyperoptim.hvp as hvp_module
from hyperoptim.core.schedule import window_of
from hyperoptim.fds import FDSSGD, NAMES
from hyperoptim.hvp import SecondOrder
from hyperoptim.reference import finite_difference_hypergrad, unrolled_hypergrad

F64 = torch.float64


class Problem:
    """A tanh MLP 3-4-1 in float64, a different training batch per step, a validation set.

    The same losses serve the functional oracle (``train_loss(params, t)``, ``val_loss(params)``)
    and the optimizer (closures over live ``nn.Parameter``\\ s).
    """

    def __init__(self, seed: int = 0, dtype: torch.dtype = F64):
        gen = torch.Generator().manual_seed(seed)
        self.init = {
            "w1": 0.7 * torch.randn(3, 4, generator=gen, dtype=dtype),
            "b1": 0.1 * torch.randn(4, generator=gen, dtype=dtype),
            "w2": 0.7 * torch.randn(4, 1, generator=gen, dtype=dtype),
        }
        x = torch.randn(64, 3, generator=gen, dtype=dtype)
        y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(64, 1, generator=gen,
                                                                    dtype=dtype)
        self.batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)]
        self.xv, self.yv = x[48:], y[48:]
        self.live = {k: nn.Parameter(v.clone()) for k, v in self.init.items()}

    @staticmethod
    def f(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    def train_loss(self, p: dict[str, torch.Tensor], t: int) -> torch.Tensor:
        x, y = self.batches[t % len(self.batches)]
        return ((self.f(p, x) - y) ** 2).mean()

    def val_loss(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((self.f(p, self.xv) - self.yv) ** 2).mean()

    def reset(self) -> None:
        with torch.no_grad():
            for k, v in self.live.items():
                v.copy_(self.init[k])

    def closure(self, opt: torch.optim.Optimizer, t: int, backward: bool = False):
        def closure() -> torch.Tensor:
            loss = self.train_loss(self.live, t)
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss

        return closure

    def optimizer(self, groups=None, **kwargs) -> FDSSGD:
        kwargs.setdefault("val_closure", lambda: self.val_loss(self.live))
        return FDSSGD(groups if groups is not None else list(self.live.values()), **kwargs)

    def episode(self, opt: FDSSGD, backward: bool = False) -> torch.Tensor:
        for t in range(opt.horizon):
            opt.step(self.closure(opt, t, backward))
        return opt.hyperstep()


def set_schedules(opt: FDSSGD, schedules: dict[str, list[float]], group: int = 0) -> None:
    g = opt.param_groups[group]
    for name, values in schedules.items():
        g[f"{name}_schedule"] = list(values)
        g[name] = values[0]


def last_hypergrads(opt: FDSSGD, group: int = 0) -> dict[str, torch.Tensor]:
    hist = opt.history[group]
    return {n: torch.tensor(hist[f"hypergrad/{n}"][-1], dtype=F64)
            for n in NAMES if f"hypergrad/{n}" in hist}


def assert_rel_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float,
                     scale: torch.Tensor | None = None):
    """max |ours - ref| <= tol * max |ref| over every tuned value (the relative error), or
    ``tol * scale`` where the caller names the scale the values are summed at."""
    names = sorted(ours)
    a = torch.cat([ours[n] for n in names])
    b = torch.cat([ref[n] for n in names])
    scale = b.abs().max() if scale is None else scale
    if scale == 0:  # e.g. momentum with one window and a horizon of one step: v_0 = 0
        assert torch.equal(a, b), (ours, ref)
        return
    err = ((a - b).abs().max() / scale).item()
    assert err <= tol, (err, ours, ref)


# ---------------------------------------------------------------- exact hypergradients
schedule_value = st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hypergrads_match_unrolled_and_finite_differences(data):
    horizon = data.draw(st.integers(1, 6), label="horizon")
    windows = {n: data.draw(st.integers(1, horizon), label=f"{n}_windows") for n in NAMES}
    tune = data.draw(st.sets(st.sampled_from(NAMES), min_size=1), label="tune")
    nesterov = data.draw(st.booleans(), label="nesterov")
    backward = data.draw(st.booleans(), label="closure_calls_backward")
    scale = {"lr": 0.3, "momentum": 0.9 * data.draw(st.sampled_from([0.0, 1.0]), label="mom"),
             "weight_decay": 0.1 * data.draw(st.sampled_from([0.0, 1.0]), label="wd")}
    schedules = {n: [scale[n] * data.draw(schedule_value) for _ in range(windows[n])]
                 for n in NAMES}
    schedules["lr"] = [0.01 + a for a in schedules["lr"]]  # lr = 0 everywhere is degenerate

    prob = Problem(seed=horizon)
    opt = prob.optimizer(horizon=horizon, tune=tune, nesterov=nesterov,
                         **{f"{n}_windows": windows[n] for n in NAMES})
    set_schedules(opt, schedules)
    val = prob.episode(opt, backward=backward)

    ours = last_hypergrads(opt)
    assert set(ours) == set(tune)
    kwargs = dict(horizon=horizon, lr=schedules["lr"], momentum=schedules["momentum"],
                  weight_decay=schedules["weight_decay"], nesterov=nesterov)
    e_exact, exact = unrolled_hypergrad(prob.train_loss, prob.val_loss, prob.init, **kwargs)
    e_fd, fd = finite_difference_hypergrad(prob.train_loss, prob.val_loss, prob.init, **kwargs)
    torch.testing.assert_close(val, e_exact, rtol=1e-12, atol=0)
    assert_rel_close(ours, {n: exact[n] for n in tune}, 1e-6)
    assert_rel_close(ours, {n: fd[n] for n in tune}, 1e-6)


def test_one_window_per_step_is_the_exact_unshared_hypergradient():
    horizon = 6
    prob = Problem(seed=3)
    lr = [0.05, 0.2, 0.1, 0.3, 0.15, 0.25]
    opt = prob.optimizer(horizon=horizon, lr_windows=horizon, momentum_windows=3,
                         weight_decay_windows=horizon, nesterov=True)
    set_schedules(opt, {"lr": lr, "momentum": [0.5, 0.9, 0.0],
                        "weight_decay": [0.01 * (k + 1) for k in range(horizon)]})
    prob.episode(opt)
    _, exact = unrolled_hypergrad(prob.train_loss, prob.val_loss, prob.init, horizon=horizon,
                                  lr=lr, momentum=[0.5, 0.9, 0.0],
                                  weight_decay=[0.01 * (k + 1) for k in range(horizon)],
                                  nesterov=True)
    ours = last_hypergrads(opt)
    for name in NAMES:
        assert ours[name].shape == exact[name].shape
    assert_rel_close(ours, exact, 1e-9)


def test_a_window_of_zero_momentum_keeps_the_velocity_for_the_next_window():
    """At b = 0 PyTorch keeps no buffer, but v_{t+1} = g_t (and its tangent) feeds the next
    window's momentum: the start the paper uses (momentum 0) followed by a learned value."""
    horizon, sched = 6, {"lr": [0.2, 0.1], "momentum": [0.0, 0.8], "weight_decay": [0.0, 0.05]}
    for nesterov in (False, True):
        prob = Problem(seed=6)
        opt = prob.optimizer(horizon=horizon, lr_windows=2, momentum_windows=2,
                             weight_decay_windows=2, nesterov=nesterov)
        set_schedules(opt, sched)
        val = prob.episode(opt)
        e, exact = unrolled_hypergrad(prob.train_loss, prob.val_loss, prob.init, horizon=horizon,
                                      nesterov=nesterov, **sched)
        torch.testing.assert_close(val, e, rtol=1e-12, atol=0)
        assert_rel_close(last_hypergrads(opt), exact, 1e-9)


def test_param_groups_share_tangents_exactly():
    """Two groups with the same settings split the one-group hypergradient: the two columns of a
    value shared by both groups add up to it (chain rule), each group's coming from the other's
    weights through the Hessian too."""
    kwargs = dict(horizon=5, lr=0.2, momentum=0.6, weight_decay=0.02, lr_windows=2,
                  momentum_windows=2)
    one = Problem(seed=1)
    opt = one.optimizer(**kwargs)
    one.episode(opt)
    whole = last_hypergrads(opt)

    two = Problem(seed=1)
    groups = [{"params": [two.live["w1"], two.live["b1"]]}, {"params": [two.live["w2"]]}]
    opt2 = two.optimizer(groups, **kwargs)
    two.episode(opt2)
    split = [last_hypergrads(opt2, 0), last_hypergrads(opt2, 1)]
    assert_rel_close({n: split[0][n] + split[1][n] for n in NAMES}, whole, 1e-10)
    assert all((s[n].abs() > 0).all() for s in split for n in NAMES)


def test_param_groups_with_their_own_schedules_match_finite_differences():
    horizon, eps = 4, 1e-6
    base = [{"lr": [0.2, 0.1], "momentum": [0.5], "weight_decay": [0.03]},
            {"lr": [0.05], "momentum": [0.7, 0.2], "weight_decay": [0.0]}]
    windows = [dict(lr_windows=2), dict(momentum_windows=2)]

    def run(schedules, tune):
        prob = Problem(seed=2)
        groups = [{"params": [prob.live["w1"], prob.live["b1"]], **windows[0]},
                  {"params": [prob.live["w2"]], **windows[1]}]
        opt = prob.optimizer(groups, horizon=horizon, tune=tune)
        for i, sch in enumerate(schedules):
            set_schedules(opt, sch, group=i)
        val = prob.episode(opt)
        return val.item(), [last_hypergrads(opt, i) for i in range(2)]

    _, ours = run(base, NAMES)
    for i in range(2):
        for name in NAMES:
            for k in range(len(base[i][name])):
                ends = []
                for sign in (1, -1):
                    sch = copy.deepcopy(base)
                    sch[i][name][k] += sign * eps
                    ends.append(run(sch, ())[0])
                fd = (ends[0] - ends[1]) / (2 * eps)
                assert ours[i][name][k].item() == pytest.approx(fd, rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------- the inner step
def test_frozen_schedules_are_torch_sgd_bit_for_bit():
    for nesterov in (False, True):
        a, b = Problem(), Problem()
        opt = a.optimizer(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov,
                          horizon=7, tune=())
        ref = torch.optim.SGD(list(b.live.values()), lr=0.1, momentum=0.9, weight_decay=0.01,
                              nesterov=nesterov)
        for t in range(7):
            for o, prob in ((opt, a), (ref, b)):
                o.zero_grad()
                prob.train_loss(prob.live, t).backward()
                o.step()  # nothing tuned: the drop-in call without closure works
        for k in a.live:
            assert torch.equal(a.live[k], b.live[k])


def test_values_in_force_follow_the_windows():
    prob = Problem()
    opt = prob.optimizer(horizon=7, lr_windows=3, momentum_windows=2, weight_decay_windows=7,
                         tune=("lr",))
    sched = {"lr": [0.1, 0.2, 0.3], "momentum": [0.4, 0.5],
             "weight_decay": [0.01 * k for k in range(7)]}
    set_schedules(opt, sched)
    group = opt.param_groups[0]
    for t in range(7):
        for name in NAMES:
            k = window_of(t, 7, len(sched[name]))
            assert group[name] == sched[name][k]
            assert isinstance(group[name], float)
        opt.step(prob.closure(opt, t))
    opt.hyperstep()
    assert group["lr"] == opt.schedule("lr")[0] and group["momentum"] == 0.4
    assert opt.schedule("momentum") == [0.4, 0.5]


def test_assigning_the_group_value_sets_the_current_window():
    prob = Problem()
    opt = prob.optimizer(horizon=4, lr_windows=2, lr=0.1)
    opt.step(prob.closure(opt, 0))
    opt.step(prob.closure(opt, 1))
    opt.param_groups[0]["lr"] = 0.25  # step 2 is in window 1
    with pytest.warns(RuntimeWarning, match="replaced window 1 of the learned lr schedule"):
        opt.step(prob.closure(opt, 2))
    assert opt.schedule("lr") == [0.1, 0.25]


def test_only_reached_columns_are_stored_and_one_batched_hvp_per_step(monkeypatch):
    calls = []
    original = SecondOrder.hvp

    def spy(self, vectors, **kwargs):
        assert not kwargs.get("loop", False)  # hvp_columns="batched" by default
        calls.append({v.shape[0] for v in vectors})
        return original(self, vectors, **kwargs)

    monkeypatch.setattr(SecondOrder, "hvp", spy)
    horizon = 9
    prob = Problem()
    opt = prob.optimizer(horizon=horizon, lr_windows=3, momentum_windows=1,
                         weight_decay_windows=9, momentum=0.5)
    starts = sorted(math.ceil(k * horizon / n) for n in (3, 1, 9) for k in range(n))
    w1 = prob.live["w1"]
    for t in range(horizon):
        opt.step(prob.closure(opt, t))
        n_used = sum(s < t for s in starts)
        n_reached = sum(s <= t for s in starts)
        if n_used:  # one call per step, over the columns already in use, all at once
            assert calls.pop() == {n_used}
        assert not calls
        assert opt.state[w1]["fds_z"].shape == (n_reached, *w1.shape)
        assert opt.state[w1]["fds_c"].shape == (n_reached, *w1.shape)


def test_hz_clip_bounds_the_hessian_products(monkeypatch):
    seen = []
    original = FDSSGD._clipped

    def spy(p, h, n, clip):
        out = original(p, h, n, clip)
        seen.append(out.abs().max().item())
        return out

    monkeypatch.setattr(FDSSGD, "_clipped", staticmethod(spy))
    results = {}
    for clip in (None, 1e9, 0.05):
        prob = Problem()
        opt = prob.optimizer(horizon=5, lr=0.3, momentum=0.5, hz_clip=clip)
        seen.clear()
        prob.episode(opt)
        results[clip] = last_hypergrads(opt)
        if clip == 0.05:
            assert 0 < max(seen) <= 0.05
        else:
            assert max(seen) > 0.05
    for name in NAMES:
        assert torch.equal(results[None][name], results[1e9][name])
        assert not torch.allclose(results[None][name], results[0.05][name])


# ---------------------------------------------------------------- the outer step
def test_first_hyperstep_from_zero_moves_each_value_by_its_step_size():
    prob = Problem()
    opt = prob.optimizer(horizon=6, lr_windows=3, weight_decay_windows=2)
    prob.episode(opt)
    hist = opt.history[0]
    for name, gamma in fds_module.DEFAULT_STEP_SIZES.items():
        for h, value in zip(hist[f"hypergrad/{name}"][0], hist[name][0], strict=True):
            assert value == (-math.copysign(gamma, h) if h != 0 else 0.0)
    assert hist["lr"][0] == [0.1, 0.1, 0.1]  # at lr = 0, more learning rate always helps here


def test_sign_update_halves_the_step_on_every_flip():
    """Replay the documented rule on the recorded raw hypergradients."""
    prob = Problem(seed=4)
    sizes = {"lr": 0.08, "momentum": 0.2, "weight_decay": 0.01}
    opt = prob.optimizer(horizon=6, lr_windows=2, weight_decay_windows=2, hyper_lr=sizes,
                         lr=0.05, outer_step="additive")
    for _ in range(8):
        prob.reset()
        prob.episode(opt)
    hist = opt.history[0]
    flips = 0
    for name in NAMES:
        n = len(hist[name][0])
        value = [0.05 if name == "lr" else 0.0] * n
        gamma, prev = [sizes[name]] * n, [0.0] * n
        for hs, recorded in zip(hist[f"hypergrad/{name}"], hist[name], strict=True):
            for k, h in enumerate(hs):
                s = float((h > 0) - (h < 0))
                if s * prev[k] < 0:
                    gamma[k] /= 2
                    flips += 1
                prev[k] = s
                value[k] -= s * gamma[k]
            assert recorded == value
        assert opt.hyper_state["outer"][0][name]["step_size"] == gamma
    assert flips > 0  # the replay exercised the halving


def test_learns_from_all_zero_hyperparameters():
    prob = Problem(seed=5)
    opt = prob.optimizer(horizon=12, lr_windows=3, outer_step="additive")
    for _ in range(8):
        prob.reset()
        prob.episode(opt)
    losses = opt.history[0]["val_loss"]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(v > 0 for v in opt.schedule("lr"))


def test_nonfinite_hypergradient_is_skipped_and_the_episode_still_ends():
    prob = Problem()
    opt = prob.optimizer(horizon=3, lr=0.1, outer_step="additive")
    prob.episode(opt)
    before = [opt.schedule(n) for n in NAMES]
    for t in range(3):
        opt.step(prob.closure(opt, t))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.hyperstep(lambda: prob.val_loss(prob.live) * float("inf"))
    assert [opt.schedule(n) for n in NAMES] == before
    assert opt.history[0]["skipped"] == [0.0, 1.0]
    assert opt.hyper_state["step"] == 0 and "fds_z" not in opt.state[prob.live["w1"]]


def test_misuse_raises_clear_errors():
    prob = Problem()
    opt = prob.optimizer(horizon=2)
    extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="Invalid horizon value: 3"):
        opt.add_param_group({"params": [extra], "horizon": 3})
    with pytest.raises(ValueError, match="Invalid lr_schedule value"):
        opt.add_param_group({"params": [extra], "lr_schedule": [0.1, 0.2]})
    with pytest.raises(ValueError, match="Invalid lr_windows value: 3"):
        opt.add_param_group({"params": [extra], "lr_windows": 3})
    with pytest.raises(ValueError, match="Invalid name value"):
        opt.schedule("beta")
    with pytest.raises(RuntimeError, match="exactly horizon=2 steps"):
        opt.hyperstep()
    with pytest.raises(ValueError, match="needs second-order information"):
        opt.step()
    with pytest.raises(ValueError, match="only at the end of an episode"):
        opt.step(prob.closure(opt, 0), val_closure=lambda: prob.val_loss(prob.live))
    opt.step(prob.closure(opt, 0))
    assert opt.episode_step == 1
    with pytest.raises(RuntimeError, match="between episodes"):
        opt.add_param_group({"params": [extra]})
    opt.step(prob.closure(opt, 1))
    assert opt.episode_step == opt.horizon
    with pytest.raises(RuntimeError, match="call hyperstep"):
        opt.step(prob.closure(opt, 2))
    opt.val_closure = None
    with pytest.raises(ValueError, match="needs a validation loss"):
        opt.hyperstep()
    opt.hyperstep(lambda: prob.val_loss(prob.live))
    opt.param_groups[0]["lr_schedule"] = [0.1, 0.2]  # one window: a schedule of one value
    with pytest.raises(ValueError, match="Invalid lr_schedule value"):
        opt.step(prob.closure(opt, 0))


# ---------------------------------------------------------------- state and memory
def test_checkpoint_mid_episode_resumes_exactly():
    kwargs = dict(horizon=6, lr=0.1, momentum=0.5, lr_windows=3, momentum_windows=2,
                  nesterov=True)
    ref = Problem()
    opt = ref.optimizer(**kwargs)
    ref.episode(opt)
    ref.reset()
    for t in range(4):
        opt.step(ref.closure(opt, t))
    assert opt.state[ref.live["w1"]]["fds_z"].abs().sum() > 0

    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": {k: v.detach().clone()
                                                     for k, v in ref.live.items()}}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = Problem()
    opt2 = resumed.optimizer(**{**kwargs, "lr": 0.3, "momentum": 0.0})
    with torch.no_grad():
        for k, v in resumed.live.items():
            v.copy_(saved["model"][k])
    opt2.load_state_dict(saved["opt"])

    for o, prob in ((opt, ref), (opt2, resumed)):
        for t in range(4, 6):
            o.step(prob.closure(o, t))
        o.hyperstep()
    assert opt2.history == opt.history
    for k in ref.live:
        assert torch.equal(ref.live[k], resumed.live[k])
    assert [opt2.schedule(n) for n in NAMES] == [opt.schedule(n) for n in NAMES]
    assert opt2.hyper_state == opt.hyper_state


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v))


def test_optimizer_memory_is_O_DN_and_independent_of_the_horizon():
    prob = Problem()
    d = sum(v.numel() for v in prob.init.values())
    windows = dict(lr_windows=3, momentum_windows=1, weight_decay_windows=2)
    n = sum(windows.values())
    for horizon in (6, 24, 96):
        prob.reset()
        opt = prob.optimizer(horizon=horizon, lr=0.05, momentum=0.5, **windows)
        peak = 0
        for t in range(horizon):
            opt.step(prob.closure(opt, t))
            peak = max(peak, _state_bytes(opt))
        # Z and C with one column per schedule value, plus the momentum buffer: (2N + 1) D.
        assert peak == _state_bytes(opt) == (2 * n + 1) * d * 8, horizon
        opt.hyperstep()
        assert _state_bytes(opt) == 0


def test_float32_runs_and_keeps_dtypes():
    prob = Problem(dtype=torch.float32)
    opt = prob.optimizer(horizon=4, lr_windows=2)
    prob.episode(opt)
    for t in range(2):
        opt.step(prob.closure(opt, t))
    for p in prob.live.values():
        assert all(v.dtype == torch.float32 for v in opt.state[p].values())
    assert all(math.isfinite(h) for h in opt.history[0]["hypergrad/lr"][0])


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_with_a_nan_value_is_refused_at_load_not_blamed_on_a_scheduler(name):
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = FDSSGD([w], horizon=2, val_closure=lambda: (w**2).sum())
    for _ in range(2):
        opt.step(lambda: (w**2).sum())
    opt.hyperstep()
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0][name] = math.nan
    fresh = FDSSGD([w], horizon=2, val_closure=lambda: (w**2).sum())
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=f"Invalid {name} value: nan") as info:
        fresh.load_state_dict(saved)
    assert "scheduler" not in str(info.value)
    assert fresh.state_dict() == before


# ----------------------------------------------------------------------------- hvp_columns
_COLUMNS = dict(horizon=9, lr=0.1, momentum=0.5, lr_windows=3, momentum_windows=2,
                weight_decay_windows=2, weight_decay=1e-3)


def _columns_run(hvp_columns: str, episodes: int = 2, loop_columns: dict | None = None):
    prob = Problem()
    opt = prob.optimizer(hvp_columns=hvp_columns, **_COLUMNS)
    if loop_columns is not None:
        opt.hyper_state["loop_columns"] = dict(loop_columns)
    hypergrads = []
    for _ in range(episodes):
        prob.reset()
        hypergrads.append(prob.episode(opt))
    return prob, opt, hypergrads


def test_hvp_columns_loop_equals_the_batched_product_to_rounding():
    ref, opt_b, h_b = _columns_run("batched")
    prob, opt_l, h_l = _columns_run("loop")
    for a, b in zip(h_b, h_l):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    for k in ref.live:
        assert torch.allclose(ref.live[k], prob.live[k], rtol=1e-12, atol=1e-15)
    for n in NAMES:
        assert opt_l.schedule(n) == pytest.approx(opt_b.schedule(n), rel=1e-12, abs=1e-15)
    assert "loop_columns" not in opt_l.hyper_state  # a fixed choice measures nothing
    assert "hvp_columns: loop" in repr(opt_l) and "hvp_columns" not in repr(opt_b)


def test_hvp_columns_loop_calls_one_double_backward_per_column(monkeypatch):
    calls = []
    original = torch.autograd.grad

    def spy(outputs, inputs, grad_outputs=None, **kwargs):
        if kwargs.get("is_grads_batched") is not None or grad_outputs is not None:
            calls.append(bool(kwargs.get("is_grads_batched")))
        return original(outputs, inputs, grad_outputs=grad_outputs, **kwargs)

    prob = Problem()
    opt = prob.optimizer(hvp_columns="loop", **_COLUMNS)
    for t in range(4):
        opt.step(prob.closure(opt, t))
    with monkeypatch.context() as m:
        m.setattr(torch.autograd, "grad", spy)
        opt.step(prob.closure(opt, 4))
    n_columns = opt.state[prob.live["w1"]]["fds_z"].shape[0]
    assert n_columns >= 3 and calls == [False] * n_columns


def test_hvp_columns_auto_measures_each_column_count_once_and_keeps_the_choice(monkeypatch):
    measured = []
    original = SecondOrder.cheaper_columns

    def spy(self, vectors, repeats=2):
        measured.append(vectors[0].shape[0])
        return original(self, vectors, repeats)

    monkeypatch.setattr(SecondOrder, "cheaper_columns", spy)
    _, opt, _ = _columns_run("auto")
    chosen = opt.hyper_state["loop_columns"]
    # One measurement per column count of two or more, in the first episode only.
    assert measured == sorted(set(measured)) and min(measured) >= 2
    assert sorted(chosen, key=int) == [str(n) for n in measured]
    assert all(isinstance(v, bool) for v in chosen.values())
    assert "hvp_columns: auto" in repr(opt)


@pytest.mark.parametrize("loop", [True, False])
def test_hvp_columns_auto_follows_its_recorded_choice_bit_for_bit(loop):
    # A recorded choice (a resumed run's) is taken as is, without measuring again: the
    # trajectory is the fixed route's, bit for bit.
    counts = {str(n): loop for n in range(2, 8)}
    ref, opt_fixed, h_fixed = _columns_run("loop" if loop else "batched")
    prob, opt_auto, h_auto = _columns_run("auto", loop_columns=counts)
    assert all(torch.equal(a, b) for a, b in zip(h_fixed, h_auto))
    assert all(torch.equal(ref.live[k], prob.live[k]) for k in ref.live)
    assert opt_auto.hyper_state["loop_columns"] == counts


def test_hvp_columns_auto_choice_resumes_from_a_checkpoint():
    kwargs = dict(_COLUMNS, hvp_columns="auto")
    ref = Problem()
    opt = ref.optimizer(**kwargs)
    ref.episode(opt)
    ref.reset()
    for t in range(5):
        opt.step(ref.closure(opt, t))
    saved = copy.deepcopy(opt.state_dict())
    assert saved["hyper_state"]["loop_columns"]
    resumed = Problem()
    opt2 = resumed.optimizer(**kwargs)
    with torch.no_grad():
        for k, v in resumed.live.items():
            v.copy_(ref.live[k])
    opt2.load_state_dict(saved)
    for o, prob in ((opt, ref), (opt2, resumed)):
        for t in range(5, 9):
            o.step(prob.closure(o, t))
        o.hyperstep()
    assert opt2.hyper_state == opt.hyper_state
    assert all(torch.equal(ref.live[k], resumed.live[k]) for k in ref.live)


@pytest.mark.parametrize("hvp_columns", ["loop", "auto"])
def test_hvp_columns_survives_load_state_dict_and_the_loaded_route_is_taken(hvp_columns,
                                                                            monkeypatch):
    # torch's load_state_dict calls __setstate__ with state and param_groups only: the
    # optimizer's hvp_columns stays, and a recorded loop is looped after the load.
    prob = Problem()
    opt = prob.optimizer(hvp_columns=hvp_columns, **_COLUMNS)
    saved = opt.state_dict()
    saved["hyper_state"]["loop_columns"] = {str(n): True for n in range(2, 8)}
    opt.load_state_dict(saved)
    assert opt.hvp_columns == hvp_columns and f"hvp_columns: {hvp_columns}" in repr(opt)
    loops = []
    original = hvp_module._local_hvp

    def spy(*args, **kwargs):
        loops.append(kwargs.get("loop", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(hvp_module, "_local_hvp", spy)
    prob.episode(opt)
    assert loops and all(loops), loops
    copied = copy.deepcopy(opt)  # a pickled optimizer keeps it too
    assert copied.hvp_columns == hvp_columns


def test_hvp_columns_has_no_choice_on_the_finite_difference_route():
    prob = Problem()
    opt = prob.optimizer(hvp_columns="auto", **_COLUMNS)
    prob.episode(opt, backward=True)
    assert opt.hvp_route == "finite_difference"
    assert "loop_columns" not in opt.hyper_state


@pytest.mark.parametrize("bad", ["fast", None, 1, "Loop"])
def test_hvp_columns_rejects_unknown_values(bad):
    with pytest.raises(ValueError, match="hvp_columns"):
        Problem().optimizer(hvp_columns=bad, horizon=3)
