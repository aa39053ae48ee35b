"""ebv_bank's optimiser (issue 18): the heavy-ball schedule improves structured starts, never returns a bank worse
than its start, is deterministic for a seed and shortens its schedule to fit ``time_budget_s``.

The margins come from bench/results/ebv-warmstart-cpu-2026-12-04.md (CPU, seeds 0-2 of the start)."""
import types

import pytest
import torch

import etfkern
from etfkern import banks


@pytest.fixture(autouse=True)
def _single_thread():
    # a few hundred small steps: on the 2-core CI box extra OpenMP threads only wait for each other
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _welch_ratio(bank: torch.Tensor) -> float:
    return banks.bank_max_abs_cos(bank) / banks.welch_bound(*bank.shape)


def _optimized(c: int, d: int, steps: int, seed: int = 0, **kwargs) -> torch.Tensor:
    return etfkern.ebv_bank(c, d, seed=seed, method="optimize", steps=steps, progress=False, **kwargs)


def test_padded_kerdock_start_improves_within_100_steps():
    # (140, 30): the Kerdock bank of R^16 zero-padded, 1.539x Welch, spans 16 of the 30 dimensions. The seeded kick
    # plus momentum reach 1.331-1.336x in 100 steps; without the kick, without momentum, or with the former schedule
    # (no momentum, 0.1 -> 3e-4 rad, beta 3 -> 300 / Welch) the iterates stay in the subspace: 1.539x (1.46-1.48x
    # for the former schedule with the kick).
    assert banks._structured_start(140, 30, torch.Generator().manual_seed(0), torch.float32, "cpu")[1] == \
        "kerdock16-padded"
    assert _welch_ratio(_optimized(140, 30, 0)) > 1.53
    assert _welch_ratio(_optimized(140, 30, 100)) < 1.40


def test_chirp_start_improves_beyond_the_former_schedule():
    # (300, 40): the chirp bank of p = 19 at 1.556x Welch; 300 steps reach 1.326-1.328x, the former schedule
    # 1.364-1.366x (1.354-1.356x with the kick), the same steps without momentum 1.370x
    assert _welch_ratio(_optimized(300, 40, 300)) < 1.345


def test_result_is_never_worse_than_the_start():
    start = _optimized(400, 36, 0)  # chirp start, 1.524x Welch
    wild = _optimized(400, 36, 20, lr=1000.0)  # steps of ~100 Welch: every iterate is far worse
    assert torch.equal(wild, start)
    kerdock = _optimized(144, 16, 40)  # the whole Kerdock bank of R^16: |cos| in {0, 1/4}, an optimum
    assert banks.bank_max_abs_cos(kerdock) <= 0.25 + 1e-6


def test_deterministic_for_a_seed():
    a = _optimized(300, 40, 60, seed=3)
    assert torch.equal(a, _optimized(300, 40, 60, seed=3))
    assert not torch.equal(a, _optimized(300, 40, 60, seed=4))
    torch.testing.assert_close(a.norm(dim=1), torch.ones(300), atol=1e-6, rtol=0)


def test_time_budget_shortens_the_schedule_so_the_annealing_ends(monkeypatch):
    """A fake clock that advances 1 s per ebv_dir pass (no real timing): with a 40 s budget the 1000-step schedule
    is shortened to the 38 steps that leave 2 steps' time for the final scoring, and those 38 steps run the whole
    annealing (beta from 3 to 1000 / Welch)."""
    clock = [0.0]
    betas = []
    real_dir = banks._ops.ebv_dir

    def slow_dir(w, beta):
        betas.append(beta)
        clock[0] += 1.0
        return real_dir(w, beta)

    monkeypatch.setattr(banks, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(banks._ops, "ebv_dir", slow_dir)
    with pytest.warns(RuntimeWarning, match=r"time budget of 40 s reached after 38/1000 steps"):
        budgeted = _optimized(300, 40, 1000, time_budget_s=40.0)
    welch = banks.welch_bound(300, 40)
    assert len(betas) == 38 and clock[0] <= 40.0 - 2
    assert betas[0] == pytest.approx(3.0 / welch, rel=1e-12) and betas[-1] == pytest.approx(1000.0 / welch, rel=1e-9)
    assert all(b1 > b0 for b0, b1 in zip(betas, betas[1:]))
    # compressed: 1.478-1.480x Welch from the 1.556x start; the same 38 steps cut from the 1000-step schedule end in
    # its low-beta phase (1.63-1.66x) and return the start
    assert _welch_ratio(budgeted) < 1.52


def test_default_step_depends_on_the_start(monkeypatch):
    """lr=None: 0.1 (Welch units) from a structured start, 0.3 from a Gaussian one (the measured better choices);
    an explicit lr is passed through."""
    seen = []

    def record(bank, steps, lr, *args):
        seen.append(lr)
        return bank.to(torch.float32).contiguous(), float("nan")

    monkeypatch.setattr(banks, "_optimize", record)
    _optimized(300, 40, 5)  # chirp start
    _optimized(200, 12, 5)  # no structured start: Gaussian
    _optimized(300, 40, 5, lr=0.7)
    assert seen == [0.1, 0.3, 0.7]
    with pytest.raises(ValueError, match="lr"):
        _optimized(300, 40, 5, lr=0.0)
