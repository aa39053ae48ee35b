"""torch.library schemas and fake kernels of the spherical family: fused spherical logits + cross-entropy, nearest().

Each op routes through :mod:`etfkern._core.backend` (registered at the bottom: reference, cpu = etfkern/spherical/
cpu.py or the C++ kernels, triton); see ``etfkern/spherical/reference.py`` for the math. Also the autograd of
spherical_ce_forward (normalize_backward, _ce_backward)."""
from __future__ import annotations

import torch

import os
import weakref

from etfkern._core import backend as _backend
from etfkern._core import dispatch as _dispatch
from etfkern._core.dtypes import acc_dtype
from etfkern._core.library import define
from etfkern.spherical import reference as _ref
from etfkern.spherical.cpu import (_cpu_bank_grad, _cpu_forward, _cpu_partials, _rowdot, chunked_nearest, class_tile,
                                   cos_tiles, finish_forward, fixed_shift, mm_acc, normalized,
                                   partials_from_class_loop)
from etfkern.spherical.reference import ARC_GRAD_EPS, NORM_EPS


def _spherical_ce_forward_fake(x, bank, target, target_b, lam, tau, metric, eps, ignore_index, need_grad):
    acc = acc_dtype(x.dtype)
    n, d = x.shape
    return (x.new_empty(n, dtype=acc), x.new_empty(n, dtype=acc), x.new_empty(n if need_grad else 0, d, dtype=acc))


def _spherical_ce_bank_grad_fake(x, bank, target, target_b, lam, grad_rows, lse, tau, metric, eps, ignore_index):
    return bank.new_empty(bank.shape, dtype=acc_dtype(bank.dtype))


def _spherical_nearest_fake(x, bank, k):
    return x.new_empty(x.shape[0], k, dtype=acc_dtype(x.dtype)), x.new_empty(x.shape[0], k, dtype=torch.int64)


# (loss_rows (N,), lse (N,), grad_xhat (N, d) | (0, d)); see etfkern/reference/spherical.py for the math.
spherical_ce_forward = define(
    "spherical_ce_forward",
    "(Tensor x, Tensor bank, Tensor target, Tensor target_b, Tensor lam, float tau, str metric, float eps, "
    "int ignore_index, bool need_grad) -> (Tensor, Tensor, Tensor)",
    _spherical_ce_forward_fake)
def _spherical_ce_partials_fake(x, bank, tau, metric, need_sumz, need_grad, need_b):
    acc = acc_dtype(x.dtype)
    n, d = x.shape
    return (x.new_empty(n, dtype=acc), x.new_empty(n if need_sumz else 0, dtype=acc),
            x.new_empty(n if need_grad else 0, d, dtype=acc), x.new_empty(n if need_b else 0, d, dtype=acc))


# Class-loop partials over a bank shard (lse, sum_c z, sum_c p s w, sum_c s w): the vocab-parallel building block.
spherical_ce_partials = define(
    "spherical_ce_partials",
    "(Tensor x, Tensor bank, float tau, str metric, bool need_sumz, bool need_grad, bool need_b) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    _spherical_ce_partials_fake)
# dW (C, d) = sum_i g_i (p_ic - t_ic) s_ic x̂_i, recomputing the probabilities from the saved lse.
spherical_ce_bank_grad = define(
    "spherical_ce_bank_grad",
    "(Tensor x, Tensor bank, Tensor target, Tensor target_b, Tensor lam, Tensor grad_rows, Tensor lse, float tau, "
    "str metric, float eps, int ignore_index) -> Tensor",
    _spherical_ce_bank_grad_fake)
# (top-k cosines (N, k), int64 indices (N, k)), sorted descending; no N x C buffer.
# C++: csrc/spherical/cpu.cpp (GEMM tiles + running top-k merge); torch fallback: spherical.chunked_nearest.
spherical_nearest = define("spherical_nearest", "(Tensor x, Tensor bank, int k) -> (Tensor, Tensor)",
                           _spherical_nearest_fake, native=True)


def _spherical_cos_tiles_fake(xs, bank, tau, need_grad, tile_rows, tile_classes):
    acc = acc_dtype(xs.dtype)
    n, d = xs.shape
    return xs.new_empty(n, dtype=acc), xs.new_empty(n if need_grad else 0, d, dtype=acc)


# CPU-internal: the "cos" fixed-shift class loop over (tile_rows x tile_classes) tiles of z = xs @ bank^T
# (xs = x̂ / tau): (lse (N,), sum_c exp(z) w_c / (tau sum_c exp(z)) (N, d) | (0, d)). C++: csrc/spherical/cpu.cpp.
spherical_cos_tiles = define(
    "spherical_cos_tiles",
    "(Tensor xs, Tensor bank, float tau, bool need_grad, int tile_rows, int tile_classes) -> (Tensor, Tensor)",
    _spherical_cos_tiles_fake, native=True)


# ----------------------------------------------------------------------------------------------------------
# Triton backend (GPU, or CPU tensors under TRITON_INTERPRET=1): variant choice, launches, finishing
# ----------------------------------------------------------------------------------------------------------
# Variants of the class loop (one env var; the dispatch table picks on CUDA when it is unset):
#   fused    the Triton class-loop kernel (_ce_fwd_kernel / _ce_dw_kernel): logits never in memory
#   mm       tiles of torch GEMMs + torch elementwise (cos_tiles): "cos" with the fixed shift only, x-gradient only
#   chunked  rows in chunks (memory budget): per chunk one cuBLAS GEMM writes the cosines, ONE Triton pass
#            (_chunk_ce_kernel) turns them into lse, loss and dlogits in place (one read of each row for "cos"
#            with the fixed shift, two otherwise), and GEMMs give the x̂-gradient (dlogits @ W) here and dW
#            (dlogits^T @ x̂ g) in the bank-gradient op (not fused into the forward: the op contract returns
#            grad_xhat only, and dW needs the upstream row weights). Every metric and option. Never ran on a GPU.
CLASS_LOOP_ENV = "ETFKERN_SPHERICAL_CLASS_LOOP"
CLASS_LOOP_VARIANTS = ("fused", "mm", "chunked")
NEAREST_ENV = "ETFKERN_SPHERICAL_NEAREST"
NEAREST_VARIANTS = ("fused", "chunked")
CHUNK_MIN_MIB = 64  # "chunked": the least logits-chunk budget (GEMMs of a few hundred rows at C = 131072)
CHUNK_ENV = "ETFKERN_SPHERICAL_CHUNK_MIB"  # "chunked": the logits chunk's budget in MiB (tests force small chunks)
MM_TILE_MIB = 32  # "mm" on a GPU: one float32 logits tile (+ its 16-bit copy: 48 MiB)
MM_TILE_ROWS = 8192  # rows per tile: 8192 x 1024 x d GEMMs, wide enough for cuBLAS at d >= 1024
MAX_FUSED_K = 64  # nearest(): larger k runs the chunked torch top-k on the device


def _tk():
    from etfkern.triton_kernels import spherical as tk  # imported on first use: triton only when it runs

    return tk


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda and not _tk().triton_interpret()


def _variant(env: str, choices: tuple[str, ...], op: str, x: torch.Tensor, bank: torch.Tensor, **features) -> str:
    """env ``env`` when set (ValueError when not one of ``choices``), else on a GPU the dispatch table's pick for
    ``op`` (etfkern/_core/dispatch.py: measured rows only), else choices' "fused"."""
    if os.environ.get(env, "").strip():
        return _backend.kernel_variant(env, choices)
    if not _on_gpu(x):
        return "fused"
    return _dispatch.choose_variant(op, dtype=_dispatch.dtype_name(x.dtype), d=x.shape[1], C=bank.shape[0],
                                    N=x.shape[0], **features)[0]


def class_loop_variant(x: torch.Tensor, bank: torch.Tensor, metric: str, need_grad: bool,
                       bank_grad: bool = False) -> str:
    """fused | mm | chunked for this problem: env ETFKERN_SPHERICAL_CLASS_LOOP, else the dispatch table on a GPU."""
    return _variant(CLASS_LOOP_ENV, CLASS_LOOP_VARIANTS, "spherical_class_loop", x, bank, metric=metric,
                    need_grad=need_grad, bank_grad=bank_grad)


def nearest_variant(x: torch.Tensor, bank: torch.Tensor, k: int) -> str:
    """fused | chunked for nearest(): env ETFKERN_SPHERICAL_NEAREST, else the dispatch table on a GPU
    (k > MAX_FUSED_K always runs "chunked")."""
    if k > MAX_FUSED_K:
        return "chunked"
    return _variant(NEAREST_ENV, NEAREST_VARIANTS, "spherical_nearest", x, bank, k=k)


_SHIFTS: dict[int, tuple] = {}


def cached_shift(bank: torch.Tensor, tau: float, metric: str) -> float | None:
    """fixed_shift(), cached per bank tensor object and its version counter: for "cos" the bound needs max |w_c|
    (one host sync), so a frozen bank pays it once, a trained one once per update."""
    if metric != "cos":
        return fixed_shift(bank, tau, metric)
    key = id(bank)
    stamp = (bank._version, float(tau), bank.data_ptr(), tuple(bank.shape), bank.stride())
    hit = _SHIFTS.get(key)
    if hit is not None and hit[0]() is bank and hit[1] == stamp:
        return hit[2]
    # fixed_shift() needs only the row norms: hand it those as a (C, 1) "bank" (same bound), which avoids
    # its full-size float32 copy of a bf16 bank (4 GiB at C = 262144, d = 4096)
    norms = torch.linalg.vector_norm(bank.detach(), dim=1, dtype=acc_dtype(bank.dtype))
    value = fixed_shift(norms.unsqueeze(1), tau, metric)
    _SHIFTS[key] = (weakref.ref(bank, lambda _ref, k=key: _SHIFTS.pop(k, None)), stamp, value)
    return value


def _triton_class_loop(x, bank, tau, metric, need_sumz, need_grad, need_b, variant="fused"):
    """The class loop on the Triton backend: (x̂ in acc dtype, lse, sum_z | None, a_sum | None, b_sum | None).

    "mm" ("cos", fixed shift, no sum_z / B only; otherwise "fused"): tiles of GEMMs (cos_tiles). "fused": the
    kernel, whose S > 1 class slabs (raw partials m_s, l_s, sum_z_s, A_s, B_s) are combined here over s in a fixed
    order: lse = M + log(sum_s e^(m_s - M) l_s), A = sum_s e^(m_s - M) A_s / (l tau) ("cos", or "arc" with
    tau-free slopes) or / l ("arc"). Extra memory (S - 1) x (n x d) per accumulator.
    """
    tk = _tk()
    n, d = x.shape
    n_cls = bank.shape[0]
    acc = acc_dtype(x.dtype)
    xh_acc = normalized(x, acc)
    xh = xh_acc.to(bank.dtype)
    if xh.dtype != acc:
        # 16-bit bank: the kernel's cosines (lse, p, "arc" slopes) come from the rounded x̂, so finish_forward's
        # target terms must too, or lse - z_t and a_sum - s_t w_t mix two cosines (fp16 "arc": x-gradient errors
        # up to ~3x plain torch's; the slope is steep near |cos| = 1)
        xh_acc = xh.to(acc)
    shift = cached_shift(bank, tau, metric)
    if variant == "mm" and metric == "cos" and shift is not None and not need_sumz and not need_b:
        # "cos", fixed shift: tiles of cuBLAS GEMMs (logits of one tile in memory, never N x C), see cos_tiles
        if _on_gpu(x):  # wide GEMMs: all rows (up to MM_TILE_ROWS) against a class slab within MM_TILE_MIB
            rows = max(1, min(n, MM_TILE_ROWS))
            k = max(256, (MM_TILE_MIB << 20) // (4 * rows))
        else:  # the interpreter's tests: the CPU path's tiles
            rows, k = class_tile(n, n_cls, dim=d)
        lse, a_sum = cos_tiles((xh_acc / tau).to(bank.dtype), bank, float(tau), need_grad, rows, k)
        return xh_acc, lse, None, a_sum if need_grad else None, None
    if need_grad and bank.dtype == torch.float16:
        # P @ W takes p (times the "arc" slope) cast to float16: with the fixed shift, "cos" p = exp(z) reaches e^40
        # and overflows (65504); "arc" p = exp(z) with z in [-pi/tau, 0] falls to e^-45, far below float16's
        # normal range (6e-5): the rows' p underflow to subnormals/zero and a_sum loses all accuracy. The online
        # max keeps every row's largest p at 1.
        shift = None
    parts = tk.class_loop(xh, bank, tau, metric, shift, ARC_GRAD_EPS, need_sumz, need_grad, need_b, acc)
    tau_free = tk.tau_free(metric, bank.dtype)
    if parts.b is not None and tau_free:  # the kernel's B is sum_c tau s_c w_c
        parts.b.mul_(1.0 / tau)
    if parts.s == 1:
        return (xh_acc, parts.m, parts.sum_z, parts.a[0] if need_grad else None,
                parts.b[0] if need_b else None)
    s = parts.s
    m = parts.m.view(s, n)
    top = m.amax(0)
    weight = torch.exp(m - top)  # 0 for an empty slab of the online-max path (m = -inf)
    total = (weight * parts.l.view(s, n)).sum(0)
    a_sum = None
    if need_grad:
        per_tau = metric != "arc" or tau_free
        a_sum = (parts.a * weight.unsqueeze(2)).sum(0) / (total * (tau if per_tau else 1.0)).unsqueeze(1)
    return (xh_acc, top + total.log(), parts.sum_z.view(s, n).sum(0) if need_sumz else None, a_sum,
            parts.b.sum(0) if need_b else None)


def _targets(target, target_b, ignore_index):
    """(valid (N,) bool, int64 targets with -1 on ignored rows, same for target_b), contiguous."""
    valid = target != ignore_index
    return (valid, torch.where(valid, target, -1).long().contiguous(),
            torch.where(valid, target_b, -1).long().contiguous())


def chunk_rows_gpu(n: int, n_cls: int, d: int, itemsize: int) -> int:
    """Rows per chunk of the "chunked" variant. The whole op's extra memory stays within
    max(256 MiB, 1/16 of the N x C float32 logits): the chunk's (rows x C) logits in the GEMM dtype get that budget
    less the (N, d) x̂ copies and the (rows, d) float32 GEMM result; env ETFKERN_SPHERICAL_CHUNK_MIB sets the
    chunk's budget directly (tests). Rows are a multiple of 128 when more than 128 fit (whole GEMM tiles). The chunk
    keeps at least CHUNK_MIN_MIB: where the (N, d) float32 x̂-gradient the op returns alone passes the budget
    (N = 16384, d = 4096: 256 MiB), one-row GEMMs would be the price of holding it."""
    forced = os.environ.get(CHUNK_ENV, "").strip()
    if forced:
        budget = int(float(forced) * 2**20)
    else:
        budget = max(CHUNK_MIN_MIB << 20, max(256 << 20, n * n_cls * 4 // 16) - n * d * (itemsize + 4))
    rows = max(1, budget // max(1, n_cls * itemsize + d * 4))
    if rows > 128:
        rows -= rows % 128
    return max(1, min(n, rows))


def _cosine_chunks(xh: torch.Tensor, bank: torch.Tensor):
    """Yield (r0, r1, z): z = x̂[r0:r1] @ bank^T (rows x C) in the GEMM operand dtype, written by one GEMM into one
    buffer reused by every chunk (rows from chunk_rows_gpu); the caller may overwrite z before the next chunk."""
    n, d = xh.shape
    n_cls = bank.shape[0]
    step = chunk_rows_gpu(n, n_cls, d, bank.element_size())
    buf = xh.new_empty(step * n_cls, dtype=bank.dtype)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        z = buf[:(r1 - r0) * n_cls].view(r1 - r0, n_cls)
        torch.mm(xh[r0:r1], bank.T, out=z)
        yield r0, r1, z


def _chunked_forward(x, bank, target, target_b, lam, tau, metric, eps, ignore_index, need_grad):
    """The "chunked" variant of spherical_ce_forward (see CLASS_LOOP_VARIANTS). Logits in the GEMM operand dtype:
    16-bit for 16-bit inputs (half the traffic of the passes over a chunk, twice the rows per budget; eager
    torch rounds its logits to 16 bits as well), float32/64 otherwise. "cos" with the fixed shift (not float16:
    exp(z) up to e^40 is past its range) reads each chunk row once: the pass leaves exp(z) in the chunk, the GEMM
    gives sum_c exp(z) w_c, and finish_forward adds the target terms (the fused kernel's split of the gradient)."""
    tk = _tk()
    n, d = x.shape
    acc = acc_dtype(x.dtype)
    xh = normalized(x, bank.dtype)
    _, ta, tb = _targets(target, target_b, ignore_index)
    lam = lam.to(acc).contiguous()
    lse = x.new_empty(n, dtype=acc)
    loss = x.new_empty(n, dtype=acc)
    grad = x.new_empty(n if need_grad else 0, d, dtype=acc)
    one_pass = metric == "cos" and bank.dtype != torch.float16 and cached_shift(bank, tau, metric) == 0.0
    colsum = bank.sum(0, dtype=acc) / tau if one_pass and need_grad and eps > 0 else None
    for r0, r1, z in _cosine_chunks(xh, bank):
        tk.chunk_ce_rows(z, ta[r0:r1], tb[r0:r1], lam[r0:r1], lse[r0:r1], loss[r0:r1], tau, metric, eps,
                         ARC_GRAD_EPS, need_grad, False, one_pass)
        if not need_grad:
            continue
        g = grad[r0:r1]
        g.copy_(mm_acc(z, bank, acc))  # z holds tau * dlogits, or exp(z) (one_pass)
        if not one_pass:
            g.mul_(1.0 / tau)
            continue
        # g = sum_c p_c w_c / tau; the target terms as for the fused kernel's a_sum, on this chunk's rows only
        # (chunk-sized temporaries: the gathered target rows)
        g.div_(lse[r0:r1].exp().mul_(tau).unsqueeze(1))
        t_a = target[r0:r1]
        finish_forward(xh[r0:r1].to(acc), bank, t_a, t_a if target_b is target else target_b[r0:r1], lam[r0:r1],
                       tau, metric, eps, ignore_index, lse[r0:r1], None, g, None, colsum)
    return loss, lse, grad


def _chunked_bank_grad(x, bank, target, target_b, lam, grad_rows, lse, tau, metric, eps, ignore_index):
    """The "chunked" variant of spherical_ce_bank_grad: per chunk the cosine GEMM, the Triton pass with the saved
    lse (dlogits in place) and dW += dlogits^T @ (x̂ g), deterministic (fixed chunk order, no atomics)."""
    tk = _tk()
    acc = acc_dtype(bank.dtype)
    dw = bank.new_zeros(bank.shape, dtype=acc)
    xh_acc = normalized(x, acc)
    xh = xh_acc.to(bank.dtype)
    valid, ta, tb = _targets(target, target_b, ignore_index)
    g = torch.where(valid, grad_rows.to(acc), torch.zeros((), dtype=acc, device=x.device))
    post = torch.full((), 1.0 / tau, dtype=acc, device=x.device)
    if bank.element_size() < 4:  # rows x̂ g / max|g| in 16 bits (g = 1/N under "mean" would underflow float16)
        gmax = g.abs().amax().clamp_min(torch.finfo(acc).tiny)
        g = g / gmax
        post = post * gmax
    xg = (xh_acc * g.unsqueeze(1)).to(bank.dtype)
    lam = lam.to(acc).contiguous()
    lse = lse.to(acc).contiguous()
    for r0, r1, z in _cosine_chunks(xh, bank):
        tk.chunk_ce_rows(z, ta[r0:r1], tb[r0:r1], lam[r0:r1], lse[r0:r1], None, tau, metric, eps, ARC_GRAD_EPS,
                         True, True)
        if z.dtype == acc:
            dw.addmm_(z.T, xg[r0:r1])
        else:
            dw.add_(mm_acc(z.T, xg[r0:r1], acc))
    return dw.mul_(post)


def triton_forward(x, bank, target, target_b, lam, tau, metric, eps, ignore_index, need_grad):
    n, d = x.shape
    acc = acc_dtype(x.dtype)
    if n == 0:
        return (x.new_zeros(0, dtype=acc), x.new_zeros(0, dtype=acc), x.new_zeros(0, d, dtype=acc))
    variant = class_loop_variant(x, bank, metric, need_grad)
    if variant == "chunked":
        return _chunked_forward(x, bank, target, target_b, lam, tau, metric, eps, ignore_index, need_grad)
    arc = metric == "arc"
    xh_acc, lse, sum_z, a_sum, b_sum = _triton_class_loop(x, bank, tau, metric, arc and eps > 0, need_grad,
                                                          need_grad and arc and eps > 0, variant)
    loss, grad = finish_forward(xh_acc, bank, target, target_b, lam, tau, metric, eps, ignore_index, lse, sum_z,
                                a_sum, b_sum)
    return loss, lse, grad if grad is not None else x.new_zeros(0, d, dtype=acc)


def triton_partials(x, bank, tau, metric, need_sumz, need_grad, need_b):
    # the vocab-parallel partials come from the class loop ("chunked" has no partials form: "fused" runs then)
    variant = class_loop_variant(x, bank, metric, need_grad)
    variant = "fused" if variant == "chunked" else variant
    return partials_from_class_loop(lambda *a: _triton_class_loop(*a, variant=variant), x, bank, tau, metric,
                                    need_sumz, need_grad, need_b)


def triton_bank_grad(x, bank, target, target_b, lam, grad_rows, lse, tau, metric, eps, ignore_index):
    n, d = x.shape
    n_cls = bank.shape[0]
    acc = acc_dtype(bank.dtype)
    if n == 0:
        return bank.new_zeros(n_cls, d, dtype=acc)
    if class_loop_variant(x, bank, metric, True, bank_grad=True) == "chunked":
        return _chunked_bank_grad(x, bank, target, target_b, lam, grad_rows, lse, tau, metric, eps, ignore_index)
    tk = _tk()
    xh = normalized(x, bank.dtype)
    valid, ta, tb = _targets(target, target_b, ignore_index)
    g = torch.where(valid, grad_rows.to(acc), torch.zeros((), dtype=acc, device=x.device)).contiguous()
    lam = lam.to(acc)
    wa = (g * (1 - eps) * lam).contiguous()
    wb = (g * (1 - eps) * (1 - lam)).contiguous()
    part = tk.bank_grad_parts(xh, bank, lse.to(acc).contiguous(), g, ta, tb, wa, wb, tau, metric, ARC_GRAD_EPS,
                              eps / n_cls, acc)
    dw = part[0] if part.shape[0] == 1 else part.sum(0)  # fixed order over the splits: deterministic
    return dw.mul_(1.0 / tau) if tk.tau_free(metric, bank.dtype) else dw  # tau-free coefficients (see tau_free)


def triton_nearest(x, bank, k):
    n, d = x.shape
    if nearest_variant(x, bank, k) == "chunked":
        rows = chunk_rows_gpu(n, bank.shape[0], d, 4) if _on_gpu(x) else None
        return chunked_nearest(x, bank, k, rows)
    acc = acc_dtype(x.dtype)
    if n == 0:
        return x.new_empty(0, k, dtype=acc), x.new_empty(0, k, dtype=torch.int64)
    vals, idx = _tk().nearest_parts(normalized(x, bank.dtype), bank, k, acc)
    s = vals.shape[0]
    if s == 1:
        return vals[0], idx[0]
    # merge the per-slab sorted lists: a stable sort keeps slab order on ties, so the lower class index wins
    # (as in the unsplit kernel); empty slab entries are -inf and k <= C real candidates always exist
    vals = vals.transpose(0, 1).reshape(n, s * k)
    idx = idx.transpose(0, 1).reshape(n, s * k)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
    return vals.gather(1, order), idx.gather(1, order)


for _op, _ref_fn, _cpu_fn, _triton_fn in (
        ("spherical_ce_forward", _ref.spherical_ce_forward, _cpu_forward, triton_forward),
        ("spherical_ce_partials", _ref.spherical_ce_partials, _cpu_partials, triton_partials),
        ("spherical_ce_bank_grad", _ref.spherical_ce_bank_grad, _cpu_bank_grad, triton_bank_grad),
        ("spherical_nearest", _ref.spherical_nearest, chunked_nearest, triton_nearest)):
    _backend.register(_op, "reference", _ref_fn)
    _backend.register(_op, "cpu", _cpu_fn)
    _backend.register(_op, "triton", _triton_fn)
_backend.register("spherical_cos_tiles", "cpu", cos_tiles)  # CPU-internal; _cpu_class_loop calls run_cos_tiles


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------
def normalize_backward(x: torch.Tensor, grad_xhat: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """d/dx of x / max(|x|, NORM_EPS) applied to grad_xhat: (g - x̂ (x̂.g)) / |x| (g / NORM_EPS below eps).

    Formed as (g - x (x.g) / |x|^2) / |x| with one in-place update: no (N, d) temporaries besides the result
    (``inplace=True`` reuses grad_xhat's buffer for it, for callers that own it)."""
    g = grad_xhat if inplace else grad_xhat.clone()
    xf = x.to(g.dtype)
    norm = xf.norm(dim=1, keepdim=True)
    denom = norm.clamp_min(NORM_EPS)
    coef = torch.where(norm > NORM_EPS, _rowdot(xf, g).unsqueeze(1) / (denom * denom), torch.zeros_like(norm))
    return g.addcmul_(xf, coef, value=-1.0).div_(denom)


def _ce_setup_context(ctx, inputs, output):
    x, bank, target, target_b, lam, tau, metric, eps, ignore_index, need_grad = inputs
    _, lse, grad_xhat = output
    ctx.save_for_backward(x, bank, target, target_b, lam, lse, grad_xhat)
    ctx.hyper = (tau, metric, eps, ignore_index)
    ctx.mark_non_differentiable(lse, grad_xhat)


def _ce_backward(ctx, g_loss, g_lse, g_grad):
    x, bank, target, target_b, lam, lse, grad_xhat = ctx.saved_tensors
    tau, metric, eps, ignore_index = ctx.hyper
    if g_loss is None:
        g_loss = lse.new_zeros(lse.shape)
    dx = dbank = None
    if ctx.needs_input_grad[0]:
        if grad_xhat.shape[0] != x.shape[0]:  # op called with need_grad=False: recompute (one more pass)
            grad_xhat = spherical_ce_forward(x.detach(), bank.detach(), target, target_b, lam, tau, metric,
                                                  eps, ignore_index, True)[2]
        dxh = g_loss.to(grad_xhat.dtype).unsqueeze(1) * grad_xhat
        dx = normalize_backward(x, dxh, inplace=True).to(x.dtype)
    if ctx.needs_input_grad[1]:
        dbank = spherical_ce_bank_grad(x, bank, target, target_b, lam, g_loss, lse, tau, metric, eps,
                                            ignore_index).to(bank.dtype)
    return dx, dbank, None, None, None, None, None, None, None, None


torch.library.register_autograd("etfkern::spherical_ce_forward", _ce_backward, setup_context=_ce_setup_context)
