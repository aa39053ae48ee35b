"""Vocab-parallel spherical CE / nearest (etfkern.distributed) with gloo on 127.0.0.1: world sizes 2 and 3,
uneven shards; every rank must get the full-bank loss and x-gradient."""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.distributed

SPLITS = {2: [5, 18], 3: [9, 1, 13]}  # uneven shards of C = 23 (one of a single class)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, queue) -> None:
    try:
        os.environ.pop("TRITON_INTERPRET", None)
        torch.set_num_threads(1)
        import torch.distributed as dist

        import etfkern
        import etfkern.distributed as edist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        gen = torch.Generator().manual_seed(0)
        n, d, c = 14, 6, 23
        x0 = torch.randn(n, d, generator=gen, dtype=torch.float64)
        bank = F.normalize(torch.randn(c, d, generator=gen, dtype=torch.float64), dim=1)
        target = torch.randint(0, c, (n,), generator=gen)
        target[2] = -100
        target_b = torch.randint(0, c, (n,), generator=gen)
        lam = torch.rand(n, generator=gen, dtype=torch.float64)
        sizes = SPLITS[world]
        start = sum(sizes[:rank])
        shard = bank[start:start + sizes[rank]]
        for metric in ("cos", "arc"):
            for eps in (0.0, 0.1):
                kw = dict(metric=metric, label_smoothing=eps, target_b=target_b, lam=lam, reduction="sum")
                xf = x0.clone().requires_grad_()
                full = etfkern.spherical_cross_entropy(xf, bank, target, **kw)
                full.backward()
                xs = x0.clone().requires_grad_()
                part = edist.spherical_cross_entropy(xs, shard, target, class_start=start, **kw)
                part.backward()
                torch.testing.assert_close(part, full, atol=1e-10, rtol=1e-10)
                torch.testing.assert_close(xs.grad, xf.grad, atol=1e-10, rtol=1e-10)
        rows = edist.spherical_cross_entropy(x0, shard, target, class_start=start, reduction="none")
        torch.testing.assert_close(rows, etfkern.spherical_cross_entropy(x0, bank, target, reduction="none"))
        for k in (1, 4):
            v, i = edist.nearest(x0, shard, class_start=start, k=k)
            rv, ri = etfkern.nearest(x0, bank, k=k)
            assert torch.equal(i, ri)
            torch.testing.assert_close(v, rv)
        try:
            edist.spherical_cross_entropy(x0, shard, target, class_start=start + 1)
            raise AssertionError("overlapping shards were accepted")
        except ValueError as exc:
            assert "tile" in str(exc)
        dist.barrier()  # no rank tears down gloo while another is still working
        dist.destroy_process_group()
        result = (rank, None)
    except Exception:  # noqa: BLE001 - report to the parent
        result = (rank, traceback.format_exc())
    # Deliver the result (flush the queue's feeder thread), then skip interpreter finalisation: gloo's threads
    # torn down there can abort the process ("terminate called without an active exception", seen in CI),
    # which could lose a result still in flight.
    queue.put(result)
    queue.close()
    queue.join_thread()
    os._exit(0)


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_full_bank(world):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, err = queue.get(timeout=180)
            results[rank] = err
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = {r: e for r, e in results.items() if e}
    assert not errors, "\n".join(f"rank {r}:\n{e}" for r, e in errors.items())
    assert sorted(results) == list(range(world))


def _edge_worker(rank: int, world: int, port: int, queue) -> None:
    """A rank holding no classes; bad arguments on ONE rank must make every rank raise (no rank left waiting in a
    collective), after which the group still works."""
    try:
        os.environ.pop("TRITON_INTERPRET", None)
        torch.set_num_threads(1)
        import datetime

        import torch.distributed as dist

        import etfkern
        import etfkern.distributed as edist

        # a short collective timeout: a rank left waiting fails the test in seconds, not after gloo's 30 minutes
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
        gen = torch.Generator().manual_seed(1)
        n, d, c = 11, 5, 13
        x0 = torch.randn(n, d, generator=gen, dtype=torch.float64)
        bank = F.normalize(torch.randn(c, d, generator=gen, dtype=torch.float64), dim=1)
        target = torch.randint(0, c, (n,), generator=gen)
        target[4] = -100
        target_b = torch.randint(0, c, (n,), generator=gen)
        sizes = {2: [0, 13], 3: [7, 0, 6]}[world]  # rank 0 (world 2) / rank 1 (world 3) holds no classes
        start = sum(sizes[:rank])
        shard = bank[start:start + sizes[rank]]
        for metric, eps in (("cos", 0.1), ("arc", 0.1), ("cos", 0.0)):
            kw = dict(metric=metric, label_smoothing=eps, target_b=target_b, lam=0.3)
            xf = x0.clone().requires_grad_()
            full = etfkern.spherical_cross_entropy(xf, bank, target, **kw)
            full.backward()
            xs = x0.clone().requires_grad_()
            part = edist.spherical_cross_entropy(xs, shard, target, class_start=start, **kw)
            part.backward()
            torch.testing.assert_close(part, full, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(xs.grad, xf.grad, atol=1e-10, rtol=1e-10)
        v, i = edist.nearest(x0, shard, class_start=start, k=3)
        rv, ri = etfkern.nearest(x0, bank, k=3)
        assert torch.equal(i, ri)
        torch.testing.assert_close(v, rv)
        bad_rank = world - 1
        nan_shard = shard.clone()
        if rank == bad_rank:
            nan_shard[0, 0] = float("nan")
        grad_shard = shard.clone().requires_grad_(rank == bad_rank)
        for call, own in ((lambda: edist.spherical_cross_entropy(x0, nan_shard, target, class_start=start),
                           "bank_shard must be finite"),
                          (lambda: edist.nearest(x0, nan_shard, class_start=start, k=2), "bank_shard must be finite"),
                          (lambda: edist.spherical_cross_entropy(x0, shard.float(), target, class_start=start)
                           if rank == bad_rank else edist.spherical_cross_entropy(x0, shard, target,
                                                                                  class_start=start),
                           "dtype"),
                          (lambda: edist.spherical_cross_entropy(x0, grad_shard, target, class_start=start),
                           "not implemented")):
            try:
                call()
                raise AssertionError("bad arguments on one rank were accepted")
            except (ValueError, NotImplementedError) as exc:
                want = own if rank == bad_rank else f"rank(s) [{bad_rank}]"
                assert want in str(exc), (want, str(exc))
        # the collectives are still in step: a good call afterwards gives the full-bank loss on every rank
        again = edist.spherical_cross_entropy(x0, shard, target, class_start=start)
        torch.testing.assert_close(again, etfkern.spherical_cross_entropy(x0, bank, target), atol=1e-10, rtol=1e-10)
        dist.barrier()
        dist.destroy_process_group()
        result = (rank, None)
    except Exception:  # noqa: BLE001 - report to the parent
        result = (rank, traceback.format_exc())
    queue.put(result)
    queue.close()
    queue.join_thread()
    os._exit(0)


@pytest.mark.parametrize("world", [2, 3])
def test_empty_shard_and_one_rank_rejecting_its_arguments(world):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_edge_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, err = queue.get(timeout=120)
            results[rank] = err
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = {r: e for r, e in results.items() if e}
    assert not errors, "\n".join(f"rank {r}:\n{e}" for r, e in errors.items())
    assert sorted(results) == list(range(world))
