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


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 2**31), ("max_tokens", 10**30), ("temperature", -0.5), ("temperature", NAN),
    ("temperature", INF), ("temperature", -INF), ("temperature", 1e5), ("temperature", 10**400), ("top_k", -2),
    ("top_k", 2**31), ("top_p", 0.0), ("top_p", 1.5), ("top_p", NAN), ("top_p", INF), ("min_p", 1.5),
    ("min_p", -0.1), ("min_p", NAN), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("repetition_penalty", 1e-5), ("repetition_penalty", 1e5), ("repetition_penalty", NAN),
    ("repetition_penalty", INF), ("seed", 2**63), ("seed", -2**63 - 1), ("logprobs", 21), ("logprobs", -1),
    ("prompt_logprobs", -1), ("prompt_logprobs", 10**6), ("stop", [""]), ("stop", ["x" * 1025]),
    ("stop", ["a"] * 65), ("stop_token_ids", [-1]), ("stop_token_ids", [2**31]),
    ("stop_token_ids", list(range(1025))),
])
def test_out_of_range_params_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field} must be ") as e:
        SamplingParams(**{field: value})
    assert "\n" not in str(e.value) and len(str(e.value)) < 200  # one short line, even for a huge value


@pytest.mark.parametrize("field, value", [
    ("ignore_eos", "yes"), ("ignore_eos", 1), ("ignore_eos", None), ("skip_special_tokens", 5),
    ("skip_special_tokens", "false"), ("max_tokens", 16.0), ("max_tokens", "16"), ("max_tokens", True),
    ("max_tokens", None), ("temperature", "hot"), ("temperature", None), ("temperature", True), ("top_k", 2.0),
    ("top_k", False), ("top_p", "0.5"), ("min_p", [0.1]), ("repetition_penalty", None), ("seed", 1.5),
    ("seed", True), ("seed", "7"), ("logprobs", 1.0), ("logprobs", True), ("prompt_logprobs", "2"), ("stop", 5),
    ("stop", {"a": 1}), ("stop", [1]), ("stop", [b"x"]), ("stop_token_ids", [1.0]), ("stop_token_ids", [True]),
    ("stop_token_ids", "12"), ("stop_token_ids", 12),
])
def test_wrongly_typed_params_raise_value_error_naming_the_field_and_type(field, value):
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field} must be .*, got {type(value).__name__} "):
        SamplingParams(**{field: value})


def test_valid_edge_values_are_kept_and_normalised():
    p = SamplingParams(temperature=1, top_p=1, min_p=0, repetition_penalty=2, stop="end", stop_token_ids=(3, 4),
                       top_k=-1, seed=-1, logprobs=0, prompt_logprobs=20, max_tokens=2**31 - 1)
    assert (p.temperature, p.top_p, p.min_p, p.repetition_penalty) == (1.0, 1.0, 0.0, 2.0)
    assert all(type(v) is float for v in (p.temperature, p.top_p, p.min_p, p.repetition_penalty))
    assert p.stop == ["end"] and p.stop_token_ids == [3, 4] and not p.is_greedy
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []
    assert SamplingParams(seed=2**63 - 1, repetition_penalty=1e4, temperature=1e4).seed == 2**63 - 1


@pytest.mark.parametrize("temperature", [0.0, 1e-40, 5e-324, 9.9e-6])
def test_tiny_temperatures_are_greedy(temperature):
    """Below 1e-5 the float32 draw is the argmax anyway: the sampler never divides by them."""
    assert SamplingParams(temperature=temperature).is_greedy
    assert not SamplingParams(temperature=1e-5).is_greedy


def test_a_clients_bad_map_is_refused_before_any_device(llm):
    """The socket API builds SamplingParams from the client's map: these are the server's checks."""
    from splitnode.api.protocol import sampling_params

    for bad in ({"ignore_eos": "yes"}, {"skip_special_tokens": 5}, {"temperature": NAN}, {"top_p": INF},
                {"max_tokens": 10**12}, {"stop": [None]}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sampling_params(bad)
    tiny = sampling_params({"temperature": 1e-40, "max_tokens": 8, "ignore_eos": True})
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(prompts(3), tiny)] == [o.token_ids for o in
                                                                     llm.generate(prompts(3), greedy)]
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


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


def test_a_value_nested_a_thousand_deep_gets_a_short_error_not_a_recursion_error():
    value: list = []
    for _ in range(2000):
        value = [value]
    with pytest.raises(ValueError, match=r"SamplingParams\.stop must be") as e:
        SamplingParams(stop=value)
    assert len(str(e.value)) < 200
