"""``benchmarks/versus.py --quick``: the whole matrix on tiny budgets, resumable, and what it does
when the ``bench`` extras (Optuna, the learning-rate-free optimizers) are missing."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[1]
BENCH_PACKAGES = ("optuna", "prodigyopt", "dadaptation", "dog", "schedulefree")


def _load_versus():
    spec = importlib.util.spec_from_file_location("_versus_benchmark",
                                                  ROOT / "benchmarks" / "versus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


versus = _load_versus()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_quick_without_the_bench_extras_runs_ours_and_torch(tmp_path, monkeypatch, capsys):
    """CI installs only ``.[test,demo]``: the methods whose package is missing are left out with a
    note, and the torch baselines and every hyperoptim optimizer still run and are reported."""
    for name in BENCH_PACKAGES:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    results = tmp_path / "r.jsonl"
    assert versus.main(["--quick", "--tasks", "diabetes", "--results", str(results),
                        "--figures", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for label in ("Optuna TPE", "Prodigy", "D-Adaptation SGD", "DoG", "schedule-free SGD"):
        assert f"note: {label}" in out
        assert f"| {label}" not in out
    for label in ("SGD, poor start", "SGD, hand-picked", "AdamW, hand-picked",
                  "HypergradSGD, poor start", "MartheSGD, defaults", "IFTOptimizer, poor start",
                  "FDSSGD, poor start", "HypergradAdam (training loss), poor start"):
        assert f"| {label} |" in out
    assert "no Optuna-50 reference" in out
    rows = _lines(results)
    assert {r["method"] for r in rows} >= {"sgd-poor", "HypergradSGD-poor", "FDSSGD-default"}
    assert all(r["task"] == "diabetes" and r["seed"] == 0 for r in rows)


def test_quick_full_matrix_then_resume(tmp_path, capsys):
    """Every task and every available method once; a second invocation trains nothing."""
    for name in BENCH_PACKAGES:
        pytest.importorskip(name)
    results, md = tmp_path / "r.jsonl", tmp_path / "tables.md"
    argv = ["--quick", "--results", str(results), "--figures", str(tmp_path), "--no-progress",
            "--markdown", str(md)]
    assert versus.main(argv) == 0
    out = capsys.readouterr().out
    rows = _lines(results)
    tasks = {t.name for t in versus.all_tasks()}
    available = [m for m in versus.REGISTRY if m.missing() is None and "of" not in m.extra]
    assert len(rows) == len(tasks) * len(available)
    assert {(r["task"], r["method"]) for r in rows} == {(t, m.key) for t in tasks for m in available}
    for row in rows:
        assert row["wall"] > 0 and row["metric"] is not None
    optuna = [r for r in rows if r["method"] == "optuna-50"]
    assert all(len(r["trials"]) == 4 and r["metric"] is not None for r in optuna)
    for label in ("Optuna TPE, 2 trials", "Optuna TPE, 4 trials", "Prodigy", "schedule-free AdamW",
                  "DoG (+ averaging)", "HypergradSGD, poor start", "FDSSGD, defaults"):
        assert f"| {label} |" in out
    assert out.count("- target 1") == len(tasks) and md.read_text().strip() in out
    for task in tasks:
        assert (tmp_path / f"versus_{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    argv[argv.index("--figures") + 1] = ""  # no figures the second time
    assert versus.main(argv) == 0  # resumes: everything is in the file already
    assert len(_lines(results)) == len(rows)
    assert "this invocation 0 s" in capsys.readouterr().out


def test_optuna_20_is_the_first_20_trials_of_the_50_trial_study():
    """The 20-trial row reads the best (by validation loss) of the first trials only, and the
    wall time at that trial; pruned trials never win."""
    trials = [
        dict(state="complete", val_loss=0.9, metric=0.5, wall=1.0),
        dict(state="pruned", val_loss=0.1, wall=1.5),
        dict(state="complete", val_loss=0.4, metric=0.7, wall=2.0),
        dict(state="complete", val_loss=0.2, metric=0.8, wall=3.0),
    ]
    for trial in trials:
        trial["params"] = {}
    head = versus._summarise_trials(trials, 3)
    assert (head["metric"], head["val_loss"], head["wall"], head["pruned"]) == (0.7, 0.4, 2.0, 1)
    assert versus._summarise_trials(trials, 4)["metric"] == 0.8


@pytest.mark.parametrize("metric, best, good, bad", [
    ("accuracy", 0.95, 0.941, 0.939),
    ("mse", 0.50, 0.549, 0.551),
    ("perplexity", 10.0, 10.19, 10.21),
])
def test_tolerances_are_the_issues(metric, best, good, bad):
    task = sys.modules["_versus_tasks"].digits_mlp()
    task.metric = metric
    assert task.within(good, best) and not task.within(bad, best)
    assert not task.within(math.nan, best) and not task.within(math.inf, best)


def test_training_loss_rows_take_no_validation_closure_and_are_their_own_group():
    """The recommended drop-in's training-loss rows build the class without ``val_closure``
    (the other hyperoptim rows pass one), and target 3 reads them as a group of their own, not
    mixed with the same class's validation-mode starts."""
    import torch

    rows = {m.key: m for m in versus.REGISTRY}
    model = torch.nn.Linear(2, 1)
    val = lambda: model(torch.ones(1, 2)).sum()  # noqa: E731
    assert rows["HypergradAdam-train-poor"].build(model, val, 10).opt.val_closure is None
    assert rows["HypergradAdam-poor"].build(model, val, 10).opt.val_closure is val
    task = sys.modules["_versus_tasks"].digits_mlp()

    def summary(key, metric):
        return dict(method=rows[key], metrics=[metric])

    ours = [summary("HypergradAdam-good", 0.97), summary("HypergradAdam-poor", 0.90),
            summary("HypergradAdam-train-good", 0.97), summary("HypergradAdam-train-poor", 0.96)]
    lines = versus._scale_free_verdict(task, ours, lambda s: s["metrics"][0])
    assert lines == ["- target 3 (scale-free), HypergradAdam: poor MISSED (-7.0 points)",
                     "- target 3 (scale-free), HypergradAdam (training loss): poor ok (-1.0 points)"]


def _fds_episodes():
    """``benchmarks/fds_episodes.py`` as a module."""
    spec = importlib.util.spec_from_file_location("_fds_episodes_benchmark",
                                                  ROOT / "benchmarks" / "fds_episodes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fds_episodes_reads_what_the_outer_step_reads():
    """``benchmarks/fds_episodes.py`` (the readings behind FDSSGD's far step): from 100x too small
    on the digits MLP the first episode barely trains (the saturation model's decade, no
    curvature read), the second has trained and reads a stable rate, and every reading is the
    outer step's own (its history)."""
    module = _fds_episodes()
    first, second = module.episodes("digits-mlp", "poor", 0, 2)
    assert first["lr"] == [1e-3] * 5 and second["lr"] == pytest.approx([1e-2] * 5)
    assert first["gain"] < 0.1 * first["start_loss"] and first["rho"] > 0.5
    assert first["stable"] == 0.0
    assert second["gain"] > 0.1 * second["start_loss"] and second["rho"] > 0.5
    assert 0.1 < second["stable"] < 10.0  # SGD's stable rate at lr 0.01 on this MLP: about 1


def test_fds_episodes_runs_the_constructor_defaults():
    """``--start default``: the versus tables' "defaults" rows, from lr 0 (the paper's start).
    The first episode trains nothing and reads no ratio; the first outer step is additive (the
    paper's 0.1)."""
    module = _fds_episodes()
    first, second = module.episodes("digits-mlp", "default", 0, 2)
    assert first["lr"] == [0.0] * 5 and first["gain"] == 0.0 and math.isnan(first["rho"])
    assert second["lr"] == pytest.approx([0.1] * 5) and second["gain"] > 0.0
    with pytest.raises(SystemExit):
        module.main(["--start", "nonsense"])
