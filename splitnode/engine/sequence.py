"""A request's token state as the batchers see it."""

from __future__ import annotations

import secrets
import time
from enum import Enum, auto

from splitnode.engine.sampling import Logprob, SamplingParams


class SeqStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Tokens = prompt + outputs. `num_computed` tokens have their K/V in the cache of the worker
    that holds the sequence; the `num_tokens - num_computed` others are the next chunk to run (one,
    for a decode)."""

    def __init__(self, seq_id: int, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: frozenset[int] = frozenset(), default_seed: int | None = None):
        self.seq_id = seq_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids)
        self.status = SeqStatus.WAITING
        self.num_computed = 0
        self.block_table: list[int] = []
        # The sampler's draws are a hash of (seed, position): no generator state to carry between
        # workers. An unseeded request takes one from the engine's seeded stream (EngineConfig.seed).
        seed = params.seed if params.seed is not None else default_seed
        self.seed: int = seed if seed is not None else secrets.randbits(63)
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        # the sampler's fast path: an argmax of the raw logits and nothing else (no penalty, no logprobs)
        self.plain_greedy = params.is_greedy and params.repetition_penalty == 1.0 and params.logprobs is None
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.finish_reason: str | None = None
        self.error: str | None = None  # why it failed on its own (see `fail`); None otherwise
        self.num_preemptions = 0
        self.num_skipped = 0  # batches this decode waited out: its priority grows with it
        # Runtime: set from the event loop; the worker owning the sequence frees it at its next step.
        self.cancelled = False
        # Runtime: where the sequence decodes after its prefill here (a `runtime.worker.Handoff`),
        # None while it stays. The engine never reads it.
        self.handoff: object | None = None
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.token_times: list[float] = []

    def __repr__(self) -> str:
        return f"Sequence({self.seq_id}, tokens={self.num_tokens}, computed={self.num_computed})"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_decode(self) -> bool:
        return self.num_computed > 0 and self.num_pending == 1

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def append_token(self, token_id: int, now: float | None = None) -> None:
        """`now`: when the token came (default: now); a batch's tokens share their step's time."""
        if now is None:
            now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
        self.token_ids.append(token_id)
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.token_ids) - self.num_prompt_tokens >= self.params.max_tokens:
            self.finish_reason = "length"

    def finish(self, reason: str) -> None:
        self.status = SeqStatus.FINISHED
        self.finish_reason = reason

    def fail(self, message: str) -> None:
        """Ends this sequence alone, for a failure of its own (its sampling, its logprobs): the
        caller frees its blocks and reports it among the finished ones; its batch goes on."""
        self.error = message
        self.finish("abort")

    def reset_for_recompute(self) -> None:
        """Forget the cache: the next chunk recomputes every token (prompt and outputs so far)."""
        self.num_computed = 0
        self.block_table = []
        self.status = SeqStatus.WAITING
