"""Requests from the caller's side: how they are made and refused, and how their tokens become text
(held-back characters, the final stop id, stop strings, the worker's snapshots)."""

from __future__ import annotations

import pytest

from splitnode import SamplingParams
from splitnode.engine.outputs import RequestState, new_request
from splitnode.engine.sequence import Sequence
from splitnode.model.demo import BOS, EOS


@pytest.fixture
def llm(make_llm):
    return make_llm("LlamaForCausalLM", num_kv_blocks=4)  # 64 token slots


def state(llm, params: SamplingParams) -> tuple[RequestState, Sequence]:
    seq = Sequence(0, [BOS], params, frozenset({EOS}))
    return RequestState(0, None, seq, llm.tokenizer), seq


def add(seq: Sequence, text: bytes | list[int]) -> None:
    for t in text:
        seq.append_token(t)


def test_text_holds_back_split_characters_and_leaves_out_the_final_stop_id(llm):
    st, seq = state(llm, SamplingParams(max_tokens=10, skip_special_tokens=False))
    add(seq, b"ok")
    assert st.update().delta == "ok"
    add(seq, "世".encode()[:2])
    assert st.update().delta == ""  # half a character: held back
    add(seq, [EOS])
    out = st.update()
    assert out.finished and out.finish_reason == "stop" and out.token_ids[-1] == EOS
    assert out.delta == "\ufffd" and out.text == "ok\ufffd"  # the tail flushed, "</s>" not in the text


def test_a_stop_string_cuts_the_text_and_ends_the_request(llm):
    st, seq = state(llm, SamplingParams(max_tokens=20, stop=["lo w"]))
    add(seq, b"he")
    assert st.update().delta == "he"
    add(seq, b"llo world")
    out = st.update()
    assert (out.delta, out.text, out.finished, out.finish_reason) == ("l", "hel", True, "stop")
    assert st.stopped_by_string and seq.finish_reason is None  # the caller aborts the sequence


def test_a_snapshot_sees_only_the_tokens_it_counts(llm):
    st, seq = state(llm, SamplingParams(max_tokens=3))
    add(seq, b"abc")  # the worker ran ahead of the events
    first = st.update(2, None)
    assert (first.token_ids, first.text, first.finished) == (list(b"ab"), "ab", False)
    last = st.update(3, "length")
    assert (last.new_token_ids, last.delta, last.finish_reason) == ([ord("c")], "c", "length")


def test_new_request_refuses_what_could_never_run(llm):
    engine, tok = llm.engine, llm.tokenizer
    with pytest.raises(ValueError, match=r"prompt token ids must be ints in \[0, 261\)"):
        new_request(0, [1, 2.0], SamplingParams(), tok, engine, default_seed=0)
    with pytest.raises(ValueError, match=r"prompt token ids must be ints in \[0, 261\)"):
        new_request(0, [1, 261], SamplingParams(), tok, engine, default_seed=0)
    with pytest.raises(ValueError, match=r"exceeds the maximum model length 64 .*KV pool of 4 blocks"):
        new_request(0, list(range(60)), SamplingParams(max_tokens=8), tok, engine, default_seed=0)
    with pytest.raises(ValueError, match=r"prompt \(30 tokens\) \+ max_tokens \(8\) = 38 exceeds the maximum "
                                         r"model length 32 \(the lowest limit"):
        new_request(0, list(range(30)), SamplingParams(max_tokens=8), tok, engine, default_seed=0,
                    max_model_len=32)
    st = new_request(7, "hi", SamplingParams(max_tokens=8, stop_token_ids=[5]), tok, engine, default_seed=3,
                     max_model_len=100)  # above the engine's own limit: the engine's applies
    assert (st.request_id, st.prompt, st.seq.seq_id, st.seq.prompt_token_ids) == (7, "hi", 7, [BOS, *b"hi"])
    assert st.seq.stop_ids == {5, *tok.eos_token_ids}
