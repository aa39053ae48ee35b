"""Optimizers: Momentum-SAM with the perturbation fused into the step (see :mod:`etfkern.msam`)."""
from etfkern.msam.optim import MSAM, AdamWMSAM, recompute_bn_stats

__all__ = ["MSAM", "AdamWMSAM", "recompute_bn_stats"]
