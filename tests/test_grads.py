"""The optimizer's extra evaluations leave the gradients of everything else exactly as they were.

A backbone trained by a second optimizer and a head trained by a hyperoptim class: after every
step, the backbone's ``.grad`` must be bit-identical to what ``torch.optim.SGD(head).step(closure)``
leaves (the training closure's own call, nothing else), whatever extra closure calls the class
makes (validation gradients, finite-difference HVPs, IFT hyper-updates, FDS's hyperstep).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hyperoptim import (
    FDSSGD,
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

_SECOND_ORDER = dict(update_interval=1, lookback=2)
CLASSES = [
    (HypergradSGD, dict(lr=0.05, momentum=0.5, hyper_lr=1e-3)),
    (HypergradAdam, dict(lr=1e-2, hyper_lr=1e-5)),
    (HypergradAdamW, dict(lr=1e-2, hyper_lr=1e-5)),
    (MartheSGD, dict(lr=0.05, momentum=0.5, hyper_lr=1e-3)),
    (MartheAdam, dict(lr=1e-2, hyper_lr=1e-5)),
    (MartheAdamW, dict(lr=1e-2, hyper_lr=1e-5)),
    (IFTOptimizer, dict(lr=0.05, momentum=0.5, weight_decay=1e-3, **_SECOND_ORDER)),
    (IFTAdam, dict(lr=1e-2, weight_decay=1e-3, **_SECOND_ORDER)),
    (IFTAdamW, dict(lr=1e-2, weight_decay=1e-3, **_SECOND_ORDER)),
    (FDSSGD, dict(lr=0.01, momentum=0.5, horizon=2)),
]
# (closure style, hvp route): a closure that calls backward() takes the finite-difference route.
STYLES = [("backward", "finite_difference"), ("return", "exact"), ("return", "finite_difference")]


def _net():
    torch.manual_seed(0)
    backbone = nn.Linear(4, 8).double()
    head = nn.Linear(8, 1).double()
    data = [torch.randn(16, 4, dtype=torch.float64) for _ in range(2)]
    targets = [torch.randn(16, 1, dtype=torch.float64) for _ in range(2)]

    def loss_of(i):
        return F.mse_loss(head(torch.tanh(backbone(data[i]))), targets[i])

    return backbone, head, loss_of


def _closure(loss_of, i, style, zero=()):
    def closure():
        for module in zero:
            module.zero_grad()
        loss = loss_of(i)
        if style == "backward":
            loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("style,hvp", STYLES, ids=[f"{s}-{h}" for s, h in STYLES])
@pytest.mark.parametrize("cls,kwargs", CLASSES, ids=[c.__name__ for c, _ in CLASSES])
def test_backbone_of_another_optimizer_gets_bit_identical_gradients(cls, kwargs, style, hvp):
    backbone, head, loss_of = _net()
    train, val = _closure(loss_of, 0, style), _closure(loss_of, 1, style)
    extra = {} if cls.__name__.startswith("Hypergrad") else {"hvp": hvp}
    opt = cls(head.parameters(), val_closure=val, **extra, **kwargs)
    backbone_opt = torch.optim.SGD(backbone.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for t in range(4):
        # Gradients already accumulated in the backbone (the closure adds to them, as with
        # torch.optim), and the one the training closure's own call adds.
        for p in backbone.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        before = [p.grad.clone() for p in backbone.parameters()]
        own = torch.autograd.grad(loss_of(0), list(backbone.parameters()))
        opt.zero_grad()
        expected = [b + g if style == "backward" else b for b, g in zip(before, own)]
        opt.step(train)
        for p, e in zip(backbone.parameters(), expected):
            assert torch.equal(p.grad, e), f"step {t}: {p.grad} != {e}"
        if isinstance(opt, FDSSGD) and opt.episode_step == opt.horizon:
            opt.hyperstep()
            for p, e in zip(backbone.parameters(), expected):
                assert torch.equal(p.grad, e), f"hyperstep after step {t}"
        backbone_opt.step()
    assert opt.skipped_steps == 0
    if cls in (MartheSGD, IFTOptimizer) and style == "backward":
        assert opt.hvp_route == "finite_difference"


def test_issue_repro_marthe_backbone_gradient_is_not_tripled():
    backbone, head, loss_of = _net()
    closure = _closure(loss_of, 0, "backward")
    opt = MartheSGD(head.parameters(), lr=0.1, val_closure=closure)
    for _ in range(3):
        backbone.zero_grad()
        true = torch.autograd.grad(loss_of(0), list(backbone.parameters()))
        opt.zero_grad()
        opt.step(closure)
        for p, g in zip(backbone.parameters(), true):
            assert torch.equal(p.grad, g)
    assert opt.hvp_route == "finite_difference"


def test_validation_closure_without_a_training_closure_leaves_an_unseen_backbone_alone():
    # Nothing has shown the optimizer the backbone before its val_closure reaches it: the leaf is
    # caught when it first enters an operation.
    backbone, head, loss_of = _net()
    opt = HypergradSGD(head.parameters(), lr=0.05, hyper_lr=1e-3,
                       val_closure=_closure(loss_of, 1, "backward"))
    for _ in range(3):
        opt.zero_grad()
        backbone.zero_grad()
        loss_of(0).backward()
        before = [p.grad.clone() for p in backbone.parameters()]
        opt.step()
        for p, b in zip(backbone.parameters(), before):
            assert torch.equal(p.grad, b)


def test_closure_that_zeroes_the_backbone_keeps_its_single_call_gradient():
    # model.zero_grad() inside the closure: every extra call would otherwise replace the backbone's
    # gradient by the one at perturbed weights (or at the validation batch).
    backbone, head, loss_of = _net()
    model = nn.ModuleList([backbone, head])
    opt = MartheSGD(head.parameters(), lr=0.05, val_closure=_closure(loss_of, 1, "backward", [model]))
    closure = _closure(loss_of, 0, "backward", [model])
    for _ in range(3):
        true = torch.autograd.grad(loss_of(0), list(backbone.parameters()))
        opt.step(closure)
        for p, g in zip(backbone.parameters(), true):
            assert torch.equal(p.grad, g)
    assert opt.hvp_route == "finite_difference"
