"""FDSSGD's rows in the conformance table.

The generic tests drive the optimizer step by step; the hook ends an episode with ``hyperstep()``
whenever ``horizon`` steps have been taken (the model is not re-initialised: that is the user's
choice, and the generic tests only need a well-defined run). Every configuration starts from
learning rate 0 as the paper does: the first hyperstep (after step 3) moves it up, so the loss
still falls within the 30 steps of the descent test, and the non-finite-validation test (which
expects steps 3-4 to leave the weights alone while the validation loss is NaN) holds because the
learning rate is still 0 when that first hyperstep is skipped. Horizon 4 puts the 10-step
checkpoint of the lockstep test in the middle of an episode, with non-zero tangents.
"""

from optim_db import ErrorOptimizerInput, OptimizerInfo, OptimizerInput

from hyperoptim.fds import FDSSGD


def fds_step(opt, closure, t):
    loss = opt.step(closure)
    if (t + 1) % opt.horizon == 0:
        opt.hyperstep()
    return loss


INFOS = [
    OptimizerInfo(
        cls=FDSSGD,
        inputs=[
            OptimizerInput(dict(lr=0.0, horizon=4, tune=("lr",)), "lr_only"),
            OptimizerInput(dict(lr=0.0, horizon=4, lr_windows=2, outer_step="additive"),
                           "all_from_zero"),
            OptimizerInput(dict(lr=0.0, momentum=0.5, weight_decay=0.01, horizon=4, lr_windows=4,
                                momentum_windows=2, nesterov=True), "nesterov_unshared"),
            OptimizerInput(dict(lr=0.0, momentum=0.3, horizon=5, lr_windows=3,
                                weight_decay_windows=2, hz_clip=100.0,
                                hyper_lr={"lr": 0.05}), "clip_uneven_windows"),
        ],
        error_inputs=[
            ErrorOptimizerInput(dict(horizon=0), "Invalid horizon value: 0", "horizon"),
            ErrorOptimizerInput(dict(horizon=2.5), "Invalid horizon value: 2.5", "horizon_float"),
            ErrorOptimizerInput(dict(horizon=4, lr=-0.1), "Invalid lr value: -0.1", "lr"),
            ErrorOptimizerInput(dict(horizon=4, momentum=-0.5), "Invalid momentum value: -0.5",
                                "momentum"),
            ErrorOptimizerInput(dict(horizon=4, weight_decay=-1.0),
                                "Invalid weight_decay value: -1.0", "weight_decay"),
            ErrorOptimizerInput(dict(horizon=4, lr_windows=5), "Invalid lr_windows value: 5",
                                "windows_above_horizon"),
            ErrorOptimizerInput(dict(horizon=4, momentum_windows=0),
                                "Invalid momentum_windows value: 0", "windows_zero"),
            ErrorOptimizerInput(dict(horizon=4, tune=("lr", "beta")), "Invalid tune value",
                                "tune"),
            ErrorOptimizerInput(dict(horizon=4, hyper_lr={"lr": 0.0}),
                                "Invalid hyper_lr value", "step_size_zero"),
            ErrorOptimizerInput(dict(horizon=4, hyper_lr={"mu": 0.1}),
                                "Invalid hyper_lr value", "step_size_name"),
            ErrorOptimizerInput(dict(horizon=4, hz_clip=0.0), "Invalid hz_clip value: 0.0",
                                "hz_clip"),
            ErrorOptimizerInput(dict(horizon=4, val_closure=3), "Invalid val_closure value",
                                "val_closure"),
        ],
        step=fds_step,
        second_order=True,
        needs_val=True,
    )
]
