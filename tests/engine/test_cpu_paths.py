"""The engine's two CPU paths give the same tokens and logprobs: the C kernels of kernels/cpu.c
(decode over the paged cache, prefill flash attention, fused elementwise) and, where they cannot be
built, the torch references with the decode mirror."""

import pytest
from test_parity import ATOL, prompts

from splitnode import SamplingParams
from splitnode.kernels import cpu

if cpu.lib() is None:
    pytest.skip("the CPU kernels could not be built here (no C compiler)", allow_module_level=True)


def test_c_kernels_and_torch_references_agree(make_llm, monkeypatch):
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=3, ignore_eos=True)
    with_c = make_llm("Qwen2ForCausalLM")
    assert with_c.engine.runner.decode_mirror is None  # the C kernel reads the paged cache
    got = with_c.generate(prompts(), params)
    monkeypatch.setattr(cpu, "ENABLED", False)
    plain = make_llm("Qwen2ForCausalLM")
    assert plain.engine.runner.decode_mirror is not None
    want = plain.generate(prompts(), params)
    assert plain.engine.runner.decode_mirror.num_rebuilds > 0  # the mirror path really ran
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        for ea, eb in zip(a.logprobs, b.logprobs):
            assert ea.keys() == eb.keys()
            assert all(abs(ea[t].logprob - eb[t].logprob) <= ATOL for t in ea)
