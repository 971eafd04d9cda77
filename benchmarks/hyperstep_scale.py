"""How large a hyper-step? Each optimizer's knob swept over decades, from a poor and a good start.

Every optimizer has one hyper-step size, each on its own scale (``HypergradSGD``'s
``hyper_lr`` multiplies a raw hypergradient, ``IFTOptimizer``'s ``hyper_lr`` is an Adam step
on log10(lr), ``FDSSGD``'s ``hyper_lr`` sizes sign steps per episode, ...). This script measures
what each knob does on the demo's problem, so that the README's rule of thumb comes from numbers:

- data and model: the demo's (``python -m hyperoptim demo``): scikit-learn's bundled digits (no
  download), pixels / 16, split 60/20/20 with the seed; MLP 64-64-10; mini-batches of 64, drawn by
  the seed, which also draws the initial weights;
- starts: SGD-based optimizers from a poor start (lr 1e-3, momentum 0.5, weight decay 1e-4: the
  demo's) and a good one (lr 0.1, momentum 0.9, weight decay 1e-4: the usual hand-picked values);
  Adam-based ones from lr 1e-4 (poor) and 1e-3 (Adam's default, good). The fixed optimizer at each
  start is the reference row ("fixed");
- E: the cross-entropy on the whole validation split (every optimizer gets ``val_closure``);
  online methods run ``--steps`` steps; ``FDSSGD`` runs ``--episodes`` episodes of ``--steps``
  steps each from the same initial weights (one window per hyperparameter), so it sees
  ``--episodes`` times the data, and the last episode's model is the one evaluated;
- knobs, a decade apart around each default: ``HypergradSGD(hyper_lr=)`` (default 1e-3),
  ``MartheSGD(hyper_lr=)`` (the step of the adaptive beta, default 1e-6),
  ``IFTOptimizer(hyper_lr=)`` (default 0.05), ``FDSSGD(hyper_lr=)`` as a multiple of its
  default sizes (lr 0.1, momentum 0.15, weight decay 4e-4), ``HypergradAdam(hyper_lr=)``
  (default 1e-7) and ``MartheAdam(hyper_lr=)`` (default 1e-9).

Reported per optimizer, start and knob value, over seeds: final validation and test accuracy
(mean), final learning rate (median) and the largest learning rate reached (median), steps the
step guard skipped (total), runs that diverged (a non-finite validation loss, or a final
validation loss above the initial one), and runs where the optimizer's own divergence warning
fired. Then, per optimizer, the rule of thumb the numbers support: the knob values whose mean
validation accuracy is within ``--tolerance`` points of the best value's from *both* starts, with
no diverged run. Runs are interleaved: each seed runs every configuration before the next seed
starts, so load drift on a shared machine touches every row alike; a seed starts only if, at the
pace of the seeds so far, it would end within ``--time-limit`` (the report says when it stopped).

Run (1 thread; one seed takes about 3.5 minutes on a heavily loaded 2-core CPU):
    python benchmarks/hyperstep_scale.py                 # 2 seeds (1 if 2 would pass 300 s), 200 steps
    python benchmarks/hyperstep_scale.py --time-limit 900  # the README's numbers: 2 seeds, ~7 min
    python benchmarks/hyperstep_scale.py --quick         # 1 seed, 100 steps, 2 episodes, 3 knobs
    python benchmarks/hyperstep_scale.py --only HypergradSGD MartheSGD --seeds 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from hyperoptim import FDSSGD, HypergradAdam, HypergradSGD, IFTOptimizer, MartheAdam, MartheSGD
from hyperoptim._demo import POOR, POOR_ADAM, TUNED, TUNED_ADAM, Splits, load_digits, make_model
from hyperoptim.fds import DEFAULT_STEP_SIZES

Closure = Callable[[], torch.Tensor]
Params = list[nn.Parameter]


@dataclass
class Sweep:
    """One optimizer's knob: its name, its default, the values swept, how to build it."""

    name: str
    knob: str
    default: float
    values: list[float]
    inner: str  # "sgd" or "adam": which starts apply
    make: Callable[[Params, dict[str, float], float, Closure, int], torch.optim.Optimizer]


def _fds(params: Params, start: dict[str, float], k: float, val: Closure,
         steps: int) -> torch.optim.Optimizer:
    sizes = {name: k * v for name, v in DEFAULT_STEP_SIZES.items()}
    return FDSSGD(params, **start, horizon=steps, hyper_lr=sizes, val_closure=val)


SWEEPS = [
    Sweep("HypergradSGD", "hyper_lr", 1e-3, [1e-4, 1e-3, 1e-2, 1e-1, 1.0], "sgd",
          lambda p, s, k, val, n: HypergradSGD(p, **s, hyper_lr=k, val_closure=val)),
    Sweep("MartheSGD", "hyper_lr", 1e-6, [1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3], "sgd",
          lambda p, s, k, val, n: MartheSGD(p, **s, hyper_lr=k, val_closure=val)),
    Sweep("IFTOptimizer", "hyper_lr", 0.05, [5e-3, 0.05, 0.5, 5.0], "sgd",
          lambda p, s, k, val, n: IFTOptimizer(p, **s, hyper_lr=k, val_closure=val)),
    Sweep("FDSSGD", "hyper_lr (x default)", 1.0, [0.1, 1.0, 10.0], "sgd", _fds),
    Sweep("HypergradAdam", "hyper_lr", 1e-7, [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2], "adam",
          lambda p, s, k, val, n: HypergradAdam(p, **s, hyper_lr=k, val_closure=val)),
    Sweep("MartheAdam", "hyper_lr", 1e-9, [1e-12, 1e-11, 1e-10, 1e-9, 1e-8], "adam",
          lambda p, s, k, val, n: MartheAdam(p, **s, hyper_lr=k, val_closure=val)),
]

STARTS = {"sgd": {"poor": POOR, "good": TUNED}, "adam": {"poor": POOR_ADAM, "good": TUNED_ADAM}}
FIXED = {"sgd": lambda p, s: torch.optim.SGD(p, **s), "adam": lambda p, s: torch.optim.Adam(p, **s)}


@dataclass
class Run:
    val_acc: float
    test_acc: float
    final_lr: float
    max_lr: float
    skipped: int
    diverged: bool
    warned: bool


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def run_one(sweep: Sweep | None, inner: str, start: dict[str, float], knob: float | None, seed: int,
            steps: int, episodes: int, data: Splits, batch: int = 64) -> Run:
    """Train once; ``sweep=None`` is the fixed optimizer at ``start``."""
    model = make_model(seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    first_val = _accuracy(model, data.x_val, data.y_val)[0]

    def val() -> torch.Tensor:
        return F.cross_entropy(model(data.x_val), data.y_val)

    params = list(model.parameters())
    opt = FIXED[inner](params, start) if sweep is None else sweep.make(params, start, knob, val, steps)
    fds = isinstance(opt, FDSSGD)
    gen = torch.Generator().manual_seed(10_000 + seed)
    lrs: list[float] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for episode in range(episodes if fds else 1):
            if fds:
                model.load_state_dict(init)
                gen.manual_seed(10_000 + seed)  # the same batches in every episode
            for _ in range(steps):
                idx = torch.randint(len(data.y_train), (batch,), generator=gen)

                def closure(idx: torch.Tensor = idx) -> torch.Tensor:
                    opt.zero_grad()
                    loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                    loss.backward()
                    return loss

                opt.step(closure)
                lrs.append(float(opt.param_groups[0]["lr"]))
            if fds and episode < episodes - 1:
                opt.hyperstep()
    val_loss, val_acc = _accuracy(model, data.x_val, data.y_val)
    test_acc = _accuracy(model, data.x_test, data.y_test)[1]
    finite_lrs = [v for v in lrs if math.isfinite(v)] or [math.nan]
    return Run(
        val_acc=val_acc if math.isfinite(val_loss) else 0.0,
        test_acc=test_acc if math.isfinite(val_loss) else 0.0,
        final_lr=lrs[-1],
        max_lr=max(finite_lrs),
        skipped=int(getattr(opt, "skipped_steps", 0)),
        diverged=not math.isfinite(val_loss) or val_loss > first_val,
        warned=any("training looks divergent" in str(w.message) for w in caught),
    )


def _row(label: str, runs: list[Run]) -> str:
    return (f"  {label:>10} {100 * statistics.mean(r.val_acc for r in runs):>8.1f} "
            f"{100 * statistics.mean(r.test_acc for r in runs):>9.1f} "
            f"{statistics.median(r.final_lr for r in runs):>10.3g} "
            f"{statistics.median(r.max_lr for r in runs):>10.3g} "
            f"{sum(r.skipped for r in runs):>8d} {sum(r.diverged for r in runs):>5d} "
            f"{sum(r.warned for r in runs):>7d}")


def rule_of_thumb(sweep: Sweep, results: dict[tuple[str, float], list[Run]], tolerance: float) -> str:
    """The knob values within ``tolerance`` points of the best from every start, none diverged."""
    good = []
    for k in sweep.values:
        ok = True
        for start in STARTS[sweep.inner]:
            runs = results[(start, k)]
            best = max(statistics.mean(r.val_acc for r in results[(start, v)]) for v in sweep.values)
            mean = statistics.mean(r.val_acc for r in runs)
            ok &= 100 * (best - mean) <= tolerance and not any(r.diverged for r in runs)
        if ok:
            good.append(k)
    if not good:
        return (f"{sweep.name}: no {sweep.knob} within {tolerance:g} points of the best from both "
                "starts without a diverged run")
    contiguous = all(sweep.values.index(b) - sweep.values.index(a) == 1 for a, b in zip(good, good[1:]))
    span = (f"{good[0]:g}" if len(good) == 1 else f"{good[0]:g} to {good[-1]:g}" if contiguous
            else ", ".join(f"{k:g}" for k in good))
    best = {start: max(sweep.values, key=lambda v, start=start: statistics.mean(
        r.val_acc for r in results[(start, v)])) for start in STARTS[sweep.inner]}
    return (f"{sweep.name}: {sweep.knob} {span} (default {sweep.default:g}: "
            f"{'inside' if sweep.default in good else 'outside'}; best from the poor start "
            f"{best['poor']:g}, from the good start {best['good']:g})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200, help="steps (per FDS episode)")
    parser.add_argument("--episodes", type=int, default=3, help="FDSSGD episodes")
    parser.add_argument("--only", nargs="*", choices=[s.name for s in SWEEPS], help="optimizers")
    parser.add_argument("--tolerance", type=float, default=2.0,
                        help="points of validation accuracy from the best for the rule of thumb")
    parser.add_argument("--time-limit", type=float, default=300.0,
                        help="seconds; a seed starts only if, at the pace so far, it ends within this")
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 100 steps, 2 FDS episodes, 3 knob values (smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sweeps = [s for s in SWEEPS if not args.only or s.name in args.only]
    if args.quick:
        args.seeds, args.steps, args.episodes = 1, min(args.steps, 100), 2
        sweeps = [Sweep(s.name, s.knob, s.default, [s.default / 100, s.default, s.default * 100],
                        s.inner, s.make) for s in sweeps]
    inners = sorted({s.inner for s in sweeps}, reverse=True)
    data = load_digits(0)
    # every configuration, in the order each seed runs them
    configs: list[tuple[Sweep | None, str, str, float | None]] = []
    for inner in inners:
        for start in STARTS[inner]:
            configs.append((None, inner, start, None))
    for sweep in sweeps:
        for start in STARTS[sweep.inner]:
            configs += [(sweep, sweep.inner, start, k) for k in sweep.values]
    runs: dict[tuple[str, str, float | None], list[Run]] = {}
    began = time.perf_counter()
    done = 0
    for seed in range(args.seeds):
        elapsed = time.perf_counter() - began
        if done and elapsed / done * (done + 1) > args.time_limit:
            break
        for sweep, inner, start, k in configs:
            key = (sweep.name if sweep else f"fixed {inner}", start, k)
            runs.setdefault(key, []).append(run_one(sweep, inner, STARTS[inner][start], k, seed,
                                                    args.steps, args.episodes, data))
        done += 1
    wall = time.perf_counter() - began
    print(f"digits, MLP 64-64-10, {args.steps} steps of batch 64 (FDSSGD: {args.episodes} episodes "
          f"of {args.steps} steps), validation loss as E, {done} seed(s) of {args.seeds}"
          + ("" if done == args.seeds else f" (stopped at --time-limit {args.time_limit:g} s)"))
    header = (f"  {'knob':>10} {'val acc':>8} {'test acc':>9} {'final lr':>10} {'max lr':>10} "
              f"{'skipped':>8} {'div':>5} {'warned':>7}")
    rules = []
    for sweep in sweeps:
        for start, values in STARTS[sweep.inner].items():
            start_text = ", ".join(f"{n} {v:g}" for n, v in values.items())
            print(f"\n{sweep.name}, {sweep.knob} (default {sweep.default:g}), {start} start: "
                  f"{start_text}")
            print(header)
            print(_row("fixed", runs[(f"fixed {sweep.inner}", start, None)]))
            for k in sweep.values:
                print(_row(f"{k:g}", runs[(sweep.name, start, k)]))
        rules.append(rule_of_thumb(
            sweep, {(start, k): runs[(sweep.name, start, k)] for start in STARTS[sweep.inner]
                    for k in sweep.values}, args.tolerance))
    print(f"\nrule of thumb: the knob values within {args.tolerance:g} points of the best validation "
          "accuracy from both starts, with no diverged run")
    for rule in rules:
        print(f"  {rule}")
    print(f"\nwall time {wall:.0f} s")


if __name__ == "__main__":
    main()
