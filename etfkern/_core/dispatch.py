"""Which kernel variant runs on CUDA: one table, filled from measured GPU results, each row citing its file.

The backend (:mod:`etfkern._core.backend`) picks *which backend* runs an op; this table picks, inside a
backend, *which variant* of its kernel runs for a given problem (dtype, sizes, metric, gradient needs). A
variant that has never run on a GPU is never a default here: every row names the result file whose numbers put
it there. An explicit request (an environment variable documented by the op, or a keyword argument) always
wins over the table.

Adding a measurement: run the sweep in ``tools/gpu_check.sh``, commit its results under ``bench/results/``, then
add or change the rows below with the numbers and the file they came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Measured:
    """One dispatch rule: for problems matching ``when``, run ``variant``.

    when      feature -> condition: a value (equality), a tuple of values (membership), or a callable(value) -> bool
    variant   the name of the winning variant (the op's own vocabulary)
    evidence  the measured numbers that justify the row, one line
    source    the result file under ``bench/results/`` those numbers come from
    """
    variant: str
    evidence: str
    source: str
    when: dict[str, Any] = field(default_factory=dict)

    def matches(self, features: dict[str, Any]) -> bool:
        for key, cond in self.when.items():
            value = features.get(key)
            if callable(cond):
                if not cond(value):
                    return False
            elif isinstance(cond, tuple):
                if value not in cond:
                    return False
            elif value != cond:
                return False
        return True


def at_least(bound: int | float) -> Callable[[Any], bool]:
    """Condition: value >= bound."""
    return lambda v: v is not None and v >= bound


def below(bound: int | float) -> Callable[[Any], bool]:
    """Condition: value < bound."""
    return lambda v: v is not None and v < bound


_H200_2026_12_04 = "bench/results/h200-2026-12-04/README.md"

# op -> (default variant when no row matches, rows tried in order: first match wins)
TABLE: dict[str, tuple[str, list[Measured]]] = {}


def register_table(op: str, default: str, rows: list[Measured]) -> None:
    """Install the rows of ``op`` (each family's rows live below, in one place)."""
    TABLE[op] = (default, rows)


def choose_variant(op: str, **features: Any) -> tuple[str, Measured | None]:
    """(variant, the row that chose it or None for the op's default) for a problem described by ``features``."""
    default, rows = TABLE[op]
    for row in rows:
        if row.matches(features):
            return row.variant, row
    return default, None


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16', 'float16', 'float32', 'float64' (the spelling the result files use)."""
    return str(dtype).removeprefix("torch.")


# ==========================================================================================================
# spherical: the "cos" fixed-shift class loop of the Triton backend on CUDA
#   variants: "fused" (the Triton class-loop kernel), "mm" (tiled torch GEMMs: cos_tiles on the device)
#   features: dtype (str), d, C, N, metric, need_grad, bank_grad
# ==========================================================================================================
register_table("spherical_class_loop", "fused", [
    Measured("mm", when={"metric": "cos", "d": at_least(512)}, source=_H200_2026_12_04,
             evidence="bf16 fwd+bwd ms, fused vs mm: 8192x1024x131072 79.1 vs 19.6; 16384x4096x32000 111.3 vs 26.4; "
                      "4096x4096x262144 549.3 vs 39.5; 32768x2048x65536 224.2 vs 58.6; 8192x512x32768 6.0 vs 3.9"),
])
