"""HypergradSGD's rows in the conformance table."""

from optim_db import ErrorOptimizerInput, OptimizerInfo, OptimizerInput

from hyperoptim import HypergradSGD

INFOS = [
    OptimizerInfo(
        cls=HypergradSGD,
        inputs=[
            OptimizerInput(dict(lr=0.05), "plain"),
            OptimizerInput(dict(lr=0.05, momentum=0.9, weight_decay=0.01), "momentum_wd"),
            OptimizerInput(dict(lr=0.05, momentum=0.9, nesterov=True), "nesterov"),
            OptimizerInput(dict(lr=0.05, momentum=0.5, dampening=0.2), "dampening"),
            OptimizerInput(dict(lr=0.05, momentum=0.9, hyper_lr=0.01), "val", use_val=True),
            OptimizerInput(dict(lr=0.05, per_parameter=True, hyper_lr=0.01), "per_parameter"),
            OptimizerInput(dict(lr=0.05, momentum=0.9, per_parameter=True, hyper_lr=0.01),
                           "per_parameter_val", use_val=True),
            OptimizerInput(dict(lr=0.05, momentum=0.5, hyper_lr=0.01,
                                tune=("lr", "momentum"), momentum_phase="run"), "momentum_learned"),
            OptimizerInput(dict(lr=0.05, momentum=0.5, nesterov=True, hyper_step="growth",
                                tune=("lr", "momentum"), momentum_phase="run"),
                           "momentum_learned_growth_val",
                           use_val=True),
        ],
        error_inputs=[
            ErrorOptimizerInput(dict(lr=-0.1), "Invalid lr value: -0.1", "negative_lr"),
            ErrorOptimizerInput(dict(momentum=-0.5), "Invalid momentum value: -0.5", "momentum"),
            ErrorOptimizerInput(dict(weight_decay=-1.0), "Invalid weight_decay value", "wd"),
            ErrorOptimizerInput(dict(hyper_lr=-1.0), "Invalid hyper_lr value", "hlr"),
            ErrorOptimizerInput(dict(lr_bounds=(0.5, 0.1)), "Invalid lr_bounds value", "bounds"),
            ErrorOptimizerInput(dict(lr_bounds=(0.0, None)), "Invalid lr_bounds value",
                                "bounds_none"),
            ErrorOptimizerInput(dict(lr=2.0, lr_bounds=(0.0, 1.0)), "Invalid lr value", "out"),
            ErrorOptimizerInput(dict(val_closure=3), "Invalid val_closure value", "val_closure"),
            ErrorOptimizerInput(dict(nesterov=True), "Nesterov momentum requires", "nesterov"),
            ErrorOptimizerInput(dict(tune=("momentum",)), "Invalid tune value", "tune"),
        ],
    )
]
