"""What callers get back, the per-request text state (detokenization, stop strings) that the
library and the runtime share, and the one place requests are made. It runs where the caller
lives, never on a worker thread."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitnode.engine.engine import Engine, check_length
from splitnode.engine.sampling import Logprob, SamplingParams
from splitnode.engine.sequence import Sequence
from splitnode.model.tokenizer import Tokenizer

Prompt = str | list[int]


def new_request(request_id: int, prompt: Prompt, params: SamplingParams, tokenizer: Tokenizer, engine: Engine,
                default_seed: int, max_model_len: int | None = None) -> RequestState:
    """A request for `engine` (any of the caller's engines: they share the model), refused here if
    it could never run. `max_model_len`: a lower limit than the engine's (the runtime's smallest)."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    vocab = engine.model_config.vocab_size
    if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
        raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
    engine.check_request(len(ids), params)
    if max_model_len is not None and max_model_len < engine.max_model_len:
        check_length(len(ids), params.max_tokens, max_model_len, "the lowest limit of the engines serving it")
    seq = Sequence(request_id, ids, params, frozenset(tokenizer.eos_token_ids), default_seed=default_seed)
    return RequestState(request_id, prompt if isinstance(prompt, str) else None, seq, tokenizer)


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # all generated so far
    text: str  # all generated so far (stop string excluded)
    new_token_ids: list[int] = field(default_factory=list)  # since the previous event
    delta: str = ""  # text since the previous event
    logprobs: list[dict[int, Logprob]] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS, stop id or stop string), "length", "abort"
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # why the request failed on its own (finish_reason "abort"); None otherwise


class RequestState:
    """Follows one sequence from the caller's side: turns new token ids into text (the tokenizer's
    IncrementalDecoder: no half UTF-8 characters), and finds stop strings."""

    def __init__(self, request_id: int, prompt: str | None, seq: Sequence, tokenizer: Tokenizer):
        self.request_id = request_id
        self.prompt = prompt
        self.seq = seq
        self.decoder = tokenizer.incremental_decoder(seq.params.skip_special_tokens)
        self.text = ""
        self.num_seen = 0
        self.stopped_by_string = False
        self.finish_reason: str | None = None

    def update(self, num_out: int | None = None, finish_reason: str | None = None) -> RequestOutput:
        """The event for the tokens the sequence gained since the last call. Sets
        `stopped_by_string` when a stop string ended the request (the caller aborts the sequence).

        A caller on another thread than the sequence's worker passes the snapshot the worker took
        (outputs count, finish reason) so the event never mixes two steps."""
        ids, new_ids, finish_reason = self._take(num_out, finish_reason)
        delta = "" if self.stopped_by_string else self._decode(new_ids, finish_reason)
        delta, self.finish_reason = self._cut_at_stop_string(delta, finish_reason)
        return self._output(ids, new_ids, delta)

    def _take(self, num_out: int | None, finish_reason: str | None) -> tuple[list[int], list[int], str | None]:
        """The outputs so far, those new since the last call, and the finish reason: the live
        sequence's, or the snapshot's."""
        seq = self.seq
        if num_out is None:
            num_out, finish_reason = len(seq.token_ids) - seq.num_prompt_tokens, seq.finish_reason
        ids = seq.token_ids[seq.num_prompt_tokens:seq.num_prompt_tokens + num_out]
        new_ids = ids[self.num_seen:]
        self.num_seen = len(ids)
        return ids, new_ids, finish_reason

    def _decode(self, new_ids: list[int], finish_reason: str | None) -> str:
        if finish_reason == "stop" and new_ids and new_ids[-1] in self.seq.stop_ids:
            new_ids = new_ids[:-1]  # the EOS / stop id is not part of the text
        delta = self.decoder.add(new_ids)
        if finish_reason is not None:  # characters held back for a possible continuation
            delta += self.decoder.flush()
        return delta

    def _cut_at_stop_string(self, delta: str, finish_reason: str | None) -> tuple[str, str | None]:
        """Adds delta to the text, cut before the first stop string; returns what of delta is
        left and the finish reason ("stop" when a stop string was found)."""
        stop = self.seq.params.stop
        before = len(self.text)
        self.text += delta
        if not (stop and delta):
            return delta, finish_reason
        # the text before delta holds no stop string (it was cut): look where one could end in delta
        start = max(0, before - max(len(s) for s in stop) - len(delta))
        hits = [i for i in (self.text.find(s, start) for s in stop) if i >= 0]
        if not hits:
            return delta, finish_reason
        cut = min(hits)
        self.text = self.text[:cut]
        self.stopped_by_string = True
        return self.text[before:] if cut > before else "", "stop"

    def _output(self, ids: list[int], new_ids: list[int], delta: str) -> RequestOutput:
        seq = self.seq
        finished = self.finish_reason is not None
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(ids), text=self.text, new_token_ids=new_ids, delta=delta,
            logprobs=None if seq.logprobs is None else seq.logprobs[:len(ids)],
            prompt_logprobs=seq.prompt_logprobs, finished=finished,
            finish_reason=self.finish_reason, metrics=self.metrics() if finished else {},
            # set before the sequence finished (`Sequence.fail`), so the snapshot's finish covers it
            error=seq.error if finished else None)

    def metrics(self) -> dict[str, float]:
        seq = self.seq
        m: dict[str, float] = {}
        if seq.first_token_time is not None:
            m["ttft_s"] = seq.first_token_time - seq.arrival_time
            m["e2e_s"] = seq.token_times[-1] - seq.arrival_time
        if len(seq.token_times) > 1:
            gaps = [b - a for a, b in zip(seq.token_times, seq.token_times[1:])]
            m["tbt_mean_s"] = sum(gaps) / len(gaps)
            m["tbt_max_s"] = max(gaps)
        return m
