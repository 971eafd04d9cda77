"""``python -m hyperoptim``: the demo (and, later, other commands)."""

from __future__ import annotations

import argparse
import sys

from ._demo import ADAM_METHODS, ALL_METHODS, METHODS, DemoExtrasMissing, run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hyperoptim",
        description="torch.optim optimizers that learn their own hyperparameters.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a small MLP on scikit-learn's digits with every optimizer from the same "
        "poor start; print a table and write a PNG",
        description="Train a small MLP on scikit-learn's bundled digits from the same poor "
        "hyperparameters with torch.optim.SGD (poor and hand-tuned) and every hyperoptim "
        "optimizer. Prints test accuracy, loss, wall time and final hyperparameters, and writes "
        "hyperoptim_demo.png (learning rate against step, validation loss against wall time).",
    )
    demo.add_argument("--optimizer", nargs="+", choices=ALL_METHODS, default=None,
                      metavar="NAME", help=f"run a subset of {', '.join(ALL_METHODS)} (default: "
                      "every method of the chosen --inner optimizer)")
    demo.add_argument("--inner", choices=("sgd", "adam"), default="sgd",
                      help="the inner optimizer: sgd (the four methods over SGD) or adam "
                      f"({', '.join(ADAM_METHODS)}) (default: sgd)")
    demo.add_argument("--steps", type=int, default=600, help="training steps (default: 600)")
    demo.add_argument("--seed", type=int, default=0, help="data split and model seed (default: 0)")
    demo.add_argument("--quick", action="store_true",
                      help="at most 150 steps and 2 FDS episodes (under 30 s on 2 CPU cores)")
    demo.add_argument("--out", default=".", help="folder for the PNG (default: .)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"Invalid --steps value: {args.steps}")
    try:
        methods = args.optimizer or (ADAM_METHODS if args.inner == "adam" else METHODS)
        run_demo(tuple(methods), steps=args.steps, seed=args.seed, quick=args.quick,
                 out=args.out, progress=False if args.no_progress else None)
    except DemoExtrasMissing as err:
        print(f"python -m hyperoptim demo: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
