"""The shared SGD rule and its batched tangents (hyperoptim._update)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperoptim._update import sgd_direction, sgd_step, sgd_tangents


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
    """DESIGN.md section 3 for heavy ball, typed here once as the independent reference."""
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
