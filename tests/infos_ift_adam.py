"""IFTAdam's and IFTAdamW's rows in the conformance table.

As for IFTOptimizer (``tests/infos_ift.py``), every row has ``update_interval=1`` so that the
generic non-finite-validation test meets a hyper-update at every step; longer intervals are covered
in ``tests/test_ift_adam.py`` and ``tests/test_ift.py`` (the machinery is shared).
"""

import torch
from optim_db import ErrorOptimizerInput, OptimizerInfo, OptimizerInput

from hyperoptim import IFTAdam, IFTAdamW

_ERRORS = [
    ErrorOptimizerInput(dict(lr=-0.1), "Invalid lr value: -0.1", "negative_lr"),
    ErrorOptimizerInput(dict(lr=0.0), "Invalid lr value: 0.0", "tuned_lr_zero"),
    ErrorOptimizerInput(dict(lr=2.0), "Invalid lr value: 2.0", "lr_above_bounds"),
    ErrorOptimizerInput(dict(betas=(1.0, 0.999)), r"Invalid betas value: \(1.0, 0.999\)", "beta1"),
    ErrorOptimizerInput(dict(betas=(0.9,)), "Invalid betas value", "betas_len"),
    ErrorOptimizerInput(dict(eps=-1.0), "Invalid eps value: -1.0", "eps"),
    ErrorOptimizerInput(dict(weight_decay=-1.0), "Invalid weight_decay value", "wd"),
    ErrorOptimizerInput(dict(amsgrad=True), "Invalid amsgrad value: True", "amsgrad"),
    ErrorOptimizerInput(dict(maximize=True), "Invalid maximize value: True", "maximize"),
    ErrorOptimizerInput(dict(tune=("lr", "beta1")), "Invalid tune value.*'beta1' is not tunable",
                        "tune_beta1"),
    ErrorOptimizerInput(dict(tune=("beta2",)), "Invalid tune value.*'beta2' is not tunable",
                        "tune_beta2"),
    ErrorOptimizerInput(dict(tune=("lr", "foo")), "Invalid tune value", "tune_name"),
    ErrorOptimizerInput(dict(tune=()), "Invalid tune value", "tune_empty"),
    ErrorOptimizerInput(dict(tune=("lr", "lr")), "Invalid tune value", "tune_repeat"),
    ErrorOptimizerInput(dict(update_interval=0), "Invalid update_interval value: 0",
                        "update_interval"),
    ErrorOptimizerInput(dict(lookback=0), "Invalid lookback value: 0", "lookback"),
    ErrorOptimizerInput(dict(hyper_lr=-1.0), "Invalid hyper_lr value: -1.0", "hyper_lr"),
    ErrorOptimizerInput(dict(hyper_optimizer=3), "Invalid hyper_optimizer value: 3",
                        "hyper_optimizer"),
    ErrorOptimizerInput(dict(lr_bounds=(0.0, 1.0)), "Invalid lr_bounds value", "lr_bounds_zero"),
    ErrorOptimizerInput(dict(update_timing="later"), "Invalid update_timing value",
                        "update_timing"),
    ErrorOptimizerInput(dict(val_closure=3), "Invalid val_closure value", "val_closure"),
]

INFOS = [
    OptimizerInfo(
        cls=IFTAdam,
        inputs=[
            OptimizerInput(dict(lr=0.01, weight_decay=1e-3, update_interval=1, lookback=3),
                           "wd_lr"),
            OptimizerInput(dict(lr=0.01, betas=(0.8, 0.99), update_interval=1, lookback=1,
                                hyper_lr=0.01), "lookback1_from_zero"),
            OptimizerInput(dict(lr=0.01, weight_decay=1e-3, update_interval=1, lookback=2,
                                update_timing="next"), "timing_next"),
            OptimizerInput(dict(lr=0.01, update_interval=1, lookback=2, tune=("lr",),
                                hyper_optimizer=torch.optim.SGD, hyper_lr=0.01),
                           "lr_only_sgd_hyper_optimizer"),
        ],
        error_inputs=_ERRORS,
        second_order=True,
        needs_val=True,
    ),
    OptimizerInfo(
        cls=IFTAdamW,
        inputs=[
            OptimizerInput(dict(lr=0.01, update_interval=1, lookback=3), "wd_lr"),
            OptimizerInput(dict(lr=0.01, weight_decay=0.1, update_interval=1, lookback=2,
                                tune=("weight_decay",), update_timing="next"),
                           "wd_only_timing_next"),
        ],
        error_inputs=_ERRORS[:4] + _ERRORS[9:11],
        second_order=True,
        needs_val=True,
    ),
]
