"""Triton multi-tensor kernels for Momentum-SAM (etfkern::msam_sq_norm, msam_sgd_step, msam_adamw_step).

One launch per pass covers a whole run of tensors: the launcher groups consecutive tensors that share the
parameter dtype and hyperparameters (in practice one run per param group), and hands the kernel tables of
base addresses (int64) plus a block table (tensor index, start offset) so each program handles BLOCK
elements of one tensor. Per-program squared-norm partials go to a buffer summed in a fixed order
(deterministic). Scalars that live on the device (applied scale, next scale, grad_scale, found_inf, bias
corrections) are passed as pointers: nothing is read back to the host. Address tables are cached per
(addresses, sizes); block tables per sizes. On CUDA the tables are copied from pinned memory asynchronously.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024
_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
       torch.float16: tl.float16}
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
    return torch.float64 if p.dtype == torch.float64 else torch.float32


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


def _out_dtype(bufs: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(b.dtype == torch.float64 for b in bufs) else torch.float32


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
