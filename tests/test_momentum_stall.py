"""HD's momentum learned while the run is stalled (``momentum_phase="stall"``, the default):
learned while every training loss so far is within 3% of the first, then held; the default
``tune`` of ``HypergradSGD``; the watch's state in ``state_dict``; its loss under DDP."""

import copy
import math
import os
import tempfile
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hyperoptim import HypergradAdam, HypergradSGD, MartheAdam, MartheSGD

STEPS = 14


def _data(steps=STEPS):
    """One full batch, every step (a minibatch's own noise would move the loss by more than 3%
    at once)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    return [(x, y)] * steps


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 1)).double()


def _run(steps=STEPS, data=None, model=None, opt=None, start=0, **kwargs):
    """Train with a closure that returns the loss (``step(closure)``); returns the model, the
    optimizer and, per step, whether the run was stalled before it."""
    data = _data() if data is None else data
    model = _model() if model is None else model
    opt = HypergradSGD(model.parameters(), **kwargs) if opt is None else opt
    stalled = []
    for x, y in data[start:steps]:
        stalled.append(opt._stall()["stalled"])
        opt.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
    return model, opt, stalled


# A poor start: the loss sits within 3% of its first value for a few steps, then falls.
POOR = dict(lr=1e-3, momentum=0.5)  # the class default policy, ScaleFree(accel=1.5, streak=20)


def test_default_tune_learns_the_momentum_only_where_it_can():
    params = list(_model().parameters())
    assert HypergradSGD(params, momentum=0.9).param_groups[0]["tune"] == ("lr", "momentum")
    assert HypergradSGD(params, momentum=0.9).param_groups[0]["momentum_phase"] == "stall"
    # torch.optim.SGD without momentum stays plain SGD; the additive policy (the papers')
    # keeps its old trajectories; Adam's beta1 is not learned by default.
    assert HypergradSGD(params).param_groups[0]["tune"] == ("lr",)
    assert HypergradSGD(params, momentum=0.9, hyper_lr=1e-3).param_groups[0]["tune"] == ("lr",)
    assert HypergradSGD(params, momentum=0.9,
                        hyper_step="additive").param_groups[0]["tune"] == ("lr",)
    assert HypergradAdam(params).param_groups[0]["tune"] == ("lr",)
    # A generator of parameters (and of a group's parameters) is read once, not emptied.
    model = _model()
    opt = HypergradSGD(model.parameters(), momentum=0.9)
    assert len(opt.param_groups[0]["params"]) == 4
    opt = HypergradSGD([{"params": (p for p in model.parameters())}], momentum=0.9)
    assert len(opt.param_groups[0]["params"]) == 4
    # MARTHE over SGD too (its own step, hyper_lr=, keeps the learning rate alone); over Adam not.
    val = lambda: model(torch.ones(2, 4, dtype=torch.float64)).sum()  # noqa: E731
    assert MartheSGD(model.parameters(), momentum=0.9,
                     val_closure=val).param_groups[0]["tune"] == ("lr", "momentum")
    assert MartheSGD(model.parameters(), val_closure=val).param_groups[0]["tune"] == ("lr",)
    assert MartheSGD(model.parameters(), momentum=0.9, hyper_lr=1e-6,
                     val_closure=val).param_groups[0]["tune"] == ("lr",)
    assert MartheAdam(model.parameters(), val_closure=val).param_groups[0]["tune"] == ("lr",)
    opt = MartheSGD((p for p in model.parameters()), momentum=0.9, val_closure=val)
    assert len(opt.param_groups[0]["params"]) == 4
    # Each group resolves it for its own momentum: plain SGD's group stays plain (no 1e-3 floor).
    first, second, third = list(model.parameters())[:3]
    for cls, extra in ((HypergradSGD, {}), (MartheSGD, dict(val_closure=val))):
        opt = cls([{"params": [first], "momentum": 0.0}, {"params": [second]}], momentum=0.9,
                  **extra)
        opt.add_param_group({"params": [third], "momentum": 0.0})
        assert [g["tune"] for g in opt.param_groups] == [("lr",), ("lr", "momentum"), ("lr",)]
    opt = HypergradSGD([first], momentum=0.9, tune=("lr",))  # an explicit tune is the default
    opt.add_param_group({"params": [second]})
    assert opt.param_groups[1]["tune"] == ("lr",)


def test_learned_while_stalled_then_held():
    _, opt, stalled = _run(**POOR)
    hist = opt.history[0]
    momenta = [0.5] + hist["momentum"]
    assert stalled[0] and not stalled[-1]  # the run stalled, then learned
    ended = stalled.index(False)
    assert ended >= 2
    # While stalled the momentum moves (from the third step: the first has no tangent, and the
    # second's is 0, no buffer before the first step) ...
    assert all(momenta[t + 1] != momenta[t] for t in range(2, ended))
    assert all(hist["hypergrad/momentum"][t] != 0.0 for t in range(2, ended))
    # ... and from the step after the loss left the band it is held, with no tangents.
    assert len(set(momenta[ended:])) == 1
    assert hist["hypergrad/momentum"][ended:] == [0.0] * (STEPS - ended)
    assert all("momentum_tangent" not in s for s in opt.state.values())
    assert momenta[-1] > 0.5  # a poor start asks for more momentum


def test_it_is_the_whole_run_rule_until_the_stall_ends():
    """Up to the stall's end the trajectory is ``momentum_phase="run"``'s, bit for bit; then
    the whole-run rule keeps moving the momentum and this one holds it."""
    m_stall, o_stall, stalled = _run(**POOR)
    m_run, o_run, _ = _run(**POOR, tune=("lr", "momentum"), momentum_phase="run")
    ended = stalled.index(False)
    for key in ("lr", "momentum", "hypergrad/momentum"):
        assert o_stall.history[0][key][:ended] == o_run.history[0][key][:ended]
    assert o_run.history[0]["momentum"][ended:] != o_stall.history[0]["momentum"][ended:]
    m_early, _, _ = _run(steps=ended, **POOR)
    m_early_run, _, _ = _run(steps=ended, **POOR, tune=("lr", "momentum"), momentum_phase="run")
    for a, b in zip(m_early.parameters(), m_early_run.parameters()):
        assert torch.equal(a, b)


def test_the_gate_is_relative():
    """The loss scaled by c and the learning rate by 1/c take the same weight steps: the stall
    ends at the same step and the momentum follows the same values (the gate is relative, and
    the policy's steps are normalised)."""
    c = 1e3

    def run(scale):
        model, data, stalled = _model(), _data(), []
        opt = HypergradSGD(model.parameters(), lr=1e-3 / scale, momentum=0.5)
        for x, y in data:
            stalled.append(opt._stall()["stalled"])
            opt.step(lambda x=x, y=y: scale * torch.nn.functional.mse_loss(model(x), y))
        return opt, stalled

    o1, s1 = run(1.0)
    o2, s2 = run(c)
    assert s1 == s2 and s1[2] and not s1[-1]
    # Not to rounding: the weights' rounding differs (lr / c times c g), and Adam's moments of
    # the first, near-zero hypergradients amplify it (measured: 0.3% at most).
    assert o2.history[0]["momentum"] == pytest.approx(o1.history[0]["momentum"], rel=1e-2)
    assert o2.history[0]["momentum"][-1] > 0.8


def test_resume_mid_stall_is_bit_exact():
    data = _data()
    m_full, o_full, stalled = _run(data=data, **POOR)
    assert stalled[3]  # still stalled where it is cut
    model, opt, _ = _run(steps=3, data=data, **POOR)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["hyper_state"]["stall"]["stalled"] is True
    fresh = copy.deepcopy(model)
    opt2 = HypergradSGD(fresh.parameters(), **POOR)
    opt2.load_state_dict(saved)
    _run(data=data, model=fresh, opt=opt2, start=3)
    for a, b in zip(m_full.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert opt2.history == o_full.history
    assert opt2.hyper_state["stall"] == o_full.hyper_state["stall"]


def test_old_state_dict_learned_all_run_and_a_malformed_watch_is_refused():
    _, opt, _ = _run(steps=3, **POOR, tune=("lr", "momentum"), momentum_phase="run")
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["momentum_phase"]  # saved before the option existed
    other = HypergradSGD(_model().parameters(), **POOR)
    other.load_state_dict(saved)
    assert other.param_groups[0]["momentum_phase"] == "run"
    _, opt, _ = _run(steps=3, **POOR)
    for bad in ({"first": 1.0}, {"first": "x", "stalled": True},
                {"first": 1.0, "stalled": 1}, {"first": math.inf, "stalled": True}):
        saved = copy.deepcopy(opt.state_dict())
        saved["hyper_state"]["stall"] = bad
        other = HypergradSGD(_model().parameters(), **POOR)
        before = copy.deepcopy(other.state_dict())
        with pytest.raises(ValueError, match="stall"):
            other.load_state_dict(saved)
        assert other.state_dict()["param_groups"] == before["param_groups"]


@pytest.mark.parametrize("value", ["always", None, 1])
def test_invalid_momentum_phase_is_refused(value):
    with pytest.raises(ValueError, match="Invalid momentum_phase value"):
        HypergradSGD(_model().parameters(), momentum=0.9, momentum_phase=value)


def test_a_step_without_a_loss_holds_it_and_an_explicit_tune_is_told():
    model = _model()
    x, y = _data()[0]
    for kwargs, warns in ((dict(), False), (dict(tune=("lr", "momentum")), True)):
        opt = HypergradSGD(model.parameters(), lr=0.01, momentum=0.9, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(4):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
        told = [w for w in caught if "momentum_phase='stall'" in str(w.message)]
        assert len(told) == (1 if warns else 0)
        assert set(opt.history[0]["momentum"]) == {0.9}
        assert opt.hyper_state["stall"]["stalled"] is False


class _Halves:
    """Full-batch least squares in float64 whose rows split in two halves: rank 0's targets sit
    within 1e-3 of the first prediction (its own loss is tiny and moves at once, relatively),
    rank 1's give a loss of about 1 that a small learning rate leaves within 3% for steps."""

    def __init__(self, n=16, d=4):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, d, generator=gen, dtype=torch.float64)
        self.y = self.x @ torch.randn(d, generator=gen, dtype=torch.float64)
        self.y[: n // 2] = 1e-3 * torch.randn(n // 2, generator=gen, dtype=torch.float64)
        self.w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
        self.n = n

    def rows(self, rank):
        return slice(rank * self.n // 2, (rank + 1) * self.n // 2)

    def loss(self, rows=slice(None)):
        return 0.5 * ((self.x[rows] @ self.w - self.y[rows]) ** 2).mean()


DDP_STEPS = 12
DDP_OPTIONS = dict(lr=1e-3, momentum=0.5)


def _ddp_worker(rank, store, out):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        prob = _Halves()
        opt = HypergradSGD([prob.w], **DDP_OPTIONS)

        def closure():
            opt.zero_grad()
            loss = prob.loss(prob.rows(rank))
            loss.backward()
            dist.all_reduce(prob.w.grad)  # DDP's averaging, before the step uses it
            prob.w.grad /= 2
            return loss

        for _ in range(DDP_STEPS):
            opt.step(closure)
        torch.save({"w": prob.w.detach().clone(), "history": opt.history,
                    "stall": opt.hyper_state["stall"]}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_ranks_watch_the_mean_loss_in_lockstep():
    """Gated on its own rows' loss, rank 0 would end the stall steps before the run on all rows
    does; each rank reads the loss's mean over the ranks, so both follow the single-process run
    on all rows, momentum and stall included."""
    ref = _Halves()
    opt = HypergradSGD([ref.w], **DDP_OPTIONS)
    own = []

    def closure():
        opt.zero_grad()
        own.append(ref.loss(ref.rows(0)).item())
        loss = ref.loss()
        loss.backward()
        return loss

    stalled = []
    for _ in range(DDP_STEPS):
        stalled.append(opt._stall()["stalled"])
        opt.step(closure)
    ends = [next(t for t, v in enumerate(own) if abs(v - own[0]) > 0.03 * abs(own[0])),
            stalled.index(False) - 1]
    assert ends[0] < ends[1], ends  # the premise
    assert len(set(opt.history[0]["momentum"])) > 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(os.path.join(tmp, "store"), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True)
                 for r in range(2)]
    assert torch.equal(ranks[0]["w"], ranks[1]["w"])
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["stall"] == ranks[1]["stall"]
    assert ranks[0]["stall"]["stalled"] == opt.hyper_state["stall"]["stalled"]
    assert ranks[0]["stall"]["first"] == pytest.approx(opt.hyper_state["stall"]["first"],
                                                       rel=1e-12)
    assert ranks[0]["history"][0]["momentum"] == pytest.approx(opt.history[0]["momentum"],
                                                               rel=1e-9)
    torch.testing.assert_close(ranks[0]["w"], ref.w.detach(), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- MARTHE (tune is opt-in there)
MARTHE = dict(lr=1e-3, momentum=0.5, tune=("lr", "momentum"))


def _marthe_run(steps=STEPS, model=None, opt=None, start=0, **kwargs):
    data = _data()
    model = _model() if model is None else model
    x_val, y_val = data[0][0][:16] + 0.1, data[0][1][:16]

    def val():
        return torch.nn.functional.mse_loss(model(x_val), y_val)

    opt = MartheSGD(model.parameters(), val_closure=val, **kwargs) if opt is None else opt
    stalled = []
    for x, y in data[start:steps]:
        stalled.append(opt._stall()["stalled"])
        opt.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
    return model, opt, stalled


def test_marthe_learns_it_while_stalled_then_holds_it():
    _, opt, stalled = _marthe_run(**MARTHE)
    _, run, _ = _marthe_run(**MARTHE, momentum_phase="run")
    hist = opt.history[0]
    assert stalled[0] and not stalled[-1]
    ended = stalled.index(False)
    assert len(set(hist["momentum"][:ended])) > 1  # it moved while stalled
    assert len(set(hist["momentum"][ended - 1:])) == 1  # and is held from then on
    assert hist["hypergrad/momentum"][ended:] == [0.0] * (STEPS - ended)
    assert all("momentum_tangent" not in s for s in opt.state.values())
    for key in ("lr", "momentum", "hypergrad/momentum"):  # the whole-run rule until then
        assert hist[key][:ended] == run.history[0][key][:ended]
    assert run.history[0]["momentum"][ended:] != hist["momentum"][ended:]


def test_marthe_resumes_mid_stall_exactly_and_refuses_a_malformed_watch():
    m_full, o_full, stalled = _marthe_run(**MARTHE)
    assert stalled[3]
    model, opt, _ = _marthe_run(steps=3, **MARTHE)
    saved = copy.deepcopy(opt.state_dict())
    fresh = copy.deepcopy(model)
    x_val, y_val = _data()[0][0][:16] + 0.1, _data()[0][1][:16]
    opt2 = MartheSGD(fresh.parameters(), **MARTHE,
                     val_closure=lambda: torch.nn.functional.mse_loss(fresh(x_val), y_val))
    opt2.load_state_dict(saved)
    _marthe_run(model=fresh, opt=opt2, start=3)
    for a, b in zip(m_full.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert opt2.history == o_full.history
    saved["hyper_state"]["stall"] = {"first": 1.0, "stalled": "yes"}
    with pytest.raises(ValueError, match="stall"):
        opt2.load_state_dict(saved)
    del saved["hyper_state"]["stall"]
    for group in saved["param_groups"]:
        del group["momentum_phase"]  # saved before the option: learned all run
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["momentum_phase"] == "run"
