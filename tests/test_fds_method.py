"""The FDS method written once over any rule (hyperoptim.methods.fds): FDSSGD's hand-written SGD
tangents are a fast path of it, equal to the generic path to rounding."""

from __future__ import annotations

import pytest
import torch
from test_fds import NAMES, Problem, assert_rel_close, last_hypergrads, set_schedules

from hyperoptim import FDSSGD
from hyperoptim.methods.fds import RuleFDS


class GenericFDSSGD(FDSSGD):
    """FDSSGD through the generic path: ``rule_tangents`` of the SGD rule and its in-place step."""

    _group_step = RuleFDS._group_step


CONFIGS = {
    "heavy_ball": dict(nesterov=False, tune=NAMES),
    "nesterov": dict(nesterov=True, tune=NAMES),
    "lr_wd_only": dict(nesterov=False, tune=("lr", "weight_decay")),
    "clipped": dict(nesterov=True, tune=NAMES, hz_clip=0.05),
}


@pytest.mark.parametrize("backward", [False, True], ids=["exact_hvp", "fd_hvp"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_fast_path_equals_the_generic_path(config, backward):
    """Weights bit for bit (both move by torch's SGD operations), hypergradients to rounding, over
    two episodes and two param groups with their own windows. Momentum is non-zero in every
    window: where it is 0 the paths differ on purpose (see FDSSGD._group_step)."""
    kwargs = dict(CONFIGS[config], horizon=6, lr_windows=3, momentum_windows=2,
                  weight_decay_windows=2)
    sched = [{"lr": [0.2, 0.1, 0.3], "momentum": [0.5, 0.8], "weight_decay": [0.01, 0.05]},
             {"lr": [0.1, 0.15, 0.05], "momentum": [0.3, 0.6], "weight_decay": [0.0, 0.02]}]
    runs = []
    for cls in (FDSSGD, GenericFDSSGD):
        prob = Problem(seed=2)
        groups = [{"params": [prob.live["w1"], prob.live["b1"]]}, {"params": [prob.live["w2"]]}]
        opt = cls(groups, val_closure=lambda prob=prob: prob.val_loss(prob.live), **kwargs)
        for i, s in enumerate(sched):
            set_schedules(opt, s, group=i)
        weights, grads = [], []
        for _ in range(2):
            prob.reset()
            prob.episode(opt, backward=backward)
            weights.append([p.detach().clone() for p in prob.live.values()])
            grads.append([last_hypergrads(opt, i) for i in range(2)])
        runs.append((weights, grads, [[opt.schedule(n, i) for n in NAMES] for i in range(2)]))
    (w_fast, g_fast, s_fast), (w_gen, g_gen, s_gen) = runs
    for a, b in zip(w_fast, w_gen, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for a, b in zip(g_fast, g_gen, strict=True):
        for i in range(2):
            assert set(a[i]) == set(kwargs["tune"])
            assert_rel_close(a[i], b[i], 1e-12)
    assert s_fast == s_gen  # the same signs, so the same schedules


def test_fast_path_keeps_the_velocity_through_a_zero_momentum_window():
    """The paper's start (momentum 0) followed by a learned value: PyTorch's SGD keeps no buffer
    at momentum 0, the schedule's recursion v_{t+1} = b v_t + g_t does. FDSSGD's fast path follows
    the recursion (test_fds checks it against the oracle); the generic path follows the rule, so
    the two weights differ after the zero window."""
    runs = []
    for cls in (FDSSGD, GenericFDSSGD):
        prob = Problem(seed=6)
        opt = cls(list(prob.live.values()), horizon=4, momentum_windows=2, tune=("lr",),
                  val_closure=lambda prob=prob: prob.val_loss(prob.live))
        set_schedules(opt, {"lr": [0.2], "momentum": [0.0, 0.8]})
        for t in range(4):
            opt.step(prob.closure(opt, t))
        runs.append([p.detach().clone() for p in prob.live.values()])
    assert not all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_a_checkpoint_saved_before_groups_carried_dampening_loads():
    """The SGD rule reads ``group["dampening"]``; FDSSGD's groups carry it now, and a state dict
    saved without it gets the only value FDSSGD allows."""
    prob = Problem()
    opt = GenericFDSSGD(list(prob.live.values()), horizon=2, lr=0.1, momentum=0.5,
                        val_closure=lambda: prob.val_loss(prob.live))
    opt.step(prob.closure(opt, 0))
    saved = opt.state_dict()
    del saved["param_groups"][0]["dampening"]
    fresh = GenericFDSSGD(list(prob.live.values()), horizon=2,
                          val_closure=lambda: prob.val_loss(prob.live))
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["dampening"] == 0.0
    fresh.step(prob.closure(fresh, 1))  # the generic path reads the rule's options
    fresh.hyperstep()
