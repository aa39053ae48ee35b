"""Dtype rules shared by every family and its reference (defined once, in triton_kernels/_common.py, which the
kernels also use and which imports nothing of etfkern)."""
from __future__ import annotations

from etfkern.triton_kernels._common import acc_dtype, acc_dtype_of

__all__ = ["acc_dtype", "acc_dtype_of"]
