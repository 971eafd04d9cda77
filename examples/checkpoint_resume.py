"""Save a MartheSGD run mid-training, resume it in a fresh process state, and check the
trajectories are identical (weights, learning rate, mu, history: bit for bit).

Run:  python examples/checkpoint_resume.py [--steps N]
"""

from __future__ import annotations

import argparse
import io

import torch
from _digits import batches, digits, mlp
from torch.nn import functional as F

import hyperoptim


def make(xva, yva):
    model = mlp()
    opt = hyperoptim.MartheSGD(model.parameters(), lr=0.01, momentum=0.9, mu="adaptive",
                               val_closure=lambda: F.cross_entropy(model(xva), yva))
    return model, opt


def train(model, opt, xtr, ytr, schedule):
    for idx in schedule:
        opt.step(lambda idx=idx: F.cross_entropy(model(xtr[idx]), ytr[idx]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny model: one thread is fastest and never oversubscribes
    xtr, ytr, xva, yva, _, _ = digits()
    schedule = batches(len(ytr), 64, args.steps)
    half = args.steps // 2

    model, opt = make(xva, yva)
    train(model, opt, xtr, ytr, schedule)  # the uninterrupted run

    model_a, opt_a = make(xva, yva)
    train(model_a, opt_a, xtr, ytr, schedule[:half])
    buffer = io.BytesIO()  # a file on disk works the same way
    torch.save({"model": model_a.state_dict(), "optimizer": opt_a.state_dict()}, buffer)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model_b, opt_b = make(xva, yva)  # fresh objects, as after a restart
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["optimizer"])
    train(model_b, opt_b, xtr, ytr, schedule[half:])

    same_weights = all(torch.equal(a, b) for a, b in zip(model.parameters(), model_b.parameters()))
    same_history = opt.history == opt_b.history
    print(f"resumed at step {half} of {args.steps}: weights identical: {same_weights}, "
          f"history identical: {same_history}, final lr {opt_b.param_groups[0]['lr']:.5f}")
    if not (same_weights and same_history):
        raise SystemExit("the resumed run diverged from the uninterrupted one")


if __name__ == "__main__":
    main()
