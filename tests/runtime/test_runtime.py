"""The phase-split runtime on CPU workers (`cpu:N`): the same code path a GPU box runs."""

from __future__ import annotations

import asyncio
import random

import pytest

from splitnode import LLM, SamplingParams
from splitnode.runtime import Runtime, RuntimeConfig

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, logprobs=3, ignore_eos=True)
BLOCKS = 512


def prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(n)] for n in lengths]


async def collect(rt, prompt, params=GREEDY):
    events = []
    async for ev in rt.generate(prompt, params):
        events.append(ev)
    return events


def same_logprobs(a, b, tol):
    assert len(a) == len(b)
    for da, db in zip(a, b):
        assert da.keys() == db.keys()
        for t in da:
            assert abs(da[t].logprob - db[t].logprob) <= tol


@pytest.fixture(scope="module")
def reference():
    """The single-device engine's answers, the oracle for every runtime configuration."""
    llm = LLM(num_kv_blocks=BLOCKS)
    ps = prompts([5, 17, 40, 90, 130])
    return ps, llm.generate(ps, GREEDY)


@pytest.mark.parametrize("roles", [
    {"cpu:0": "prompt", "cpu:1": "token", "cpu:2": "token"},
    {"cpu:0": "mixed", "cpu:1": "mixed", "cpu:2": "mixed"},
])
async def test_split_and_colocated_match_single_device(reference, roles):
    ps, ref = reference
    # prompts on both sides of layerwise_min_tokens: 5, 17, 40 move in one piece; 90, 130 per layer
    cfg = RuntimeConfig(devices="cpu:3", roles=roles, num_kv_blocks=BLOCKS, layerwise_min_tokens=64,
                        autoscale=False)
    async with Runtime(cfg) as rt:
        results = await asyncio.gather(*[collect(rt, p) for p in ps])
        st = rt.status()
    for events, r in zip(results, ref):
        final = events[-1]
        assert final.finished and final.finish_reason == "length"
        assert len(events) == 10  # one event per token
        assert final.token_ids == r.token_ids
        same_logprobs(final.logprobs, r.logprobs, 1e-5)
    moved = st["transfers"]
    if "prompt" in roles.values():
        assert moved["num_sequences"] == len(ps) and moved["bytes_moved"] > 0
        # layer-wise prompts send one move per layer and chunk, short ones one move in all
        assert moved["num_transfers"] > len(ps)
    else:
        assert moved["num_sequences"] == 0
    assert all(d["kv_blocks_used"] == 0 for d in st["devices"])


async def test_reassign_and_cancel_under_load_loses_nothing(reference):
    ps, ref = reference
    cfg = RuntimeConfig(devices="cpu:3", num_kv_blocks=BLOCKS, layerwise_min_tokens=64, autoscale=False)
    rng = random.Random(1)
    async with Runtime(cfg) as rt:
        jobs = [(i % len(ps), rng.random() < 1 / 3) for i in range(24)]

        async def run(idx, cancel):
            events = []
            at = 1 + rng.randrange(4)
            async for ev in rt.generate(ps[idx], GREEDY):
                events.append(ev)
                if cancel and len(events) == at:
                    await rt.cancel(ev.request_id)  # False when it had already finished
            return idx, cancel, events

        async def reassign():
            moves = [("cpu:1", "prompt", "migrate"), ("cpu:0", "token", "drain"), ("cpu:2", "mixed", "migrate"),
                     ("cpu:0", "prompt", "migrate"), ("cpu:1", "token", "drain"), ("cpu:2", "token", "migrate")]
            for device, role, mode in moves:
                await asyncio.sleep(0.02 * rng.random())
                await rt.assign(device, role, mode=mode)
            return [d["role"] for d in rt.status()["devices"]]

        *results, roles = await asyncio.gather(*[run(i, c) for i, c in jobs], reassign())
        st = rt.status()
    assert roles == ["prompt", "token", "token"]
    for idx, cancel, events in results:
        final = events[-1]
        assert final.finished
        if final.finish_reason == "abort":
            assert cancel
            assert final.token_ids == ref[idx].token_ids[: len(final.token_ids)]
        else:
            assert final.token_ids == ref[idx].token_ids
    assert sum(e[-1].finish_reason == "abort" for _, _, e in results) >= 1
    for d in st["devices"]:
        assert d["kv_blocks_used"] == 0, d
        assert d["running"] == d["waiting"] == d["arriving"] == 0


async def test_failed_transfer_is_recomputed_on_the_token_worker(reference, monkeypatch):
    ps, ref = reference
    cfg = RuntimeConfig(devices="cpu:2", num_kv_blocks=BLOCKS, layerwise_min_tokens=64, autoscale=False)
    async with Runtime(cfg) as rt:
        def broken(*args, **kwargs):
            raise RuntimeError("injected transfer failure (test double for a broken link)")

        monkeypatch.setattr(rt.mover, "send", broken)
        results = await asyncio.gather(*[collect(rt, p) for p in ps])
        st = rt.status()
    for events, r in zip(results, ref):
        assert events[-1].token_ids == r.token_ids
        same_logprobs(events[-1].logprobs, r.logprobs, 1e-4)
    assert st["transfers"]["num_failed"] == len(ps)
    assert all(d["kv_blocks_used"] == 0 for d in st["devices"])


async def test_assign_refuses_to_leave_a_phase_without_workers():
    cfg = RuntimeConfig(devices="cpu:2", num_kv_blocks=64, autoscale=False)
    async with Runtime(cfg) as rt:
        with pytest.raises(ValueError, match="token phase"):
            await rt.assign("cpu:1", "prompt")
        with pytest.raises(ValueError, match="unknown device"):
            await rt.assign("cpu:7", "prompt")
        with pytest.raises(ValueError, match="role must be one of"):
            await rt.assign("cpu:0", "decode")
        await rt.assign("cpu:0", "mixed", mode="drain")
        st = rt.status()
        assert [(d["role"], d["pinned"]) for d in st["devices"]] == [("mixed", True), ("token", False)]
        rt.release("cpu:0")
        assert not rt.status()["devices"][0]["pinned"]


async def test_autoscaler_borrows_a_token_worker_when_prompts_queue_up(reference):
    ps, ref = reference
    cfg = RuntimeConfig(devices="cpu:3", num_kv_blocks=BLOCKS, borrow_prompt_tokens=100,
                        autoscale_interval_s=0.01, max_num_batched_tokens=16)
    async with Runtime(cfg) as rt:
        borrowed = asyncio.Event()

        async def watch():
            while not borrowed.is_set():
                if any(d["borrowed_from"] == "token" for d in rt.status()["devices"]):
                    borrowed.set()
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        results = await asyncio.gather(*[collect(rt, p) for p in ps * 3])
        watcher.cancel()
        assert rt.autoscaler.num_borrows >= 1
    for events, r in zip(results, ref * 3):
        assert events[-1].token_ids == r.token_ids


def test_runtime_config_rejects_bad_devices_and_roles():
    with pytest.raises(ValueError, match="cpu:N"):
        RuntimeConfig(devices="cpu:0")
    with pytest.raises(ValueError, match="token phase"):
        RuntimeConfig(devices="cpu:2", roles={"cpu:0": "prompt", "cpu:1": "prompt"})
    with pytest.raises(ValueError, match="not among devices"):
        RuntimeConfig(devices="cpu:2", roles={"cpu:5": "prompt"})
    assert RuntimeConfig(devices="cpu:3").roles == {"cpu:0": "prompt", "cpu:1": "token", "cpu:2": "token"}
    assert RuntimeConfig(devices="cpu:1").roles == {"cpu:0": "mixed"}


async def test_chunked_prefill_sends_each_chunk_layer_by_layer():
    """A long prompt prefilled in 32-token chunks on the prompt worker: each chunk's blocks go to
    the token worker layer by layer, and the decode there matches the single-device engine run
    with the same chunking."""
    (prompt,) = prompts([150], seed=3)
    ref = LLM(num_kv_blocks=BLOCKS, max_num_batched_tokens=32).generate([prompt], GREEDY)[0]
    cfg = RuntimeConfig(devices="cpu:2", num_kv_blocks=BLOCKS, layerwise_min_tokens=64,
                        max_num_batched_tokens=32, autoscale=False)
    async with Runtime(cfg) as rt:
        events = await collect(rt, prompt)
        st = rt.status()
    assert events[-1].token_ids == ref.token_ids
    same_logprobs(events[-1].logprobs, ref.logprobs, 1e-5)
    num_layers = 4  # the demo model
    chunks = -(-150 // 32)
    assert st["transfers"]["num_transfers"] == chunks * num_layers
    assert st["transfers"]["bytes_moved"] > 0 and st["transfers"]["num_failed"] == 0


async def test_timed_out_transfer_is_recomputed_on_the_token_worker(reference, monkeypatch):
    """The copy outlives the timeout: the token worker recomputes the prefill in other blocks, and
    the ones the late copy may still write return to its pool only once the copy's event fires."""
    ps, ref = reference

    class LateEvent:
        """Test double for the CUDA event of a copy on a hung link: done once the test says so."""

        fired = False

        def query(self) -> bool:
            return LateEvent.fired

    cfg = RuntimeConfig(devices="cpu:2", num_kv_blocks=BLOCKS, transfer_timeout_s=0.05, autoscale=False)
    async with Runtime(cfg) as rt:
        send = rt.mover.send
        monkeypatch.setattr(rt.mover, "send", lambda *a: send(*a)._replace(written=LateEvent()))
        results = await asyncio.gather(*[collect(rt, p) for p in ps[:3]])
        st = rt.status()
        token_pool = rt.workers[1].engine.pool
        held_while_late = token_pool.num_pending
        LateEvent.fired = True
        st_after = rt.status()
    for events, r in zip(results, ref):
        assert events[-1].token_ids == r.token_ids
    assert st["transfers"]["num_failed"] == 3 and st["transfers"]["in_flight"] == 0
    # each arrival's blocks (the prompt's, plus the first token's) wait for the late copy
    assert held_while_late == sum(token_pool.blocks_for(len(p) + 1) for p in ps[:3])
    assert st["devices"][1]["kv_blocks_used"] == held_while_late
    assert all(d["kv_blocks_used"] == 0 for d in st_after["devices"]) and token_pool.num_pending == 0


async def test_a_layer_send_that_fails_mid_prefill_is_sent_again_whole(monkeypatch):
    """One layer of the first chunk fails to send: no later chunk may count as sent layer by layer
    (that would leave the hole), so the hand-off sends every layer and the output is unchanged."""
    (prompt,) = prompts([150], seed=3)
    ref = LLM(num_kv_blocks=BLOCKS, max_num_batched_tokens=32).generate([prompt], GREEDY)[0]
    cfg = RuntimeConfig(devices="cpu:2", num_kv_blocks=BLOCKS, layerwise_min_tokens=64,
                        max_num_batched_tokens=32, autoscale=False)
    async with Runtime(cfg) as rt:
        send, calls = rt.mover.send, []

        def flaky(src, dst, src_blocks, dst_blocks, layers):
            calls.append(layers)
            if len(calls) == 3:
                raise RuntimeError("injected failure of one layer's copy (test double)")
            return send(src, dst, src_blocks, dst_blocks, layers)

        monkeypatch.setattr(rt.mover, "send", flaky)
        events = await collect(rt, prompt)
        st = rt.status()
    assert events[-1].token_ids == ref.token_ids
    same_logprobs(events[-1].logprobs, ref.logprobs, 1e-5)
    # first chunk: layers 0, 1, then 2 fails (3 is not tried); no later chunk goes layer by layer;
    # the hand-off then moves all 4 layers in one call
    assert [len(r) for r in calls] == [1, 1, 1, 4]
    assert all(d["kv_blocks_used"] == 0 for d in st["devices"])


async def test_two_workers_on_one_device_split_the_phases(reference):
    """A device named twice gets two workers (two roles on one card): the second is "cpu:0/1",
    the KV still moves between their pools, and the answers are the single-device engine's."""
    ps, ref = reference
    cfg = RuntimeConfig(devices="cpu:0,cpu:0", roles={"cpu:0": "prompt", "cpu:0/1": "token"},
                        num_kv_blocks=BLOCKS, layerwise_min_tokens=64, autoscale=False)
    async with Runtime(cfg) as rt:
        results = await asyncio.gather(*[collect(rt, p) for p in ps])
        st = rt.status()
    assert [d["name"] for d in st["devices"]] == ["cpu:0", "cpu:0/1"]
    for events, r in zip(results, ref):
        assert events[-1].token_ids == r.token_ids
    assert st["transfers"]["num_sequences"] == len(ps)
    assert all(d["kv_blocks_used"] == 0 for d in st["devices"])
