"""The compiled library ``etfkern._C``, loaded once.

Importing it registers the C++/CUDA kernels (``TORCH_LIBRARY_IMPL(etfkern, CPU|CUDA)`` in ``csrc/<family>/``).
When it is missing or broken everything still works through the torch paths: warn once, never fail the import.
"""
from __future__ import annotations

import warnings
from types import ModuleType

C: ModuleType | None
ERROR: str | None

try:
    from etfkern import _C as C  # type: ignore[attr-defined]

    ERROR = None
except Exception as _exc:  # noqa: BLE001 - ImportError, OSError (ABI), undefined symbols...
    C = None
    ERROR = f"{type(_exc).__name__}: {_exc}"
    warnings.warn(f"etfkern: compiled kernels unavailable ({ERROR}); using the torch fallbacks. "
                  "Rebuild with `pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=2)


def loaded() -> tuple[bool, str]:
    """(True, "") when ``etfkern._C`` loaded, else (False, why)."""
    if C is None:
        return False, f"the compiled library etfkern._C did not load ({ERROR})"
    return True, ""
