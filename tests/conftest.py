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
from etfkern._core import backend as _backend  # noqa: E402


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


# ---- tolerances: one table for every family --------------------------------------------------------------------
# dtype -> (atol, rtol) for comparing an op against its float64 reference on unit-scale data. A test that needs a
# scale-dependent atol multiplies by its own scale; a test of a 16-bit input judges by the rule below instead.
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}
# 16-bit inputs: an op's error against float64 must be at most this many times plain torch's error in that dtype.
TORCH_ERROR_FACTOR = 2.0


# Per-op tables where an op's accumulation differs from the default (same (atol, rtol) shape; "*" = any other
# dtype). The families' shared tolerance helpers read them here; one-off bounds stay next to the test that states why.
OP_TOL: dict[str, dict] = {
    # spherical CE loss / x-gradient / bank-gradient against float64 autograd (16/32-bit inputs accumulate in fp32)
    "spherical": {torch.float64: (1e-10, 1e-9), "*": (2e-4, 2e-4)},
    # one MSAM/AdamWMSAM kernel step against the float64 step (the state is fp32 for 16/32-bit parameters)
    "msam_step": {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2)},
    # collapse_update (relative to the output's scale): "triton" multiplies in float32 (float64 inputs too, after
    # centring in float64); the CPU path's d x d scatter takes float32 products for 16/32-bit features
    "collapse_update/triton": {torch.float64: (2e-6, 2e-6), "*": (2e-5, 2e-5)},
    "collapse_update/cpu/sw_delta": {torch.float64: (1e-10, 1e-10), "*": (2e-6, 2e-6)},
    "collapse_update/cpu": {"*": (1e-10, 1e-10)},
}


def tolerance(dtype: torch.dtype, op: str | None = None) -> tuple[float, float]:
    """(atol, rtol) for results of ``op`` (a key of OP_TOL; None = the default TOL) computed from ``dtype``."""
    if op is None:
        return TOL[dtype]
    table = OP_TOL[op]
    return table[dtype] if dtype in table else table["*"]


def assert_close_to_reference(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, *, scale: float = 1.0,
                              msg: str = "") -> None:
    """``got`` equals the float64 ``want`` within TOL[dtype] (atol multiplied by ``scale``), compared in float64."""
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.to(torch.float64).cpu(), want.to(torch.float64).cpu(), atol=atol * scale, rtol=rtol,
                               msg=msg or None)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| in the Frobenius norm, computed in float64 (0/0 counts as 0)."""
    g, w = got.detach().to(torch.float64).cpu(), want.detach().to(torch.float64).cpu()
    num, den = float((g - w).norm()), float(w.norm())
    return num / den if den > 0 else num


def assert_no_worse_than_torch(got: torch.Tensor, plain: torch.Tensor, want: torch.Tensor, *, slack: float = 0.0,
                               msg: str = "") -> None:
    """The 16-bit rule: relative_error(got) <= TORCH_ERROR_FACTOR * relative_error(plain torch) + slack."""
    err, base = relative_error(got, want), relative_error(plain, want)
    assert err <= TORCH_ERROR_FACTOR * base + slack, (msg, err, base)


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
