"""etfkern: fused kernels for networks whose classifier is a large fixed bank of unit vectors.

Banks (simplex ETF, Equiangular Basis Vectors, sparse ETF), fused spherical cross-entropy and top-k
inference, streaming neural-collapse statistics, and Momentum-SAM optimizers. Every op has a CPU path;
GPU tensors use Triton/CUDA kernels. See README.md for a tour.
"""
from __future__ import annotations

import torch

__version__ = "0.1.0"

# The compiled library first (it registers the C++/CUDA kernels); missing or broken, the torch paths still work.
from etfkern._core.native import C as _C, ERROR as _C_ERROR  # noqa: E402,F401
from etfkern._core.backend import BackendUnavailableError, use_backend  # noqa: E402

# ---- family modules (each registers its backends and autograd on import) ----------------------------------
# banks
from etfkern.banks import bank_stats, ebv_bank, load_bank, save_bank, simplex_etf, sparse_etf  # noqa: E402
# spherical (etfkern.nn, etfkern.distributed)
from etfkern.spherical import nearest, spherical_cross_entropy, spherical_logits  # noqa: E402
from etfkern import distributed, nn  # noqa: E402,F401

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
    "spherical_logits", "spherical_cross_entropy", "nearest", "nn", "distributed",

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
