"""Shared test set-up. Without a GPU, the Triton kernels run in interpreter mode (TRITON_INTERPRET=1 must be
set before triton compiles anything, so it is set here, before etfkern is imported)."""
from __future__ import annotations

import os
import socket

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import etfkern  # noqa: E402,F401
from etfkern import _backend  # noqa: E402


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a gloo process group (distributed tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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



# Defines build(fn, sig, const, **options): triton.compile for sm_90 (constexprs appended to the signature) and a
# summary {"shared", "sm90", "cubin"}; every family's script calls it and prints one JSON line.
_AOT_PRELUDE = r"""
import json
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def build(fn, sig, const, **options):
    sig = {**sig, **{k: "constexpr" for k in const}}
    k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32), options=options)
    return {"shared": k.metadata.shared, "sm90": ".target sm_90" in k.asm["ptx"], "cubin": len(k.asm["cubin"]) > 0}
"""


def compile_triton_for_sm90(script: str, tmp_path) -> dict:
    """Run _AOT_PRELUDE + ``script`` (build() calls, then one printed JSON line {name: summary}) in a subprocess
    without TRITON_INTERPRET: a GPU build check without a GPU (ptxas ships with triton). Asserts every kernel
    assembled for sm_90 within an H100/H200 block's shared memory (227 KiB); returns the report. Skips when no
    ptxas is available."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, "-c", _AOT_PRELUDE + script], capture_output=True, text=True, env=env)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr:
        pytest.skip("no ptxas available")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for name, r in report.items():
        assert r["sm90"] and r["cubin"] and 0 <= r["shared"] <= 227 * 1024, (name, r)
    return report
