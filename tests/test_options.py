"""Options: declared once (hyperoptim.core.options), checked wherever a value enters.

Explicit cases for each defect, then bounded fuzzers over all ten classes (constructor, per-group
dict, assignment into param_groups then step, load_state_dict mutations): an invalid value is
refused with a message naming the option, and nothing changes (params and state_dict
bit-identical); a value that is accepted steps to finite weights.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from hyperoptim import (
    FDSSGD,
    FDSAdam,
    FDSAdamW,
    HypergradAdam,
    HypergradAdamW,
    HypergradSGD,
    IFTAdam,
    IFTAdamW,
    IFTOptimizer,
    MartheAdam,
    MartheAdamW,
    MartheSGD,
)
from hyperoptim.core import options as options_module
from hyperoptim.core.options import OPTIONS, options_of, validate_groups

CLASSES = [HypergradSGD, HypergradAdam, HypergradAdamW, MartheSGD, MartheAdam, MartheAdamW,
           IFTOptimizer, IFTAdam, IFTAdamW, FDSSGD]
ADAMS = [HypergradAdam, HypergradAdamW, MartheAdam, MartheAdamW, IFTAdam, IFTAdamW]
FUZZ = settings(max_examples=20, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

# Values that are wrong for most options (and right for a few: the fuzzers then check the step).
GARBAGE = [-1.0, math.nan, math.inf, -math.inf, "x", "False", None, True, 0, 2.5, (2, -1),
           (0.9, 1.0), (0.0, None), (), [0.5], {"lr": -1.0}, -5, 1e300]


class Setup:
    """A tiny float64 regression and one optimizer of ``cls`` on it (the exact HVP route)."""

    def __init__(self, cls, groups=None, **kwargs):
        torch.manual_seed(0)
        self.model = nn.Linear(3, 2).double()
        self.x, self.y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        base = dict(lr=0.01)
        if cls not in (HypergradSGD, HypergradAdam, HypergradAdamW):
            base["val_closure"] = self.val
        if cls in (IFTOptimizer, IFTAdam, IFTAdamW):
            base.update(update_interval=1, lookback=1)
        if cls is FDSSGD:
            base["horizon"] = 2
        params = groups(self.model) if groups is not None else self.model.parameters()
        self.opt = cls(params, **{**base, **kwargs})
        self.t = 0

    def loss(self):
        return nn.functional.mse_loss(self.model(self.x), self.y)

    def val(self):
        return nn.functional.mse_loss(self.model(self.x + 0.1), self.y)

    def step(self, n=1):
        for _ in range(n):
            self.opt.step(self.loss)
            self.t += 1
            if isinstance(self.opt, FDSSGD) and self.t % self.opt.horizon == 0:
                self.opt.hyperstep()

    def snapshot(self):
        return ([p.detach().clone() for p in self.model.parameters()],
                copy.deepcopy(self.opt.state_dict()))


def same(a, b) -> bool:
    """Bit-identical: tensors equal in dtype, shape and bits; NaN equals NaN."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape):
            return False
        if not a.is_floating_point():
            return torch.equal(a, b)
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0),
                                                                 b.nan_to_num(0.0))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def assert_unchanged(setup, before):
    params, sd = setup.snapshot()
    assert same(params, before[0]), "the refusal moved the parameters"
    assert same(sd, before[1]), "the refusal changed the state dict"


def weights_finite(setup) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in setup.model.parameters())


def two_groups(name, value):
    return lambda m: [{"params": [m.weight], name: value}, {"params": [m.bias]}]


# ---------------------------------------------------------------------- explicit cases
@pytest.mark.parametrize("cls", ADAMS, ids=lambda c: c.__name__)
def test_adam_group_betas_at_one_refused(cls):
    with pytest.raises(ValueError, match=r"Invalid betas value: \(0.9, 1.0\)"):
        Setup(cls, two_groups("betas", (0.9, 1.0)))


@pytest.mark.parametrize("cls", ADAMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name,value", [("betas", (2, -1)), ("eps", -5), ("amsgrad", True)])
def test_adam_add_param_group_refuses_invalid_values(cls, name, value):
    setup = Setup(cls, lambda m: [m.weight])
    setup.step()
    before = setup.snapshot()
    with pytest.raises(ValueError, match=f"Invalid {name} value"):
        setup.opt.add_param_group({"params": [setup.model.bias], name: value})
    assert len(setup.opt.param_groups) == 1
    assert_unchanged(setup, before)


@pytest.mark.parametrize("cls", ADAMS, ids=lambda c: c.__name__)
def test_amsgrad_in_a_group_refused_like_the_constructor(cls):
    with pytest.raises(ValueError, match="Invalid amsgrad value: True"):
        Setup(cls, two_groups("amsgrad", True))


@pytest.mark.parametrize("name,value", [("dampening", 0.5), ("nesterov", True),
                                        ("maximize", True)])
def test_ift_group_options_it_does_not_implement_refused(name, value):
    with pytest.raises(ValueError, match=f"Invalid {name} value: {value}"):
        Setup(IFTOptimizer, two_groups(name, value), momentum=0.5)


def test_an_option_of_another_class_is_refused_by_name():
    with pytest.raises(ValueError, match="Invalid momentum value: 0.9 .*HypergradAdam has no "
                                         "option 'momentum'"):
        Setup(HypergradAdam, two_groups("momentum", 0.9))
    with pytest.raises(ValueError, match="Invalid per_parameter value"):
        Setup(IFTOptimizer, two_groups("per_parameter", True))


def test_keys_outside_the_vocabulary_are_left_alone():
    setup = Setup(HypergradSGD, two_groups("name", "encoder"))
    setup.opt.param_groups[0]["initial_lr"] = 0.01  # what a torch scheduler adds
    setup.step(2)
    assert setup.opt.param_groups[0]["name"] == "encoder"


@pytest.mark.parametrize("value", ["False", 0, 1, None])
def test_ift_per_parameter_lr_is_a_bool_not_coerced(value):
    with pytest.raises(ValueError, match=f"Invalid per_parameter_lr value: {value}"):
        Setup(IFTOptimizer, per_parameter_lr=value)


@pytest.mark.parametrize("cls", [HypergradSGD, HypergradAdam, IFTOptimizer, IFTAdam],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("bounds", [(0.001, None), (None, 1.0), ("0", 1.0), (math.nan, 1.0)])
def test_lr_bounds_with_a_non_number_refused_by_name(cls, bounds):
    with pytest.raises(ValueError, match="Invalid lr_bounds value"):
        Setup(cls, lr_bounds=bounds)


ASSIGNED = {
    HypergradSGD: ("per_parameter", "yes"),
    HypergradAdam: ("betas", (0.9, 1.0)),
    HypergradAdamW: ("eps", -1.0),
    MartheSGD: ("mu", 2.0),
    MartheAdam: ("hypergrad_clip", -1.0),
    MartheAdamW: ("amsgrad", True),
    IFTOptimizer: ("sharing", "layer"),
    IFTAdam: ("betas", (2, -1)),
    IFTAdamW: ("tune", ("lr", "beta")),
    FDSSGD: ("hz_clip", -1.0),
}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_values_assigned_after_construction_are_checked_before_the_step_writes(cls):
    setup = Setup(cls)
    setup.step()
    name, value = ASSIGNED[cls]
    before = setup.snapshot()
    setup.opt.param_groups[0][name] = value
    with pytest.raises(ValueError, match=rf"Invalid {name} value: .*param_groups\[0\], assigned"):
        setup.step()
    setup.opt.param_groups[0][name] = before[1]["param_groups"][0][name]
    assert_unchanged(setup, before)


@pytest.mark.parametrize("cls,name,value", [
    (IFTOptimizer, "per_parameter_lr", True), (IFTOptimizer, "sharing", "unit"),
    (IFTOptimizer, "tune", ("lr",)), (IFTAdam, "tune", ("lr",)),
    (FDSSGD, "lr_windows", 2), (FDSSGD, "tune", ("lr",)),
], ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_structural_options_cannot_change_after_the_group_was_added(cls, name, value):
    # A valid value, but the state, hyper optimizer groups or tangent columns were built for the
    # old one: IFTOptimizer with per_parameter_lr switched on failed with KeyError: 'lr'.
    setup = Setup(cls)
    setup.step()
    before = setup.snapshot()
    old = setup.opt.param_groups[0][name]
    setup.opt.param_groups[0][name] = value
    with pytest.raises(ValueError, match=f"Invalid {name} value: .*when the group was added"):
        setup.step()
    setup.opt.param_groups[0][name] = old
    assert_unchanged(setup, before)
    setup.step()


@pytest.mark.parametrize("cls", [HypergradAdam, HypergradAdamW, MartheAdam, MartheAdamW],
                         ids=lambda c: c.__name__)
def test_adam_classes_take_torch_switches_at_their_defaults(cls):
    Setup(cls, foreach=None, fused=None, differentiable=False).step()
    Setup(cls, foreach=False, fused=False).step()
    for flag in ("foreach", "fused", "differentiable"):
        with pytest.raises(ValueError, match=f"does not implement {flag}=True"):
            Setup(cls, **{flag: True})


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_tensor_lr_is_accepted_and_stored_as_a_float(cls):
    lr = torch.tensor(0.01)
    setup = Setup(cls, lr=lr)
    value = setup.opt.param_groups[0]["lr"]
    assert type(value) is float and value == float(lr)
    setup = Setup(cls, lambda m: [{"params": [m.weight], "lr": torch.tensor(0.02)},
                                  {"params": [m.bias]}])
    assert type(setup.opt.param_groups[0]["lr"]) is float
    setup.step(2)
    assert weights_finite(setup)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_state_dict_without_optional_keys_loads_with_the_defaults(cls):
    setup = Setup(cls)
    setup.step()
    sd = setup.opt.state_dict()
    for group in sd["param_groups"]:
        for key in ("maximize", "dampening", "nesterov"):
            group.pop(key, None)
    fresh = Setup(cls)
    fresh.opt.load_state_dict(sd)
    assert fresh.opt.param_groups[0]["maximize"] is False
    fresh.step()
    assert weights_finite(fresh)


def _first_state_key(sd, key):
    for index, state in sd["state"].items():
        if key in state:
            return index
    raise AssertionError(f"no {key} in the state")


@pytest.mark.parametrize("cls", [HypergradAdam, MartheAdamW, IFTAdam], ids=lambda c: c.__name__)
@pytest.mark.parametrize("what", ["nan", "inf", "shape", "dtype"])
def test_load_refuses_bad_adam_state_and_changes_nothing(cls, what):
    setup = Setup(cls)
    setup.step(2)
    sd = setup.opt.state_dict()
    index = _first_state_key(sd, "exp_avg")
    value = sd["state"][index]["exp_avg"]
    sd["state"][index]["exp_avg"] = {
        "nan": value.clone().fill_(math.nan), "inf": value.clone().fill_(math.inf),
        "shape": value.new_zeros(7), "dtype": value.to(torch.int64),
    }[what]
    before = setup.snapshot()
    with pytest.raises(ValueError, match=rf"state\[{index}\]\['exp_avg'\]"):
        setup.opt.load_state_dict(sd)
    assert_unchanged(setup, before)


@pytest.mark.parametrize("cls", [IFTOptimizer, IFTAdamW], ids=lambda c: c.__name__)
@pytest.mark.parametrize("key", ["transformed", "published", "since_update", "steps"])
def test_load_refuses_a_malformed_ift_hyper_state_before_changing_anything(cls, key):
    setup = Setup(cls)
    setup.step(2)
    good = setup.opt.state_dict()
    for broken in ({k: v for k, v in good["hyper_state"].items() if k != key},
                   {**good["hyper_state"], key: "x"}):
        sd = {**good, "hyper_state": broken}
        before = setup.snapshot()
        with pytest.raises(ValueError, match=f"hyper_state.*'{key}'"):
            setup.opt.load_state_dict(sd)
        assert_unchanged(setup, before)
    setup.step()


def test_a_load_that_fails_late_leaves_the_optimizer_as_it_was():
    # A hyper optimizer state that does not fit is found only while loading it: rolled back.
    setup = Setup(IFTOptimizer)
    setup.step(2)
    sd = setup.opt.state_dict()
    sd["hyper_optimizer"]["param_groups"] = sd["hyper_optimizer"]["param_groups"][:1]
    before = setup.snapshot()
    with pytest.raises(ValueError, match="hyper_optimizer"):
        setup.opt.load_state_dict(sd)
    assert_unchanged(setup, before)
    setup.step()


def test_every_class_is_in_the_table_and_every_option_is_declared_once_per_component():
    seen = set()
    for option in OPTIONS:
        for part in option.used_by:
            assert (option.name, part) not in seen
            seen.add((option.name, part))
    for cls in CLASSES:
        groups = Setup(cls).opt.param_groups
        table = options_of(cls)
        assert set(groups[0]) - {"params"} <= set(table), cls.__name__


@pytest.mark.parametrize("adamw, adam", [(HypergradAdamW, HypergradAdam),
                                         (MartheAdamW, MartheAdam), (IFTAdamW, IFTAdam),
                                         (FDSAdamW, FDSAdam)], ids=lambda c: c.__name__)
def test_adamw_signatures_are_adams_with_torchs_adamw_changes(adamw, adam):
    # torch.optim.AdamW's signature is Adam's with weight_decay=1e-2 and no decoupled flag.
    shown, base = inspect.signature(adamw).parameters, inspect.signature(adam).parameters
    assert shown["weight_decay"].default == 0.01
    assert "decoupled_weight_decay" not in shown
    assert list(shown) == [n for n in base if n != "decoupled_weight_decay"]
    assert all(shown[n].default == base[n].default for n in shown if n != "weight_decay")
    assert all(shown[n].kind == base[n].kind for n in shown)
    extra = dict(horizon=2) if adamw is FDSAdamW else {}
    params = [nn.Parameter(torch.ones(2))]
    for cls in (adamw, adam):
        with pytest.raises(TypeError, match=rf"^{cls.__name__}\.__init__\(\) got an unexpected "
                           "keyword argument 'not_an_option'$"):
            cls(params, not_an_option=1, **extra)
    with pytest.raises(TypeError, match="decoupled_weight_decay"):
        adamw(params, decoupled_weight_decay=False, **extra)


@pytest.mark.parametrize("cls", [MartheSGD, MartheAdam, IFTOptimizer, IFTAdam],
                         ids=lambda c: c.__name__)
def test_declared_keywords_refuse_an_unknown_one_as_python_does(cls):
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\.__init__\(\) got an unexpected "
                       "keyword argument 'not_an_option'$"):
        cls([nn.Parameter(torch.ones(2))], not_an_option=1)


# ---------------------------------------------------------------------- fuzzers
def _refused_or_finite(build, name, before=None, restore=None):
    """Either ValueError naming ``name`` (and nothing changed), or finite weights after steps."""
    try:
        setup = build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setup.step(2)
    except ValueError as err:
        # torch's own wording starts one message with "Nesterov momentum requires ..."
        assert name.lower() in str(err).lower(), f"{name}: {err}"
        if before is not None:
            restore()
            assert_unchanged(*before)
        return
    assert weights_finite(setup), f"{name} accepted and the weights went non-finite"


def _group_options(cls):
    return sorted(n for n, o in options_of(cls).items() if o.in_group)


ALL_GROUP_NAMES = sorted({o.name for o in OPTIONS if o.in_group})


@FUZZ
@given(cls=st.sampled_from(CLASSES), data=st.data())
def test_fuzz_constructor(cls, data):
    arguments = inspect.signature(cls.__init__).parameters
    name = data.draw(st.sampled_from(sorted(n for n in options_of(cls) if n in arguments)),
                     label="option")
    value = data.draw(st.sampled_from(GARBAGE), label="value")
    _refused_or_finite(lambda: Setup(cls, **{name: value}), name)


@FUZZ
@given(cls=st.sampled_from(CLASSES), data=st.data())
def test_fuzz_per_group_dict(cls, data):
    # Any name of the package's vocabulary: another class's option must be refused too.
    name = data.draw(st.sampled_from(ALL_GROUP_NAMES), label="option")
    value = data.draw(st.sampled_from(GARBAGE), label="value")
    if name not in options_of(cls):
        with pytest.raises(ValueError, match=f"Invalid {name} value"):
            Setup(cls, two_groups(name, value))
        return
    _refused_or_finite(lambda: Setup(cls, two_groups(name, value)), name)


@FUZZ
@given(cls=st.sampled_from(CLASSES), data=st.data())
def test_fuzz_assignment_then_step(cls, data):
    name = data.draw(st.sampled_from(_group_options(cls)), label="option")
    value = data.draw(st.sampled_from(GARBAGE), label="value")
    setup = Setup(cls)
    setup.step()
    before = setup.snapshot()
    group = setup.opt.param_groups[0]
    had, old = name in group, group.get(name)
    group[name] = value

    def restore():
        if had:
            group[name] = old
        else:
            del group[name]

    _refused_or_finite(lambda: setup, name, (setup, before), restore)


def _lookalikes(value):
    """Values equal to ``value`` under == but of other types, and in-place changes of it."""
    kind = type(value)
    out = []
    if kind is float and value.is_integer() and abs(value) < 1e15:
        out.append(int(value))
    if kind in (float, int) and value in (0, 1):
        out.append(bool(value))
    if kind is bool:
        out.append(int(value))
    if kind is int:
        out.append(float(value))
    if kind in (tuple, list) and value:
        out.append(list(value) if kind is tuple else tuple(value))
        out += [kind(v if i else w for i, v in enumerate(value)) for w in _lookalikes(value[0])]
    return out


def _outcome(opt):
    try:
        validate_groups(opt)
    except ValueError as err:
        return str(err)
    return None


def _fresh_outcome(opt, monkeypatch):
    """:func:`_outcome` of a copy of ``opt`` with nothing remembered from earlier checks."""
    fresh = copy.deepcopy(opt)
    fresh.__dict__.pop("_groups_passed", None)
    with monkeypatch.context() as patch:
        patch.setattr(options_module, "_PASSED", {})
        return _outcome(fresh)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_group_that_passed_is_checked_again_whenever_it_could_check_differently(cls,
                                                                                  monkeypatch):
    # validate_groups skips a group that holds exactly what passed at the last step: a value of
    # another type that compares equal (0 for False, True for 1.0, a list for a tuple), a list
    # changed in place, new parameter lists and a flipped maximize get the verdict of a fresh
    # check, every time.
    setup = Setup(cls, lr_bounds=[1e-6, 1.0]) if "lr_bounds" in options_of(cls) else Setup(cls)
    setup.step()
    group = setup.opt.param_groups[0]
    cases = [(k, w) for k in sorted(group) if k != "params" for w in _lookalikes(group[k])]
    assert cases
    for key, value in cases:
        old = group[key]
        for _ in range(2):
            group[key] = value
            expected = _fresh_outcome(setup.opt, monkeypatch)
            assert _outcome(setup.opt) == expected, key
        group[key] = old
        assert _outcome(setup.opt) is None
    if isinstance(group.get("lr_bounds"), list):
        group["lr_bounds"][0] = -1.0
        with pytest.raises(ValueError, match="Invalid lr_bounds value"):
            setup.step()
        group["lr_bounds"][0] = 1e-6
    group["params"] = list(group["params"])
    setup.step()
    setup.opt.defaults["maximize"] = True
    with pytest.raises(ValueError, match="Invalid maximize value"):
        setup.step()
    setup.opt.defaults["maximize"] = False
    setup.step()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_what_a_step_learned_is_not_checked_in_full_again_but_a_users_assignment_is(cls,
                                                                                 monkeypatch):
    # The values a step wrote itself (its learned lr) get their own checks at the end of the step
    # and leave the group's full check out at the next one; a value the user assigns between
    # steps (a learned name included) still gets the verdict of a fresh full check.
    setup = Setup(cls, lr_bounds=[1e-6, 1.0]) if "lr_bounds" in options_of(cls) else Setup(cls)
    setup.step(2)
    group = setup.opt.param_groups[0]
    rechecked = []
    recheck = options_module._recheck_group
    monkeypatch.setattr(options_module, "_recheck_group",
                        lambda opt, i, *rest: rechecked.append(i) or recheck(opt, i, *rest))
    lr = group["lr"]
    setup.step(2)
    if cls is not FDSSGD:  # FDS's hyperstep() writes its schedules outside step(): checked
        assert group["lr"] != lr
        assert rechecked == []
    for value in (2.0, -1.0, math.nan, "x", 0.5):
        group["lr"] = value
        expected = _fresh_outcome(setup.opt, monkeypatch)
        assert _outcome(setup.opt) == expected, value
        if value == "x":
            assert expected is not None
    group["lr"] = lr
    assert _outcome(setup.opt) is None


def _mutations(sd):
    """(description, the name a refusal must contain, mutated state dict) for one state dict."""
    out = []
    group = sd["param_groups"][0]
    for name in sorted(k for k in group if k != "params"):
        for value in (math.nan, "x", (2, -1)):
            mutated = copy.deepcopy(sd)
            mutated["param_groups"][0][name] = value
            out.append((f"group {name}={value!r}", name, mutated))
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim():
                for bad in (value.clone().fill_(math.nan), value.new_zeros(5, 5, 5),
                            value.to(torch.int32)):
                    mutated = copy.deepcopy(sd)
                    mutated["state"][index][key] = bad
                    out.append((f"state[{index}][{key}]", key, mutated))
    for key in sd["hyper_state"]:
        mutated = copy.deepcopy(sd)
        mutated["hyper_state"][key] = "x"
        out.append((f"hyper_state[{key}]", key, mutated))
    mutated = copy.deepcopy(sd)
    mutated["history"] = mutated["history"][:0]
    out.append(("history", "history", mutated))
    return out


@FUZZ
@given(cls=st.sampled_from(CLASSES), data=st.data())
def test_fuzz_load_state_dict(cls, data):
    setup = Setup(cls)
    setup.step(3)
    sd = setup.opt.state_dict()
    desc, name, mutated = data.draw(st.sampled_from(_mutations(sd)), label="mutation")
    before = setup.snapshot()
    try:
        setup.opt.load_state_dict(mutated)
    except ValueError as err:
        assert name in str(err), f"{desc}: {err}"
        assert_unchanged(setup, before)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setup.step(2)
    assert weights_finite(setup), f"{desc} loaded and the weights went non-finite"


class _Reads(dict):
    """A param group that records every key a check reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


@pytest.mark.parametrize("parts", [("torch", "sgd", "hd"), ("torch", "sgd", "ift", "ift-sgd"),
                                   ("torch", "sgd", "fds"), ("torch", "adam", "marthe")])
def test_each_constraint_declares_every_group_key_it_reads(parts):
    # refresh_passed re-checks only the constraints that read a value the step changed: a
    # constraint that read an undeclared key would be skipped when that key changed.
    group = {"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "nesterov": True,
             "lr_bounds": (0.0, 1.0), "tune": ["lr", "momentum", "weight_decay"],
             "per_parameter_lr": True, "per_parameter_weight_decay": True, "horizon": 10,
             **{f"{n}_windows": 2 for n in ("lr", "momentum", "weight_decay")},
             **{f"{n}_schedule": [0.1, 0.1] for n in ("lr", "momentum", "weight_decay")}}
    for check, reads in options_module._CONSTRAINTS:
        recorded = _Reads(group)
        check(parts, recorded)
        assert recorded.read <= reads, (check.__name__, recorded.read - reads)
