"""A new inner rule in one file: RMSprop without momentum, defined and registered here, gets hypergradient
descent, MARTHE, IFT and FDS (each a thin subclass of the method written once) and the reference
oracle, with nothing edited outside this file; each method is exact against the oracle where it
should be.

The rule (``torch.optim.RMSprop`` with ``momentum=0``, ``centered=False``, no weight decay):

    v' = alpha v + (1 - alpha) g^2,        w' = w - lr g / (sqrt(v') + eps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hyperoptim.methods.fds import RuleFDS
from hyperoptim.methods.hd import RuleHypergrad
from hyperoptim.methods.ift import RuleIFT
from hyperoptim.methods.marthe import RuleMarthe
from hyperoptim.reference import (
    rule_finite_difference_hypergrad,
    rule_unroll,
    rule_unrolled_hypergrad,
)
from hyperoptim.rules import RULES, UpdateRule, register_rule

F64 = torch.float64
LN10 = math.log(10.0)


# ------------------------------------------------------------------------------------ the rule
def _rmsprop_step(params: Sequence[Tensor], grads: Sequence[Tensor], buffers: dict[str, list],
                  hypers: dict[str, Any], counts: Any, *, eps: float = 1e-8
                  ) -> tuple[list[Tensor], dict[str, list]]:
    """Pure: torch's operations with float hyperparameters, differentiable with tensor ones."""
    lr, alpha = hypers["lr"], hypers["alpha"]
    new_p, new_v = [], []
    for p, g, v in zip(params, grads, buffers["square_avg"]):
        if isinstance(alpha, Tensor):
            v = v * alpha + (1 - alpha) * g * g
        else:
            v = v.mul(alpha).addcmul(g, g, value=1 - alpha)
        avg = v.sqrt().add(eps)
        new_p.append(p - lr * g / avg if isinstance(lr, Tensor) else p.addcdiv(g, avg, value=-lr))
        new_v.append(v)
    return new_p, {"square_avg": new_v}


@torch.no_grad()
def _rmsprop_step_(params: Sequence[Tensor], grads: Sequence[Tensor], buffers: dict[str, list],
                   hypers: dict[str, Any], counts: Any, *, eps: float = 1e-8
                   ) -> tuple[dict[str, list], list[Tensor]]:
    """In place, as ``torch.optim.RMSprop``'s single-tensor path; returns d = g / (sqrt(v') + eps)."""
    directions = []
    for p, g, v in zip(params, grads, buffers["square_avg"]):
        v.mul_(hypers["alpha"]).addcmul_(g, g, value=1 - hypers["alpha"])
        avg = v.sqrt().add_(eps)
        p.addcdiv_(g, avg, value=-hypers["lr"])
        directions.append(g / avg)
    return {"square_avg": list(buffers["square_avg"])}, directions


RMSPROP = RULES.get("rmsprop_test") or register_rule(UpdateRule(
    name="rmsprop_test",
    hyper_names=("lr", "alpha"),
    buffer_names=("square_avg",),
    uses_counts=False,
    hypers=lambda g: {"lr": g["lr"], "alpha": g["alpha"]},
    options=lambda g: {"eps": g["eps"]},
    step=_rmsprop_step,
    step_=_rmsprop_step_,
    init_state=lambda p: {"square_avg": torch.zeros_like(p, memory_format=torch.preserve_format)},
    elementwise=True,
))


# ------------------------------------------------------------------ the methods over it (thin)
class HypergradRMSprop(RuleHypergrad):
    rule = RMSPROP

    def __init__(self, params, lr=0.01, alpha=0.99, eps=1e-8, *, hyper_lr=1e-7,
                 val_closure=None):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, hyper_lr=hyper_lr,
                                      lr_bounds=(0.0, math.inf), per_parameter=False),
                         val_closure=val_closure)


class MartheRMSprop(RuleMarthe):
    rule = RMSPROP
    buffer_tangent_keys = {"square_avg": "tangent_square_avg"}

    def __init__(self, params, lr=0.01, alpha=0.99, eps=1e-8, *, mu="adaptive",
                 hyper_lr=1e-9, adapt_hyper_lr=True, val_closure=None, hvp="auto"):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, mu=mu, hyper_lr=hyper_lr,
                                      adapt_hyper_lr=adapt_hyper_lr, hypergrad_clip=None),
                         val_closure=val_closure, hvp=hvp)


class IFTRMSprop(RuleIFT):
    rule = RMSPROP
    _tunable = ("lr",)

    def __init__(self, params, lr=0.01, alpha=0.99, eps=1e-8, *, update_interval=10, lookback=5,
                 hyper_lr=0.05, val_closure=None, hvp="auto"):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, tune=("lr",), per_parameter_lr=False,
                        per_parameter_weight_decay=False, sharing="weight", lr_bounds=(1e-10, 1.0))
        self._setup(params, defaults, update_interval=update_interval, lookback=lookback,
                    hyper_lr=hyper_lr, hyper_optimizer=None, update_timing="taken",
                    val_closure=val_closure, hvp=hvp)


class FDSRMSprop(RuleFDS):
    rule = RMSPROP
    names = ("lr", "alpha")
    default_step_sizes = {"lr": 1e-3, "alpha": 0.01}
    buffer_tangent_keys = {"square_avg": "fds_square_avg"}
    bounds = {"alpha": (0.0, 1.0)}

    def __init__(self, params, lr=0.01, alpha=0.99, eps=1e-8, *, horizon, lr_windows=1,
                 alpha_windows=1, tune=("lr", "alpha"), hyper_lr=None, val_closure=None,
                 hvp="auto"):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, horizon=horizon,
                                      lr_windows=lr_windows, alpha_windows=alpha_windows,
                                      tune=tune, hyper_lr=hyper_lr, hz_clip=None),
                         val_closure=val_closure, hvp=hvp)


# ------------------------------------------------------------------------------------ problem
class Problem:
    """tanh(x W + b) with squared error, a batch per step, float64; the weights as a dict (for the
    oracle) and as parameters (for the optimizers)."""

    names = ("W", "b")

    def __init__(self, seed: int, steps: int = 8):
        gen = torch.Generator().manual_seed(seed)
        self.init = {"W": 0.5 * torch.randn(3, 2, generator=gen, dtype=F64),
                     "b": 0.1 * torch.randn(2, generator=gen, dtype=F64)}
        self.xs = torch.randn(steps, 5, 3, generator=gen, dtype=F64)
        self.ys = torch.randn(steps, 5, 2, generator=gen, dtype=F64)
        self.xv = torch.randn(9, 3, generator=gen, dtype=F64)
        self.yv = torch.randn(9, 2, generator=gen, dtype=F64)
        self.params = [nn.Parameter(self.init[k].clone()) for k in self.names]

    @staticmethod
    def _loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return ((torch.tanh(x @ p["W"] + p["b"]) - y) ** 2).mean()

    def train(self, p: dict[str, Tensor], t: int) -> Tensor:
        return self._loss(p, self.xs[t], self.ys[t])

    def val(self, p: dict[str, Tensor]) -> Tensor:
        return self._loss(p, self.xv, self.yv)

    def live(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.params))

    def closure(self, opt, t: int, backward: bool = False):
        """Returns the loss (the exact HVP route); with ``backward`` it also fills ``p.grad``."""
        def closure():
            loss = self.train(self.live(), t)
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss
        return closure

    def snapshot(self, opt) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]] | None]:
        """The weights and the rule's buffers now (None before the first step)."""
        weights = {k: p.detach().clone() for k, p in zip(self.names, self.params)}
        if "square_avg" not in opt.state[self.params[0]]:
            return weights, None
        return weights, {"square_avg": {k: opt.state[p]["square_avg"].clone()
                                        for k, p in zip(self.names, self.params)}}

    def one_step_oracle(self, t: int, start, lr: float, alpha: float) -> Tensor:
        """dE(w_{t+1})/da_t through step t of the rule from ``start`` (weights, buffers)."""
        weights, buffers = start
        _, hg = rule_unrolled_hypergrad(RMSPROP, lambda p, _: self.train(p, t), self.val, weights,
                                        horizon=1, hypers=dict(lr=lr, alpha=alpha),
                                        buffers=buffers)
        return hg["lr"]


# ------------------------------------------------------------------------------------ the rule
def test_the_rule_is_torch_rmsprop_and_its_oracle_matches_finite_differences():
    prob = Problem(0)
    lrs, alpha = [0.01, 0.02, 0.005], 0.9
    final, bufs = rule_unroll(RMSPROP, prob.train, prob.init, horizon=6,
                              hypers=dict(lr=lrs, alpha=alpha), options=dict(eps=1e-8))
    opt = torch.optim.RMSprop(prob.params, lr=lrs[0], alpha=alpha, eps=1e-8, foreach=False)
    for t in range(6):
        opt.param_groups[0]["lr"] = lrs[t // 2]
        prob.closure(opt, t, backward=True)()
        opt.step()
    for k, p in zip(prob.names, prob.params):
        assert torch.equal(final[k], p.detach())
        assert torch.equal(bufs["square_avg"][k], opt.state[p]["square_avg"])

    hypers = dict(lr=[0.02, 0.01], alpha=[0.9, 0.7, 0.95])
    _, exact = rule_unrolled_hypergrad(RMSPROP, prob.train, prob.val, prob.init, horizon=6,
                                       hypers=hypers)
    _, fd = rule_finite_difference_hypergrad(RMSPROP, prob.train, prob.val, prob.init, horizon=6,
                                             hypers=hypers)
    for name in ("lr", "alpha"):
        assert exact[name].shape == (len(hypers[name]),)
        torch.testing.assert_close(exact[name], fd[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("make", [
    lambda p, v: HypergradRMSprop(p, lr=0.01, alpha=0.9, hyper_lr=0.0, val_closure=v),
    lambda p, v: MartheRMSprop(p, lr=0.01, alpha=0.9, mu=1.0, hyper_lr=0.0,
                               adapt_hyper_lr=False, val_closure=v),
    lambda p, v: IFTRMSprop(p, lr=0.01, alpha=0.9, update_interval=2, lookback=2, hyper_lr=0.0,
                            val_closure=v),
    lambda p, v: FDSRMSprop(p, lr=0.01, alpha=0.9, horizon=6, lr_windows=2, val_closure=v),
], ids=["hd", "marthe", "ift", "fds"])
def test_with_a_zero_hyper_step_every_method_is_torch_rmsprop(make):
    prob, ref = Problem(1), Problem(1)
    opt = make(prob.params, lambda: prob.val(prob.live()))
    torch_opt = torch.optim.RMSprop(ref.params, lr=0.01, alpha=0.9, foreach=False)
    for t in range(6):
        opt.step(prob.closure(opt, t))
        ref.closure(torch_opt, t, backward=True)()
        torch_opt.step()
    for p, q in zip(prob.params, ref.params):
        assert torch.equal(p, q)


# ------------------------------------------------------------------- each method, exactly
def test_hd_hypergradient_is_the_oracle_one_step_derivative():
    """h_t = -<grad E(w_t), d_{t-1}> = dE(w_t)/da_{t-1}, through step t-1 from its own state."""
    prob = Problem(2)
    opt = HypergradRMSprop(prob.params, lr=0.02, alpha=0.8, hyper_lr=0.0,
                           val_closure=lambda: prob.val(prob.live()))
    starts = []
    for t in range(5):
        starts.append(prob.snapshot(opt))
        opt.step(prob.closure(opt, t))
    for t in range(1, 5):
        exact = prob.one_step_oracle(t - 1, starts[t - 1], 0.02, 0.8)
        assert opt.history[0]["hypergrad/lr"][t] == pytest.approx(exact.item(), rel=1e-10, abs=1e-15)


def test_marthe_mu_one_is_the_oracle_through_the_whole_run():
    """RTHO (mu = 1) with a frozen learning rate: Delta_T = dE(w_T)/da through all T steps."""
    prob = Problem(3)
    opt = MartheRMSprop(prob.params, lr=0.02, alpha=0.8, mu=1.0, hyper_lr=0.0,
                        adapt_hyper_lr=False, val_closure=lambda: prob.val(prob.live()))
    horizon = 5
    for t in range(horizon + 1):  # step T measures Delta_T at w_T before it moves on
        opt.step(prob.closure(opt, t))
    _, exact = rule_unrolled_hypergrad(RMSPROP, prob.train, prob.val, prob.init, horizon=horizon,
                                       hypers=dict(lr=0.02, alpha=0.8))
    assert opt.hvp_route == "exact"
    assert opt.history[0]["hypergrad/lr"][horizon] == pytest.approx(exact["lr"].item(), rel=1e-10)


@pytest.mark.parametrize("backward", [False, True], ids=["exact_hvp", "fd_hvp"])
def test_fds_episode_is_the_oracle_for_every_window(backward):
    """Schedules of both hyperparameters, windows of uneven length: dE(w_T)/d each value."""
    prob, horizon = Problem(5), 6
    hypers = dict(lr=[0.02, 0.01, 0.03], alpha=[0.9, 0.7])
    opt = FDSRMSprop(prob.params, lr=0.02, alpha=0.9, horizon=horizon, lr_windows=3,
                     alpha_windows=2, val_closure=lambda: prob.val(prob.live()))
    for name, values in hypers.items():
        opt.param_groups[0][f"{name}_schedule"] = list(values)
    for t in range(horizon):
        opt.step(prob.closure(opt, t, backward))
    val = opt.hyperstep()
    e, exact = rule_unrolled_hypergrad(RMSPROP, prob.train, prob.val, prob.init, horizon=horizon,
                                       hypers=hypers)
    assert val.item() == pytest.approx(e.item(), rel=1e-12)
    for name in ("lr", "alpha"):
        ours = torch.tensor(opt.history[0][f"hypergrad/{name}"][-1], dtype=F64)
        torch.testing.assert_close(ours, exact[name], rtol=1e-7 if backward else 1e-12, atol=0,
                                   msg=name)


def test_ift_lookback_one_is_the_oracle_one_step_derivative():
    """With lookback 1 the update differentiated is the step just taken: the hypergradient is
    dE(w_t)/da through step t-1 from its own state, times a ln 10 (log10 space)."""
    prob = Problem(4)
    opt = IFTRMSprop(prob.params, lr=0.02, alpha=0.8, update_interval=1, lookback=1, hyper_lr=0.0,
                     val_closure=lambda: prob.val(prob.live()))
    starts = []
    for t in range(4):
        starts.append(prob.snapshot(opt))
        opt.step(prob.closure(opt, t))
    got = opt.history[0]["hypergrad/lr"]
    assert len(got) == 4
    for t in range(4):
        exact = prob.one_step_oracle(t, starts[t], 0.02, 0.8) * 0.02 * LN10
        assert got[t] == pytest.approx(exact.item(), rel=1e-10, abs=1e-15)


def _explicit_ift(prob: Problem, t: int, start, lr: float, alpha: float, lookback: int) -> float:
    r"""Eq. 6 with explicit Jacobians: :math:`-\nabla L_V(w_{t+1})^\top \sum_{j < i} (I - J)^j
    \partial u/\partial a \cdot a \ln 10`, with :math:`u = w - \Phi_w` of step ``t`` from ``start``
    (its buffers held constant), so :math:`I - J = \partial\Phi_w/\partial w` (Hessian included)."""
    weights, buffers = start
    sizes = [weights[k].numel() for k in prob.names]
    square_avg = [torch.zeros_like(weights[k]) if buffers is None else buffers["square_avg"][k]
                  for k in prob.names]

    def unflat(flat: Tensor) -> dict[str, Tensor]:
        return {k: c.view(weights[k].shape) for k, c in zip(prob.names, flat.split(sizes))}

    def phi(flat: Tensor, a: Tensor) -> Tensor:
        p = unflat(flat if flat.requires_grad else flat.detach().requires_grad_())
        g = torch.autograd.grad(prob.train(p, t), list(p.values()), create_graph=True)
        new, _ = RMSPROP.step(list(p.values()), list(g), {"square_avg": square_avg},
                              {"lr": a, "alpha": alpha}, None, eps=1e-8)
        return torch.cat([n.reshape(-1) for n in new])

    w0 = torch.cat([weights[k].reshape(-1) for k in prob.names])
    a0 = torch.tensor(lr, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda f: phi(f, a0), w0)
    du_da = -torch.autograd.functional.jacobian(lambda a: phi(w0, a), a0)
    w1 = unflat(phi(w0, a0).detach().requires_grad_())
    gv = torch.cat([g.reshape(-1) for g in torch.autograd.grad(prob.val(w1), list(w1.values()))])
    term, total = du_da, torch.zeros_like(du_da)
    for _ in range(lookback):
        total, term = total + term, jac @ term
    return float(-(gv @ total) * lr * LN10)


@pytest.mark.parametrize("lookback", [2, 4])
def test_ift_neumann_series_over_the_new_rule_equals_explicit_jacobians(lookback):
    """lookback > 1: the Hessian products go through the rule's update (no oracle is exact here:
    the method holds the Jacobian at the current weights); against Eq. 6 with explicit matrices."""
    prob = Problem(5)
    opt = IFTRMSprop(prob.params, lr=0.05, alpha=0.8, update_interval=2, lookback=lookback,
                     hyper_lr=0.0, val_closure=lambda: prob.val(prob.live()))
    starts = []
    for t in range(4):
        starts.append(prob.snapshot(opt))
        opt.step(prob.closure(opt, t))
    assert opt.hvp_route == "exact"
    for k, t in enumerate((1, 3)):  # the hyper-updates judge steps 1 and 3
        want = _explicit_ift(prob, t, starts[t], 0.05, 0.8, lookback)
        assert opt.history[0]["hypergrad/lr"][k] == pytest.approx(want, rel=1e-9, abs=1e-15)
