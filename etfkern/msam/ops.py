"""torch.library schemas and fake kernels of the msam family: fused Momentum-SAM optimizer steps.

Each op routes through :mod:`etfkern._core.backend`; see ``etfkern/msam/reference.py`` for the math."""
from __future__ import annotations

from etfkern._core.dtypes import acc_dtype_of
from etfkern._core.library import define


# Pass 1 of exact MSAM: the squared global norm of the next momentum (one 0-dim tensor, kept on the device).
# Pass 2: undo + update + perturb in one sweep, in place; returns the squared norm of the new momentum (the
# lagged mode's norm for the next step). scale_old/scale_new are 0-dim device tensors: no host sync.
def _msam_norm_fake(params, grads, bufs, scale, *rest):
    return scale.new_empty((), dtype=acc_dtype_of(bufs))


def _msam_sgd_fake(params, grads, bufs, scale_old, *rest):
    return _msam_norm_fake(params, grads, bufs, scale_old)


def _msam_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, scale_old, *rest):
    return _msam_norm_fake(params, grads, exp_avgs, scale_old)


msam_sq_norm = define(
    "msam_sq_norm",
    "(Tensor[] params, Tensor[] grads, Tensor[] bufs, Tensor scale, float[] momentum, float[] grad_coef, "
    "float[] weight_decay, Tensor? grad_scale) -> Tensor",
    _msam_norm_fake, native=True)
msam_sgd_step = define(
    "msam_sgd_step",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, Tensor scale_old, Tensor scale_new, float[] lr, "
    "float[] momentum, float[] weight_decay, bool[] nesterov, Tensor? grad_scale, Tensor? found_inf) -> Tensor",
    _msam_sgd_fake, native=True)
msam_adamw_step = define(
    "msam_adamw_step",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor scale_old, "
    "Tensor scale_new, Tensor step, float[] lr, float[] beta1, float[] beta2, float[] eps, float[] weight_decay, "
    "Tensor? grad_scale, Tensor? found_inf) -> Tensor",
    _msam_adamw_fake, native=True)
