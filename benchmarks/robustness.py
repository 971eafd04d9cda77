"""Robustness to the initial hyperparameters: Table 1 of Clarke et al. (2022) at small scale.

A one-hidden-layer MLP (50 ReLU units) trained full-batch on a regression data set from random
initial hyperparameters (Table 5: log10 lr ~ U(-6, -1), log10 weight decay ~ U(-7, -2), momentum
~ U(0, 1)), with each method below starting from the same initial weights and hyperparameters:

    Random       torch.optim.SGD, hyperparameters fixed (trained on training + validation data,
                 as in the paper, so that every method sees the same data)
    Baydin       HypergradSGD on the validation loss (learning rate only; hypergrad_lr 1e-3,
                 learning rate clipped to [0, 1])
    Lorraine     IFTOptimizer(tune=("weight_decay",))
    WD+LR        IFTOptimizer(tune=("lr", "weight_decay"))
    WD+LR+M      IFTOptimizer(tune=("lr", "momentum", "weight_decay"))
    WD+HDLR+M    IFTOptimizer(..., per_parameter_lr=True)

A run whose training loss becomes non-finite is stopped there and counted as a NaN run, and so is
a run whose final test MSE on the standardised target exceeds 1e3 (a thousand times the constant
predictor's: the rule the paper applies to outlying losses in Section 4.2).
IFTOptimizer runs with the paper's settings: update_interval 10, lookback 5, Adam with lr 0.05 on
log10/logit values, learning rate clipped to [1e-10, 1]. The data are split 60/20/20 with a seeded
permutation and standardised with training statistics (inputs and target). Reported: final test
MSE, mean / median / best over the runs that stayed finite, with bootstrap standard errors (1000
resamples), the number of non-finite runs, on the standardised target the model trains on and in
the target's original units (times the training variance of the target; the paper's unit).

Run:
    python benchmarks/robustness.py                                  # diabetes, small
    python benchmarks/robustness.py --data ../shared/data/uci/energy.csv --inits 200 \\
        --steps 4000 --workers 16 --out energy.json                  # the paper's scale
    python benchmarks/robustness.py --load energy.json               # the tables again
    python benchmarks/robustness.py --hypergradient-gap --inits 20   # App. B.2.2 (below)

``--hypergradient-gap`` instead compares WD+LR+M's hypergradients at the first hyper-update with
Diff-through-Opt's exact ones through the same 5 updates (``hyperoptim.reference``), float64.

The data path is read at run time only; without ``--data`` scikit-learn's diabetes set is used.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import pathlib
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import hyperoptim

OUTLIER = 1e3
"""A final standardised test MSE above this counts as a NaN (diverged) run."""

METHODS = ("Random", "Baydin", "Lorraine", "WD+LR", "WD+LR+M", "WD+HDLR+M")
IFT_TUNE = {
    "Lorraine": dict(tune=("weight_decay",)),
    "WD+LR": dict(tune=("lr", "weight_decay")),
    "WD+LR+M": dict(tune=("lr", "momentum", "weight_decay")),
    "WD+HDLR+M": dict(tune=("lr", "momentum", "weight_decay"), per_parameter_lr=True),
}


@dataclass
class Split:
    """Standardised tensors of the three parts, and the target's training variance."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    y_var: float
    name: str


def load(path: str | None, split_seed: int, dtype: torch.dtype) -> Split:
    """A CSV (one header row, last column the target) or scikit-learn's diabetes data."""
    if path is None:
        from sklearn.datasets import load_diabetes

        x, y = load_diabetes(return_X_y=True)
        name = "diabetes (scikit-learn)"
    else:
        table = np.loadtxt(path, delimiter=",", skiprows=1)
        x, y = table[:, :-1], table[:, -1]
        name = pathlib.Path(path).name
    perm = np.random.default_rng(split_seed).permutation(len(y))
    n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
    parts = np.split(perm, [n_train, n_train + n_val])
    mu_x, sd_x = x[parts[0]].mean(0), x[parts[0]].std(0)
    sd_x[sd_x == 0] = 1.0
    mu_y, sd_y = y[parts[0]].mean(), y[parts[0]].std()

    def tensors(idx):
        xs = torch.tensor((x[idx] - mu_x) / sd_x, dtype=dtype)
        ys = torch.tensor((y[idx] - mu_y) / sd_y, dtype=dtype).unsqueeze(1)
        return xs, ys

    (xtr, ytr), (xva, yva), (xte, yte) = (tensors(p) for p in parts)
    return Split(xtr, ytr, xva, yva, xte, yte, float(sd_y ** 2), name)


def sample_hyperparameters(n: int, seed: int) -> list[dict[str, float]]:
    """Table 5: log10 lr ~ U(-6, -1), log10 weight decay ~ U(-7, -2), momentum ~ U(0, 1)."""
    rng = np.random.default_rng(seed)
    return [dict(lr=float(10 ** rng.uniform(-6, -1)), weight_decay=float(10 ** rng.uniform(-7, -2)),
                 momentum=float(rng.uniform(0, 1))) for _ in range(n)]


def run_one(task: tuple) -> dict:
    """Train one (method, initialisation) pair: its final test loss and a trajectory summary."""
    method, index, hyper, data, steps, model_seed = task
    torch.set_num_threads(1)
    # Diverging runs make the optimizers warn about skipped updates; the tables count them.
    warnings.filterwarnings("ignore", message=".*non-finite", category=RuntimeWarning)
    torch.manual_seed(model_seed + index)
    model = nn.Sequential(nn.Linear(data.x_train.shape[1], 50), nn.ReLU(),
                          nn.Linear(50, 1)).to(data.x_train.dtype)
    x, y = data.x_train, data.y_train
    if method == "Random":
        x, y = torch.cat([x, data.x_val]), torch.cat([y, data.y_val])

    def val_closure() -> torch.Tensor:
        return F.mse_loss(model(data.x_val), data.y_val)

    if method == "Random":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), **hyper)
    elif method == "Baydin":
        opt = hyperoptim.HypergradSGD(model.parameters(), **hyper, hypergrad_lr=1e-3,
                                      lr_bounds=(0.0, 1.0), val_closure=val_closure)
    else:
        opt = hyperoptim.IFTOptimizer(model.parameters(), **hyper, update_interval=10,
                                      lookback=5, hyper_lr=0.05, lr_bounds=(1e-10, 1.0),
                                      val_closure=val_closure, **IFT_TUNE[method])

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    start = time.perf_counter()
    diverged = False
    for _ in range(steps):
        loss = opt.step(closure)
        if not math.isfinite(loss.item()):
            diverged = True  # stopped here and counted as a NaN run
            break
    seconds = time.perf_counter() - start
    with torch.no_grad():
        test = math.nan if diverged else F.mse_loss(model(data.x_test), data.y_test).item()
    out = dict(method=method, index=index, init=hyper, test_mse=test, seconds=seconds,
               final={k: opt.param_groups[0][k] for k in ("lr", "momentum", "weight_decay")})
    history = getattr(opt, "history", [{}])[0]
    if "weight_decay" in history and history["weight_decay"]:
        wd = [hyper["weight_decay"]] + [v for v in history["weight_decay"] if math.isfinite(v)]
        out["weight_decay_peak"] = max(wd)
    return out


def bootstrap_se(values: np.ndarray, stat, rng: np.random.Generator, n: int = 1000) -> float:
    if len(values) < 2:
        return math.nan
    draws = rng.choice(values, size=(n, len(values)), replace=True)
    return float(np.std(stat(draws, axis=1), ddof=1))


def summarise(results: list[dict], scale: float, seed: int = 0) -> dict[str, dict]:
    """Per method: runs, non-finite runs, mean / median (with bootstrap SE) and best."""
    rng = np.random.default_rng(seed)
    table = {}
    for method in METHODS:
        losses = np.array([r["test_mse"] for r in results if r["method"] == method])
        if not len(losses):
            continue
        finite = losses[np.isfinite(losses) & (losses <= OUTLIER)] * scale
        table[method] = dict(
            runs=len(losses), nonfinite=int(len(losses) - len(finite)),
            mean=float(finite.mean()) if len(finite) else math.nan,
            mean_se=bootstrap_se(finite, np.mean, rng),
            median=float(np.median(finite)) if len(finite) else math.nan,
            median_se=bootstrap_se(finite, np.median, rng),
            best=float(finite.min()) if len(finite) else math.nan,
        )
    return table


def weight_decay_round_trips(results: list[dict], factor: float = 10.0) -> dict[str, str]:
    """Runs whose weight decay rose >= factor above both its initial and its final value."""
    out = {}
    for method in METHODS:
        rows = [r for r in results if r["method"] == method and "weight_decay_peak" in r]
        if not rows:
            continue
        hits = sum(r["weight_decay_peak"] >= factor * max(r["init"]["weight_decay"],
                                                          r["final"]["weight_decay"])
                   for r in rows)
        out[method] = f"{hits}/{len(rows)}"
    return out


def _fmt(value: float, se: float) -> str:
    return f"{value:.4g} ± {se:.2g}" if math.isfinite(se) else f"{value:.4g}"


def report(results: list[dict], data: Split, args: argparse.Namespace, wall: float) -> None:
    print(f"\n{data.name}: {len(data.y_train)}/{len(data.y_val)}/{len(data.y_test)} rows, "
          f"{args.inits} initialisations x {args.steps} full-batch steps, {wall:.0f} s wall "
          f"({args.workers} worker(s)); target variance (training) {data.y_var:.4g}")
    for unit, scale in (("standardised target", 1.0), ("original units", data.y_var)):
        print(f"\nFinal test MSE, {unit} (statistics over the runs that did not diverge; "
              "± bootstrap SE)")
        print(f"{'method':<11} {'runs':>5} {'NaN':>4} {'mean':>18} {'median':>18} {'best':>10}")
        for method, row in summarise(results, scale).items():
            print(f"{method:<11} {row['runs']:>5} {row['nonfinite']:>4} "
                  f"{_fmt(row['mean'], row['mean_se']):>18} "
                  f"{_fmt(row['median'], row['median_se']):>18} {row['best']:>10.4g}")
    trips = weight_decay_round_trips(results)
    if trips:
        print("\nWeight decay raised >= 10x above both its initial and final value: "
              + ", ".join(f"{m} {v}" for m, v in trips.items()))
    seconds = {m: np.median([r["seconds"] for r in results if r["method"] == m])
               for m in METHODS if any(r["method"] == m for r in results)}
    base = seconds.get("Random")
    if base:
        print("Median run time relative to Random: "
              + ", ".join(f"{m} {s / base:.2f}x" for m, s in seconds.items()))


def hypergradient_gap(data: Split, inits: list[dict[str, float]], model_seed: int) -> None:
    """Appendix B.2.2: at the first hyper-update (T = 10, i = 5, float64), WD+LR+M's hypergradients
    against Diff-through-Opt's exact ones through the same last 5 updates (the oracle starts from
    the weights and momentum buffers of step 5 and runs steps 5-9 with the same hyperparameters)."""
    from torch.func import functional_call

    from hyperoptim.reference import unrolled_hypergrad

    names = ("lr", "momentum", "weight_decay")
    errors: dict[str, list[float]] = {n: [] for n in names}
    agree = dict.fromkeys(names, 0)
    x, y = data.x_train.double(), data.y_train.double()
    xv, yv = data.x_val.double(), data.y_val.double()
    for index, hyper in enumerate(inits):
        torch.manual_seed(model_seed + index)
        model = nn.Sequential(nn.Linear(x.shape[1], 50), nn.ReLU(), nn.Linear(50, 1)).double()
        opt = hyperoptim.IFTOptimizer(model.parameters(), **hyper, update_interval=10, lookback=5,
                                      hyper_lr=0.0, val_closure=lambda m=model: F.mse_loss(m(xv), yv))
        for t in range(11):
            if t == 5:
                start = {n: p.detach().clone() for n, p in model.named_parameters()}
                bufs = {n: opt.state[p]["momentum_buffer"].clone()
                        for n, p in model.named_parameters()}
            opt.step(lambda m=model: F.mse_loss(m(x), y))
        group = opt.param_groups[0]
        _, exact = unrolled_hypergrad(
            lambda p, t, m=model: F.mse_loss(functional_call(m, p, (x,)), y),
            lambda p, m=model: F.mse_loss(functional_call(m, p, (xv,)), yv),
            start, horizon=5, lr=group["lr"], momentum=group["momentum"],
            weight_decay=group["weight_decay"], momentum_buffers=bufs)
        m = group["momentum"]
        chain = dict(lr=group["lr"] * math.log(10), momentum=m * (1 - m),
                     weight_decay=group["weight_decay"] * math.log(10))
        for n in names:
            ours, want = opt.history[0][f"hypergrad/{n}"][0], exact[n].item() * chain[n]
            errors[n].append(abs(ours - want) / abs(want))
            agree[n] += (ours > 0) == (want > 0)
    print(f"\nFirst hyper-update, WD+LR+M (i = 5) against Diff-through-Opt over the same 5 updates, "
          f"{len(inits)} initialisations:")
    for n in names:
        print(f"  {n:<13} median relative error {np.median(errors[n]):.3f}, "
              f"same sign {agree[n]}/{len(inits)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="CSV path, last column the target (default: diabetes)")
    parser.add_argument("--inits", type=int, default=16, help="random initialisations")
    parser.add_argument("--steps", type=int, default=1000, help="full-batch steps per run")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--workers", type=int, default=1, help="processes (one thread each)")
    parser.add_argument("--seed", type=int, default=0, help="hyperparameter and model seed")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--out", help="write every run's result to this JSON file")
    parser.add_argument("--load", help="print the tables of a JSON file written by --out")
    parser.add_argument("--hypergradient-gap", action="store_true",
                        help="only compare the first hyper-update with Diff-through-Opt")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.load:
        saved = json.loads(pathlib.Path(args.load).read_text())
        args = argparse.Namespace(**saved["args"])
        data = load(args.data, args.split_seed, getattr(torch, args.dtype))
        report(saved["results"], data, args, saved.get("seconds", math.nan))
        return
    data = load(args.data, args.split_seed, getattr(torch, args.dtype))
    inits = sample_hyperparameters(args.inits, args.seed)
    if args.hypergradient_gap:
        hypergradient_gap(data, inits, 1000 * args.seed)
        return
    tasks = [(m, i, h, data, args.steps, 1000 * args.seed)
             for i, h in enumerate(inits) for m in args.methods]
    start = time.perf_counter()
    if args.workers > 1:
        with mp.get_context("fork").Pool(args.workers) as pool:
            results = pool.map(run_one, tasks, chunksize=1)
    else:
        results = [run_one(t) for t in tasks]
    seconds = time.perf_counter() - start
    report(results, data, args, seconds)
    if args.out:
        pathlib.Path(args.out).write_text(
            json.dumps(dict(args=vars(args), results=results, seconds=seconds)))


if __name__ == "__main__":
    main()
