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
from enum import Enum

from splitnode.engine.config import EngineConfig
from splitnode.engine.kv import BlockPool
from splitnode.engine.sequence import SeqStatus, Sequence


class Role(str, Enum):
    """What a worker runs. Every role runs prefill chunks: a token worker recomputes the ones it
    holds (a preempted decode, a request whose KV transfer failed)."""

    PROMPT = "prompt"
    TOKEN = "token"
    MIXED = "mixed"

    @property
    def takes_prompts(self) -> bool:  # the router may send it fresh prompts
        return self is not Role.TOKEN

    @property
    def decodes(self) -> bool:
        return self is not Role.PROMPT


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


@dataclass
class _Budget:
    """What one batch has left (new tokens, sequences), and the sequences it took so far: those are
    never preempted to make room for another."""

    num_tokens: int
    num_seqs: int
    taken: set[int] = field(default_factory=set)  # seq ids

    def fits(self) -> bool:
        return self.num_tokens > 0 and self.num_seqs > 0

    def take(self, seq: Sequence, num_tokens: int) -> None:
        self.num_tokens -= num_tokens
        self.num_seqs -= 1
        self.taken.add(seq.seq_id)


class Batcher:
    def __init__(self, config: EngineConfig, pool: BlockPool, role: Role | str = Role.MIXED):
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
    def role(self) -> Role:
        return self._role

    @role.setter
    def role(self, role: Role | str) -> None:
        self._role = Role(role)

    @property
    def num_pending_prompt_tokens(self) -> int:
        # Read from the event loop too (routing, policy, status) while the worker changes both
        # queues: iterate snapshots (list() of a deque or list is one step under the GIL).
        return sum(s.num_pending for s in list(self.waiting)) + sum(
            s.num_pending for s in list(self.running) if not s.is_decode)

    def has_work(self) -> bool:
        # a running sequence is a decode or a chunk to run: either is work for a role that decodes
        return bool(self.waiting) or bool(self.running) and (
            self.role.decodes or any(not s.is_decode for s in self.running))

    def schedule(self) -> Batch:
        budget = _Budget(self.config.max_num_batched_tokens, self.config.max_num_seqs)
        ready, prefilling, aged = self._split_running()
        urgent = self._urgent(ready)
        decodes = self._schedule_decodes(urgent, budget, past_a_miss=True)
        chunks = self._schedule_prefills(prefilling, budget)
        if urgent is not ready:  # else every decode was tried already, with more room than is left now
            decodes += self._schedule_decodes(ready, budget, past_a_miss=False)
        if aged or len(decodes) < len(ready):  # ageing: a decode left out moves up
            for seq in ready:
                seq.num_skipped = 0 if seq.seq_id in budget.taken else seq.num_skipped + 1
        # Victims are never taken from the batch (`budget.taken`): everything in it still runs.
        return Batch(decodes + [s for s, _ in chunks], [1] * len(decodes) + [n for _, n in chunks], len(decodes))

    def _split_running(self) -> tuple[list[Sequence], list[Sequence], bool]:
        """One pass over the running sequences (every step, at GPU batch sizes: `_is_decode`
        inlined): the decodes ready to run, longest skipped first (stable: older first among
        equals; none where the role runs no decodes); the prefills under way, in arrival order;
        and whether any decode has been skipped."""
        ready, prefilling = [], []
        for s in self.running:
            n = s.num_computed
            (ready if n > 0 and len(s.token_ids) - n == 1 else prefilling).append(s)
        if not self.role.decodes:
            ready = []
        aged = any(s.num_skipped for s in ready)
        if aged:
            ready.sort(key=lambda s: -s.num_skipped)
        return ready, prefilling, aged

    def _urgent(self, ready: list[Sequence]) -> list[Sequence]:
        """The decodes that go before the prompts: in a mixed batch, those left out of
        `decode_max_skips` batches; otherwise all."""
        if self.role is not Role.MIXED:
            return ready
        return [s for s in ready if s.num_skipped >= self.config.decode_max_skips]

    def _schedule_decodes(self, seqs: list[Sequence], budget: _Budget, past_a_miss: bool) -> list[Sequence]:
        """The decodes of seqs that fit, in order. One that finds no room ends the pass unless
        `past_a_miss` (urgent decodes: the next may not need a new block)."""
        decodes: list[Sequence] = []
        block_size, taken = self.pool.block_size, budget.taken
        room = min(budget.num_tokens, budget.num_seqs)  # a decode takes one of each
        # Every step, per sequence, at GPU batch sizes: names bound once, the room checked after a take.
        running, append, take = SeqStatus.RUNNING, decodes.append, taken.add
        for seq in seqs if room > 0 else ():
            if seq.status is not running or seq.seq_id in taken:  # preempted, or scheduled
                continue
            n = len(seq.token_ids)
            # The pool only when the token starts a block: once every block_size steps (H1's host cost)
            if n > len(seq.block_table) * block_size:
                if not self._make_room(seq, n, budget):
                    if past_a_miss:
                        continue
                    break
                self.pool.grow(seq, n)
            append(seq)
            take(seq.seq_id)  # `_make_room` spares the batch's sequences from here on
            if len(decodes) >= room:
                break
        budget.num_tokens -= len(decodes)
        budget.num_seqs -= len(decodes)
        return decodes

    def _schedule_prefills(self, prefilling: list[Sequence], budget: _Budget) -> list[tuple[Sequence, int]]:
        """Prefill chunks FCFS (those under way, then the waiting ones) while the budget lasts."""
        chunks = []
        for seq in prefilling + list(self.waiting):
            if not budget.fits():
                break
            n = min(seq.num_pending, budget.num_tokens)
            end = seq.num_computed + n
            if seq.status is SeqStatus.RUNNING:  # mid-prefill: newer sequences make room
                fits = self._make_room(seq, end, budget, only_newer=True)
            else:
                fits = self.pool.can_grow(seq, end)
            if not fits:
                break  # FCFS: later prompts wait behind this one
            if seq.status is SeqStatus.WAITING:
                self.waiting.remove(seq)
                seq.status = SeqStatus.RUNNING
                self._insert_running(seq)
            self.pool.grow(seq, end)
            chunks.append((seq, n))
            budget.take(seq, n)
        return chunks

    def _make_room(self, seq: Sequence, num_tokens: int, budget: _Budget, only_newer: bool = False) -> bool:
        """Preempts running sequences outside the batch until seq's blocks can cover `num_tokens`.
        `only_newer`: only those that arrived after seq, and never seq itself. False if there is
        no room (or seq itself was preempted)."""
        exclude = budget.taken | {seq.seq_id} if only_newer else budget.taken
        while not self.pool.can_grow(seq, num_tokens):
            victim = self._victim(exclude)
            if victim is None or (only_newer and victim.arrival_time < seq.arrival_time):
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        return True

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
