"""hyperoptim: torch.optim optimizers that learn their own hyperparameters from hypergradients."""

from .core.base import HyperOptimizer
from .core.batchnorm import frozen_batchnorm_stats
from .core.warn import HyperoptimWarning
from .fds import FDSSGD
from .fds_adam import FDSAdam, FDSAdamW
from .hd import HypergradSGD
from .hd_adam import HypergradAdam, HypergradAdamW
from .ift import IFTOptimizer, SignSGD, thesis_adaptive
from .ift_adam import IFTAdam, IFTAdamW
from .marthe import MartheSGD
from .marthe_adam import MartheAdam, MartheAdamW
from .plot import plot_history

__all__ = [
    "FDSSGD",
    "FDSAdam",
    "FDSAdamW",
    "HyperOptimizer",
    "HyperoptimWarning",
    "HypergradAdam",
    "HypergradAdamW",
    "HypergradSGD",
    "IFTAdam",
    "IFTAdamW",
    "IFTOptimizer",
    "MartheAdam",
    "MartheAdamW",
    "MartheSGD",
    "SignSGD",
    "frozen_batchnorm_stats",
    "plot_history",
    "thesis_adaptive",
]

__version__ = "0.1.0.dev0"
