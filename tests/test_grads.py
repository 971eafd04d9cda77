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

import hyperoptim.core.grads as grads_module
from hyperoptim import (
    FDSSGD,
    HypergradAdam,
    HypergradAdamW,
    HypergradSGD,
    HyperoptimWarning,
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


# ---------------------------------------------------------------------- the watch, and when it is off
def _watched() -> bool:
    """Is a ``TorchFunctionMode`` active here (the watch of ``hyperoptim.core.grads``)?"""
    return bool(torch.overrides._get_current_function_mode_stack())


def _spied(closure, log):
    def spy():
        log.append(_watched())
        return closure()

    return spy


def test_steady_state_calls_run_unwatched_and_leave_the_backbone_bit_identical():
    # Once a watched call finds no leaf beyond those the graphs showed, each kind of closure
    # (validation, finite-difference evaluations) runs without the TorchFunctionMode.
    backbone, head, loss_of = _net()
    val_log, train_log = [], []
    opt = MartheSGD(head.parameters(), lr=0.05, momentum=0.5, hyper_lr=1e-3,
                    hvp="finite_difference",
                    val_closure=_spied(_closure(loss_of, 1, "backward"), val_log))
    train = _spied(_closure(loss_of, 0, "backward"), train_log)
    gen = torch.Generator().manual_seed(1)
    for t in range(5):
        for p in backbone.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        before = [p.grad.clone() for p in backbone.parameters()]
        own = torch.autograd.grad(loss_of(0), list(backbone.parameters()))
        opt.zero_grad()
        opt.step(train)
        for p, b, g in zip(backbone.parameters(), before, own):
            assert torch.equal(p.grad, b + g), f"step {t}"
    # The step's own training call is never watched; its extra (finite-difference) calls and the
    # validation calls only at first (MARTHE's first validation call comes before any training
    # graph was walked: it finds the backbone, and the second call confirms).
    assert val_log[:2] == [True, True] and not any(val_log[2:]), val_log
    assert len(train_log) > 10 and not any(train_log[3:]), train_log
    assert opt.skipped_steps == 0


def test_a_new_foreign_leaf_in_an_unwatched_call_warns_and_every_later_call_is_watched():
    backbone, head, loss_of = _net()
    expert = nn.Linear(4, 1).double()  # another optimizer's, reached by validation from step 3
    torch.manual_seed(2)
    xv = torch.randn(16, 4, dtype=torch.float64)
    t_now, log = [0], []

    def val():
        log.append(_watched())
        loss = loss_of(1)
        if t_now[0] >= 3:
            loss = loss + expert(xv).pow(2).mean()
        loss.backward()
        return loss

    opt = HypergradSGD(head.parameters(), lr=0.05, hyper_lr=1e-3, val_closure=val)
    train = _closure(loss_of, 0, "backward")
    for t in range(6):
        t_now[0] = t
        for p in expert.parameters():
            p.grad = torch.full_like(p, float(t))
        kept = [p.grad for p in expert.parameters()]
        opt.zero_grad()
        if t == 3:
            with pytest.warns(HyperoptimWarning, match=r"val_closure reached 2 tensor\(s\).*"
                              r"shape \(1, 4\) float64.*watches again"):
                opt.step(train)
            continue  # this call could not be isolated: what the warning says
        opt.step(train)
        for p, g in zip(expert.parameters(), kept):
            assert p.grad is g and torch.equal(g, torch.full_like(p, float(t))), f"step {t}"
    assert log == [True, False, False, False, True, True]


def test_a_leaf_used_outside_the_returned_graph_keeps_its_closure_watched():
    backbone, head, loss_of = _net()
    aux = nn.Linear(4, 1).double()
    xv = torch.randn(16, 4, dtype=torch.float64)
    log = []

    def val():
        log.append(_watched())
        aux(xv).pow(2).mean().backward()  # an auxiliary loss, not in the returned graph
        loss = loss_of(1)
        loss.backward()
        return loss

    opt = HypergradSGD(head.parameters(), lr=0.05, hyper_lr=1e-3, val_closure=val)
    for t in range(4):
        for p in aux.parameters():
            p.grad = torch.full_like(p, float(t))
        kept = [p.grad.clone() for p in aux.parameters()]
        opt.zero_grad()
        opt.step(_closure(loss_of, 0, "backward"))
        for p, g in zip(aux.parameters(), kept):
            assert torch.equal(p.grad, g)
    assert all(log), log


@pytest.mark.parametrize("detach_from", [0, 2])
def test_a_closure_returning_no_graph_is_watched(detach_from):
    # Without a graph to walk, an unwatched call could not be checked: from the first such return,
    # every call runs watched.
    backbone, head, loss_of = _net()
    calls, log = [0], []

    def val():
        log.append(_watched())
        loss = loss_of(1)
        loss.backward()
        calls[0] += 1
        return loss.detach() if calls[0] > detach_from else loss

    opt = HypergradSGD(head.parameters(), lr=0.05, hyper_lr=1e-3, val_closure=val)
    for t in range(5):
        for p in backbone.parameters():
            p.grad = torch.full_like(p, float(t))
        kept = [p.grad for p in backbone.parameters()]
        opt.zero_grad()
        opt.step(_closure(loss_of, 0, "return"))
        for p, g in zip(backbone.parameters(), kept):
            assert p.grad is g and torch.equal(g, torch.full_like(p, float(t)))
    expected = [True] * 5 if detach_from == 0 else [True, False, False, True, True]
    assert log == expected


def _counting_walks(monkeypatch):
    """The number of loss graphs ``hyperoptim.core.grads`` walks, as a one-element list."""
    walks, walk = [0], grads_module._graph_leaves

    def counted(root):
        walks[0] += 1
        return walk(root)

    monkeypatch.setattr(grads_module, "_graph_leaves", counted)
    return walks


def test_settled_calls_that_never_call_backward_walk_no_graph(monkeypatch):
    # A validation closure that returns its loss (the optimizer takes the gradient with
    # torch.autograd.grad, which writes no .grad) cannot accumulate into a leaf: once its calls
    # run unwatched they walk neither the step's training graph nor their own. The backbone
    # keeps its gradient bit for bit.
    backbone, head, loss_of = _net()
    walks = _counting_walks(monkeypatch)
    log = []
    opt = HypergradSGD(head.parameters(), lr=0.05, momentum=0.5, hyper_lr=1e-3,
                       val_closure=_spied(_closure(loss_of, 1, "return"), log))
    for t in range(6):
        for p in backbone.parameters():
            p.grad = torch.full_like(p, float(t))
        before = [p.grad.clone() for p in backbone.parameters()]
        own = torch.autograd.grad(loss_of(0), list(backbone.parameters()))
        opt.zero_grad()
        opt.step(_closure(loss_of, 0, "backward"))
        for p, b, g in zip(backbone.parameters(), before, own):
            assert torch.equal(p.grad, b + g), f"step {t}"
        if t == 1:
            walked = walks[0]
    assert log[:1] == [True] and not any(log[1:]), log
    assert walks[0] == walked


def test_a_closure_that_starts_calling_backward_walks_again_and_keeps_the_backbone(monkeypatch):
    # From the first call of a kind that calls backward() after its calls settled, its calls walk
    # the graphs again: the backbone's gradient stays bit-identical from that call on.
    backbone, head, loss_of = _net()
    walks = _counting_walks(monkeypatch)
    t_now = [0]

    def val():
        loss = loss_of(1)
        if t_now[0] >= 3:
            loss.backward()
        return loss

    opt = HypergradSGD(head.parameters(), lr=0.05, momentum=0.5, hyper_lr=1e-3, val_closure=val)
    counts = []
    for t in range(6):
        t_now[0] = t
        for p in backbone.parameters():
            p.grad = torch.full_like(p, float(t))
        kept = [p.grad for p in backbone.parameters()]
        opt.zero_grad()
        opt.step(_closure(loss_of, 0, "return"))
        counts.append(walks[0])
        for p, g in zip(backbone.parameters(), kept):
            assert p.grad is g and torch.equal(g, torch.full_like(p, float(t))), f"step {t}"
    assert counts[2] == counts[1] and counts[3] > counts[2]
    assert counts[5] - counts[4] == counts[4] - counts[3] == 2  # the training graph and its own
