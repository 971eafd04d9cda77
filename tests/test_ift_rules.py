"""IFT written once over any rule (hyperoptim.methods.ift.RuleIFT): the generic update function
against IFTOptimizer's SGD fast path, per-parameter values stepped one parameter at a time, and the
weight step taken on copies at a hyper-update against the in-place one."""

from __future__ import annotations

import pytest
import torch
from test_ift import NAMES, Net

from hyperoptim import IFTAdam, IFTOptimizer
from hyperoptim.methods.ift import RuleIFT

CONFIGS = {
    "wd_lr_m": dict(lr=0.05, momentum=0.5, weight_decay=1e-3),
    "lookback1": dict(lr=0.05, momentum=0.5, weight_decay=1e-3, lookback=1),
    "next": dict(lr=0.05, momentum=0.5, weight_decay=1e-3, update_timing="next"),
    "per_weight_lr": dict(lr=0.05, momentum=0.5, weight_decay=1e-3, per_parameter_lr=True),
    "per_unit_lr_wd": dict(lr=0.05, momentum=0.9, weight_decay=1e-3, tune=("lr", "weight_decay"),
                           per_parameter_lr=True, per_parameter_weight_decay=True, sharing="unit"),
}


class GenericIFT(IFTOptimizer):
    """IFTOptimizer without its SGD fast path: u = w - w' through the SGD rule's pure step."""

    fast_path = False


def _run(cls, config: dict, steps: int, seed: int = 0):
    net = Net(seed)
    # The fast path and the generic function are compared on the hyper-updates; the reactive
    # decrease (which this net's 4x batch-to-batch losses trip) is beside that comparison.
    kwargs = dict(update_interval=2, lookback=3, hyper_lr=0.05, reactive_decrease=False) | config
    opt = cls(net.params, val_closure=net.val_loss, **kwargs)
    for t in range(steps):
        opt.step(net.closure(opt, t))
    return net, opt


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generic_update_function_equals_the_sgd_fast_path(name):
    """The same hypergradients (to rounding: ``w - (w - a d)`` is ``a d`` rounded differently) and
    so the same trajectory, in float64."""
    config = CONFIGS[name]
    fast_net, fast = _run(IFTOptimizer, config, steps=8)
    slow_net, slow = _run(GenericIFT, config, steps=8)
    assert len(fast.history[0]["step"]) >= 3
    for key in fast.history[0]:
        if key.startswith("hypergrad/") or key in NAMES:
            torch.testing.assert_close(torch.tensor(slow.history[0][key], dtype=torch.float64),
                                       torch.tensor(fast.history[0][key], dtype=torch.float64),
                                       rtol=1e-9, atol=1e-15, msg=key)
    for p, q in zip(slow_net.params, fast_net.params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-14)


def test_first_hypergradients_agree_to_rounding():
    """From the same state, one hyper-update each: the two forms differ by rounding only."""
    config = CONFIGS["per_unit_lr_wd"] | dict(update_interval=1)
    _, fast = _run(IFTOptimizer, config, steps=1)
    _, slow = _run(GenericIFT, config, steps=1)
    for name in ("lr", "weight_decay"):
        a, b = fast.history[0][f"hypergrad/{name}"][0], slow.history[0][f"hypergrad/{name}"][0]
        assert a != 0.0 and abs(a - b) <= 1e-12 * abs(a)


@pytest.mark.parametrize("cls", [IFTOptimizer, GenericIFT, IFTAdam], ids=lambda c: c.__name__)
def test_the_update_a_hyper_update_commits_is_the_in_place_step(cls):
    """With a zero hyper step, "taken" (the step computed on copies, then committed) and "next"
    (the in-place step) give bit-identical weights: the rule's in-place step on both paths."""
    config = dict(lr=0.05, weight_decay=1e-3, hyper_lr=0.0, lookback=2, update_interval=1)
    if cls is not IFTAdam:
        config |= dict(momentum=0.5, per_parameter_lr=True, per_parameter_weight_decay=True,
                       tune=("lr", "weight_decay"))
    taken_net, _ = _run(cls, config | dict(update_timing="taken"), steps=4)
    next_net, _ = _run(cls, config | dict(update_timing="next"), steps=4)
    for p, q in zip(taken_net.params, next_net.params):
        assert torch.equal(p, q)


def test_rule_ift_is_abstract_over_the_rule():
    assert "rule" not in RuleIFT.__dict__
    assert IFTOptimizer.rule.name == "sgd" and IFTAdam.rule.name == "adam"
