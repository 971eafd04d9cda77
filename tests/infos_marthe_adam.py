"""MartheAdam's and MartheAdamW's rows in the conformance table."""

from optim_db import ErrorOptimizerInput, OptimizerInfo, OptimizerInput

from hyperoptim import MartheAdam, MartheAdamW

INFOS = [
    OptimizerInfo(
        cls=MartheAdam,
        inputs=[
            OptimizerInput(dict(lr=0.01, hyper_lr=1e-7), "adaptive"),
            OptimizerInput(dict(lr=0.01, weight_decay=0.01, mu=1.0, hyper_lr=1e-5,
                                adapt_hyper_lr=False, hypergrad_clip=1.0), "rtho_l2_clip"),
            OptimizerInput(dict(lr=0.01, hyper_step="adam_log", tune=("lr", "momentum")),
                           "beta1_learned"),
        ],
        error_inputs=[
            ErrorOptimizerInput(dict(lr=-0.1), "Invalid lr value: -0.1", "negative_lr"),
            ErrorOptimizerInput(dict(betas=(0.9, 1.5)), "Invalid betas value", "beta2"),
            ErrorOptimizerInput(dict(eps=-1.0), "Invalid eps value", "eps"),
            ErrorOptimizerInput(dict(amsgrad=True), "Invalid amsgrad value: True", "amsgrad"),
            ErrorOptimizerInput(dict(mu=1.5), "Invalid mu value: 1.5", "mu_range"),
            ErrorOptimizerInput(dict(hyper_lr=-1.0), "Invalid hyper_lr value", "hlr"),
            ErrorOptimizerInput(dict(hypergrad_clip=0.0), "Invalid hypergrad_clip value", "clip"),
            ErrorOptimizerInput(dict(hvp="double"), "Invalid hvp value: double", "hvp"),
            ErrorOptimizerInput(dict(val_closure=3), "Invalid val_closure value", "val_closure"),
        ],
        second_order=True,
        needs_val=True,
    ),
    OptimizerInfo(
        cls=MartheAdamW,
        inputs=[
            OptimizerInput(dict(lr=0.01, weight_decay=0.1, mu=0.9, hyper_lr=1e-5,
                                adapt_hyper_lr=False), "mu09"),
        ],
        error_inputs=[
            ErrorOptimizerInput(dict(weight_decay=-1.0), "Invalid weight_decay value", "wd"),
            ErrorOptimizerInput(dict(maximize=True), "Invalid maximize value: True", "maximize"),
        ],
        second_order=True,
        needs_val=True,
    ),
    # mu = 0 is HD on the validation loss: no Hessian-vector product, so no closure needed.
    OptimizerInfo(
        cls=MartheAdam,
        inputs=[OptimizerInput(dict(lr=0.01, mu=0.0, hyper_lr=1e-5), "hd_adaptive_beta")],
        needs_val=True,
    ),
]
