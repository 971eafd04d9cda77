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
        assert opt.hvp_route == "finite_difference"


def test_plain_trainer_scheduler_erasing_the_lr_is_reported(recipe):
    """Without the recipe, Trainer's default linear LambdaLR overwrites the learned lr: a warning."""
    from transformers import Trainer, TrainingArguments

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = recipe.TinyRegressor()
    opt = recipe.hyperoptim.HypergradSGD(model.parameters(), lr=0.02, hypergrad_lr=1e-2)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=8, per_device_train_batch_size=16,
                                 report_to=[], save_strategy="no", logging_strategy="no",
                                 disable_tqdm=True, use_cpu=True)
        trainer = Trainer(model=model, args=args, train_dataset=recipe.Pairs(*recipe.data(0)),
                          optimizers=(opt, None))
        with pytest.warns(RuntimeWarning, match="set from outside"):
            trainer.train()
