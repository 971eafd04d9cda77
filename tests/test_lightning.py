"""PyTorch Lightning automatic optimization with every optimizer (the real package).

Lightning hands ``step()`` its own closure, which calls ``backward()``: the second-order methods
take the finite-difference HVP route (``hvp="auto"``). FDSSGD's episodes end in a callback
(``examples/lightning_fds.py`` is the worked example).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

L = pytest.importorskip("lightning")

from hyperoptim import FDSSGD, HypergradSGD, IFTOptimizer, MartheSGD  # noqa: E402


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    y = torch.tanh(x @ torch.randn(4, 1, generator=g))
    return x, y


class Regression(L.LightningModule):
    def __init__(self, make_optimizer):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.make_optimizer = make_optimizer
        self.xv, self.yv = _data(1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def val_loss(self):
        return F.mse_loss(self.net(self.xv), self.yv)

    def configure_optimizers(self):
        return self.make_optimizer(self)


class EndEpisodes(L.Callback):
    """FDSSGD: after ``horizon`` inner steps, restart from the initial weights and hyperstep."""

    def __init__(self, module):
        self.init = {k: v.clone() for k, v in module.state_dict().items()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        if opt.episode_step == opt.horizon:
            opt.hyperstep()
            module.load_state_dict(self.init)


OPTIMIZERS = {
    "HypergradSGD": lambda m: HypergradSGD(m.parameters(), lr=0.05, momentum=0.9, hyper_lr=1e-2,
                                           val_closure=m.val_loss),
    "MartheSGD": lambda m: MartheSGD(m.parameters(), lr=0.05, momentum=0.9, hyper_lr=1e-5,
                                     val_closure=m.val_loss),
    "IFTOptimizer": lambda m: IFTOptimizer(m.parameters(), lr=0.05, momentum=0.5, update_interval=2,
                                           lookback=2, val_closure=m.val_loss),
    "FDSSGD": lambda m: FDSSGD(m.parameters(), lr=0.0, horizon=4, tune=("lr",),
                               val_closure=m.val_loss),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lightning_automatic_optimization(name):
    torch.set_num_threads(1)
    module = Regression(OPTIMIZERS[name])
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    callbacks = [EndEpisodes(module)] if name == "FDSSGD" else []
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    before = module.val_loss().item()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, loader)
    opt = trainer.optimizers[0]
    assert type(opt).__name__ == name
    hist = opt.history[0]
    assert len(hist["lr"]) >= 1 and sum(hist["skipped"]) == 0
    assert all(math.isfinite(v) for v in (hist["lr"] if name != "FDSSGD" else hist["lr"][-1]))
    if name == "FDSSGD":
        assert len(hist["lr"]) == 3 and opt.schedule("lr") != [0.0]  # 12 steps: 3 episodes
    else:
        assert hist["lr"][-1] != hist["lr"][0]  # it learned
        assert module.val_loss().item() < before
    if name in ("MartheSGD", "IFTOptimizer", "FDSSGD"):
        assert opt.hvp_route == "finite_difference"  # Lightning's closure calls backward()


def test_fdssgd_without_the_episode_callback_names_the_recipe():
    """Without a callback that ends the episodes, FDSSGD stops after ``horizon`` steps with an
    error that names the recipe (the callback in examples/lightning_fds.py)."""
    torch.set_num_threads(1)
    module = Regression(OPTIMIZERS["FDSSGD"])
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        with pytest.raises(RuntimeError, match=r"callback.*examples/lightning_fds\.py"):
            trainer.fit(module, loader)
