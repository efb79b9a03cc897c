"""The machine-level scheduler: picks the next batch of one worker from its role.

- prompt: prefill chunks FCFS under the token budget;
- token:  every running decode, as many as memory allows (continuous batching), then the
  recomputes it holds (a preempted decode, a request whose KV transfer failed); the router never
  gives it a fresh prompt;
- mixed:  chunked prefills plus decodes in one batch, prompts first; a decode left out of
  `decode_max_skips` batches goes before the prompts, so its priority grows with age.
When blocks run out the newest running sequence is preempted (its cache dropped, recomputed later);
a request preempted `max_preemptions` times is no longer picked while another one can be.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from splitnode.engine.config import EngineConfig
from splitnode.engine.kv import BlockPool
from splitnode.engine.sequence import Sequence, SeqStatus

# role -> (runs prefill chunks, runs decodes)
PHASES = {"prompt": (True, False), "token": (True, True), "mixed": (True, True)}


@dataclass
class Batch:
    """Sequences in flat-batch order (decodes first) with the number of new tokens each runs."""

    seqs: list[Sequence] = field(default_factory=list)
    chunk_lens: list[int] = field(default_factory=list)
    num_decodes: int = 0

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.chunk_lens)


class Batcher:
    def __init__(self, config: EngineConfig, pool: BlockPool, role: str = "mixed"):
        self.config = config
        self.pool = pool
        self.role = role
        self.waiting: deque[Sequence] = deque()  # holds no blocks
        self.running: list[Sequence] = []  # holds blocks, in arrival order
        self.num_preempted = 0

    def add(self, seq: Sequence) -> None:
        if seq.block_table:  # arrives with its cache (a handed-off or migrated sequence)
            seq.status = SeqStatus.RUNNING
            self._insert_running(seq)
        else:
            seq.status = SeqStatus.WAITING
            self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take seq out of this batcher and free its blocks (finished, cancelled, or handed off
        after its blocks were copied elsewhere)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq)

    @property
    def num_pending_prompt_tokens(self) -> int:
        # Read from the event loop too (routing, policy, status) while the worker changes both
        # queues: iterate snapshots (list() of a deque or list is one step under the GIL).
        return sum(s.num_pending for s in list(self.waiting)) + sum(
            s.num_pending for s in list(self.running) if not s.is_decode)

    def has_work(self) -> bool:
        prefill, decode = PHASES[self.role]
        return bool((prefill and (self.waiting or any(not s.is_decode for s in self.running)))
                    or (decode and any(s.is_decode for s in self.running)))

    def schedule(self) -> Batch:
        prefill_ok, decode_ok = PHASES[self.role]
        budget = self.config.max_num_batched_tokens
        slots = self.config.max_num_seqs
        decodes: list[Sequence] = []
        chunks: list[tuple[Sequence, int]] = []
        chosen: set[int] = set()

        def add_decode(seq: Sequence) -> bool:
            nonlocal budget, slots
            while not self.pool.can_grow(seq, seq.num_tokens):
                victim = self._victim(exclude=chosen)
                if victim is None:
                    return False
                self._preempt(victim)
                if victim is seq:
                    return False
            self.pool.grow(seq, seq.num_tokens)
            decodes.append(seq)
            chosen.add(seq.seq_id)
            budget -= 1
            slots -= 1
            return True

        ready = [s for s in self.running if s.is_decode] if decode_ok else []
        ready.sort(key=lambda s: -s.num_skipped)  # stable: older first among equals
        if self.role == "mixed":
            urgent = [s for s in ready if s.num_skipped >= self.config.decode_max_skips]
        else:
            urgent = ready
        for seq in urgent:
            if budget <= 0 or slots <= 0:
                break
            if seq.status is SeqStatus.RUNNING:
                add_decode(seq)

        if prefill_ok:
            candidates = [s for s in self.running if not s.is_decode] + list(self.waiting)
            for seq in candidates:
                if budget <= 0 or slots <= 0:
                    break
                n = min(seq.num_pending, budget)
                if seq.status is SeqStatus.RUNNING:  # mid-prefill: newer sequences make room
                    while not self.pool.can_grow(seq, seq.num_computed + n):
                        victim = self._victim(exclude=chosen | {seq.seq_id})
                        if victim is None or victim.arrival_time < seq.arrival_time:
                            break
                        self._preempt(victim)
                if not self.pool.can_grow(seq, seq.num_computed + n):
                    break  # FCFS: later prompts wait behind this one
                if seq.status is SeqStatus.WAITING:
                    self.waiting.remove(seq)
                    seq.status = SeqStatus.RUNNING
                    self._insert_running(seq)
                self.pool.grow(seq, seq.num_computed + n)
                chunks.append((seq, n))
                chosen.add(seq.seq_id)
                budget -= n
                slots -= 1

        for seq in ready:
            if seq.seq_id in chosen or seq.status is not SeqStatus.RUNNING:
                continue
            if budget <= 0 or slots <= 0 or not add_decode(seq):
                break
        for seq in ready:
            seq.num_skipped = 0 if seq.seq_id in chosen else seq.num_skipped + 1

        chunks = [(s, n) for s, n in chunks if s.status is SeqStatus.RUNNING]
        decodes = [s for s in decodes if s.status is SeqStatus.RUNNING]
        return Batch(decodes + [s for s, _ in chunks], [1] * len(decodes) + [n for _, n in chunks], len(decodes))

    def _insert_running(self, seq: Sequence) -> None:
        i = len(self.running)
        while i > 0 and self.running[i - 1].arrival_time > seq.arrival_time:
            i -= 1
        self.running.insert(i, seq)

    def _victim(self, exclude: set[int]) -> Sequence | None:
        """The newest running sequence not yet in this batch, preferring one still under its
        preemption bound; falls back to the newest of the batch itself (it then waits)."""
        free = [s for s in reversed(self.running) if s.seq_id not in exclude]
        for s in free:
            if s.num_preemptions < self.config.max_preemptions:
                return s
        return free[0] if free else None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq)
        seq.reset_for_recompute()
        seq.num_preemptions += 1
        self.num_preempted += 1
        self.waiting.appendleft(seq)
