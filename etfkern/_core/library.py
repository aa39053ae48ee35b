"""The torch.library handle of the ``etfkern`` namespace and :func:`define`, which every family's ``ops.py`` uses.

Each op ``etfkern::<name>`` defined here gets
  * its schema and fake kernel (shapes/dtypes only, so torch.compile can trace through it),
  * a CPU and a CUDA kernel that route through :mod:`etfkern._core.backend` (reference | cpu | triton | cuda),
  * with ``native=True``, a twin ``etfkern::<name>_native`` with the same schema: the op the compiled library
    implements in C++/CUDA with ``TORCH_LIBRARY_IMPL(etfkern, CPU|CUDA)``; the router calls it when present.
Autograd (``torch.library.register_autograd``) lives in the family's ``ops.py`` next to its schemas.

Schemas take positional arguments only (no ``*``): the router forwards them untouched.
"""
from __future__ import annotations

from typing import Callable

import torch

from etfkern._core import backend

LIB = torch.library.Library("etfkern", "DEF")


def define(name: str, schema: str, fake: Callable, *, native: bool = False) -> Callable:
    """Define ``etfkern::<name><schema>`` with its fake kernel and routed CPU/CUDA kernels; return the op."""
    LIB.define(name + schema)
    torch.library.register_fake(f"etfkern::{name}", fake, lib=LIB)
    routed = backend.router(name)
    LIB.impl(name, routed, "CPU")
    LIB.impl(name, routed, "CUDA")
    if native:
        LIB.define(f"{name}_native{schema}")
    return getattr(torch.ops.etfkern, name).default
