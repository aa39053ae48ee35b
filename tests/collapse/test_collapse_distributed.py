"""CollapseMeter.all_reduce across gloo ranks on 127.0.0.1 == one meter over all the data (issue 4)."""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port

pytestmark = pytest.mark.distributed

C, D, N = 11, 6, 330
TIMEOUT_S = 120




def _data():
    g = torch.Generator().manual_seed(1234)
    centres = 3.0 * torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    y[y == 7] = 8  # class 7 never seen anywhere
    x = 100.0 + centres[y] + torch.randn(N, D, generator=g, dtype=torch.float64)
    # float32-representable values far from the origin, passed as float64 so the scatter products are float64 and
    # the sharded/merged meters can be compared with one meter at 1e-9 (float32 products differ with batching)
    return x.float().double(), y


def _rank_rows(y: torch.Tensor, rank: int, world: int, disjoint: bool) -> torch.Tensor:
    if disjoint:  # each rank sees its own classes only (rank 2 of 3 may see several, one rank may see few)
        return (y % world) == rank
    return (torch.arange(y.shape[0]) % world) == rank


def _worker(rank: int, world: int, port: int, disjoint: bool, out_dir: str) -> None:
    import torch.distributed as dist

    import etfkern
    from etfkern import collapse as col

    col._ALL_REDUCE_CHUNK_BYTES = 8 * D * 4  # 4 rows per message: the chunked path with a ragged last chunk
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        x, y = _data()
        rows = _rank_rows(y, rank, world, disjoint)
        m = etfkern.CollapseMeter(C, D)
        xs, ys = x[rows], y[rows]
        for i in range(0, xs.shape[0], 25):
            m.update(xs[i:i + 25], ys[i:i + 25])
        m.all_reduce()
        torch.save(m.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears down gloo while another is still working (else: SIGABRT under load)
    finally:
        dist.destroy_process_group()
    # Results are on disk: skip interpreter finalisation, where gloo's threads can still abort a finished rank
    # ("terminate called without an active exception", pytorch/pytorch#190489). Not reached after an exception.
    os._exit(0)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("disjoint", [False, True], ids=["overlapping", "disjoint"])
def test_all_reduce_equals_one_meter(world, disjoint):
    import etfkern

    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world, free_port(), disjoint, out_dir), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = TIMEOUT_S
        import time

        t0 = time.time()
        while not ctx.join(timeout=5):
            if time.time() - t0 > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"gloo workers did not finish within {deadline} s")
        states = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    x, y = _data()
    one = etfkern.CollapseMeter(C, D)
    one.update(x, y)
    want = one.compute()
    for r, state in enumerate(states):
        m = etfkern.CollapseMeter(C, D)
        m.load_state_dict(state)
        assert torch.equal(m.counts, one.counts), r
        torch.testing.assert_close(m._sw, one._sw, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(m._m2, one._m2, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(m.means.nan_to_num(), one.means.nan_to_num(), rtol=1e-12, atol=1e-12)
        got = m.compute()
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=1e-8, abs_tol=1e-12), (r, key, got[key], value)
    if disjoint:  # the split really was disjoint: no class on two ranks
        seen = [set(y[_rank_rows(y, r, world, True)].tolist()) for r in range(world)]
        assert all(not (seen[a] & seen[b]) for a in range(world) for b in range(a + 1, world))


def _mismatch_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    import etfkern

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # short collective timeout: a rank left waiting fails in seconds
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        g = torch.Generator().manual_seed(rank)
        outcome = []

        def attempt(c: int, d: int, expected_message: str, **settings) -> None:
            m = etfkern.CollapseMeter(c, d, **settings)
            m.update(torch.randn(20, d, generator=g, dtype=torch.float64), torch.randint(0, c, (20,), generator=g))
            before = m.state_dict()
            try:
                m.all_reduce()
                outcome.append("accepted")
            except ValueError as exc:
                after = m.state_dict()
                unchanged = all(torch.equal(before[k], after[k]) for k in ("counts", "means", "m2", "sw"))
                outcome.append(("ValueError", expected_message in str(exc), unchanged))

        # (C, d) differing on the last rank: different C; different d; equal C*d (same message sizes)
        for shape in ((C + 1, D), (C, D + 1), (2 * C, D // 2)):
            attempt(*(shape if rank == world - 1 else (C, D)), "num_classes and dim")
        # same shapes, a different global_mean on the last rank: the merged metrics would follow each rank's own
        attempt(C, D, "same global_mean on every rank", global_mean="sample" if rank == world - 1 else "class")
        # the group is still in step: matching meters reduce normally afterwards
        m = etfkern.CollapseMeter(C, D)
        m.update(torch.randn(20, D, generator=g, dtype=torch.float64), torch.randint(0, C, (20,), generator=g))
        m.all_reduce()
        outcome.append(m.num_samples)
        torch.save(outcome, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


@pytest.mark.parametrize("world", [2, 3])
def test_all_reduce_of_mismatched_meters_raises_on_every_rank(world):
    import time

    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_mismatch_worker, args=(world, free_port(), out_dir), nprocs=world, join=False,
                                 start_method="spawn")
        t0 = time.time()
        try:
            while not ctx.join(timeout=2):
                if time.time() - t0 > TIMEOUT_S:
                    pytest.fail(f"gloo workers did not finish within {TIMEOUT_S} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        outcomes = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    for r, outcome in enumerate(outcomes):
        assert outcome[:4] == [("ValueError", True, True)] * 4, (r, outcome)
        assert outcome[4] == 20 * world, (r, outcome)
