"""Hugging Face Trainer with a hyperoptim optimizer: a Trainer subclass that gives it its closure.

The Trainer calls ``optimizer.step()`` with no arguments and, by default, attaches a linear
LambdaLR schedule that overwrites the learning rate at every step. ``HyperTrainer`` fixes both:

- ``training_step`` runs the Trainer's own ``training_step`` (its ``backward()``, scaled for
  gradient accumulation) and hands the optimizer a closure that returns the same micro-batch's
  loss without calling ``backward()``, as ``train_closure``, which ``step()`` uses when it is
  called without one. By the gradient contract (README) the step uses the gradient the Trainer
  prepared in ``p.grad``, accumulated over ``gradient_accumulation_steps`` micro-batches and
  clipped to ``max_grad_norm``; the closure gives only the second-order information (MartheSGD
  and IFTOptimizer take exact Hessian-vector products of the last micro-batch's loss).
- ``create_scheduler`` attaches ``MultiplicativeLR(factor 1)``, which scales the current value by
  1: the learned learning rate is left alone (any schedule that multiplies the current value by
  a constant composes; see README, "Compatibility").

FDSSGD does not fit (its episodes restart the model: use a plain loop or Lightning,
``examples/lightning_fds.py``); ``HyperTrainer`` refuses it by name. HypergradSGD needs no closure
and no subclass beyond the scheduler. The step runs the closure once more than the Trainer's own
``training_step`` did.

Run:  python examples/hf_trainer_hyper.py [--steps N]
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import hyperoptim

try:
    from transformers import Trainer, TrainingArguments
except ImportError:  # pragma: no cover - exercised where transformers is missing
    Trainer = TrainingArguments = None


if Trainer is not None:

    class HyperTrainer(Trainer):
        """A Trainer whose optimizer gets the training closure and keeps its learned lr.

        Args:
            make_optimizer (callable): ``model -> HyperOptimizer``.
            *args, **kwargs: as for ``transformers.Trainer``.
        """

        def __init__(self, *args: Any, make_optimizer: Any, **kwargs: Any) -> None:
            self._make_optimizer = make_optimizer
            super().__init__(*args, **kwargs)

        def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
            if self.optimizer is None:
                self.optimizer = self._make_optimizer(model if model is not None else self.model)
            return self.optimizer

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.MultiplicativeLR(
                    optimizer if optimizer is not None else self.optimizer, lambda _: 1.0)
            return self.lr_scheduler

        def training_step(self, model: nn.Module, inputs: dict[str, Any],
                          num_items_in_batch: Any = None) -> torch.Tensor:
            opt = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
            if isinstance(opt, hyperoptim.FDSSGD):
                raise ValueError("HyperTrainer: FDSSGD does not fit the Trainer (each episode "
                                 "restarts the model from fresh weights); use a plain loop or "
                                 "Lightning (examples/lightning_fds.py)")
            batch = self._prepare_inputs(inputs)

            def closure() -> torch.Tensor:
                # The loss only: the step's gradient is what the Trainer left in p.grad.
                with self.compute_loss_context_manager():
                    return self.compute_loss(model, batch, num_items_in_batch=num_items_in_batch)

            opt.train_closure = closure
            return super().training_step(model, inputs, num_items_in_batch)


class TinyRegressor(nn.Module):
    """``forward(x, labels)`` returns ``{"loss", "logits"}``, as Trainer expects."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.net(x)
        return {"logits": out} if labels is None else {"loss": F.mse_loss(out, labels), "logits": out}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 4, generator=g)
    return x, torch.tanh(x @ torch.linspace(-1, 1, 4).reshape(4, 1))


def train(name: str, steps: int, **arguments: Any) -> hyperoptim.HyperOptimizer:
    """Train ``TinyRegressor`` for ``steps`` Trainer steps with optimizer ``name``; ``arguments``
    override the ``TrainingArguments`` below (``max_grad_norm``, ``gradient_accumulation_steps``,
    ``per_device_train_batch_size``)."""
    torch.manual_seed(0)
    model = TinyRegressor()
    xv, yv = data(1)
    val = lambda: F.mse_loss(model.net(xv), yv)  # noqa: E731 - the live model, autograd on
    factories = {
        "HypergradSGD": lambda m: hyperoptim.HypergradSGD(m.parameters(), lr=0.02, momentum=0.9,
                                                          val_closure=val),
        "MartheSGD": lambda m: hyperoptim.MartheSGD(m.parameters(), lr=0.02, momentum=0.9,
                                                    val_closure=val),
        "IFTOptimizer": lambda m: hyperoptim.IFTOptimizer(m.parameters(), lr=0.02, momentum=0.5,
                                                          update_interval=2, lookback=2,
                                                          val_closure=val),
        "FDSSGD": lambda m: hyperoptim.FDSSGD(m.parameters(), horizon=steps, val_closure=val),
    }
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(**{
            "output_dir": out, "max_steps": steps, "per_device_train_batch_size": 16,
            "report_to": [], "save_strategy": "no", "logging_strategy": "no",
            "disable_tqdm": True, "use_cpu": True, "max_grad_norm": 0.0,
            "dataloader_num_workers": 0, **arguments,
        })
        trainer = HyperTrainer(model=model, args=args, train_dataset=Pairs(*data(0)),
                               make_optimizer=factories[name])
        trainer.train()
    opt = trainer.optimizer
    return opt.optimizer if hasattr(opt, "optimizer") else opt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    if Trainer is None:
        print("transformers is not installed: pip install 'torch-hyperoptim[test]'")
        return
    torch.set_num_threads(1)
    for name in ("HypergradSGD", "MartheSGD", "IFTOptimizer"):
        opt = train(name, args.steps)
        lrs = opt.history[0]["lr"]
        print(f"{name:13s} lr {lrs[0]:.4f} -> {lrs[-1]:.4f} over {len(lrs)} recorded updates")


if __name__ == "__main__":
    main()
