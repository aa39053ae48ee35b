"""Optimizers: Momentum-SAM with the perturbation fused into the step (see :mod:`etfkern.optim.msam`)."""
from etfkern.optim.msam import MSAM, AdamWMSAM, recompute_bn_stats

__all__ = ["MSAM", "AdamWMSAM", "recompute_bn_stats"]
