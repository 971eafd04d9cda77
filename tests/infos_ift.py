"""IFTOptimizer's rows in the conformance table.

Every row has ``update_interval=1``, so that every step after the first is a hyper-update: the
generic non-finite-validation test replaces the validation loss by NaN for two steps and expects
both to leave weights and hyperparameters alone, which is what IFTOptimizer does at a
hyper-update (the whole step is skipped). Between hyper-updates the validation loss is never
computed, so a row with a longer interval would step its weights through those two steps without
having seen the NaN; ``tests/test_ift.py`` covers longer intervals (resuming mid-interval,
skipping at the hyper-update, no validation call in between) on their own.
"""

import torch
from optim_db import ErrorOptimizerInput, OptimizerInfo, OptimizerInput

from hyperoptim import IFTOptimizer

INFOS = [
    OptimizerInfo(
        cls=IFTOptimizer,
        inputs=[
            OptimizerInput(dict(lr=0.05, momentum=0.5, weight_decay=1e-3, update_interval=1,
                                lookback=3), "wd_lr_m"),
            OptimizerInput(dict(lr=0.05, momentum=0.9, weight_decay=1e-3, update_interval=1,
                                lookback=5, tune=("weight_decay",)), "lorraine"),
            OptimizerInput(dict(lr=0.05, momentum=0.5, weight_decay=1e-3, update_interval=1,
                                lookback=2, per_parameter_lr=True), "per_parameter_lr"),
            OptimizerInput(dict(lr=0.05, update_interval=1, lookback=1, hyper_lr=0.01),
                           "lookback1_from_zero"),
            OptimizerInput(dict(lr=0.05, momentum=0.5, weight_decay=1e-3, update_interval=1,
                                lookback=3, update_timing="next"), "timing_next"),
            OptimizerInput(dict(lr=0.05, momentum=0.5, weight_decay=1e-3, update_interval=1,
                                lookback=2, tune=("lr", "weight_decay"), per_parameter_lr=True,
                                per_parameter_weight_decay=True, sharing="unit"),
                           "per_unit_lr_and_weight_decay"),
            OptimizerInput(dict(lr=0.05, momentum=0.3, update_interval=1, lookback=2,
                                tune=("lr", "momentum"), hyper_optimizer=torch.optim.SGD,
                                hyper_lr=0.01), "sgd_hyper_optimizer"),
        ],
        error_inputs=[
            ErrorOptimizerInput(dict(lr=-0.1), "Invalid lr value: -0.1", "negative_lr"),
            ErrorOptimizerInput(dict(lr=0.0), "Invalid lr value: 0.0", "tuned_lr_zero"),
            ErrorOptimizerInput(dict(lr=2.0), "Invalid lr value: 2.0", "lr_above_bounds"),
            ErrorOptimizerInput(dict(momentum=-0.5), "Invalid momentum value: -0.5", "momentum"),
            ErrorOptimizerInput(dict(momentum=1.5), "Invalid momentum value: 1.5",
                                "tuned_momentum_above_1"),
            ErrorOptimizerInput(dict(weight_decay=-1.0), "Invalid weight_decay value: -1.0",
                                "weight_decay"),
            ErrorOptimizerInput(dict(tune=("lr", "beta")), "Invalid tune value", "tune_name"),
            ErrorOptimizerInput(dict(tune=()), "Invalid tune value", "tune_empty"),
            ErrorOptimizerInput(dict(tune=("lr", "lr")), "Invalid tune value", "tune_repeat"),
            ErrorOptimizerInput(dict(update_interval=0), "Invalid update_interval value: 0",
                                "update_interval"),
            ErrorOptimizerInput(dict(lookback=0), "Invalid lookback value: 0", "lookback"),
            ErrorOptimizerInput(dict(lookback=2.5), "Invalid lookback value: 2.5",
                                "lookback_float"),
            ErrorOptimizerInput(dict(hyper_lr=-1.0), "Invalid hyper_lr value: -1.0", "hyper_lr"),
            ErrorOptimizerInput(dict(hyper_optimizer=3), "Invalid hyper_optimizer value: 3",
                                "hyper_optimizer"),
            ErrorOptimizerInput(dict(hyper_optimizer=lambda groups: None),
                                "Invalid hyper_optimizer value", "hyper_optimizer_factory"),
            ErrorOptimizerInput(dict(lr_bounds=(0.0, 1.0)), "Invalid lr_bounds value",
                                "lr_bounds_zero"),
            ErrorOptimizerInput(dict(lr_bounds=(0.5, 0.1)), "Invalid lr_bounds value",
                                "lr_bounds_order"),
            ErrorOptimizerInput(dict(tune=("weight_decay",), per_parameter_lr=True),
                                "per_parameter_lr=True needs 'lr' in tune", "per_parameter_lr"),
            ErrorOptimizerInput(dict(val_closure=3), "Invalid val_closure value", "val_closure"),
            ErrorOptimizerInput(dict(update_timing="later"), "Invalid update_timing value",
                                "update_timing"),
            ErrorOptimizerInput(dict(sharing="layer"), "Invalid sharing value", "sharing"),
            ErrorOptimizerInput(dict(tune=("lr",), per_parameter_weight_decay=True),
                                "per_parameter_weight_decay=True needs 'weight_decay' in tune",
                                "per_parameter_weight_decay"),
        ],
        second_order=True,
        needs_val=True,
    )
]
