"""Spherical logits, fused spherical cross-entropy and fused top-k nearest against a fixed bank of vectors: the
public functions and their argument checks.

Layers (one family, one file per layer; arrows run one way):
  this file                              public functions, validation, (..., d) flattening, learnable tau
  etfkern/spherical/ops.py               schemas + fake kernels, autograd of the ops, backend registration, the
                                         Triton op layer
  etfkern/spherical/cpu.py               the CPU path (C++ tile kernels when built, else chunked torch)
  etfkern/spherical/reference.py         float64 oracle (materialises N x C; tests only / last resort)
  etfkern.triton_kernels.spherical       GPU kernels (N x C logits never stored)

Math (see the reference for the definitions): with s_ic = dz_ic/dcos_ic, the x̂-gradient of row i is
g_i * G_i with G_i = sum_c p_ic s_ic w_c - sum_c t_ic s_ic w_c, formed in the forward's class pass, so the
backward for x is O(N d). Both metrics have z = f(cos)/tau, so dz/dtau = -z/tau and a learnable tau gets
dloss_i/dtau = -(1/tau) sum_c (p_ic - t_ic) z_ic: x̂_i . G_i for "cos" (s = 1/tau; no extra pass), one more class
pass for "arc" (:func:`expected_arc_logit`). The ops take tau as a float: a tensor tau is read on the host.

Shapes: x (..., d) and targets (...) are flattened to rows here (a view when the strides allow); results take the
leading shape back.

Host syncs: on CPU tensors the labels, lam, x, bank and the tau bound are checked eagerly (ValueError). On CUDA
tensors (and under torch.compile) the same checks run on the device with ``torch._assert_async`` (no host sync; a
failure surfaces at the next synchronising point as a device-side assert, as torch's own cross_entropy does)
unless ``validate=True`` (eager ValueError, one host sync) or ``validate=False`` (no checks). The bank's checks
(finite; its largest row norm for the tau bound) run once per bank version: see :func:`clear_bank_check_cache`.
"""
from __future__ import annotations

import math
import warnings
import weakref

import torch
import torch.nn.functional as F

from etfkern.spherical import ops as _ops
from etfkern.spherical.reference import ARC_GRAD_EPS, METRICS, NORM_EPS, acc_dtype
from etfkern.spherical.cpu import (_rowdot, chunk_rows, chunked_nearest, class_tile,  # noqa: F401 (re-exported)
                                   cos_tiles, finish_forward, fixed_shift, normalized, run_cos_tiles, z_and_slope)
from etfkern.spherical.ops import normalize_backward  # noqa: F401 (re-exported)

__all__ = ["spherical_logits", "spherical_cross_entropy", "nearest", "spherical_ce_rows", "chunk_rows",
           "clear_bank_check_cache", "tau_lower_bound", "HIGHER_ORDER_MESSAGE"]

REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------
HIGHER_ORDER_MESSAGE = (
    "etfkern's fused spherical cross-entropy has first-order gradients only: higher-order gradients "
    "(create_graph=True, double backward, gradgradcheck, torch.func.hessian) are not supported. For those, "
    "materialise the logits with etfkern.spherical_logits and use torch.nn.functional.cross_entropy.")
# Headroom of the tau bound: the loss (lse - target logit) and the gradients reach about twice the largest logit
# magnitude, and their sums over a row twice that again.
_TAU_HEADROOM = 4.0


def _check_x_bank(x, bank) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (N, d) tensor, got {_desc(x)}")
    if not isinstance(bank, torch.Tensor) or bank.dim() != 2 or not bank.is_floating_point():
        raise ValueError(f"bank must be a floating (C, d) tensor, got {_desc(bank)}")
    if bank.shape[1] != x.shape[1]:
        raise ValueError(f"bank must have shape (C, d) with d = x.shape[-1] = {x.shape[1]}, got {tuple(bank.shape)}")
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


def _as_rows(x, name: str = "x") -> torch.Tensor:
    """x (..., d) as (N, d) rows, N = prod(x.shape[:-1]): a view when the layout allows, else a copy (the gradient
    flows back either way)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating (..., d) tensor ((N, d), or (B, T, d) as a language model's "
                         f"hidden states), got {_desc(x)}")
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _check_metric(metric) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _tau_value(tau, device: torch.device | None = None) -> tuple[float, torch.Tensor | None]:
    """(tau as a Python float, the tensor itself when tau is a tensor). The ops take a float tau, so a tensor tau
    is read on the host once per call (on CUDA that read is one device sync)."""
    tensor = None
    if isinstance(tau, torch.Tensor):
        if tau.dim() != 0 or not tau.is_floating_point():
            raise ValueError(f"tau must be a finite number > 0 or a 0-dim floating tensor, got {_desc(tau)}")
        if device is not None and tau.device != device and tau.device.type != "cpu":
            raise ValueError(f"tau is on {tau.device} but x is on {device} (a 0-dim tau may also live on the CPU)")
        tensor, value = tau, float(tau.detach())
    elif isinstance(tau, (int, float)) and not isinstance(tau, bool):
        value = float(tau)
    else:
        raise ValueError(f"tau must be a finite number > 0 or a 0-dim floating tensor, got {tau!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {value!r}")
    return value, tensor


def _check_tau_metric(tau, metric) -> float:
    """Check tau (a number or a 0-dim floating tensor) and metric; return tau as a float."""
    value = _tau_value(tau)[0]
    _check_metric(metric)
    return value


def _check_labels(name: str, t, lead: tuple, device) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(lead) or t.is_floating_point() or t.is_complex() \
            or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape {tuple(lead)} (x.shape[:-1]), got {_desc(t)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _sequence_inputs(x, target, target_b, lam):
    """Check target / target_b / lam against x's leading shape (...) and flatten everything to rows.

    Returns (x (N, d), target (N,), target_b (N,) or None, lam (N,) / () / number / None, leading shape). A
    target_b that IS target stays the same object (the ops then skip the second gather)."""
    rows = _as_rows(x)
    lead = tuple(x.shape[:-1])
    _check_labels("target", target, lead, x.device)
    if target_b is not None and target_b is not target:
        _check_labels("target_b", target_b, lead, x.device)
    flat = target if target.dim() == 1 else target.reshape(-1)
    flat_b = None if target_b is None else flat if target_b is target else \
        target_b if target_b.dim() == 1 else target_b.reshape(-1)
    if isinstance(lam, torch.Tensor) and lam.dim() > 0:
        if tuple(lam.shape) != lead:
            raise ValueError(f"lam must be None, a float in [0, 1] or a floating tensor of shape () or {lead} "
                             f"(x.shape[:-1]), got {_desc(lam)}")
        lam = lam.reshape(-1)
    return rows, flat, flat_b, lam, lead


# A data check: (() -> 0-dim bool tensor that must be True, message (or () -> message), optional callback run once
# it is enforced). Lazy, so validate=False costs nothing.
DataCheck = tuple  # (Callable[[], torch.Tensor], str | Callable[[], str], Callable[[], None] | None)
# Banks that passed the finiteness check: id(bank) -> (weakref, _version, data_ptr, shape, stride). The key sees
# writes through the tensor (in place ops, indexing, .copy_()) but NOT writes through .data, .numpy() or another
# tensor sharing the storage; validate=True or clear_bank_check_cache() forces the check.
_FINITE_BANKS: dict[int, tuple] = {}
_BANK_NORMS: dict[int, tuple] = {}  # id(bank) -> (weakref, key, max_c |w_c| as a 0-dim tensor): the tau bound


def clear_bank_check_cache() -> None:
    """Forget which banks passed the finiteness check (and their cached row norms), so that the next call checks
    every bank again. Needed after writing a bank through ``.data``, ``.numpy()`` or another tensor that shares
    its storage: such writes do not move the bank's version counter, which is what the cache is keyed on.
    ``validate=True`` on a call re-checks the bank regardless of the cache."""
    _FINITE_BANKS.clear()
    _BANK_NORMS.clear()


def _bank_key(bank: torch.Tensor) -> tuple:
    return (bank._version, bank.data_ptr(), tuple(bank.shape), bank.stride())


def _remember(cache: dict, bank: torch.Tensor, *value) -> None:
    if len(cache) >= 64:  # a few banks in use in practice: drop the oldest entry
        cache.pop(next(iter(cache)))
    cache[id(bank)] = (weakref.ref(bank), _bank_key(bank)) + value


def _cached(cache: dict, bank: torch.Tensor) -> tuple | None:
    seen = cache.get(id(bank))
    if seen is not None and seen[0]() is bank and seen[1] == _bank_key(bank):
        return seen[2:]
    return None


def _finite_check(t: torch.Tensor, name: str) -> DataCheck:
    return (lambda: torch.isfinite(t).all(), f"{name} must be finite (found NaN or inf)", None)


def _bank_finite_checks(bank: torch.Tensor, name: str = "bank", recheck: bool = False) -> list[DataCheck]:
    """The bank's finiteness check, or none when this very tensor passed it before and has not been written since
    (same object, ``_version`` counter, storage and layout). The op reads a fixed bank once per call; a second
    full read per call for the check would double the traffic of a small-batch call. ``recheck`` (validate=True)
    ignores the cache. Traced every time under torch.compile (device assert)."""
    if torch.compiler.is_compiling():
        return [_finite_check(bank, name)]
    if recheck:  # forget what is known: a failing re-check must not leave the bank marked as checked
        _FINITE_BANKS.pop(id(bank), None)
        _BANK_NORMS.pop(id(bank), None)
    elif _cached(_FINITE_BANKS, bank) is not None:
        return []
    def passed() -> None:
        _remember(_FINITE_BANKS, bank)
        _warn_if_not_unit(bank, name)

    return [(lambda: torch.isfinite(bank).all(), f"{name} must be finite (found NaN or inf)", passed)]


UNIT_ROW_ATOL = 1e-3  # a fixed bank whose row norms differ from 1 by more than this gets one warning
_WARNED_NOT_UNIT: dict[int, weakref.ref] = {}


def _warn_if_not_unit(bank: torch.Tensor, name: str) -> None:
    """Warn once per bank when a fixed CPU bank's rows are not unit vectors (the ops use rows as given, so the
    logits become |w_c| cos / tau: a randn bank is almost always a mistake). Not checked for a trainable bank
    (its rows drift off the sphere legitimately) nor on CUDA (the check would cost a host sync per bank
    version; ``etfkern.banks.check_unit_bank`` checks any bank explicitly)."""
    if bank.requires_grad or bank.device.type != "cpu" or bank.numel() == 0:
        return
    seen = _WARNED_NOT_UNIT.get(id(bank))
    if seen is not None and seen() is bank:
        return
    err = float((torch.linalg.vector_norm(bank.detach(), dim=1, dtype=acc_dtype(bank.dtype)) - 1).abs().max())
    if err > UNIT_ROW_ATOL:
        if len(_WARNED_NOT_UNIT) >= 64:
            _WARNED_NOT_UNIT.pop(next(iter(_WARNED_NOT_UNIT)))
        _WARNED_NOT_UNIT[id(bank)] = weakref.ref(bank)
        warnings.warn(f"etfkern: {name} rows are not unit vectors (max | |w_c| - 1 | = {err:.3g}); the ops use rows "
                      f"as given, so the logits are |w_c| cos / tau. Normalise with "
                      f"torch.nn.functional.normalize({name}, dim=1) if that is not intended "
                      f"(etfkern.banks.check_unit_bank checks a bank). Warned once per bank.", UserWarning,
                      stacklevel=4)


def _max_row_norm(bank: torch.Tensor, recheck: bool = False) -> torch.Tensor:
    """max_c |w_c| as a 0-dim float32/64 tensor on the bank's device, once per bank version (as the finiteness
    check; ``recheck`` ignores the cache)."""
    if not torch.compiler.is_compiling() and not recheck:
        seen = _cached(_BANK_NORMS, bank)
        if seen is not None:
            return seen[0]
    norm = torch.linalg.vector_norm(bank.detach(), dim=1, dtype=acc_dtype(bank.dtype)).amax()
    if not torch.compiler.is_compiling():
        _remember(_BANK_NORMS, bank, norm)
    return norm


def tau_lower_bound(max_row_norm: float, metric: str, dtype: torch.dtype, grad_tau: bool = False) -> float:
    """The smallest tau whose logits, loss and gradients are representable in ``dtype`` (the compute dtype:
    float32 for 16/32-bit inputs, float64 for float64) for a bank with max_c |w_c| = ``max_row_norm``.

    |z| <= R / tau ("cos", R = max_c |w_c|) or pi / tau ("arc"); the x-gradient carries slopes up to R / tau ("cos")
    or R / (tau sqrt(ARC_GRAD_EPS)) = 1000 R / tau ("arc"). All of them, times a headroom of 4 (the loss and the
    gradient reach twice the largest logit, their row sums twice that), must stay <= finfo(dtype).max. A learnable
    tau (``grad_tau``) adds dloss/dtau = -(1/tau) sum_c (p - t) z, up to 2 |z|max / tau."""
    fmax = torch.finfo(dtype).max
    logit = max_row_norm if metric == "cos" else math.pi
    slope = max_row_norm * (1.0 if metric == "cos" else 1.0 / math.sqrt(ARC_GRAD_EPS))
    bound = _TAU_HEADROOM * max(logit, slope) / fmax
    if grad_tau:
        bound = max(bound, math.sqrt(_TAU_HEADROOM * logit / fmax))
    return bound


def _tau_checks(bank: torch.Tensor, tau: float, metric: str, dtype: torch.dtype, grad_tau: bool,
                recheck: bool = False) -> list[DataCheck]:
    """tau >= tau_lower_bound(max_c |w_c|, ...): the bank-independent part ("arc": |z| <= pi / tau) is checked on
    the host at once; the part that needs the bank's largest row norm is a lazy data check (device assert on CUDA,
    skipped by validate=False) on the norm cached per bank version."""
    fmax = torch.finfo(dtype).max
    if metric == "arc" and tau < tau_lower_bound(0.0, metric, dtype, grad_tau):
        raise ValueError(f"tau={tau!r} is too small for {dtype} logits: need tau >= "
                         f"{tau_lower_bound(0.0, metric, dtype, grad_tau):.3g} (metric='arc' logits reach pi/tau; "
                         f"with a headroom of {_TAU_HEADROOM:g} they must stay below finfo({dtype}).max = {fmax:.3g})")
    slope = 1.0 if metric == "cos" else 1.0 / math.sqrt(ARC_GRAD_EPS)
    # R <= r_max  <=>  tau >= tau_lower_bound(R, ...)
    r_max = tau * fmax / (_TAU_HEADROOM * slope)
    if grad_tau and metric == "cos":
        r_max = min(r_max, tau * tau * fmax / _TAU_HEADROOM)

    reach = "logits reach max_c |w_c|/tau" if metric == "cos" else "gradient slopes reach 1000 max_c |w_c|/tau"

    def message() -> str:
        r = float(_max_row_norm(bank))
        return (f"tau={tau!r} is too small for {dtype} logits with this bank: need tau >= "
                f"{tau_lower_bound(r, metric, dtype, grad_tau):.3g} (metric={metric!r}, max_c |w_c| = {r:.3g}: "
                f"{reach}{' and dloss/dtau about |z|/tau' if grad_tau else ''}; with a headroom "
                f"of {_TAU_HEADROOM:g} they must stay below finfo({dtype}).max = {fmax:.3g}; see "
                f"etfkern.spherical.tau_lower_bound)")

    return [(lambda: _max_row_norm(bank, recheck) <= r_max, message, None)]


def _data_checks(checks: list[DataCheck], validate: bool | None, device: torch.device) -> None:
    """Run the checks: eager ValueError on CPU (or validate=True), ``torch._assert_async`` on CUDA and under
    torch.compile (no host sync), nothing for validate=False."""
    if validate is False or not checks:
        return
    # under torch.compile a host-side bool() breaks the graph (fullgraph=True fails): device asserts even for True
    on_device = torch.compiler.is_compiling() or (validate is None and device.type != "cpu")
    for ok, msg, passed in checks:
        if on_device:  # a failing device assert is fatal to the CUDA context: enforced once enqueued
            torch._assert_async(ok(), msg if isinstance(msg, str) else "tau is too small for the compute dtype's "
                                "logits (see etfkern.spherical.tau_lower_bound)")
        elif not bool(ok()):
            raise ValueError(msg if isinstance(msg, str) else msg())
        if passed is not None:
            passed()


# ----------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------
class _ArccosFiniteGrad(torch.autograd.Function):
    """arccos(clamp(c, -1, 1)) whose derivative is -1/sqrt(max(1 - c^2, ARC_GRAD_EPS)) (finite at |c| = 1). The
    backward is plain differentiable torch, so second derivatives are right too (double backward works)."""

    @staticmethod
    def forward(ctx, c):
        ctx.save_for_backward(c)
        return torch.arccos(c.clamp(-1.0, 1.0))

    @staticmethod
    def backward(ctx, grad):
        (c,) = ctx.saved_tensors
        cc = c.clamp(-1.0, 1.0)
        return -grad * (1.0 - cc * cc).clamp_min(ARC_GRAD_EPS).rsqrt()


def spherical_logits(x: torch.Tensor, bank: torch.Tensor, *, tau: float | torch.Tensor = 0.07,
                     metric: str = "cos") -> torch.Tensor:
    """Materialised logits z (..., C) in x.dtype: cos(x_i, w_c)/tau ("cos") or -arccos(cos)/tau ("arc").

    x (..., d) is L2-normalised inside (gradient through it); bank (C, d) rows are used as given; tau a number or a
    0-dim tensor (with requires_grad it gets its gradient). This one DOES store N x C (it is the output); use
    :func:`spherical_cross_entropy` / :func:`nearest` to avoid that. Plain differentiable torch ops (compile
    friendly, higher-order gradients included); the "arc" gradient is finite at |cos| = 1. A tau so small that
    the logits overflow x.dtype raises ValueError (see :func:`tau_lower_bound`)."""
    rows = _as_rows(x)
    _check_x_bank(rows, bank)
    tau_f, tau_t = _tau_value(tau, x.device)
    _check_metric(metric)
    grad_tau = tau_t is not None and tau_t.requires_grad and torch.is_grad_enabled()
    _data_checks([_finite_check(rows, "x")] + _bank_finite_checks(bank)
                 + _tau_checks(bank, tau_f, metric, x.dtype, grad_tau), None, x.device)
    cos = F.normalize(rows, dim=1, eps=NORM_EPS) @ bank.T
    scale = tau_t if tau_t is not None else tau_f
    z = cos / scale if metric == "cos" else _ArccosFiniteGrad.apply(cos) / -scale
    return z.reshape(*x.shape[:-1], bank.shape[0])


def _prepare(x, bank, target, tau, metric, label_smoothing, ignore_index, target_b, lam, validate,
             num_classes: int | None = None, check_bank: bool = True, grad_tau: bool = False):
    """Validate the row arguments (x (N, d), target / target_b (N,), lam, tau a float); return (target_b, per-row
    lam). num_classes: total C (default bank rows). check_bank=False skips the bank's finiteness and tau-bound
    checks (a caller that checked them already). grad_tau: tau is learnable (a tighter tau bound)."""
    _check_x_bank(x, bank)
    tau = _check_tau_metric(tau, metric)
    n, n_cls = x.shape[0], num_classes if num_classes is not None else bank.shape[0]
    _check_labels("target", target, (n,), x.device)
    if target_b is None:
        target_b = target
    elif target_b is not target:
        _check_labels("target_b", target_b, (n,), x.device)
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
    checks.append(_finite_check(x, "x"))
    if check_bank:
        recheck = validate is True
        checks += _bank_finite_checks(bank, recheck=recheck) + _tau_checks(bank, tau, metric, acc, grad_tau, recheck)
    _data_checks(checks, validate, x.device)
    return target_b, lam_t


class _FirstOrderLoss(torch.autograd.Function):
    """Identity on the per-row losses that adds tau's gradient when tau is learnable, and refuses higher-order
    gradients with a plain message (the fused op's backward is first-order only)."""

    @staticmethod
    def forward(ctx, loss, tau, dloss_dtau):
        ctx.tau_like = (tau.dtype, tau.device) if dloss_dtau is not None else None
        if dloss_dtau is not None:
            ctx.save_for_backward(dloss_dtau)
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(HIGHER_ORDER_MESSAGE)
        grad_tau = None
        if ctx.tau_like is not None:
            (dloss_dtau,) = ctx.saved_tensors
            dtype, device = ctx.tau_like
            grad_tau = (grad.to(dloss_dtau.dtype) * dloss_dtau).sum().to(dtype=dtype, device=device)
        return grad, grad_tau, None


def first_order_only(loss: torch.Tensor, tau: torch.Tensor | None = None,
                     dloss_dtau: torch.Tensor | None = None) -> torch.Tensor:
    """``loss`` unchanged, with tau's gradient sum_i g_i dloss_dtau_i attached when given; a backward with
    create_graph=True raises RuntimeError(HIGHER_ORDER_MESSAGE)."""
    return _FirstOrderLoss.apply(loss, tau, dloss_dtau)


_TAU_PASS_MIB = 32.0  # temporaries of the "arc" tau-gradient pass: (rows x C) float32 chunks of about this size


def expected_arc_logit(xh: torch.Tensor, bank: torch.Tensor, lse: torch.Tensor, tau: float,
                       eps: float = 0.0, num_classes: int | None = None) -> torch.Tensor:
    """sum_c (p_ic - eps/C) z_ic for "arc" logits z = -arccos(x̂_i . w_c)/tau over this bank's classes, with
    p_ic = exp(z_ic - lse_i): (N,) in xh's dtype. One more pass over the classes in row chunks (matmul + arccos +
    exp on (rows x C) tiles of about _TAU_PASS_MIB): O(N C d) like the forward, never an N x C buffer.
    num_classes: the C of eps/C (default: this bank's rows; a vocab shard passes the global C)."""
    n, n_cls = xh.shape[0], bank.shape[0]
    per_class = eps / (num_classes if num_classes is not None else max(1, n_cls))
    out = torch.zeros(n, dtype=xh.dtype, device=xh.device)
    if n == 0 or n_cls == 0:
        return out
    w = bank.detach().to(xh.dtype)
    step = max(1, int(_TAU_PASS_MIB * 2**20) // (n_cls * xh.element_size() * 2))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        z = torch.arccos((xh[r0:r1] @ w.T).clamp_(-1.0, 1.0)).div_(-tau)
        p = (z - lse[r0:r1].to(z.dtype).unsqueeze(1)).exp_().sub_(per_class)
        out[r0:r1] = (p.mul_(z)).sum(1)
    return out


def _dloss_dtau(rows, bank, target, target_b, lam_t, tau, metric, eps, ignore_index, lse, grad_xhat):
    """d loss_i / d tau (N,) in the accumulation dtype. z = f(cos)/tau, so dz/dtau = -z/tau and
    dloss_i/dtau = -(1/tau) sum_c (p_ic - t_ic) z_ic.
    "cos": s = 1/tau, so sum_c (p - t) z = x̂_i . grad_xhat_i (the op's own x̂-gradient): O(N d), no class pass.
    "arc": sum_c p z is not among the op's partials: one more class pass (:func:`expected_arc_logit`, about the
    cost of a forward without the P @ W product), then the target part from the two target rows."""
    acc = grad_xhat.dtype
    xh = F.normalize(rows.detach().to(acc), dim=1, eps=NORM_EPS)
    if metric == "cos":
        return (xh * grad_xhat).sum(1).div_(-tau)
    valid = target != ignore_index
    expect = expected_arc_logit(xh, bank, lse, tau, eps)
    w = bank.detach()

    def target_logit(t):
        cos = (xh * w.index_select(0, torch.where(valid, t, 0).long()).to(acc)).sum(1)
        return torch.arccos(cos.clamp(-1.0, 1.0)) / -tau

    za = target_logit(target)
    zb = za if target_b is target else target_logit(target_b)
    lam = lam_t.to(acc)
    d = (expect - (1 - eps) * (lam * za + (1 - lam) * zb)).div_(-tau)
    return torch.where(valid, d, torch.zeros_like(d))


def spherical_ce_rows(x: torch.Tensor, bank: torch.Tensor, target: torch.Tensor, *,
                      tau: float | torch.Tensor = 0.07, metric: str = "cos", label_smoothing: float = 0.0,
                      ignore_index: int = -100, target_b: torch.Tensor | None = None,
                      lam: float | torch.Tensor | None = None, validate: bool | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (loss (...), lse (...)) with target's shape, in float32 (float64 for float64 x); loss
    differentiable (x, bank, a learnable tau), lse not.

    The building block for reductions done elsewhere (e.g. a global normaliser under gradient accumulation or
    a vocab-parallel merge of per-shard lse). Ignored rows have loss 0. Arguments as
    :func:`spherical_cross_entropy`.
    """
    rows, target, target_b, lam, lead = _sequence_inputs(x, target, target_b, lam)
    tau_f, tau_t = _tau_value(tau, x.device)
    grad_on = torch.is_grad_enabled()
    grad_tau = grad_on and tau_t is not None and tau_t.requires_grad
    target_b, lam_t = _prepare(rows, bank, target, tau_f, metric, label_smoothing, ignore_index, target_b, lam,
                               validate, grad_tau=grad_tau)
    eps, ignore_index = float(label_smoothing), int(ignore_index)
    need_grad = grad_on and rows.requires_grad
    loss, lse, grad_xhat = _ops.spherical_ce_forward(rows, bank, target, target_b, lam_t, tau_f, metric, eps,
                                                     ignore_index, need_grad or grad_tau)
    if grad_on and (loss.requires_grad or grad_tau):
        d_tau = _dloss_dtau(rows, bank, target, target_b, lam_t, tau_f, metric, eps, ignore_index, lse,
                            grad_xhat) if grad_tau else None
        loss = first_order_only(loss, tau_t if grad_tau else None, d_tau)
    return loss.reshape(lead), lse.reshape(lead)


def spherical_cross_entropy(x: torch.Tensor, bank: torch.Tensor, target: torch.Tensor, *,
                            tau: float | torch.Tensor = 0.07, metric: str = "cos", label_smoothing: float = 0.0,
                            ignore_index: int = -100, reduction: str = "mean", target_b: torch.Tensor | None = None,
                            lam: float | torch.Tensor | None = None, validate: bool | None = None) -> torch.Tensor:
    """Fused cross-entropy of spherical logits against a fixed bank; the N x C logits are never stored.

    x (..., d) float: (N, d), or a language model's (B, T, d) hidden states, any strides (L2-normalised inside,
    gradient through it); bank (C, d), same dtype and device, rows used as given (gradient only when
    bank.requires_grad; a frozen bank costs no dW work); target, target_b (...) = x.shape[:-1], int class indices
    in [0, C) or ``ignore_index``; lam: None (=1), float, or () / (...) tensor in [0, 1].
    Soft targets t = (1-eps)(lam onehot(target) + (1-lam) onehot(target_b)) + eps/C with eps = label_smoothing;
    loss_i = lse_i - sum_c t_ic z_ic. reduction "mean" divides by the number of rows with target != ignore_index
    (0 when there are none), "sum", or "none" (target's shape). Returned in x.dtype (reduced in float32/64).

    tau: a number or a 0-dim floating tensor (read on the host once per call: one device sync for a CUDA tensor,
    and a graph break under torch.compile). With ``tau.requires_grad`` it gets its gradient (learnable
    temperature): for "cos" from the x̂-gradient the op computes anyway (O(N d)); for "arc" one more pass over the
    classes (about a forward's cost without the P @ W product). A tau whose logits overflow the compute dtype
    (float32; float64 for float64 x) raises ValueError naming the bound (:func:`tau_lower_bound`).

    validate: None = eager ValueError on CPU, device-side assert (no host sync) on CUDA and under compile;
    True = eager ValueError everywhere (one host sync) except under torch.compile (device-side assert there),
    and the bank is re-checked even if it passed before; False = no data checks.
    Bank check contract: the bank's finiteness (and its largest row norm, for the tau bound) is checked once per
    bank version: same tensor object, unchanged ``_version`` counter, storage and layout. In-place writes
    through the tensor re-arm the check; writes through ``.data``, ``.numpy()`` or another tensor sharing the
    storage do NOT: after those pass ``validate=True`` or call :func:`clear_bank_check_cache`.

    Gradients are first-order only: a backward with create_graph=True raises RuntimeError (use
    :func:`spherical_logits` + ``F.cross_entropy`` for higher-order gradients).
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
    """Top-k bank rows by cosine: (values (..., k) in x.dtype, int64 indices (..., k)), sorted descending.

    x (..., d) (e.g. (N, d) or (B, T, d), any strides) is normalised inside, bank (C, d) rows used as given.
    Fused: no N x C buffer on GPU, O(chunk x C) on CPU. Not differentiable. A non-finite x or bank raises
    ValueError on CPU (on CUDA: a device-side assert, no host sync)."""
    rows = _as_rows(x)
    _check_x_bank(rows, bank)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be an int in [1, C={bank.shape[0]}], got {k!r}")
    _data_checks([_finite_check(rows, "x")] + _bank_finite_checks(bank), None, x.device)
    vals, idx = _ops.spherical_nearest(rows.detach(), bank.detach(), k)
    lead = tuple(x.shape[:-1])
    return vals.to(x.dtype).reshape(*lead, k), idx.reshape(*lead, k)
