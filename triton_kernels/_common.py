"""Helpers shared by the Triton kernels and launchers (imports no part of etfkern, and triton only lazily, so
the backend can ask these questions on a machine without triton)."""
from __future__ import annotations

import os

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else (fp32, bf16, fp16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_dtype_of(tensors) -> torch.dtype:
    """float64 when any of ``tensors`` is float64, else float32 (one accumulator shared by several tensors)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32

_TRUE_WORDS = ("1", "true", "on", "yes", "y")  # what Triton's own getenv_bool accepts (case-insensitive)


def triton_interpret() -> bool:
    """Whether @triton.jit kernels run in the interpreter: Triton's own setting (``TRITON_INTERPRET`` parsed as
    Triton parses it, so "true"/"on" count as they do for Triton, or ``triton.knobs.runtime.interpret``)."""
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except Exception:  # noqa: BLE001 - no triton (or an older one without knobs): parse the variable ourselves
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE_WORDS


def kernel_variant(var: str, choices: tuple[str, ...], value: str | None = None, name: str | None = None) -> str:
    """Which variant of one backend's kernel runs: ``value`` if given (the argument ``name``), else env ``var``,
    else ``choices[0]``; ValueError naming both when it is not one of ``choices``."""
    mode = value if value is not None else os.environ.get(var, choices[0])
    if mode not in choices:
        what = f"{name} (or {var})" if name else var
        raise ValueError(f"{what} must be one of {choices}, got {mode!r}")
    return mode
