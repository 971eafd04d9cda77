"""What FDSSGD reads after each episode of a versus task: the validation gain and its elasticity.

The readings behind the log outer step's far step (``hyperoptim.methods.fds_outer``): after each
episode, the validation loss at its initial weights :math:`E_0`, at its end :math:`E_T`, the gain
:math:`E_0 - E_T`, and :math:`\\rho = -\\sum_j a_j\\, \\partial E_T / \\partial a_j / (E_0 - E_T)`
(``LINEAR_RATIO``: about 1 while the gain grows linearly with the learning rate, about 0 near the
best rate), the stable learning rate a far step read from the curvature (``STABLE_SHARE``; 0
where none was read), with the schedules the episode ran and its test metric. Each run is ``FDSSGD`` on a
task of ``_versus_tasks.py`` from one of ``versus.py``'s SGD starts, 5 learning-rate windows, as
``versus.py`` runs it.

Run (1 thread per process):
    python benchmarks/fds_episodes.py --tasks charlm digits-cnn --start poor --episodes 2

``--episodes`` past ``versus.py``'s 3 shows where further outer steps take a start (the README's
account of FDSSGD's misses: ``--tasks charlm --start poor --episodes 5``); ``--start default``
runs the constructor's defaults (lr 0, the paper's: the first outer step is additive), the
versus tables' "defaults" rows (``--tasks diabetes --start default --episodes 3``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from _versus_tasks import all_tasks  # noqa: E402
from versus import STARTS, _batch  # noqa: E402

import hyperoptim  # noqa: E402


def episodes(task_name: str, start: str, seed: int, n: int) -> list[dict[str, Any]]:
    """``n`` episodes of FDSSGD on the task from ``start``; one reading per episode."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    task = next(t for t in all_tasks() if t.name == task_name)
    model = task.make_model(seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    batches = task.batches(seed, task.steps)
    settings = {} if start == "default" else STARTS["sgd"][start]  # default: lr 0, the paper's
    opt = hyperoptim.FDSSGD(model.parameters(), **settings, horizon=task.steps,
                            lr_windows=5,
                            val_closure=lambda: task.loss(model, task.x_val, task.y_val))
    out = []
    for episode in range(n):
        model.load_state_dict(init)
        for idx in batches:
            x, y = _batch(task, idx)
            opt.step(lambda x=x, y=y: task.loss(model, x, y))
        lrs = list(opt.param_groups[0]["lr_schedule"])
        momentum = opt.param_groups[0]["momentum_schedule"][0]
        start_loss = opt.hyper_state["start_loss"]
        end_loss = float(opt.hyperstep())
        hypergrads = opt.history[0]["hypergrad/lr"][-1]
        gain = start_loss - end_loss
        # The outer step's own reading (start_loss stays until the next episode's first step),
        # on the schedule this episode ran.
        rho = opt._linear_ratio({"lr_schedule": lrs}, {"lr": hypergrads}, end_loss)
        rho = math.nan if rho is None else rho
        _, test = task.evaluate(model, task.x_test, task.y_test)
        stable = opt.history[0]["stable_lr"][-1]  # the rate the far step read (0: none)
        out.append(dict(episode=episode, lr=lrs, momentum=momentum, start_loss=start_loss,
                        end_loss=end_loss, gain=gain, rho=rho, stable=stable, test=test))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["charlm", "digits-cnn"])
    parser.add_argument("--start", default="poor", choices=[*sorted(STARTS["sgd"]), "default"],
                        help="a versus start, or default: the constructor's (lr 0)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    jobs = [(t, args.start, s, args.episodes) for t in args.tasks for s in args.seeds]
    print("task        seed  episode  lr (first, largest)  momentum  E_0     E_T     gain    "
          "gain / last   rho     stable lr  test")
    with ProcessPoolExecutor(args.workers) as pool:
        for (task, _, seed, _), readings in zip(jobs, pool.map(episodes, *zip(*jobs))):
            last = None
            for r in readings:
                growth = f"{r['gain'] / last:8.1f}x" if last else "        -"
                lrs = f"{r['lr'][0]:.4g}, {max(r['lr']):.4g}"
                print(f"{task:<11} {seed:>4}  {r['episode']:>7}  {lrs:>19}  "
                      f"{r['momentum']:>8.3f}  {r['start_loss']:.4f}  {r['end_loss']:.4f}  "
                      f"{r['gain']:.4f}  {growth:>11}  {r['rho']:6.3f}  {r['stable']:9.4g}  "
                      f"{r['test']:.3f}")
                last = r["gain"]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
