"""Does learning the momentum pay? HD and MARTHE with ``tune=("lr",)`` against
``tune=("lr", "momentum")``.

The question of issue 16, item 3: should ``HypergradSGD`` (and ``HypergradAdam``'s
:math:`\\beta_1`) learn the momentum by default? Each run is ``HypergradSGD`` (or
``HypergradAdam``) on tasks of ``_versus_tasks.py`` (their data, models, batches and step counts;
``--steps-scale`` shortens them) from the poor start of the versus benchmark: SGD lr 1e-3 with
momentum 0.5 (full-batch diabetes a decade lower, as ``hyperstep_policy.py``), Adam lr 1e-5 with
:math:`\\beta_1` 0.5; once learning the learning rate alone, once the momentum too, for each
hyper-step policy (``additive`` at the class's default kappa, and any policy name or ``repr`` of
``hyperoptim.hyperstep``). E is the training loss unless ``--val`` (the validation loss, as
``versus.py`` runs hyperoptim).

Printed: per task, optimizer and policy, the mean final test metric over seeds (accuracy in %,
MSE, perplexity) with ``tune=("lr",)`` and with ``("lr", "momentum")``, the median final
learning rate and momentum, and the difference.

``MartheSGD`` and ``MartheAdam`` (``--optimizers``) always take the validation loss as E (MARTHE
needs it); their ``additive`` policy is MARTHE's own step at the class defaults (the momentum
moves by the learning rate's adapted :math:`\beta`). ``--starts good`` adds the good start (SGD
lr 0.1 with momentum 0.9, Adam lr 1e-3 with :math:`\beta_1` 0.9).

Run (1 thread):
    python benchmarks/hd_momentum.py                      # digits MLP, CNN, diabetes; 3 seeds
    python benchmarks/hd_momentum.py --tasks charlm --policies scale_free --seeds 0
    python benchmarks/hd_momentum.py --optimizers MartheSGD --tasks digits-mlp digits-cnn \
        --policies additive growth scale_free --starts poor good --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from hyperstep_policy import TASKS, fmt, train  # noqa: E402

import hyperoptim  # noqa: E402

#: The poor start: (lr, momentum or beta1).
POOR = {"HypergradSGD": (1e-3, 0.5), "HypergradAdam": (1e-5, 0.5),
        "MartheSGD": (1e-3, 0.5), "MartheAdam": (1e-5, 0.5)}
#: The good start (the versus benchmark's hand-tuned values).
GOOD = {"HypergradSGD": (0.1, 0.9), "HypergradAdam": (1e-3, 0.9),
        "MartheSGD": (0.1, 0.9), "MartheAdam": (1e-3, 0.9)}
STARTS = {"poor": POOR, "good": GOOD}
TUNES = (("lr",), ("lr", "momentum"))


def _momentum(opt: torch.optim.Optimizer) -> float:
    group = opt.param_groups[0]
    return float(group["momentum"] if "momentum" in group else group["betas"][0])


def run(task, cls: str, policy: str, tune: tuple[str, ...], seed: int, steps: int,
        use_val: bool, start: str = "poor", phase: str = "run") -> dict:
    model = task.make_model(seed)
    lr, mu = STARTS[start][cls]
    sgd = cls.endswith("SGD")
    if sgd and task.batch is None:
        lr /= 10  # full batch with momentum: a decade lower, as hyperstep_policy.starts_for
    opt_cls = getattr(hyperoptim, cls)
    use_val = use_val or cls.startswith("Marthe")
    kwargs = dict(lr=lr, tune=tune, momentum_phase=phase,
                  val_closure=(lambda: task.loss(model, task.x_val, task.y_val)) if use_val
                  else None)
    if sgd:
        kwargs["momentum"] = mu
    else:
        kwargs["betas"] = (mu, 0.999)
    if policy == "additive":
        if hasattr(opt_cls, "default_hyper_lr"):  # MARTHE's own step: its class defaults
            kwargs["hyper_lr"] = opt_cls.default_hyper_lr
    else:
        kwargs["hyper_step"] = policy
    opt = opt_cls(model.parameters(), **kwargs)
    begin = time.perf_counter()
    metric, diverged = train(task, model, opt, seed, steps)
    return dict(metric=metric, lr=opt.param_groups[0]["lr"], momentum=_momentum(opt),
                diverged=diverged, seconds=time.perf_counter() - begin)


def row(task, name: str, cls: str, policy: str, steps: int, args: argparse.Namespace,
        start: str = "poor") -> str:
    """One printed row: both ``tune`` settings over the seeds (every run appended to
    ``--json``)."""
    cells, means = [], []
    for tune in TUNES:
        runs = [run(task, cls, policy, tune, seed, steps, args.val, start,
                    args.momentum_phase) for seed in args.seeds]
        if args.json:
            with open(args.json, "a") as f:
                f.writelines(json.dumps(dict(task=name, optimizer=cls, policy=policy,
                                             start=start, tune=list(tune), seed=seed,
                                             val=args.val, **r))
                             + "\n" for seed, r in zip(args.seeds, runs))
        vals = [r["metric"] for r in runs]
        means.append(statistics.fmean(vals) if all(map(math.isfinite, vals)) else math.inf)
        lr = statistics.median(r["lr"] for r in runs)
        mu = statistics.median(r["momentum"] for r in runs)
        cells.append(f"{'+'.join(tune):<12} {fmt(task, means[-1])} ({lr:.2g}, {mu:.3f})")
    diff = (means[1] - means[0]) * (100 if task.metric == "accuracy" else 1)
    return (f"  {cls:<13} {start:<5} {policy:<11} " + "   ".join(cells)
            + f"   diff {diff:+.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS),
                        default=["digits-mlp", "digits-cnn", "diabetes"])
    parser.add_argument("--optimizers", nargs="+", default=["HypergradSGD"], choices=list(POOR))
    parser.add_argument("--policies", nargs="+", default=["additive", "scale_free"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--starts", nargs="+", choices=list(STARTS), default=["poor"])
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--val", action="store_true", help="E = the validation loss")
    parser.add_argument("--momentum-phase", choices=["run", "stall"], default="run",
                        help="when the momentum is learned (default: run, the study's rule)")
    parser.add_argument("--json", default=None, help="append every run as a JSON line here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    begin = time.perf_counter()
    for name in args.tasks:
        task = TASKS[name]()
        steps = max(1, round(task.steps * args.steps_scale))
        unit = "test acc %" if task.metric == "accuracy" else f"test {task.metric}"
        val = args.val or all(c.startswith("Marthe") for c in args.optimizers)
        print(f"\n{task.title}: {steps} steps, seeds {args.seeds}, E = "
              f"{'validation' if val else 'training'} loss; {unit} (median final lr, "
              "momentum)")
        for cls in args.optimizers:
            for start in args.starts:
                for policy in args.policies:
                    print(row(task, name, cls, policy, steps, args, start), flush=True)
    print(f"\n{time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
