"""Continuous batching gives each request what it gets alone: mixed lengths in one batch, under
preemption (a KV pool too small for the batch) and under chunked prefill (a small token budget)."""

from __future__ import annotations

import pytest
import torch

from splitnode import SamplingParams

ARCH = "Qwen3ForCausalLM"
PARAMS = SamplingParams(temperature=0.0, max_tokens=10, logprobs=3, prompt_logprobs=2, ignore_eos=True)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 3, 9, 16, 17, 25, 33, 48, 50, 70)]


@pytest.fixture(scope="module")
def alone(qwen3_llm):
    return [qwen3_llm.generate([p], PARAMS)[0] for p in prompts()]


def assert_same(got, want) -> None:
    assert got.token_ids == want.token_ids
    assert got.finish_reason == want.finish_reason == "length"
    for a, b in zip(got.logprobs + got.prompt_logprobs[1:], want.logprobs + want.prompt_logprobs[1:]):
        assert a.keys() == b.keys()
        for t in a:
            assert abs(a[t].logprob - b[t].logprob) <= 1e-4 and a[t].rank == b[t].rank, (t, a[t], b[t])
    assert len(got.prompt_logprobs) == len(want.prompt_logprobs)


@pytest.mark.parametrize("engine_kwargs", [
    {},
    dict(num_kv_blocks=10),  # 10 prompts of up to 80 tokens need 34 blocks of 16
    dict(max_num_batched_tokens=16),
    dict(num_kv_blocks=12, max_num_batched_tokens=24, block_size=8),
], ids=["batched", "preemption", "chunked-prefill", "preemption+chunked"])
def test_batch_matches_each_prompt_alone(engine_kwargs, make_llm, alone):
    llm = make_llm(ARCH, **engine_kwargs)
    outs = llm.generate(prompts(), PARAMS)
    for got, want in zip(outs, alone):
        assert_same(got, want)
    engine = llm.engine
    if "num_kv_blocks" in engine_kwargs:
        assert engine.batcher.num_preempted > 0
    assert engine.pool.num_free == engine.pool.num_blocks
    assert not engine.batcher.running and not engine.batcher.waiting


def test_chunked_prefill_splits_long_prompts(make_llm):
    llm = make_llm(ARCH, max_num_batched_tokens=16)
    seen = []
    step = llm.engine.step

    def recording_step(*args, **kwargs):
        batch, seqs = step(*args, **kwargs)
        seen.append(batch.num_tokens)
        return batch, seqs

    llm.engine.step = recording_step
    out = llm.generate([prompts()[-1]], SamplingParams(temperature=0.0, max_tokens=2))[0]
    assert max(seen) <= 16 and seen[:5] == [16, 16, 16, 16, 6]  # 70 prompt tokens in 5 chunks
    assert len(out.token_ids) == 2
