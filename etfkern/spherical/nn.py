"""Modules built on the fused kernels: :class:`EBVHead` (fixed-bank classifier head)."""
from __future__ import annotations

import torch
from torch import nn

from etfkern.spherical import _check_tau_metric, nearest, spherical_cross_entropy

__all__ = ["EBVHead"]


class EBVHead(nn.Module):
    """Classifier head over a FIXED bank of vectors (EBV, simplex ETF, sparse ETF).

    ``bank`` (C, d) is stored as a buffer (moves with .to(), saved in the state dict, never trained).
    ``forward(features (N, d), target (N,), **kw)`` -> loss of :func:`etfkern.spherical_cross_entropy`
    (kw: reduction, target_b, lam, ignore_index, validate, or overrides of tau / metric / label_smoothing).
    ``predict(features, k=1)`` -> class indices by cosine: (N,) for k == 1, else (N, k) best first.
    """

    bank: torch.Tensor

    def __init__(self, bank: torch.Tensor, *, tau: float = 0.07, metric: str = "cos",
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not isinstance(bank, torch.Tensor) or bank.dim() != 2 or not bank.is_floating_point():
            raise ValueError(f"bank must be a floating (C, d) tensor, got {bank!r:.80}")
        if bank.shape[0] == 0:
            raise ValueError("bank must have at least one row (C >= 1)")
        _check_tau_metric(tau, metric)
        if not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool) \
                or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.register_buffer("bank", bank.detach().clone())
        self.tau = float(tau)
        self.metric = metric
        self.label_smoothing = float(label_smoothing)

    @property
    def num_classes(self) -> int:
        return self.bank.shape[0]

    def forward(self, features: torch.Tensor, target: torch.Tensor, **kw) -> torch.Tensor:
        kw.setdefault("tau", self.tau)
        kw.setdefault("metric", self.metric)
        kw.setdefault("label_smoothing", self.label_smoothing)
        bank = self.bank if self.bank.dtype == features.dtype else self.bank.to(features.dtype)
        return spherical_cross_entropy(features, bank, target, **kw)

    @torch.no_grad()
    def predict(self, features: torch.Tensor, k: int = 1) -> torch.Tensor:
        bank = self.bank if self.bank.dtype == features.dtype else self.bank.to(features.dtype)
        idx = nearest(features, bank, k=k)[1]
        return idx[:, 0] if k == 1 else idx

    def extra_repr(self) -> str:
        return (f"num_classes={self.bank.shape[0]}, dim={self.bank.shape[1]}, tau={self.tau}, "
                f"metric={self.metric!r}, label_smoothing={self.label_smoothing}")
