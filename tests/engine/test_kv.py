"""BlockPool accounting with frees that wait for a transfer's event (`free_after`)."""

from __future__ import annotations

from recording_streams import FakeEvent

from splitnode.engine.kv import BlockPool, kv_budget_bytes


def test_blocks_freed_after_an_event_return_only_once_it_has_fired():
    pool = BlockPool(8, 16)
    first, second = pool.allocate(3), pool.allocate(2)
    copy_a, copy_b = FakeEvent("P->T", fired=False), FakeEvent("Q->T", fired=False)
    pool.free_after(first, copy_a)
    pool.free_after(second, copy_b)
    assert (pool.num_free, pool.num_pending, pool.num_used) == (3, 5, 5)
    assert not pool.can_allocate(4) and pool.reserve("r", 4, 30.0) is None
    copy_b.fired = True  # events fire in any order
    assert (pool.num_free, pool.num_pending) == (5, 3)
    assert sorted(pool.allocate(5)) == sorted([*range(5, 8), *second])
    copy_a.fired = True
    assert pool.allocate(3) == first and pool.num_pending == 0
    assert pool.num_free + pool.num_used == pool.num_blocks


def test_blocks_freed_after_no_event_or_a_fired_one_are_free_at_once():
    pool = BlockPool(4, 16)
    a, b = pool.allocate(2), pool.allocate(2)
    pool.free_after(a, None)
    pool.free_after(b, FakeEvent("P->T"))
    assert pool.num_free == 4 and pool.num_pending == 0


def test_engines_sharing_a_gpu_get_the_same_kv_whatever_their_loading_order():
    """M2: an 8B model (16 GB) twice on an 80 GB GPU at 0.9, each engine taking 2 GB besides its
    weights and KV (graph pool, temporaries): loaded one after the other, each sizing from what it
    sees free, both get (72 - 2 * 16 - 2 * 2) / 2 = 18 GB."""
    gb = 10**9
    total, weights, other = 80 * gb, 16 * gb, 2 * gb
    used = weights  # the first engine's weights are in
    first = kv_budget_bytes(total, total - used, 0.9, weights, other, kv_share=1 / 2)
    used += first + other + weights  # its KV and graph pool, then the second's weights
    second = kv_budget_bytes(total, total - used, 0.9, weights, other, kv_share=1.0)
    assert abs(first - 18 * gb) < 1e6 and abs(second - 18 * gb) < 1e6
    assert kv_budget_bytes(total, total - weights, 0.9, weights, other, kv_share=1.0) == 72 * gb - 16 * gb - 2 * gb
