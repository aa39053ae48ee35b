"""Modules built on the fused kernels: :class:`EBVHead` (fixed-bank classifier head)."""
from __future__ import annotations

import math

import torch
from torch import nn

from etfkern.spherical import _check_tau_metric, nearest, spherical_cross_entropy

__all__ = ["EBVHead"]


class EBVHead(nn.Module):
    """Classifier head over a FIXED bank of vectors (EBV, simplex ETF, sparse ETF).

    ``bank`` (C, d) is stored as a buffer (moves with .to(), saved in the state dict, never trained).
    ``forward(features (..., d), target (...), **kw)`` -> loss of :func:`etfkern.spherical_cross_entropy`
    (features (N, d) or a language model's (B, T, d); kw: reduction, target_b, lam, ignore_index, validate, or
    overrides of tau / metric / label_smoothing).
    ``predict(features (..., d), k=1)`` -> class indices by cosine: (...) for k == 1, else (..., k) best first.

    ``learnable_tau=True`` makes the temperature a parameter, stored as ``log_tau`` (tau = exp(log_tau) stays
    positive under any optimizer step) and starting at ``tau``; ``head.tau`` is then a 0-dim tensor in the graph.
    Each forward reads tau on the host once (one device sync on CUDA; a graph break under torch.compile).
    """

    bank: torch.Tensor

    def __init__(self, bank: torch.Tensor, *, tau: float = 0.07, metric: str = "cos",
                 label_smoothing: float = 0.0, learnable_tau: bool = False) -> None:
        super().__init__()
        if not isinstance(bank, torch.Tensor) or bank.dim() != 2 or not bank.is_floating_point():
            raise ValueError(f"bank must be a floating (C, d) tensor, got {bank!r:.80}")
        if bank.shape[0] == 0:
            raise ValueError("bank must have at least one row (C >= 1)")
        tau = _check_tau_metric(tau, metric)
        if not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool) \
                or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if not isinstance(learnable_tau, bool):
            raise ValueError(f"learnable_tau must be a bool, got {learnable_tau!r}")
        self.register_buffer("bank", bank.detach().clone())
        self._cast: tuple | None = None  # (key, bank cast to another dtype): see _bank_for
        self._tau = tau
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau), dtype=torch.float32)) if learnable_tau else None
        self.metric = metric
        self.label_smoothing = float(label_smoothing)

    @property
    def tau(self) -> float | torch.Tensor:
        """The temperature: a float, or exp(log_tau) (a 0-dim tensor with a gradient) when learnable."""
        return self.log_tau.exp() if self.log_tau is not None else self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        """Set the temperature (a learnable one is set in place: log_tau <- log(value))."""
        value = _check_tau_metric(value, self.metric)
        if self.log_tau is None:
            self._tau = value
        else:
            with torch.no_grad():
                self.log_tau.fill_(math.log(value))

    @property
    def num_classes(self) -> int:
        return self.bank.shape[0]

    def _bank_for(self, features: torch.Tensor) -> torch.Tensor:
        """The bank in the features' dtype. A cast copy is kept until the bank changes (dtype, device, version,
        storage), so that a mixed-precision head does not re-read, re-cast and re-check the bank on every call."""
        if self.bank.dtype == features.dtype or not isinstance(features, torch.Tensor):
            return self.bank
        if torch.compiler.is_compiling():
            return self.bank.to(features.dtype)
        key = (features.dtype, self.bank.device, self.bank._version, self.bank.data_ptr())
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, self.bank.to(features.dtype))
        return self._cast[1]

    def forward(self, features: torch.Tensor, target: torch.Tensor, **kw) -> torch.Tensor:
        kw.setdefault("tau", self.tau)
        kw.setdefault("metric", self.metric)
        kw.setdefault("label_smoothing", self.label_smoothing)
        return spherical_cross_entropy(features, self._bank_for(features), target, **kw)

    @torch.no_grad()
    def predict(self, features: torch.Tensor, k: int = 1) -> torch.Tensor:
        idx = nearest(features, self._bank_for(features), k=k)[1]
        return idx[..., 0] if k == 1 else idx

    def extra_repr(self) -> str:
        tau = f"{float(self.log_tau.detach().exp()):g} (learnable)" if self.log_tau is not None else f"{self._tau}"
        return (f"num_classes={self.bank.shape[0]}, dim={self.bank.shape[1]}, tau={tau}, "
                f"metric={self.metric!r}, label_smoothing={self.label_smoothing}")
