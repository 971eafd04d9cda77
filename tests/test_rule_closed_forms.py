"""The rules' closed-form derivatives (UpdateRule.tangents, and rule_vjp / rule_diagonals built on
them) against the generic autograd paths they replace, to rounding in float64; and the methods
that use them (MARTHE, FDS, IFT over SGD and Adam) on the same trajectories as with the generic
paths."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hyperoptim
import hyperoptim.fds
from hyperoptim.rules import ADAM, RULES, SGD, rule_diagonals, rule_tangents, rule_vjp
from hyperoptim.rules.sgd import sgd_tangents

F64 = torch.float64
SHAPES = [(3, 4), (4,), (2, 2, 2)]
N_COLS = 3


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def _rel_err(got: list[torch.Tensor | None], want: list[torch.Tensor | None]) -> float:
    """max |got - want| / max |want| over every tensor (``None`` must match ``None``)."""
    assert [g is None for g in got] == [w is None for w in want]
    pairs = [(g, w) for g, w in zip(got, want, strict=True) if w is not None]
    scale = max(w.abs().max().item() for _, w in pairs)
    return max((g - w).abs().max().item() for g, w in pairs) / max(scale, 1e-300)


def _flat(out: tuple[list[torch.Tensor], dict[str, list[torch.Tensor | None]]]
          ) -> list[torch.Tensor | None]:
    return list(out[0]) + [t for name in sorted(out[1]) for t in out[1][name]]


def _sgd_case(seed: int, first_step: bool, weight_decay: float, momentum: float):
    gen = torch.Generator().manual_seed(seed)
    params = [_rand(gen, *s) for s in SHAPES]
    grads = [_rand(gen, *s) for s in SHAPES]
    bufs = [None if first_step or momentum == 0 else _rand(gen, *s) for s in SHAPES]
    tangents = {"momentum_buffer": [None if b is None else _rand(gen, N_COLS, *s)
                                    for b, s in zip(bufs, SHAPES)]}
    hypers = dict(lr=0.1, momentum=momentum, weight_decay=weight_decay)
    return params, grads, {"momentum_buffer": bufs}, hypers, tangents, None, gen


def _adam_case(seed: int, first_step: bool, weight_decay: float, dead: bool = False):
    gen = torch.Generator().manual_seed(seed)
    params = [_rand(gen, *s) for s in SHAPES]
    grads = [_rand(gen, *s) for s in SHAPES]
    if first_step:  # torch's fresh state: zero moments, t = 1 (bias corrections 1 - beta)
        m = [torch.zeros(s, dtype=F64) for s in SHAPES]
        v = [torch.zeros(s, dtype=F64) for s in SHAPES]
    else:
        m = [_rand(gen, *s) for s in SHAPES]
        v = [_rand(gen, *s).abs() for s in SHAPES]
    if dead:  # a unit whose gradient has always been 0: v' = 0 where sqrt has no derivative
        grads[0][0] = 0.0
        m[0][0] = 0.0
        v[0][0] = 0.0
    tangents = {"exp_avg": [_rand(gen, N_COLS, *s) for s in SHAPES],
                "exp_avg_sq": [_rand(gen, N_COLS, *s) for s in SHAPES]}
    hypers = dict(lr=0.01, beta1=0.8, beta2=0.95, weight_decay=weight_decay)
    counts = [1.0 if first_step else 7.0] * len(SHAPES)
    return params, grads, {"exp_avg": m, "exp_avg_sq": v}, hypers, tangents, counts, gen


SGD_CASES = [dict(nesterov=n, dampening=d, first_step=f, weight_decay=c, momentum=b)
             for n in (False, True) for d in (0.0, 0.3) for f in (False, True)
             for c in (0.0, 0.05) for b in (0.0, 0.9) if not (n and (d or not b))]
ADAM_CASES = [dict(decoupled=dc, maximize=mx, first_step=f, weight_decay=c, dead=dead)
              for dc in (False, True) for mx in (False, True) for f in (False, True)
              for c in (0.0, 0.05) for dead in (False, True) if not (f and dead)]


def _both(rule, case, seeds, incoming=True, **options):
    """rule_tangents by the closed form and by autograd, on one random state."""
    params, grads, buffers, hypers, tangents, counts, gen = case
    z = [_rand(gen, N_COLS, *s) for s in SHAPES] if incoming else None
    hz = [_rand(gen, N_COLS, *s) for s in SHAPES] if incoming else None
    if not incoming:
        tangents = {k: [None] * len(v) for k, v in tangents.items()}
    args = (rule, params, grads, buffers, hypers, z, hz, tangents, seeds)
    closed = rule_tangents(*args, counts=counts, **options)
    generic = rule_tangents(*args, counts=counts, generic=True, **options)
    return closed, generic


def _seeds(names, gen):
    return {k: _rand(gen, N_COLS) for k in names}


def test_the_built_in_rules_register_closed_forms():
    assert RULES["sgd"].tangents is not None and RULES["adam"].tangents is not None


@pytest.mark.parametrize("case", SGD_CASES, ids=str)
@pytest.mark.parametrize("incoming", [True, False], ids=["incoming", "fixed-state"])
def test_sgd_closed_tangents_equal_autograd(case, incoming):
    """Every column of the SGD closed form (weights and buffer, all three hyperparameters seeded,
    random incoming tangents or none) against the double-vjp generic path and torch.func.jvp."""
    c = dict(case)
    options = dict(nesterov=c.pop("nesterov"), dampening=c.pop("dampening"))
    state = _sgd_case(1, c["first_step"], c["weight_decay"], c["momentum"])
    seeds = _seeds(("lr", "momentum", "weight_decay"), state[-1])
    closed, generic = _both(SGD, state, seeds, incoming, **options)
    assert _rel_err(_flat(closed), _flat(generic)) < 1e-14
    if incoming:  # the jvp+vmap reference (every hyperparameter a tensor, so momentum is on)
        params, grads, buffers, hypers, tangents, _, gen = _sgd_case(1, c["first_step"],
                                                                     c["weight_decay"], 0.9)
        z = [_rand(gen, N_COLS, *s) for s in SHAPES]
        hz = [_rand(gen, N_COLS, *s) for s in SHAPES]
        hs = [torch.tensor(v, dtype=F64) for v in hypers.values()]
        want = sgd_tangents(params, grads, buffers["momentum_buffer"], *hs, z, hz,
                            tangents["momentum_buffer"], *seeds.values(), **options)
        got = rule_tangents(SGD, params, grads, buffers, hypers, z, hz, tangents, seeds, **options)
        assert _rel_err(got[0] + got[1]["momentum_buffer"], want[0] + want[1]) < 1e-14


@pytest.mark.parametrize("case", ADAM_CASES, ids=str)
@pytest.mark.parametrize("incoming", [True, False], ids=["incoming", "fixed-state"])
def test_adam_closed_tangents_equal_autograd(case, incoming):
    """Adam and AdamW (L2 or decoupled decay, maximize, the first step's bias corrections, a dead
    unit at v' = 0): weights and both moments, all four hyperparameters seeded."""
    options = dict(eps=1e-8, decoupled_weight_decay=case["decoupled"], maximize=case["maximize"])
    state = _adam_case(2, case["first_step"], case["weight_decay"], case["dead"])
    seeds = _seeds(("lr", "beta1", "beta2", "weight_decay"), state[-1])
    closed, generic = _both(ADAM, state, seeds, incoming, **options)
    assert _rel_err(_flat(closed), _flat(generic)) < 1e-13
    if case["dead"]:
        assert all(torch.isfinite(t).all() for t in _flat(closed))


@pytest.mark.parametrize("seeded", [(), ("lr",), ("beta1",), ("beta2", "weight_decay")], ids=str)
def test_adam_closed_tangents_with_some_hyperparameters_seeded(seeded):
    """Unseeded hyperparameters stay floats (the generic path does not differentiate them)."""
    state = _adam_case(3, False, 0.05)
    closed, generic = _both(ADAM, state, _seeds(seeded, state[-1]), True, eps=1e-8,
                            decoupled_weight_decay=True, maximize=False)
    assert _rel_err(_flat(closed), _flat(generic)) < 1e-13


def test_closed_tangents_take_per_parameter_hyperparameters():
    """A list of per-parameter (parameter-shaped) tensors for every hyperparameter: the closed form
    against the generic path one parameter at a time (it takes only scalars)."""
    params, grads, buffers, _, tangents, counts, gen = _adam_case(4, False, 0.05)
    hypers = dict(lr=[0.01 * (1 + _rand(gen, *s).abs()) for s in SHAPES],
                  beta1=[0.8 + 0.1 * torch.rand(s, generator=gen, dtype=F64) for s in SHAPES],
                  beta2=0.95, weight_decay=[0.05 * torch.rand(s, generator=gen, dtype=F64)
                                            for s in SHAPES])
    z = [_rand(gen, N_COLS, *s) for s in SHAPES]
    hz = [_rand(gen, N_COLS, *s) for s in SHAPES]
    seeds = _seeds(("beta2",), gen)
    got = rule_tangents(ADAM, params, grads, buffers, hypers, z, hz, tangents, seeds, counts=counts,
                        eps=1e-8, decoupled_weight_decay=False, maximize=False)
    for i in range(len(SHAPES)):
        one = {k: [v[i]] for k, v in buffers.items()}
        with torch.no_grad():
            # the generic path differentiates elementwise tensors hyperparameters too, as constants
            want = rule_tangents(ADAM, [params[i]], [grads[i]], one,
                                 {k: v[i] if isinstance(v, list) else v for k, v in hypers.items()},
                                 [z[i]], [hz[i]], {k: [v[i]] for k, v in tangents.items()}, seeds,
                                 counts=[counts[i]], generic=True, eps=1e-8,
                                 decoupled_weight_decay=False, maximize=False)
        assert _rel_err([got[0][i], got[1]["exp_avg"][i], got[1]["exp_avg_sq"][i]],
                        [want[0][0], want[1]["exp_avg"][0], want[1]["exp_avg_sq"][0]]) < 1e-13


def test_closed_tangents_never_alias_the_callers_tangents():
    """SGD's first momentum step has C_1 = G_0 = H Z: a new tensor, as the generic path gives
    (the methods add to their tangents in place)."""
    params, grads, buffers, hypers, tangents, _, gen = _sgd_case(5, True, 0.0, 0.9)
    z = [_rand(gen, 1, *s) for s in SHAPES]
    hz = [_rand(gen, 1, *s) for s in SHAPES]
    _, c_next = rule_tangents(SGD, params, grads, buffers, dict(hypers, lr=0.0), z, hz,
                              {"momentum_buffer": [None] * 3}, {})
    for c, h in zip(c_next["momentum_buffer"], hz, strict=True):
        assert torch.equal(c, h) and c.data_ptr() != h.data_ptr()
    z_next, _ = rule_tangents(SGD, params, grads, buffers, dict(hypers, lr=0.0), z, hz,
                              {"momentum_buffer": [None] * 3}, {})
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(z_next, z))


@pytest.mark.parametrize("rule,case,wrt,options", [
    (SGD, _sgd_case(6, False, 0.05, 0.9), ("lr", "momentum", "weight_decay"),
     dict(nesterov=True, dampening=0.0)),
    (SGD, _sgd_case(6, True, 0.0, 0.0), ("lr",), dict(nesterov=False, dampening=0.0)),
    (ADAM, _adam_case(6, False, 0.05), ("lr", "beta1", "beta2", "weight_decay"),
     dict(eps=1e-8, decoupled_weight_decay=False, maximize=True)),
    (ADAM, _adam_case(6, True, 0.05), ("lr", "weight_decay"),
     dict(eps=1e-8, decoupled_weight_decay=True, maximize=False)),
], ids=["sgd-nesterov", "sgd-plain", "adam-l2-maximize", "adamw-first-step"])
def test_closed_vjp_equals_torch_func_vjp(rule, case, wrt, options):
    """rule_vjp from the closed form (diagonal Jacobians, a column per hyperparameter) against
    torch.func.vjp, and rule_diagonals against the vjp of a vector of ones."""
    params, grads, buffers, hypers, _, counts, gen = case
    q = [_rand(gen, *s) for s in SHAPES]
    out = {}
    for generic in (False, True):
        new, vjp_fn = rule_vjp(rule, params, grads, buffers, hypers, wrt=wrt, counts=counts,
                               generic=generic, **options)
        dw, dg, dh = vjp_fn(q)
        out[generic] = (new, dw, dg, [dh[k] for k in wrt])
    for got, want in zip(out[False], out[True]):
        # Adam's first step has dw'/dg = a eps / (|g| + eps)^2 ~ 1e-10: a difference of O(a)
        # terms in both routes, so its rounding is absolute (on the scale of a, not of 1e-10).
        diff = max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))
        assert _rel_err(list(got), list(want)) < 1e-13 or diff < 1e-16
    dw_diag, dg_diag = rule_diagonals(rule, params, grads, buffers, hypers, counts, **options)
    _, vjp_fn = rule_vjp(rule, params, grads, buffers, hypers, wrt=(), counts=counts, generic=True,
                         **options)
    dw, dg, _ = vjp_fn([torch.ones_like(p) for p in params])
    assert _rel_err(dw_diag + dg_diag, dw + dg) < 1e-14


def test_rule_diagonals_refuses_a_rule_that_is_not_elementwise():
    with pytest.raises(ValueError, match="not elementwise"):
        rule_diagonals(dataclasses.replace(SGD, elementwise=False), [torch.ones(2)],
                       [torch.ones(2)], {"momentum_buffer": [None]},
                       dict(lr=0.1, momentum=0.0, weight_decay=0.0))


# ---------------------------------------------------------------- the methods, both ways
GENERIC_SGD = dataclasses.replace(SGD, tangents=None)
GENERIC_ADAM = dataclasses.replace(ADAM, tangents=None)


class _Problem:
    """A float64 tanh MLP with fixed batches; the closure returns the loss (exact HVP route)."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.init = [0.5 * _rand(gen, 4, 6), 0.1 * _rand(gen, 6), 0.5 * _rand(gen, 6, 2)]
        self.batches = [(_rand(gen, 16, 4), _rand(gen, 16, 2)) for _ in range(3)]
        self.val = (_rand(gen, 16, 4), _rand(gen, 16, 2))

    def params(self) -> list[torch.Tensor]:
        return [w.clone().requires_grad_() for w in self.init]

    @staticmethod
    def loss(ws, batch):
        x, y = batch
        return ((torch.tanh(x @ ws[0] + ws[1]) @ ws[2] - y) ** 2).mean()

    def closure(self, opt, ws, t):
        def run():
            opt.zero_grad()
            return self.loss(ws, self.batches[t % len(self.batches)])
        return run


def _run(prob: _Problem, make, steps: int, episode: int | None = None):
    ws = prob.params()
    opt = make(ws, lambda: prob.loss(ws, prob.val))
    for t in range(steps):
        opt.step(prob.closure(opt, ws, t))
        if episode is not None and (t + 1) % episode == 0:
            opt.hyperstep()
            with torch.no_grad():
                for w, w0 in zip(ws, prob.init):
                    w.copy_(w0)
    learned = [torch.tensor(float(g[k]), dtype=F64) for g in opt.param_groups
               for k in ("lr", "momentum", "weight_decay") if k in g]
    learned += [torch.tensor(float(g["betas"][0]), dtype=F64) for g in opt.param_groups
                if "betas" in g]
    return [w.detach() for w in ws] + learned


def _generic(cls, rule):
    return type(f"Generic{cls.__name__}", (cls,), {"rule": rule})


METHODS = {
    "MartheAdam": (hyperoptim.MartheAdam, GENERIC_ADAM, None,
                   lambda cls, ws, v: cls(ws, lr=0.01, weight_decay=0.01, mu=0.9, hyper_lr=1e-4,
                                          val_closure=v)),
    "MartheAdamW": (hyperoptim.MartheAdamW, GENERIC_ADAM, None,
                    lambda cls, ws, v: cls(ws, lr=0.01, weight_decay=0.01, mu=0.9, hyper_lr=1e-4,
                                           val_closure=v)),
    "FDSAdam": (hyperoptim.FDSAdam, GENERIC_ADAM, 4,
                lambda cls, ws, v: cls(ws, lr=0.01, weight_decay=0.01, horizon=4, lr_windows=2,
                                       tune=("lr", "beta1", "beta2", "weight_decay"),
                                       val_closure=v)),
    "IFTAdam": (hyperoptim.IFTAdam, GENERIC_ADAM, None,
                lambda cls, ws, v: cls(ws, lr=0.01, weight_decay=0.01, update_interval=2,
                                       lookback=4, val_closure=v)),
    "IFTAdamW": (hyperoptim.IFTAdamW, GENERIC_ADAM, None,
                 lambda cls, ws, v: cls(ws, lr=0.01, weight_decay=0.01, update_interval=2,
                                        lookback=4, val_closure=v)),
    "IFTOptimizer": (hyperoptim.IFTOptimizer, GENERIC_SGD, None,
                     lambda cls, ws, v: cls(ws, lr=0.05, momentum=0.5, weight_decay=0.01,
                                            update_interval=2, lookback=4, val_closure=v)),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_follow_the_generic_paths_trajectory(name):
    """The method with the rule's closed form and with a copy of the rule that has none (autograd
    everywhere): the same weights and learned values to rounding after several hyper-updates."""
    cls, generic_rule, episode, make = METHODS[name]
    prob = _Problem(seed=8)
    steps = 8
    fast = _run(prob, lambda ws, v: make(cls, ws, v), steps, episode)
    slow = _run(prob, lambda ws, v: make(_generic(cls, generic_rule), ws, v), steps, episode)
    assert _rel_err(fast, slow) < 1e-10
    assert not all(torch.equal(a, b) for a, b in zip(fast[3:], _run(
        prob, lambda ws, v: make(cls, ws, v), 1, None)[3:])), "nothing was learned"


@pytest.mark.parametrize("nesterov", [False, True])
def test_fdssgd_momentum_column_follows_torch_func_jvp(nesterov, monkeypatch):
    """FDSSGD's momentum column from the SGD closed form and, with the rule's closed form taken
    away (autograd of the rule), the same hypergradients to rounding."""
    prob = _Problem(seed=9)

    def make(ws, v):
        return hyperoptim.FDSSGD(ws, lr=0.05, momentum=0.6, weight_decay=0.01, nesterov=nesterov,
                                 horizon=4, momentum_windows=2, val_closure=v)

    def hypergrads():
        ws = prob.params()
        opt = make(ws, lambda: prob.loss(ws, prob.val))
        for t in range(4):
            opt.step(prob.closure(opt, ws, t))
        opt.hyperstep()
        hist = opt.history[0]
        return [torch.tensor(hist[f"hypergrad/{n}"][-1], dtype=F64)
                for n in ("lr", "momentum", "weight_decay")]

    fast = hypergrads()
    monkeypatch.setattr(hyperoptim.fds, "SGD", GENERIC_SGD)
    slow = hypergrads()
    assert all((h != 0).all() for h in fast)
    assert _rel_err(fast, slow) < 1e-12


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_closed_tangents_flattened_or_per_parameter(rule, monkeypatch):
    """rule_tangents steps a closed form over one concatenated vector or per parameter (with few
    parameters and several columns); both give the generic path's numbers."""
    import hyperoptim.rules.base as base

    if rule == "sgd":
        state, options = _sgd_case(10, False, 0.05, 0.9), dict(nesterov=True, dampening=0.0)
        names = ("lr", "momentum", "weight_decay")
    else:
        state, options = _adam_case(10, False, 0.05), dict(eps=1e-8, decoupled_weight_decay=True,
                                                           maximize=False)
        names = ("lr", "beta1", "beta2", "weight_decay")
    seeds = _seeds(names, state[-1])
    results = []
    for few in (0, 100):
        monkeypatch.setattr(base, "_FEW_PARAMS", few)
        gen_state = state[:-1] + (torch.Generator().manual_seed(11),)
        closed, generic = _both(RULES[rule], gen_state, seeds, True, **options)
        assert _rel_err(_flat(closed), _flat(generic)) < 1e-13
        results.append(_flat(closed))
    assert _rel_err(results[0], results[1]) < 1e-14
