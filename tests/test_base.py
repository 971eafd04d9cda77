"""The shared base: closures, validation gradients, HVPs, BatchNorm freezing, DDP averaging."""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from hyperoptim import HypergradSGD, frozen_batchnorm_stats
from hyperoptim.core.base import HyperOptimizer
from hyperoptim.core.dist import all_reduce_mean
from hyperoptim.hvp import grad_and_hvp, hvp_from_grads


class _Probe(HyperOptimizer):
    """The smallest subclass: exposes the base's helpers to the tests."""

    def __init__(self, params, val_closure=None):
        super().__init__(params, dict(lr=0.1), val_closure=val_closure)

    def step(self, closure=None, *, val_closure=None):  # pragma: no cover - unused
        return None


def _cubic():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, dtype=torch.float64))
    v = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def loss():
        return (w**3).sum() * (v**2).sum() + (w[:3] * v).sum() ** 2

    return [w, v], loss


def _hessian(params, loss):
    def f(flat):
        w, v = flat[:4], flat[4:]
        return (w**3).sum() * (v**2).sum() + (w[:3] * v).sum() ** 2

    flat = torch.cat([p.detach() for p in params])
    return torch.autograd.functional.hessian(f, flat)


class _Probe2(_Probe):
    def __init__(self, params, hvp="auto"):
        HyperOptimizer.__init__(self, params, dict(lr=0.1), hvp=hvp)


# The exact route is double backward (rounding only); central differences with the step
# sqrt(eps) err by about 1e-8 relative in float64 (hyperoptim.hvp).
_ROUTE_TOL = {"exact": 1e-12, "finite_difference": 1e-7}


@pytest.mark.parametrize("hvp", ["auto", "exact", "finite_difference"])
@pytest.mark.parametrize("backward", [True, False])
def test_training_loss_gives_hvp_by_the_chosen_route(backward, hvp):
    params, loss_fn = _cubic()
    opt = _Probe2(params, hvp=hvp)

    def closure():
        loss = loss_fn()
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss

    if hvp == "exact" and backward:
        with pytest.raises(ValueError, match="hvp='finite_difference'"):
            opt._training_loss(closure, second_order=True)
        return
    loss, second = opt._training_loss(closure, second_order=True)
    route = ("finite_difference" if backward else "exact") if hvp == "auto" else hvp
    assert second.route == route == opt.hvp_route
    assert loss.grad_fn is None and not any(p.grad.requires_grad for p in params)
    grads = [p.grad.clone() for p in params]
    before = [p.detach().clone() for p in params]
    z = torch.randn(2, 7, dtype=torch.float64)
    hz = second.hvp([z[:, :4], z[:, 4:]])
    second.close()
    expected = z @ _hessian(params, loss_fn)
    tol = _ROUTE_TOL[route]
    torch.testing.assert_close(torch.cat(hz, dim=1), expected, rtol=tol, atol=tol)
    # The finite-difference route leaves weights and gradients bit-for-bit as they were.
    for p, w, g in zip(params, before, grads):
        assert torch.equal(p.detach(), w) and torch.equal(p.grad, g)


def test_autograd_backward_in_the_closure_takes_finite_differences():
    params, loss_fn = _cubic()
    opt = _Probe2(params)

    def closure():
        loss = loss_fn()
        torch.autograd.backward(loss)
        return loss

    _, second = opt._training_loss(closure, second_order=True)
    assert second.route == "finite_difference"
    z = torch.randn(1, 7, dtype=torch.float64)
    hz = second.hvp([z[:, :4], z[:, 4:]])
    torch.testing.assert_close(torch.cat(hz, dim=1), z @ _hessian(params, loss_fn), rtol=1e-7,
                               atol=1e-7)


def test_finite_differences_replay_dropout_and_leave_the_rng_as_one_call_would():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1)).double()
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    params = list(model.parameters())
    opt = _Probe2(params, hvp="finite_difference")
    torch.manual_seed(1)
    _, second = opt._training_loss(lambda: F.mse_loss(model(x), y), second_order=True)
    z = [torch.randn(1, *p.shape, dtype=torch.float64) for p in params]
    # The extra calls never touch the global generator (they draw from a private copy of it):
    # it is left as the step's own call, and the draws of z, left it.
    state_after_one_call = torch.get_rng_state()
    hz = second.hvp(z)
    assert torch.equal(torch.get_rng_state(), state_after_one_call)
    # The exact product with the same dropout mask (same seed, so the same draws).
    torch.manual_seed(1)
    loss = F.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    exact = hvp_from_grads(grads, params, z)
    for a, b in zip(hz, exact):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_second_order_without_closure_says_what_to_do():
    params, _ = _cubic()
    with pytest.raises(ValueError, match="step\\(closure\\)"):
        _Probe(params)._training_loss(None, second_order=True)


def test_invalid_hvp_route_is_refused():
    params, _ = _cubic()
    with pytest.raises(ValueError, match="Invalid hvp value"):
        _Probe2(params, hvp="double_backward")


def test_closure_must_return_a_tensor():
    params, _ = _cubic()
    with pytest.raises(ValueError, match="Invalid closure return value"):
        _Probe(params)._training_loss(lambda: 3.0)


def test_functional_grad_and_hvp():
    params, loss_fn = _cubic()

    def f(p):
        w, v = p["w"], p["v"]
        return (w**3).sum() * (v**2).sum() + (w[:3] * v).sum() ** 2

    z = torch.randn(3, 7, dtype=torch.float64)
    g, hz = grad_and_hvp(f, {"w": params[0].detach(), "v": params[1].detach()},
                         {"w": z[:, :4], "v": z[:, 4:]})
    torch.testing.assert_close(torch.cat([hz["w"], hz["v"]], 1), z @ _hessian(params, loss_fn))
    expected = torch.autograd.grad(loss_fn(), params)
    torch.testing.assert_close(g["w"], expected[0])
    torch.testing.assert_close(g["v"], expected[1])


def test_validation_grads_restore_training_grads_even_on_error():
    params, loss_fn = _cubic()
    opt = _Probe(params)
    loss_fn().backward()
    saved = [p.grad.clone() for p in params]

    def boom():
        loss_fn().backward()
        raise RuntimeError("validation failed")

    with pytest.raises(RuntimeError, match="validation failed"):
        opt._validation_grads(boom, params)
    assert all(torch.equal(p.grad, s) for p, s in zip(params, saved))


def test_missing_val_closure_is_a_clear_error():
    params, _ = _cubic()
    with pytest.raises(ValueError, match="val_closure="):
        _Probe(params)._resolve_val_closure(None, required=True)


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))


def test_frozen_batchnorm_stats_leaves_running_stats_unchanged():
    model = _bn_model()
    model(torch.randn(16, 3))  # some statistics to protect
    bn = model[1]
    before = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    x = torch.randn(16, 3)
    with frozen_batchnorm_stats(model):
        inside = model(x)
    after = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    torch.testing.assert_close(inside, model(x))  # the forward pass itself is unchanged
    assert not torch.equal(bn.running_mean, before[0])  # outside the context, stats move again


def test_frozen_batchnorm_stats_restores_on_error():
    model = _bn_model()
    before = model[1].running_mean.clone()
    with pytest.raises(RuntimeError):
        with frozen_batchnorm_stats(model):
            model(torch.randn(8, 3))
            raise RuntimeError
    assert torch.equal(model[1].running_mean, before)


@pytest.mark.parametrize("frozen", [True, False])
def test_validation_in_hd_step_with_frozen_batchnorm(frozen):
    """Only the training forward passes count in num_batches_tracked when validation is frozen."""
    model = _bn_model()
    x, y, xv, yv = torch.randn(16, 3), torch.randn(16, 1), torch.randn(16, 3), torch.randn(16, 1)

    def val_closure():
        if frozen:
            with frozen_batchnorm_stats(model):
                return F.mse_loss(model(xv), yv)
        return F.mse_loss(model(xv), yv)

    opt = HypergradSGD(model.parameters(), lr=0.05, val_closure=val_closure)
    for _ in range(3):
        opt.step(lambda: F.mse_loss(model(x), y))
    assert model[1].num_batches_tracked.item() == (3 if frozen else 6)


def test_all_reduce_mean_is_identity_without_distributed():
    t = [torch.ones(2), torch.zeros(3)]
    out = all_reduce_mean(t)
    assert all(a is b for a, b in zip(out, t))


def _ddp_worker(rank: int, world: int, path: str, result_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
        ddp = nn.parallel.DistributedDataParallel(model)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 3, generator=gen).double(), torch.randn(8, 1, generator=gen).double()
        xv, yv = torch.randn(8, 3, generator=gen).double(), torch.randn(8, 1, generator=gen).double()
        part = slice(rank * 8 // world, (rank + 1) * 8 // world)
        opt = HypergradSGD(ddp.parameters(), lr=0.1, momentum=0.9, hyper_lr=0.05,
                           val_closure=lambda: F.mse_loss(model(xv[part]), yv[part]))
        for _ in range(4):
            opt.zero_grad()
            F.mse_loss(ddp(x[part]), y[part]).backward()
            opt.step()
        if rank == 0:
            torch.save({"lr": opt.history[0]["lr"],
                        "params": [p.detach() for p in model.parameters()]}, result_path)
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown (the result is written, the group destroyed), as
    # tests/test_distributed.py's workers do: gloo's threads sometimes abort it ("terminate
    # called without an active exception"), which spawn reports as a failed rank.
    os._exit(0)


def test_ddp_two_ranks_follow_the_single_process_trajectory():
    """Validation gradients are averaged across ranks: 2 ranks x half batch == 1 rank x full."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for world in (1, 2):
            out = os.path.join(tmp, f"result{world}.pt")
            mp.spawn(_ddp_worker, args=(world, os.path.join(tmp, f"store{world}"), out),
                     nprocs=world, join=True)
            results[world] = torch.load(out, weights_only=True)
    assert results[1]["lr"] == pytest.approx(results[2]["lr"], rel=1e-10)
    assert results[1]["lr"][-1] != 0.1
    for a, b in zip(results[1]["params"], results[2]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["HypergradSGD", "HypergradAdam", "IFTOptimizer"])
def test_the_guard_does_not_skip_a_finite_float32_step_whose_2_norm_overflows(name):
    # Elements of 3e19 are finite in float32, but their squares are not: a 2-norm taken in
    # float32 is inf, which the guard read as a non-finite gradient and skipped the step.
    import hyperoptim

    w = torch.zeros(4, requires_grad=True)
    kwargs = ({"update_interval": 100, "update_schedule": "fixed"} if name == "IFTOptimizer"
              else {})
    opt = getattr(hyperoptim, name)([w], lr=1e-9, **kwargs)
    w.grad = torch.full((4,), 3e19)
    assert torch.linalg.vector_norm(w.grad).isinf()  # what the fast path sees
    opt.step()
    assert opt.skipped_steps == 0
    assert torch.isfinite(w).all() and (w != 0).all()
    # A gradient that is really non-finite is still a skip.
    w.grad = torch.tensor([3e19, float("inf"), 0.0, 0.0])
    before = w.detach().clone()
    with pytest.warns(hyperoptim.HyperoptimWarning, match="non-finite"):
        opt.step()
    assert opt.skipped_steps == 1 and torch.equal(w.detach(), before)
