"""IFTAdam / IFTAdamW: bit-identity with torch.optim.Adam/AdamW when nothing moves, the one-step
hypergradient against finite differences of torch's own Adam step, the look-back against explicit
Jacobians of Adam's update written out here, both HVP routes, and the direction of the
hyper-updates on problems where the right direction is known."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from test_ift import Net  # the same tiny tanh network as IFTOptimizer's tests
from torch import nn

from hyperoptim import IFTAdam, IFTAdamW

CLASSES = {"adam": (IFTAdam, torch.optim.Adam), "adamw": (IFTAdamW, torch.optim.AdamW)}
NAMES = ("lr", "weight_decay")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




def _state_before(opt, params):
    """(weights, exp_avg, exp_avg_sq, step) of each parameter, cloned."""
    return [(p.detach().clone(), opt.state[p]["exp_avg"].clone(),
             opt.state[p]["exp_avg_sq"].clone(), opt.state[p]["step"].clone()) for p in params]


# ------------------------------------------------------------ (a) bit-identity with torch
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("timing", ["taken", "next"])
@pytest.mark.parametrize("config", [dict(weight_decay=1e-3),
                                    dict(weight_decay=0.0, tune=("lr",), betas=(0.8, 0.99)),
                                    dict(weight_decay=0.05, tune=("weight_decay",), eps=1e-6)],
                         ids=["both", "lr_only", "wd_only"])
@pytest.mark.parametrize("kind", CLASSES)
def test_zero_hyper_lr_is_bit_identical_to_torch(kind, config, timing, dtype):
    cls, ref_cls = CLASSES[kind]
    a, b = Net(0, dtype), Net(0, dtype)
    torch_kwargs = {k: v for k, v in config.items() if k != "tune"}
    ref = ref_cls([{"params": [a.params[0]]}, {"params": [a.params[1]], "lr": 0.02}], lr=0.05,
                  foreach=False, **torch_kwargs)
    opt = cls([{"params": [b.params[0]]}, {"params": [b.params[1]], "lr": 0.02}], lr=0.05,
              update_interval=3, update_schedule="fixed", lookback=2, hyper_lr=0.0, update_timing=timing,
              reactive_decrease=False,
              val_closure=b.val_loss, **config)
    for t in range(10):
        ref.step(a.closure(ref, t))
        opt.step(b.closure(opt, t))
    for x, y in zip(a.params, b.params):
        assert torch.equal(x, y)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ref.state[x][key], opt.state[y][key]), key
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.02]
    assert len(opt.history[0]["lr"]) == 3  # the hyper-updates did run


def test_a_torch_adam_checkpoint_loads_and_continues_identically():
    a, b = Net(1), Net(1)
    ref = torch.optim.Adam(a.params, lr=0.05, weight_decay=1e-3, foreach=False)
    for t in range(4):
        ref.step(a.closure(ref, t))
    with torch.no_grad():
        for p, q in zip(b.params, a.params):
            p.copy_(q)
    opt = IFTAdam(b.params, lr=0.05, weight_decay=1e-3, hyper_lr=0.0, update_interval=2,
                  lookback=2, val_closure=b.val_loss)
    for p, q in zip(b.params, a.params):
        opt.state[p].update({k: v.clone() for k, v in ref.state[q].items()})
    for t in range(4, 9):
        ref.step(a.closure(ref, t))
        opt.step(b.closure(opt, t))
    assert all(torch.equal(x, y) for x, y in zip(a.params, b.params))


# ---------------------------------- (b) one step against finite differences of torch's Adam
@pytest.mark.parametrize("kind", CLASSES)
def test_one_step_hypergradient_matches_finite_differences_of_torch_adam(kind):
    """lookback 1: h = -grad L_V(w_t)^T du/dx with u = w_{t-1} - Adam_step(w_{t-1}) the step just
    taken and x = log10 lr or log10 weight decay; the derivative comes from central differences in
    x of torch.optim.Adam/AdamW steps from the same weights and moments (no hyperoptim code)."""
    cls, ref_cls = CLASSES[kind]
    net = Net(7)
    lr, wd, betas = 0.03, 0.02, (0.8, 0.95)
    opt = cls(net.params, lr=lr, betas=betas, weight_decay=wd, update_interval=3,
              update_schedule="fixed", lookback=1, val_closure=net.val_loss)
    for t in range(2):
        opt.step(net.closure(opt, t))
    before = _state_before(opt, net.params)
    opt.step(net.closure(opt, 2))  # the third step ends with the hyper-update
    hyper = {n: opt.history[0][f"hypergrad/{n}"][0] for n in NAMES}

    leaves = [p.detach().clone().requires_grad_() for p in net.params]
    val_grad = torch.autograd.grad(net.val_loss(leaves), leaves)

    def projected_update(**hp):
        ps = [nn.Parameter(w.clone()) for w, _, _, _ in before]
        ref = ref_cls(ps, betas=betas, foreach=False, **hp)
        for p, (_, m, v, step) in zip(ps, before):
            ref.state[p].update(exp_avg=m.clone(), exp_avg_sq=v.clone(), step=step.clone())
        ref.zero_grad()
        net.train_loss(2, ps).backward()
        ref.step()
        return sum((g * (w - p.detach())).sum()
                   for g, (w, _, _, _), p in zip(val_grad, before, ps)).item()

    natural = {"lr": lr, "weight_decay": wd}
    h = 1e-5
    for name in NAMES:
        x = math.log10(natural[name])
        plus = projected_update(**{**natural, name: 10 ** (x + h)})
        minus = projected_update(**{**natural, name: 10 ** (x - h)})
        fd = -(plus - minus) / (2 * h)
        assert hyper[name] == pytest.approx(fd, rel=1e-7), name
        assert abs(hyper[name]) > 1e-6  # not vacuous


# ------------------------------------------- (c) look-back against explicit Jacobians of u
def _adam_update(w, g, m, v, t, lr, wd, betas, eps, decoupled):
    """Adam's u = w - w' from Kingma & Ba / torch, typed out here (not through hyperoptim)."""
    b1, b2 = betas
    if not decoupled:
        g = g + wd * w
    m1 = b1 * m + (1 - b1) * g
    v1 = b2 * v + (1 - b2) * g * g
    step = lr / (1 - b1 ** t) * m1 / (torch.sqrt(v1) / math.sqrt(1 - b2 ** t) + eps)
    return step + lr * wd * w if decoupled else step


@pytest.mark.parametrize("timing", ["taken", "next"])
@pytest.mark.parametrize("lookback", [2, 4])
@pytest.mark.parametrize("kind", CLASSES)
def test_lookback_hypergradient_equals_closed_form_from_explicit_jacobians(kind, lookback,
                                                                          timing):
    cls, _ = CLASSES[kind]
    net = Net(11)
    betas, eps = (0.85, 0.97), 1e-8
    groups = [{"params": [net.params[0]], "lr": 0.04, "weight_decay": 0.03},
              {"params": [net.params[1]], "lr": 0.02, "weight_decay": 0.01}]
    opt = cls(groups, betas=betas, eps=eps, update_interval=3, update_schedule="fixed", lookback=lookback,
              update_timing=timing, hyper_optimizer=torch.optim.SGD, hyper_lr=0.0,
              val_closure=net.val_loss)
    t_hyper = 2 if timing == "taken" else 3
    for t in range(t_hyper):
        opt.step(net.closure(opt, t))
    assert "lr" not in opt.history[0]
    before = _state_before(opt, net.params)
    opt.step(net.closure(opt, t_hyper))  # the hyper-update
    after = [p.detach().clone() for p in net.params]

    shapes = [w.shape for w, _, _, _ in before]
    sizes = [w.numel() for w, _, _, _ in before]
    log10 = torch.tensor([math.log10(g[n]) for g in groups for n in NAMES], dtype=torch.float64)

    def update(lam, wflat):
        ws = [c.view(s) for c, s in zip(wflat.split(sizes), shapes)]
        grads = torch.autograd.grad(net.train_loss(t_hyper, ws), ws, create_graph=True)
        out = []
        for gi, (w, g, (_, m, v, step)) in enumerate(zip(ws, grads, before)):
            lr, wd = 10.0 ** lam[2 * gi], 10.0 ** lam[2 * gi + 1]
            out.append(_adam_update(w, g, m, v, step.item() + 1, lr, wd, betas, eps,
                                    kind == "adamw").reshape(-1))
        return torch.cat(out)

    wflat = torch.cat([w.reshape(-1) for w, _, _, _ in before])
    jac_lam, jac_w = torch.autograd.functional.jacobian(update, (log10, wflat))
    val_at = after if timing == "taken" else [w for w, _, _, _ in before]
    leaves = [w.clone().requires_grad_() for w in val_at]
    vgrad = torch.cat([g.reshape(-1) for g in
                       torch.autograd.grad(net.val_loss(leaves), leaves)])
    eye = torch.eye(wflat.numel(), dtype=torch.float64)
    series = sum(torch.linalg.matrix_power(eye - jac_w, j) for j in range(lookback))
    want = -(vgrad @ series @ jac_lam)
    got = torch.tensor([opt.history[gi][f"hypergrad/{n}"][0] for gi in range(2) for n in NAMES],
                       dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-14)
    # The look-back matters here: the one-step value differs.
    one_step = -(vgrad @ jac_lam)
    assert torch.linalg.vector_norm(one_step - want) > 1e-4 * torch.linalg.vector_norm(want)


# -------------------------------------------------------- (e) both HVP routes agree
@pytest.mark.parametrize("kind", CLASSES)
def test_exact_and_finite_difference_routes_agree(kind):
    cls, _ = CLASSES[kind]
    runs = {}
    for route, backward in (("exact", False), ("finite_difference", True)):
        net = Net(5)
        opt = cls(net.params, lr=0.03, weight_decay=0.01, update_interval=2, lookback=4,
                  hvp=route, val_closure=net.val_loss)
        for t in range(8):
            opt.step(net.closure(opt, t, backward=backward))
        assert opt.hvp_route == route
        runs[route] = (opt.history[0], [p.detach().clone() for p in net.params])
    (ha, wa), (hb, wb) = runs["exact"], runs["finite_difference"]
    for name in NAMES:
        torch.testing.assert_close(torch.tensor(ha[f"hypergrad/{name}"]),
                                   torch.tensor(hb[f"hypergrad/{name}"]), rtol=1e-6, atol=1e-10)
    for x, y in zip(wa, wb):
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-10)


# --------------------------------------------------- (d) the right direction, when known
def _quadratic_run(cls, lr, hyper_lr, steps=60):
    gen = torch.Generator().manual_seed(0)
    d = 8
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    hessian = q @ torch.diag(torch.linspace(0.5, 2.0, d, dtype=torch.float64)) @ q.T
    target = torch.randn(d, generator=gen, dtype=torch.float64)
    w = nn.Parameter(torch.zeros(d, dtype=torch.float64) + 3.0)

    def loss():
        r = w - target
        return 0.5 * r @ hessian @ r

    opt = cls([w], lr=lr, weight_decay=0.0, tune=("lr",), update_interval=5,
              update_schedule="fixed", lookback=5, hyper_lr=hyper_lr, val_closure=loss)
    for _ in range(steps):
        opt.step(loss)
    with torch.no_grad():
        return opt, loss().item()


@pytest.mark.parametrize("kind", CLASSES)
def test_too_small_learning_rate_goes_up_on_a_convex_quadratic(kind):
    """Far from the minimum of a convex quadratic (validation = training loss) a larger step is
    better: every hypergradient of log10 lr is negative and the learning rate rises."""
    cls, _ = CLASSES[kind]
    opt, tuned = _quadratic_run(cls, 1e-3, 0.05)
    _, frozen = _quadratic_run(cls, 1e-3, 0.0)
    hist = opt.history[0]
    assert all(h < 0 for h in hist["hypergrad/lr"]), hist["hypergrad/lr"]
    assert opt.param_groups[0]["lr"] > 1.5e-3
    assert tuned < frozen


def _regression(signal: float):
    """Few noisy training points, a large clean validation set: y = x @ (signal * w*) + noise."""
    gen = torch.Generator().manual_seed(1)
    n, d = 24, 16
    w_true = signal * torch.randn(d, generator=gen, dtype=torch.float64)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ w_true + (0.0 if signal else 1.0) * torch.randn(n, generator=gen, dtype=torch.float64)
    xv = torch.randn(200, d, generator=gen, dtype=torch.float64)
    yv = xv @ w_true
    return x, y, xv, yv


def _regression_run(cls, signal, weight_decay, hyper_lr, steps=200):
    x, y, xv, yv = _regression(signal)
    torch.manual_seed(0)
    w = nn.Parameter(torch.zeros(x.shape[1], dtype=torch.float64))  # no shrinkage helps at 0
    val = lambda: 0.5 * ((xv @ w - yv) ** 2).mean()  # noqa: E731
    opt = cls([w], lr=0.02, weight_decay=weight_decay, tune=("weight_decay",),
              update_interval=5, lookback=5, hyper_lr=hyper_lr, val_closure=val)
    for _ in range(steps):
        opt.step(lambda: 0.5 * ((x @ w - y) ** 2).mean())
    with torch.no_grad():
        return opt, val().item()


@pytest.mark.parametrize("kind", CLASSES)
def test_weight_decay_goes_up_when_the_training_targets_are_pure_noise(kind):
    """Training targets are noise, the validation targets 0: the best weights are 0, and more
    weight decay always helps. The weight decay rises and the validation loss beats the frozen
    run's."""
    cls, _ = CLASSES[kind]
    opt, tuned = _regression_run(cls, 0.0, 1e-3, 0.1)
    _, frozen = _regression_run(cls, 0.0, 1e-3, 0.0)
    assert opt.param_groups[0]["weight_decay"] > 3e-3
    assert sum(h < 0 for h in opt.history[0]["hypergrad/weight_decay"]) > \
        0.8 * len(opt.history[0]["hypergrad/weight_decay"])
    assert tuned < frozen


@pytest.mark.parametrize("kind", CLASSES)
def test_weight_decay_goes_down_when_the_training_targets_are_clean(kind):
    """Noise-free training targets from a linear model: the validation loss is lowest without
    decay, and a large initial weight decay falls."""
    cls, _ = CLASSES[kind]
    opt, tuned = _regression_run(cls, 1.0, 0.3, 0.1)
    _, frozen = _regression_run(cls, 1.0, 0.3, 0.0)
    assert opt.param_groups[0]["weight_decay"] < 0.1
    assert sum(h > 0 for h in opt.history[0]["hypergrad/weight_decay"]) > \
        0.8 * len(opt.history[0]["hypergrad/weight_decay"])
    assert tuned < frozen


# ------------------------------------------------------------------------ refusals
def test_betas_and_per_parameter_values_are_refused_clearly():
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="Invalid tune value.*'beta1' is not tunable"):
        IFTAdam([w], tune=("lr", "beta1"))
    with pytest.raises(ValueError, match="Invalid tune value.*'momentum' is not tunable"):
        IFTAdamW([w], tune=("momentum",))
    opt = IFTAdam([w], lr=0.01)
    with pytest.raises(ValueError, match="Invalid per_parameter_lr value"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "per_parameter_lr": True})
    assert opt.param_groups[0]["weight_decay"] == 1e-7  # WEIGHT_DECAY_FLOOR: tuned from 0
    assert IFTAdam([w], tune=("lr",)).param_groups[0]["weight_decay"] == 0.0


def test_a_learning_rate_pinned_at_its_bound_warns_once():
    # Far from the optimum, Adam's steps (about lr each) ask for a larger rate at every
    # hyper-update: the rate climbs to lr_bounds[1] = 1.0 and stays there, set by the bound.
    w = nn.Parameter(torch.full((4,), 100.0, dtype=torch.float64))
    opt = IFTAdam([w], lr=0.1, update_interval=1, lookback=2, hyper_lr=0.5, tune=("lr",),
                  val_closure=lambda: (w**2).sum())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(20):
            opt.step(lambda: (w**2).sum())
    assert opt.history[0]["lr"][-10:] == [1.0] * 10
    pinned = [str(c.message) for c in caught if "bound" in str(c.message)]
    assert len(pinned) == 1 and "lr_bounds[1]=1" in pinned[0] and "IFTAdam" in pinned[0]


@pytest.mark.parametrize("kind", CLASSES)
def test_zero_gradient_parameter_stays_at_zero_hyper_lr(kind):
    """weight_decay=0, tuned (it starts at the 1e-7 floor): a parameter whose gradient is 0 stays
    where torch.optim.Adam/AdamW(weight_decay=0) leaves it (before: 0.9918 after 9 steps)."""
    cls, ref_cls = CLASSES[kind]
    a, b = Net(0), Net(0)
    still_a, still_b = nn.Parameter(torch.ones(3, dtype=a.params[0].dtype)), nn.Parameter(
        torch.ones(3, dtype=b.params[0].dtype))
    ref = ref_cls(a.params + [still_a], lr=0.05, weight_decay=0.0, foreach=False)
    opt = cls(b.params + [still_b], lr=0.05, weight_decay=0.0, update_interval=3, lookback=2,
              hyper_lr=0.0, val_closure=b.val_loss, reactive_decrease=False)
    for t in range(9):
        for net, o, still in ((a, ref, still_a), (b, opt, still_b)):
            closure = net.closure(o, t)

            def with_zero(closure=closure, still=still):
                loss = closure()
                still.grad = torch.zeros_like(still)
                return loss

            o.step(with_zero)
    assert torch.equal(still_b, still_a) and torch.equal(still_a, torch.ones(3, dtype=still_a.dtype))
    assert all(torch.equal(x, y) for x, y in zip(a.params, b.params))
