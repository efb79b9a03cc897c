"""Streaming (one event per token) and exact block accounting whatever way requests end."""

from __future__ import annotations

import asyncio
import gc
from contextlib import aclosing

import torch

from splitnode import LLM, SamplingParams
from splitnode.engine.sequence import Sequence

ARCH = "MistralForCausalLM"


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, 256, (2 + 11 * i,), generator=g).tolist() for i in range(n)]


async def collect(llm, prompt, params, limit: int | None = None) -> list:
    events = []
    async with aclosing(llm.stream(prompt, params)) as stream:
        async for ev in stream:
            events.append(ev)
            if limit is not None and len(events) == limit:
                break
    return events


async def drained(llm: LLM) -> None:
    """Waits until the engine has run everything it holds (cancellations included)."""
    for _ in range(2000):
        if not llm._inbox and not llm.engine.has_work() and (llm._pump is None or llm._pump.done()):
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the engine did not drain")


async def test_stream_gives_one_event_per_token(make_llm):
    llm = make_llm(ARCH)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    want = llm.generate(prompts(3), params)
    got = await asyncio.gather(*(collect(llm, p, params) for p in prompts(3)))
    for events, final in zip(got, want):
        assert len(events) == 12 == len(final.token_ids)
        assert [e.new_token_ids for e in events] == [[t] for t in final.token_ids]
        assert [e.finished for e in events] == [False] * 11 + [True]
        assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
        assert "".join(e.delta for e in events) == events[-1].text == final.text
        assert events[-1].token_ids == final.token_ids and len(events[-1].logprobs) == 12
        assert [len(e.token_ids) for e in events] == list(range(1, 13))
        assert {"ttft_s", "e2e_s", "tbt_mean_s"} <= set(events[-1].metrics)


async def test_demo_model_streams_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    llm = LLM(num_kv_blocks=32)
    assert llm.engine.model_config.num_hidden_layers == 4  # the demo model
    events = await collect(llm, "Hello", SamplingParams(max_tokens=8, seed=0))
    final = events[-1]
    assert final.finished and len(events) == len(final.token_ids) <= 8
    assert final.finish_reason == ("length" if len(events) == 8 else "stop")
    assert "".join(e.delta for e in events) == final.text
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=16, temperature=0.0, logprobs=5))
    for out in outs:
        assert out.finished and 1 <= len(out.token_ids) <= 16 and len(out.logprobs) == len(out.token_ids)
        assert all(len(d) in (5, 6) for d in out.logprobs)
    assert outs[0].prompt == "Hello" and outs[0].prompt_token_ids == [256, *b"Hello"]  # BOS first
    assert llm.engine.pool.num_free == 32


async def test_every_block_is_free_after_finished_stopped_and_cancelled_requests(make_llm):
    # A pool small enough to preempt and a budget small enough to chunk, so cancellations land on
    # sequences in every state.
    llm = make_llm(ARCH, num_kv_blocks=14, max_num_batched_tokens=32, block_size=8)
    ps = prompts(8)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    base = llm.generate(ps[:2], greedy)
    text = base[1].text
    start = next(i for i in range(2, len(text) - 1) if "\ufffd" not in text[i])
    stop_id = base[0].token_ids[4]
    llm.engine.batcher.num_preempted = 0

    async def break_without_closing():
        async for ev in llm.stream(ps[7], SamplingParams(max_tokens=30, seed=3)):
            if len(ev.token_ids) == 2:
                break  # the generator is left for the garbage collector to close

    results = await asyncio.gather(
        collect(llm, ps[0], SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[stop_id])),
        collect(llm, ps[1], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[text[start]])),
        collect(llm, ps[2], SamplingParams(max_tokens=20, seed=1)),  # max_tokens or EOS
        collect(llm, ps[3], SamplingParams(max_tokens=40, seed=2), limit=3),  # cancelled mid-decode
        collect(llm, ps[4], SamplingParams(max_tokens=40, seed=4), limit=1),  # cancelled after its first token
        collect(llm, ps[5], SamplingParams(max_tokens=25, seed=5, ignore_eos=True)),
        collect(llm, ps[6], SamplingParams(max_tokens=25, seed=6, ignore_eos=True), limit=10),
        break_without_closing(),
    )
    gc.collect()
    await drained(llm)
    assert results[0][-1].finish_reason == "stop" and results[0][-1].token_ids[-1] == stop_id
    assert results[1][-1].finish_reason == "stop" and results[1][-1].text == text[:start]
    assert results[5][-1].finish_reason == "length" and len(results[5]) == 25
    assert [len(r) for r in (results[3], results[4], results[6])] == [3, 1, 10]
    assert llm.engine.batcher.num_preempted > 0
    engine = llm.engine
    assert not engine.batcher.running and not engine.batcher.waiting
    assert engine.pool.num_free == engine.pool.num_blocks == 14


def test_abort_frees_blocks_in_every_state(make_llm):
    """At the engine level: mid-prefill (chunked), preempted (waiting again) and never scheduled."""
    llm = make_llm(ARCH, num_kv_blocks=10, max_num_batched_tokens=16, block_size=8)
    engine = llm.engine
    ps = prompts(8)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    seqs = [Sequence(i, ps[i], params) for i in (5, 6, 7)]
    for s in seqs:
        engine.add(s)
    engine.step()
    assert 0 < seqs[0].num_computed < seqs[0].num_prompt_tokens and seqs[0].block_table  # mid-prefill
    engine.abort(seqs[0])
    assert seqs[0].finish_reason == "abort" and not seqs[0].block_table
    while engine.batcher.num_preempted == 0:
        engine.step()
    victim = next(s for s in seqs[1:] if s in engine.batcher.waiting)
    engine.abort(victim)
    late = Sequence(9, ps[1], params)
    engine.add(late)
    engine.abort(late)  # never scheduled
    for s in seqs[1:]:
        engine.abort(s)  # aborting twice, or a finished sequence, frees nothing twice
    assert not engine.has_work()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_chat_encodes_the_template_without_a_second_bos():
    from splitnode import LLM, SamplingParams

    llm = LLM(num_kv_blocks=64)
    out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=2, temperature=0.0))
    bos = llm.tokenizer.token_to_id("<s>")
    assert out.prompt_token_ids[0] == bos and out.prompt_token_ids[1] != bos
    assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt, add_special_tokens=False)
