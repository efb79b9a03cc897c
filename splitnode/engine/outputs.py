"""What callers get back, and the per-request text state (detokenization, stop strings) that the
library and the runtime share. It runs where the caller lives, never on a worker thread."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitnode.engine.sampling import Logprob
from splitnode.engine.sequence import Sequence


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


class RequestState:
    """Follows one sequence from the caller's side: turns new token ids into text with the
    prefix/read-offset method (no half UTF-8 characters), and finds stop strings."""

    def __init__(self, request_id: int, prompt: str | None, seq: Sequence, tokenizer):
        self.request_id = request_id
        self.prompt = prompt
        self.seq = seq
        self.tokenizer = tokenizer
        self.text = ""
        self.num_seen = 0
        self._prefix = 0
        self._read = 0
        self.stopped_by_string = False
        self.finish_reason: str | None = None

    def _decode_new(self, ids: list[int]) -> str:
        skip = self.seq.params.skip_special_tokens
        prefix = self.tokenizer.decode(ids[self._prefix:self._read], skip_special_tokens=skip)
        full = self.tokenizer.decode(ids[self._prefix:], skip_special_tokens=skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(ids)
            return full[len(prefix):]
        return ""

    def update(self, num_out: int | None = None, finish_reason: str | None = None) -> RequestOutput:
        """The event for the tokens the sequence gained since the last call. Sets
        `stopped_by_string` when a stop string ended the request (the caller aborts the sequence).

        A caller on another thread than the sequence's worker passes the snapshot the worker took
        (outputs count, finish reason) so the event never mixes two steps."""
        seq = self.seq
        if num_out is None:
            num_out, finish_reason = len(seq.token_ids) - seq.num_prompt_tokens, seq.finish_reason
        ids = seq.token_ids[seq.num_prompt_tokens:seq.num_prompt_tokens + num_out]
        new_ids = ids[self.num_seen:]
        self.num_seen = len(ids)
        finished = finish_reason is not None
        decode_ids = ids
        if finished and finish_reason == "stop" and ids and ids[-1] in seq.stop_ids:
            decode_ids = ids[:-1]  # the EOS / stop id is not part of the text
        delta = self._decode_new(decode_ids) if not self.stopped_by_string else ""
        if finished:  # flush characters held back for a possible continuation
            tail = self.tokenizer.decode(decode_ids[self._prefix:], skip_special_tokens=seq.params.skip_special_tokens)
            prefix = self.tokenizer.decode(decode_ids[self._prefix:self._read],
                                           skip_special_tokens=seq.params.skip_special_tokens)
            delta += tail[len(prefix):] if tail.startswith(prefix) else ""
            self._read = len(decode_ids)
        reason = finish_reason
        if seq.params.stop and delta:
            before = len(self.text)
            self.text += delta
            window = max(len(s) for s in seq.params.stop) + len(delta)
            start = max(0, before - window)
            hits = [i for i in (self.text.find(s, start) for s in seq.params.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.text = self.text[:cut]
                delta = self.text[before:] if cut > before else ""
                self.stopped_by_string = True
                finished, reason = True, "stop"
        else:
            self.text += delta
        self.finish_reason = reason if finished else None
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(ids), text=self.text, new_token_ids=new_ids, delta=delta,
            logprobs=None if seq.logprobs is None else seq.logprobs[:num_out],
            prompt_logprobs=seq.prompt_logprobs, finished=finished,
            finish_reason=self.finish_reason, metrics=self.metrics() if finished else {})

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
