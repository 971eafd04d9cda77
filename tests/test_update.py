"""The update rules (SGD, Adam/AdamW) and their torch.func tangents and products (hyperoptim.rules)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperoptim.rules.adam import ADAM, adam_step, adam_step_
from hyperoptim.rules.base import RULES, get_rule, rule_tangents, rule_vjp
from hyperoptim.rules.sgd import SGD, sgd_direction, sgd_step, sgd_tangents

F64 = torch.float64


def _state(seed: int, shapes, n: int, first_step: bool):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    params = [r(*s) for s in shapes]
    grads = [r(*s) for s in shapes]
    bufs = [None if first_step else r(*s) for s in shapes]
    z = [r(n, *s) for s in shapes]
    hz = [r(n, *s) for s in shapes]
    c = [None if first_step else r(n, *s) for s in shapes]
    seeds = [r(n) for _ in range(3)]
    return params, grads, bufs, z, hz, c, seeds


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 4),
    momentum=st.floats(0.0, 0.95),
    weight_decay=st.floats(0.0, 0.1),
    dampening=st.sampled_from([0.0, 0.3]),
    nesterov=st.booleans(),
    first_step=st.booleans(),
)
def test_tangents_are_the_directional_derivative_of_the_step(
    seed, n, momentum, weight_decay, dampening, nesterov, first_step
):
    """Each column of sgd_tangents equals a central difference of sgd_step along that column."""
    dampening = 0.0 if nesterov else dampening
    params, grads, bufs, z, hz, c, (e_a, e_b, e_c) = _state(seed, [(3, 2), (4,)], n, first_step)
    lr, mom, wd = (torch.tensor(v, dtype=torch.float64) for v in (0.1, momentum, weight_decay))
    z1, c1 = sgd_tangents(params, grads, bufs, lr, mom, wd, z, hz, c, e_a, e_b, e_c,
                          dampening=dampening, nesterov=nesterov)
    eps = 1e-6
    for k in range(n):
        def moved(s, k=k):
            ps = [p + s * zi[k] for p, zi in zip(params, z)]
            gs = [g + s * hzi[k] for g, hzi in zip(grads, hz)]
            bs = [None if b is None else b + s * ci[k] for b, ci in zip(bufs, c)]
            return sgd_step(ps, gs, bs, lr + s * e_a[k], mom + s * e_b[k], wd + s * e_c[k],
                            dampening=dampening, nesterov=nesterov)

        (p_plus, b_plus, _), (p_minus, b_minus, _) = moved(eps), moved(-eps)
        for i in range(len(params)):
            torch.testing.assert_close(z1[i][k], (p_plus[i] - p_minus[i]) / (2 * eps),
                                       rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(c1[i][k], (b_plus[i] - b_minus[i]) / (2 * eps),
                                       rtol=1e-6, atol=1e-8)


def test_tangents_match_the_written_out_recursion():
    """docs/design.md section 3 for heavy ball, typed here once as the independent reference."""
    params, grads, bufs, z, hz, c, (e_a, e_b, e_c) = _state(0, [(5,)], 3, first_step=False)
    a, b, wd = 0.1, 0.9, 0.01
    z1, c1 = sgd_tangents(params, grads, bufs, *(torch.tensor(v, dtype=torch.float64)
                                                  for v in (a, b, wd)),
                          z, hz, c, e_a, e_b, e_c)
    w, v, g = params[0], bufs[0], grads[0]
    v_next = b * v + g + wd * w
    c_ref = b * c[0] + hz[0] + wd * z[0] + e_c[:, None] * w + e_b[:, None] * v
    z_ref = z[0] - a * c_ref - e_a[:, None] * v_next
    torch.testing.assert_close(c1[0], c_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z1[0], z_ref, rtol=1e-12, atol=1e-12)


def test_sgd_step_is_pure_and_direction_is_consistent():
    params, grads, bufs, *_ = _state(1, [(3,)], 1, first_step=False)
    copies = [t.clone() for t in params + grads + bufs]
    new_p, new_b, d = sgd_step(params, grads, bufs, 0.1, 0.9, 0.01, nesterov=True)
    assert all(torch.equal(a, b) for a, b in zip(params + grads + bufs, copies))
    _, new_b2, d2 = sgd_direction(params, grads, bufs, 0.9, 0.01, nesterov=True)
    assert torch.equal(new_b[0], new_b2[0]) and torch.equal(d[0], d2[0])
    assert torch.equal(new_p[0], params[0].add(d[0], alpha=-0.1))


def test_first_step_buffer_is_the_gradient_like_torch():
    g = torch.tensor([1.0, -2.0])
    _, bufs, d = sgd_direction([torch.zeros(2)], [g], [None], momentum=0.9, dampening=0.5)
    assert torch.equal(bufs[0], g) and torch.equal(d[0], g)
    assert bufs[0] is not g


@pytest.mark.parametrize("nesterov", [False, True])
def test_inplace_direction_equals_pure(nesterov):
    params, grads, bufs, *_ = _state(2, [(4,)], 1, first_step=False)
    _, pure_b, pure_d = sgd_direction(params, grads, bufs, 0.9, 0.1, nesterov=nesterov)
    held = bufs[0]
    _, in_b, in_d = sgd_direction(params, grads, bufs, 0.9, 0.1, nesterov=nesterov, inplace=True)
    assert in_b[0] is held
    assert torch.equal(in_b[0], pure_b[0]) and torch.equal(in_d[0], pure_d[0])


# ---------------------------------------------------------------------- the rules as values
def test_registry_holds_both_rules():
    assert get_rule("sgd") is SGD and get_rule("adam") is ADAM and set(RULES) >= {"sgd", "adam"}
    with pytest.raises(ValueError, match="Invalid rule value"):
        get_rule("lion")


@pytest.mark.parametrize("first_step", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_generic_tangents_over_sgd_equal_sgd_tangents(nesterov, first_step):
    """rule_tangents knows no formula: over the SGD rule it reproduces sgd_tangents."""
    params, grads, bufs, z, hz, c, (e_a, e_b, e_c) = _state(3, [(3, 2), (4,)], 3, first_step)
    hypers = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    z1, c1 = sgd_tangents(params, grads, bufs, *(torch.tensor(v, dtype=F64) for v in hypers.values()),
                          z, hz, c, e_a, e_b, e_c, nesterov=nesterov)
    z2, c2 = rule_tangents(SGD, params, grads, {"momentum_buffer": bufs}, hypers, z, hz,
                           {"momentum_buffer": c}, {"lr": e_a, "momentum": e_b, "weight_decay": e_c},
                           dampening=0.0, nesterov=nesterov)
    for a, b in zip(z1 + c1, z2 + c2["momentum_buffer"]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


ADAM_CONFIGS = [
    dict(),
    dict(weight_decay=0.1),
    dict(weight_decay=0.1, decoupled_weight_decay=True),
    dict(betas=(0.5, 0.9), eps=1e-3, weight_decay=0.02),
    dict(maximize=True, weight_decay=0.01),
    dict(maximize=True, weight_decay=0.05, decoupled_weight_decay=True),
]


def _adam_options(config):
    return dict(eps=config.get("eps", 1e-8),
                decoupled_weight_decay=config.get("decoupled_weight_decay", False),
                maximize=config.get("maximize", False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
def test_adam_rule_is_bit_identical_to_torch(config, dtype):
    """adam_step (pure) and adam_step_ (in place) against torch.optim.Adam(foreach=False)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (4,)]
    w = [torch.randn(*s, generator=gen, dtype=dtype) for s in shapes]
    leaves = [x.clone().requires_grad_() for x in w]
    opt = torch.optim.Adam(leaves, lr=0.01, foreach=False, **config)
    inplace, pure = [x.clone() for x in w], [x.clone() for x in w]
    m_in, v_in = [torch.zeros_like(x) for x in w], [torch.zeros_like(x) for x in w]
    m_pu, v_pu = [torch.zeros_like(x) for x in w], [torch.zeros_like(x) for x in w]
    b1, b2 = config.get("betas", (0.9, 0.999))
    wd = config.get("weight_decay", 0.0)
    for t in range(1, 31):
        grads = [torch.randn(*s, generator=gen, dtype=dtype) for s in shapes]
        if t == 3:
            grads[1][0] = 0.0  # an exact zero gradient entry (v may be exactly 0 somewhere)
        for p, g in zip(leaves, grads):
            p.grad = g.clone()
        opt.step()
        adam_step_(inplace, grads, m_in, v_in, [float(t)] * 2, 0.01, b1, b2, wd,
                   **_adam_options(config))
        pure, m_pu, v_pu = adam_step(pure, grads, m_pu, v_pu, [float(t)] * 2, 0.01, b1, b2, wd,
                                     **_adam_options(config))
    for p, a, b, m1, m2 in zip(leaves, inplace, pure, m_in, m_pu):
        assert torch.equal(p, a) and torch.equal(p, b)
        assert torch.equal(opt.state[p]["exp_avg"], m1) and torch.equal(m1, m2)


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
def test_adam_direction_is_minus_the_jvp_in_the_learning_rate(config):
    """adam_step_'s direction d = -dw'/da is what torch.func.jvp of adam_step gives (AdamW: with
    the decay's -lambda w term)."""
    gen = torch.Generator().manual_seed(1)
    w = [torch.randn(3, 2, generator=gen, dtype=F64)]
    g = [torch.randn(3, 2, generator=gen, dtype=F64)]
    m = [0.1 * torch.randn(3, 2, generator=gen, dtype=F64)]
    v = [0.1 * torch.rand(3, 2, generator=gen, dtype=F64)]
    b1, b2 = config.get("betas", (0.9, 0.999))
    wd, opts = config.get("weight_decay", 0.0), _adam_options(config)

    def step(a):
        return adam_step(w, g, m, v, [4.0], a, b1, b2, wd, **opts)[0][0]

    _, tangent = torch.func.jvp(step, (torch.tensor(0.01, dtype=F64),), (torch.tensor(1.0, dtype=F64),))
    d = adam_step_([w[0].clone()], g, [m[0].clone()], [v[0].clone()], [4.0], 0.01, b1, b2, wd, **opts)
    torch.testing.assert_close(d[0], -tangent, rtol=1e-13, atol=1e-15)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 3),
    beta1=st.floats(0.0, 0.95),
    beta2=st.floats(0.5, 0.999),
    weight_decay=st.sampled_from([0.0, 0.05]),
    decoupled=st.booleans(),
    count=st.integers(1, 5),
)
def test_adam_tangents_are_the_directional_derivative_of_the_step(
    seed, n, beta1, beta2, weight_decay, decoupled, count
):
    """Each column of rule_tangents over Adam (weights, both moments, all four hyperparameters)
    equals a central difference of adam_step along that column."""
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return scale * torch.randn(*s, generator=gen, dtype=F64)

    shapes = [(3, 2), (4,)]
    w, g = [r(*s) for s in shapes], [r(*s) for s in shapes]
    m = [r(*s, scale=0.3) for s in shapes]
    v = [r(*s).abs() * 0.3 + 0.01 for s in shapes]
    z, hz = [r(n, *s) for s in shapes], [r(n, *s) for s in shapes]
    zm, zv = [r(n, *s) for s in shapes], [r(n, *s, scale=0.01) for s in shapes]
    names = ("lr", "beta1", "beta2", "weight_decay")
    seeds = {k: r(n) for k in names}
    hypers = dict(lr=0.05, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    opts = dict(eps=1e-3, decoupled_weight_decay=decoupled, maximize=False)
    counts = [float(count)] * 2
    z1, s1 = rule_tangents(ADAM, w, g, {"exp_avg": m, "exp_avg_sq": v}, hypers, z, hz,
                           {"exp_avg": zm, "exp_avg_sq": zv}, seeds, counts=counts, **opts)
    eps = 1e-6
    for k in range(n):
        def moved(s, k=k):
            hs = {x: hypers[x] + s * seeds[x][k].item() for x in names}
            return adam_step([a + s * b[k] for a, b in zip(w, z)], [a + s * b[k] for a, b in zip(g, hz)],
                             [a + s * b[k] for a, b in zip(m, zm)], [a + s * b[k] for a, b in zip(v, zv)],
                             counts, hs["lr"], hs["beta1"], hs["beta2"], hs["weight_decay"], **opts)

        # Richardson-extrapolated central differences (truncation error O(eps^4)): with beta2
        # near 1 and a small count, the bias correction's third derivative is large enough that
        # a plain central difference is itself off by more than the tolerance (seed=412, n=2,
        # beta1=0, beta2=0.999, count=1).
        plus, minus = moved(eps), moved(-eps)
        plus2, minus2 = moved(eps / 2), moved(-eps / 2)
        for out, (tangent) in zip(range(3), (z1, s1["exp_avg"], s1["exp_avg_sq"])):
            for i in range(2):
                coarse = (plus[out][i] - minus[out][i]) / (2 * eps)
                fine = (plus2[out][i] - minus2[out][i]) / eps
                fd = (4 * fine - coarse) / 3
                torch.testing.assert_close(tangent[i][k], fd, rtol=1e-5, atol=1e-7)


def test_adam_tangent_is_finite_where_the_second_moment_is_zero():
    """A weight whose gradient has always been 0 (a dead unit) has v = 0: sqrt's derivative there
    would be 0/0; the rule's tangent is the exact dm/eps instead of nan."""
    w, g = [torch.ones(2, dtype=F64)], [torch.tensor([0.0, 1.0], dtype=F64)]
    zeros = [torch.zeros(2, dtype=F64)]
    hz = [torch.tensor([[0.5, 0.0]], dtype=F64)]
    z1, _ = rule_tangents(ADAM, w, g, {"exp_avg": zeros, "exp_avg_sq": zeros},
                          dict(lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0),
                          [torch.zeros(1, 2, dtype=F64)], hz, {"exp_avg": [None], "exp_avg_sq": [None]},
                          {"lr": torch.zeros(1, dtype=F64)}, counts=[1.0], eps=1e-8,
                          decoupled_weight_decay=False, maximize=False)
    assert torch.isfinite(z1[0]).all()
    # w' = w - a m/(bc1 (0 + eps)) with m = 0.1 * 0.5 s: dw'/ds = -a * 0.05 / (0.1 * eps)
    assert z1[0][0, 0].item() == pytest.approx(-0.1 * 0.05 / (0.1 * 1e-8), rel=1e-9)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_vjp_matches_autograd_with_moments_detached(decoupled):
    """rule_vjp: (du/dw)^T q, (du/dg)^T q and (du/dlambda)^T q for every Adam hyperparameter, the
    moments constants, as IFTAdam will use it (Clarke et al., Eq. 11)."""
    gen = torch.Generator().manual_seed(4)
    w, g = [torch.randn(3, generator=gen, dtype=F64)], [torch.randn(3, generator=gen, dtype=F64)]
    m, v = [0.1 * torch.randn(3, generator=gen, dtype=F64)], [torch.rand(3, generator=gen, dtype=F64)]
    q = [torch.randn(3, generator=gen, dtype=F64)]
    hypers = dict(lr=0.05, beta1=0.8, beta2=0.99, weight_decay=0.1)
    opts = dict(eps=1e-8, decoupled_weight_decay=decoupled, maximize=False)
    names = ("lr", "beta1", "beta2", "weight_decay")
    new_w, vjp_fn = rule_vjp(ADAM, w, g, {"exp_avg": m, "exp_avg_sq": v}, hypers, wrt=names,
                             counts=[3.0], **opts)
    dw, dg, dh = vjp_fn(q)

    leaves = [w[0].clone().requires_grad_(), g[0].clone().requires_grad_()]
    hs = [torch.tensor(hypers[k], dtype=F64, requires_grad=True) for k in names]
    out = adam_step([leaves[0]], [leaves[1]], m, v, [3.0], *hs, **opts)[0][0]
    ref = torch.autograd.grad(out, leaves + hs, q[0])
    torch.testing.assert_close(new_w[0], out.detach(), rtol=1e-15, atol=0)
    torch.testing.assert_close(dw[0], ref[0], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(dg[0], ref[1], rtol=1e-13, atol=1e-15)
    for k, r in zip(names, ref[2:]):
        torch.testing.assert_close(dh[k], r, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("n_cols", [1, 3])
@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_flattened_tangents_equal_per_parameter_tangents(rule, n_cols):
    """An elementwise rule's tangents through one concatenated vector per (dtype, device, step
    count, buffers present) are the per-parameter ones: mixed dtypes, lagging step counts,
    a parameter whose momentum buffer does not exist yet, shapes of every rank."""
    import dataclasses

    base = get_rule(rule)
    per_param = dataclasses.replace(base, elementwise=False)
    assert base.elementwise
    gen = torch.Generator().manual_seed(7)
    shapes = [(3, 2), (4,), (), (2, 1, 3), (5,)]
    dtypes = [F64, F64, F64, torch.float32, F64]

    def r(*s, dtype=F64):
        return torch.randn(s, generator=gen, dtype=F64).to(dtype)

    params = [r(*s, dtype=d) for s, d in zip(shapes, dtypes)]
    grads = [r(*s, dtype=d) for s, d in zip(shapes, dtypes)]
    z = [r(n_cols, *s, dtype=d) for s, d in zip(shapes, dtypes)]
    hz = [r(n_cols, *s, dtype=d) for s, d in zip(shapes, dtypes)]
    if rule == "sgd":
        buffers = {"momentum_buffer": [r(*s, dtype=d) if i != 1 else None
                                       for i, (s, d) in enumerate(zip(shapes, dtypes))]}
        tangents = {"momentum_buffer": [None if b is None or i == 4 else r(n_cols, *s, dtype=d)
                                        for i, (b, s, d) in enumerate(zip(
                                            buffers["momentum_buffer"], shapes, dtypes))]}
        hypers = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
        counts, options = None, dict(dampening=0.0, nesterov=True)
        seeds = {"lr": r(n_cols), "momentum": r(n_cols)}
    else:
        buffers = {"exp_avg": [r(*s, dtype=d) for s, d in zip(shapes, dtypes)],
                   "exp_avg_sq": [r(*s, dtype=d).abs() for s, d in zip(shapes, dtypes)]}
        tangents = {name: [r(n_cols, *s, dtype=d) for s, d in zip(shapes, dtypes)]
                    for name in buffers}
        hypers = dict(lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.1)
        counts, options = [3.0, 3.0, 2.0, 3.0, 3.0], dict(eps=1e-8, decoupled_weight_decay=True)
        seeds = {"lr": r(n_cols), "beta1": r(n_cols)}
    args = (params, grads, buffers, hypers, z, hz, tangents, seeds)
    z_flat, s_flat = rule_tangents(base, *args, counts=counts, **options)
    z_ref, s_ref = rule_tangents(per_param, *args, counts=counts, **options)
    for a, b in zip(z_flat, z_ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for name in base.buffer_names:
        for a, b in zip(s_flat[name], s_ref[name], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.shape == b.shape and a.is_contiguous()
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_tangents_equal_torch_func_jvp(decoupled):
    """rule_tangents (two reverse passes) against torch.func.jvp of the Adam rule's step."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(3, 2), (4,)]

    def r(*s):
        return torch.randn(s, generator=gen, dtype=F64)

    w, g = [r(*s) for s in shapes], [r(*s) for s in shapes]
    bufs = {"exp_avg": [r(*s) for s in shapes], "exp_avg_sq": [r(*s).abs() for s in shapes]}
    z, hz = [r(1, *s) for s in shapes], [r(1, *s) for s in shapes]
    tans = {k: [r(1, *s) for s in shapes] for k in bufs}
    hypers = dict(lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.1)
    options = dict(eps=1e-8, decoupled_weight_decay=decoupled)
    counts = [2.0, 2.0]
    zn, sn = rule_tangents(ADAM, w, g, bufs, hypers, z, hz, tans, {"lr": torch.ones(1)},
                           counts=counts, **options)

    def step(ws, gs, ms, vs, a):
        new_w, new_b = ADAM.step(list(ws), list(gs), {"exp_avg": list(ms), "exp_avg_sq": list(vs)},
                                 dict(hypers, lr=a), counts, **options)
        return tuple(new_w), tuple(new_b["exp_avg"]), tuple(new_b["exp_avg_sq"])

    first = [tuple(t[0] for t in ts) for ts in (z, hz, tans["exp_avg"], tans["exp_avg_sq"])]
    _, (dw, dm, dv) = torch.func.jvp(
        step, (tuple(w), tuple(g), tuple(bufs["exp_avg"]), tuple(bufs["exp_avg_sq"]),
               torch.tensor(0.01, dtype=F64)), (*first, torch.tensor(1.0, dtype=F64)))
    for got, want in ((zn, dw), (sn["exp_avg"], dm), (sn["exp_avg_sq"], dv)):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a[0], b, rtol=1e-12, atol=1e-14)
