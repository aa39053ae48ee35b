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
read of v and g (until a step was taken -- the first one, or the first after steps GradScaler skipped -- the
exact norm is used; skipped steps do not count).

Two ways to run a step on the Triton backend (``step_impl``; the dispatch table's default is "ops"): "ops" calls
the etfkern ops (one launch per param group per pass, torch ops around them); "plan" keeps a StepPlan (launch
tables built once per parameter set, one launch per pass over every tensor, norms and scales finished on the
device, no allocation in a steady-state step, capturable in a CUDA graph).

Checkpoints: ``state_dict()`` outside ``unperturbed()`` goes with the perturbed weights the parameters hold; inside
it, with the true weights, and it then carries the perturbed weights too, so that ``load_state_dict`` (after the
model's) puts them back: both recipes resume the uninterrupted run bitwise. ``load_state_dict`` checks everything
before it changes anything.

Implementation notes:
  * state: fp32 for bf16/fp16/fp32 parameters, fp64 for fp64 parameters; the applied scale, the lagged
    squared norm and the count of steps taken are one device buffer (fp32, fp64 with fp64 parameters).
  * every check (hyperparameters, one rho for all groups, sparse gradients, devices) runs before any state is
    created; a parameter listed twice is a ValueError.
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
import dataclasses
import functools
import math
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from etfkern._core import backend as _backend
from etfkern._core import dispatch as _dispatch
from etfkern._core.dtypes import acc_dtype, acc_dtype_of
from etfkern.msam import ops as _ops  # noqa: F401  (schemas)
from etfkern.msam import reference as ref

EPS_NORM = ref.EPS_NORM

# ---- backends ---------------------------------------------------------------------------------------------
for _op in ("msam_sq_norm", "msam_sgd_step", "msam_adamw_step"):
    _backend.register(_op, "reference", getattr(ref, _op))
    # torch fallback used when the C++ library is missing: the same loop in the state dtype
    _backend.register(_op, "cpu", functools.partial(getattr(ref, _op), compute=None))
    _backend.register(_op, "triton", f"etfkern.triton_kernels.msam:{_op}")
# the optimizer's reusable launch tables (Triton): one launch per pass over every tensor of every group
_backend.register("msam_step_plan", "triton", "etfkern.triton_kernels.msam:StepPlan")
# the plan's step modes and device scalar count (etfkern.triton_kernels.msam: EXACT, LAGGED, LAGGED_UNCONFIRMED, G_SIZE)
_EXACT, _LAGGED, _LAGGED_UNCONFIRMED = 0, 1, 2
_G_SIZE = 5


def _state_dtype(p: Tensor) -> torch.dtype:
    return acc_dtype(p.dtype)


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


class _Gathered:
    """What one step works on, checked before any state is touched: per tensor (in param-group order) the
    parameter (local shard), its gradient (None: no gradient this step, but state), its group index and the
    process groups its squared norm is summed over."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.locs: list[Tensor] = []
        self.grads: list[Tensor | None] = []
        self.group_index: list[int] = []
        self.norm_groups: list[tuple] = []
        self.rho = 0.0


@dataclasses.dataclass
class _FastKey:
    """The Triton plan's parameter set: ids of all parameters (group order), which had no gradient, the plan's
    entries (index into that list, local tensor, storage address, group index, no-grad flag) and their rows."""
    ids: tuple
    no_grad: tuple
    entry_index: list
    locs: list
    loc_ptrs: tuple
    group_index: list
    idle: list
    rows: list
    group_rows: tuple
    device: torch.device


def _all_reduce(t: Tensor, groups: tuple) -> Tensor:
    if groups:
        import torch.distributed as dist

        for g in groups:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=g)
    return t


def _lagged_scale(lagged_sq: Tensor, rho: float) -> Tensor:
    return torch.where(lagged_sq > 0, rho / (lagged_sq.sqrt() + EPS_NORM), torch.zeros_like(lagged_sq))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _MSAMBase(torch.optim.Optimizer):
    _step_supports_amp_scaling = True
    _buf_keys: tuple[str, ...] = ()
    _group_keys: tuple[str, ...] = ()  # hyperparameters only this class has (tells MSAM/AdamWMSAM checkpoints apart)
    _kernel_op = ""

    def __init__(self, params: Iterable, defaults: dict, norm: str, norm_group: Any, step_impl: str | None) -> None:
        if norm not in ("exact", "lagged"):
            raise ValueError(f"norm must be 'exact' or 'lagged', got {norm!r}")
        if step_impl not in (None, "ops", "plan"):
            raise ValueError(f"step_impl must be None, 'ops' or 'plan', got {step_impl!r}")
        self.norm = norm
        self.step_impl = step_impl
        self.norm_group = norm_group
        # device scalars [scale applied, lagged squared norm, steps taken, next scale, squared norm]; _globals
        # holds 0-dim views of the first three (what state_dict saves)
        self._gbuf: Tensor | None = None
        self._globals: dict[str, Tensor] = {}
        self._steps = 0  # step() calls (skipped ones included)
        self._unperturbed_depth = 0
        self._perturbed_copies: dict[int, Tensor] = {}  # inside unperturbed(): id(param) -> its perturbed weights
        self._plan: Any = None
        self._plan_key: tuple | None = None
        self._plan_source: tuple | None = None  # (group index, grads, no-grad flags) the plan was last run with
        self._fast: _FastKey | None = None  # what lets a step with an unchanged parameter set skip the gathering
        self._taken_known = False  # the host knows that a step was applied (lagged mode may skip the norm pass)
        self._probe: tuple | None = None  # CUDA: (event, pinned copy of the step count) while that is unknown
        super().__init__(params, defaults)

    # ---- validation -------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if isinstance(params, (list, tuple)) or (params is not None and not isinstance(params, (Tensor, set))):
            params = list(params)
            seen = {id(p) for g in self.param_groups for p in g["params"]}
            for i, p in enumerate(params):
                if id(p) in seen:
                    # torch only warns about a repeated parameter; two updates of one tensor in one launch race
                    raise ValueError(f"params[{i}] (shape {tuple(getattr(p, 'shape', ()))}) appears more than once "
                                     "in the optimizer's parameters: pass every parameter once")
                seen.add(id(p))
            param_group = dict(param_group, params=params)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate(group)
            if group["rho"] != self.param_groups[0]["rho"]:
                raise ValueError(f"rho must be the same in every param group (one global perturbation radius), "
                                 f"got {self.param_groups[0]['rho']!r} and {group['rho']!r}")
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
        self._plan = self._plan_key = self._plan_source = self._fast = None

    @staticmethod
    def _check(name: str, value: float, lo: float, hi: float = math.inf, hi_open: bool = False) -> None:
        # the type first (a comparison with None or a str would raise TypeError); finite values only (an
        # infinite lr, rho or weight decay turns every weight into inf/NaN on the first step)
        ok = _is_number(value) and math.isfinite(value) and (lo <= value < hi if hi_open else lo <= value <= hi)
        if not ok:
            bracket = ")" if hi_open or hi == math.inf else "]"
            raise ValueError(f"{name} must be a finite number in [{lo}, {hi}{bracket}, got {value!r}")

    def _validate(self, group: dict) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _hyper(self, group: dict) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def _row(self, group: dict) -> tuple:  # pragma: no cover - overridden
        raise NotImplementedError

    # ---- gathering: every check before any state is created -----------------------------------------------
    def _gather(self) -> _Gathered | None:
        out = _Gathered()
        rho = None
        for gi, group in enumerate(self.param_groups):
            self._validate(group)
            if rho is None:
                rho = group["rho"]
            elif group["rho"] != rho:
                raise ValueError(f"rho must be the same in every param group (one global perturbation radius), "
                                 f"got {rho!r} and {group['rho']!r}")
            for p in group["params"]:
                grad = p.grad
                if grad is None and not self.state.get(p):
                    continue
                dt = _is_dtensor(p)
                loc = p.to_local() if dt else p
                if grad is not None:
                    if grad.is_sparse:
                        raise ValueError("MSAM does not support sparse gradients")
                    grad = grad.to_local() if dt else grad
                    if grad.dtype != loc.dtype or grad.shape != loc.shape or grad.device != loc.device:
                        raise ValueError(f"a gradient must match its parameter ({loc.dtype}, {tuple(loc.shape)}, "
                                         f"{loc.device}), got {grad.dtype}, {tuple(grad.shape)}, {grad.device}")
                out.params.append(p)
                out.locs.append(loc)
                out.grads.append(grad)
                out.group_index.append(gi)
                out.norm_groups.append((self.norm_group,) if self.norm_group is not None
                                       else (_shard_groups(p) if dt else ()))
        if not out.locs:
            return None
        devices = {t.device for t in out.locs}
        if len(devices) > 1:
            raise ValueError(f"all parameters must live on one device, got {sorted(map(str, devices))}")
        out.rho = float(rho)
        return out

    def _state_of(self, p: Tensor, loc: Tensor) -> dict:
        state = self.state[p]
        if not state:
            for key in self._buf_keys:
                state[key] = torch.zeros_like(loc, dtype=_state_dtype(loc), memory_format=torch.contiguous_format)
        return state

    def _scalars(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The device scalar buffer G (created, or moved to ``device``/``dtype`` keeping its values)."""
        G = self._gbuf
        if G is None or G.device != device or G.dtype != dtype:
            new = torch.zeros(_G_SIZE, device=device, dtype=dtype)
            if G is not None:
                new.copy_(G)
            self._set_scalars(new)
        return self._gbuf

    def _set_scalars(self, G: Tensor) -> None:
        self._gbuf = G
        self._globals = {"scale": G[0], "lagged_sq": G[1], "step": G[2]}
        self._plan = self._plan_key = self._plan_source = self._fast = None

    def _step_taken(self) -> bool:
        """Whether the host knows that a step was applied (the lagged scale is defined). On CUDA this is read
        from a pinned copy of the step count once its copy has finished: never a synchronisation."""
        if self._taken_known or self._gbuf is None:
            return self._taken_known
        if self._gbuf.device.type != "cuda":
            self._taken_known = bool(self._gbuf[2].item() > 0)  # a CPU read
        elif self._probe is not None and self._probe[0].query():
            self._taken_known = bool(self._probe[1].item() > 0)  # pinned host memory, copy done
            self._probe = None
        return self._taken_known

    def _probe_step_count(self) -> None:
        G = self._gbuf
        if self._taken_known or G is None or G.device.type != "cuda" or self._probe is not None:
            return
        if torch.cuda.is_current_stream_capturing():
            return
        host = torch.empty(1, dtype=G.dtype, pin_memory=True)
        host.copy_(G[2:3], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._probe = (event, host)

    # ---- the step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One MSAM step (see the module docstring). ``closure`` re-evaluates the loss, as in torch.optim."""
        if self._unperturbed_depth:
            raise RuntimeError("step() inside unperturbed(): the block's exit would discard the step; leave the "
                               "block first")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        if self._fast is not None and self._fast_step(grad_scale, found_inf):
            self._finish_step(found_inf)
            return loss
        gathered = self._gather()
        if gathered is None:
            return loss
        device = gathered.locs[0].device
        dtype = acc_dtype_of(gathered.locs)
        for t in (grad_scale, found_inf):
            if t is not None and t.numel() != 1:
                raise ValueError(f"grad_scale and found_inf must have one element, got shape {tuple(t.shape)}")
        grad_scale = None if grad_scale is None else grad_scale.to(device)
        found_inf = None if found_inf is None else found_inf.to(device)
        # all checks done: from here on state may be created
        states = [self._state_of(p, loc) for p, loc in zip(gathered.params, gathered.locs)]
        G = self._scalars(device, dtype)
        mode = self._mode()
        if all(not g for g in gathered.norm_groups) and self._use_plan(device):
            self._step_plan(gathered, states, G, mode, grad_scale, found_inf)
        else:
            self._step_ops(gathered, states, G, mode, grad_scale, found_inf)
        self._finish_step(found_inf)
        return loss

    def _use_plan(self, device: torch.device) -> bool:
        """The StepPlan runs when the Triton backend runs the op and the variant (step_impl, else
        ETFKERN_MSAM_STEP, else the dispatch table's msam_step row) is "plan"."""
        if _backend.choose(self._kernel_op, device) != "triton":
            return False
        impl = _backend.kernel_variant("ETFKERN_MSAM_STEP", ("auto", "ops", "plan"), self.step_impl, "step_impl")
        if impl == "auto":
            impl = _dispatch.choose_variant("msam_step")[0]
        return impl == "plan"

    def _finish_step(self, found_inf: Tensor | None) -> None:
        self._steps += 1
        if found_inf is None:
            self._taken_known = True
        self._probe_step_count()

    def _mode(self) -> int:
        if self.norm == "exact":
            return _EXACT
        return _LAGGED if self._step_taken() else _LAGGED_UNCONFIRMED

    def _fast_step(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> bool:
        """The Triton step when the parameter set, which tensors have a gradient, the parameters' storage and
        the backend are what the plan was built for: only the per-step checks (group hyperparameters, sparse or
        strided gradients) run in Python. False (nothing done) sends the step down the general path."""
        f = self._fast
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [p.grad for p in params]
        if tuple(map(id, params)) != f.ids or tuple(g is None for g in grads) != f.no_grad:
            return False
        if not self._use_plan(f.device):
            return False
        for t in (grad_scale, found_inf):
            if t is not None and (t.numel() != 1 or t.device != f.device):
                return False
        rho = self._gather_rho()
        group_rows = tuple(self._row(group) for group in self.param_groups)
        if group_rows != f.group_rows:
            f.rows, f.group_rows = self._rows(f.group_index, f.idle), group_rows
        plan_grads = []
        for k, loc in zip(f.entry_index, f.locs):
            g = grads[k]
            if g is None:
                plan_grads.append(loc)
            elif g.is_sparse or not g.is_contiguous():
                return False
            else:
                plan_grads.append(g)
        if tuple(loc.data_ptr() for loc in f.locs) != f.loc_ptrs:
            return False
        mode = self._mode()
        self._plan.refresh(plan_grads, f.rows, rho)
        self._plan_source = (f.group_index, plan_grads, f.idle)
        self._plan.step(mode, grad_scale, found_inf)
        return True

    def _step_plan(self, g: _Gathered, states: list[dict], G: Tensor, mode: int, grad_scale, found_inf) -> None:
        """Triton: one launch per pass over every tensor, tables reused while the parameter set is unchanged."""
        idle = [grad is None for grad in g.grads]
        rows = self._rows(g.group_index, idle)
        grads = [loc if grad is None else (grad if grad.is_contiguous() else grad.contiguous())
                 for loc, grad in zip(g.locs, g.grads)]
        key = (id(G), tuple(map(id, g.locs)), tuple(t.data_ptr() for t in g.locs),
               tuple(idle), tuple(id(s[k]) for s in states for k in self._buf_keys))
        if key != self._plan_key:
            plan_cls = _backend.implementation("msam_step_plan", "triton", G.device.type)
            self._plan = plan_cls("sgd" if self._buf_keys == ("momentum_buffer",) else "adamw", g.locs, grads,
                                  [[s[k] for s in states] for k in self._buf_keys], rows, G)
            self._plan_key = key
        self._plan.refresh(grads, rows, g.rho)
        self._plan_source = (g.group_index, grads, idle)
        self._plan.step(mode, grad_scale, found_inf)
        if not any(_is_dtensor(p) for p in g.params):
            params = [p for group in self.param_groups for p in group["params"]]
            where = {id(p): k for k, p in enumerate(params)}
            self._fast = _FastKey(ids=tuple(map(id, params)), no_grad=tuple(p.grad is None for p in params),
                                  entry_index=[where[id(p)] for p in g.params], locs=list(g.locs),
                                  loc_ptrs=tuple(loc.data_ptr() for loc in g.locs), group_index=g.group_index,
                                  idle=idle, rows=rows, group_rows=tuple(self._row(gr) for gr in self.param_groups),
                                  device=G.device)

    def _step_ops(self, g: _Gathered, states: list[dict], G: Tensor, mode: int, grad_scale, found_inf) -> None:
        """The etfkern ops (cpu, cuda, reference backends; sharded parameters): per kind of parameters."""
        kinds: dict[tuple, _Lists] = {}
        hypers = [self._hyper(group) for group in self.param_groups]
        for loc, grad, gi, ng, state in zip(g.locs, g.grads, g.group_index, g.norm_groups, states):
            lists = kinds.get(ng)
            if lists is None:
                lists = kinds[ng] = _Lists(ng)
            if grad is None:
                lists.idle_params.append(loc)
                lists.idle_bufs.append(state[self._buf_keys[0]])
                continue
            lists.params.append(loc)
            lists.grads.append(grad)
            lists.bufs.append(state[self._buf_keys[0]])
            if len(self._buf_keys) > 1:
                lists.bufs2.append(state[self._buf_keys[1]])
            for k, v in hypers[gi].items():
                lists.hyper.setdefault(k, []).append(v)
        device, dtype, rho = G.device, G.dtype, g.rho
        s_old, lagged_sq, step = self._globals["scale"], self._globals["lagged_sq"], self._globals["step"]
        skip = None if found_inf is None else found_inf.reshape(-1)[0] != 0
        sq = None
        if mode == _LAGGED:
            s_new = _lagged_scale(lagged_sq, rho)
        else:
            sq = torch.zeros((), device=device, dtype=dtype)
            for lists in kinds.values():
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
            if mode == _LAGGED_UNCONFIRMED:  # lagged, but maybe no step was taken yet (skipped by GradScaler)
                s_new = torch.where(step > 0, _lagged_scale(lagged_sq, rho), s_new)
        new_sq = torch.zeros((), device=device, dtype=dtype)
        for lists in kinds.values():
            part = torch.zeros((), device=device, dtype=dtype)
            if lists.params:
                part = part + self._pass2(lists, s_old, s_new, step + 1, grad_scale, found_inf).to(dtype)
            for p, v in zip(lists.idle_params, lists.idle_bufs):  # keep the stored perturbation consistent
                w = p.to(v.dtype) + s_old.to(v.dtype) * v
                pn = w - s_new.to(v.dtype) * v
                p.copy_(pn if skip is None else torch.where(skip, p.to(v.dtype), pn))
            if mode != _EXACT:
                idle = lists.idle_sq(dtype, device)
                if idle is not None:
                    part = part + idle
                new_sq = new_sq + _all_reduce(part, lists.groups)
        if mode == _EXACT:
            new_sq = sq
        if skip is None:
            s_old.copy_(s_new)
            lagged_sq.copy_(new_sq)
            step.add_(1)
        else:
            s_old.copy_(torch.where(skip, s_old, s_new))
            lagged_sq.copy_(torch.where(skip, lagged_sq, new_sq))
            step.copy_(torch.where(skip, step, step + 1))

    def _norm_args(self, lists: _Lists) -> tuple:  # pragma: no cover - overridden
        raise NotImplementedError

    def _pass2(self, lists: _Lists, s_old: Tensor, s_new: Tensor, step: Tensor, grad_scale, found_inf) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    def sync_hyperparameters(self) -> None:
        """Copy the param groups' current hyperparameters (lr, momentum, weight decay, betas, eps, rho) into the
        device tables the Triton step reads: call it before replaying a captured step after changing them (an
        eager ``step()`` does it by itself)."""
        if self._plan is None or self._plan_source is None:
            return
        group_index, grads, idle = self._plan_source
        rho = self._gather_rho()
        rows = self._rows(group_index, idle)
        self._plan.refresh(grads, rows, rho)

    def _gather_rho(self) -> float:
        rhos = set()
        for group in self.param_groups:
            self._validate(group)
            rhos.add(group["rho"])
        if len(rhos) != 1:
            raise ValueError(f"rho must be the same in every param group (one global perturbation radius), got "
                             f"{sorted(rhos)}")
        return float(rhos.pop())

    def _rows(self, group_index: list[int], idle: list[bool]) -> list[tuple]:
        rows, group_rows = [], {}
        for gi, no_grad in zip(group_index, idle):
            row = group_rows.get(gi)
            if row is None:
                row = group_rows[gi] = self._row(self.param_groups[gi])
            rows.append((0.0,) + row[1:] if no_grad else row)
        return rows

    # ---- evaluation at the true weights -------------------------------------------------------------------
    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Inside the block the parameters hold the unperturbed weights w = w~ + s v (for evaluation, saving,
        BN statistics). On exit the stored perturbed weights are restored bitwise (from a copy taken on
        entry: any change made to the parameters inside the block is discarded). Nesting is harmless (an inner
        block changes nothing); ``step()`` and ``load_state_dict()`` inside the block raise RuntimeError, and a
        ``state_dict()`` taken inside records that it goes with unperturbed weights (see ``load_state_dict``)."""
        if self._unperturbed_depth:
            self._unperturbed_depth += 1
            try:
                yield
            finally:
                self._unperturbed_depth -= 1
            return
        saved: list[tuple[Tensor, Tensor]] = []
        copies: dict[int, Tensor] = {}
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
                        copies[id(p)] = saved[-1][1]
                        loc.copy_(loc.to(v.dtype) + scale.to(v.dtype) * v)
        self._unperturbed_depth, self._perturbed_copies = 1, copies
        try:
            yield
        finally:
            self._unperturbed_depth, self._perturbed_copies = 0, {}
            with torch.no_grad():
                for loc, copy in saved:
                    loc.copy_(copy)

    # ---- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's optimizer state plus ``"msam"``: the device scalars (applied scale, lagged squared norm, steps
        taken), the number of step() calls, ``norm``, the optimizer class and ``weights``: "unperturbed" when
        taken inside :meth:`unperturbed` (the parameters saved beside it are then the true weights), in which case
        it also holds ``perturbed_weights`` (one copy of every parameter with state, in its own dtype)."""
        sd = super().state_dict()
        sd["msam"] = {"globals": {k: v.clone() for k, v in self._globals.items()}, "steps": self._steps,
                      "norm": self.norm, "optimizer": self._kind(),
                      "weights": "unperturbed" if self._unperturbed_depth else "perturbed"}
        if self._unperturbed_depth:
            # the parameters saved beside this dict are w = w~ + s v, which does not give back w~ bitwise: keep
            # w~ (same indices as sd["state"]) so that loading puts the perturbed weights back exactly
            params = [p for g in self.param_groups for p in g["params"]]
            sd["msam"]["perturbed_weights"] = {i: self._perturbed_copies[id(p)].clone()
                                               for i, p in enumerate(params) if id(p) in self._perturbed_copies}
        return sd

    @classmethod
    def _kind(cls) -> str:
        return "AdamWMSAM" if "exp_avg" in cls._buf_keys else "MSAM"

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint of this optimizer class. Everything is checked first (ValueError naming the key;
        nothing changes on failure): the ``msam`` entry, its ``norm`` (must equal this optimizer's), the class,
        group hyperparameters, state keys, shapes and finiteness. A checkpoint taken inside ``unperturbed()``
        goes with unperturbed weights: loading it writes the perturbed weights it carries back into the
        parameters, so both recipes (save model and optimizer outside the block, or both inside it; load the model
        first, then the optimizer) resume the uninterrupted trajectory bitwise."""
        if self._unperturbed_depth:
            raise RuntimeError("load_state_dict() inside unperturbed(): the block's exit would restore the old "
                               "weights; load outside the block")
        extra, globals_, ids, perturbed = self._validated(state_dict)
        sd = {k: v for k, v in state_dict.items() if k != "msam"}
        super().load_state_dict(sd)
        # torch casts floating state to the parameter dtype; our state stays fp32/fp64: restore the exact bits
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for key, value in sd["state"].get(pid, {}).items():
                loc = _local(p)
                self.state[p][key] = value.detach().to(device=loc.device, dtype=_state_dtype(loc),
                                                       copy=True).contiguous()
        device = _local(params[0]).device if params else torch.device("cpu")
        dtype = acc_dtype_of(params)
        G = torch.zeros(_G_SIZE, device=device, dtype=dtype)
        for i, key in enumerate(("scale", "lagged_sq", "step")):
            G[i] = globals_[key]
        self._set_scalars(G)
        with torch.no_grad():
            for pid, p in zip(ids, params):
                if pid in perturbed:
                    _local(p).copy_(perturbed[pid])
        self._steps = extra["steps"]
        self._taken_known, self._probe = False, None

    def _validated(self, state_dict: Any) -> tuple[dict, dict, list, dict]:
        """(the msam entry, its globals as floats, saved param ids in order, perturbed weights by id) or
        ValueError naming the key."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for key in ("state", "param_groups", "msam"):
            if key not in state_dict:
                hint = " (a checkpoint of another optimizer, or saved without etfkern's MSAM state)" \
                    if key == "msam" else ""
                raise ValueError(f"state_dict[{key!r}] is missing{hint}")
        extra = state_dict["msam"]
        if not isinstance(extra, dict):
            raise ValueError(f"state_dict['msam'] must be a dict, got {type(extra).__name__}")
        for key in ("globals", "steps", "norm"):
            if key not in extra:
                raise ValueError(f"state_dict['msam'][{key!r}] is missing")
        kind = extra.get("optimizer", self._kind())
        if kind != self._kind():
            raise ValueError(f"state_dict['msam']['optimizer'] is {kind!r}: a {kind} checkpoint cannot be loaded "
                             f"into {self._kind()}")
        if extra["norm"] != self.norm:
            raise ValueError(f"state_dict['msam']['norm'] is {extra['norm']!r} but this optimizer has "
                             f"norm={self.norm!r}: create it with the checkpoint's norm")
        steps = extra["steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"state_dict['msam']['steps'] must be an integer >= 0, got {steps!r}")
        weights = extra.get("weights", "perturbed")
        if weights not in ("perturbed", "unperturbed"):
            raise ValueError(f"state_dict['msam']['weights'] must be 'perturbed' or 'unperturbed', got {weights!r}")
        globals_ = self._validated_globals(extra["globals"], steps)
        groups, state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(groups, (list, tuple)) or len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict['param_groups'] must list {len(self.param_groups)} groups (as this "
                             f"optimizer), got {len(groups) if isinstance(groups, (list, tuple)) else groups!r}")
        ids, shapes, rho = [], {}, None
        for i, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"state_dict['param_groups'][{i}] must be a dict with a 'params' list")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict['param_groups'][{i}]['params'] has {len(saved['params'])} entries, "
                                 f"the optimizer's group {i} has {len(group['params'])}")
            for key in dict.fromkeys([*self.defaults, *self._group_keys]):
                if key not in saved:
                    raise ValueError(f"state_dict['param_groups'][{i}][{key!r}] is missing (a checkpoint of "
                                     f"another optimizer than {self._kind()}?)")
            try:
                self._validate(dict(saved))
            except ValueError as exc:
                raise ValueError(f"state_dict['param_groups'][{i}]: {exc}") from None
            if rho is not None and saved["rho"] != rho:
                raise ValueError(f"state_dict['param_groups'][{i}]['rho'] is {saved['rho']!r}, group 0 has {rho!r}: "
                                 "rho must be the same in every group")
            rho = saved["rho"]
            for pid, p in zip(saved["params"], group["params"]):
                ids.append(pid)
                shapes[pid] = tuple(_local(p).shape)
        if not isinstance(state, dict):
            raise ValueError(f"state_dict['state'] must be a dict, got {type(state).__name__}")
        for pid, entry in state.items():
            if pid not in shapes:
                raise ValueError(f"state_dict['state'][{pid!r}] belongs to no parameter of state_dict['param_groups']")
            if not isinstance(entry, dict) or set(entry) != set(self._buf_keys):
                got = sorted(entry) if isinstance(entry, dict) else entry
                raise ValueError(f"state_dict['state'][{pid!r}] must hold exactly {list(self._buf_keys)} (the "
                                 f"{self._kind()} state), got {got!r}")
            for key, value in entry.items():
                where = f"state_dict['state'][{pid!r}][{key!r}]"
                if not isinstance(value, Tensor) or not value.is_floating_point():
                    raise ValueError(f"{where} must be a floating-point tensor")
                if tuple(value.shape) != shapes[pid]:
                    raise ValueError(f"{where} has shape {tuple(value.shape)}, its parameter {shapes[pid]}")
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"{where} holds NaN or inf entries")
                if key == "exp_avg_sq" and bool((value < 0).any()):
                    raise ValueError(f"{where} holds negative entries (a second moment is >= 0)")
        perturbed = extra.get("perturbed_weights", {}) if weights == "unperturbed" else {}
        if weights == "unperturbed" and (not isinstance(perturbed, dict) or set(perturbed) != set(state)):
            raise ValueError("state_dict['msam']['perturbed_weights'] must hold one tensor per entry of "
                             "state_dict['state'] (a checkpoint taken inside unperturbed())")
        for pid, value in perturbed.items():
            where = f"state_dict['msam']['perturbed_weights'][{pid!r}]"
            if not isinstance(value, Tensor) or tuple(value.shape) != shapes[pid] or not value.is_floating_point():
                raise ValueError(f"{where} must be a floating-point tensor of shape {shapes[pid]}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{where} holds NaN or inf entries")
        return extra, globals_, ids, perturbed

    def _validated_globals(self, globals_: Any, steps: int) -> dict[str, float]:
        if not isinstance(globals_, dict):
            raise ValueError(f"state_dict['msam']['globals'] must be a dict, got {type(globals_).__name__}")
        if not globals_:  # an optimizer that never stepped
            return {"scale": 0.0, "lagged_sq": 0.0, "step": 0.0}
        values = {}
        for key in ("scale", "lagged_sq", "step"):
            value = globals_.get(key)
            if value is None and key == "step" and self._kind() == "MSAM":
                value = torch.tensor(float(steps))  # checkpoints from before MSAM counted its steps on the device
            where = f"state_dict['msam']['globals'][{key!r}]"
            if value is None:
                raise ValueError(f"{where} is missing")
            if not isinstance(value, Tensor) or value.numel() != 1 or not value.is_floating_point():
                raise ValueError(f"{where} must be a one-element floating-point tensor, got {value!r}")
            x = float(value.reshape(()).item())
            if not math.isfinite(x) or x < 0:
                raise ValueError(f"{where} must be finite and >= 0, got {x}")
            values[key] = x
        return values


class MSAM(_MSAMBase):
    """Momentum-SAM on SGD with momentum (heavy ball or Nesterov, L2 decay at the unperturbed weights).

    Args:
        params: iterable of tensors or param-group dicts (each group may set lr, momentum, weight_decay,
            nesterov; ``rho`` must be the same in every group: ValueError at construction, and at step() if a
            schedule made them differ). A parameter listed twice is a ValueError.
        lr: learning rate >= 0.   momentum: in [0, 1).   rho: perturbation radius >= 0.
        weight_decay: L2 coefficient >= 0, added to the gradient at the unperturbed weights.
        nesterov: Nesterov momentum as torch.optim.SGD (needs momentum > 0).
        norm: "exact" (two passes) or "lagged" (one pass, previous step's norm: an approximation; until a step
            was taken, e.g. while GradScaler skips steps, the exact norm is used).
        norm_group: a process group over which every parameter is sharded (each rank holds a disjoint
            slice): the squared norm is all-reduced over it. DTensor shards are detected without it.
        step_impl: how the Triton backend runs a step: "ops" (the etfkern ops, one launch per param group per
            pass; the measured default) or "plan" (one launch per pass over every tensor, launch tables kept
            between steps, no allocation, capturable; never run on a GPU yet). None: ``ETFKERN_MSAM_STEP``, else
            the dispatch table (etfkern/_core/dispatch.py, msam_step). Other backends ignore it.
    State per parameter: ``momentum_buffer`` (fp32, fp64 for fp64 parameters). Never stored: the unperturbed
    weights (recomputed on demand by :meth:`unperturbed`).

    CUDA graphs (capturable operation): with ``step_impl="plan"`` (Triton backend) a step reads every scalar
    (applied and next scale, lagged norm, step count, grad_scale/found_inf) from device memory and its launch
    tables (addresses, lr/momentum/weight decay/rho per tensor) from device tables whose addresses stay fixed, so
    after a few eager warm-up steps ``opt.step()`` can be captured with ``torch.cuda.graph`` and replayed; the
    replay equals an eager step bitwise. A change of lr/rho/... is copied into the tables by the next eager
    ``step()`` or by :meth:`sync_hyperparameters` (call it before replaying a captured step).
    """

    _buf_keys = ("momentum_buffer",)
    _group_keys = ("momentum", "nesterov")
    _kernel_op = "msam_sgd_step"

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, rho: float = 0.3,
                 weight_decay: float = 0.0, nesterov: bool = False, *, norm: str = "exact",
                 norm_group: Any = None, step_impl: str | None = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, rho=rho, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults, norm, norm_group, step_impl)

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
        return dict(lr=float(group["lr"]), momentum=float(group["momentum"]),
                    weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]))

    def _row(self, group: dict) -> tuple:
        mu, wd = float(group["momentum"]), float(group["weight_decay"])
        return (1.0, mu, 1.0, wd, float(group["lr"]), mu, wd, float(group["nesterov"]), 0.0)

    def _norm_args(self, lists: _Lists) -> tuple:
        h = lists.hyper
        return h["momentum"], [1.0] * len(lists.params), h["weight_decay"]

    def _pass2(self, lists, s_old, s_new, step, grad_scale, found_inf) -> Tensor:
        h = lists.hyper
        return torch.ops.etfkern.msam_sgd_step(lists.params, lists.grads, lists.bufs, s_old, s_new, h["lr"],
                                               h["momentum"], h["weight_decay"], h["nesterov"], grad_scale,
                                               found_inf)


class AdamWMSAM(_MSAMBase):
    """Momentum-SAM around torch.optim.AdamW's update (decoupled weight decay, bias correction), perturbing
    along -m/||m|| with m the first moment: w~ = w - rho m / ||m|| (global norm over all parameters).

    Args: lr >= 0, betas each in [0, 1), eps >= 0, weight_decay >= 0, rho >= 0 (same in every group), ``norm``,
    ``norm_group`` and ``step_impl`` as :class:`MSAM`. State per parameter: ``exp_avg``, ``exp_avg_sq`` (fp32, fp64
    for fp64 parameters); one step counter per optimizer (a 0-dim tensor, skipped steps not counted). CUDA graphs:
    as :class:`MSAM` (the bias corrections are computed on the device from the step count).
    """

    _buf_keys = ("exp_avg", "exp_avg_sq")
    _group_keys = ("betas", "eps")
    _kernel_op = "msam_adamw_step"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, rho: float = 1.0, *, norm: str = "exact",
                 norm_group: Any = None, step_impl: str | None = None) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
                        weight_decay=weight_decay, rho=rho)
        super().__init__(params, defaults, norm, norm_group, step_impl)

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
        b1, b2 = group["betas"]
        return dict(lr=float(group["lr"]), beta1=float(b1), beta2=float(b2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]))

    def _row(self, group: dict) -> tuple:
        b1, b2 = (float(b) for b in group["betas"])
        return (1.0, b1, 1.0 - b1, 0.0, float(group["lr"]), b1, float(group["weight_decay"]), b2, float(group["eps"]))

    def _norm_args(self, lists: _Lists) -> tuple:
        b1 = lists.hyper["beta1"]
        return b1, [1.0 - b for b in b1], [0.0] * len(b1)

    def _pass2(self, lists, s_old, s_new, step, grad_scale, found_inf) -> Tensor:
        h = lists.hyper
        return torch.ops.etfkern.msam_adamw_step(lists.params, lists.grads, lists.bufs, lists.bufs2, s_old, s_new,
                                                 step, h["lr"], h["beta1"], h["beta2"], h["eps"],
                                                 h["weight_decay"], grad_scale, found_inf)


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
