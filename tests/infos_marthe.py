"""MartheSGD's rows in the conformance table."""

from optim_db import ErrorOptimizerInput, OptimizerInfo, OptimizerInput

from hyperoptim.marthe import MartheSGD

INFOS = [
    OptimizerInfo(
        cls=MartheSGD,
        inputs=[
            OptimizerInput(dict(lr=0.05, hyper_lr=1e-5), "adaptive"),
            OptimizerInput(dict(lr=0.05, momentum=0.9, weight_decay=0.01, hyper_lr=1e-5),
                           "adaptive_momentum_wd"),
            OptimizerInput(dict(lr=0.05, momentum=0.9, nesterov=True, mu=0.99,
                                hyper_lr=1e-3, adapt_hyper_lr=False), "nesterov_mu099"),
            OptimizerInput(dict(lr=0.05, momentum=0.5, dampening=0.2, mu=1.0, hyper_lr=1e-3,
                                adapt_hyper_lr=False, hypergrad_clip=1.0), "rtho_dampening"),
            OptimizerInput(dict(lr=0.05, momentum=0.5, nesterov=True, hyper_step="growth",
                                tune=("lr", "momentum")), "momentum_learned_growth"),
        ],
        error_inputs=[
            ErrorOptimizerInput(dict(lr=-0.1), "Invalid lr value: -0.1", "negative_lr"),
            ErrorOptimizerInput(dict(momentum=-0.5), "Invalid momentum value: -0.5", "momentum"),
            ErrorOptimizerInput(dict(weight_decay=-1.0), "Invalid weight_decay value", "wd"),
            ErrorOptimizerInput(dict(mu=1.5), "Invalid mu value: 1.5", "mu_range"),
            ErrorOptimizerInput(dict(mu="auto"), "Invalid mu value: auto", "mu_name"),
            ErrorOptimizerInput(dict(hyper_lr=-1.0), "Invalid hyper_lr value", "hlr"),
            ErrorOptimizerInput(dict(hypergrad_clip=0.0), "Invalid hypergrad_clip value", "clip"),
            ErrorOptimizerInput(dict(adapt_hyper_lr=1), "Invalid adapt_hyper_lr value",
                                "adapt"),
            ErrorOptimizerInput(dict(val_closure=3), "Invalid val_closure value", "val_closure"),
            ErrorOptimizerInput(dict(nesterov=True), "Nesterov momentum requires", "nesterov"),
            ErrorOptimizerInput(dict(tune=("momentum",)), "Invalid tune value", "tune"),
        ],
        second_order=True,
        needs_val=True,
    ),
    # mu = 0 is HD on the validation loss: no Hessian-vector product, so no closure needed.
    OptimizerInfo(
        cls=MartheSGD,
        inputs=[
            OptimizerInput(dict(lr=0.05, momentum=0.9, mu=0.0, hyper_lr=1e-3,
                                adapt_hyper_lr=False), "hd_fixed_beta"),
            OptimizerInput(dict(lr=0.05, mu=0.0, hyper_lr=1e-4), "hd_adaptive_beta"),
            OptimizerInput(dict(lr=0.05, momentum=0.5, mu=0.0, hyper_lr=1e-3, adapt_hyper_lr=False,
                                tune=("lr", "momentum")), "hd_momentum_learned"),
        ],
        needs_val=True,
    ),
]
