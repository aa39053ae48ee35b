"""Shared test set-up. Without a GPU, the Triton kernels run in interpreter mode (TRITON_INTERPRET=1 must be
set before triton compiles anything, so it is set here, before etfkern is imported)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import etfkern  # noqa: E402,F401
from etfkern import _backend  # noqa: E402


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


DEVICES = _devices()


def backends_for(op: str, device: str) -> list[str]:
    """Every backend that can run ``op`` on ``device`` here (reference always; triton in interpreter mode)."""
    return [b for b in _backend.BACKENDS if _backend.why_unavailable(b, device, op) is None]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
