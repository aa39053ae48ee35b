"""The one place that picks which implementation runs an op.

Backends:
  reference  plain torch (float64-capable) in each family's ``reference.py``: the oracle, and the last resort.
  cpu        the compiled C++ kernel (``torch.ops.etfkern.<op>_native`` from ``etfkern._C``) when it was
             built, else the op's chunked-torch CPU path.
  triton     the ``@triton.jit`` kernels in ``etfkern.triton_kernels``: GPU tensors, or CPU tensors when
             ``TRITON_INTERPRET=1`` (tests only: slow, tiny shapes).
  cuda       the compiled CUDA kernel (``torch.ops.etfkern.<op>_native`` on CUDA tensors).

Choice, per call: ``with etfkern.use_backend(name):`` if active, else ``ETFKERN_BACKEND`` (auto|triton|cuda|
cpu|reference, default auto). ``auto`` = Triton, then CUDA on GPU tensors; the C++/torch CPU path on CPU
tensors. Asking for a backend that cannot run the op on that device raises :class:`BackendUnavailableError`
with the reason.

Family files register their implementations with :func:`register`; an implementation may be given as
``"module:function"`` so Triton is imported only when a Triton kernel is actually used.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from typing import Any, Callable, Iterator

import torch

from etfkern._core import native
from etfkern.triton_kernels._common import kernel_variant, triton_interpret  # noqa: F401 (re-exported)

BACKENDS = ("reference", "cpu", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS

# op name -> backend -> implementation (callable or "module:function" resolved on first use)
_IMPLS: dict[str, dict[str, Callable[..., Any] | str]] = {}
_override = threading.local()
_warned: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op on this device; the message says why."""


def register(op: str, backend: str, impl: Callable[..., Any] | str) -> None:
    """Register ``impl`` as ``backend``'s implementation of ``etfkern::<op>`` (same arguments and outputs)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _IMPLS.setdefault(op, {})[backend] = impl


def requested() -> str:
    """The backend asked for right now: the innermost ``use_backend`` block, else ``ETFKERN_BACKEND``."""
    # an empty value (``ETFKERN_BACKEND= make test``) means unset, i.e. auto
    name = getattr(_override, "name", None) or os.environ.get("ETFKERN_BACKEND", "").strip().lower() or "auto"
    if name not in _CHOICES:
        raise ValueError(f"ETFKERN_BACKEND must be one of {_CHOICES}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (auto|triton|cuda|cpu|reference), this thread only."""
    name = name.strip().lower()
    if name not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    previous = getattr(_override, "name", None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


# ----------------------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------------------
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def has_native(op: str, device_type: str) -> bool:
    """True when etfkern._C registered a kernel for ``etfkern::<op>_native`` on this device type."""
    if not native.loaded()[0]:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"etfkern::{op}_native", key)
    except RuntimeError:  # no such operator: the op has no native twin
        return False


def why_unavailable(backend: str, device_type: str, op: str | None = None) -> str | None:
    """None when ``backend`` can run ``op`` (or, with op None, anything) on ``device_type``; else the reason."""
    impls = _IMPLS.get(op, {}) if op is not None else None
    if backend == "reference":
        if impls is not None and "reference" not in impls:
            return f"op {op!r} has no reference implementation registered"
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs CPU tensors only (got a {device_type} tensor)"
        if impls is not None and "cpu" not in impls and not has_native(op, "cpu"):
            return f"op {op!r} has no CPU kernel (compiled or torch)"
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device_type == "cpu" and not triton_interpret():
            return "Triton runs CPU tensors only in interpreter mode (set TRITON_INTERPRET=1 before import)"
        if device_type not in ("cpu", "cuda"):
            return f"Triton kernels run on cuda devices, got {device_type}"
        if impls is not None and "triton" not in impls:
            return f"op {op!r} has no Triton kernel"
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs CUDA tensors only (got a {device_type} tensor)"
        ok, why = native.loaded()
        if not ok:
            return why
        if not native.C.build_info().get("cuda", False):
            return "etfkern._C was built without CUDA (CPU torch, no nvcc, or ETFKERN_SKIP_CUDA_BUILD=1)"
        if op is not None and not has_native(op, "cuda") and "cuda" not in (impls or {}):
            return f"op {op!r} has no CUDA kernel"
        return None
    raise ValueError(f"unknown backend {backend!r}")


def availability(device_type: str) -> dict[str, str | None]:
    """backend -> None if usable on ``device_type`` at all, else why not (for ``python -m etfkern info``)."""
    return {b: why_unavailable(b, device_type) for b in BACKENDS}


# ----------------------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------------------
def _auto_order(device_type: str) -> tuple[str, ...]:
    return ("triton", "cuda", "reference") if device_type == "cuda" else ("cpu", "reference")


def choose(op: str, device: torch.device | str) -> str:
    """The backend that will run ``etfkern::<op>`` for tensors on ``device``."""
    device_type = torch.device(device).type
    name = requested()
    if name != "auto":
        why = why_unavailable(name, device_type, op)
        if why is not None:
            raise BackendUnavailableError(f"etfkern backend {name!r} cannot run {op!r} on {device_type}: {why}")
        return name
    reasons = []
    for candidate in _auto_order(device_type):
        why = why_unavailable(candidate, device_type, op)
        if why is None:
            if candidate == "reference" and device_type == "cuda" and op not in _warned:
                _warned.add(op)
                warnings.warn(f"etfkern: no GPU kernel available for {op!r} ({'; '.join(reasons)}); "
                              "using the plain-torch reference", RuntimeWarning, stacklevel=3)
            return candidate
        reasons.append(f"{candidate}: {why}")
    raise BackendUnavailableError(f"no etfkern backend can run {op!r} on {device_type}: {'; '.join(reasons)}")


def _resolve(impl: Callable[..., Any] | str) -> Callable[..., Any]:
    if callable(impl):
        return impl
    module, _, attr = impl.partition(":")
    return getattr(importlib.import_module(module), attr)


def implementation(op: str, backend: str, device_type: str) -> Callable[..., Any]:
    """The callable ``backend`` uses for ``op``: the compiled kernel wins over a registered torch path."""
    if backend in ("cpu", "cuda") and has_native(op, device_type):
        return getattr(torch.ops.etfkern, f"{op}_native")
    impls = _IMPLS.get(op, {})
    if backend not in impls:
        raise BackendUnavailableError(f"op {op!r} has no {backend} implementation")
    fn = _resolve(impls[backend])
    impls[backend] = fn
    return fn


def _device_of(args: tuple[Any, ...]) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, torch.Tensor):
                    return t.device
    return torch.device("cpu")


def router(op: str) -> Callable[..., Any]:
    """The CPU/CUDA kernel registered for ``etfkern::<op>``: picks the backend, then runs it."""

    def run(*args: Any, **kwargs: Any) -> Any:
        device = _device_of(args)
        return implementation(op, choose(op, device), device.type)(*args, **kwargs)

    run.__name__ = f"{op}_router"
    return run
