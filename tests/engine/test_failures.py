"""Failure isolation: one request whose sampling (or logprobs) raises fails alone, with its error;
the others in its batch get the tokens an unbroken run gives them, and the engine goes on. A
failing forward stays the device's failure."""

from __future__ import annotations

import asyncio

import pytest
import torch

from splitnode import SamplingParams
from splitnode.engine import engine as engine_module
from splitnode.engine.sequence import Sequence

ARCH = "LlamaForCausalLM"
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=10, ignore_eos=True, logprobs=2)


def prompts(n: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (4 + 9 * i,), generator=g).tolist() for i in range(n)]


def bypassing(params: SamplingParams, **values) -> SamplingParams:
    """A copy holding values validation refuses: what a bug past the door would hand the engine."""
    bad = SamplingParams(**vars(params))
    for name, v in values.items():
        object.__setattr__(bad, name, v)
    return bad


@pytest.fixture
def llm(make_llm):
    return make_llm(ARCH)


def assert_all_free(llm) -> None:
    assert not llm.engine.has_work()
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


def test_a_row_that_raises_mid_decode_fails_alone(llm, monkeypatch):
    """The sampler raises for one sequence's row at its 4th token: the batch call fails, the engine
    samples row by row, and only that sequence ends (abort, its error), returned by step()."""
    # the bad one asks for logprobs, so that its batches go through `sample` (an all-plain-greedy
    # batch takes the engine's argmax fast path, which has no sampler to raise)
    params = [GREEDY, SEEDED, GREEDY, SamplingParams(**{**vars(GREEDY), "logprobs": 0}), GREEDY]
    want = llm.generate(prompts(), params)
    bad = params[3]  # its own object: the patched sampler knows it by identity
    real_sample = engine_module.sample

    def sample(logits, ps, seeds, positions, histories):
        for p, h in zip(ps, histories):
            if p is bad and len(h) == len(prompts()[3]) + 3:
                raise RuntimeError("boom\nsecond line of the report")
        return real_sample(logits, ps, seeds, positions, histories)

    monkeypatch.setattr(engine_module, "sample", sample)
    eng = llm.engine
    seqs = [Sequence(100 + i, p, sp) for i, (p, sp) in enumerate(zip(prompts(), params))]
    for s in seqs:
        eng.add(s)
    returned: list[Sequence] = []
    while eng.has_work():
        returned += eng.step()[1]
    failed = seqs[3]
    assert failed.is_finished and failed.finish_reason == "abort"
    assert failed.error == "sampling failed: RuntimeError: boom"
    assert failed.token_ids[failed.num_prompt_tokens:] == want[3].token_ids[:3]
    assert returned.count(failed) == 4  # three tokens, then its failure: the worker emits and frees it
    for i in (0, 1, 2, 4):
        assert seqs[i].error is None and seqs[i].token_ids[seqs[i].num_prompt_tokens:] == want[i].token_ids
    assert_all_free(llm)
    assert [o.token_ids for o in llm.generate(prompts(), GREEDY)] == [
        o.token_ids for o in llm.generate(prompts(), GREEDY)]  # the engine goes on


def test_a_nan_temperature_past_validation_fails_its_request_only(llm):
    """A real failure inside the batched sampler, after the seeded row before it drew: that row's
    generator is rewound, so it still draws what it draws in any other batch."""
    params = [SEEDED, GREEDY, SEEDED, GREEDY]
    want = llm.generate(prompts(4), params)
    bad = bypassing(SEEDED, temperature=float("nan"))
    outs = llm.generate(prompts(4)[:2] + [[9, 8, 7]] + prompts(4)[2:], params[:2] + [bad] + params[2:])
    failed = outs.pop(2)
    assert failed.finished and failed.finish_reason == "abort" and failed.token_ids == []
    assert failed.error.startswith("sampling failed: RuntimeError: probability tensor contains")
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    assert all(o.error is None and o.finish_reason == "length" for o in outs)
    for a, b in zip(outs[0].logprobs, want[0].logprobs):
        assert a.keys() == b.keys()
    assert_all_free(llm)


def test_a_prompt_logprobs_failure_mid_prefill_fails_its_request_only(make_llm):
    """Chunked prefill: the failure comes in a chunk that samples nothing; the sequence still
    leaves the batch, its blocks free, and the next requests run."""
    llm = make_llm(ARCH, max_num_batched_tokens=16)
    ps = prompts()
    want = llm.generate(ps, GREEDY)
    bad = bypassing(GREEDY, prompt_logprobs=10**6)  # topk(10**6) on a small vocabulary raises
    outs = llm.generate([ps[0], ps[3], ps[1]], [GREEDY, bad, GREEDY])
    assert outs[1].finish_reason == "abort" and outs[1].token_ids == []
    assert outs[1].error == "prompt logprobs failed: RuntimeError: selected index k out of range"
    assert [outs[0].token_ids, outs[2].token_ids] == [want[0].token_ids, want[1].token_ids]
    assert_all_free(llm)
    assert [o.token_ids for o in llm.generate(ps, GREEDY)] == [o.token_ids for o in want]


async def test_stream_raises_for_the_failed_request_only(llm):
    want = llm.generate(prompts(2), GREEDY)
    bad = bypassing(GREEDY, temperature=float("nan"), top_k=0)

    async def tokens(prompt, params) -> list[int]:
        out = []
        async for ev in llm.stream(prompt, params):
            out = ev.token_ids
        return out

    good0, failed, good1 = await asyncio.gather(tokens(prompts(2)[0], GREEDY), tokens([1, 2, 3], bad),
                                                tokens(prompts(2)[1], GREEDY), return_exceptions=True)
    assert isinstance(failed, RuntimeError)
    assert str(failed).startswith("request ") and " failed: sampling failed: RuntimeError: " in str(failed)
    assert [good0, good1] == [o.token_ids for o in want]
    await asyncio.sleep(0.05)
    assert_all_free(llm)


def test_a_failing_forward_is_still_the_devices_failure(llm, monkeypatch):
    def run(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(llm.engine.runner, "run", run)
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate(prompts(2), GREEDY)
