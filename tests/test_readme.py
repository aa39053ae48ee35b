"""The README's API tour runs as written (keeps the documentation true as features land)."""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    # Blocks that need a process group (the distributed tour) are covered by tests/test_distributed.py.
    return [b for b in blocks if "init_process_group" not in b]


BLOCKS = _python_blocks()


def test_readme_has_a_tour():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def _rows(name: str) -> list[dict]:
    import json

    with open(os.path.join(ROOT, "bench", "results", name)) as f:
        data = json.load(f)
    return data["rows"] if "rows" in data else data


def _row(rows: list[dict], **match) -> dict:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, match
    return found[0]


def test_readme_benchmark_numbers_match_the_result_files():
    """The 'Latest CPU measurements' table quotes bench/results/*.json: every quoted number is the file's, rounded."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    ce = _rows("spherical_ce-amd-epyc-x2-2026-11-23.json")
    s1, s2 = "4096x128x16384", "2048x512x32768"

    def ratio(shape, impl, op="ce_fwd_bwd"):
        return f"{_row(ce, shape=shape, impl=impl, op=op)['ratio_to_etfkern']:.2f}x"

    banks = _rows("banks-amd-epyc-x2-2026-11-23.json")
    b = {r["shape"]: r for r in banks if r["op"] == "ebv_bank" and r["impl"] == "auto"}
    coll = {r["shape"].split(",N=")[0] + r["shape"][-7:]: r for r in _rows("collapse-amd-epyc-x2-2026-11-23.json")
            if r["op"] == "summary"}
    c256, c512, c64 = coll["C=8192,d=256float32"], coll["C=16384,d=512float32"], coll["C=8192,d=256float64"]
    msam = _rows("msam-amd-epyc-x2-2026-11-23.json")

    def x(shape, impl, key="x_sgd_foreach"):
        return f"{_row(msam, shape=shape, impl=impl)[key]:.2f}x"

    stats = _row(banks, op="bank_stats", impl="bank_stats (tiled)")
    quick = _rows("amd-epyc-x2-2026-11-23-quick.json")
    quick_minutes = sum(fam["seconds"] for fam in quick["families"].values()) / 60
    quick_collapse = _row(quick["families"]["collapse"]["rows"], op="summary")
    expected = [
        f"{_row(ce, shape=s1, impl='etfkern', op='ce_fwd_bwd')['ms']:.0f} ms, extra memory "
        f"{_row(ce, shape=s1, impl='etfkern', op='ce_fwd_bwd')['peak_over_logits']:.3f}x the logits",
        f"eager {ratio(s1, 'eager')} slower, torch.compile (inductor) {ratio(s1, 'torch.compile')} slower",
        f"{_row(ce, shape=s2, impl='etfkern', op='ce_fwd_bwd')['ms']:.0f} ms, "
        f"{_row(ce, shape=s2, impl='etfkern', op='ce_fwd_bwd')['peak_over_logits']:.3f}x the logits",
        f"eager {ratio(s2, 'eager')} slower, torch.compile {ratio(s2, 'torch.compile')} slower",
        f"eager {ratio(s1, 'eager', 'ce_fwd_bwd_arc')} / {ratio(s1, 'eager', 'ce_fwd_bwd_bank_grad')[:-1]}x slower",
        f"eager matmul+topk {ratio(s1, 'eager', 'nearest')} slower",
        f"{b['C=2000 d=64']['max_abs_cos']:.3f} = {b['C=2000 d=64']['ratio_welch']:.3f}x Welch",
        f"{b['C=1000 d=100']['max_abs_cos']:.4f} = {b['C=1000 d=100']['ratio_welch']:.3f}x Welch",
        f"{b['C=1000 d=200']['max_abs_cos']:.5f} = {b['C=1000 d=200']['ratio_welch']:.2f}x Welch",
        f"{b['C=1000 d=500']['max_abs_cos']:.5f} = {b['C=1000 d=500']['ratio_welch']:.2f}x",
        f"{b['C=10000 d=64']['max_abs_cos']:.4f} = {b['C=10000 d=64']['ratio_welch']:.2f}x Welch",
        f"{b['C=5000 d=128']['max_abs_cos']:.4f} = {b['C=5000 d=128']['ratio_welch']:.2f}x",
        f"{stats['speed_vs_dense']:.2f}x faster, {stats['memory_vs_dense']:.2f}x the memory",
        f"{c256['one_pass_vs_two_pass']:.2f}x (d=256) / {c512['one_pass_vs_two_pass']:.2f}x (d=512) faster; "
        f"every Gram metric: {c256['one_pass_gram_metrics_vs_two_pass_nc1']:.2f}x / "
        f"{c512['one_pass_gram_metrics_vs_two_pass_nc1']:.2f}x",
        f"float64 two-pass: {c256['one_pass_vs_two_pass_f64']:.2f}x / {c512['one_pass_vs_two_pass_f64']:.2f}x slower",
        f"| {c64['one_pass_vs_two_pass']:.2f}x faster |",
        f"{x('10M float32', 'msam_exact')} / {x('10M bfloat16', 'msam_exact')} torch SGD foreach "
        f"(1M: {x('1M float32', 'msam_exact')} / {x('1M bfloat16', 'msam_exact')})",
        f"per-tensor loop {x('10M float32', 'per_tensor_loop', 'x_msam_exact')} / "
        f"{x('10M bfloat16', 'per_tensor_loop', 'x_msam_exact')} slower",
        f"{x('10M float32', 'msam_lagged')} / {x('10M bfloat16', 'msam_lagged')} torch SGD foreach",
        f"{x('10M float32', 'adamw_msam', 'x_adamw_fused')} / {x('10M bfloat16', 'adamw_msam', 'x_adamw_fused')} "
        f"torch AdamW fused (1M: {x('1M float32', 'adamw_msam', 'x_adamw_fused')} / "
        f"{x('1M bfloat16', 'adamw_msam', 'x_adamw_fused')})",
        f"about {quick_minutes:.1f} minutes, 2 threads",
        f"{quick_collapse['one_pass_vs_two_pass']:.2f}x inside `run_all --quick`",
    ]
    missing = [e for e in expected if e not in text]
    assert not missing, missing
