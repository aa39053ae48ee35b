"""Spherical logits, fused spherical cross-entropy and fused top-k nearest against a fixed bank of vectors.

Layers (one family, one file per layer):
  etfkern/_ops.py                       schemas + fake kernels: spherical_ce_forward, spherical_ce_partials,
                                        spherical_ce_bank_grad, spherical_nearest
  etfkern/reference/spherical.py        float64 oracle (materialises N x C; tests only / last resort)
  this file                             chunked-torch CPU backend, autograd, validation, public functions
  etfkern.triton_kernels.spherical.py  GPU kernels (N x C logits never stored)

Math (see the reference for the definitions): with s_ic = dz_ic/dcos_ic, the x̂-gradient of row i is
g_i * G_i with G_i = sum_c p_ic s_ic w_c - sum_c t_ic s_ic w_c. The forward computes the first sum in the same
pass as the log-sum-exp (the "P @ V" of attention with V = bank) when x needs a gradient, so the backward for x
is O(N d). The target part needs only the two target rows of the bank plus, for label smoothing, sum_c z_ic and
sum_c s_ic w_c: for "cos" these are x̂ . colsum(W) / tau and colsum(W) / tau (one O(C d) column sum), for "arc"
they are accumulated in the class loop.

CPU path: the C++ tile kernels of csrc/spherical/cpu.cpp when etfkern._C is built ("cos" class loop with the fixed
shift: BLAS GEMM into the class_tile() buffer, then ONE fused vectorised pass exp + row sum in place, then the P @ W
GEMM; nearest: 256 x 1024 GEMM tiles + a running top-k merge per row), else the torch path below.
Torch path: chunks of rows (chunk_rows(): a memory budget, default 64 MiB, and at most ~1/16 of the logits per
temporary); for "cos" with a fixed shift (no row max needed, the usual case) the class loop is split as well:
2-D tiles from class_tile() (1024 x 2048, one preallocated buffer, sums accumulated with addmv_/addmm_), which keeps
both GEMMs square enough for MKL at large d.
The Triton path takes the same fixed shift when fixed_shift() allows it and an online row max otherwise
(deterministic either way: one program walks its class tiles in order; split-C slabs combine in a fixed order).

Host syncs: on CPU tensors the labels, lam, x and bank are checked eagerly (ValueError). On CUDA tensors (and under
torch.compile) the same checks run on the device with ``torch._assert_async`` (no host sync; a failure surfaces at
the next synchronising point as a device-side assert, as torch's own cross_entropy does) unless
``validate=True`` (eager ValueError, one host sync) or ``validate=False`` (no checks).
"""
from __future__ import annotations

import math
import os
import weakref

import torch
import torch.nn.functional as F

from etfkern._core import backend as _backend
from etfkern.spherical import ops as _ops
from etfkern.spherical import reference as _ref
from etfkern.spherical.reference import ARC_GRAD_EPS, METRICS, NORM_EPS, acc_dtype
from etfkern.spherical.cpu import (_rowdot, chunk_rows, chunked_nearest, class_tile,  # noqa: F401 (re-exported)
                                   cos_tiles, finish_forward, fixed_shift, normalized, run_cos_tiles, z_and_slope)
from etfkern.spherical.ops import normalize_backward  # noqa: F401 (re-exported)

__all__ = ["spherical_logits", "spherical_cross_entropy", "nearest", "spherical_ce_rows", "chunk_rows"]

REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------
def _check_x_bank(x, bank) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (N, d) tensor, got {_desc(x)}")
    if not isinstance(bank, torch.Tensor) or bank.dim() != 2 or not bank.is_floating_point():
        raise ValueError(f"bank must be a floating (C, d) tensor, got {_desc(bank)}")
    if bank.shape[1] != x.shape[1]:
        raise ValueError(f"bank must have shape (C, d) with d = x.shape[1] = {x.shape[1]}, got {tuple(bank.shape)}")
    if bank.shape[0] == 0:
        raise ValueError("bank must have at least one row (C >= 1)")
    if bank.dtype != x.dtype:
        raise ValueError(f"bank dtype {bank.dtype} must match x dtype {x.dtype}")
    if bank.device != x.device:
        raise ValueError(f"bank is on {bank.device} but x is on {x.device}")


def _desc(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _check_tau_metric(tau, metric) -> None:
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _check_labels(name: str, t, n: int, device) -> None:
    if not isinstance(t, torch.Tensor) or t.shape != (n,) or t.is_floating_point() or t.is_complex() \
            or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape ({n},), got {_desc(t)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


# A data check: (() -> 0-dim bool tensor that must be True, message, optional callback run once it is enforced).
# Lazy, so validate=False costs nothing.
DataCheck = tuple  # (Callable[[], torch.Tensor], str, Callable[[], None] | None)
_FINITE_BANKS: dict[int, tuple] = {}  # id(bank) -> (weakref, _version, data_ptr, shape, stride) checked finite


def _finite_check(t: torch.Tensor, name: str) -> DataCheck:
    return (lambda: torch.isfinite(t).all(), f"{name} must be finite (found NaN or inf)", None)


def _bank_finite_checks(bank: torch.Tensor, name: str = "bank") -> list[DataCheck]:
    """The bank's finiteness check, or none when this very tensor passed it before and has not been written since
    (same object, ``_version`` counter, storage and layout). The op reads a fixed bank once per call; a second
    full read per call for the check would double the traffic of a small-batch call. Traced every time under
    torch.compile (device assert)."""
    if torch.compiler.is_compiling():
        return [_finite_check(bank, name)]
    key = (bank._version, bank.data_ptr(), tuple(bank.shape), bank.stride())
    seen = _FINITE_BANKS.get(id(bank))
    if seen is not None and seen[0]() is bank and seen[1:] == key:
        return []

    def remember() -> None:
        if len(_FINITE_BANKS) >= 64:  # a few banks in use in practice: drop the oldest entry
            _FINITE_BANKS.pop(next(iter(_FINITE_BANKS)))
        _FINITE_BANKS[id(bank)] = (weakref.ref(bank),) + key

    return [(lambda: torch.isfinite(bank).all(), f"{name} must be finite (found NaN or inf)", remember)]


def _data_checks(checks: list[DataCheck], validate: bool | None, device: torch.device) -> None:
    """Run the checks: eager ValueError on CPU (or validate=True), ``torch._assert_async`` on CUDA and under
    torch.compile (no host sync), nothing for validate=False."""
    if validate is False or not checks:
        return
    # under torch.compile a host-side bool() breaks the graph (fullgraph=True fails): device asserts even for True
    on_device = torch.compiler.is_compiling() or (validate is None and device.type != "cpu")
    for ok, msg, passed in checks:
        if on_device:  # a failing device assert is fatal to the CUDA context: enforced once enqueued
            torch._assert_async(ok(), msg)
        elif not bool(ok()):
            raise ValueError(msg)
        if passed is not None:
            passed()


# ----------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------
def _arccos_finite_grad(c: torch.Tensor) -> torch.Tensor:
    """arccos(clamp(c, -1, 1)) whose first derivative is -1/sqrt(max(1 - c^2, ARC_GRAD_EPS)) (finite at |c| = 1)."""
    cc = c.detach().clamp(-1.0, 1.0)
    slope = -(1.0 - cc * cc).clamp_min(ARC_GRAD_EPS).rsqrt()
    return torch.arccos(cc) + (c - c.detach()) * slope


def spherical_logits(x: torch.Tensor, bank: torch.Tensor, *, tau: float = 0.07, metric: str = "cos"
                     ) -> torch.Tensor:
    """Materialised logits z (N, C) in x.dtype: cos(x_i, w_c)/tau ("cos") or -arccos(cos)/tau ("arc").

    x (N, d) is L2-normalised inside (gradient through it); bank (C, d) rows are used as given. This one DOES
    store N x C (it is the output); use :func:`spherical_cross_entropy` / :func:`nearest` to avoid that.
    Plain differentiable torch ops (compile-friendly); the "arc" gradient is finite at |cos| = 1.
    """
    _check_x_bank(x, bank)
    _check_tau_metric(tau, metric)
    _data_checks([_finite_check(x, "x")] + _bank_finite_checks(bank), None, x.device)
    cos = F.normalize(x, dim=1, eps=NORM_EPS) @ bank.T
    if metric == "cos":
        return cos / tau
    return _arccos_finite_grad(cos) / -tau


def _prepare(x, bank, target, tau, metric, label_smoothing, ignore_index, target_b, lam, validate,
             num_classes: int | None = None, check_bank: bool = True):
    """Validate the arguments; return (target_b, per-row lam). num_classes: total C (default bank rows).
    check_bank=False skips the bank's finiteness check (a caller that checked it already)."""
    _check_x_bank(x, bank)
    _check_tau_metric(tau, metric)
    n, n_cls = x.shape[0], num_classes if num_classes is not None else bank.shape[0]
    _check_labels("target", target, n, x.device)
    if target_b is None:
        target_b = target
    else:
        _check_labels("target_b", target_b, n, x.device)
    if not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool) \
            or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    acc = acc_dtype(x.dtype)
    checks = []
    if lam is None:
        lam_t = torch.ones(n, dtype=acc, device=x.device)
    elif isinstance(lam, (int, float)) and not isinstance(lam, bool):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam!r}")
        lam_t = torch.full((n,), float(lam), dtype=acc, device=x.device)
    elif isinstance(lam, torch.Tensor) and lam.is_floating_point() and lam.shape in ((), (n,)):
        if lam.device != x.device:
            raise ValueError(f"lam is on {lam.device} but x is on {x.device}")
        lam_t = lam.detach().to(acc).expand(n).contiguous()
        checks.append((lambda: ((lam_t >= 0) & (lam_t <= 1)).all(), "lam must lie in [0, 1] (scalar or per row)",
                       None))
    else:
        raise ValueError(f"lam must be None, a float in [0, 1] or a floating tensor of shape () or ({n},), "
                         f"got {_desc(lam)}")
    checks.append((lambda: ((target >= 0) & (target < n_cls) | (target == ignore_index)).all(),
                   f"target must hold class indices in [0, {n_cls}) or ignore_index={ignore_index}", None))
    if target_b is not target:
        checks.append((lambda: ((target_b >= 0) & (target_b < n_cls) | (target == ignore_index)).all(),
                       f"target_b must hold class indices in [0, {n_cls}) where target != ignore_index", None))
    checks += [_finite_check(x, "x")] + (_bank_finite_checks(bank) if check_bank else [])
    _data_checks(checks, validate, x.device)
    return target_b, lam_t


def spherical_ce_rows(x: torch.Tensor, bank: torch.Tensor, target: torch.Tensor, *, tau: float = 0.07,
                      metric: str = "cos", label_smoothing: float = 0.0, ignore_index: int = -100,
                      target_b: torch.Tensor | None = None, lam: float | torch.Tensor | None = None,
                      validate: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (loss (N,), lse (N,)) in float32 (float64 for float64 x); loss differentiable, lse not.

    The building block for reductions done elsewhere (e.g. a global normaliser under gradient accumulation or
    a vocab-parallel merge of per-shard lse). Ignored rows have loss 0. Arguments as
    :func:`spherical_cross_entropy`.
    """
    target_b, lam_t = _prepare(x, bank, target, tau, metric, label_smoothing, ignore_index, target_b, lam, validate)
    need_grad = torch.is_grad_enabled() and x.requires_grad
    loss, lse, _ = _ops.spherical_ce_forward(x, bank, target, target_b, lam_t, float(tau), metric,
                                             float(label_smoothing), int(ignore_index), need_grad)
    return loss, lse


def spherical_cross_entropy(x: torch.Tensor, bank: torch.Tensor, target: torch.Tensor, *, tau: float = 0.07,
                            metric: str = "cos", label_smoothing: float = 0.0, ignore_index: int = -100,
                            reduction: str = "mean", target_b: torch.Tensor | None = None,
                            lam: float | torch.Tensor | None = None, validate: bool | None = None) -> torch.Tensor:
    """Fused cross-entropy of spherical logits against a fixed bank; the N x C logits are never stored.

    x (N, d) float (L2-normalised inside, gradient through it); bank (C, d), same dtype and device, rows used as
    given (gradient only when bank.requires_grad; a frozen bank costs no dW work); target, target_b (N,) int
    class indices in [0, C) or ``ignore_index``; lam: None (=1), float, or (N,) / () tensor in [0, 1].
    Soft targets t = (1-eps)(lam onehot(target) + (1-lam) onehot(target_b)) + eps/C with eps = label_smoothing;
    loss_i = lse_i - sum_c t_ic z_ic. reduction "mean" divides by the number of rows with target != ignore_index
    (0 when there are none), "sum", or "none" (N,). Returned in x.dtype (reduced in float32/64).
    validate: None = eager ValueError on CPU, device-side assert (no host sync) on CUDA and under compile;
    True = eager ValueError everywhere (one host sync) except under torch.compile (device-side assert there);
    False = no data checks.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    loss, _ = spherical_ce_rows(x, bank, target, tau=tau, metric=metric, label_smoothing=label_smoothing,
                                ignore_index=ignore_index, target_b=target_b, lam=lam, validate=validate)
    return reduce_rows(loss, target, ignore_index, reduction, x.dtype)


def reduce_rows(loss: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str,
                dtype: torch.dtype) -> torch.Tensor:
    """Apply ``reduction`` to per-row losses ("mean": over rows whose target != ignore_index, 0 if none)."""
    if reduction == "none":
        return loss.to(dtype)
    total = loss.sum()
    if reduction == "mean":
        total = total / (target != ignore_index).sum().clamp_min(1).to(total.dtype)
    return total.to(dtype)


def nearest(x: torch.Tensor, bank: torch.Tensor, *, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k bank rows by cosine: (values (N, k) in x.dtype, int64 indices (N, k)), sorted descending.

    x (N, d) is normalised inside, bank rows used as given. Fused: no N x C buffer on GPU, O(chunk x C) on CPU.
    Not differentiable. A non-finite x or bank raises ValueError on CPU (on CUDA: a device-side assert, no host
    sync)."""
    _check_x_bank(x, bank)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be an int in [1, C={bank.shape[0]}], got {k!r}")
    _data_checks([_finite_check(x, "x")] + _bank_finite_checks(bank), None, x.device)
    vals, idx = _ops.spherical_nearest(x.detach(), bank.detach(), k)
    return vals.to(x.dtype), idx
