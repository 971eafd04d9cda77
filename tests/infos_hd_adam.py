"""HypergradAdam's and HypergradAdamW's rows in the conformance table."""

from optim_db import ErrorOptimizerInput, OptimizerInfo, OptimizerInput

from hyperoptim import HypergradAdam, HypergradAdamW

_ERRORS = [
    ErrorOptimizerInput(dict(lr=-0.1), "Invalid lr value: -0.1", "negative_lr"),
    ErrorOptimizerInput(dict(betas=(1.0, 0.999)), r"Invalid betas value: \(1.0, 0.999\)", "beta1"),
    ErrorOptimizerInput(dict(betas=(0.9,)), "Invalid betas value", "betas_len"),
    ErrorOptimizerInput(dict(eps=-1.0), "Invalid eps value: -1.0", "eps"),
    ErrorOptimizerInput(dict(weight_decay=-1.0), "Invalid weight_decay value", "wd"),
    ErrorOptimizerInput(dict(amsgrad=True), "Invalid amsgrad value: True", "amsgrad"),
    ErrorOptimizerInput(dict(maximize=True), "Invalid maximize value: True", "maximize"),
    ErrorOptimizerInput(dict(hyper_lr=-1.0), "Invalid hyper_lr value", "hlr"),
    ErrorOptimizerInput(dict(lr_bounds=(0.5, 0.1)), "Invalid lr_bounds value", "bounds"),
    ErrorOptimizerInput(dict(lr_bounds=(None, 1.0)), "Invalid lr_bounds value", "bounds_none"),
    ErrorOptimizerInput(dict(lr=2.0, lr_bounds=(0.0, 1.0)), "Invalid lr value", "out"),
    ErrorOptimizerInput(dict(val_closure=3), "Invalid val_closure value", "val_closure"),
]

INFOS = [
    OptimizerInfo(
        cls=HypergradAdam,
        inputs=[
            OptimizerInput(dict(lr=0.01, hyper_lr=1e-5), "plain"),
            OptimizerInput(dict(lr=0.01, weight_decay=0.01, betas=(0.8, 0.99), hyper_lr=1e-5),
                           "l2_betas"),
            OptimizerInput(dict(lr=0.01, hyper_lr=1e-4), "val", use_val=True),
            OptimizerInput(dict(lr=0.01, per_parameter=True, hyper_lr=1e-4), "per_parameter"),
            OptimizerInput(dict(lr=0.01, per_parameter=True, hyper_lr=1e-4),
                           "per_parameter_val", use_val=True),
            OptimizerInput(dict(lr=0.01, hyper_lr=1e-4, tune=("lr", "momentum"), momentum_phase="run"),
                           "beta1_learned", use_val=True),
        ],
        error_inputs=_ERRORS,
    ),
    OptimizerInfo(
        cls=HypergradAdamW,
        inputs=[
            OptimizerInput(dict(lr=0.01, hyper_lr=1e-5), "plain"),
            OptimizerInput(dict(lr=0.01, weight_decay=0.1, hyper_lr=1e-4), "val",
                           use_val=True),
        ],
        error_inputs=_ERRORS[:2],
    ),
]
