"""Generic tests that every optimizer configuration in ``optim_db`` must pass (docs/design.md §5)."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from optim_db import OPTIMIZER_DB, OptimizerInfo, OptimizerInput, all_inputs, input_id
from torch import nn

from hyperoptim.core.serialization import EXTRA_STATE_KEY

CASES = all_inputs()


class Problem:
    """A small regression: an MLP, four fixed training batches and a validation set."""

    def __init__(self, dtype: torch.dtype = torch.float64, seed: int = 0, unused: bool = False):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
        if unused:
            self.model.register_parameter("unused", nn.Parameter(torch.ones(3, dtype=dtype)))
        w = torch.randn(4, 1, generator=gen, dtype=dtype)
        x = torch.randn(96, 4, generator=gen, dtype=dtype)
        y = torch.tanh(x @ w) + 0.05 * torch.randn(96, 1, generator=gen, dtype=dtype)
        self.batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
        self.xv, self.yv = x[64:], y[64:]

    def loss(self, t: int) -> torch.Tensor:
        x, y = self.batches[t % len(self.batches)]
        return nn.functional.mse_loss(self.model(x), y)

    def full_loss(self) -> float:
        with torch.no_grad():
            return sum(self.loss(t).item() for t in range(len(self.batches)))

    def val_loss(self) -> torch.Tensor:
        return nn.functional.mse_loss(self.model(self.xv), self.yv)

    def closure(self, opt: torch.optim.Optimizer, t: int, backward: bool = True):
        def closure() -> torch.Tensor:
            loss = self.loss(t)
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss

        return closure

    def loss_closure(self, t: int):
        """A closure that returns batch ``t``'s loss without calling ``backward()``."""
        return lambda: self.loss(t)

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


def build(info: OptimizerInfo, inp: OptimizerInput, prob: Problem, **extra):
    kwargs = dict(inp.kwargs, **extra)
    if inp.use_val or info.needs_val:
        kwargs["val_closure"] = prob.val_loss
    return info.cls(prob.model.parameters(), **kwargs)


def run(info: OptimizerInfo, opt, prob: Problem, start: int, n: int, backward: bool = True):
    loss = None
    for t in range(start, start + n):
        loss = info.step(opt, prob.closure(opt, t, backward), t)
    return loss


def hyper_groups(opt) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def assert_same_params(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize(
    "info,err",
    [(info, e) for info in OPTIMIZER_DB for e in info.error_inputs],
    ids=lambda v: v.desc if hasattr(v, "error_regex") else v.name,
)
def test_errors(info, err):
    with pytest.raises(err.error_type, match=err.error_regex):
        info.cls([nn.Parameter(torch.zeros(2))], **err.kwargs)


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_loss_goes_down(case):
    info, inp = case
    if not info.lr_decreases_loss:
        pytest.skip(f"{info.name} covers descent in its own tests")
    prob = Problem()
    opt = build(info, inp, prob)
    before = prob.full_loss()
    run(info, opt, prob, 0, 30)
    after = prob.full_loss()
    assert math.isfinite(after) and after < 0.9 * before, (before, after)


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_no_grad_is_noop(case):
    info, inp = case
    prob = Problem()
    opt = build(info, inp, prob)
    before = prob.params()
    if not info.second_order:
        opt.step()  # no closure and no .grad anywhere
        assert_same_params(before, prob.params())
    zero = torch.zeros((), dtype=torch.float64, requires_grad=True)
    info.step(opt, lambda: zero * 1.0, 0)  # a loss that no parameter enters
    assert_same_params(before, prob.params())


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_state_dict_resumes_in_lockstep(case):
    info, inp = case
    prob = Problem()
    opt = build(info, inp, prob)
    run(info, opt, prob, 0, 10)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)

    prob2 = Problem()
    prob2.model.load_state_dict(prob.model.state_dict())
    opt2 = build(info, inp, prob2, **_fresh_kwargs(inp))
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert hyper_groups(opt2) == hyper_groups(opt)

    run(info, opt, prob, 10, 10)
    run(info, opt2, prob2, 10, 10)
    assert_same_params(prob.params(), prob2.params())
    assert hyper_groups(opt2) == hyper_groups(opt)
    assert opt2.history == opt.history


def _fresh_kwargs(inp: OptimizerInput) -> dict:
    """A fresh optimizer is built from other initial values: loading must restore them."""
    return {"lr": inp.kwargs["lr"] * 0.5} if "lr" in inp.kwargs else {}


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_deepcopy_and_repr(case):
    info, inp = case
    prob = Problem()
    opt = build(info, inp, prob)
    run(info, opt, prob, 0, 3)
    clone = copy.deepcopy(opt)
    assert type(clone) is type(opt)
    assert hyper_groups(clone) == hyper_groups(opt)
    assert clone.history == opt.history and clone.history is not opt.history
    text = repr(opt)
    assert text.startswith(info.name) and "lr" in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_dtypes(case, dtype):
    info, inp = case
    prob = Problem(dtype=dtype)
    opt = build(info, inp, prob)
    run(info, opt, prob, 0, 6)
    for p in prob.model.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
        for value in opt.state[p].values():
            if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0:
                assert value.dtype == dtype
    for group in opt.param_groups:
        assert isinstance(group["lr"], float) and math.isfinite(group["lr"])


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_unused_parameter(case):
    info, inp = case
    prob = Problem(unused=True)
    opt = build(info, inp, prob)
    run(info, opt, prob, 0, 5)
    assert torch.equal(prob.model.unused, torch.ones(3, dtype=torch.float64))
    assert prob.model.unused.grad is None


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_closure_with_and_without_backward(case):
    """Both closure styles give the same run on the same HVP route (the finite-difference
    route is the one that serves both)."""
    info, inp = case
    extra = {"hvp": "finite_difference"} if info.second_order else {}
    a, b = Problem(), Problem()
    opt_a, opt_b = build(info, inp, a, **extra), build(info, inp, b, **extra)
    run(info, opt_a, a, 0, 8, backward=True)
    run(info, opt_b, b, 0, 8, backward=False)
    for x, y in zip(a.params(), b.params()):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        assert ga["lr"] == pytest.approx(gb["lr"], rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_auto_route_follows_the_closure_style(case):
    """hvp="auto" is exactly "exact" for a closure that returns the loss, and exactly
    "finite_difference" for one that calls backward(); "exact" refuses the latter."""
    info, inp = case
    if not info.second_order:
        pytest.skip("first-order method: no HVP route")
    for backward, route in ((False, "exact"), (True, "finite_difference")):
        a, b = Problem(), Problem()
        opt_a, opt_b = build(info, inp, a), build(info, inp, b, hvp=route)
        run(info, opt_a, a, 0, 8, backward=backward)
        run(info, opt_b, b, 0, 8, backward=backward)
        assert_same_params(a.params(), b.params())
        assert hyper_groups(opt_a) == hyper_groups(opt_b)
        assert opt_a.hvp_route in (None, route)
    if opt_a.hvp_route is None:
        return  # this configuration never needed an HVP in 8 steps
    c = Problem()
    opt_c = build(info, inp, c, hvp="exact")
    with pytest.raises(ValueError, match="hvp='finite_difference'"):
        run(info, opt_c, c, 0, 8, backward=True)


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_drop_in_without_closure(case):
    info, inp = case
    if info.second_order:
        pytest.skip("second-order methods need a closure; they say so in a ValueError")
    prob = Problem()
    opt = build(info, inp, prob)
    for t in range(5):
        opt.zero_grad()
        prob.loss(t).backward()
        opt.step()
    assert len(opt.history[0]["lr"]) == 5


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_nan_validation_loss_is_skipped(case):
    info, inp = case
    if not (inp.use_val or info.needs_val):
        pytest.skip("training-loss mode has no validation loss")
    prob = Problem()
    opt = build(info, inp, prob)
    run(info, opt, prob, 0, 3)
    before, groups = prob.params(), hyper_groups(opt)
    skipped = sum(opt.history[0].get("skipped", []))
    opt.val_closure = lambda: prob.val_loss() * float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        for t in range(3, 5):
            info.step(opt, prob.closure(opt, t), t)
    assert_same_params(before, prob.params())
    assert hyper_groups(opt) == groups
    assert sum(opt.history[0]["skipped"]) > skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.val_closure = prob.val_loss
        run(info, opt, prob, 5, 2)  # recovers, and warns only once


@pytest.mark.parametrize("frozen", ["all_frozen", "integer_tensor", "empty_group"])
@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_nothing_trainable_is_a_no_op_like_torch_sgd(case, frozen):
    """torch.optim.SGD steps a frozen model without error; so does every configuration (it used to
    crash at the first step: "`inputs` argument to `grad()` cannot be empty")."""
    info, inp = case
    prob = Problem()
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))  # outside the optimizer
    for p in prob.model.parameters():
        p.requires_grad_(False)
    params = {"all_frozen": list(prob.model.parameters()),
              "integer_tensor": [torch.zeros(3, dtype=torch.long)],
              "empty_group": [{"params": []}]}[frozen]
    kwargs = dict(inp.kwargs)
    if inp.use_val or info.needs_val:
        kwargs["val_closure"] = prob.val_loss
    opt = info.cls(params, **kwargs)
    before = prob.params()
    for t in range(8):
        def closure(t=t):
            loss = prob.loss(t) + (extra**2).sum()
            if t % 2:  # both closure styles
                loss.backward()
            return loss

        info.step(opt, closure, t)
    assert_same_params(before, prob.params())


# ---------------------------------------------------------------------- the gradient contract
_TORCH_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq")


def _first_step_state(opt, prob: Problem) -> list[torch.Tensor]:
    """The weights and torch's per-parameter buffers after a step, in a fixed order (learned
    per-weight values may already depend on a Hessian product at the first step)."""
    out = prob.params()
    for p in prob.model.parameters():
        out += [opt.state[p][k] for k in _TORCH_STATE if k in opt.state[p]]
    return out


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_prepared_gradient_is_the_steps_gradient(case):
    """Gradients accumulated over two batches, then ``step(closure)`` with a closure that returns
    the last batch's loss: the step uses the accumulated gradient in ``p.grad`` (as torch.optim
    does), not the closure's. At the first step no Hessian product reaches the weights or the
    state, so it equals a step whose closure returns the sum of both losses."""
    info, inp = case
    a, b = Problem(), Problem()
    opt_a, opt_b = build(info, inp, a), build(info, inp, b)
    a.loss(0).backward()
    a.loss(1).backward()
    info.step(opt_a, lambda: a.loss(1), 0)
    info.step(opt_b, lambda: b.loss(0) + b.loss(1), 0)
    for x, y in zip(_first_step_state(opt_a, a), _first_step_state(opt_b, b)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_clipped_gradient_is_the_steps_gradient(case):
    """``clip_grad_norm_`` before ``step(closure)``: the clipped gradient is stepped, never a
    recomputed unclipped one (equal at the first step to a closure whose loss is scaled by the
    clipping factor)."""
    info, inp = case
    a, b = Problem(), Problem()
    opt_a, opt_b = build(info, inp, a), build(info, inp, b)
    a.loss(0).backward()
    norm = float(nn.utils.clip_grad_norm_(a.model.parameters(), 0.01))
    coef = 0.01 / (norm + 1e-6)
    assert coef < 0.1
    info.step(opt_a, lambda: a.loss(0), 0)
    info.step(opt_b, lambda: b.loss(0) * coef, 0)
    for x, y in zip(_first_step_state(opt_a, a), _first_step_state(opt_b, b)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_stale_gradient_is_not_stepped_again(case):
    """With closures that return the loss and no ``zero_grad()`` in the loop, a parameter that
    gets no gradient in a step is not moved (no momentum, no weight decay), as with torch.optim
    and the ``backward()`` closure style; the others keep learning from their fresh gradients."""
    info, inp = case
    prob = Problem(unused=True)
    opt = build(info, inp, prob)
    extra = prob.model.unused

    def loss(t: int) -> torch.Tensor:
        return prob.loss(t) + (extra.sum() ** 2 * 1e-2 if t == 0 else 0.0)

    for t in range(6):
        info.step(opt, lambda t=t: loss(t), t)
        if t == 0:
            after_first = extra.detach().clone()
    assert torch.equal(extra, after_first)


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_layer_frozen_after_the_first_step(case):
    """A layer frozen (``requires_grad_(False)``) after the first step stays where it is, and the
    other layers keep training, with both closure styles."""
    info, inp = case
    for backward in (False, True):
        prob = Problem()
        opt = build(info, inp, prob)
        run(info, opt, prob, 0, 1, backward=backward)
        last = prob.model[2]
        last.requires_grad_(False)
        frozen = [p.detach().clone() for p in last.parameters()]
        run(info, opt, prob, 1, 5, backward=backward)
        assert all(torch.equal(p, q) for p, q in zip(last.parameters(), frozen))
        assert all(torch.isfinite(p).all() for p in prob.model.parameters())


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_step_never_writes_the_users_gradient(case):
    """``p.grad`` prepared before ``step()`` keeps its values and its version counter (a graph
    built on it can still be differentiated), with and without ``maximize``."""
    info, inp = case
    for maximize in (False, True):
        prob = Problem()
        try:
            opt = build(info, inp, prob, maximize=maximize)
        except ValueError:
            assert maximize  # the Adam family refuses maximize=True
            continue
        prob.loss(0).backward()
        grads = [(p.grad, p.grad.clone(), p.grad._version) for p in prob.model.parameters()]
        info.step(opt, prob.loss_closure(0), 0)
        for p, (g, value, version) in zip(prob.model.parameters(), grads):
            assert p.grad is g and g._version == version and torch.equal(g, value)


# ---------------------------------------------------------------------- torch.optim's contracts
@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_global_step_hooks_fire_once_per_step(case):
    """``register_optimizer_step_pre_hook``/``post_hook`` see the user's optimizer once per step
    and no optimizer the user never made (IFT's internal hyper optimizer stepped through them)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    info, inp = case
    prob = Problem()
    opt = build(info, inp, prob)
    seen: list[tuple[str, object]] = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("pre", o))),
               register_optimizer_step_post_hook(lambda o, a, k: seen.append(("post", o)))]
    try:
        run(info, opt, prob, 0, 4)
    finally:
        for handle in handles:
            handle.remove()
    assert [kind for kind, _ in seen] == ["pre", "post"] * 4
    assert all(o is opt for _, o in seen)


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_no_empty_state_entries(case):
    """As in torch.optim, ``state`` holds an entry only for a parameter with something in it."""
    info, inp = case
    prob = Problem()
    opt = build(info, inp, prob)
    run(info, opt, prob, 0, 4)
    assert all(len(entry) > 0 for entry in opt.state.values())
    assert all(len(entry) > 0 for entry in opt.state_dict()["state"].values())


def _torch_twin(info: OptimizerInfo, inp: OptimizerInput, params):
    """The torch.optim optimizer this configuration steps like, with its torch-named values."""
    adam = "betas" in info.cls([nn.Parameter(torch.zeros(1))], **_torch_free(info, inp)).defaults
    decoupled = info.name.endswith("W")
    cls = (torch.optim.AdamW if decoupled else torch.optim.Adam) if adam else torch.optim.SGD
    names = ("lr", "betas", "eps", "weight_decay") if adam else ("lr", "momentum", "dampening",
                                                                  "weight_decay", "nesterov")
    kwargs = {k: v for k, v in inp.kwargs.items() if k in names}
    if not adam and kwargs.get("dampening") and info.name in ("IFTOptimizer", "FDSSGD"):
        kwargs.pop("dampening")
    if info.name == "FDSSGD":
        kwargs["lr"] = 0.05
    return cls(params, **kwargs)


def _torch_free(info: OptimizerInfo, inp: OptimizerInput) -> dict:
    kwargs = dict(inp.kwargs)
    if info.needs_val or inp.use_val:
        kwargs["val_closure"] = lambda: torch.zeros(())
    return kwargs


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_torch_checkpoint_migrates(case):
    """The matching torch.optim optimizer's state dict loads (README's migration claim): its
    values and per-parameter state are kept, the hyper state is fresh, history notes it, and
    training continues."""
    info, inp = case
    src, prob = Problem(), Problem()
    ref = _torch_twin(info, inp, src.model.parameters())
    for t in range(3):
        ref.step(src.closure(ref, t))
    prob.model.load_state_dict(src.model.state_dict())
    opt = build(info, inp, prob)
    opt.load_state_dict(ref.state_dict())
    for i, (a, b) in enumerate(zip(opt.param_groups, ref.param_groups)):
        for key in ("lr", "momentum", "betas", "eps", "weight_decay"):
            if key in a:
                assert a[key] == b[key], (i, key)
        assert any("torch.optim" in note for note in opt.history[i]["note"])
    for p, q in zip(prob.model.parameters(), src.model.parameters()):
        for key, value in ref.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    run(info, opt, prob, 0, 4)  # t counts this optimizer's steps (FDSSGD's episode ends)
    assert all(torch.isfinite(p).all() for p in prob.model.parameters())


def test_torch_checkpoint_of_another_kind_is_refused():
    from hyperoptim import HypergradAdam, HypergradAdamW, HypergradSGD

    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="torch.optim.Adam state dict"):
        HypergradSGD(p).load_state_dict(torch.optim.Adam(p).state_dict())
    with pytest.raises(ValueError, match="torch.optim.AdamW state dict"):
        HypergradAdam(p).load_state_dict(torch.optim.AdamW(p).state_dict())
    HypergradAdamW(p).load_state_dict(torch.optim.AdamW(p).state_dict())


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_state_dict_weights_only_round_trip_is_deterministic(case):
    """torch.load(weights_only=True) reads the state dict (only tensors and plain containers),
    and two state dicts of the same optimizer, or of a reloaded copy, are equal."""
    info, inp = case
    prob = Problem()
    opt = build(info, inp, prob)
    run(info, opt, prob, 0, 5)
    first, second = opt.state_dict(), opt.state_dict()
    buffer = io.BytesIO()
    torch.save(first, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    twin = Problem()
    twin.model.load_state_dict(prob.model.state_dict())
    opt2 = build(info, inp, twin)
    opt2.load_state_dict(loaded)
    for sd in (second, loaded, opt2.state_dict()):
        _assert_same_tree(first, sd)


def _assert_same_tree(a, b, path="sd"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (path, set(a) ^ set(b))
        for k in a:
            _assert_same_tree(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), (path, a, b)


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_instance_step_hooks_fire_once_per_step(case):
    info, inp = case
    prob = Problem()
    opt = build(info, inp, prob)
    seen: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    run(info, opt, prob, 0, 3)
    assert seen == ["pre", "post"] * 3


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_zero_gradients_are_a_noop(case):
    """torch's test_step_is_noop_for_zero_grads: with every gradient exactly 0 and no weight
    decay, a step leaves the weights where they are (momentum buffers start at 0)."""
    info, inp = case
    if inp.kwargs.get("weight_decay", 0.0) != 0.0 or info.name.startswith("HypergradAdamW") \
            or info.name.startswith("MartheAdamW") or info.name.startswith("IFTAdamW"):
        pytest.skip("weight decay moves weights without a gradient")
    if info.name.startswith("IFT") and "weight_decay" in inp.kwargs.get("tune", ("weight_decay",)):
        # IFTOptimizer steps the 1e-7 floor; IFTAdam learns the decay up from it, and Adam's
        # normalisation turns any decay into a step of about lr where the gradient is 0.
        pytest.skip("a tuned weight decay of 0 starts at its 1e-7 floor and learns")
    prob = Problem()
    opt = build(info, inp, prob)
    before = prob.params()
    for t in range(3):
        info.step(opt, lambda: prob.loss(0) * 0.0, t)
    assert_same_params(before, prob.params())


# ---------------------------------------------------------------------- schedulers
def _hf_linear_warmup(warmup: int, total: int):
    """Hugging Face's get_linear_schedule_with_warmup, as the LambdaLR it builds."""
    return lambda s: s / warmup if s < warmup else max(0.0, (total - s) / (total - warmup))


class _AssignEveryStep:
    """A user loop that sets a fixed learning rate before every step (no torch scheduler)."""

    def __init__(self, opt, lr: float = 0.01):
        self.opt, self.lr = opt, lr

    def step(self) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.lr


_SCALING = {
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.1, 1.0, total_iters=20),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 50),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.95),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
}
_OVERWRITING = {
    "hf_linear_warmup": lambda o: torch.optim.lr_scheduler.LambdaLR(o, _hf_linear_warmup(10, 100)),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=100),
    "assigned_every_step": _AssignEveryStep,
}
# One row per class; IFT's rows hyper-update at every step, so they are run here at every 5th
# (between hyper-updates the learned lr does not move, and only the steps after one can tell).
_SCHEDULED = [(info, info.inputs[0]) for info in OPTIMIZER_DB]


def _scheduled_warnings(info: OptimizerInfo, inp: OptimizerInput, schedule, steps: int = 30):
    prob = Problem()
    extra = {"update_interval": 5} if "update_interval" in inp.kwargs else {}
    opt = build(info, inp, prob, **extra)
    sched = schedule(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(steps):
            info.step(opt, prob.closure(opt, t), t)
            sched.step()
    return [str(w.message) for w in caught if "set from outside" in str(w.message)]


def _learns_lr(info: OptimizerInfo, inp: OptimizerInput) -> bool:
    return "lr" in inp.kwargs.get("tune", ("lr",))


@pytest.mark.parametrize("schedule", list(_SCALING.values()), ids=list(_SCALING))
@pytest.mark.parametrize("case", _SCHEDULED, ids=input_id)
def test_scaling_schedulers_compose_without_warning(case, schedule):
    """torch's chainable schedulers stepped every step multiply the current value: what the
    optimizer learned is kept, scaled, so nothing is reported, whatever the class (IFT's learned
    lr moves only every ``update_interval`` steps). FDS learns the schedule itself: any scheduler
    rewrites a window of it, which it reports in its own words."""
    info, inp = case
    messages = _scheduled_warnings(info, inp, schedule)
    if info.name.startswith("FDS"):
        assert len(messages) == 1 and "replaced window" in messages[0], messages
    else:
        assert not messages, messages


@pytest.mark.parametrize("schedule", list(_OVERWRITING.values()), ids=list(_OVERWRITING))
@pytest.mark.parametrize("case", _SCHEDULED, ids=input_id)
def test_overwriting_schedules_are_reported_once(case, schedule):
    """A schedule that sets the value from its own formula, whatever was learned (LambdaLR as
    Hugging Face builds it, OneCycleLR, a fixed lr assigned before every step), erases what the
    optimizer learns: one warning, for every class, IFT's hyper-updates every 5 steps included."""
    info, inp = case
    messages = _scheduled_warnings(info, inp, schedule)
    if info.name.startswith("FDS"):
        assert len(messages) == 1 and "replaced window" in messages[0], messages
    elif _learns_lr(info, inp):
        assert len(messages) == 1 and "rather than scaling it" in messages[0], messages


# ------------------------------------------------------- torch.optim's contracts (TestOptimRenewed)
# torch's flags added after its optimizers first shipped (OptimizerInfo.not_og_supported_flags):
# a state dict saved before them lacks them.
_NEWER_FLAGS = ("foreach", "differentiable", "fused", "maximize", "capturable")


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_older_state_dict_loads_and_steps_alike(case):
    """torch's test_can_load_older_state_dict and test_load_nontensor_step: a state dict without
    the newer flags and with a float ``step`` loads, and the run continues exactly."""
    info, inp = case
    prob = Problem()
    opt = build(info, inp, prob)
    run(info, opt, prob, 0, 3)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in _NEWER_FLAGS:
            group.pop(flag, None)
    for entry in old["state"].values():
        if torch.is_tensor(entry.get("step")):
            entry["step"] = entry["step"].item()
    twin = Problem()
    twin.model.load_state_dict(prob.model.state_dict())
    opt2 = build(info, inp, twin)
    opt2.load_state_dict(old)
    run(info, opt, prob, 3, 3)
    run(info, opt2, twin, 3, 3)
    assert_same_params(prob.params(), twin.params())


@pytest.mark.parametrize("named", [(True, False), (False, True)],
                         ids=["named_to_plain", "plain_to_named"])
@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_named_parameters_state_dict(case, named):
    """torch's test_can_load_from_to_named_state_dict: parameters given as
    ``named_parameters()``; the state dict loads either way, the run continues exactly, and the
    names are kept."""
    info, inp = case
    prob, twin = Problem(), Problem()

    def make(p: Problem, is_named: bool):
        kwargs = dict(inp.kwargs)
        if inp.use_val or info.needs_val:
            kwargs["val_closure"] = p.val_loss
        params = p.model.named_parameters() if is_named else p.model.parameters()
        return info.cls(params, **kwargs)

    opt = make(prob, named[0])
    run(info, opt, prob, 0, 3)
    twin.model.load_state_dict(prob.model.state_dict())
    opt2 = make(twin, named[1])
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(info, opt, prob, 3, 2)
    run(info, opt2, twin, 3, 2)
    assert_same_params(prob.params(), twin.params())
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert opt2.state_dict()["param_groups"][0]["param_names"] == names


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_param_group_options_take_effect(case):
    """torch's test_param_groups_lr and test_param_groups_weight_decay: options given in a param
    group, not the constructor, are the ones used (the run equals the flat one bit for bit); a
    group whose parameters get no gradient stays put; and values assigned to a group during the
    run change the next step."""
    info, inp = case
    flat, grouped = Problem(), Problem()
    opt = build(info, inp, flat)
    per_group = {k: v for k, v in inp.kwargs.items() if k in opt.defaults}
    outer = dict(inp.kwargs)  # required arguments (FDS's horizon) stay in the constructor
    if per_group.get("lr"):
        outer["lr"] = per_group["lr"] * 0.5
    if per_group.get("weight_decay"):
        outer["weight_decay"] = per_group["weight_decay"] * 2.0
    if inp.use_val or info.needs_val:
        outer["val_closure"] = grouped.val_loss
    irrelevant = nn.Parameter(torch.randn(2, 2, dtype=torch.float64))
    before = irrelevant.detach().clone()
    opt2 = info.cls([{"params": list(grouped.model.parameters()), **per_group},
                     {"params": [irrelevant]}], **outer)
    run(info, opt, flat, 0, 4)
    run(info, opt2, grouped, 0, 4)
    assert_same_params(flat.params(), grouped.params())
    assert torch.equal(irrelevant, before)
    # Assigned values: the lr in one run, the weight decay in the other, each against a third.
    ref = Problem()
    opt3 = build(info, inp, ref)
    run(info, opt3, ref, 0, 5)
    for name, o, p in (("lr", opt2, grouped), ("weight_decay", opt, flat)):
        value = o.param_groups[0].get(name)
        if not isinstance(value, float) or value == 0.0:
            continue
        o.param_groups[0][name] = value * 0.5
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(info, o, p, 4, 1)
        # FDS learns the schedule itself: the assigned value replaces this window's, and it says so
        assert all("replaced window" in str(w.message) for w in caught), caught
        assert any(not torch.equal(a, b) for a, b in zip(p.params(), ref.params())), name


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_tensor_lr_steps_as_the_float(case):
    """torch's test_tensor_lr: a 0-dim tensor ``lr`` gives the float's run."""
    info, inp = case
    if "lr" not in inp.kwargs:
        pytest.skip("the class's default lr")
    a, b = Problem(), Problem()
    opt_a = build(info, inp, a)
    opt_b = build(info, inp, b, lr=torch.tensor(inp.kwargs["lr"], dtype=torch.float64))
    run(info, opt_a, a, 0, 5)
    run(info, opt_b, b, 0, 5)
    for x, y in zip(a.params(), b.params()):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_torch_style_hooks(case):
    """torch's test_step_all_hooks, test_state_dict_pre_post_hook and
    test_load_state_dict_pre_hook_and_prepend / _post_hook, as torch writes them: parameters
    without gradients and a closure that returns ``1`` (nothing to differentiate: any value is
    returned, as torch does)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    info, inp = case
    kwargs = _torch_free(info, inp)
    params = [torch.tensor([1.0, 1.0], dtype=torch.float64)]
    opt, other = info.cls(params, **kwargs), torch.optim.SGD(params)
    data: list[int] = []
    handles = [register_optimizer_step_pre_hook(lambda *a: data.append(0)),
               register_optimizer_step_post_hook(lambda *a: data.append(5)),
               opt.register_step_pre_hook(lambda *a: data.append(1)),
               opt.register_step_post_hook(lambda *a: data.append(2))]
    try:
        assert info.step(opt, lambda: 1, 0) == 1
        other.step(lambda: 1)
        info.step(opt, lambda: 1, 1)
    finally:
        for handle in handles:
            handle.remove()
    info.step(opt, lambda: 1, 2)
    assert data == [0, 1, 2, 5, 0, 5, 0, 1, 2, 5]

    param = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    opt = info.cls([param], **kwargs)

    def post(o, sd):
        sd["ran_pre_hook"] = sd["state"].pop("test", None) == 1
        return sd

    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("test", 1))
    opt.register_state_dict_post_hook(post)
    saved = opt.state_dict()
    assert "test" not in saved["state"] and saved["ran_pre_hook"]

    opt = info.cls([param], **kwargs)
    saved = opt.state_dict()

    def set_lr(value):
        def hook(o, sd):
            sd = copy.deepcopy(sd)
            sd["param_groups"][0]["lr"] = value
            return sd
        return hook

    opt.register_load_state_dict_pre_hook(set_lr(0.002))
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(set_lr(0.003), prepend=True)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.002  # the prepended hook ran first
    opt.register_load_state_dict_post_hook(lambda o: o.state.__setitem__("ran_post_hook", True))
    opt.load_state_dict(saved)
    assert opt.state["ran_post_hook"] is True


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_torch_style_no_grad_and_zero_grad_steps(case):
    """torch's test_step_is_noop_when_params_have_no_grad and test_step_is_noop_for_zero_grads
    as torch writes them: a closure that returns a constant ``tensor([1])``; parameters that do
    not require grad, or whose gradients were set to exact zeros before the step (without weight
    decay), stay where they are."""
    info, inp = case
    params = [torch.randn(2, 3, dtype=torch.float64) for _ in range(2)]
    before = [p.clone() for p in params]
    opt = info.cls(params, **_torch_free(info, inp))
    info.step(opt, lambda: torch.tensor([1.0], dtype=torch.float64), 0)
    assert_same_params(before, params)
    if inp.kwargs.get("weight_decay", 0.0) != 0.0 or info.name.endswith("W"):
        return  # weight decay moves weights without a gradient
    param = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    before = [param.detach().clone()]
    kwargs = dict(inp.kwargs)
    if info.needs_val or inp.use_val:
        kwargs["val_closure"] = lambda: (param**2).sum()
    opt = info.cls([param], **kwargs)
    param.grad = torch.zeros_like(param)
    info.step(opt, lambda: torch.tensor([1.0], dtype=torch.float64), 0)
    assert_same_params(before, [param])


@pytest.mark.parametrize("case", CASES, ids=input_id)
def test_deepcopy_keeps_public_attributes_and_state_dicts_agree(case):
    """torch's test_deepcopy_copies_all_public_attrs and test_state_dict_deterministic: a deep
    copy has the same public attributes; an optimizer loaded from another's state dict runs in
    lockstep and ends with an equal state dict; repeated param groups are saved alike."""
    info, inp = case
    prob = Problem()
    opt = build(info, inp, prob)
    run(info, opt, prob, 0, 3)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert {k for k in vars(copy.deepcopy(opt)) if not k.startswith("_")} == public
    twin = Problem()
    twin.model.load_state_dict(prob.model.state_dict())
    opt2 = build(info, inp, twin)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(info, opt, prob, 3, 4)
    run(info, opt2, twin, 3, 4)
    assert_same_params(prob.params(), twin.params())
    _assert_same_tree(opt.state_dict(), opt2.state_dict())
    opt2.param_groups.extend(opt2.param_groups)
    # The first saved group also carries the package's own state for torch.distributed.checkpoint
    # (EXTRA_STATE_KEY, docs/design.md §8); a repeat of it is saved like the group itself.
    saved = {k: v for k, v in opt.state_dict()["param_groups"][-1].items() if k != EXTRA_STATE_KEY}
    _assert_same_tree(saved, opt2.state_dict()["param_groups"][-1])
