"""The wire format and the sender of weight pushes (actors/weight_transfer.py), without
engines: the bucket plan by hand, the engines' dtype on the wire, and rank 0's sender
over real gloo groups (receivers in threads of this process), including an engine that
fails mid-push. Pushes into real engines of every shape: tests/test_engine_shapes.py."""

from __future__ import annotations

import threading

import pytest
import torch

from actors.weight_transfer import (
    BucketSender,
    broadcast,
    gather_buckets,
    open_group,
    plan,
    split_bucket,
)


def test_the_plan_cuts_buckets_by_bytes_in_order():
    # 6x4 bf16 = 48 B, 10 bf16 = 20 B, 100 bf16 = 200 B (alone: over the 64 B budget),
    # 4 int64 = 32 B
    meta = [("a", (6, 4), torch.bfloat16), ("b", (10,), torch.bfloat16),
            ("c", (100,), torch.bfloat16), ("d", (4,), torch.int64)]
    p = plan(meta, bucket_bytes=64)
    assert p.bucket_sizes == [1, 1, 1, 1]  # 48 + 20 > 64; 20 + 200 > 64; 200 + 32 > 64
    assert plan(meta, bucket_bytes=70).bucket_sizes == [2, 1, 1]  # 48 + 20 = 68
    assert p.dtype_names == ["bfloat16", "bfloat16", "bfloat16", "int64"]
    assert p.total_bytes == 48 + 20 + 200 + 32
    assert [[n for n, _, _ in b] for b in plan(meta, 300).buckets()] == [["a", "b", "c", "d"]]
    assert [[n for n, _, _ in b] for b in plan(meta, 299).buckets()] == [["a", "b", "c"], ["d"]]
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        plan(meta, 0)


def test_buckets_carry_the_engines_dtype_and_split_back_exactly():
    """fp32 training weights leave as bf16 bytes when the engines run bf16: half the
    bytes, and what the receiver splits out is the bf16 rounding of each tensor."""
    torch.manual_seed(0)
    state = {"w": torch.randn(3, 5), "b": torch.randn(5), "e": torch.randn(7, 2)}
    p = plan(((n, tuple(t.shape), torch.bfloat16) for n, t in state.items()), bucket_bytes=40)
    buckets = list(gather_buckets(state.items(), p, leader=True))
    assert all(b.dtype == torch.uint8 for b in buckets)
    assert sum(b.numel() for b in buckets) == 2 * (15 + 5 + 14) == p.total_bytes
    got = dict(pair for b, entries in zip(buckets, p.buckets())
               for pair in split_bucket(b, entries))
    for name, tensor in state.items():
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], tensor.to(torch.bfloat16))
    # ranks other than 0 take part in the gathers and send nothing
    assert list(gather_buckets(state.items(), p, leader=False)) == [None] * len(buckets)
    with pytest.raises(ValueError, match="where the plan has"):
        list(gather_buckets(reversed(list(state.items())), p, leader=True))


def receiver(host, port, results: dict, key: str, the_plan, stop_after: int | None = None):
    """An engine's worker in a thread: join the group, receive every bucket (or leave
    after ``stop_after`` of them)."""
    group = open_group(host, port, 1, 2, "gloo", timeout_s=20)
    got = {}
    for k, entries in enumerate(the_plan.buckets()):
        if stop_after is not None and k == stop_after:
            del group  # the engine is gone: its connection closes
            results[key] = got
            return
        nbytes = sum(torch.Size(s).numel() * d.itemsize for _, s, d in entries)
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        broadcast(group, buffer).wait()
        got.update(split_bucket(buffer, entries))
    results[key] = got


def test_rank_0_sends_every_bucket_to_every_engine_and_drops_one_that_fails():
    torch.manual_seed(1)
    state = {f"layer{i}": torch.randn(64, 16) for i in range(6)}  # 6 x 2 KiB in bf16
    p = plan(((n, tuple(t.shape), torch.bfloat16) for n, t in state.items()), 4096)
    assert len(p.bucket_sizes) == 3
    sender, results, threads = BucketSender(), {}, []
    for key, stop in (("healthy", None), ("dies", 1)):
        host, port = sender.endpoint(key)
        threads.append(threading.Thread(target=receiver, args=(host, port, results, key, p,
                                                               stop)))
        threads[-1].start()
        sender.join(key, 2, "gloo", timeout_s=20)
    sent = sender.send(["healthy", "dies"], gather_buckets(state.items(), p, leader=True))
    for t in threads:
        t.join(timeout=30)
    assert sent["bytes"] == p.total_bytes
    assert list(sent["failed"]) == ["dies"] and "dies" not in sender.groups
    assert set(results["healthy"]) == set(state)
    for name, tensor in state.items():
        assert torch.equal(results["healthy"][name], tensor.to(torch.bfloat16))
    assert set(results["dies"]) == {"layer0", "layer1"}  # the first bucket only
    # the next push goes to the healthy engine only; the failed one must link again
    assert sender.send(["dies"], iter([]))["failed"] == {"dies": "not connected"}
