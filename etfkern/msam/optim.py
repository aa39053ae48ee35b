"""Momentum-SAM optimizers (Becker, Altrock, Risse 2024) with the perturbation fused into the step.

Parameters are stored at the perturbed point w~ = w - s v between steps (the paper's Alg. 1). One step, with
g the gradient at w~ and s the scale that was actually applied last step (0 before the first step):

    w = w~ + s v                                  undo
    v' = mu v + g + wd w                          (AdamW: torch.optim.AdamW's update, m' its first moment)
    w  = w - lr v'                                (nesterov: w - lr (g + wd w + mu v'), as torch.optim.SGD)
    s' = rho / (||v'|| + 1e-12)                   one global L2 norm over all parameters of all groups
    w~ = w - s' v'

``norm="exact"`` runs two fused passes over all tensors: pass 1 reduces ||v'||^2 (a 0-dim device tensor, never
copied to the host), pass 2 does undo + update + perturb in one sweep. ``norm="lagged"`` runs pass 2 only and
perturbs with s' = rho / ||v|| (the previous step's momentum norm) along v': an approximation that saves one
read of v and g (the first step is always exact).

Implementation notes:
  * state: fp32 for bf16/fp16/fp32 parameters, fp64 for fp64 parameters; the applied scale, the lagged
    squared norm and (AdamW) the step count are 0-dim tensors on the parameters' device.
  * torch.amp.GradScaler: ``_step_supports_amp_scaling = True``; GradScaler sets ``grad_scale`` and
    ``found_inf`` on the optimizer; gradients are divided by ``grad_scale`` inside the kernels and a nonzero
    ``found_inf`` skips the whole step (parameters, state, scale and step count keep their bits), on device.
  * parameters without a gradient this step keep v (and are counted in the global norm with it); their stored
    perturbation is re-scaled from s to s' so that the next undo is exact.
  * sharded parameters (DTensor with a Shard placement, e.g. FSDP2's fully_shard, or every parameter when
    ``norm_group`` is given): the partial squared norm of the local shards is all-reduced (one scalar) over
    the mesh's process group between the passes. Under DDP (replicated parameters) nothing extra is needed.
  * AdamWMSAM counts steps once per optimizer (bias correction uses the number of steps taken), not per
    parameter as torch.optim.AdamW does; they agree whenever every parameter gets a gradient every step.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from etfkern._core import backend as _backend
from etfkern.msam import ops as _ops  # noqa: F401  (schemas)
from etfkern.msam import reference as ref

EPS_NORM = ref.EPS_NORM

# ---- backends ---------------------------------------------------------------------------------------------
for _op in ("msam_sq_norm", "msam_sgd_step", "msam_adamw_step"):
    _backend.register(_op, "reference", getattr(ref, _op))
    # torch fallback used when the C++ library is missing: the same loop in the state dtype
    _backend.register(_op, "cpu", functools.partial(getattr(ref, _op), compute=None))
    _backend.register(_op, "triton", f"etfkern.triton_kernels.msam:{_op}")


def _state_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


try:  # DTensor (FSDP2 / tensor parallel parameters); absent in torch builds without distributed
    from torch.distributed.tensor import DTensor as _DTensor
    from torch.distributed.tensor import Shard as _Shard
except Exception:  # noqa: BLE001
    _DTensor = _Shard = None


def _is_dtensor(t: Tensor) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (shares storage: in-place updates reach the DTensor), else t."""
    return t.to_local() if _is_dtensor(t) else t


def _shard_groups(p: Tensor) -> tuple:
    """Process groups over which ``p``'s local shards must be summed (mesh dims with a Shard placement)."""
    if not _is_dtensor(p):
        return ()
    mesh = p.device_mesh
    return tuple(mesh.get_group(i) for i, pl in enumerate(p.placements) if isinstance(pl, _Shard))


class _Lists:
    """Flat per-tensor lists for one kind (replicated or sharded over ``groups``) of parameters."""

    def __init__(self, groups: tuple) -> None:
        self.groups = groups
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.bufs: list[Tensor] = []
        self.bufs2: list[Tensor] = []
        self.hyper: dict[str, list[Any]] = {}
        self.idle_params: list[Tensor] = []  # have state, no grad this step
        self.idle_bufs: list[Tensor] = []

    def idle_sq(self, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        if not self.idle_bufs:
            return None
        norms = torch._foreach_norm([b.double() for b in self.idle_bufs])
        return torch.stack(norms).square().sum().to(dtype=dtype, device=device)


def _all_reduce(t: Tensor, groups: tuple) -> Tensor:
    if groups:
        import torch.distributed as dist

        for g in groups:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=g)
    return t


class _MSAMBase(torch.optim.Optimizer):
    _step_supports_amp_scaling = True
    _buf_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable, defaults: dict, norm: str, norm_group: Any) -> None:
        if norm not in ("exact", "lagged"):
            raise ValueError(f"norm must be 'exact' or 'lagged', got {norm!r}")
        self.norm = norm
        self.norm_group = norm_group
        self._globals: dict[str, Tensor] = {}
        self._steps = 0
        super().__init__(params, defaults)

    # ---- validation -------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate(group)
            for p in group["params"]:
                if not p.is_floating_point() or p.dtype not in (torch.float64, torch.float32, torch.bfloat16,
                                                                torch.float16):
                    raise ValueError(f"params must be float64/float32/bfloat16/float16 tensors, got {p.dtype}")
                if not _local(p).is_contiguous():
                    raise ValueError(f"params must be contiguous (got strides {tuple(p.stride())} for shape "
                                     f"{tuple(p.shape)}); call .contiguous() on the parameter first")
        except ValueError:
            self.param_groups.pop()  # a rejected group must not stay behind (every later step would fail)
            raise

    @staticmethod
    def _check(name: str, value: float, lo: float, hi: float = math.inf, hi_open: bool = False) -> None:
        # the type first (a comparison with None or a str would raise TypeError); finite values only (an
        # infinite lr, rho or weight decay turns every weight into inf/NaN on the first step)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
            lo <= value < hi if hi_open else lo <= value <= hi)
        if not ok:
            bracket = ")" if hi_open or hi == math.inf else "]"
            raise ValueError(f"{name} must be a finite number in [{lo}, {hi}{bracket}, got {value!r}")

    def _validate(self, group: dict) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    # ---- globals ------------------------------------------------------------------------------------------
    def _global(self, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        t = self._globals.get(name)
        if t is None or t.device != device or t.dtype != dtype:
            t = (torch.zeros((), device=device, dtype=dtype) if t is None else t.to(device=device, dtype=dtype))
            self._globals[name] = t
        return t

    def _rho(self) -> float:
        rhos = {g["rho"] for g in self.param_groups}
        if len(rhos) != 1:
            raise ValueError(f"rho must be the same in every param group (one global perturbation), got {rhos}")
        return rhos.pop()

    # ---- gathering ----------------------------------------------------------------------------------------
    def _init_state(self, p: Tensor, loc: Tensor) -> dict:
        state = self.state[p]
        if not state:
            for key in self._buf_keys:
                state[key] = torch.zeros_like(loc, dtype=_state_dtype(loc), memory_format=torch.contiguous_format)
        return state

    def _hyper(self, group: dict) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def _gather(self) -> list[_Lists]:
        kinds: dict[tuple, _Lists] = {}
        second = len(self._buf_keys) > 1
        for group in self.param_groups:
            hyper = self._hyper(group)
            for p in group["params"]:
                dt = _is_dtensor(p)
                groups = (self.norm_group,) if self.norm_group is not None else (_shard_groups(p) if dt else ())
                lists = kinds.get(groups)
                if lists is None:
                    lists = kinds[groups] = _Lists(groups)
                loc = p.to_local() if dt else p
                grad = p.grad
                if grad is None:
                    state = self.state.get(p)
                    if state:
                        lists.idle_params.append(loc)
                        lists.idle_bufs.append(state[self._buf_keys[0]])
                    continue
                if grad.is_sparse:
                    raise ValueError("MSAM does not support sparse gradients")
                state = self._init_state(p, loc)
                lists.params.append(loc)
                lists.grads.append(grad.to_local() if dt else grad)
                lists.bufs.append(state[self._buf_keys[0]])
                if second:
                    lists.bufs2.append(state[self._buf_keys[1]])
                for k, v in hyper.items():
                    lists.hyper.setdefault(k, []).append(v)
        out = [k for k in kinds.values() if k.params or k.idle_params]
        devices = {t.device for k in out for t in k.params + k.idle_params}
        if len(devices) > 1:
            raise ValueError(f"all parameters must live on one device, got {sorted(map(str, devices))}")
        return out

    # ---- the step -----------------------------------------------------------------------------------------
    def _norm_args(self, lists: _Lists) -> tuple:  # pragma: no cover - overridden
        raise NotImplementedError

    def _pass2(self, lists: _Lists, s_old: Tensor, s_new: Tensor, grad_scale, found_inf) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One MSAM step (see the module docstring). ``closure`` re-evaluates the loss, as in torch.optim."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        kinds = self._gather()
        if not kinds:
            return loss
        first = (kinds[0].params or kinds[0].idle_params)[0]
        device = first.device
        dtype = torch.float64 if any(b.dtype == torch.float64 for k in kinds for b in k.bufs + k.idle_bufs) \
            else torch.float32
        rho = self._rho()
        s_old = self._global("scale", device, dtype)
        lagged_sq = self._global("lagged_sq", device, dtype)
        skip = None if found_inf is None else found_inf.to(device).reshape(-1)[0] != 0
        if grad_scale is not None:
            grad_scale = grad_scale.to(device)
        if found_inf is not None:
            found_inf = found_inf.to(device)
        self._before_pass2(device, dtype, skip)

        lagged = self.norm == "lagged" and self._steps > 0
        if lagged:
            s_new = torch.where(lagged_sq > 0, rho / (lagged_sq.sqrt() + EPS_NORM), torch.zeros_like(lagged_sq))
        else:
            sq = torch.zeros((), device=device, dtype=dtype)
            for lists in kinds:
                part = torch.zeros((), device=device, dtype=dtype)
                if lists.params:
                    part = part + torch.ops.etfkern.msam_sq_norm(
                        lists.params, lists.grads, lists.bufs, s_old, *self._norm_args(lists), grad_scale
                    ).to(dtype)
                idle = lists.idle_sq(dtype, device)
                if idle is not None:
                    part = part + idle
                sq = sq + _all_reduce(part, lists.groups)
            s_new = rho / (sq.sqrt() + EPS_NORM)

        new_sq = torch.zeros((), device=device, dtype=dtype)
        for lists in kinds:
            part = torch.zeros((), device=device, dtype=dtype)
            if lists.params:
                part = part + self._pass2(lists, s_old, s_new, grad_scale, found_inf).to(dtype)
            for p, v in zip(lists.idle_params, lists.idle_bufs):  # keep the stored perturbation consistent
                w = p.to(v.dtype) + s_old.to(v.dtype) * v
                pn = w - s_new.to(v.dtype) * v
                p.copy_(pn if skip is None else torch.where(skip, p.to(v.dtype), pn))
            if lagged:
                idle = lists.idle_sq(dtype, device)
                if idle is not None:
                    part = part + idle
                new_sq = new_sq + _all_reduce(part, lists.groups)
        if not lagged:
            new_sq = sq
        if skip is None:
            s_old.copy_(s_new)
            lagged_sq.copy_(new_sq)
        else:
            s_old.copy_(torch.where(skip, s_old, s_new))
            lagged_sq.copy_(torch.where(skip, lagged_sq, new_sq))
        self._after_pass2(skip)
        self._steps += 1
        return loss

    def _before_pass2(self, device: torch.device, dtype: torch.dtype, skip: Tensor | None) -> None:
        pass

    def _after_pass2(self, skip: Tensor | None) -> None:
        pass

    # ---- evaluation at the true weights -------------------------------------------------------------------
    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Inside the block the parameters hold the unperturbed weights w = w~ + s v (for evaluation, saving,
        BN statistics). On exit the stored perturbed weights are restored bitwise (from a copy taken on
        entry: any change made to the parameters inside the block is discarded)."""
        saved: list[tuple[Tensor, Tensor]] = []
        scale = self._globals.get("scale")
        with torch.no_grad():
            if scale is not None:
                for group in self.param_groups:
                    for p in group["params"]:
                        state = self.state.get(p)
                        if not state:
                            continue
                        loc, v = _local(p), state[self._buf_keys[0]]
                        saved.append((loc, loc.clone()))
                        loc.copy_(loc.to(v.dtype) + scale.to(v.dtype) * v)
        try:
            yield
        finally:
            with torch.no_grad():
                for loc, copy in saved:
                    loc.copy_(copy)

    # ---- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["msam"] = {"globals": {k: v.clone() for k, v in self._globals.items()}, "steps": self._steps,
                      "norm": self.norm}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        extra = sd.pop("msam", None)
        super().load_state_dict(sd)
        # torch casts floating state to the parameter dtype; our state stays fp32/fp64: restore the exact bits
        ids = [i for g in sd["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for key, value in sd["state"].get(pid, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.detach().to(device=_local(p).device, copy=True)
        if extra is not None:
            device = params[0].device if params else torch.device("cpu")
            device = _local(params[0]).device if params else device
            self._globals = {k: v.detach().to(device=device, copy=True) for k, v in extra["globals"].items()}
            self._steps = int(extra["steps"])


class MSAM(_MSAMBase):
    """Momentum-SAM on SGD with momentum (heavy ball or Nesterov, L2 decay at the unperturbed weights).

    Args:
        params: iterable of tensors or param-group dicts (each group may set lr, momentum, weight_decay,
            nesterov; ``rho`` must be the same in every group).
        lr: learning rate >= 0.   momentum: in [0, 1).   rho: perturbation radius >= 0.
        weight_decay: L2 coefficient >= 0, added to the gradient at the unperturbed weights.
        nesterov: Nesterov momentum as torch.optim.SGD (needs momentum > 0).
        norm: "exact" (two passes) or "lagged" (one pass, previous step's norm: an approximation).
        norm_group: a process group over which every parameter is sharded (each rank holds a disjoint
            slice): the squared norm is all-reduced over it. DTensor shards are detected without it.
    State per parameter: ``momentum_buffer`` (fp32, fp64 for fp64 parameters). Never stored: the unperturbed
    weights (recomputed on demand by :meth:`unperturbed`).
    """

    _buf_keys = ("momentum_buffer",)

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, rho: float = 0.3,
                 weight_decay: float = 0.0, nesterov: bool = False, *, norm: str = "exact",
                 norm_group: Any = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, rho=rho, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults, norm, norm_group)

    def _validate(self, group: dict) -> None:
        self._check("lr", group["lr"], 0.0)
        self._check("momentum", group["momentum"], 0.0, 1.0, hi_open=True)
        self._check("rho", group["rho"], 0.0)
        self._check("weight_decay", group["weight_decay"], 0.0)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"nesterov must be a bool, got {group['nesterov']!r}")
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError("nesterov=True needs momentum in (0, 1)")

    def _hyper(self, group: dict) -> dict:
        self._validate(group)
        return dict(lr=float(group["lr"]), momentum=float(group["momentum"]),
                    weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]))

    def _norm_args(self, lists: _Lists) -> tuple:
        h = lists.hyper
        return h["momentum"], [1.0] * len(lists.params), h["weight_decay"]

    def _pass2(self, lists, s_old, s_new, grad_scale, found_inf) -> Tensor:
        h = lists.hyper
        return torch.ops.etfkern.msam_sgd_step(lists.params, lists.grads, lists.bufs, s_old, s_new, h["lr"],
                                               h["momentum"], h["weight_decay"], h["nesterov"], grad_scale,
                                               found_inf)


class AdamWMSAM(_MSAMBase):
    """Momentum-SAM around torch.optim.AdamW's update (decoupled weight decay, bias correction), perturbing
    along -m/||m|| with m the first moment: w~ = w - rho m / ||m|| (global norm over all parameters).

    Args: lr >= 0, betas each in [0, 1), eps >= 0, weight_decay >= 0, rho >= 0 (same in every group), ``norm``
    and ``norm_group`` as :class:`MSAM`. State per parameter: ``exp_avg``, ``exp_avg_sq`` (fp32, fp64 for fp64
    parameters); one step counter per optimizer (a 0-dim tensor, skipped steps not counted).
    """

    _buf_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, rho: float = 1.0, *, norm: str = "exact",
                 norm_group: Any = None) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
                        weight_decay=weight_decay, rho=rho)
        self._step_new: Tensor | None = None
        super().__init__(params, defaults, norm, norm_group)

    def _validate(self, group: dict) -> None:
        self._check("lr", group["lr"], 0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self._check("betas[0]", betas[0], 0.0, 1.0, hi_open=True)
        self._check("betas[1]", betas[1], 0.0, 1.0, hi_open=True)
        self._check("eps", group["eps"], 0.0)
        self._check("weight_decay", group["weight_decay"], 0.0)
        self._check("rho", group["rho"], 0.0)

    def _hyper(self, group: dict) -> dict:
        self._validate(group)
        b1, b2 = group["betas"]
        return dict(lr=float(group["lr"]), beta1=float(b1), beta2=float(b2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]))

    def _norm_args(self, lists: _Lists) -> tuple:
        b1 = lists.hyper["beta1"]
        return b1, [1.0 - b for b in b1], [0.0] * len(b1)

    def _before_pass2(self, device, dtype, skip) -> None:
        self._step_new = self._global("step", device, dtype) + 1

    def _pass2(self, lists, s_old, s_new, grad_scale, found_inf) -> Tensor:
        h = lists.hyper
        return torch.ops.etfkern.msam_adamw_step(lists.params, lists.grads, lists.bufs, lists.bufs2, s_old, s_new,
                                                 self._step_new, h["lr"], h["beta1"], h["beta2"], h["eps"],
                                                 h["weight_decay"], grad_scale, found_inf)

    def _after_pass2(self, skip) -> None:
        step = self._globals["step"]
        step.copy_(self._step_new if skip is None else torch.where(skip, step, self._step_new))
        self._step_new = None


def recompute_bn_stats(model: torch.nn.Module, batches: Iterable, optimizer: _MSAMBase | None = None, *,
                       num_batches: int | None = None) -> None:
    """Recompute every BatchNorm's running mean/var at the unperturbed weights (inside
    ``optimizer.unperturbed()`` when an MSAM optimizer is given) as an exact average over ``batches``
    (tensors, or tuples/lists whose first item is the input). Every module's training flag and the BN momenta
    are restored; the parameters are left bitwise as they were. When it fails (no batch, an error in the
    forward), the BN running statistics are restored too."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    if num_batches is not None and (not isinstance(num_batches, int) or isinstance(num_batches, bool)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be an integer >= 1 or None, got {num_batches!r}")
    modes = [(m, m.training) for m in model.modules()]  # per module: model.train(flag) would flatten them
    momenta = [m.momentum for m in bns]
    stats = [(m.running_mean.clone() if m.running_mean is not None else None,
              m.running_var.clone() if m.running_var is not None else None,
              m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in bns]
    ctx = optimizer.unperturbed() if optimizer is not None else contextlib.nullcontext()
    done = False
    try:
        with ctx, torch.no_grad():
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average: an exact mean over the batches
            model.train()
            seen = 0
            for i, batch in enumerate(batches):
                if num_batches is not None and i >= num_batches:
                    break
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
                seen += 1
            if seen == 0:
                raise ValueError("batches is empty: no statistics to recompute")
        done = True
    finally:
        for m, mom, saved in zip(bns, momenta, stats):
            m.momentum = mom
            if not done:  # keep the model's previous statistics rather than the reset ones
                with torch.no_grad():
                    for buf, old in zip((m.running_mean, m.running_var, m.num_batches_tracked), saved):
                        if buf is not None and old is not None:
                            buf.copy_(old)
        for m, flag in modes:
            m.training = flag
