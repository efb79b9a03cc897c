"""Sampling parameters: validation at the door, seeded draws, greedy equivalents and every way a
request can finish."""

from __future__ import annotations

import pytest
import torch

from splitnode import SamplingParams

ARCH = "LlamaForCausalLM"


def prompts(n: int = 6) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (3 + 7 * i,), generator=g).tolist() for i in range(n)]


@pytest.fixture
def llm(make_llm):
    return make_llm(ARCH)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("temperature", -0.5), ("temperature", float("nan")), ("top_k", -2), ("top_p", 0.0),
    ("top_p", 1.5), ("min_p", 1.5), ("repetition_penalty", 0.0), ("seed", 1.5), ("logprobs", 21),
    ("prompt_logprobs", -1), ("stop", [""]), ("stop_token_ids", [-1]), ("temperature", "hot"), ("top_k", 2.0),
])
def test_invalid_params_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_request_errors_are_clear_and_leave_nothing_queued(make_llm):
    llm = make_llm(ARCH, num_kv_blocks=4)  # 64 token slots
    with pytest.raises(ValueError, match=r"exceeds the maximum model length 64.*KV pool of 4 blocks"):
        llm.generate([list(range(60))], SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate("hi", SamplingParams(stop_token_ids=[llm.engine.model_config.vocab_size]))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 100000]])
    assert not llm.engine.has_work() and not llm._inbox
    assert llm.engine.pool.num_free == 4
    out = llm.generate([list(range(56))], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8  # exactly the pool's capacity still runs


def test_seeded_requests_are_reproducible_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.01, seed=7, max_tokens=16,
                            ignore_eos=True, logprobs=2)
    target = prompts()[2]
    alone = llm.generate([target], seeded)[0]
    others = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in (3, 20, 9)]
    others += [SamplingParams(temperature=0.0, max_tokens=5), SamplingParams(temperature=1.2, seed=8, max_tokens=16)]
    batch = prompts()[:2] + [target] + prompts()[3:]
    params = others[:2] + [seeded] + others[2:]
    outs = llm.generate(batch, params)
    assert outs[2].token_ids == alone.token_ids
    for a, b in zip(outs[2].logprobs, alone.logprobs):
        assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) <= 1e-4 for t in a)
    again = llm.generate([target, target], [seeded, SamplingParams(**{**vars(seeded), "seed": 8})])
    assert again[0].token_ids == alone.token_ids
    assert again[1].token_ids != alone.token_ids  # the seed matters
    assert len(set(alone.token_ids)) > 4  # sampled, not stuck on one token


def test_top_k_1_and_zero_temperature_are_greedy(llm):
    greedy = llm.generate(prompts(), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    topk1 = llm.generate(prompts(), SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in topk1] == [o.token_ids for o in greedy]
    sampled = llm.generate(prompts(), SamplingParams(temperature=1.5, seed=0, max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in sampled] != [o.token_ids for o in greedy]


def test_min_p_and_top_p_restrict_the_draw(llm):
    """Every sampled token lies in the nucleus / above the min-p floor of its own distribution."""
    for params in (SamplingParams(temperature=1.0, top_p=0.5, seed=1, max_tokens=24, ignore_eos=True, logprobs=20),
                   SamplingParams(temperature=1.0, min_p=0.2, seed=2, max_tokens=24, ignore_eos=True, logprobs=20)):
        for out in llm.generate(prompts(), params):
            for tok, entry in zip(out.token_ids, out.logprobs):
                top = sorted(entry.values(), key=lambda lp: lp.rank)
                p = torch.tensor([lp.logprob for lp in top]).exp()
                chosen = entry[tok].logprob
                if params.top_p < 1.0:  # mass strictly above the chosen token is below top_p
                    assert p[torch.tensor([lp.logprob > chosen for lp in top])].sum() < params.top_p + 1e-6
                else:
                    assert torch.tensor(chosen).exp() >= params.min_p * p[0] - 1e-6


def test_repetition_penalty_avoids_seen_tokens(llm):
    params = SamplingParams(temperature=0.0, repetition_penalty=1e4, max_tokens=20, ignore_eos=True)
    plain = llm.generate(prompts(), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    assert any(len(set(o.prompt_token_ids + o.token_ids)) < len(o.prompt_token_ids) + 20 for o in plain)
    for out in llm.generate(prompts(), params):
        history = list(out.prompt_token_ids)
        for tok in out.token_ids:
            assert tok not in history
            history.append(tok)


def test_finish_reasons_and_stops(llm):
    prompt = prompts()[1]
    base = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 16
    assert base.text == llm.tokenizer.decode(base.token_ids)

    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[:first + 1]
    assert out.text == llm.tokenizer.decode(base.token_ids[:first])  # the stop id is not text

    # The model's EOS ends a request the same way, unless ignore_eos.
    llm.tokenizer.eos_token_ids = {stop_id}
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16))[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[:first + 1]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0]
    assert out.token_ids == base.token_ids

    text = base.text
    start = next(i for i in range(3, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    stop = text[start:start + 2]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                stop=[stop, "never-there"]))[0]
    assert out.finish_reason == "stop" and out.text == text[:text.find(stop)]
    assert stop not in out.text and base.token_ids[:len(out.token_ids)] == out.token_ids
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


def test_engine_seed_makes_unseeded_sampling_repeat(make_llm):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    runs = [make_llm(seed=s).generate([[5, 6, 7]] * 2, params) for s in (3, 3, 4)]
    first, again, other = ([o.token_ids for o in outs] for outs in runs)
    assert first == again
    assert first[0] != first[1]  # two requests of one run draw differently
    assert first != other
