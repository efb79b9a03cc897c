"""What one request, or too many, may cost the runtime: every case here was found by chaos testing
against `serve`; each test fails on the code before its fix."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
from polling import until

from splitnode import SamplingParams
from splitnode.runtime import Runtime, RuntimeConfig
from splitnode.runtime.runtime import Overloaded

WAIT = 30.0


def prompt(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def split_cfg(**kw):
    kw.setdefault("num_kv_blocks", 128)
    return RuntimeConfig(devices="cpu:2", roles={"cpu:0": "prompt", "cpu:1": "token"}, autoscale=False, **kw)


async def collect(rt, p, params):
    return [ev async for ev in rt.generate(p, params)]


# A 10 MB prompt was tokenized on the loop before its length was checked: every stream and every
# ping stalled for seconds. It is refused untokenized now, and prompts are tokenized off the loop.
async def test_a_huge_prompt_is_refused_before_tokenizing_and_prompts_tokenize_off_the_loop():
    async with Runtime(split_cfg()) as rt:
        calls = []
        real_encode = rt.tokenizer.encode

        def encode(text, *a, **k):
            calls.append((len(text), threading.current_thread()))
            return real_encode(text, *a, **k)

        rt.tokenizer.encode = encode
        with pytest.raises(ValueError, match="longer than any request this runtime can run"):
            await collect(rt, "x" * 10_000_000, greedy(4))
        assert calls == []
        events = await collect(rt, "hello there", greedy(4))
        assert events[-1].finish_reason == "length"
        assert [n for n, _ in calls] == [len("hello there")]
        assert calls[0][1] is not threading.current_thread()  # not the loop's thread
        assert await collect(rt, list(range(3, 50)), greedy(2))  # a list of ids needs no tokenizer


# cancel() answered True while the stream then ended "length": the final event was already on
# its way to the loop. A cancel that says True now ends the stream "abort".
async def test_a_cancel_that_says_true_ends_the_stream_abort_even_past_the_final_token():
    async with Runtime(split_cfg()) as rt:
        real_on_tokens = rt.on_tokens
        final_queued = asyncio.Event()
        held = []

        def on_tokens(events):  # on the token worker's thread
            if not held and any(e.finish_reason is not None for e in events):
                held.append(events)  # the final event, queued for the loop but not taken yet
                rt.loop.call_soon_threadsafe(final_queued.set)
                return
            real_on_tokens(events)

        rt.on_tokens = on_tokens
        events = []

        async def consume():
            async for ev in rt.generate(prompt(20, seed=1), greedy(3)):
                events.append(ev)

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(final_queued.wait(), WAIT)
        assert await rt.cancel(events[0].request_id)
        real_on_tokens(held[0])
        await asyncio.wait_for(task, WAIT)
        assert events[-1].finished and events[-1].finish_reason == "abort"


# No global bound on requests in flight: past max_active_requests new ones are refused at once,
# and the ones in flight go on.
async def test_requests_past_max_active_requests_are_refused_as_overloaded():
    async with Runtime(split_cfg(max_active_requests=2)) as rt:
        streams = [rt.generate(prompt(30, seed=i), greedy(40)) for i in range(2)]
        firsts = [await s.__anext__() for s in streams]
        with pytest.raises(Overloaded, match="max_active_requests"):
            await collect(rt, prompt(10), greedy(2))
        for s, first in zip(streams, firsts):
            rest = [ev async for ev in s]
            assert len([first, *rest]) == 40 and rest[-1].finish_reason == "length"
        assert (await collect(rt, prompt(10), greedy(2)))[-1].finished


# A drain-mode change out of decode work waited for every decode to finish (over 90 s under
# steady arrivals): it migrates what is left after drain_timeout_s, and status says why it waits.
async def test_a_drain_role_change_is_bounded_and_says_what_it_waits_for():
    cfg = RuntimeConfig(devices="cpu:3", num_kv_blocks=128, autoscale=False, drain_timeout_s=1.0)
    async with Runtime(cfg) as rt:
        events = []
        started = asyncio.Event()

        async def consume():
            async for ev in rt.generate(prompt(30, seed=2), greedy(1500)):
                events.append(ev)
                started.set()

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(started.wait(), WAIT)
        def decoding_on():
            return [d["name"] for d in rt.status()["devices"] if d["role"] == "token" and d["running"]]

        await until(decoding_on, WAIT)  # handed off to a token worker
        (holder,) = decoding_on()
        change = asyncio.ensure_future(rt.assign(holder, "prompt", mode="drain"))
        await until(lambda: any(d["role_change_waits_for"] for d in rt.status()["devices"]), WAIT)
        (dev,) = [d for d in rt.status()["devices"] if d["name"] == holder]
        assert dev["target_role"] == "prompt" and "draining 1 decodes here" in dev["role_change_waits_for"]
        await asyncio.wait_for(change, WAIT)
        assert not task.done(), "the change waited for the decode to finish: not bounded"
        await asyncio.wait_for(task, WAIT * 4)
        assert len(events) == 1500 and events[-1].finish_reason == "length"
        st = rt.status()
        assert st["transfers"]["num_sequences"] >= 2  # prompt -> token, then migrated off the drained one


# generate("hello", {"temperature": 1e-40}) raised inside the prompt worker's thread and killed it
# for good. Such values are refused or made greedy by SamplingParams now; and a request whose
# sampling still raises (here a NaN temperature set past validation) fails alone: its stream
# raises, the others in its batch go on, the worker lives.
async def test_one_request_failing_in_a_step_fails_alone_and_the_worker_lives():
    async with Runtime(split_cfg()) as rt:
        tiny = await collect(rt, "hello", SamplingParams(max_tokens=4, temperature=1e-40, ignore_eos=True))
        assert tiny[-1].token_ids == (await collect(rt, "hello", greedy(4)))[-1].token_ids
        bad = SamplingParams(max_tokens=6, temperature=0.7, ignore_eos=True)
        object.__setattr__(bad, "temperature", float("nan"))
        good = [prompt(40, seed=s) for s in (3, 4)]
        alone = [(await collect(rt, p, greedy(6)))[-1].token_ids for p in good]
        results = await asyncio.gather(collect(rt, prompt(40, seed=5), bad), *(collect(rt, p, greedy(6)) for p in good),
                                       return_exceptions=True)
        assert isinstance(results[0], RuntimeError) and "failed" in str(results[0]), results[0]
        assert [r[-1].token_ids for r in results[1:]] == alone
        st = rt.status()
        assert all(d["error"] is None for d in st["devices"])
        assert all(d["kv_blocks_used"] == 0 and d["kv_blocks_reserved"] == 0 for d in st["devices"])
        assert (await collect(rt, "hello", greedy(3)))[-1].finish_reason == "length"
