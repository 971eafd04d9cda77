"""MartheSGD under DistributedDataParallel, launched with torchrun (CPU, gloo).

Every rank takes its share of each batch; DDP averages the training gradients, and the optimizer
averages what it computes itself (validation gradients, Hessian-vector products), so N ranks
follow the one-process trajectory and stay identical. The closure is the torch.optim idiom (it
calls ``backward()``), which takes the finite-difference HVP route; ``--exact`` uses a closure
that returns the loss instead (double backward, computed locally and then averaged).

Run:  torchrun --nproc_per_node 2 examples/ddp_torchrun.py [--steps N] [--exact]
      python examples/ddp_torchrun.py             # one process, same code
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from _digits import accuracy, batches, digits, mlp
from torch import nn
from torch.nn import functional as F

import hyperoptim


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--exact", action="store_true", help="closure returns the loss")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = (dist.get_rank(), dist.get_world_size()) if launched else (0, 1)
    try:
        xtr, ytr, xva, yva, xte, yte = digits()
        module = mlp()
        model: nn.Module = nn.parallel.DistributedDataParallel(module) if launched else module
        mine = slice(rank, None, world)  # this rank's share of every batch
        opt = hyperoptim.MartheSGD(model.parameters(), lr=0.01, momentum=0.9,
                                   val_closure=lambda: F.cross_entropy(model(xva[mine]), yva[mine]))
        if launched:
            opt.declare_ddp(model)  # DDP averages what backward() writes: the optimizer sends it once
        for idx in batches(len(ytr), 64, args.steps):
            x, y = xtr[idx][mine], ytr[idx][mine]

            def closure(x=x, y=y) -> torch.Tensor:
                loss = F.cross_entropy(model(x), y)
                if not args.exact:
                    opt.zero_grad()
                    loss.backward()
                return loss

            opt.step(closure)
        # Every rank holds the same weights; rank 0 reports.
        if rank == 0:
            print(f"ranks {world}, HVP route {opt.hvp_route}: learned lr "
                  f"{opt.param_groups[0]['lr']:.4g}, test accuracy {accuracy(module, xte, yte):.1%}")
        if launched:
            # Every rank done before the group goes away: a rank that tears gloo down while its
            # peer still uses the connection can abort (SIGABRT, seen once in a loaded test run).
            dist.barrier()
    finally:
        if launched:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
