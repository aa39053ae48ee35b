"""Vocab-parallel spherical CE / nearest (etfkern.distributed) with gloo on 127.0.0.1: world sizes 2 and 3,
uneven shards; every rank must get the full-bank loss and x-gradient."""
from __future__ import annotations

import multiprocessing as mp
import os
import traceback

import pytest
import torch
import torch.nn.functional as F

from conftest import free_port

pytestmark = pytest.mark.distributed

SPLITS = {2: [5, 18], 3: [9, 1, 13]}  # uneven shards of C = 23 (one of a single class)




def _check_loss_and_grad(x0, bank, shard, start, target, kw) -> None:
    """Vocab-parallel loss and x-gradient on this rank's shard == the full-bank ones (float64, 1e-10)."""
    import etfkern
    import etfkern.distributed as edist

    xf = x0.clone().requires_grad_()
    full = etfkern.spherical_cross_entropy(xf, bank, target, **kw)
    full.backward()
    xs = x0.clone().requires_grad_()
    part = edist.spherical_cross_entropy(xs, shard, target, class_start=start, **kw)
    part.backward()
    torch.testing.assert_close(part, full, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(xs.grad, xf.grad, atol=1e-10, rtol=1e-10)


def _rank_main(body, rank: int, world: int, port: int, queue) -> None:
    """One spawned rank: gloo on 127.0.0.1, ``body(rank, world)``, then the result (None or a traceback) to the
    parent. A short collective timeout: a rank left waiting fails the test in seconds, not after gloo's 30 minutes."""
    try:
        os.environ.pop("TRITON_INTERPRET", None)
        torch.set_num_threads(1)
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
        body(rank, world)
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


def _problem(seed: int, *, n: int, d: int, c: int, ignored_row: int):
    """(generator, x (n, d), unit bank (c, d), target with one ignored row, target_b), float64, the same on every
    rank."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    bank = F.normalize(torch.randn(c, d, generator=gen, dtype=torch.float64), dim=1)
    target = torch.randint(0, c, (n,), generator=gen)
    target[ignored_row] = -100
    return gen, x0, bank, target, torch.randint(0, c, (n,), generator=gen)


def _full_bank_body(rank: int, world: int) -> None:
    """Every rank's vocab-parallel loss, x-gradient and nearest == the full-bank ones; overlapping shards rejected."""
    import etfkern
    import etfkern.distributed as edist

    gen, x0, bank, target, target_b = _problem(0, n=14, d=6, c=23, ignored_row=2)
    lam = torch.rand(14, generator=gen, dtype=torch.float64)
    sizes = SPLITS[world]
    start = sum(sizes[:rank])
    shard = bank[start:start + sizes[rank]]
    for metric in ("cos", "arc"):
        for eps in (0.0, 0.1):
            kw = dict(metric=metric, label_smoothing=eps, target_b=target_b, lam=lam, reduction="sum")
            _check_loss_and_grad(x0, bank, shard, start, target, kw)
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


def _run_world(body, world: int, timeout: float) -> None:
    """Spawn ``world`` ranks running ``body(rank, world)``; fail with every rank's traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(body, r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, err = queue.get(timeout=timeout)
            results[rank] = err
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = {r: e for r, e in results.items() if e}
    assert not errors, "\n".join(f"rank {r}:\n{e}" for r, e in errors.items())
    assert sorted(results) == list(range(world))


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_full_bank(world):
    _run_world(_full_bank_body, world, timeout=180)


def _edge_body(rank: int, world: int) -> None:
    """A rank holding no classes; bad arguments on ONE rank must make every rank raise (no rank left waiting in a
    collective), after which the group still works."""
    import etfkern
    import etfkern.distributed as edist

    _, x0, bank, target, target_b = _problem(1, n=11, d=5, c=13, ignored_row=4)
    sizes = {2: [0, 13], 3: [7, 0, 6]}[world]  # rank 0 (world 2) / rank 1 (world 3) holds no classes
    start = sum(sizes[:rank])
    shard = bank[start:start + sizes[rank]]
    for metric, eps in (("cos", 0.1), ("arc", 0.1), ("cos", 0.0)):
        kw = dict(metric=metric, label_smoothing=eps, target_b=target_b, lam=0.3)
        _check_loss_and_grad(x0, bank, shard, start, target, kw)
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


@pytest.mark.parametrize("world", [2, 3])
def test_empty_shard_and_one_rank_rejecting_its_arguments(world):
    _run_world(_edge_body, world, timeout=120)


def _sequence_and_tau_body(rank: int, world: int) -> None:
    """(B, T, d) inputs with (B, T) targets, and a learnable 0-dim tau: the vocab-parallel loss, x-gradient and
    tau-gradient on every rank == the single-process full-bank ones; nearest returns (B, T, k); create_graph=True
    raises the first-order-only RuntimeError on every rank (no collective is left half-done)."""
    import etfkern
    import etfkern.distributed as edist

    gen, x0, bank, target, target_b = _problem(2, n=12, d=5, c=23, ignored_row=3)
    x0 = x0.reshape(3, 4, 5).transpose(0, 1)  # (4, 3, 5), not contiguous
    target, target_b = target.reshape(3, 4).T, target_b.reshape(3, 4).T
    lam = torch.rand(4, 3, generator=gen, dtype=torch.float64)
    sizes = SPLITS[world]
    start = sum(sizes[:rank])
    shard = bank[start:start + sizes[rank]]
    for metric in ("cos", "arc"):
        for eps in (0.0, 0.1):
            kw = dict(metric=metric, label_smoothing=eps, target_b=target_b, lam=lam)
            xf, tf = x0.clone().requires_grad_(), torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
            full = etfkern.spherical_cross_entropy(xf, bank, target, tau=tf, **kw)
            full.backward()
            xs, ts = x0.clone().requires_grad_(), torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
            part = edist.spherical_cross_entropy(xs, shard, target, class_start=start, tau=ts, **kw)
            part.backward()
            torch.testing.assert_close(part, full, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(xs.grad, xf.grad, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(ts.grad, tf.grad, atol=1e-9, rtol=1e-10)
            assert tf.grad.abs() > 1e-3
    rows = edist.spherical_cross_entropy(x0, shard, target, class_start=start, reduction="none")
    assert rows.shape == (4, 3)
    torch.testing.assert_close(rows, etfkern.spherical_cross_entropy(x0, bank, target, reduction="none"))
    v, i = edist.nearest(x0, shard, class_start=start, k=2)
    rv, ri = etfkern.nearest(x0, bank, k=2)
    assert i.shape == (4, 3, 2) and torch.equal(i, ri)
    torch.testing.assert_close(v, rv)
    xg = x0.clone().requires_grad_()
    loss = edist.spherical_cross_entropy(xg, shard, target, class_start=start)
    try:
        torch.autograd.grad(loss, xg, create_graph=True)
        raise AssertionError("create_graph=True was accepted")
    except RuntimeError as exc:
        assert "higher-order gradients" in str(exc), str(exc)


def test_vocab_parallel_sequences_and_learnable_tau():
    _run_world(_sequence_and_tau_body, 2, timeout=180)
