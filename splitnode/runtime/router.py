"""The cluster-level scheduler: at arrival, a prompt worker and a token worker for each request,
chosen together (the paper's JSQ), with the token side's blocks reserved under a lease."""

from __future__ import annotations

import threading

from splitnode.engine.batcher import Role
from splitnode.engine.sequence import Sequence
from splitnode.runtime.worker import Handoff, Worker


class Router:
    def __init__(self, workers: list[Worker], lease_s: float):
        self.workers = workers
        self.lease_s = lease_s
        self._lock = threading.Lock()  # pick_dest runs on worker threads

    def route(self, seq: Sequence) -> Worker:
        """Chooses seq's prompt worker P (fewest pending prompt tokens) and, when P does not
        decode, its token worker T (cheapest link from P, then most free KV blocks), reserving
        T's blocks for the prompt. Returns P; T rides on the sequence as its `Handoff`. With no
        room on any T the choice of T waits for the hand-off, and the KV stays on P until then."""
        healthy = [w for w in self.workers if w.error is None]
        prompt_side = [w for w in healthy if w.accepts_prefill] or [
            w for w in healthy if (w.target_role or w.role).takes_prompts]
        if not prompt_side:
            raise RuntimeError("no working device can run the prompt phase (a worker failed; see status())")
        p = min(prompt_side, key=lambda w: (w.pending_prompt_tokens, w.engine.batcher.num_pending_prompt_tokens,
                                             w.index))
        p.routed_prompt_tokens += seq.num_tokens
        if p.role is Role.MIXED and p.target_role is None:
            return p  # the mixed pool runs both phases: no transfer
        if p.num_stuck_handoffs:
            return p  # it would give the reservation up at once (see Worker._hand_off): room at hand-off
        with self._lock:
            for t in self._by_headroom(exclude=p):
                pool = t.engine.pool
                if pool.reserve(seq.seq_id, pool.blocks_for(seq.num_prompt_tokens + 1), self.lease_s) is not None:
                    seq.handoff = Handoff(t)
                    break
        return p

    def pick_dest(self, seq: Sequence, exclude: Worker) -> tuple[Worker | None, list[int] | None]:
        """A token-capable worker with room for seq's whole cache now, its blocks allocated."""
        with self._lock:
            for t in self._by_headroom(exclude=exclude):
                pool = t.engine.pool
                with pool.lock:
                    n = pool.blocks_for(seq.num_tokens)
                    if pool.can_allocate(n):
                        return t, pool.allocate(n)
        return None, None

    def _by_headroom(self, exclude: Worker) -> list[Worker]:
        """Token-capable workers the KV of `exclude` (the sender) reaches most cheaply first: on
        its own device, then over P2P, then through the host (T1: on a box where some GPU pairs
        have no P2P, the move to a P2P peer with room is several times faster); among equals, the
        most free blocks."""
        cands = [w for w in self.workers if w is not exclude and w.accepts_decode and w.error is None]
        src, link = exclude.engine.device, exclude.mover.link
        return sorted(cands, key=lambda w: (link(src, w.engine.device), -w.engine.pool.num_free, w.index))
