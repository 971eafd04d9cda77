"""What the tangent update holds at once (issue 19: the step peak per rank under FSDP2).

A flat (elementwise) tangent step reads tangents and buffers that already lie back to back in one
storage without concatenating them; the numbers are the same as from the copies, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import hyperoptim
from hyperoptim.rules.adam import ADAM
from hyperoptim.rules.base import rule_tangents

F64 = torch.float64
SHAPES = [(5, 3), (5,), (2, 5), (2,)]


class CatBytes(TorchDispatchMode):
    """Bytes of every ``aten.cat`` output while active (the flat step's copies)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.cat.default:
            self.nbytes += out.numel() * out.element_size()
        return out


def _side_by_side(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    flat = torch.cat([t.reshape(-1) for t in ts])
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in ts]), ts)]


def _random(shapes, lead=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*lead, *s, generator=gen, dtype=F64) for s in shapes]


def test_fresh_buffers_share_one_storage():
    params = [torch.zeros(s, dtype=F64) for s in SHAPES]
    states = [{} for _ in params]
    buffers, _ = ADAM.read_state(states, params)
    for name in ("exp_avg", "exp_avg_sq"):
        ptrs = {b.untyped_storage().data_ptr() for b in buffers[name]}
        assert len(ptrs) == 1
        assert [b.shape for b in buffers[name]] == [p.shape for p in params]
        assert all(not b.any() for b in buffers[name])
    # Existing buffers are not touched.
    kept = states[0]["exp_avg"]
    ADAM.read_state(states, params)
    assert states[0]["exp_avg"] is kept


def test_flat_step_reads_side_by_side_tangents_without_a_copy():
    params, grads = _random(SHAPES, seed=1), _random(SHAPES, seed=2)
    m = [b.abs() for b in _random(SHAPES, seed=3)]
    v = [b.abs() for b in _random(SHAPES, seed=4)]
    z, hz = _random(SHAPES, (1,), seed=5), _random(SHAPES, (1,), seed=6)
    mt, vt = _random(SHAPES, (1,), seed=7), _random(SHAPES, (1,), seed=8)
    hypers = dict(lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.0)
    options = dict(eps=1e-8, decoupled_weight_decay=False, maximize=False)

    def run(ms, vs, zs, hzs, mts, vts):
        with CatBytes() as cats:
            out = rule_tangents(ADAM, params, grads, {"exp_avg": ms, "exp_avg_sq": vs}, hypers,
                                zs, hzs, {"exp_avg": mts, "exp_avg_sq": vts},
                                {"lr": torch.ones(1, dtype=F64)}, counts=[3.0] * 4, **options)
        return out, cats.nbytes

    copied, copied_bytes = run(m, v, z, hz, mt, vt)
    viewed, viewed_bytes = run(*(_side_by_side(ts) for ts in (m, v, z, hz, mt, vt)))
    model = sum(p.numel() * p.element_size() for p in params)
    assert copied_bytes == 8 * model
    assert viewed_bytes == 2 * model  # the parameters and the gradients only
    for a, b in zip(copied[0], viewed[0]):
        assert torch.equal(a, b)
    for name in ("exp_avg", "exp_avg_sq"):
        for a, b in zip(copied[1][name], viewed[1][name]):
            assert torch.equal(a, b)


def test_marthe_adam_step_copies_only_weights_and_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).to(F64)
    x, y = torch.randn(10, 6, dtype=F64), torch.randn(10, 1, dtype=F64)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(net(x), y)
        loss.backward()  # the finite-difference route
        return loss

    def val_closure():
        loss = F.mse_loss(net(x[:5]), y[:5])
        loss.backward()
        return loss

    opt = hyperoptim.MartheAdam(net.parameters(), lr=0.01, val_closure=val_closure)
    for _ in range(2):
        opt.step(closure)
    with CatBytes() as cats:
        opt.step(closure)
    model = sum(p.numel() * p.element_size() for p in net.parameters())
    # The flat tangent step concatenates the weights and the gradients; the moments, the
    # tangents and H Z lie back to back already (was 8 copies of the model).
    assert cats.nbytes <= 2 * model + 64
