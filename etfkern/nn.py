"""Modules (the spherical family's :class:`EBVHead`): ``etfkern.nn`` as documented."""
from etfkern.spherical.nn import EBVHead

__all__ = ["EBVHead"]
