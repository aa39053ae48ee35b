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
# spherical: which class loop the Triton backend runs on CUDA, and which nearest()
#   "spherical_class_loop" variants: "fused" (the Triton class-loop kernel), "mm" (tiled torch GEMMs: cos_tiles on
#   the device), "chunked" (cuBLAS GEMM per row chunk + one Triton pass over the chunk's logits)
#   features: dtype (str), d, C, N, metric, need_grad, bank_grad
#   "spherical_nearest" variants: "fused" (Triton top-k kernel), "chunked" (GEMM per chunk + torch topk);
#   features: dtype, d, C, N, k
# Rows measured by bench/spherical.py --device cuda come first: it writes bench/results/spherical-dispatch.json
# (one entry per measured problem: the fastest variant, ranges of d, C, N around the measured shape, the numbers and
# the result file); the hand-written rows below it are the fallback.
# ==========================================================================================================
SPHERICAL_DISPATCH_JSON = "bench/results/spherical-dispatch.json"


def _range(bounds: list) -> Callable[[Any], bool]:
    lo, hi = bounds
    return lambda v: v is not None and lo <= v < hi


def load_measured(path: str) -> dict[str, list[Measured]]:
    """op -> rows from a dispatch JSON written by a benchmark sweep ({"entries": [{"op", "variant", "evidence",
    "source", "when": {feature: value | [lo, hi] (a half-open range)}}]}). A missing file (an installed wheel,
    a tree without GPU results) gives no rows."""
    import json
    from pathlib import Path

    file = Path(path) if Path(path).is_absolute() else Path(__file__).resolve().parents[2] / path
    if not file.is_file():
        return {}
    rows: dict[str, list[Measured]] = {}
    for e in json.loads(file.read_text()).get("entries", []):
        when = {k: _range(v) if isinstance(v, list) else v for k, v in e["when"].items()}
        rows.setdefault(e["op"], []).append(Measured(e["variant"], evidence=e["evidence"], source=e["source"],
                                                     when=when))
    return rows


_SPHERICAL_MEASURED = load_measured(SPHERICAL_DISPATCH_JSON)
register_table("spherical_class_loop", "fused", _SPHERICAL_MEASURED.get("spherical_class_loop", []) + [
    Measured("mm", when={"metric": "cos", "d": at_least(512)}, source=_H200_2026_12_04,
             evidence="bf16 fwd+bwd ms, fused vs mm: 8192x1024x131072 79.1 vs 19.6; 16384x4096x32000 111.3 vs 26.4; "
                      "4096x4096x262144 549.3 vs 39.5; 32768x2048x65536 224.2 vs 58.6; 8192x512x32768 6.0 vs 3.9"),
])
register_table("spherical_nearest", "fused", _SPHERICAL_MEASURED.get("spherical_nearest", []))

# ==========================================================================================================
# banks: the Triton kernel of bank_pair_stats (bank_stats) and the dot precision of ebv_dir (ebv_bank's
# optimiser step) on CUDA. Overrides: ETFKERN_BANK_STATS_KERNEL, ETFKERN_EBV_DIR_PRECISION (etfkern.banks).
#   bank_pair_stats variants: "rows" (row block x all column blocks, float32 FFMA: the layout that ran on the
#     H200, 4.7 s at C=131072 d=1024 and 9.7 ms at C=4000 d=128, with the histogram fix of issue 15 not yet
#     re-run), "tiles-ieee", "tiles-tf32x3" (one program per upper-triangle tile; never ran on a GPU)
#   ebv_dir variants: "ieee" (float32 FFMA, the op's float32 contract: the TF32 it replaces failed the float32
#     tests on the H200; same layout, not yet re-run), "tf32" (32-row blocks: the layout that ran, 7 s a step at
#     (100k, 1000); ebv_bank's optimiser uses it), "tf32-wide", "tf32x3" (64-row blocks; never ran on a GPU)
#     "mm", "mm-ieee" (per row chunk: cuBLAS Gram, one Triton epilogue, cuBLAS P @ W; "mm" with TF32 GEMMs;
#     never ran on a GPU)
#   bank_pair_stats also "mm-ieee", "mm-tf32x3" (cuBLAS Gram of upper-triangle row chunks + Triton epilogue;
#     never ran on a GPU)
#   "ebv_optimiser_dir": the ebv_dir variant ebv_bank's optimiser runs (a descent direction: any precision, the
#     result is rescored exactly); default "tf32", the one measured (7 s a step at (100k, 1000))
#   features: C, d, dtype (str)
# Rows measured by bench/banks.py --device cuda come first: it writes bench/results/banks-dispatch.json (per
# measured shape the fastest variant that passed its accuracy check, citing its result file). No hand-written
# rows: no measurement puts a candidate ahead of the defaults yet.
# ==========================================================================================================
BANKS_DISPATCH_JSON = "bench/results/banks-dispatch.json"
_BANKS_MEASURED = load_measured(BANKS_DISPATCH_JSON)
register_table("bank_pair_stats", "rows", _BANKS_MEASURED.get("bank_pair_stats", []))
register_table("ebv_dir", "ieee", _BANKS_MEASURED.get("ebv_dir", []))
register_table("ebv_optimiser_dir", "tf32", _BANKS_MEASURED.get("ebv_optimiser_dir", []))


# ==========================================================================================================
# collapse: which scatter product the Triton collapse_update runs on CUDA, and the pair kernel's Gram precision
#   "collapse_update_product" variants (triton_kernels/collapse.py::_product_mode): "triton" (fused scatter GEMM),
#   "mm" (16-bit centred operand + cuBLAS), "split" (float64-centred bfloat16 pieces + cuBLAS), "split_tri" (the
#   same pieces, Triton upper-triangle GEMM); features: dtype (str), d, N (batch rows)
#   "collapse_pair_precision" variants: "tf32x3", "bf16x3"; features: K (classes seen), d
# No rows yet: no variant but the defaults has run on a GPU. bench/collapse.py --device cuda measures every one
# (ETFKERN_COLLAPSE_PRODUCT / ETFKERN_COLLAPSE_PAIR_PRECISION select them meanwhile).
# ==========================================================================================================
register_table("collapse_update_product", "triton", [])
register_table("collapse_pair_precision", "tf32x3", [])

# ==========================================================================================================
# msam: how MSAM/AdamWMSAM run a step on the Triton backend. Override: the optimizer's step_impl keyword, or
# ETFKERN_MSAM_STEP=ops|plan (etfkern.msam.optim).
#   variants: "ops" (the etfkern::msam_* ops, one launch per param group per pass plus torch ops around them: the
#     path that ran on the H200, exact 0.995 ms vs SGD(fused=True) 0.077 ms at 10M fp32), "plan" (StepPlan: one
#     launch per pass over every tensor, no allocation, capturable in a CUDA graph; never ran on a GPU)
#   features: numel (int), dtype (str)
# No rows yet: bench/msam.py --device cuda times both (msam_* and msam_*_plan / *_graph rows).
# ==========================================================================================================
register_table("msam_step", "ops", [])
