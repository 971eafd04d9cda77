"""The Hugging Face Trainer recipe (examples/hf_trainer_hyper.py) against the real package."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys
import tempfile

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "hf_trainer_hyper.py"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("hf_trainer_hyper", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("name", ["HypergradSGD", "MartheSGD", "IFTOptimizer"])
def test_trainer_recipe_learns_the_learning_rate(recipe, name):
    torch.set_num_threads(1)
    opt = recipe.train(name, steps=8)
    hist = opt.history[0]
    # IFT differentiates the update just taken: hyper-updates with steps 2, 4, 6 and 8.
    expected = 4 if name == "IFTOptimizer" else 8
    assert len(hist["lr"]) == expected and sum(hist["skipped"]) == 0
    assert all(math.isfinite(v) for v in hist["lr"]) and hist["lr"][-1] != hist["lr"][0]
    if name != "HypergradSGD":
        assert opt.hvp_route == "exact"  # the closure returns the loss; p.grad is the Trainer's


def _weights(opt) -> list[torch.Tensor]:
    return [p.detach().clone() for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("name", ["HypergradSGD", "MartheSGD", "IFTOptimizer"])
def test_trainer_recipe_honours_max_grad_norm(recipe, name):
    """The Trainer's clipping reaches the step: max_grad_norm=1e-3 moves the weights far less
    than no clipping (before the gradient contract both runs were bit-identical)."""
    torch.set_num_threads(1)
    start = _weights(recipe.train(name, steps=0))
    free = _weights(recipe.train(name, steps=4, max_grad_norm=0.0))
    clipped = _weights(recipe.train(name, steps=4, max_grad_norm=1e-3))
    moved = [sum(float((w - s).norm()) for w, s in zip(run, start)) for run in (free, clipped)]
    assert 0 < moved[1] < 0.2 * moved[0], moved


def test_trainer_recipe_honours_gradient_accumulation(recipe):
    """Two accumulated micro-batches of 8 step like one batch of 16 (HypergradSGD: no Hessian
    product, so the runs agree to rounding); before, only the last micro-batch was stepped."""
    torch.set_num_threads(1)
    one = recipe.train("HypergradSGD", steps=4)
    two = recipe.train("HypergradSGD", steps=4, per_device_train_batch_size=8,
                       gradient_accumulation_steps=2)
    for a, b in zip(_weights(one), _weights(two)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert one.history[0]["lr"] == pytest.approx(two.history[0]["lr"], rel=1e-4)


@pytest.mark.parametrize("name", ["MartheSGD", "IFTOptimizer"])
def test_trainer_recipe_accumulates_for_second_order_methods(recipe, name):
    """Accumulation works for the second-order methods too: it learns, nothing is skipped, and
    the weights stay within a few percent of the one-batch run (their Hessian products come from
    the last micro-batch)."""
    torch.set_num_threads(1)
    one = recipe.train(name, steps=4)
    two = recipe.train(name, steps=4, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    assert sum(two.history[0]["skipped"]) == 0
    for a, b in zip(_weights(one), _weights(two)):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.01)


def test_trainer_recipe_refuses_fdssgd_by_name(recipe):
    with pytest.raises(ValueError, match="FDSSGD does not fit the Trainer"):
        recipe.train("FDSSGD", steps=2)


def test_plain_trainer_scheduler_erasing_the_lr_is_reported(recipe):
    """Without the recipe, Trainer's default linear LambdaLR overwrites the learned lr: a warning."""
    from transformers import Trainer, TrainingArguments

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = recipe.TinyRegressor()
    opt = recipe.hyperoptim.HypergradSGD(model.parameters(), lr=0.02, hyper_lr=1e-2)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=8, per_device_train_batch_size=16,
                                 report_to=[], save_strategy="no", logging_strategy="no",
                                 disable_tqdm=True, use_cpu=True)
        trainer = Trainer(model=model, args=args, train_dataset=recipe.Pairs(*recipe.data(0)),
                          optimizers=(opt, None))
        with pytest.warns(RuntimeWarning, match="set from outside"):
            trainer.train()
