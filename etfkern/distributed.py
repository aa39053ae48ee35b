"""Vocab-parallel spherical cross-entropy and nearest over a bank sharded by rows (torch.distributed)."""
from etfkern.spherical.distributed import nearest, spherical_cross_entropy

__all__ = ["spherical_cross_entropy", "nearest"]
