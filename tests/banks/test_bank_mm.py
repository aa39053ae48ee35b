"""The "mm" bank kernels (issue 18): a torch GEMM per chunk of rows + one Triton epilogue per chunk.

bank_pair_stats / bank_pair_select "mm-ieee" and "mm-tf32x3", ebv_dir "mm" and "mm-ieee", against the float64
references in etfkern.banks.reference (Triton interpreter on CPU, compiled kernels + cuBLAS on CUDA), at odd
shapes, with one chunk and with many (ETFKERN_BANK_CHUNK_MIB forces tiny chunks); the TF32 split and the chunk
plan on their own; the GPU sweep's dispatch entries. In test_banks.py: the sm_90 build of the epilogues
(test_mm_epilogues_compile_for_sm90), bank_stats' p99.9 plan on them (test_bank_stats_tiled_plan_matches_dense) and
every registered variant in the older parametrised tests.
"""
from __future__ import annotations

import pytest
import torch

import etfkern
from etfkern import banks
from etfkern.banks import reference as ref

from conftest import backends_for

MM_STATS = tuple(k for k in banks.PAIR_STATS_KERNELS if k.startswith("mm"))
MM_DIR = tuple(v for v in banks.DIR_VARIANTS if v.startswith("mm"))
CHUNK_ENV = "ETFKERN_BANK_CHUNK_MIB"


def _tk(device: str | None = None):
    """The Triton bank launchers; skips where they cannot run on ``device`` ("cpu": only in the interpreter)."""
    pytest.importorskip("triton")
    if device == "cpu" and "triton" not in backends_for("bank_pair_stats", "cpu"):
        pytest.skip("no Triton interpreter here (CUDA machine): the kernels run on CPU tensors only in it")
    from etfkern.triton_kernels import banks as tk

    return tk


def _unit(c: int, d: int, device: str = "cpu", noncontig: bool = False) -> torch.Tensor:
    w = torch.randn(d, c, dtype=torch.float64).T if noncontig else torch.randn(c, d, dtype=torch.float64)
    return (w / w.norm(dim=1, keepdim=True)).to(device)


def _chunk_env(monkeypatch, c: int, rows: int | None) -> None:
    """ETFKERN_BANK_CHUNK_MIB for chunks of ``rows`` full-width rows (None: the default budget, one chunk here)."""
    if rows is None:
        monkeypatch.delenv(CHUNK_ENV, raising=False)
    else:
        monkeypatch.setenv(CHUNK_ENV, repr(rows * c * 4 / 2**20))


# ----------------------------------------------------------------------------------------------------------
# Plumbing: the TF32 split, the chunk plan, the matmul precision switch
# ----------------------------------------------------------------------------------------------------------
def test_split_tf32_is_exact():
    tk = _tk()
    w = torch.cat([torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,)).float(),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-40, -3e-42, 3.4e38, float(torch.finfo(torch.float32).tiny)])])
    hi, lo = tk.split_tf32(w)
    assert hi.dtype == lo.dtype == torch.float32
    assert torch.equal((hi + lo).view(torch.int32), w.view(torch.int32))  # bitwise, signed zeros included
    assert ((hi.view(torch.int32) & 0x1FFF) == 0).all()  # 13 low mantissa bits clear: a TF32 number
    assert torch.equal(lo.double(), w.double() - hi.double())  # lo is exact, not rounded
    normal = w.abs() >= torch.finfo(torch.float32).tiny  # below it hi may be 0 and lo the whole subnormal
    assert (lo.abs() < hi.abs() * 2.0**-10)[normal].all() and normal.sum() > 1000
    two_d = torch.randn(5, 3).T  # non-contiguous input
    hi2, lo2 = tk.split_tf32(two_d)
    assert torch.equal(hi2 + lo2, two_d)
    with pytest.raises(ValueError, match="float32"):
        tk.split_tf32(w.double())


@pytest.mark.parametrize("c", [1, 2, 7, 100, 1000])
@pytest.mark.parametrize("mib", [1e-6, 1e-4, 1e-3, 0.05, 1024.0])
def test_chunk_plan_covers_every_row_once_within_budget(c, mib):
    tk = _tk()
    budget = int(mib * 2**20) // 4
    for triangle in (True, False):
        plan = tk.chunk_plan(c, triangle, mib)
        rows = [r for r0, r1 in plan for r in range(r0, r1)]
        assert rows == list(range(c - 1 if triangle else c))
        for r0, r1 in plan:
            width = c - r0 if triangle else c
            assert r1 - r0 == 1 or (r1 - r0) * width <= budget
            # chunks are as tall as the budget allows, in multiples of 16 rows when 16 fit (the last may be shorter)
            fit = budget // width
            assert r1 == (c - 1 if triangle else c) or r1 - r0 == (fit // 16 * 16 if fit >= 16 else max(1, fit))
    if c > 1:
        assert len(tk.chunk_plan(c, True, 1024.0)) == 1  # a bank that fits is ONE chunk


def test_chunk_plan_keeps_one_alignment_at_the_target_shapes():
    """At bank_stats' C=131072 and C=32768 every chunk starts at a multiple of 16 rows, so every chunk's width
    (the epilogue's row stride) has C's alignment: one compile of each epilogue serves every chunk."""
    tk = _tk()
    for c in (131072, 32768, 131071):
        plan = tk.chunk_plan(c, True, 1024.0)
        assert len(plan) > 1 and all(r0 % 16 == 0 for r0, _ in plan)


def test_chunk_budget_environment(monkeypatch):
    tk = _tk()
    assert tk.CHUNK_ENV == CHUNK_ENV
    monkeypatch.delenv(tk.CHUNK_ENV, raising=False)
    assert tk.chunk_mib() == tk.DEFAULT_CHUNK_MIB == 1024.0
    monkeypatch.setenv(tk.CHUNK_ENV, "0.5")
    assert tk.chunk_mib() == 0.5
    w = _unit(9, 4).float()
    for bad in ("0", "-1", "lots", "nan", "inf"):
        monkeypatch.setenv(tk.CHUNK_ENV, bad)
        with pytest.raises(ValueError, match=tk.CHUNK_ENV):
            tk.chunk_mib()
        with pytest.raises(ValueError, match=tk.CHUNK_ENV):
            tk.ebv_dir(w, 2.0, variant="mm")
        with pytest.raises(ValueError, match=tk.CHUNK_ENV):
            tk.pair_stats(w, 4, 0.0, 1.0, kernel="mm-ieee")


def test_cuda_matmul_precision_sets_and_restores_torch_flag():
    """The switch sets torch's CUDA matmul flag inside the block and restores it after, also on an exception, and
    leaves the legacy allow_tf32 readable (torch refuses to read it after a mix of the two APIs). Off CUDA it does
    nothing. Only the flag is checked here (no GPU): the GEMMs' precision is the GPU sweep's accuracy check."""
    tk = _tk()
    flags = torch.backends.cuda.matmul
    new_api = hasattr(flags, "fp32_precision")
    read = (lambda: flags.fp32_precision) if new_api else (lambda: flags.allow_tf32)
    before = read()
    legacy_before = flags.allow_tf32
    for precision, want in (("tf32", "tf32" if new_api else True), ("ieee", "ieee" if new_api else False)):
        with tk.cuda_matmul_precision(torch.device("cuda"), precision):
            assert read() == want
        assert read() == before and flags.allow_tf32 == legacy_before
        with pytest.raises(RuntimeError, match="boom"):
            with tk.cuda_matmul_precision("cuda", precision):
                raise RuntimeError("boom")
        assert read() == before and flags.allow_tf32 == legacy_before
        with tk.cuda_matmul_precision(torch.device("cpu"), precision):
            assert read() == before
    with pytest.raises(ValueError, match="precision"):
        with tk.cuda_matmul_precision("cuda", "bf16"):
            pass
    assert read() == before


# ----------------------------------------------------------------------------------------------------------
# bank_pair_stats / bank_pair_select
# ----------------------------------------------------------------------------------------------------------
STATS_BINS = ((62, 0.1, 0.9), (banks.GPU_HIST_BINS, 0.0, 1.0), (1, 0.0, 2.0))


def _near_edges(a: torch.Tensor, bins: int, lo: float, hi: float, margin: float) -> int:
    """How many of the float64 values ``a`` (>= 0) lie within ``margin`` of a bin edge lo + k (hi - lo) / bins,
    0 <= k <= bins, other than 0 itself: the only values float32 may move to another slot."""
    x = (a - lo) * (bins / (hi - lo))
    k = x.round()
    edge = lo + k * ((hi - lo) / bins)
    return int((((x - k).abs() < margin * bins / (hi - lo)) & (k >= 0) & (k <= bins) & (edge > margin)).sum())


def _bank_off_edges(c: int, d: int, device: str, noncontig: bool) -> torch.Tensor:
    """Unit rows (seeded) none of whose pairs lies within 2e-6 of a bin edge of STATS_BINS (a float32 product
    may land on the other side of such an edge), so that the histograms must equal the reference's exactly.
    d = 1: rows of random length in (0.01, 0.99) and sign (unit rows would make every |<w_i, w_j>| = 1)."""
    for seed in range(50):
        torch.manual_seed(seed)
        w = _unit(c, d, device, noncontig)
        if d == 1:
            w = w * (0.01 + 0.98 * torch.rand(c, 1, dtype=torch.float64, device=device))
        a = (w @ w.T).abs()[tuple(torch.triu_indices(c, c, offset=1, device=device))]
        if all(_near_edges(a, *spec, 2e-6) == 0 for spec in STATS_BINS):
            return w
    raise AssertionError("no seed keeps the pairs off the bin edges")


# (C, d, rows per chunk or None for one chunk, non-contiguous): C not a multiple of the chunk or the tiles, d odd,
# C = 1, C = 2, d = 1, one row per chunk
STATS_SHAPES = [(37, 13, None, False), (37, 13, 5, True), (53, 1, None, False), (29, 7, 1, False), (2, 1, None, False),
                (2, 3, 1, False), (1, 5, None, False)]


@pytest.mark.parametrize("kernel", MM_STATS)
@pytest.mark.parametrize("c,d,rows,noncontig", STATS_SHAPES)
def test_mm_pair_stats_match_reference(device, monkeypatch, kernel, c, d, rows, noncontig):
    """max and float64 sum within float32 accuracy, and the histogram IDENTICAL to the reference's, for bins + 2 =
    64 slots (the trash slot is the 65th of 128), the GPU plan's 253 and bank_max_abs_cos' 1. On CPU the bank has
    no pair within 2e-6 of a bin edge; on CUDA (C=301: several epilogue programs and column tiles, ~45k pairs, so
    some lie that close) each such pair may move one slot, nothing else may."""
    tk = _tk(device)
    if device == "cuda":
        c = {37: 301, 53: 257}.get(c, c)
    _chunk_env(monkeypatch, c, rows)
    w = _bank_off_edges(c, d, device, noncontig) if device == "cpu" else _unit(c, d, device, noncontig)
    a = (w @ w.T).abs()[tuple(torch.triu_indices(c, c, offset=1, device=device))]
    pairs = c * (c - 1) // 2
    for bins, lo, hi in STATS_BINS:
        want = ref.bank_pair_stats(w, bins, lo, hi)
        mx, total, hist = tk.pair_stats(w.float(), bins, lo, hi, kernel=kernel)
        assert mx.dtype == total.dtype == torch.float64 and hist.dtype == torch.int64 and hist.shape == (bins + 2,)
        assert int(hist.sum()) == pairs
        torch.testing.assert_close(mx, want[0], atol=2e-6, rtol=0)
        torch.testing.assert_close(total, want[1], atol=2e-6 * max(pairs, 1), rtol=2e-6)
        near = _near_edges(a, bins, lo, hi, 2e-6)
        assert device == "cuda" or near == 0  # CPU (_bank_off_edges): the histograms must be equal
        assert int((hist - want[2]).abs().sum()) <= 2 * near, (kernel, bins, near, hist, want[2])


@pytest.mark.parametrize("kernel", MM_STATS)
@pytest.mark.parametrize("c,d,rows", [(37, 13, None), (41, 5, 6), (2, 1, None), (1, 4, None)])
def test_mm_pair_select_matches_reference(device, monkeypatch, kernel, c, d, rows):
    """The sorted values of one histogram slot and their count, one chunk or many; more than ``capacity`` of them
    gives the count and only +inf."""
    tk = _tk(device)
    _chunk_env(monkeypatch, c, rows)
    w = _unit(c, d, device)
    bins, lo, hi = 8, 0.1, 0.9
    hist = ref.bank_pair_stats(w, bins, lo, hi)[2]
    for slot in (0, 2, 5, bins + 1):
        want, want_n = ref.bank_pair_select(w, bins, lo, hi, slot, 1000)
        got, n = tk.pair_select(w.float(), bins, lo, hi, slot, 1000, kernel=kernel)
        assert got.dtype == torch.float64 and got.shape == (1000,) and n.dtype == torch.int64
        assert int(n) == int(want_n) == int(hist[slot]), (kernel, slot)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
        if int(n) > 1:
            few, n_few = tk.pair_select(w.float(), bins, lo, hi, slot, int(n) - 1, kernel=kernel)
            assert int(n_few) == int(n) and torch.isinf(few).all()


# ----------------------------------------------------------------------------------------------------------
# ebv_dir
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", MM_DIR)
@pytest.mark.parametrize("c,d,rows,noncontig", [(37, 13, None, False), (37, 13, 4, True), (29, 1, 1, False),
                                                (2, 3, None, False), (1, 5, None, False), (17, 40, 16, False)])
def test_mm_ebv_dir_matches_reference(device, monkeypatch, variant, c, d, rows, noncontig):
    """Direction and rowmax against float64 (float32 bounds; "mm" on CUDA runs TF32 GEMMs: TF32's bound), one
    chunk or many (ragged last chunk), float32 and float64 banks (outputs in the bank's dtype)."""
    tk = _tk(device)
    _chunk_env(monkeypatch, c, rows)
    w = _unit(c, d, device, noncontig)
    beta = 7.5
    dir_ref, rowmax_ref = ref.ebv_dir(w, beta)
    for dtype in (torch.float32, torch.float64):
        got_dir, got_max = tk.ebv_dir(w.to(dtype), beta, variant=variant)
        assert got_dir.dtype == got_max.dtype == dtype and got_dir.shape == (c, d) and got_max.shape == (c,)
        if device == "cuda" and variant == "mm":  # |cos error| <= 2 * 2^-10 for unit rows (TF32 operands)
            torch.testing.assert_close(got_max.double(), rowmax_ref, atol=3e-3, rtol=0)
            scale = float(dir_ref.abs().max()) if c > 1 else 1.0
            torch.testing.assert_close(got_dir.double(), dir_ref, atol=3e-2 * scale, rtol=3e-2)
        else:
            torch.testing.assert_close(got_max.double(), rowmax_ref, atol=2e-5, rtol=0)
            torch.testing.assert_close(got_dir.double(), dir_ref, atol=2e-4, rtol=2e-5)


@pytest.mark.parametrize("variant,rows", [("mm", None), ("mm-ieee", 50)])
def test_mm_ebv_dir_ties_zeros_and_large_beta(monkeypatch, variant, rows):
    """Kerdock rows (|cos| in {0, 1/4}: ties at the max, exact zeros whose sign is 0) at beta = 200 (e^{-50} for
    the zero pairs; e^{+150} for the diagonal if it were not masked before the exp), through the op layer, in one
    chunk and in 50 + 50 + 44 rows: dir_i = sum over tied j of sign(c_ij) w_j."""
    _tk("cpu")
    w = etfkern.ebv_bank(144, 16, method="kerdock", dtype=torch.float32)
    g = w.double() @ w.double().T
    want = ((g.abs() > 0.2).double() * torch.sign(g)).fill_diagonal_(0.0) @ w.double()
    torch.testing.assert_close(ref.ebv_dir(w.double(), 200.0)[0], want, atol=1e-12, rtol=0)
    monkeypatch.setenv(banks.DIR_PRECISION_ENV, variant)
    _chunk_env(monkeypatch, 144, rows)
    with etfkern.use_backend("triton"):
        got_dir, got_max = banks._ops.ebv_dir(w, 200.0)
    assert torch.isfinite(got_dir).all()
    torch.testing.assert_close(got_max.double(), torch.full((144,), 0.25, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(got_dir.double(), want, atol=1e-4, rtol=0)


def test_mm_variants_are_registered_but_not_defaults():
    """Selectable through the environment variables; the mirrors agree; no default names them (never ran on a
    GPU: the dispatch table's defaults are the measured layouts)."""
    tk = _tk()
    from etfkern._core import dispatch

    assert tk.PAIR_STATS_KERNELS == banks.PAIR_STATS_KERNELS and tk.DIR_VARIANTS == banks.DIR_VARIANTS
    assert set(MM_STATS) == {"mm-ieee", "mm-tf32x3"} and set(MM_DIR) == {"mm", "mm-ieee"}
    for op in ("bank_pair_stats", "ebv_dir", "ebv_optimiser_dir"):
        assert not dispatch.TABLE[op][0].startswith("mm"), op
    assert not banks.PAIR_STATS_KERNELS[0].startswith("mm") and not banks.DIR_VARIANTS[0].startswith("mm")


# ----------------------------------------------------------------------------------------------------------
# bench/banks.py: the dispatch entries its GPU sweep writes
# ----------------------------------------------------------------------------------------------------------
def _bench():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "banks.py")
    spec = importlib.util.spec_from_file_location("bench_banks_dispatch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stats(c, d, variant, ms, accurate=True):
    return {"op": "bank_stats", "shape": f"C={c} d={d}", "impl": f"bank_stats {variant}", "variant": variant, "C": c,
            "d": d, "dtype": "float32", "ms": ms, "accurate": accurate}


def _dir(c, d, variant, ms, accurate=True, timed_on="all rows", err=(1e-4, 1e-3)):
    """An ebv_dir sweep row; ``err`` (rowmax error, relative direction error): TF32-sized by default."""
    return {"op": "ebv_dir", "shape": f"C={c} d={d}", "impl": variant, "variant": variant, "C": c, "d": d,
            "dtype": "float32", "ms": ms, "accurate": accurate, "timed_on": timed_on, "err_rowmax": err[0],
            "rel_err_dir": err[1]}


def test_dispatch_entries_pick_the_fastest_eligible_variant(tmp_path):
    """Synthetic sweep rows -> the dispatch file: bank_pair_stats takes the fastest ACCURATE kernel per shape;
    ebv_dir the fastest accurate one of ieee / tf32x3 / mm-ieee; ebv_optimiser_dir the fastest within TF32's
    bounds. Dense
    peers, skipped and failed rows never count; etfkern/_core/dispatch.py reads what is written and applies each
    row within a factor sqrt(2) of its shape only."""
    import json

    from etfkern._core import dispatch

    bench = _bench()
    rows = [{"op": "bank_stats", "shape": "C=4000 d=128", "impl": "dense torch C x C", "C": 4000, "d": 128, "ms": 0.1},
            _stats(4000, 128, "mm-tf32x3", 0.2, accurate=False), _stats(4000, 128, "mm-ieee", 0.3),
            _stats(4000, 128, "rows", 9.7),
            {"op": "bank_stats", "shape": "C=131072 d=1024", "impl": "rows", "skipped": "1 s left"},
            _stats(131072, 1024, "mm-tf32x3", 180.0), _stats(131072, 1024, "mm-ieee", 450.0),
            _stats(131072, 1024, "tiles-ieee", float("nan")),
            _dir(100000, 1000, "mm", 110.0), _dir(100000, 1000, "tf32", 7000.0, timed_on="rows 0..20000, scaled"),
            _dir(100000, 1000, "mm-ieee", 900.0, accurate=False), _dir(100000, 1000, "tf32x3", 1500.0),
            _dir(100000, 1000, "ieee", 30000.0),
            _dir(2000, 64, "mm", 1.0, accurate=False),  # no accurate float32 variant at this shape: no ebv_dir row
            # beyond TF32's bounds (a broken kernel): never the optimiser's, however fast
            _dir(100000, 1000, "tf32-wide", 50.0, accurate=False, err=(1e-4, 0.5)),
            _dir(2000, 64, "tf32-wide", 0.5, accurate=False, err=(0.01, 1e-3))]
    entries = bench.dispatch_entries(rows, "bench/results/banks-sweep-x.json")
    got = {(e["op"], e["when"]["C"][0]): e["variant"] for e in entries}
    assert got == {("bank_pair_stats", 2828): "mm-ieee", ("bank_pair_stats", 92681): "mm-tf32x3",
                   ("ebv_dir", 70710): "tf32x3", ("ebv_optimiser_dir", 70710): "mm",
                   ("ebv_optimiser_dir", 1414): "mm"}
    for e in entries:
        assert e["source"] == "bench/results/banks-sweep-x.json" and e["when"]["dtype"] == "float32"
        assert set(e) == {"op", "variant", "evidence", "source", "when"}
    stats_4000 = next(e for e in entries if e["op"] == "bank_pair_stats" and e["when"]["C"][0] == 2828)
    assert stats_4000["evidence"].startswith("bank_stats C=4000 d=128 float32: mm-ieee 0.3 ms")
    assert "mm-tf32x3 0.2 (not eligible)" in stats_4000["evidence"] and "rows 9.7" in stats_4000["evidence"]
    assert "dense" not in stats_4000["evidence"]

    path = tmp_path / "banks-dispatch.json"
    bench.write_dispatch(rows, "bench/results/banks-sweep-x.json", str(path))
    data = json.loads(path.read_text())
    assert data["written_by"] == "bench/banks.py" and data["source"] == "bench/results/banks-sweep-x.json"
    assert data["entries"] == entries
    measured = dispatch.load_measured(str(path))
    assert {op: len(r) for op, r in measured.items()} == {"bank_pair_stats": 2, "ebv_dir": 1, "ebv_optimiser_dir": 2}

    def pick(op, c, d):
        return next((r.variant for r in measured[op] if r.matches({"C": c, "d": d, "dtype": "float32"})), None)

    assert pick("bank_pair_stats", 4000, 128) == "mm-ieee" and pick("bank_pair_stats", 131072, 1024) == "mm-tf32x3"
    assert pick("bank_pair_stats", 20000, 128) is None and pick("bank_pair_stats", 4000, 1024) is None
    assert pick("ebv_dir", 100000, 1000) == "tf32x3" and pick("ebv_optimiser_dir", 100000, 1000) == "mm"
    for op, choices in (("bank_pair_stats", banks.PAIR_STATS_KERNELS), ("ebv_dir", banks.DIR_VARIANTS),
                        ("ebv_optimiser_dir", banks.DIR_VARIANTS)):
        assert all(r.variant in choices for r in measured[op])


def test_dispatch_from_accepts_only_a_full_gpu_run(tmp_path, monkeypatch):
    import json

    bench = _bench()
    written = tmp_path / "banks-dispatch.json"
    monkeypatch.setattr(bench, "DISPATCH_JSON", str(written))
    rows = [_stats(4000, 128, "mm-ieee", 0.3)]
    for name, data, code in (
            ("cpu.json", {"environment": {"device_type": "cpu"}, "rows": rows}, 1),
            ("quick.json", {"environment": {"device_type": "cuda"}, "quick": True, "rows": rows}, 1),
            ("run_all.json", {"environment": {"device_type": "cuda"}, "families": {"banks": {"rows": rows}}}, 0)):
        (tmp_path / name).write_text(json.dumps(data))
        assert bench._dispatch_from(str(tmp_path / name)) == code
        assert written.exists() == (code == 0)
    entries = json.loads(written.read_text())["entries"]
    assert [(e["op"], e["variant"]) for e in entries] == [("bank_pair_stats", "mm-ieee")]
    assert entries[0]["source"].endswith("run_all.json")


def test_sweep_skips_what_the_time_box_leaves_no_time_for(monkeypatch):
    """With 1 s left of the gpu_check box every job of the sweep is skipped with a row saying so (no kernel runs),
    and the skipped rows give no dispatch entry."""
    bench = _bench()
    monkeypatch.setattr(bench, "seconds_left", lambda: 1.0)
    emitted = []
    rows = bench.sweep("cpu", tiny=True, emit=lambda r: emitted.append(r) or r)
    assert rows == emitted and len(rows) == len(banks.PAIR_STATS_KERNELS) + len(banks.DIR_VARIANTS)
    assert all("1 s left" in r["skipped"] and "ms" not in r for r in rows)
    assert bench.dispatch_entries(rows, "x.json") == []


def test_sweep_records_a_failing_variant_and_goes_on(monkeypatch):
    """A variant that fails (a compile error on a GPU it never ran on, an OOM) leaves an "error" row, never a
    dispatch entry, and the sweep measures the others."""
    _tk("cpu")
    bench = _bench()
    real = bench._stats_row

    def flaky(w, kernel, *args):
        if kernel == "mm-ieee":
            raise RuntimeError("ptxas died")
        return real(w, kernel, *args)

    monkeypatch.setattr(bench, "_stats_row", flaky)
    monkeypatch.setattr(bench, "_dir_row", lambda *a: (_ for _ in ()).throw(MemoryError("no room")))
    with etfkern.use_backend("triton"):
        rows = bench.sweep("cpu", tiny=True, emit=lambda r: r)
    failed = [r for r in rows if "error" in r]
    assert [(r["op"], r["variant"]) for r in failed] == [("bank_stats", "mm-ieee")] + \
        [("ebv_dir", v) for v in banks.DIR_VARIANTS]
    assert failed[0]["error"] == "RuntimeError: ptxas died" and failed[1]["error"] == "MemoryError: no room"
    measured = [r["variant"] for r in rows if r["op"] == "bank_stats" and "ms" in r and "variant" in r]
    assert measured == [k for k in banks.PAIR_STATS_KERNELS if k != "mm-ieee"]
    entries = bench.dispatch_entries(rows, "x.json")
    assert [e["op"] for e in entries] == ["bank_pair_stats"] and entries[0]["variant"] != "mm-ieee"
