"""etfkern: fused kernels for networks whose classifier is a large fixed bank of unit vectors.

Banks (simplex ETF, Equiangular Basis Vectors, sparse ETF), fused spherical cross-entropy and top-k
inference, streaming neural-collapse statistics, and Momentum-SAM optimizers. Every op has a CPU path;
GPU tensors use Triton/CUDA kernels. See README.md for a tour.
"""
from __future__ import annotations

import warnings

import torch

__version__ = "0.1.0"

# The compiled library registers its C++/CUDA kernels (TORCH_LIBRARY_IMPL) on import. When it is missing
# or broken, everything still works through the torch paths: warn once, never fail the import.
try:
    from etfkern import _C  # type: ignore[attr-defined]

    _C_ERROR: str | None = None
except Exception as _exc:  # noqa: BLE001 - ImportError, OSError (ABI), undefined symbols...
    _C = None
    _C_ERROR = f"{type(_exc).__name__}: {_exc}"
    warnings.warn(f"etfkern: compiled kernels unavailable ({_C_ERROR}); using the torch fallbacks. "
                  "Rebuild with `pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=2)

from etfkern import _ops  # noqa: E402,F401  (schemas first: the family modules register against them)
from etfkern._backend import BackendUnavailableError, use_backend  # noqa: E402

# ---- family modules (each registers its backends and autograd on import) ----------------------------------
# banks
from etfkern.banks import bank_stats, ebv_bank, load_bank, save_bank, simplex_etf, sparse_etf  # noqa: E402
# spherical
from etfkern import nn  # noqa: E402
from etfkern.spherical import nearest, spherical_cross_entropy, spherical_logits  # noqa: E402

# collapse
from etfkern.collapse import CollapseMeter, ncc_mismatch  # noqa: E402

# msam (etfkern.optim)
from etfkern import optim  # noqa: E402,F401

# ------------------------------------------------------------------------------------------------------------

__all__ = [
    "__version__", "BackendUnavailableError", "use_backend", "build_info",
    # banks
    "simplex_etf", "ebv_bank", "sparse_etf", "bank_stats", "save_bank", "load_bank",
    # spherical
    "spherical_logits", "spherical_cross_entropy", "nearest", "nn",

    # collapse
    "CollapseMeter", "ncc_mismatch",
    # msam
    "optim",
]


def build_info() -> dict:
    """How this install was built: compiled library, compiler, CUDA archs, OpenMP, Triton, torch."""
    info: dict = {"etfkern": __version__, "torch": torch.__version__, "compiled": _C is not None}
    if _C is not None:
        info.update(_C.build_info())
    else:
        info["compiled_error"] = _C_ERROR
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = None
        info["triton_error"] = f"{type(exc).__name__}: {exc}"
    return info
