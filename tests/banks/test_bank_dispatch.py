"""Which ebv_dir variant ebv_bank's optimiser runs: the dispatch table's "ebv_optimiser_dir" row for the bank's
shape (default: "tf32", the variant measured on the H200), unless ETFKERN_EBV_DIR_PRECISION names one."""
import json

import pytest
import torch

from etfkern import banks
from etfkern._core import dispatch


def _bank(c: int = 9, d: int = 4) -> torch.Tensor:
    w = torch.randn(c, d, generator=torch.Generator().manual_seed(0))
    return w / w.norm(dim=1, keepdim=True)


def _choice(w: torch.Tensor) -> str:
    with banks._variant("ebv_dir", banks.OPTIMISER_DIR_PRECISION):
        return banks._gpu_variant("ebv_dir", banks.DIR_PRECISION_ENV, banks.DIR_VARIANTS, w)


def test_optimiser_default_is_the_measured_variant(monkeypatch):
    monkeypatch.delenv(banks.DIR_PRECISION_ENV, raising=False)
    monkeypatch.setitem(dispatch.TABLE, "ebv_optimiser_dir", ("tf32", []))
    assert _choice(_bank()) == "tf32"
    # outside the optimiser the op keeps its own (float32-accurate) choice
    assert banks._gpu_variant("ebv_dir", banks.DIR_PRECISION_ENV, banks.DIR_VARIANTS, _bank()) == banks.DIR_VARIANTS[0]


def test_optimiser_follows_measured_rows_and_env_wins(monkeypatch, tmp_path):
    monkeypatch.delenv(banks.DIR_PRECISION_ENV, raising=False)
    file = tmp_path / "banks-dispatch.json"
    file.write_text(json.dumps({"entries": [
        {"op": "ebv_optimiser_dir", "variant": "tf32x3", "evidence": "synthetic", "source": "x.json",
         "when": {"C": [8, 16], "d": [1, 8]}}]}))
    rows = dispatch.load_measured(str(file))["ebv_optimiser_dir"]
    monkeypatch.setitem(dispatch.TABLE, "ebv_optimiser_dir", ("tf32", rows))
    assert _choice(_bank(9, 4)) == "tf32x3"  # inside the measured range
    assert _choice(_bank(20, 4)) == "tf32"  # outside: the default
    monkeypatch.setenv(banks.DIR_PRECISION_ENV, "ieee")
    assert _choice(_bank(9, 4)) == "ieee"


def test_every_table_variant_is_a_known_variant():
    """The defaults of the bank ops name variants the launchers accept."""
    assert dispatch.TABLE["ebv_optimiser_dir"][0] in banks.DIR_VARIANTS
    assert dispatch.TABLE["ebv_dir"][0] in banks.DIR_VARIANTS
    assert dispatch.TABLE["bank_pair_stats"][0] in banks.PAIR_STATS_KERNELS
    for op, names in (("ebv_optimiser_dir", banks.DIR_VARIANTS), ("ebv_dir", banks.DIR_VARIANTS),
                      ("bank_pair_stats", banks.PAIR_STATS_KERNELS)):
        for row in dispatch.TABLE[op][1]:
            assert row.variant in names, (op, row)


@pytest.mark.parametrize("bad", ["fast", "mm-fast"])
def test_optimiser_env_typo_is_an_error(monkeypatch, bad):
    monkeypatch.setenv(banks.DIR_PRECISION_ENV, bad)
    with pytest.raises(ValueError, match=banks.DIR_PRECISION_ENV):
        _choice(_bank())
