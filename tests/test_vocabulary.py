"""One vocabulary for the hyper-step knobs: ``hyper_lr`` (and MARTHE's ``adapt_hyper_lr``).

The old names (``hypergrad_lr``, ``adapt_hypergrad_lr``, FDS's ``step_sizes``) are accepted for
one release with a ``DeprecationWarning`` naming the new one, wherever a value enters: constructor
keywords, per-group dicts and ``add_param_group``, checkpoints (renamed on load, resuming
exactly) and values assigned into ``param_groups``; both names at once are a ``ValueError``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from hyperoptim import (
    FDSSGD,
    FDSAdam,
    FDSAdamW,
    HypergradAdam,
    HypergradAdamW,
    HypergradSGD,
    IFTOptimizer,
    MartheAdam,
    MartheAdamW,
    MartheSGD,
)

F64 = torch.float64


class Problem:
    """Linear regression in float64 with a validation set; ``run`` takes ``n`` steps (FDS: one
    episode of ``n`` steps, then its hyperstep)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 3, generator=gen, dtype=F64)
        self.xv = torch.randn(16, 3, generator=gen, dtype=F64)
        true = torch.randn(3, 1, generator=gen, dtype=F64)
        self.y, self.yv = self.x @ true, self.xv @ true
        self.w = nn.Parameter(torch.zeros(3, 1, dtype=F64))
        self.b = nn.Parameter(torch.zeros(1, dtype=F64))

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.w, self.b]

    def loss(self) -> torch.Tensor:
        return ((self.x @ self.w + self.b - self.y) ** 2).mean()

    def val(self) -> torch.Tensor:
        return ((self.xv @ self.w + self.b - self.yv) ** 2).mean()

    def run(self, opt: torch.optim.Optimizer, n: int = 3) -> None:
        for _ in range(n):
            opt.step(self.loss)
        if hasattr(opt, "hyperstep"):
            opt.hyperstep()


# class, its extra constructor arguments, old name -> (new name, a value, the value the group holds)
CASES = [
    (HypergradSGD, {}, "hypergrad_lr", "hyper_lr", 0.02, 0.02),
    (HypergradAdam, {}, "hypergrad_lr", "hyper_lr", 1e-4, 1e-4),
    (HypergradAdamW, {}, "hypergrad_lr", "hyper_lr", 1e-4, 1e-4),
    (MartheSGD, {}, "hypergrad_lr", "hyper_lr", 1e-5, 1e-5),
    (MartheSGD, {}, "adapt_hypergrad_lr", "adapt_hyper_lr", False, False),
    (MartheAdam, {}, "hypergrad_lr", "hyper_lr", 1e-8, 1e-8),
    (MartheAdamW, {}, "adapt_hypergrad_lr", "adapt_hyper_lr", False, False),
    (FDSSGD, dict(horizon=3), "step_sizes", "hyper_lr", {"lr": 0.05},
     {"lr": 0.05, "momentum": 0.15, "weight_decay": 4e-4}),
    (FDSAdam, dict(horizon=3), "step_sizes", "hyper_lr", {"lr": 0.01},
     {"lr": 0.01, "beta1": 0.05, "beta2": 1e-3, "weight_decay": 1e-3}),
    (FDSAdamW, dict(horizon=3), "step_sizes", "hyper_lr", {"beta1": 0.01},
     {"lr": 1e-3, "beta1": 0.01, "beta2": 1e-3, "weight_decay": 1e-3}),
]
IDS = [f"{c.__name__}-{old}" for c, _, old, *_ in CASES]


def build(cls, extra, prob: Problem | None = None, params=None, **kwargs):
    prob = prob or Problem()
    return cls(prob.params if params is None else params, lr=0.01, val_closure=prob.val,
               **extra, **kwargs)


@pytest.mark.parametrize("cls, extra, old, new, value, held", CASES, ids=IDS)
def test_old_keyword_warns_and_means_the_new_one(cls, extra, old, new, value, held):
    with pytest.warns(DeprecationWarning, match=rf"{cls.__name__}: '{old}' is deprecated.*'{new}'"):
        opt = build(cls, extra, **{old: value})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        ref = build(cls, extra, **{new: value})
    group, ref_group = opt.param_groups[0], ref.param_groups[0]
    assert old not in group and group[new] == held
    assert {k: v for k, v in group.items() if k != "params"} == \
        {k: v for k, v in ref_group.items() if k != "params"}
    assert old not in repr(opt) and new in repr(opt)
    assert all(old not in g for g in opt.state_dict()["param_groups"])


@pytest.mark.parametrize("cls, extra, old, new, value, held", CASES, ids=IDS)
def test_old_and_new_keyword_together_is_an_error_naming_both(cls, extra, old, new, value, held):
    with pytest.raises(ValueError, match=rf"'{old}'.*'{new}'"):
        build(cls, extra, **{old: value, new: value})


@pytest.mark.parametrize("cls, extra, old, new, value, held", CASES, ids=IDS)
def test_old_key_in_a_group_dict_and_add_param_group(cls, extra, old, new, value, held):
    prob = Problem()
    with pytest.warns(DeprecationWarning, match=f"'{old}'.*'{new}'"):
        opt = build(cls, extra, prob, params=[{"params": [prob.w], old: value}])
    assert opt.param_groups[0][new] == held and old not in opt.param_groups[0]
    with pytest.warns(DeprecationWarning, match=f"'{old}'.*'{new}'"):
        opt.add_param_group({"params": [prob.b], old: value})
    assert opt.param_groups[1][new] == held and old not in opt.param_groups[1]
    with pytest.raises(ValueError, match=rf"'{old}'.*'{new}'"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=F64))], old: value,
                             new: value})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("cls, extra, old, new, value, held", CASES, ids=IDS)
def test_a_value_assigned_to_the_old_key_is_applied_not_ignored(cls, extra, old, new, value, held):
    prob = Problem()
    opt = build(cls, extra, prob)
    opt.param_groups[0][old] = value
    with pytest.warns(DeprecationWarning, match=f"'{old}'.*'{new}'"):
        prob.run(opt, extra.get("horizon", 2))
    assert old not in opt.param_groups[0]
    if isinstance(value, dict):  # FDS: read through the defaults at the next hyperstep
        assert opt.param_groups[0][new] == value
    else:
        assert opt.param_groups[0][new] == held


@pytest.mark.parametrize("cls, extra, old, new, value, held", CASES, ids=IDS)
def test_an_old_checkpoint_loads_and_resumes_exactly(cls, extra, old, new, value, held):
    prob = Problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new names give none
        opt = build(cls, extra, prob, **{new: value})
        prob.run(opt)
        saved = copy.deepcopy(opt.state_dict())
        weights = [p.detach().clone() for p in prob.params]
        prob.run(opt)
        expected = [p.detach().clone() for p in prob.params]
        expected_groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                                         for g in opt.param_groups])
    # The checkpoint as a release before the rename saved it: the old key in every group.
    for group in saved["param_groups"]:
        group[old] = group.pop(new)
    other = Problem()
    resumed = build(cls, extra, other, **{new: value})
    with pytest.warns(DeprecationWarning, match=f"'{old}'.*'{new}'"):
        resumed.load_state_dict(saved)
    assert all(old not in g for g in resumed.param_groups)
    with torch.no_grad():
        for p, w in zip(other.params, weights):
            p.copy_(w)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        other.run(resumed)
    assert all(torch.equal(p, e) for p, e in zip(other.params, expected))
    assert [{k: v for k, v in g.items() if k != "params"} for g in resumed.param_groups] == \
        expected_groups


def test_both_names_in_a_checkpoint_group_is_an_error():
    prob = Problem()
    opt = build(HypergradSGD, {}, prob, hyper_lr=0.01)
    saved = opt.state_dict()
    saved["param_groups"][0]["hypergrad_lr"] = 0.01
    with pytest.raises(ValueError, match="'hypergrad_lr'.*'hyper_lr'"):
        opt.load_state_dict(saved)


def test_fds_hyper_lr_takes_one_number_for_every_schedule():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        opt = build(FDSSGD, dict(horizon=3), hyper_lr=0.05)
        assert opt.param_groups[0]["hyper_lr"] == {"lr": 0.05, "momentum": 0.05,
                                                   "weight_decay": 0.05}
        adam = build(FDSAdamW, dict(horizon=3), hyper_lr=0.02)
        assert set(adam.param_groups[0]["hyper_lr"].values()) == {0.02}
    with pytest.raises(ValueError, match="Invalid hyper_lr value"):
        build(FDSSGD, dict(horizon=3), hyper_lr=0.0)
    with pytest.raises(ValueError, match="Invalid hyper_lr value"):
        build(FDSAdam, dict(horizon=3), hyper_lr=-1.0)


def test_a_number_assigned_to_fds_hyper_lr_sizes_the_next_outer_step():
    prob = Problem()
    opt = build(FDSSGD, dict(horizon=2), prob, tune=("lr",), outer_step="additive")
    opt.param_groups[0]["hyper_lr"] = 0.003
    before = opt.schedule("lr")[0]
    prob.run(opt, 2)
    assert abs(opt.schedule("lr")[0] - before) == pytest.approx(0.003)
    opt.param_groups[0]["hyper_lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid hyper_lr value"):
        prob.run(opt, 2)


def test_a_subclass_default_under_the_old_name_still_counts():
    legacy = type("Legacy", (HypergradSGD,), {"default_hypergrad_lr": 0.25})
    with pytest.warns(DeprecationWarning, match="'default_hypergrad_lr'.*'default_hyper_lr'"):
        opt = legacy(Problem().params)
    assert opt.param_groups[0]["hyper_lr"] == 0.25


def test_a_class_that_never_had_the_old_name_refuses_it_by_name():
    prob = Problem()
    with pytest.raises(ValueError, match="IFTOptimizer has no option 'hypergrad_lr'"):
        IFTOptimizer([{"params": prob.params, "hypergrad_lr": 0.1}], val_closure=prob.val)
    with pytest.raises(TypeError, match="unexpected keyword argument 'step_sizes'"):
        HypergradSGD(prob.params, step_sizes={"lr": 0.1})


def test_the_new_names_give_no_deprecation_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for cls, extra, _, new, value, _ in CASES:
            prob = Problem()
            opt = build(cls, extra, prob, **{new: value})
            prob.run(opt)
            opt.load_state_dict(opt.state_dict())
            copy.deepcopy(opt)
