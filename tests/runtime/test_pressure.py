"""KV pressure on small pools: the waits between prompt and token workers must never close into a
cycle. Each test is a shape that once deadlocked (found by chaos testing against `serve`); a hang
fails it through a bounded wait, never a sleep."""

from __future__ import annotations

import asyncio
import random

from splitnode import SamplingParams
from splitnode.runtime import Runtime, RuntimeConfig

BOUND_S = 120.0  # generous for two loaded cores; a deadlock never ends at all


def prompt(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def held(rt) -> list[tuple[str, int, int]]:
    return [(d["name"], d["kv_blocks_used"], d["kv_blocks_reserved"]) for d in rt.status()["devices"]]


async def first_event_then_rest(agen, first: asyncio.Event) -> list:
    events = []
    async for ev in agen:
        events.append(ev)
        first.set()
    return events


# serve --devices cpu:2 --roles cpu:0=prompt,cpu:1=token --num-kv-blocks 64 --no-autoscale.
# E (300 + 550) decodes on cpu:1; X (1000 + 10) gets no reservation there, is prefilled on cpu:0
# (63 of 64 blocks) and waits for room; W (100 + 5) reserves 7 blocks on cpu:1 and waits on cpu:0
# for blocks. Once E is done cpu:1 has 57 free < 63: X could never move and W never start.
async def test_a_prefill_waiting_for_room_and_a_reservation_waiting_for_it_do_not_deadlock():
    cfg = RuntimeConfig(devices="cpu:2", roles={"cpu:0": "prompt", "cpu:1": "token"}, num_kv_blocks=64,
                        autoscale=False)
    async with Runtime(cfg) as rt:
        started = {k: asyncio.Event() for k in "EXW"}
        e = asyncio.ensure_future(first_event_then_rest(rt.generate(prompt(300, 1), greedy(550)), started["E"]))
        await asyncio.wait_for(started["E"].wait(), BOUND_S)
        x = asyncio.ensure_future(first_event_then_rest(rt.generate(prompt(1000, 2), greedy(10)), started["X"]))
        await asyncio.wait_for(started["X"].wait(), BOUND_S)  # X is prefilled on cpu:0
        assert not e.done(), "E finished before the shape was set up: the test would test nothing"
        P, T = rt.workers
        assert P.engine.pool.num_free < 7 and T.engine.pool.num_free < 63
        w = asyncio.ensure_future(first_event_then_rest(rt.generate(prompt(100, 3), greedy(5)), started["W"]))
        done = await asyncio.wait_for(asyncio.gather(e, x, w), BOUND_S)
        assert [len(d) for d in done] == [550, 10, 5]
        assert all(d[-1].finish_reason == "length" for d in done)
        assert held(rt) == [("cpu:0", 0, 0), ("cpu:1", 0, 0)]


# cpu:3 (one prompt worker, two token workers), 64 blocks each, long requests from many clients,
# each sending its next request when the last one ends: once seen as a prompt worker full with
# requests waiting and token workers holding reservations for them, nothing running for minutes.
async def test_many_clients_of_long_requests_on_small_pools_all_finish():
    cfg = RuntimeConfig(devices="cpu:3", num_kv_blocks=64, autoscale=False)
    rng = random.Random(7)
    shapes = [[(rng.randrange(300, 900), rng.randrange(8, 60)) for _ in range(4)] for _ in range(16)]
    async with Runtime(cfg) as rt:
        async def client(i):
            ends = []
            for j, (n, m) in enumerate(shapes[i]):
                events = [ev async for ev in rt.generate(prompt(n, seed=100 * i + j), greedy(m))]
                ends.append((len(events), events[-1].finish_reason))
            return ends

        done = await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(16))), BOUND_S * 2)
        assert done == [[(m, "length") for _, m in shapes[i]] for i in range(16)]
        assert held(rt) == [("cpu:0", 0, 0), ("cpu:1", 0, 0), ("cpu:2", 0, 0)]
