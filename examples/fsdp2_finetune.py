"""HypergradAdamW and MartheAdamW fine-tune a small transformer sharded with FSDP2
(``fully_shard``), and a torch.distributed.checkpoint (DCP) save resumes each exactly.

Every rank holds a dim-0 shard of every parameter (DTensors) and its share of each batch; FSDP2
gathers the weights for forward and backward and reduce-scatters the gradients. HypergradAdamW
learns its learning rate from per-shard partial sums completed by one all-reduce of scalars per
step. MartheAdamW learns it from a validation loss through forward-mode tangents that live
sharded beside the parameters (DTensors, like the Adam moments); its Hessian-vector products are
finite differences of the gradient (two extra forward/backward passes per step, which FSDP2
shards like any other), since double backward finds no graph to FSDP2's shards.

Halfway, each run is saved with ``get_state_dict`` and ``dcp.save``; a fresh model and optimizer
(as after a restart) load it with ``dcp.load`` and ``set_state_dict`` and continue. The learned
learning rate, the Adam state, MARTHE's tangents and the optimizer's history come back (the
history and hyper state ride in ``param_groups``, which DCP keeps), so the resumed run ends on
the weights of the uninterrupted one. Data are generated here; nothing is downloaded. CPU/gloo,
or GPU/nccl where every rank has a GPU.

Run:  torchrun --nproc_per_node 2 examples/fsdp2_finetune.py [--steps N]
      python examples/fsdp2_finetune.py             # one unsharded process, same code
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn import functional as F

import hyperoptim

VOCAB, LENGTH, BATCH = 16, 12, 32


class Classifier(nn.Module):
    """Token and position embeddings, a 2-layer transformer encoder, mean pooling, a linear head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(LENGTH, width) * 0.02)
        # GELU: smooth, so that MARTHE's finite-difference Hessian-vector products in float32
        # meet no ReLU kinks.
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=64, dropout=0.0,
                                           activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.position).mean(dim=1))


def batch(step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` (the same on every rank and in every run): is token 1 more frequent than 2?"""
    gen = torch.Generator().manual_seed(step)
    tokens = torch.randint(VOCAB, (BATCH, LENGTH), generator=gen)
    labels = ((tokens == 1).sum(1) > (tokens == 2).sum(1)).long()
    return tokens.to(device), labels.to(device)


def build(device: torch.device, sharded: bool) -> nn.Module:
    torch.manual_seed(0)
    # float64: finite differences of float32 gradients lose to rounding once the loss is small
    # (MARTHE then warns that its Hessian-vector products are unreliable).
    model = Classifier().to(device, torch.float64)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.encoder.layers:  # one all-gather per layer, then the rest at the root
            fully_shard(layer)
        fully_shard(model)
    return model


def adamw(model: nn.Module, mine: slice, device: torch.device) -> hyperoptim.HypergradAdamW:
    """The scale-free hyper-step: its state (Adam moments on log lr) is the optimizer's
    hyper_state, which the DCP checkpoint carries along with the learned lr."""
    return hyperoptim.HypergradAdamW(model.parameters(), lr=1e-3, weight_decay=0.01,
                                     hyper_step="scale_free")


def marthe_adamw(model: nn.Module, mine: slice, device: torch.device) -> hyperoptim.MartheAdamW:
    """MARTHE on a held-out batch (this rank's share); its closure calls backward() too, so
    that FSDP2 reduce-scatters the validation gradients into the shards."""
    tokens, labels = batch(10_000, device)

    def val_closure() -> torch.Tensor:
        loss = F.cross_entropy(model(tokens[mine]), labels[mine])
        loss.backward()
        return loss

    return hyperoptim.MartheAdamW(model.parameters(), lr=1e-3, weight_decay=0.01,
                                  val_closure=val_closure)


OPTIMIZERS: dict[str, Callable[[nn.Module, slice, torch.device], Any]] = {
    "HypergradAdamW": adamw, "MartheAdamW": marthe_adamw}


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, mine: slice,
          device: torch.device) -> float:
    """``steps`` on this rank's share of each batch; the last training loss (this rank's)."""
    loss = torch.zeros(())
    for step in steps:
        tokens, labels = batch(step, device)

        def closure(tokens: torch.Tensor = tokens[mine], labels: torch.Tensor = labels[mine]
                    ) -> torch.Tensor:
            # Under FSDP2 backward()'s hooks reduce-scatter the gradients into the shards.
            opt.zero_grad()
            loss = F.cross_entropy(model(tokens), labels)
            loss.backward()
            return loss

        loss = opt.step(closure)
    return float(loss)


@torch.no_grad()
def largest_difference(a: nn.Module, b: nn.Module, launched: bool) -> float:
    """max |a - b| over every weight, every rank's shard included."""
    local = [(p.to_local() if hasattr(p, "to_local") else p) for p in a.parameters()]
    other = [(p.to_local() if hasattr(p, "to_local") else p) for p in b.parameters()]
    diff = torch.stack([(x - y).abs().max() if x.numel() else x.new_zeros(())
                        for x, y in zip(local, other)]).max()
    if launched:
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def checkpoint_dir(rank: int, launched: bool) -> str:
    """One temporary directory that every rank writes its shards into (rank 0 makes it)."""
    path = [tempfile.mkdtemp(prefix="fsdp2_finetune_") if rank == 0 else ""]
    if launched:
        dist.broadcast_object_list(path, src=0)
    return path[0]


def run(name: str, steps: int, mine: slice, device: torch.device, launched: bool,
        path: str) -> list[str]:
    """Train with optimizer ``name`` for ``steps``, saving at half time to ``path``; resume a
    fresh model and optimizer from there and finish. What rank 0 prints."""
    half = steps // 2
    make = OPTIMIZERS[name]
    model = build(device, launched)
    opt = make(model, mine, device)
    first_lr = opt.param_groups[0]["lr"]
    train(model, opt, range(half), mine, device)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path, no_dist=not launched)
    loss = train(model, opt, range(half, steps), mine, device)  # uninterrupted

    # A restart: a fresh model and optimizer are the load's target, then continue.
    resumed = build(device, launched)
    ropt = make(resumed, mine, device)
    model_sd, optim_sd = get_state_dict(resumed, ropt)
    target = {"model": model_sd, "optim": optim_sd}
    dcp.load(target, checkpoint_id=path, no_dist=not launched)
    set_state_dict(resumed, ropt, model_state_dict=target["model"],
                   optim_state_dict=target["optim"])
    train(resumed, ropt, range(half, steps), mine, device)
    gap = largest_difference(model, resumed, launched)
    world = dist.get_world_size() if launched else 1
    return [f"ranks {world}, {'fully_shard' if launched else 'unsharded'} on {device.type}: "
            f"{name} lr {first_lr:.4g} -> {opt.param_groups[0]['lr']:.4g}, last loss {loss:.3f}",
            f"  resumed from the DCP checkpoint at step {half}: largest weight difference "
            f"from the uninterrupted run {gap:.3g}, history entries "
            f"{len(ropt.history[0]['lr'])} of {len(opt.history[0]['lr'])}"]


def start() -> tuple[bool, torch.device]:
    """Under torchrun: join the process group (nccl where every local rank has a GPU, else gloo).
    Whether it was launched so, and this rank's device."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = launched and torch.cuda.is_available() and torch.cuda.device_count() >= int(
        os.environ.get("LOCAL_WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else (
        torch.device("cpu"))
    if cuda:
        torch.cuda.set_device(device)
    if launched:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    return launched, device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    launched, device = start()
    rank, world = (dist.get_rank(), dist.get_world_size()) if launched else (0, 1)
    mine = slice(rank, None, world)  # this rank's share of every batch
    path = checkpoint_dir(rank, launched)
    try:
        with warnings.catch_warnings():
            # DCP's note that one unsharded process loads in one process, as intended.
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            for name in OPTIMIZERS:
                lines = run(name, args.steps, mine, device, launched, os.path.join(path, name))
                if rank == 0:
                    print("\n".join(lines))
        if launched:
            # Every rank past its last collective before any tears the group down: a rank that
            # destroyed it while the other's gloo threads were still at work aborted at exit
            # ("terminate called without an active exception", about 1 run in 6 here).
            dist.barrier()
    finally:
        if launched:  # every rank's reads finished inside dcp.load (it ends in a collective)
            dist.destroy_process_group()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
