"""Momentum-SAM (MSAM): the momentum-direction perturbation fused into the optimizer step, for SGD-momentum and
AdamW. The public classes are re-exported as ``etfkern.optim``."""
from etfkern.msam.optim import MSAM, AdamWMSAM, recompute_bn_stats

__all__ = ["MSAM", "AdamWMSAM", "recompute_bn_stats"]
