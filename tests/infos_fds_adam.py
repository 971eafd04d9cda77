"""FDSAdam's and FDSAdamW's rows in the conformance table.

Driven like FDSSGD's rows (``fds_step`` ends an episode every ``horizon`` steps; the model is not
re-initialised) and, for the same reason, from learning rate 0: the non-finite-validation test
expects steps 3-4 to leave the weights alone while the validation loss is NaN, which holds because
the first hyperstep (after step 3) is skipped and Adam at learning rate 0 does not move. A
learning-rate step size of 0.01 then gives Adam's usual scale after the first episode, so the loss
still falls within the 30 steps of the descent test.
"""

from infos_fds import fds_step
from optim_db import ErrorOptimizerInput, OptimizerInfo, OptimizerInput

from hyperoptim import FDSAdam, FDSAdamW

INFOS = [
    OptimizerInfo(
        cls=FDSAdam,
        inputs=[
            OptimizerInput(dict(lr=0.0, horizon=4, tune=("lr",), hyper_lr={"lr": 0.01}), "lr_only"),
            OptimizerInput(dict(lr=0.0, weight_decay=0.01, horizon=4, lr_windows=2,
                                weight_decay_windows=2, hyper_lr={"lr": 0.01}), "lr_wd_windows"),
            OptimizerInput(dict(lr=0.0, betas=(0.8, 0.99), horizon=5, lr_windows=3,
                                beta1_windows=2, tune=("lr", "beta1", "beta2", "weight_decay"),
                                hz_clip=100.0, hyper_lr={"lr": 0.01}), "all_clip_uneven"),
        ],
        error_inputs=[
            ErrorOptimizerInput(dict(horizon=0), "Invalid horizon value: 0", "horizon"),
            ErrorOptimizerInput(dict(horizon=4, lr=-0.1), "Invalid lr value: -0.1", "lr"),
            ErrorOptimizerInput(dict(horizon=4, betas=(0.9, 1.5)), "Invalid betas value",
                                "beta2"),
            ErrorOptimizerInput(dict(horizon=4, eps=-1.0), "Invalid eps value", "eps"),
            ErrorOptimizerInput(dict(horizon=4, amsgrad=True), "Invalid amsgrad value: True",
                                "amsgrad"),
            ErrorOptimizerInput(dict(horizon=4, maximize=True), "Invalid maximize value: True",
                                "maximize"),
            ErrorOptimizerInput(dict(horizon=4, lr_windows=5), "Invalid lr_windows value: 5",
                                "windows_above_horizon"),
            ErrorOptimizerInput(dict(horizon=4, tune=("lr", "momentum")), "Invalid tune value",
                                "tune"),
            ErrorOptimizerInput(dict(horizon=4, hyper_lr={"beta1": 0.0}),
                                "Invalid hyper_lr value", "step_size_zero"),
            ErrorOptimizerInput(dict(horizon=4, hz_clip=0.0), "Invalid hz_clip value: 0.0",
                                "hz_clip"),
            ErrorOptimizerInput(dict(horizon=4, foreach=True), "does not implement foreach=True",
                                "foreach"),
            ErrorOptimizerInput(dict(horizon=4, val_closure=3), "Invalid val_closure value",
                                "val_closure"),
        ],
        step=fds_step,
        second_order=True,
        needs_val=True,
    ),
    OptimizerInfo(
        cls=FDSAdamW,
        inputs=[
            OptimizerInput(dict(lr=0.0, weight_decay=0.1, horizon=4, lr_windows=2,
                                weight_decay_windows=4, hyper_lr={"lr": 0.01}), "lr_wd_windows"),
        ],
        error_inputs=[
            ErrorOptimizerInput(dict(horizon=4, weight_decay=-1.0),
                                "Invalid weight_decay value: -1.0", "weight_decay"),
            ErrorOptimizerInput(dict(horizon=4, beta2_windows=0),
                                "Invalid beta2_windows value: 0", "windows_zero"),
        ],
        step=fds_step,
        second_order=True,
        needs_val=True,
    ),
]
