"""Robustness to the initial hyperparameters: Table 1 of Clarke et al. (2022), on the authors' split.

A one-hidden-layer MLP (50 ReLU units) trained full-batch for 4000 steps on a regression data set
from random initial hyperparameters (Table 5: log10 lr ~ U(-6, -1), log10 weight decay ~ U(-7, -2),
momentum ~ U(0, 1)), with each method below starting from the same initial weights and
hyperparameters:

    Random       torch.optim.SGD, hyperparameters fixed, trained on training + validation data
                 (as in the paper, so that every method sees the same data)
    Baydin       the paper's row as its code defines it: hypergradient descent on the *training*
                 loss (training + validation data), on log10 lr, SGD with lr 1e-3, every step:
                 log10 a += 1e-3 * <grad L(w_t), grad L(w_{t-1})> (raw gradients, no chain-rule
                 factor), clipped to [-10, 0]
    HD-val       hyperoptim.HypergradSGD on the validation loss (learning rate only; hyper_lr
                 1e-3, lr in [0, 1]); ours, not the paper's row
    Lorraine     IFTOptimizer(tune=("weight_decay",))
    WD+LR        IFTOptimizer(tune=("lr", "weight_decay"))
    WD+LR+M      IFTOptimizer(tune=("lr", "momentum", "weight_decay"))
    WD+HDLR+M    IFTOptimizer(..., per_parameter_lr=True)
    Adaptive     hyperoptim.ift.thesis_adaptive with the initial lr / momentum / weight decay
                 (per-unit lr and weight decay, sign steps, T = 100, i = 5); not in the paper

IFTOptimizer runs with the paper's settings: update_interval 10, lookback 5, Adam with lr 0.05 on
log10/logit values, learning rate clipped to [1e-10, 1], ``--timing`` taken (the authors', the
default) or next.

Protocol (the authors', ``--data`` one of ../shared/data/uci/{energy,kin8nm,power}.csv): rows
permuted by the published permutation next to the CSV (``<name>_permutation.txt``); the last 76
(Energy), 819 (Kin8nm) or 957 (Power) rows test; of the rest, the last 78 (Energy) or
rint(20%) (Kin8nm, Power) validate, the first part trains. Inputs and target are standardised with
the mean and unbiased standard deviation of training + validation. ``--splits K`` adds K random
permutations (``default_rng(split_seed + k)``) split into the same sizes. Without ``--data``,
scikit-learn's diabetes set with a random 10% test / 20% validation split.

A run whose training loss becomes non-finite is stopped there and counted as diverged, and so is a
run whose final test MSE on the standardised target exceeds 1e3 (a thousand times the constant
predictor's) or whose last hyper-update the non-finite guard skipped (it ended frozen). Reported
per split and pooled over splits: median test MSE in the target's original units (standardised MSE
times the target's variance) over the runs that did not diverge, with a bootstrap standard error
(1000 resamples), the best run, and the number of diverged runs.

Run:
    python benchmarks/robustness.py                                  # diabetes, small
    python benchmarks/robustness.py --data ../shared/data/uci/energy.csv --inits 24 --splits 3 \\
        --workers 2 --out energy.json                                # README table
    python benchmarks/robustness.py --load energy.json               # the tables again
    python benchmarks/robustness.py --hypergradient-gap --inits 20   # App. B.2.2 (below)

``--hypergradient-gap`` instead compares WD+LR+M's hypergradients at the first hyper-update with
Diff-through-Opt's exact ones through the same 5 updates (``hyperoptim.reference``), float64,
with ``update_timing="next"`` (both start from the same weights).

The data path is read at run time only; nothing is downloaded.
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
from hyperoptim.ift import thesis_adaptive

OUTLIER = 1e3
"""A final standardised test MSE above this counts as a diverged run."""

METHODS = ("Random", "Baydin", "HD-val", "Lorraine", "WD+LR", "WD+LR+M", "WD+HDLR+M", "Adaptive")
IFT_TUNE = {
    "Lorraine": dict(tune=("weight_decay",)),
    "WD+LR": dict(tune=("lr", "weight_decay")),
    "WD+LR+M": dict(tune=("lr", "momentum", "weight_decay")),
    "WD+HDLR+M": dict(tune=("lr", "momentum", "weight_decay"), per_parameter_lr=True),
}
AUTHORS_SIZES = {"energy": (76, 78), "kin8nm": (819, 0.2), "power": (957, 0.2)}
"""Per data set: test rows (the last ones) and validation rows or proportion of the rest."""

PAPER = {  # Table 1, median test MSE (Kin8nm x 1000), 200 initialisations
    "energy": {"Random": 8.3, "Baydin": 6.8, "Lorraine": 8.7, "WD+LR": 1.8, "WD+LR+M": 0.30,
               "WD+HDLR+M": 0.28},
    "kin8nm": {"Random": 30e-3, "Baydin": 26e-3, "Lorraine": 30e-3, "WD+LR": 7.60e-3,
               "WD+LR+M": 7.10e-3, "WD+HDLR+M": 7.47e-3},
    "power": {"Random": 20, "Baydin": 17.94, "Lorraine": 19.7, "WD+LR": 17.21, "WD+LR+M": 17.192,
              "WD+HDLR+M": 16.76},
}


@dataclass
class Split:
    """Standardised tensors of the three parts, and the target's variance (train + validation)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    y_var: float
    name: str


def read(path: str | None) -> tuple[np.ndarray, np.ndarray, str, np.ndarray | None]:
    """``(x, y, name, published permutation or None)`` of a CSV or scikit-learn's diabetes."""
    if path is None:
        from sklearn.datasets import load_diabetes

        x, y = load_diabetes(return_X_y=True)
        return x, y, "diabetes", None
    table = np.loadtxt(path, delimiter=",", skiprows=1)
    stem = pathlib.Path(path).stem
    perm_path = pathlib.Path(path).with_name(f"{stem}_permutation.txt")
    perm = np.loadtxt(perm_path, dtype=np.int64) if perm_path.exists() else None
    return table[:, :-1], table[:, -1], stem, perm


def sizes(name: str, n: int) -> tuple[int, int, int]:
    """(train, validation, test) rows, as the authors' code computes them."""
    n_test, val = AUTHORS_SIZES.get(name, (int(round(0.1 * n)), 0.2))
    rest = n - n_test
    n_val = val if isinstance(val, int) else int(np.rint(val * rest))
    return rest - n_val, n_val, n_test


def make_split(x: np.ndarray, y: np.ndarray, perm: np.ndarray, name: str,
               dtype: torch.dtype) -> Split:
    n_train, n_val, _ = sizes(name, len(y))
    x, y = x[perm], y[perm]
    trval = slice(0, n_train + n_val)
    mu_x, sd_x = x[trval].mean(0), x[trval].std(0, ddof=1)
    sd_x[sd_x == 0] = 1.0
    mu_y, sd_y = y[trval].mean(), y[trval].std(ddof=1)

    def tensors(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor((x[part] - mu_x) / sd_x, dtype=dtype),
                torch.tensor((y[part] - mu_y) / sd_y, dtype=dtype).unsqueeze(1))

    (xtr, ytr), (xva, yva), (xte, yte) = (
        tensors(s) for s in (slice(0, n_train), slice(n_train, n_train + n_val),
                             slice(n_train + n_val, len(y))))
    return Split(xtr, ytr, xva, yva, xte, yte, float(sd_y ** 2), name)


def splits(path: str | None, extra: int, split_seed: int, dtype: torch.dtype) -> dict[str, Split]:
    """The authors' split (where published) and ``extra`` random ones of the same sizes."""
    x, y, name, published = read(path)
    out = {}
    if published is not None:
        out["authors"] = make_split(x, y, published, name, dtype)
    count = extra if published is not None else max(extra, 1)
    for k in range(count):
        perm = np.random.default_rng(split_seed + k).permutation(len(y))
        out[f"random{k}"] = make_split(x, y, perm, name, dtype)
    return out


def sample_hyperparameters(n: int, seed: int) -> list[dict[str, float]]:
    """Table 5: log10 lr ~ U(-6, -1), log10 weight decay ~ U(-7, -2), momentum ~ U(0, 1)."""
    rng = np.random.default_rng(seed)
    return [dict(lr=float(10 ** rng.uniform(-6, -1)), weight_decay=float(10 ** rng.uniform(-7, -2)),
                 momentum=float(rng.uniform(0, 1))) for _ in range(n)]


class BaydinTraining:
    """The paper's Baydin row: HD on the training loss, on log10 lr with SGD at 1e-3, every step.

    Before every step after the first: ``log10 a += hyper_lr * <g_t, g_{t-1}>`` with the raw loss
    gradients (the authors' ``BaydinHypergradientDescent`` sets the dot product as the gradient of
    the log10 value, without the chain-rule factor), clipped to [-10, 0]; then SGD with a.
    """

    def __init__(self, params, lr: float, momentum: float, weight_decay: float,
                 hyper_lr: float = 1e-3) -> None:
        self.params = list(params)
        self.sgd = torch.optim.SGD(self.params, lr=lr, momentum=momentum,
                                   weight_decay=weight_decay)
        self.log10_lr = math.log10(lr)
        self.hyper_lr = hyper_lr
        self.last: list[torch.Tensor] | None = None
        self.param_groups = self.sgd.param_groups

    def zero_grad(self) -> None:
        self.sgd.zero_grad()

    def step(self, closure) -> torch.Tensor:
        with torch.enable_grad():
            loss = closure()
        grads = [p.grad.detach().clone() for p in self.params]
        if self.last is not None:
            dot = sum((g * h).sum() for g, h in zip(grads, self.last)).item()
            self.log10_lr = min(max(self.log10_lr + self.hyper_lr * dot, -10.0), 0.0)
            self.sgd.param_groups[0]["lr"] = 10.0 ** self.log10_lr
        self.last = grads
        self.sgd.step()
        return loss


def run_one(task: tuple) -> dict:
    """Train one (split, method, initialisation): its final test loss and a trajectory summary."""
    split_name, method, index, hyper, data, steps, model_seed, timing = task
    torch.set_num_threads(1)
    # Diverging runs make the optimizers warn about skipped updates; the tables count them.
    warnings.filterwarnings("ignore", message=".*non-finite", category=RuntimeWarning)
    torch.manual_seed(model_seed + index)
    model = nn.Sequential(nn.Linear(data.x_train.shape[1], 50), nn.ReLU(),
                          nn.Linear(50, 1)).to(data.x_train.dtype)
    x, y = data.x_train, data.y_train
    if method in ("Random", "Baydin"):
        x, y = torch.cat([x, data.x_val]), torch.cat([y, data.y_val])

    def val_closure() -> torch.Tensor:
        return F.mse_loss(model(data.x_val), data.y_val)

    if method == "Random":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), **hyper)
    elif method == "Baydin":
        opt = BaydinTraining(model.parameters(), **hyper)  # type: ignore[assignment]
    elif method == "HD-val":
        opt = hyperoptim.HypergradSGD(model.parameters(), **hyper, hyper_lr=1e-3,
                                      lr_bounds=(0.0, 1.0), val_closure=val_closure)
    elif method == "Adaptive":
        opt = thesis_adaptive(model.parameters(), **hyper, update_timing=timing,
                              val_closure=val_closure)
    else:
        opt = hyperoptim.IFTOptimizer(model.parameters(), **hyper, update_interval=10,
                                      lookback=5, hyper_lr=0.05, lr_bounds=(1e-10, 1.0),
                                      update_timing=timing, update_schedule="fixed",
                                      val_closure=val_closure, **IFT_TUNE[method])

    first_order = method in ("Random", "Baydin")

    def closure() -> torch.Tensor:
        # hyperoptim's optimizers take the gradient themselves when the closure only returns the
        # loss, and then differentiate it twice exactly (hvp="auto" picks the exact route).
        loss = F.mse_loss(model(x), y)
        if first_order:
            opt.zero_grad()
            loss.backward()
        return loss

    start = time.perf_counter()
    diverged = False
    for _ in range(steps):
        loss = opt.step(closure)
        if not math.isfinite(loss.item()):
            diverged = True  # stopped here and counted as a diverged run
            break
    seconds = time.perf_counter() - start
    with torch.no_grad():
        test = math.nan if diverged else F.mse_loss(model(data.x_test), data.y_test).item()
    out = dict(split=split_name, method=method, index=index, init=hyper, test_mse=test,
               test_mse_original=test * data.y_var, seconds=seconds,
               final={k: opt.param_groups[0][k] for k in ("lr", "momentum", "weight_decay")})
    history = getattr(opt, "history", [{}])[0]
    skipped = history.get("skipped", [])
    # A run whose last hyper-update was skipped as non-finite ended frozen by the guard (every
    # later step retried it): counted as diverged, like a non-finite loss.
    out.update(skipped=int(sum(skipped)), stuck=bool(skipped and skipped[-1]))
    if "weight_decay" in history and history["weight_decay"]:
        wd = [hyper["weight_decay"]] + [v for v in history["weight_decay"] if math.isfinite(v)]
        out["weight_decay_peak"] = max(wd)
    return out


def bootstrap_se(values: np.ndarray, stat, rng: np.random.Generator, n: int = 1000) -> float:
    if len(values) < 2:
        return math.nan
    draws = rng.choice(values, size=(n, len(values)), replace=True)
    return float(np.std(stat(draws, axis=1), ddof=1))


def summarise(results: list[dict], seed: int = 0) -> dict[str, dict]:
    """Per method: runs, diverged runs, median (bootstrap SE) and best, in original units."""
    rng = np.random.default_rng(seed)
    table = {}
    for method in METHODS:
        rows = [r for r in results if r["method"] == method]
        if not rows:
            continue
        ok = [r["test_mse_original"] for r in rows
              if math.isfinite(r["test_mse"]) and r["test_mse"] <= OUTLIER
              and not r.get("stuck", False)]
        finite = np.array(ok)
        table[method] = dict(
            runs=len(rows), diverged=len(rows) - len(ok),
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


def _table(title: str, results: list[dict], paper: dict[str, float]) -> None:
    print(f"\n{title}")
    print(f"{'method':<11} {'runs':>5} {'diverged':>8} {'median':>18} {'best':>10} {'paper':>8}")
    for method, row in summarise(results).items():
        ref = paper.get(method)
        print(f"{method:<11} {row['runs']:>5} {row['diverged']:>8} "
              f"{_fmt(row['median'], row['median_se']):>18} {row['best']:>10.4g} "
              f"{'' if ref is None else f'{ref:.4g}':>8}")
    random = summarise([r for r in results if r["method"] == "Random"]).get("Random")
    if random and math.isfinite(random["median"]):
        print("median / Random's median: " + ", ".join(
            f"{m} {row['median'] / random['median']:.3g}"
            for m, row in summarise(results).items() if m != "Random"))


def report(results: list[dict], data: dict[str, Split], args: argparse.Namespace,
           wall: float) -> None:
    first = next(iter(data.values()))
    print(f"\n{first.name}: {len(first.y_train)}/{len(first.y_val)}/{len(first.y_test)} rows, "
          f"{args.inits} initialisations x {args.steps} full-batch steps, splits "
          f"{', '.join(data)}; timing {args.timing}; {wall:.0f} s wall ({args.workers} worker(s))")
    print("Final test MSE in original units: median over the runs that did not diverge "
          "(± bootstrap SE), best, diverged runs; the paper's Table 1 median (200 inits, its split)")
    paper = PAPER.get(first.name, {})
    for name in data:
        rows = [r for r in results if r["split"] == name]
        _table(f"split {name} (target variance {data[name].y_var:.4g})", rows, paper)
    if len(data) > 1:
        _table("pooled over splits", results, paper)
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
                                      hyper_lr=0.0, update_timing="next", update_schedule="fixed",
                                      val_closure=lambda m=model: F.mse_loss(m(xv), yv))
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


class _Serial:
    """``Pool.imap_unordered`` in this process (``--workers 1``)."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def imap_unordered(fn, tasks, chunksize: int = 1):
        return map(fn, tasks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="CSV path, last column the target (default: diabetes)")
    parser.add_argument("--inits", type=int, default=16, help="random initialisations")
    parser.add_argument("--split-inits", type=int, default=None,
                        help="initialisations on each further split (default: --inits)")
    parser.add_argument("--steps", type=int, default=4000, help="full-batch steps per run")
    parser.add_argument("--first-init", type=int, default=0,
                        help="skip the initialisations before this index (to extend a run)")
    parser.add_argument("--splits", type=int, default=0,
                        help="further random splits of the same sizes")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--timing", choices=("taken", "next"), default="taken",
                        help="IFTOptimizer's update_timing")
    parser.add_argument("--workers", type=int, default=1, help="processes (one thread each)")
    parser.add_argument("--seed", type=int, default=0, help="hyperparameter and model seed")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--out", help="write every run's result to this JSON file")
    parser.add_argument("--load", nargs="*",
                        help="print the tables of JSON files written by --out (or of OUT.partial, "
                             "the runs an interrupted invocation finished, with its --data)")
    parser.add_argument("--hypergradient-gap", action="store_true",
                        help="only compare the first hyper-update with Diff-through-Opt")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.load:
        results, wall = [], 0.0
        given = args
        for path in args.load:
            text = pathlib.Path(path).read_text()
            if path.endswith(".partial"):  # the runs a stopped invocation finished (JSON lines)
                results += [json.loads(line) for line in text.splitlines() if line.strip()]
                continue
            saved = json.loads(text)
            results += saved["results"]
            wall += saved.get("seconds", math.nan)
            args = argparse.Namespace(**saved["args"])
        if args is given:  # only partial files: the command line describes the data
            args.inits = max(r["index"] for r in results) + 1
        # One row per (split, method, initialisation) (extended runs may repeat one), and only
        # the methods asked for.
        unique = {(r["split"], r["method"], r["index"]): r for r in results
                  if r["method"] in given.methods}
        results = list(unique.values())
        if args.splits == 0 and any(r["split"].startswith("random") for r in results):
            args.splits = 1 + max(int(r["split"][6:]) for r in results
                                  if r["split"].startswith("random"))
        data = splits(args.data, args.splits, args.split_seed, getattr(torch, args.dtype))
        data = {k: v for k, v in data.items() if any(r["split"] == k for r in results)}
        report(results, data, args, wall)
        return
    data = splits(args.data, args.splits, args.split_seed, getattr(torch, args.dtype))
    further = args.inits if args.split_inits is None else args.split_inits
    inits = sample_hyperparameters(max(args.inits, further), args.seed)
    if args.hypergradient_gap:
        hypergradient_gap(next(iter(data.values())), inits, 1000 * args.seed)
        return
    tasks = [(name, m, i, h, split, args.steps, 1000 * args.seed, args.timing)
             for name, split in data.items()
             for i, h in enumerate(inits[: args.inits if name == "authors" else further])
             if i >= args.first_init
             for m in args.methods]
    start = time.perf_counter()
    partial = pathlib.Path(f"{args.out}.partial") if args.out else None
    results = []
    with mp.get_context("fork").Pool(args.workers) if args.workers > 1 else _Serial() as pool:
        for row in pool.imap_unordered(run_one, tasks, chunksize=1):
            results.append(row)
            if partial is not None:  # every finished run, as it comes: a killed run keeps them
                with partial.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    seconds = time.perf_counter() - start
    report(results, data, args, seconds)
    if args.out:
        pathlib.Path(args.out).write_text(
            json.dumps(dict(args=vars(args), results=results, seconds=seconds)))


if __name__ == "__main__":
    main()
