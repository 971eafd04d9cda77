"""PyTorch Lightning with FDSSGD: Lightning's own closure, episodes ended by a callback.

Lightning's automatic optimization calls ``optimizer.step(closure)`` with a closure that calls
``backward()``, so FDSSGD takes its Hessian-vector products by finite differences
(``hvp="auto"``). After ``horizon`` steps the callback calls ``hyperstep()`` and restarts the model
from its initial weights, as FDS's episodes require. HypergradSGD, MartheSGD and IFTOptimizer need
no callback: return them from ``configure_optimizers`` (``tests/test_lightning.py``).

Run:  python examples/lightning_fds.py [--steps N]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn
from torch.nn import functional as F

import hyperoptim


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="inner steps (a multiple of 4)")
    args = parser.parse_args(argv)
    try:
        import lightning as L
    except ImportError:
        print("lightning is not installed: pip install 'torch-hyperoptim[test]'")
        return
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = torch.tanh(x @ torch.randn(4, 1, generator=g))
    xv, yv = x[48:], y[48:]
    horizon = 4

    class Regression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return hyperoptim.FDSSGD(self.parameters(), horizon=horizon, lr_windows=2, tune=("lr",),
                                     val_closure=lambda: F.mse_loss(self.net(xv), yv))

    class EndEpisodes(L.Callback):
        def __init__(self, module: L.LightningModule) -> None:
            self.init = {k: v.clone() for k, v in module.state_dict().items()}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            opt = trainer.optimizers[0]
            if opt.episode_step == opt.horizon:
                opt.hyperstep()
                module.load_state_dict(self.init)  # every episode starts from the same weights

    module = Regression()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:48], y[:48]), batch_size=12)
    trainer = L.Trainer(max_steps=max(horizon, args.steps - args.steps % horizon), accelerator="cpu",
                        devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EndEpisodes(module)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LeafSpec).*")
        trainer.fit(module, loader)
    opt = trainer.optimizers[0]
    hist = opt.history[0]
    print(f"{len(hist['val_loss'])} episodes: lr schedule {opt.schedule('lr')}, "
          f"val loss {hist['val_loss'][0]:.4f} -> {hist['val_loss'][-1]:.4f}")


if __name__ == "__main__":
    main()
