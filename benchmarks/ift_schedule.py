"""IFT's hyper-update schedule: ``update_schedule="fixed"`` (the paper's, every ``update_interval``
steps) against ``"warmup"`` (every step until the learning rate's hypergradient first changes
sign, then every ``update_interval``; here with ``warmup_accel=1``) and ``"accelerated"`` (the
warm-up at the classes' default ``warmup_accel=1.5``: while the training loss stays within 3% of
its first value, the learning rate's hyper-step grows 1.5x per warm-up hyper-update, up to 8x),
from three starts.

The question of issue 16, item 4: with the paper's interval of 10 a short run gets few
hyper-updates (Adam 0.05 moves log10 lr about 0.05 per update, so 30 updates cross about 1.5
decades at best); does the warm-up let ``IFTOptimizer`` and ``IFTAdam`` find their way from a
learning rate 100x too small without hurting the good start? Runs are ``benchmarks/versus.py``'s
hyperoptim rows (validation loss as E, its starts, the tasks of ``_versus_tasks.py``):

- ``good``: SGD lr 0.1, momentum 0.9, weight decay 1e-4; Adam lr 1e-3;
- ``poor``: 100x too small (SGD lr 1e-3, momentum 0.5, weight decay 1e-4; Adam 1e-5);
- ``large``: 10x too large (SGD lr 1, momentum 0.9, weight decay 1e-4; Adam 1e-2).

Full-batch diabetes takes SGD's learning rates a decade lower (there SGD at lr 0.1 with momentum
0.9 diverges), as ``benchmarks/hyperstep_policy.py`` does. Every other argument is the class
default (``update_interval=10``, ``lookback=5``, Adam 0.05).

Printed: per task and optimizer, one row per schedule: the mean final test metric over seeds
(accuracy in %, MSE) from each start with the median final learning rate, the median number of
hyper-updates and of warm-up steps, and the issue's targets (poor start within 2 points / 5% of
the same row's good start, large start within 5 points / 10%). A diverged run counts as the worst
metric.

Run (1 thread):
    python benchmarks/ift_schedule.py                           # 3 tasks, seeds 0 1 2
    python benchmarks/ift_schedule.py --tasks diabetes --seeds 0 --starts poor
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from _versus_tasks import Task  # noqa: E402
from hyperstep_policy import TASKS, fmt, meets, train  # noqa: E402

import hyperoptim  # noqa: E402

STARTS = {
    "IFTOptimizer": dict(good=dict(lr=0.1, momentum=0.9, weight_decay=1e-4),
                         poor=dict(lr=1e-3, momentum=0.5, weight_decay=1e-4),
                         large=dict(lr=1.0, momentum=0.9, weight_decay=1e-4)),
    "IFTAdam": dict(good=dict(lr=1e-3), poor=dict(lr=1e-5), large=dict(lr=1e-2)),
}
SCHEDULES = ("fixed", "warmup", "accelerated")
OPTIONS = {"fixed": dict(update_schedule="fixed"),
           "warmup": dict(update_schedule="warmup", warmup_accel=1.0),
           "accelerated": dict(update_schedule="warmup")}


def starts_for(task: Task, cls: str) -> dict[str, dict[str, float]]:
    """The three starts; full-batch diabetes takes SGD's learning rates a decade lower."""
    if cls == "IFTOptimizer" and task.batch is None:
        return {k: dict(v, lr=v["lr"] / 10) for k, v in STARTS[cls].items()}
    return STARTS[cls]


def run(task: Task, cls: str, start: dict[str, float], schedule: str, seed: int,
        steps: int) -> dict:
    model = task.make_model(seed)
    opt = getattr(hyperoptim, cls)(model.parameters(), **start, **OPTIONS[schedule],
                                   val_closure=lambda: task.loss(model, task.x_val, task.y_val))
    begin = time.perf_counter()
    metric, diverged = train(task, model, opt, seed, steps)
    warm = opt.history[0].get("update_schedule/warmup", [])
    return dict(metric=metric, lr=opt.param_groups[0]["lr"], updates=len(opt.history[0]["lr"]),
                warmup=int(sum(warm)), diverged=diverged, seconds=time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["digits-mlp", "digits-cnn", "diabetes"],
                        choices=list(TASKS))
    parser.add_argument("--optimizers", nargs="+", default=list(STARTS), choices=list(STARTS))
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--starts", nargs="+", default=["good", "poor", "large"],
                        choices=["good", "poor", "large"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--json", default=None, help="append every run as a JSON line here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    begin = time.perf_counter()
    for name in args.tasks:
        task = TASKS[name]()
        steps = max(1, round(task.steps * args.steps_scale))
        unit = "test acc %" if task.metric == "accuracy" else f"test {task.metric}"
        print(f"\n{task.title}: {steps} steps, seeds {args.seeds}; {unit} (median final lr, "
              "hyper-updates, warm-up steps)")
        for cls in args.optimizers:
            starts = starts_for(task, cls)
            print(f"  {cls:<13} " + "".join(f"{s} ({starts[s]['lr']:g})".ljust(28)
                                             for s in args.starts) + "poor/large targets")
            for schedule in args.schedules:
                cells, means = [], {}
                for start in args.starts:
                    runs = [run(task, cls, starts[start], schedule, seed, steps)
                            for seed in args.seeds]
                    if args.json:
                        with open(args.json, "a") as f:
                            for seed, r in zip(args.seeds, runs):
                                f.write(json.dumps(dict(task=name, optimizer=cls, start=start,
                                                        schedule=schedule, seed=seed, **r)) + "\n")
                    vals = [r["metric"] for r in runs]
                    means[start] = statistics.fmean(vals)
                    lr = statistics.median(r["lr"] for r in runs)
                    ups = statistics.median(r["updates"] for r in runs)
                    warm = statistics.median(r["warmup"] for r in runs)
                    cells.append(f"{fmt(task, means[start])} ({lr:.2g}, {ups:g}, {warm:g})"
                                 .ljust(28))
                marks = ""
                if {"good", "poor", "large"} <= set(means):
                    poor_ok = meets(task, means["poor"], means["good"], 2, 0.05)
                    large_ok = meets(task, means["large"], means["good"], 5, 0.10)
                    marks = f"{'ok' if poor_ok else '--'} / {'ok' if large_ok else '--'}"
                print(f"    {schedule:<11} " + "".join(cells) + marks, flush=True)
    print(f"\n{time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
