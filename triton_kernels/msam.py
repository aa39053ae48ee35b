"""Triton multi-tensor kernels for Momentum-SAM: two variants.

``ops`` (the etfkern::msam_sq_norm / msam_sgd_step / msam_adamw_step ops' Triton backend, measured on the H200 in
bench/results/h200-2026-12-04, the default): one launch per run of consecutive tensors sharing dtype and
hyperparameters (normally one per param group), kernel tables of base addresses (int64) plus a block table
(tensor index, start offset) so each program handles BLOCK elements of one tensor; per-program partials summed by
torch in a fixed order. Address tables cached per (addresses, sizes), block tables per sizes.

``plan`` (:class:`StepPlan`, the optimizer's ``step_impl="plan"`` / ``ETFKERN_MSAM_STEP=plan``; never run on a GPU
yet): one launch per pass over every tensor of one parameter dtype (a "segment"; normally there is one) whatever
the param groups: per-tensor hyperparameters in a float64 device table (``HYP_COLS`` columns per tensor), partials
(float64) summed in a fixed order by a one-program finish kernel that also computes the next scale and commits the
step on the device. Tables, partial buffers and views of the device scalars are built once per parameter set;
each step only compares gradient addresses and hyperparameters with what the tables hold (rewriting a table in
place, from pinned memory, when they changed). A steady-state step allocates nothing and launches: exact mode norm
pass + finish + update pass + finish, lagged mode update pass + finish. The device scalars (applied scale, lagged
squared norm, step count, next scale, squared norm) are one buffer ``G``, so a step can be captured in a CUDA graph.

Device scalars are read through pointers in both: nothing is read back to the host.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import acc_dtype, acc_dtype_of

BLOCK = 1024
FINISH_BLOCK = 1024
_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
       torch.float16: tl.float16}

# hyperparameter table columns (float64, one row per tensor)
HAS_GRAD, NORM_MU, NORM_C, NORM_WD, LR, MU_B1, WD, NESTEROV_B2, EPS = range(9)
HYP_COLS = 9
# device scalar buffer G
G_SCALE, G_LAGGED_SQ, G_STEP, G_SCALE_NEXT, G_SQ = range(5)
G_SIZE = 5
# finish modes
EXACT, LAGGED, LAGGED_UNCONFIRMED = 0, 1, 2


# =========================================================================================================
# the per-run kernels (measured on the H200, bench/results/h200-2026-12-04): the etfkern ops' Triton backend
# =========================================================================================================
_CACHE: dict[tuple, Tensor] = {}


# ---------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _block(blk_t, blk_o, numels, BLOCK: tl.constexpr):
    """This program's tensor index, element offsets and bounds mask."""
    pid = tl.program_id(0)
    t = tl.load(blk_t + pid)
    offs = tl.load(blk_o + pid) + tl.arange(0, BLOCK).to(tl.int64)
    return t, offs, offs < tl.load(numels + t)


@triton.jit
def _load_grad(g_tab, t, offs, mask, gs_ptr, HAS_GS: tl.constexpr, PT: tl.constexpr, T: tl.constexpr):
    g_ptr = tl.load(g_tab + t).to(tl.pointer_type(PT))
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(T)
    if HAS_GS:
        g = g / tl.load(gs_ptr).to(T)
    return g


@triton.jit
def _load_state(tab, t, offs, mask, DT: tl.constexpr):
    """Pointer and values of the tensor whose address is tab[t] (element type DT)."""
    ptr = tl.load(tab + t).to(tl.pointer_type(DT))
    return ptr, tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _sq_norm_kernel(p_tab, g_tab, v_tab, blk_t, blk_o, numels, partial, scale_ptr, gs_ptr, hyp,
                    HAS_GS: tl.constexpr, USE_WD: tl.constexpr, PT: tl.constexpr, T: tl.constexpr,
                    BLOCK: tl.constexpr):
    mu, c, wd = tl.load(hyp), tl.load(hyp + 1), tl.load(hyp + 2)
    t, offs, mask = _block(blk_t, blk_o, numels, BLOCK)
    g = _load_grad(g_tab, t, offs, mask, gs_ptr, HAS_GS, PT, T)
    v_ptr, v = _load_state(v_tab, t, offs, mask, T)
    d = c.to(T) * g
    if USE_WD:
        p_ptr = tl.load(p_tab + t).to(tl.pointer_type(PT))
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(T)
        d = d + wd.to(T) * (p + tl.load(scale_ptr).to(T) * v)
    vn = mu.to(T) * v + d
    vn = tl.where(mask, vn, 0.0)
    tl.store(partial + tl.program_id(0), tl.sum(vn * vn, axis=0))


@triton.jit
def _sgd_kernel(p_tab, g_tab, v_tab, blk_t, blk_o, numels, partial, so_ptr, sn_ptr, gs_ptr, fi_ptr, hyp,
                HAS_GS: tl.constexpr, HAS_FI: tl.constexpr, USE_WD: tl.constexpr,
                NESTEROV: tl.constexpr, PT: tl.constexpr, T: tl.constexpr, BLOCK: tl.constexpr):
    lr, mu, wd = tl.load(hyp), tl.load(hyp + 1), tl.load(hyp + 2)
    t, offs, mask = _block(blk_t, blk_o, numels, BLOCK)
    p_ptr, p_raw = _load_state(p_tab, t, offs, mask, PT)
    g = _load_grad(g_tab, t, offs, mask, gs_ptr, HAS_GS, PT, T)
    v_ptr, v = _load_state(v_tab, t, offs, mask, T)
    x = p_raw.to(T) + tl.load(so_ptr).to(T) * v
    if USE_WD:
        d = g + wd.to(T) * x
    else:
        d = g
    vn = mu.to(T) * v + d
    if NESTEROV:
        u = d + mu.to(T) * vn
    else:
        u = vn
    x = x - lr.to(T) * u
    pn = x - tl.load(sn_ptr).to(T) * vn
    write = mask
    if HAS_FI:
        keep = tl.load(fi_ptr) == 0
        # a select, not `mask & keep`: the interpreter cannot AND a block mask with a 0-dim loaded bool
        write = tl.where(keep, mask, False)
        vn = tl.where(keep, vn, v)
    tl.store(p_ptr + offs, pn.to(PT), mask=write)
    tl.store(v_ptr + offs, vn, mask=write)
    vn = tl.where(mask, vn, 0.0)
    tl.store(partial + tl.program_id(0), tl.sum(vn * vn, axis=0))


@triton.jit
def _adamw_kernel(p_tab, g_tab, m_tab, q_tab, blk_t, blk_o, numels, partial, so_ptr, sn_ptr, gs_ptr, fi_ptr,
                  step_size_ptr, bc2_sqrt_ptr, hyp,
                  HAS_GS: tl.constexpr, HAS_FI: tl.constexpr, PT: tl.constexpr, T: tl.constexpr,
                  BLOCK: tl.constexpr):
    b1, b2, c1, c2 = tl.load(hyp), tl.load(hyp + 1), tl.load(hyp + 2), tl.load(hyp + 3)
    eps, decay = tl.load(hyp + 4), tl.load(hyp + 5)
    t, offs, mask = _block(blk_t, blk_o, numels, BLOCK)
    p_ptr, p_raw = _load_state(p_tab, t, offs, mask, PT)
    g = _load_grad(g_tab, t, offs, mask, gs_ptr, HAS_GS, PT, T)
    m_ptr, m = _load_state(m_tab, t, offs, mask, T)
    q_ptr, q = _load_state(q_tab, t, offs, mask, T)
    x = p_raw.to(T) + tl.load(so_ptr).to(T) * m
    x = x * decay.to(T)
    mn = b1.to(T) * m + c1.to(T) * g
    qn = b2.to(T) * q + c2.to(T) * (g * g)
    if T == tl.float64:
        root = tl.sqrt(qn)  # IEEE for fp64
    else:
        root = tl.sqrt_rn(qn)  # tl.sqrt is the approximate instruction for fp32
    denom = root / tl.load(bc2_sqrt_ptr).to(T) + eps.to(T)
    x = x - tl.load(step_size_ptr).to(T) * (mn / denom)
    pn = x - tl.load(sn_ptr).to(T) * mn
    write = mask
    if HAS_FI:
        keep = tl.load(fi_ptr) == 0
        # a select, not `mask & keep`: the interpreter cannot AND a block mask with a 0-dim loaded bool
        write = tl.where(keep, mask, False)
        mn = tl.where(keep, mn, m)
    tl.store(p_ptr + offs, pn.to(PT), mask=write)
    tl.store(m_ptr + offs, mn, mask=write)
    tl.store(q_ptr + offs, qn, mask=write)
    mn = tl.where(mask, mn, 0.0)
    tl.store(partial + tl.program_id(0), tl.sum(mn * mn, axis=0))


# ---------------------------------------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------------------------------------
def _to_device(values: list[int], device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def _hyper(values: list[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    # Triton passes Python floats as fp32; a tiny device tensor keeps fp64 hyperparameters exact.
    host = torch.tensor([float(v) for v in values], dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def _cached(key: tuple, build) -> Tensor:
    t = _CACHE.get(key)
    if t is None:
        if len(_CACHE) > 256:
            _CACHE.clear()
        t = _CACHE[key] = build()
    return t


def _addr_table(ts: Sequence[Tensor], device: torch.device) -> Tensor:
    ptrs = [t.data_ptr() for t in ts]
    return _cached(("addr", device, tuple(ptrs)), lambda: _to_device(ptrs, device))


def _block_tables(ts: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor, Tensor, int]:
    sizes = tuple(t.numel() for t in ts)
    blk_t = _cached(("blk_t", device, sizes), lambda: _to_device(
        [i for i, n in enumerate(sizes) for _ in range(0, n, BLOCK)], device, torch.int32))
    blk_o = _cached(("blk_o", device, sizes), lambda: _to_device(
        [o for n in sizes for o in range(0, n, BLOCK)], device))
    numels = _cached(("numel", device, sizes), lambda: _to_device(list(sizes), device))
    return blk_t, blk_o, numels, int(blk_t.numel())


def _runs(params: Sequence[Tensor], *hyper: Sequence) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive tensors with the same dtype and hyperparameters (non-empty ones)."""
    runs: list[tuple[int, int]] = []
    key_prev = None
    for i, p in enumerate(params):
        key = (p.dtype,) + tuple(h[i] for h in hyper)
        if runs and key == key_prev:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
        key_prev = key
    return runs


def _state_dtype(p: Tensor) -> torch.dtype:
    return acc_dtype(p.dtype)


def _check(op: str, params, grads, states) -> None:
    for i, p in enumerate(params):
        if p.dtype not in _TL:
            raise ValueError(f"{op}: params[{i}] must be float64/float32/bfloat16/float16, got {p.dtype}")
        if grads[i].dtype != p.dtype or grads[i].shape != p.shape:
            raise ValueError(f"{op}: grads[{i}] must match params[{i}] ({p.dtype}, {tuple(p.shape)})")
        if not p.is_contiguous():
            raise ValueError(f"{op}: params[{i}] must be contiguous")
        for s in states:
            if s[i].dtype != _state_dtype(p) or s[i].shape != p.shape or not s[i].is_contiguous():
                raise ValueError(f"{op}: state[{i}] must be a contiguous {_state_dtype(p)} tensor shaped like "
                                 f"params[{i}] {tuple(p.shape)}")


_out_dtype = acc_dtype_of  # the norm's dtype: float64 when any buffer is float64


def _scalar(t: Tensor | None, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device=device, dtype=dtype).reshape(1)


def _launch_runs(lists: list[Sequence[Tensor]], hyper: list[Sequence], device: torch.device, launch) -> Tensor:
    """For each run of tensors sharing dtype and hyperparameters: launch(a, T, grid, head) where head is the
    kernel's leading arguments (address tables of every list, block tables, partials); returns the float64
    sum of all partials (0-dim)."""
    params = lists[0]
    parts = [torch.zeros(1, dtype=torch.float64, device=device)]
    for a, b in _runs(params, *hyper):
        T = _state_dtype(params[a])
        blk_t, blk_o, numels, nblk = _block_tables(params[a:b], device)
        if nblk == 0:
            continue
        partial = torch.empty(nblk, dtype=T, device=device)
        addrs = [_addr_table(ts[a:b], device) for ts in lists]
        launch(a, T, (nblk,), [*addrs, blk_t, blk_o, numels, partial])
        parts.append(partial.double().sum().reshape(1))
    return torch.cat(parts).sum()


def _or(t: Tensor | None, dummy: Tensor) -> Tensor:
    return dummy if t is None else t  # a valid pointer for an argument the kernel will not read


# ---------------------------------------------------------------------------------------------------------
# launchers (same arguments as the etfkern ops)
# ---------------------------------------------------------------------------------------------------------
def msam_sq_norm(params, grads, bufs, scale, momentum, grad_coef, weight_decay, grad_scale) -> Tensor:
    _check("msam_sq_norm", params, grads, [bufs])
    device = scale.device

    def launch(a, T, grid, head):
        gs = _scalar(grad_scale, T, device)
        _sq_norm_kernel[grid](*head, _scalar(scale, T, device), _or(gs, head[-1]),
                              _hyper([momentum[a], grad_coef[a], weight_decay[a]], T, device), HAS_GS=gs is not None,
                              USE_WD=weight_decay[a] != 0.0, PT=_TL[params[a].dtype], T=_TL[T], BLOCK=BLOCK)

    total = _launch_runs([params, [g.contiguous() for g in grads], bufs], [momentum, grad_coef, weight_decay],
                         device, launch)
    return total.to(_out_dtype(bufs))


def msam_sgd_step(params, grads, bufs, scale_old, scale_new, lr, momentum, weight_decay, nesterov, grad_scale,
                  found_inf) -> Tensor:
    _check("msam_sgd_step", params, grads, [bufs])
    device = scale_old.device
    fi = _scalar(found_inf, torch.float32, device)

    def launch(a, T, grid, head):
        gs = _scalar(grad_scale, T, device)
        _sgd_kernel[grid](*head, _scalar(scale_old, T, device), _scalar(scale_new, T, device), _or(gs, head[-1]),
                          _or(fi, head[-1]), _hyper([lr[a], momentum[a], weight_decay[a]], T, device),
                          HAS_GS=gs is not None, HAS_FI=fi is not None, USE_WD=weight_decay[a] != 0.0,
                          NESTEROV=bool(nesterov[a]), PT=_TL[params[a].dtype], T=_TL[T], BLOCK=BLOCK)

    total = _launch_runs([params, [g.contiguous() for g in grads], bufs], [lr, momentum, weight_decay, nesterov],
                         device, launch)
    return total.to(_out_dtype(bufs))


def msam_adamw_step(params, grads, exp_avgs, exp_avg_sqs, scale_old, scale_new, step, lr, beta1, beta2, eps,
                    weight_decay, grad_scale, found_inf) -> Tensor:
    _check("msam_adamw_step", params, grads, [exp_avgs, exp_avg_sqs])
    device = scale_old.device
    fi = _scalar(found_inf, torch.float32, device)
    t = step.to(device=device, dtype=torch.float64).reshape(1)

    def launch(a, T, grid, head):
        gs = _scalar(grad_scale, T, device)
        step_size = (lr[a] / (1.0 - torch.pow(beta1[a], t))).to(T)  # bias corrections on device: no host sync
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2[a], t)).to(T)
        coef = [beta1[a], beta2[a], 1.0 - beta1[a], 1.0 - beta2[a], eps[a], 1.0 - lr[a] * weight_decay[a]]
        _adamw_kernel[grid](*head, _scalar(scale_old, T, device), _scalar(scale_new, T, device), _or(gs, head[-1]),
                            _or(fi, head[-1]), step_size, bc2_sqrt, _hyper(coef, T, device), HAS_GS=gs is not None,
                            HAS_FI=fi is not None, PT=_TL[params[a].dtype], T=_TL[T], BLOCK=BLOCK)

    total = _launch_runs([params, [g.contiguous() for g in grads], exp_avgs, exp_avg_sqs],
                         [lr, beta1, beta2, eps, weight_decay], device, launch)
    return total.to(_out_dtype(exp_avgs))


# =========================================================================================================
# the StepPlan kernels (reachable with step_impl="plan" / ETFKERN_MSAM_STEP=plan: never run on a GPU yet)
# =========================================================================================================
# ---------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _plan_block(blk_t, blk_o, numels, hyp, BLOCK: tl.constexpr):
    """This program's tensor index, its hyperparameter row, element offsets and bounds mask."""
    pid = tl.program_id(0)
    t = tl.load(blk_t + pid).to(tl.int64)
    offs = tl.load(blk_o + pid) + tl.arange(0, BLOCK).to(tl.int64)
    return t, hyp + t * 9, offs, offs < tl.load(numels + t)


@triton.jit
def _plan_select(flag, mask):
    # a select, not `mask & flag`: the interpreter cannot AND a block mask with a 0-dim loaded bool
    return tl.where(flag, mask, False)


@triton.jit
def _plan_load(tab, t, offs, mask, DT: tl.constexpr):
    """Pointer and values (0 outside ``mask``) of the tensor whose address is tab[t] (element type DT)."""
    ptr = tl.load(tab + t).to(tl.pointer_type(DT))
    return ptr, tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _plan_grad(g_tab, t, offs, mask, gs_ptr, HAS_GS: tl.constexpr, PT: tl.constexpr, T: tl.constexpr):
    g_ptr, g = _plan_load(g_tab, t, offs, mask, PT)
    g = g.to(T)
    if HAS_GS:
        g = g / tl.load(gs_ptr).to(T)
    return g


@triton.jit
def _plan_sqrt(x, F64: tl.constexpr):
    if F64:
        return tl.sqrt(x)  # IEEE for fp64
    else:
        return tl.sqrt_rn(x)  # tl.sqrt is the approximate instruction for fp32


@triton.jit
def _plan_lagged_scale(lag_ptr, rho_ptr, F64: tl.constexpr):
    """rho / (sqrt(lagged_sq) + eps), 0 while lagged_sq is 0, in the dtype of the device scalars."""
    lag = tl.load(lag_ptr)
    rho = tl.load(rho_ptr).to(lag.dtype)
    return tl.where(lag > 0, rho / (_plan_sqrt(lag, F64) + 1e-12), 0.0)


@triton.jit
def _plan_next_scale(sn_ptr, rho_ptr, SN_FROM_LAG: tl.constexpr, F64: tl.constexpr, T: tl.constexpr):
    """The scale to perturb with: at sn_ptr, or (SN_FROM_LAG) computed from the lagged squared norm there."""
    if SN_FROM_LAG:
        return _plan_lagged_scale(sn_ptr, rho_ptr, F64).to(T)
    return tl.load(sn_ptr).to(T)


@triton.jit
def _plan_unless_found_inf(fi_ptr, mask, new, old, HAS_FI: tl.constexpr):
    """(store mask, state to report): nothing is written and the old state counts when found_inf != 0."""
    if HAS_FI:
        keep = tl.load(fi_ptr) == 0
        return _plan_select(keep, mask), tl.where(keep, new, old)
    return mask, new


@triton.jit
def _plan_store_sq(partial, x, mask):
    x = tl.where(mask, x, 0.0)
    tl.store(partial + tl.program_id(0), tl.sum(x * x, axis=0).to(tl.float64))


@triton.jit
def _plan_sq_norm_kernel(p_tab, g_tab, v_tab, blk_t, blk_o, numels, hyp, partial, scale_ptr, gs_ptr,
                    HAS_GS: tl.constexpr, PT: tl.constexpr, T: tl.constexpr, BLOCK: tl.constexpr):
    """partial[pid] = ||mu v + c g + wd (p + s v)||^2 over this block (||v||^2 for a tensor without gradient)."""
    t, row, offs, mask = _plan_block(blk_t, blk_o, numels, hyp, BLOCK)
    has = tl.load(row + 0) != 0
    mu, c, wd = tl.load(row + 1).to(T), tl.load(row + 2).to(T), tl.load(row + 3).to(T)
    g = _plan_grad(g_tab, t, offs, _plan_select(has, mask), gs_ptr, HAS_GS, PT, T)
    v_ptr, v = _plan_load(v_tab, t, offs, mask, T)
    p_ptr, p = _plan_load(p_tab, t, offs, _plan_select(wd != 0, mask), PT)  # p is read only with weight decay
    d = c * g
    d = tl.where(wd != 0, d + wd * (p.to(T) + tl.load(scale_ptr).to(T) * v), d)
    _plan_store_sq(partial, tl.where(has, mu * v + d, v), mask)


@triton.jit
def _plan_sgd_kernel(p_tab, g_tab, v_tab, blk_t, blk_o, numels, hyp, partial, so_ptr, sn_ptr, rho_ptr, gs_ptr,
                     fi_ptr, HAS_GS: tl.constexpr, HAS_FI: tl.constexpr, SN_FROM_LAG: tl.constexpr,
                     F64: tl.constexpr, PT: tl.constexpr, T: tl.constexpr, BLOCK: tl.constexpr):
    """Undo + SGD-momentum update + perturb, in place; partial[pid] = ||v'||^2 over this block. With
    SN_FROM_LAG the next scale is computed here from the lagged squared norm at ``sn_ptr``."""
    t, row, offs, mask = _plan_block(blk_t, blk_o, numels, hyp, BLOCK)
    has = tl.load(row + 0) != 0
    lr, mu, wd = tl.load(row + 4).to(T), tl.load(row + 5).to(T), tl.load(row + 6).to(T)
    nesterov = tl.load(row + 7) != 0
    p_ptr, p_raw = _plan_load(p_tab, t, offs, mask, PT)
    g = _plan_grad(g_tab, t, offs, _plan_select(has, mask), gs_ptr, HAS_GS, PT, T)
    v_ptr, v = _plan_load(v_tab, t, offs, mask, T)
    sn = _plan_next_scale(sn_ptr, rho_ptr, SN_FROM_LAG, F64, T)
    x = p_raw.to(T) + tl.load(so_ptr).to(T) * v
    d = tl.where(wd != 0, g + wd * x, g)
    vn = mu * v + d
    u = tl.where(nesterov, d + mu * vn, vn)
    vn = tl.where(has, vn, v)  # no gradient: v kept, only the perturbation is re-scaled
    x = tl.where(has, x - lr * u, x)
    pn = x - sn * vn
    write, vn = _plan_unless_found_inf(fi_ptr, mask, vn, v, HAS_FI)
    tl.store(p_ptr + offs, pn.to(PT), mask=write)
    tl.store(v_ptr + offs, vn, mask=write)
    _plan_store_sq(partial, vn, mask)


@triton.jit
def _plan_adamw_kernel(p_tab, g_tab, m_tab, q_tab, blk_t, blk_o, numels, hyp, partial, so_ptr, sn_ptr, rho_ptr,
                       gs_ptr, fi_ptr, step_ptr, STEP_OFFSET: tl.constexpr, HAS_GS: tl.constexpr,
                       HAS_FI: tl.constexpr, SN_FROM_LAG: tl.constexpr, F64: tl.constexpr, PT: tl.constexpr,
                       T: tl.constexpr, BLOCK: tl.constexpr):
    """Undo + AdamW update (bias correction at step count load(step_ptr) + STEP_OFFSET) + perturb along -m'."""
    t, row, offs, mask = _plan_block(blk_t, blk_o, numels, hyp, BLOCK)
    has = tl.load(row + 0) != 0
    lr64, b1_64, wd64 = tl.load(row + 4), tl.load(row + 5), tl.load(row + 6)
    b2_64, eps = tl.load(row + 7), tl.load(row + 8).to(T)
    # bias corrections in float64 on the device (b^t = 2^(t log2 b)): no host read of the step count
    steps = tl.load(step_ptr).to(tl.float64) + STEP_OFFSET
    step_size = (lr64 / (1.0 - tl.exp2(steps * tl.log2(b1_64)))).to(T)
    bc2_sqrt = tl.sqrt(1.0 - tl.exp2(steps * tl.log2(b2_64))).to(T)
    decay = (1.0 - lr64 * wd64).to(T)
    b1, b2, c1, c2 = b1_64.to(T), b2_64.to(T), (1.0 - b1_64).to(T), (1.0 - b2_64).to(T)
    p_ptr, p_raw = _plan_load(p_tab, t, offs, mask, PT)
    g = _plan_grad(g_tab, t, offs, _plan_select(has, mask), gs_ptr, HAS_GS, PT, T)
    m_ptr, m = _plan_load(m_tab, t, offs, mask, T)
    q_ptr, q = _plan_load(q_tab, t, offs, mask, T)
    sn = _plan_next_scale(sn_ptr, rho_ptr, SN_FROM_LAG, F64, T)
    x = p_raw.to(T) + tl.load(so_ptr).to(T) * m
    mn = b1 * m + c1 * g
    qn = b2 * q + c2 * (g * g)
    denom = _plan_sqrt(qn, T == tl.float64) / bc2_sqrt + eps
    upd = x * decay
    upd = upd - step_size * (mn / denom)
    x = tl.where(has, upd, x)  # no gradient: moments kept, only the perturbation is re-scaled
    mn = tl.where(has, mn, m)
    qn = tl.where(has, qn, q)
    pn = x - sn * mn
    write, mn = _plan_unless_found_inf(fi_ptr, mask, mn, m, HAS_FI)
    tl.store(p_ptr + offs, pn.to(PT), mask=write)
    tl.store(m_ptr + offs, mn, mask=write)
    tl.store(q_ptr + offs, qn, mask=write)
    _plan_store_sq(partial, mn, mask)


@triton.jit
def _plan_sum_partials(partial, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial + offs, mask=offs < n, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _finish_norm_kernel(partial, n, G, rho_ptr, MODE: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    """G[sq] = sum(partial); G[scale_next] = rho / (sqrt(sq) + eps) (MODE 2, lagged before any step was taken:
    the lagged scale once a step was taken)."""
    sq = _plan_sum_partials(partial, n, BLOCK).to(G.dtype.element_ty)
    rho = tl.load(rho_ptr).to(sq.dtype)
    s = rho / (_plan_sqrt(sq, F64) + 1e-12)
    if MODE == 2:
        s = tl.where(tl.load(G + 2) > 0, _plan_lagged_scale(G + 1, rho_ptr, F64), s)
    tl.store(G + 3, s)
    tl.store(G + 4, sq)


@triton.jit
def _finish_step_kernel(partial, n, G, rho_ptr, fi_ptr, MODE: tl.constexpr, HAS_FI: tl.constexpr,
                        F64: tl.constexpr, BLOCK: tl.constexpr):
    """Commit the step: G[scale] = scale applied, G[lagged_sq] = ||v'||^2, G[step] += 1 (all kept when found_inf).
    MODE 0 exact (norm from the norm pass), 1 lagged (scale from the old lagged_sq), 2 lagged before any step."""
    if MODE == 0:
        new_sq = tl.load(G + 4)
        s = tl.load(G + 3)
    else:
        new_sq = _plan_sum_partials(partial, n, BLOCK).to(G.dtype.element_ty)
        if MODE == 1:
            s = _plan_lagged_scale(G + 1, rho_ptr, F64)
        else:
            s = tl.load(G + 3)
    old_s, old_sq, step = tl.load(G + 0), tl.load(G + 1), tl.load(G + 2)
    if HAS_FI:
        keep = tl.load(fi_ptr) == 0
        s = tl.where(keep, s, old_s)
        new_sq = tl.where(keep, new_sq, old_sq)
        step = tl.where(keep, step + 1, step)
    else:
        step = step + 1
    tl.store(G + 0, s)
    tl.store(G + 1, new_sq)
    tl.store(G + 2, step)


# ---------------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------------
def _to_device_as(values, dtype: torch.dtype, device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def _write(dst: Tensor, values, dtype: torch.dtype) -> None:
    """Rewrite a device table in place (its address stays: a captured graph keeps reading it)."""
    host = torch.tensor(values, dtype=dtype).reshape(dst.shape)
    if dst.device.type == "cuda":
        host = host.pin_memory()  # the caching host allocator keeps it alive until the copy is done
    dst.copy_(host, non_blocking=True)


class _Segment:
    """The tensors of one parameter dtype: address, block and hyperparameter tables and a slice of partials."""

    def __init__(self, index: list[int], lists: list[list[Tensor]], grads: list[Tensor], rows: list[tuple],
                 partials: Tensor, start: int, device: torch.device) -> None:
        self.index = index
        first = lists[0][index[0]]
        self.PT, self.T = _TL[first.dtype], _TL[_state_dtype(first)]
        sizes = [lists[0][i].numel() for i in index]
        self.tabs = [_to_device_as([lst[i].data_ptr() for i in index], torch.int64, device) for lst in lists]
        self.grad_ptrs = tuple(grads[i].data_ptr() for i in index)
        self.g_tab = _to_device_as(list(self.grad_ptrs), torch.int64, device)
        self.blk_t = _to_device_as([k for k, n in enumerate(sizes) for _ in range(0, n, BLOCK)], torch.int32, device)
        self.blk_o = _to_device_as([o for n in sizes for o in range(0, n, BLOCK)], torch.int64, device)
        self.numels = _to_device_as(sizes, torch.int64, device)
        self.nblk = int(self.blk_t.numel())
        self.rows = tuple(rows[i] for i in index)
        self.hyp = _to_device_as([list(r) for r in self.rows] or [[0.0] * HYP_COLS], torch.float64, device)
        self.partial = partials[start:start + max(self.nblk, 1)]


class StepPlan:
    """Launch tables for one list of tensors (see the module docstring); ``kind`` is "sgd" or "adamw".

    params, states: lists of tensors (states: [v] or [m, q], contiguous, fp32/fp64 as the params' state dtype);
    grads: per tensor the gradient, or the parameter itself for a tensor without gradient this step (never read);
    rows: per tensor a HYP_COLS tuple (see the column names); G: the float32/float64 device scalars (G_SIZE).
    """

    def __init__(self, kind: str, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[Sequence[Tensor]],
                 rows: Sequence[tuple], G: Tensor) -> None:
        if kind not in ("sgd", "adamw"):
            raise ValueError(f"kind must be 'sgd' or 'adamw', got {kind!r}")
        self.kind, self.G, self.device = kind, G, G.device
        self.F64 = G.dtype == torch.float64
        lists = [list(params)] + [list(s) for s in states]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        nblk = [sum((params[i].numel() + BLOCK - 1) // BLOCK for i in idx) for idx in by_dtype.values()]
        self.partials = torch.zeros(max(sum(max(n, 1) for n in nblk), 1), dtype=torch.float64, device=self.device)
        self.norm_partials = torch.zeros_like(self.partials)
        self.segments, start = [], 0
        for idx, n in zip(by_dtype.values(), nblk):
            self.segments.append(_Segment(idx, lists, list(grads), list(rows), self.partials, start, self.device))
            start += max(n, 1)
        self.norm_views = [self.norm_partials[s.partial.storage_offset():s.partial.storage_offset() + s.partial.numel()]
                           for s in self.segments]
        self.rho = _to_device_as([0.0], torch.float64, self.device)
        self.rho_value: float | None = None
        self.views = {k: G[k:k + 1] for k in range(G_SIZE)}

    # ---- keeping the tables current ------------------------------------------------------------------------
    def refresh(self, grads: Sequence[Tensor], rows: Sequence[tuple], rho: float) -> None:
        """Rewrite (in place) the tables whose content changed: gradient addresses, hyperparameters, rho."""
        for seg in self.segments:
            ptrs = tuple(grads[i].data_ptr() for i in seg.index)
            if ptrs != seg.grad_ptrs:
                _write(seg.g_tab, list(ptrs), torch.int64)
                seg.grad_ptrs = ptrs
            seg_rows = tuple(rows[i] for i in seg.index)
            if seg_rows != seg.rows:
                _write(seg.hyp, [list(r) for r in seg_rows], torch.float64)
                seg.rows = seg_rows
        if rho != self.rho_value:
            _write(self.rho, [float(rho)], torch.float64)
            self.rho_value = rho

    # ---- one step -------------------------------------------------------------------------------------------
    def step(self, mode: int, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """Launch one step. mode: EXACT, LAGGED or LAGGED_UNCONFIRMED (lagged while no step is known to be
        taken: the norm pass runs and the finish picks the exact scale when the step count is 0).
        grad_scale / found_inf: one-element device tensors (float32 for found_inf) or None."""
        v = self.views
        has_gs, has_fi = grad_scale is not None, found_inf is not None
        dummy = self.rho  # a valid pointer for an argument the kernel will not read
        gs = dummy if grad_scale is None else grad_scale  # read in its own dtype, converted in the kernel
        fi = dummy if found_inf is None else found_inf
        if mode != LAGGED:
            for seg, norm_partial in zip(self.segments, self.norm_views):
                if seg.nblk == 0:
                    continue
                _plan_sq_norm_kernel[(seg.nblk,)](seg.tabs[0], seg.g_tab, seg.tabs[1], seg.blk_t, seg.blk_o, seg.numels,
                                             seg.hyp, norm_partial, v[G_SCALE], gs, HAS_GS=has_gs, PT=seg.PT,
                                             T=seg.T, BLOCK=BLOCK)
            _finish_norm_kernel[(1,)](self.norm_partials, self.norm_partials.numel(), self.G, self.rho,
                                      MODE=mode, F64=self.F64, BLOCK=FINISH_BLOCK)
        sn = v[G_LAGGED_SQ] if mode == LAGGED else v[G_SCALE_NEXT]
        for seg in self.segments:
            if seg.nblk == 0:
                continue
            common = dict(HAS_GS=has_gs, HAS_FI=has_fi, SN_FROM_LAG=mode == LAGGED, F64=self.F64, PT=seg.PT,
                          T=seg.T, BLOCK=BLOCK)
            if self.kind == "sgd":
                _plan_sgd_kernel[(seg.nblk,)](seg.tabs[0], seg.g_tab, seg.tabs[1], seg.blk_t, seg.blk_o, seg.numels,
                                         seg.hyp, seg.partial, v[G_SCALE], sn, self.rho, gs, fi, **common)
            else:
                _plan_adamw_kernel[(seg.nblk,)](seg.tabs[0], seg.g_tab, seg.tabs[1], seg.tabs[2], seg.blk_t, seg.blk_o,
                                           seg.numels, seg.hyp, seg.partial, v[G_SCALE], sn, self.rho, gs, fi,
                                           v[G_STEP], STEP_OFFSET=1, **common)
        _finish_step_kernel[(1,)](self.partials, self.partials.numel(), self.G, self.rho, fi, MODE=mode,
                                  HAS_FI=has_fi, F64=self.F64, BLOCK=FINISH_BLOCK)
