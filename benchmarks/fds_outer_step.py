"""FDSSGD's outer step: the paper's additive step against the log-space step, from three starts.

The question of issue 16, item 4: from a learning rate 100x too small, does a log-space outer step
(``outer_step="log"``) reach a good schedule in a few episodes where the paper's additive step
(``outer_step="additive"``, 0.1 per episode for the learning rate) cannot, without hurting the
good start? Each run is ``FDSSGD`` on a task of ``_versus_tasks.py`` (its data, model and
batches; ``--steps`` per episode), ``lr_windows=5``, every schedule tuned (learning rate,
momentum, weight decay), ``--episodes`` episodes from the same initial weights and batches, as
``versus.py`` runs it; the last episode's model is tested. Starts: the versus SGD starts (poor lr
1e-3 momentum 0.5, good lr 0.1 momentum 0.9, large lr 1.0 momentum 0.9; weight decay 1e-4), a
decade lower on full-batch diabetes, where momentum 0.9 diverges at lr 0.1
(``hyperstep_policy.starts_for``). Variants: ``additive``; ``log`` (the class's log step: from a
factor 2, doubling on a repeated sign up to 10, halving on a flip, stepping back after a worse
episode); ``log-fixed`` (a fixed first factor sqrt(10), no growth, the same halving and
backtracking).

Printed: per task, start and variant, the mean and standard deviation over seeds of the final
test metric (accuracy in %, MSE on the standardised target), and the median over seeds of the
geometric mean of the last episode's learning-rate schedule.

Run (1 thread; about 10 minutes on 2 busy cores with the defaults):
    python benchmarks/fds_outer_step.py
    python benchmarks/fds_outer_step.py --tasks diabetes --seeds 0 1 2 --episodes 5
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from _versus_tasks import Task, digits_mlp, regression  # noqa: E402

from hyperoptim import FDSSGD  # noqa: E402

TASKS = {"digits-mlp": digits_mlp, "diabetes": regression}
STARTS = {"poor": dict(lr=1e-3, momentum=0.5, weight_decay=1e-4),
          "good": dict(lr=0.1, momentum=0.9, weight_decay=1e-4),
          "large": dict(lr=1.0, momentum=0.9, weight_decay=1e-4)}


class FixedLogStep(FDSSGD):
    """The log step without growth, from a factor sqrt(10) (the variant ``log-fixed``)."""

    log_step = math.log(10.0) / 2
    log_growth = 1.0


class LogMomentum(FDSSGD):
    """The log step with the momentum stepped in log(1 - momentum) (the variant ``log-mu``)."""

    log1m_names = ("momentum",)


VARIANTS = {"additive": (FDSSGD, "additive"), "log": (FDSSGD, "log"),
            "log-fixed": (FixedLogStep, "log"), "log-mu": (LogMomentum, "log")}


def start_for(task: Task, name: str) -> dict[str, float]:
    start = dict(STARTS[name])
    if task.batch is None:
        start["lr"] /= 10
    return start


def run(task: Task, variant: str, start: dict[str, float], seed: int, steps: int,
        episodes: int) -> tuple[float, float]:
    """The last episode's test metric and the geometric mean of its learning-rate schedule."""
    cls, outer_step = VARIANTS[variant]
    model = task.make_model(seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = cls(model.parameters(), **start, horizon=steps, lr_windows=5, outer_step=outer_step,
              val_closure=lambda: task.loss(model, task.x_val, task.y_val))
    batches = task.batches(seed, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for episode in range(episodes):
            model.load_state_dict(init)
            schedule = opt.schedule("lr")
            for idx in batches:
                x, y = (task.x_train, task.y_train) if idx is None else (task.x_train[idx],
                                                                         task.y_train[idx])
                opt.step(lambda x=x, y=y: task.loss(model, x, y))
            if episode < episodes - 1:
                opt.hyperstep()
    _, metric = task.evaluate(model, task.x_test, task.y_test)
    positive = [v for v in schedule if v > 0]
    geo = math.exp(statistics.fmean(math.log(v) for v in positive)) if positive else math.nan
    return metric, geo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=list(STARTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs=2, default=(200, 300),
                        metavar=("DIGITS", "DIABETES"), help="steps per episode")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"FDSSGD, {args.episodes} episodes, lr_windows=5, seeds {args.seeds}")
    print("| task | start | outer step | test metric (mean ± sd) | final lr (median) |")
    print("|---|---|---|---|---|")
    for name in args.tasks:
        task = TASKS[name]()
        steps = args.steps[0] if name == "digits-mlp" else args.steps[1]
        scale = 100.0 if task.metric == "accuracy" else 1.0
        for start_name in args.starts:
            start = start_for(task, start_name)
            for variant in args.variants:
                results = [run(task, variant, start, seed, steps, args.episodes)
                           for seed in args.seeds]
                metrics = [scale * m for m, _ in results]
                finite = all(math.isfinite(m) for m in metrics) and len(metrics) > 1
                sd = statistics.stdev(metrics) if finite else math.nan
                lr = statistics.median(g for _, g in results)
                print(f"| {name} ({steps} steps) | {start_name} (lr {start['lr']:g}) | {variant} "
                      f"| {statistics.fmean(metrics):.3f} ± {sd:.3f} | {lr:.3g} |", flush=True)


if __name__ == "__main__":
    main()
