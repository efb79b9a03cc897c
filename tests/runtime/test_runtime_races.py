"""Races and failure paths of the multi-device runtime: each test drives one concrete interleaving with the
real Runtime on CPU workers and the demo model. Interleavings are forced with threading.Event
gates inside wrapped runtime functions, never with sleeps."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
from polling import until

from splitnode import LLM, SamplingParams
from splitnode.engine.sequence import Sequence
from splitnode.runtime import Runtime, RuntimeConfig

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
BLOCKS = 64
WAIT = 10.0  # bound on every cross-thread wait: a hang fails the test instead of blocking it


def prompt(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


async def collect(rt, p, params=GREEDY):
    return [ev async for ev in rt.generate(p, params)]


def split_cfg(**kw):
    kw.setdefault("num_kv_blocks", BLOCKS)
    return RuntimeConfig(devices="cpu:2", roles={"cpu:0": "prompt", "cpu:1": "token"}, layerwise_min_tokens=64,
                         autoscale=False, **kw)


# A layer that fails to send must not leave the sequence counted as sent layer by layer: the
# hand-off then sends every layer again (or the token worker recomputes), for this sequence only.
async def test_layerwise_send_that_fails_on_one_layer_is_resent_or_recomputed():
    p = prompt(90, seed=1)
    ref = LLM(num_kv_blocks=BLOCKS).generate([p], GREEDY)[0]
    async with Runtime(split_cfg()) as rt:
        real_send = rt.mover.send
        calls = []

        def flaky(src, dst, sb, db, layers):
            calls.append(list(layers))
            if len(calls) == 1:  # layer 0 of the first (layer-wise) send: a transient link error
                raise RuntimeError("injected transient transfer failure")
            return real_send(src, dst, sb, db, layers)

        rt.mover.send = flaky
        events = await collect(rt, p)
    assert calls[0] == [0], "the first send was not layer-wise; the test did not exercise the path"
    assert events[-1].token_ids == ref.token_ids


# A lease that lapses while a queued prompt waits must not let the prompt worker write KV into
# blocks that went back to the pool: the layer-wise send claims them first, and the hand-off sends
# whatever did not go layer by layer.
async def test_lease_expiring_during_layerwise_prefill_does_not_skip_the_transfer():
    p = prompt(90, seed=2)
    ref = LLM(num_kv_blocks=BLOCKS).generate([p], GREEDY)[0]
    async with Runtime(split_cfg()) as rt:
        P, T = rt.workers
        pool = T.engine.pool
        real_send, real_expire = rt.mover.send, pool.expire
        expired = threading.Event()
        seen = []

        def expire(now=None):
            dead = real_expire(now)
            if dead:
                expired.set()
            return dead

        def send(src, dst, sb, db, layers):
            if not seen:
                seen.append(list(layers))
                # the lease's time is up (the sequence waited in P's queue unrenewed): T's own
                # thread reclaims the blocks while P's forward is still in layer 0 (nothing to
                # reclaim once the hook claims the blocks at its first send, as f8cc11c does)
                with pool.lock:
                    leased = list(pool._reservations.values())
                    for r in leased:
                        r.expires_at = 0.0
                if leased:
                    T.wake.set()
                    assert expired.wait(WAIT), "T never expired the reservation"
            return real_send(src, dst, sb, db, layers)

        pool.expire = expire
        rt.mover.send = send
        events = await collect(rt, p)
    assert seen == [[0]], "the first send was not layer-wise; the test did not exercise the path"
    assert events[-1].token_ids == ref.token_ids


# A request that finishes at its first token on the prompt worker (max_tokens=1, EOS) gives the
# token worker back its reservation, or the blocks the layer-wise transfer claimed.
@pytest.mark.parametrize("length", [40, 90], ids=["short-lease-bound", "layerwise-permanent"])
async def test_request_finishing_at_its_first_token_returns_the_token_workers_blocks(length):
    async with Runtime(split_cfg()) as rt:
        events = await collect(rt, prompt(length, seed=3), SamplingParams(max_tokens=1, temperature=0.0))
        assert events[-1].finished
        st = rt.status()
    for d in st["devices"]:
        assert d["kv_blocks_reserved"] == 0 and d["kv_blocks_used"] == 0, d


# assign() returns once its own change is done: a flip posted for an earlier change must not
# resolve a later one (changes carry a generation number).
async def test_assign_returns_only_once_its_own_role_is_reached():
    async with Runtime(split_cfg()) as rt:
        w = rt.worker("cpu:1")
        real_report = rt.on_role_reached
        posting, release_post = threading.Event(), threading.Event()
        release_token = threading.Event()
        real_change = w._change_role

        def report(msg):
            if not posting.is_set():
                posting.set()  # the worker flipped to "mixed" and is about to tell the loop
                release_post.wait(WAIT)
            real_report(msg)

        def change_role():
            if w.target_role == "token":
                release_token.wait(WAIT)  # hold the second change: w stays "mixed" meanwhile
            real_change()

        rt.on_role_reached = report
        w._change_role = change_role
        try:
            a = asyncio.ensure_future(rt.assign("cpu:1", "mixed", mode="drain"))
            await asyncio.sleep(0)  # a registers its waiter
            assert posting.wait(WAIT)
            assert w.role == "mixed" and w.target_role is None
            b = asyncio.ensure_future(rt.assign("cpu:1", "token"))
            await asyncio.sleep(0)  # b registers its waiter, sets target_role
            release_post.set()
            await asyncio.wait_for(a, WAIT)
            for _ in range(3):
                await asyncio.sleep(0)
            b_done_early = b.done()
            role_then = w.role
        finally:
            release_post.set()
            release_token.set()
        await asyncio.wait_for(b, WAIT)
        assert w.role == "token"
    assert not b_done_early, f"assign(cpu:1, 'token') returned while cpu:1 was still {role_then!r}"


# The loop reads the prompt queue (routing, policy, status) while the worker changes it: a thread
# switch in the middle must not raise out of generate().
async def test_routing_while_the_prompt_worker_schedules_does_not_raise(monkeypatch):
    async with Runtime(split_cfg()) as rt:
        P = rt.workers[0]
        gate, in_step, scheduled = threading.Event(), threading.Event(), threading.Event()
        real_step, real_schedule = P.engine.step, P.engine.batcher.schedule

        def step(*a, **k):
            in_step.set()
            gate.wait(WAIT)
            return real_step(*a, **k)

        def schedule():
            batch = real_schedule()
            scheduled.set()
            return batch

        P.engine.step = step
        P.engine.batcher.schedule = schedule
        first = asyncio.ensure_future(collect(rt, prompt(20, seed=4)))
        await until(in_step.is_set, WAIT)  # tokenized off the loop, then P holds it, about to schedule it
        assert len(P.engine.batcher.waiting) == 1

        real_pending = Sequence.num_pending
        loop_thread = threading.current_thread()
        switched = []

        def num_pending(self):
            if threading.current_thread() is loop_thread and not switched:
                switched.append(self)  # the GIL passes to P's thread mid-iteration
                gate.set()
                assert scheduled.wait(WAIT)
            return real_pending.fget(self)

        monkeypatch.setattr(Sequence, "num_pending", property(num_pending))
        second = await collect(rt, prompt(20, seed=5))
        await asyncio.wait_for(first, WAIT)
    assert switched
    assert second[-1].finished


# After a worker dies, new requests are routed to the others (or refused), never into its inbox.
async def test_request_after_a_worker_failure_ends_instead_of_hanging():
    async with Runtime(split_cfg()) as rt:
        P = rt.workers[0]
        real_step = P.engine.step

        def broken(*a, **k):
            raise RuntimeError("injected device failure (test double for a lost GPU)")

        P.engine.step = broken
        with pytest.raises(RuntimeError, match="failed"):
            await collect(rt, prompt(20, seed=6))
        P.engine.step = real_step
        outcome = "ended"
        try:
            await asyncio.wait_for(collect(rt, prompt(20, seed=7)), 5.0)
        except RuntimeError:
            outcome = "failed fast"  # fine: no prompt worker is left
        except asyncio.TimeoutError:
            outcome = "hung"
    assert outcome != "hung", "a request routed after the prompt worker failed never ended"


# A sequence cancelled on its way to the token worker settles the transfer count and frees its
# blocks once the copy is done.
async def test_cancel_while_arriving_settles_the_transfer_count():
    async with Runtime(split_cfg()) as rt:
        T = rt.workers[1]
        real_expire = T.engine.pool.expire
        arrived, release = threading.Event(), threading.Event()

        def expire(now=None):  # first thing of T's turn after its inbox: hold the arrival there
            if T.arrivals and not release.is_set():
                arrived.set()
                release.wait(WAIT)
            return real_expire(now)

        T.engine.pool.expire = expire
        events = []
        async for ev in rt.generate(prompt(20, seed=8), GREEDY):
            events.append(ev)
            if len(events) == 1:
                assert arrived.wait(WAIT)  # handed off, not yet admitted by T
                await rt.cancel(ev.request_id)
                release.set()
        st = rt.status()
    assert events[-1].finish_reason == "abort"
    assert st["transfers"]["in_flight"] == 0, st["transfers"]
    assert all(d["kv_blocks_used"] == 0 for d in st["devices"])
