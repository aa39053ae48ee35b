"""CPU path of the spherical family, and the O(N d) pieces every backend shares.

CPU: the C++ tile kernels of csrc/spherical/cpu.cpp when etfkern._C is built ("cos" class loop with the fixed
shift: BLAS GEMM into the class_tile() buffer, then ONE fused vectorised pass exp + row sum in place, then the P @ W
GEMM; nearest: 256 x 1024 GEMM tiles + a running top-k merge per row), else the torch path below.
Torch path: chunks of rows (chunk_rows(): a memory budget, default 64 MiB, and at most ~1/16 of the logits per
temporary); for "cos" with a fixed shift (no row max needed, the usual case) the class loop is split as well:
2-D tiles from class_tile() (1024 x 2048, one preallocated buffer, sums accumulated with addmv_/addmm_), which keeps
both GEMMs square enough for MKL at large d.

Shared with the GPU op layer (etfkern/spherical/ops.py): normalized, z_and_slope, finish_forward (the target
terms), fixed_shift, cos_tiles (device-agnostic), chunked_nearest (any device).
"""
from __future__ import annotations

import math
import os

import torch

from etfkern._core import backend as _backend
from etfkern.spherical.reference import ARC_GRAD_EPS, NORM_EPS, acc_dtype

_DEFAULT_CHUNK_MIB = 64.0
# CPU fixed-shift tiles: 1024 x 2048 (8 MiB fp32). Whole-C row chunks of ~128 rows made both GEMMs skinny (M=128;
# the P @ W one with K = C) and streamed a rows x C buffer through memory three times; at d=512, C=32768 that ran
# at ~0.57x of eager. Square-ish tiles keep MKL efficient and the tile in a smaller working set.
_TILE_ROWS = 1024
_TILE_CLASSES = 2048
_TILE_MIN_DIM = 256  # below this d the class loop is not split (whole-C row chunks, as before)


# ----------------------------------------------------------------------------------------------------------
# Shared pieces (CPU backend and the Triton launchers)
# ----------------------------------------------------------------------------------------------------------
def chunk_rows(num_classes: int, buffers: int = 3, budget_mib: float | None = None,
               n_rows: int | None = None) -> int:
    """Rows per chunk: ``buffers`` float32 (rows x C) temporaries fit in the budget, and (given ``n_rows``) one
    temporary holds at most ~1/16 of the N x C logits (but >= 64 rows, so GEMMs stay efficient).

    Budget: ``budget_mib`` or env ``ETFKERN_CHUNK_MIB`` (default 64 MiB); at least 1 row.
    """
    if budget_mib is None:
        budget_mib = float(os.environ.get("ETFKERN_CHUNK_MIB", _DEFAULT_CHUNK_MIB))
    rows = int(budget_mib * 2**20) // max(1, num_classes * 4 * buffers)
    if n_rows is not None:
        rows = min(rows, max(64, -(-n_rows // 16)))
    return max(1, rows)


def class_tile(n_rows: int, num_classes: int, budget_mib: float | None = None, dim: int | None = None
               ) -> tuple[int, int]:
    """(rows, classes) of one logits tile for the CPU fixed-shift path (no row max, so the class loop can be split):
    at most _TILE_CLASSES classes, rows from chunk_rows() on that width (3 tiles fit the budget) capped at
    _TILE_ROWS and, as chunk_rows() does, one tile <= ~1/16 of the N x C logits (but >= 64 rows)."""
    if dim is not None and dim < _TILE_MIN_DIM:  # small d: whole-C row chunks measured as good (1.3-1.6x eager)
        return min(n_rows, chunk_rows(num_classes, budget_mib=budget_mib, n_rows=n_rows)), max(1, num_classes)
    k = max(1, min(num_classes, _TILE_CLASSES))
    rows = min(chunk_rows(k, budget_mib=budget_mib), _TILE_ROWS, max(64, n_rows * num_classes // 16 // k))
    return max(1, min(rows, n_rows)), k


_NORM_BLOCK = 1 << 22  # elements per row block of normalized(): its float32 temporaries stay <= 2 x 16 MiB


def normalized(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / max(|x|, NORM_EPS) computed in float32/64, returned in ``dtype`` (contiguous). Row blocks of
    _NORM_BLOCK elements (same numbers): a (16384, 4096) bf16 x would otherwise make two 256 MiB float32 copies."""
    acc = acc_dtype(x.dtype)
    rows = max(1, _NORM_BLOCK // max(1, x.shape[1]))
    if x.shape[0] <= rows:
        xf = x.to(acc)
        return (xf / xf.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)).to(dtype).contiguous()
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    for r0 in range(0, x.shape[0], rows):
        xf = x[r0:r0 + rows].to(acc)
        out[r0:r0 + rows] = xf / xf.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return out


def z_and_slope(cos: torch.Tensor, tau: float, metric: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z, s) from cosines; s is None for "cos" (constant 1/tau)."""
    if metric == "cos":
        return cos / tau, None
    c = cos.clamp(-1.0, 1.0)
    return torch.arccos(c).div_(-tau), (1.0 - c * c).clamp_min_(ARC_GRAD_EPS).sqrt_().mul_(tau).reciprocal_()


def finish_forward(xh: torch.Tensor, bank: torch.Tensor, target: torch.Tensor, target_b: torch.Tensor,
                   lam: torch.Tensor, tau: float, metric: str, eps: float, ignore_index: int, lse: torch.Tensor,
                   sum_z: torch.Tensor | None, a_sum: torch.Tensor | None, b_sum: torch.Tensor | None,
                   colsum: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Add the target terms (O(N d)) to the class-loop results.

    xh (N, d) normalised x in the accumulation dtype; lse (N,); sum_z (N,) = sum_c z_ic ("arc" only, else None);
    a_sum (N, d) = sum_c p_ic s_ic w_c or None; b_sum (N, d) = sum_c s_ic w_c ("arc" with eps > 0 only).
    colsum: sum_c w_c / tau in ``acc`` when the caller has it (row chunks of one call), else formed here for "cos"
    with eps > 0 (a reduction in the accumulation dtype: no float32 copy of a 16-bit bank).
    Returns (loss_rows, grad_xhat or None); ignored rows give 0.
    """
    acc = xh.dtype
    n_cls = bank.shape[0]
    valid = target != ignore_index
    single = target_b is target  # no mixup pair: the soft target is one class (lam drops out)
    ta = torch.where(valid, target, 0).long()
    wa = bank.index_select(0, ta).to(acc)
    za, sa = z_and_slope(_rowdot(xh, wa), tau, metric)
    if single:
        wb, zb, sb = wa, za, sa
    else:
        wb = bank.index_select(0, torch.where(valid, target_b, 0).long()).to(acc)
        zb, sb = z_and_slope(_rowdot(xh, wb), tau, metric)
    lam = lam.to(acc)
    target_z = (1 - eps) * (za if single else lam * za + (1 - lam) * zb)
    need_col = eps > 0 and (metric == "cos")
    if need_col and colsum is None:
        colsum = bank.sum(0, dtype=acc) / tau
    if eps > 0:
        target_z = target_z + (eps / n_cls) * (xh @ colsum if metric == "cos" else sum_z)
    loss = torch.where(valid, lse - target_z, torch.zeros_like(lse))
    if a_sum is None:
        return loss, None
    if metric == "cos":
        sa = sb = torch.full_like(za, 1.0 / tau)
    # grad = a_sum - (1 - eps) (lam s_a w_a + (1 - lam) s_b w_b) - (eps / C) sum_c s_c w_c, formed in place in
    # a_sum (the class loop's own buffer): no further (N, d) temporaries beyond the gathered target rows
    grad = a_sum
    if single:
        grad.addcmul_(wa, ((1 - eps) * sa).unsqueeze(1), value=-1.0)
    else:
        grad.addcmul_(wa, ((1 - eps) * lam * sa).unsqueeze(1), value=-1.0)
        grad.addcmul_(wb, ((1 - eps) * (1 - lam) * sb).unsqueeze(1), value=-1.0)
    if eps > 0:
        grad.sub_((eps / n_cls) * (colsum.unsqueeze(0) if metric == "cos" else b_sum))
    grad.masked_fill_(~valid.unsqueeze(1), 0.0)
    return loss, grad


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) row-wise dot products of two (N, d) tensors without an (N, d) product temporary (a batched GEMV)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _empty_results(x, need_grad):
    acc = acc_dtype(x.dtype)
    n, d = x.shape
    return (x.new_zeros(n, dtype=acc), x.new_full((n,), float("-inf"), dtype=acc),
            x.new_zeros(n if need_grad else 0, d, dtype=acc))


# ----------------------------------------------------------------------------------------------------------
# CPU backend: chunked torch (MKL GEMMs); extra memory O(chunk * C) with the chunk from chunk_rows()
# ----------------------------------------------------------------------------------------------------------
def fixed_shift(bank: torch.Tensor, tau: float, metric: str) -> float | None:
    """0.0 when exp(z) can be taken without any shift, else None (then the row max is used).

    |z| <= max_c |w_c| / tau for "cos" (x̂ is unit; 1% margin for rounding) and z in [-pi/tau, 0] for "arc".
    With |z| <= 40, exp(z) lies in [4e-18, 2.4e17]: normal fp32 numbers, and their sum over C < 2^40 classes
    cannot overflow, so lse = log(sum_c exp(z_ic)) needs no max pass. "arc" logits are never positive, so only
    underflow limits them: pi/tau <= 80 keeps exp(z) >= 1.8e-35, still a normal fp32 number (tau >= 0.0393;
    the default 0.07 qualifies).
    """
    if metric == "arc":
        return 0.0 if math.pi / tau <= 80.0 else None
    bound = 1.01 * float(bank.detach().float().norm(dim=1).max()) / tau
    return 0.0 if bound <= 40.0 else None


def cpu_gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """GEMM operand dtype of the CPU path: the input dtype (bf16 GEMMs accumulate in fp32), except float16, which
    runs in float32: the fixed-shift exp(z) (up to e^40) and the "arc" slopes overflow float16's 65504 when cast
    for the P @ W GEMM (NaN gradients), and CPU float16 GEMMs are several times slower than float32 ones."""
    return torch.float32 if dtype == torch.float16 else dtype


def _cpu_class_loop(x, bank, tau, metric, need_sumz, need_grad, need_b):
    """Chunked class loop: (x̂, lse, sum_z | None, a_sum | None, b_sum | None), see finish_forward."""
    n, d = x.shape
    acc = acc_dtype(x.dtype)
    mm = cpu_gemm_dtype(bank.dtype)  # GEMM operands (see cpu_gemm_dtype), elementwise math in acc
    xh = normalized(x, acc)
    arc = metric == "arc"
    w = bank.to(mm).contiguous()
    shift = fixed_shift(w, tau, metric)
    xs = (xh if arc else xh / tau).to(mm)  # "cos": 1/tau folded into x̂, so the GEMM yields z directly
    sum_z = b_sum = None
    if not arc and shift is not None:  # no max pass: sum_c exp(z) and sum_c exp(z) w_c add up over class tiles
        lse, a_sum = run_cos_tiles(xs, w, float(tau), need_grad, *class_tile(n, w.shape[0], dim=d))
        a_sum = a_sum if need_grad else None
    else:
        ones = torch.ones(w.shape[0], dtype=acc)
        lse = torch.empty(n, dtype=acc)
        sum_z = torch.empty(n, dtype=acc) if need_sumz and arc else None
        a_sum = torch.empty(n, d, dtype=acc) if need_grad else None
        b_sum = torch.empty(n, d, dtype=acc) if need_b and arc else None
        step = chunk_rows(bank.shape[0], n_rows=n)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            z, s = z_and_slope((xs[r0:r1] @ w.T).to(acc), 1.0 if not arc else tau, metric)
            if sum_z is not None:
                sum_z[r0:r1] = z @ ones
            m = z.amax(1, keepdim=True) if shift is None else torch.zeros((r1 - r0, 1), dtype=acc)
            e = z.sub_(m).exp_() if shift is None else z.exp_()  # z is dead after this: reuse its buffer
            l = e @ ones  # a GEMV: much faster than e.sum(1) on CPU
            if a_sum is not None:
                if s is not None:
                    e.mul_(s)
                a = (e.to(mm) @ w).to(acc)
            lse[r0:r1] = m.squeeze(1) + l.log()
            if a_sum is not None:
                a_sum[r0:r1] = a / (l.unsqueeze(1) * (tau if not arc else 1.0))
            if b_sum is not None:
                b_sum[r0:r1] = (s.to(mm) @ w).to(acc)
            e = s = z = None  # free this chunk's (rows x C) buffers before the next chunk allocates its own
    if not arc and (need_sumz or need_b):  # "cos": s = 1/tau, so both come from the bank's column sum
        colsum = w.to(acc).sum(0) / tau
        sum_z = xh @ colsum if need_sumz else None
        b_sum = colsum.expand(n, d).clone() if need_b else None
    return xh, lse, sum_z, a_sum, b_sum


def run_cos_tiles(xs: torch.Tensor, w: torch.Tensor, tau: float, need_grad: bool, tile_rows: int,
                  tile_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``etfkern::spherical_cos_tiles_native`` (C++) when built, else :func:`cos_tiles`. Called directly, not
    through the router: it is an internal step of the CPU backend, never a backend choice of its own."""
    if _backend.has_native("spherical_cos_tiles", "cpu"):
        return torch.ops.etfkern.spherical_cos_tiles_native(xs, w, tau, need_grad, tile_rows, tile_classes)
    return cos_tiles(xs, w, tau, need_grad, tile_rows, tile_classes)


def cos_tiles(xs: torch.Tensor, w: torch.Tensor, tau: float, need_grad: bool, tile_rows: int, tile_classes: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch path of ``etfkern::spherical_cos_tiles`` ("cos" with a fixed shift of 0; the C++ kernel in
    csrc/spherical/cpu.cpp is preferred when built): z = xs @ w^T over (tile_rows x tile_classes) tiles written
    into one preallocated buffer; lse = log sum_c exp(z) and a_sum = sum_c exp(z) w_c / (l tau) accumulate in
    place (addmv_/addmm_). Returns (lse (N,), a_sum (N, d) or (0, d)) in the accumulation dtype.

    Device-agnostic: on CUDA (the Triton backend's ETFKERN_SPHERICAL_CLASS_LOOP=mm variant) 16-bit GEMMs write
    float32 outputs (``out_dtype``), so the logits are not rounded to 16 bits."""
    n, n_cls = xs.shape[0], w.shape[0]
    acc = acc_dtype(xs.dtype)
    dev = xs.device
    lse = torch.empty(n, dtype=acc, device=dev)
    a_sum = torch.empty(n if need_grad else 0, xs.shape[1], dtype=acc, device=dev)
    if n == 0:
        return lse, a_sum
    w = w.contiguous()
    same = xs.dtype == acc  # fp32/fp64: GEMMs write straight into the fp32/fp64 buffers
    wide = xs.is_cuda and not same  # 16-bit operands, float32 GEMM outputs

    def mm16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # 16-bit operands: float32 out on CUDA
        return torch.mm(a, b, out_dtype=acc) if wide else a @ b

    rows, k = max(1, min(tile_rows, n)), max(1, min(tile_classes, n_cls))
    buf = torch.empty(rows * k, dtype=acc, device=dev)
    ones = torch.ones(k, dtype=acc, device=dev)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        xr, l = xs[r0:r1], lse[r0:r1]
        a = a_sum[r0:r1] if need_grad else None
        for c0 in range(0, n_cls, k):
            c1 = min(n_cls, c0 + k)
            wt = w[c0:c1]
            e = buf[:(r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            if same:
                torch.mm(xr, wt.T, out=e)
            else:
                e.copy_(mm16(xr, wt.T))
            e.exp_()
            if c0 == 0:
                torch.mv(e, ones[:c1 - c0], out=l)  # GEMV: much faster than e.sum(1) on CPU
            else:
                l.addmv_(e, ones[:c1 - c0])
            if a is None:
                continue
            if not same:  # float16: exp(z) reaches e^40 and would overflow (65504) in a cast: float32 GEMM
                pw = e @ wt.to(acc) if xs.dtype == torch.float16 else mm16(e.to(xs.dtype), wt).to(acc)
                a.copy_(pw) if c0 == 0 else a.add_(pw)
            elif c0 == 0:
                torch.mm(e, wt, out=a)
            else:
                a.addmm_(e, wt)
        if a is not None:
            a.div_(l.unsqueeze(1) * tau)
        l.log_()
    return lse, a_sum


def _cpu_forward(x, bank, target, target_b, lam, tau, metric, eps, ignore_index, need_grad):
    n, d = x.shape
    if n == 0 or bank.shape[0] == 0:
        return _empty_results(x, need_grad)
    arc = metric == "arc"
    xh, lse, sum_z, a_sum, b_sum = _cpu_class_loop(x, bank, tau, metric, arc and eps > 0, need_grad,
                                                   need_grad and arc and eps > 0)
    loss, grad = finish_forward(xh, bank, target, target_b, lam, tau, metric, eps, ignore_index, lse, sum_z,
                                a_sum, b_sum)
    return loss, lse, grad if grad is not None else x.new_zeros(0, d, dtype=lse.dtype)


def partials_or_empty(x, lse, sum_z, a_sum, b_sum):
    """The spherical_ce_partials results with None replaced by the op's empty placeholders."""
    acc, d = lse.dtype, x.shape[1]
    return (lse, sum_z if sum_z is not None else x.new_zeros(0, dtype=acc),
            a_sum if a_sum is not None else x.new_zeros(0, d, dtype=acc),
            b_sum if b_sum is not None else x.new_zeros(0, d, dtype=acc))


def partials_from_class_loop(class_loop, x, bank, tau, metric, need_sumz, need_grad, need_b):
    """spherical_ce_partials from a backend's class loop (x, bank, ...) -> (x̂, lse, sum_z, a_sum, b_sum)."""
    if x.shape[0] == 0:
        return partials_or_empty(x, x.new_zeros(0, dtype=acc_dtype(x.dtype)), None, None, None)
    return partials_or_empty(x, *class_loop(x, bank, tau, metric, need_sumz, need_grad, need_b)[1:])


def _cpu_partials(x, bank, tau, metric, need_sumz, need_grad, need_b):
    return partials_from_class_loop(_cpu_class_loop, x, bank, tau, metric, need_sumz, need_grad, need_b)


def _cpu_bank_grad(x, bank, target, target_b, lam, grad_rows, lse, tau, metric, eps, ignore_index):
    n, d = x.shape
    acc = acc_dtype(bank.dtype)
    n_cls = bank.shape[0]
    dw = torch.zeros(n_cls, d, dtype=acc)
    if n == 0 or n_cls == 0:
        return dw
    mm = cpu_gemm_dtype(bank.dtype)
    xh = normalized(x, acc)
    w = bank.to(mm).contiguous()
    valid = target != ignore_index
    g = torch.where(valid, grad_rows.to(acc), torch.zeros((), dtype=acc))
    lam = lam.to(acc)
    ta = torch.where(valid, target, 0).long().unsqueeze(1)
    tb = torch.where(valid, target_b, 0).long().unsqueeze(1)
    step = chunk_rows(n_cls, n_rows=n)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        gc = g[r0:r1].unsqueeze(1)
        z, s = z_and_slope((xh[r0:r1].to(mm) @ w.T).to(acc), tau, metric)
        coef = z.sub_(lse[r0:r1].to(acc).unsqueeze(1)).exp_().sub_(eps / n_cls).mul_(gc)
        coef.scatter_add_(1, ta[r0:r1], -(1 - eps) * lam[r0:r1].unsqueeze(1) * gc)
        coef.scatter_add_(1, tb[r0:r1], -(1 - eps) * (1 - lam[r0:r1]).unsqueeze(1) * gc)
        coef = coef.mul_(s) if s is not None else coef.div_(tau)
        dw += (coef.T.to(mm) @ xh[r0:r1].to(mm)).to(acc)
        del coef, z, s
    return dw


def mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b in the accumulation dtype ``acc``: 16-bit operands on CUDA write float32 straight from cuBLAS
    (``out_dtype``, no 16-bit rounding of the result); elsewhere the operands are widened first."""
    if a.dtype == acc:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)


def chunked_nearest(x: torch.Tensor, bank: torch.Tensor, k: int, rows: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by cosine over row chunks (any device): extra memory O(chunk x C), never N x C. The torch path of
    ``etfkern::spherical_nearest`` (the C++ tile kernel in csrc/spherical/cpu.cpp is preferred when built), and the
    GPU "chunked" nearest (``rows`` per chunk from the GPU budget; cosines from float32-output GEMMs)."""
    n = x.shape[0]
    acc = acc_dtype(x.dtype)
    vals = x.new_empty(n, k, dtype=acc)
    idx = x.new_empty(n, k, dtype=torch.int64)
    if n == 0:
        return vals, idx
    w = bank.contiguous()
    xh = normalized(x, w.dtype)
    step = rows if rows is not None else chunk_rows(bank.shape[0], buffers=2, n_rows=n)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        cos = mm_acc(xh[r0:r1], w.T, acc) if xh.is_cuda else (xh[r0:r1] @ w.T).to(acc)  # CPU: as before
        v, i = cos.max(dim=1, keepdim=True) if k == 1 else torch.topk(cos, k, dim=1, largest=True, sorted=True)
        vals[r0:r1], idx[r0:r1] = v, i
    return vals, idx
