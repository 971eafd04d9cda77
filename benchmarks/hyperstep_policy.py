"""Which hyper-step policy? Each policy of ``hyperoptim.hyperstep`` from three starts, on several tasks.

The question of issue 16: does a policy find its way from any starting learning rate? Each run is
``HypergradSGD`` (momentum 0.9) or ``HypergradAdam`` in training-loss mode (the drop-in use: no
validation closure), on tasks of ``_versus_tasks.py`` (their data, models, batches and step
counts; ``--steps-scale`` shortens them), from three starts:

- ``good``: SGD lr 0.1, Adam lr 1e-3 (the usual hand-picked values);
- ``poor``: 100x too small (SGD 1e-3, Adam 1e-5);
- ``large``: 10x too large (SGD 1.0, Adam 1e-2).

Full-batch tasks (diabetes) take SGD's starts a decade lower: there SGD at lr 0.1 with momentum
0.9 diverges.

Policies: ``fixed`` (no hyper-step: ``torch.optim``'s trajectory), ``additive`` (today's rule at
the class's default kappa: 1e-3 for SGD, 1e-7 for Adam), ``multiplicative``, ``growth``,
``adam_log`` and ``scale_free`` at their defaults (``--policies`` picks, and accepts any policy
``repr``, e.g. ``"ScaleFree(tau=0.3)"``).

``--val`` makes E the validation loss (``val_closure``), as ``benchmarks/versus.py`` runs the
hyperoptim rows; by default E is the training loss. ``--optimizers MartheSGD MartheAdam`` adds
MARTHE (same starts; E is always the validation loss, which MARTHE needs; ``additive`` is MARTHE's
own adaptive step at its class's default ``hyper_lr``).

Printed: per task and optimizer, one row per policy, the mean final test metric over seeds
(accuracy in %, MSE) from each start, the median final learning rate, and whether the issue's
targets hold for that row: from the poor start within 2 points of accuracy (5% of MSE) of the
same row's good start, from the large start within 5 points (10%). A diverged run (non-finite
loss) counts as the worst metric.

Run (1 thread):
    python benchmarks/hyperstep_policy.py                       # 3 tasks, 2 seeds
    python benchmarks/hyperstep_policy.py --tasks digits-mlp --seeds 0 --policies scale_free
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from _versus_tasks import Task, charlm, digits_cnn, digits_mlp, regression  # noqa: E402

import hyperoptim  # noqa: E402

STARTS = {
    "HypergradSGD": dict(good=0.1, poor=1e-3, large=1.0),
    "HypergradAdam": dict(good=1e-3, poor=1e-5, large=1e-2),
}
STARTS.update(MartheSGD=STARTS["HypergradSGD"], MartheAdam=STARTS["HypergradAdam"])
EXTRA = {"HypergradSGD": dict(momentum=0.9), "HypergradAdam": {}, "MartheSGD": dict(momentum=0.9),
         "MartheAdam": {}}
#: MARTHE needs a validation loss: its rows always take E = the validation loss.
NEEDS_VAL = ("MartheSGD", "MartheAdam")
TASKS = {"digits-mlp": digits_mlp, "digits-cnn": digits_cnn, "diabetes": regression,
         "charlm": charlm}
POLICIES = ("fixed", "additive", "multiplicative", "growth", "adam_log", "scale_free")


def make_optimizer(cls: str, params, lr: float, policy: str, val=None) -> torch.optim.Optimizer:
    opt_cls = getattr(hyperoptim, cls)
    kwargs = dict(lr=lr, val_closure=val, **EXTRA[cls])
    marthe = cls in NEEDS_VAL
    if policy == "fixed":
        return opt_cls(params, hyper_lr=0.0, **(dict(adapt_hyper_lr=False) if marthe else {}),
                       **kwargs)
    if policy == "additive":
        kappa = (inspect.signature(opt_cls).parameters["hyper_lr"].default if marthe
                 else opt_cls.default_hyper_lr)
        return opt_cls(params, hyper_lr=kappa, **kwargs)
    return opt_cls(params, hyper_step=policy, **kwargs)


def starts_for(task: Task, cls: str) -> dict[str, float]:
    """The three starts; full-batch diabetes with momentum 0.9 diverges at SGD lr 0.1, so its
    SGD starts are a decade lower (good 0.01)."""
    if cls in ("HypergradSGD", "MartheSGD") and task.batch is None:
        return {k: v / 10 for k, v in STARTS[cls].items()}
    return STARTS[cls]


def train(task: Task, model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int,
          steps: int) -> tuple[float, bool]:
    """Run ``steps`` steps of the task's batches (stopping at a non-finite loss): the final
    test metric (a diverged run's is the worst) and whether the run diverged."""
    diverged = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for idx in task.batches(seed, steps):
            x, y = (task.x_train, task.y_train) if idx is None else (task.x_train[idx],
                                                                     task.y_train[idx])
            loss = opt.step(lambda x=x, y=y: task.loss(model, x, y))
            if not math.isfinite(float(loss)):
                diverged = True
                break
    _, metric = task.evaluate(model, task.x_test, task.y_test)
    if diverged:
        metric = 0.0 if task.higher_is_better else math.inf
    return metric, diverged


def run(task: Task, cls: str, start: str, policy: str, seed: int, steps: int,
        use_val: bool = False) -> dict:
    model = task.make_model(seed)
    val = ((lambda: task.loss(model, task.x_val, task.y_val)) if use_val or cls in NEEDS_VAL
           else None)
    opt = make_optimizer(cls, model.parameters(), starts_for(task, cls)[start], policy, val)
    metric, diverged = train(task, model, opt, seed, steps)
    lrs = opt.history[0]["lr"]
    return dict(metric=metric, lr=opt.param_groups[0]["lr"], max_lr=max(lrs), diverged=diverged)


def fmt(task: Task, value: float) -> str:
    if task.metric == "accuracy":
        return f"{100 * value:5.1f}"
    return f"{value:5.3f}" if math.isfinite(value) and value < 100 else "  div"


def meets(task: Task, value: float, good: float, points: float, ratio: float) -> bool:
    if not math.isfinite(good):
        return False
    if task.metric == "accuracy":
        return value >= good - points / 100
    return math.isfinite(value) and value <= good * (1 + ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["digits-mlp", "digits-cnn", "diabetes"],
                        choices=list(TASKS))
    parser.add_argument("--optimizers", nargs="+", default=["HypergradSGD", "HypergradAdam"],
                        choices=list(STARTS), help="MartheSGD and MartheAdam always take E = the "
                        "validation loss")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--val", action="store_true",
                        help="E = the validation loss (val_closure, as benchmarks/versus.py "
                        "runs hyperoptim), instead of the training loss")
    parser.add_argument("--json", default=None, help="append every run as a JSON line here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    begin = time.perf_counter()
    for name in args.tasks:
        task = TASKS[name]()
        steps = max(1, round(task.steps * args.steps_scale))
        unit = "test acc %" if task.metric == "accuracy" else f"test {task.metric}"
        mode = "validation" if args.val else "training"
        print(f"\n{task.title}: {steps} steps, seeds {args.seeds}, E = {mode} loss; {unit} "
              "(median final lr)")
        for cls in args.optimizers:
            starts = starts_for(task, cls)
            print(f"  {cls:<14} " + "".join(f"{s} ({starts[s]:g})".ljust(22) for s in starts)
                  + "poor/large targets"
                  + (" (E = validation loss)" if cls in NEEDS_VAL and not args.val else ""))
            for policy in args.policies:
                cells, means = [], {}
                for start in starts:
                    runs = [run(task, cls, start, policy, seed, steps, args.val)
                            for seed in args.seeds]
                    if args.json:
                        with open(args.json, "a") as f:
                            for seed, r in zip(args.seeds, runs):
                                f.write(json.dumps(dict(task=name, optimizer=cls, start=start,
                                                        policy=policy, seed=seed, val=args.val,
                                                        **r)) + "\n")
                    vals = [r["metric"] for r in runs]
                    means[start] = (statistics.fmean(vals) if all(map(math.isfinite, vals))
                                    else math.inf)
                    lr = statistics.median(r["lr"] for r in runs)
                    cells.append(f"{fmt(task, means[start])} ({lr:.2g})".ljust(22))
                poor_ok = meets(task, means["poor"], means["good"], 2, 0.05)
                large_ok = meets(task, means["large"], means["good"], 5, 0.10)
                marks = f"{'ok' if poor_ok else '--'} / {'ok' if large_ok else '--'}"
                print(f"    {policy:<14} " + "".join(cells) + marks, flush=True)
    print(f"\n{time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
