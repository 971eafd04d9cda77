"""hyperoptim: torch.optim optimizers that learn their own hyperparameters from hypergradients."""

from ._base import HyperOptimizer, frozen_batchnorm_stats
from .hd import HypergradSGD

__all__ = ["HyperOptimizer", "HypergradSGD", "frozen_batchnorm_stats"]

__version__ = "0.1.0.dev0"
