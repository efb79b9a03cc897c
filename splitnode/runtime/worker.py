"""A worker owns one device's engine and runs its batch loop on a thread of its own.

It knows its engine, the KV mover, a listener it reports to and a callable that finds a token
worker with room, and never the Runtime: the shape a worker in another process would have. Messages
come in through `post` (from the loop, or a hand-off from another worker); what it reports goes out
through its listener, called on this thread (the runtime's listener hops onto its loop). A role
change is asked through `request_role`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from splitnode.engine.batcher import Batch, Role
from splitnode.engine.engine import Engine
from splitnode.engine.sequence import SeqStatus, Sequence
from splitnode.runtime.messages import Add, Arrival, Arrive, RoleReached, TokenEvent, WorkerFailed
from splitnode.runtime.transfer import KVMover, Sent

log = logging.getLogger("splitnode")


class WorkerListener(Protocol):
    """What a worker reports. Every method is called on the worker's own thread."""

    def on_tokens(self, events: list[TokenEvent]) -> None: ...

    def on_handoff(self, dest: Worker, arrive: Arrive) -> None:
        """seq's KV is in (or on its way to) dest's blocks: deliver `arrive` to dest."""

    def on_role_reached(self, msg: RoleReached) -> None: ...

    def on_failure(self, msg: WorkerFailed) -> None:
        """The worker's thread is gone; `Worker.held_sequence_ids` says whose requests it held."""


# (sequence, worker to leave out) -> a token worker with room for the sequence's whole cache and
# the blocks allocated there for it, or (None, None).
PickDest = Callable[[Sequence, "Worker"], "tuple[Worker | None, list[int] | None]"]


@dataclass(frozen=True)
class WorkerPolicy:
    layerwise_min_tokens: int = 512  # prompts this long send their KV layer by layer
    transfer_timeout_s: float = 30.0  # past it the destination recomputes the prefill
    reservation_lease_s: float = 30.0  # renewed every batch while the prompt is here
    drain_timeout_s: float = 60.0  # a drain-mode role change migrates what is left after this long


@dataclass(eq=False)
class Handoff:
    """Where a sequence prefilled here decodes, and what of its KV is there already. Until the
    first layer-wise send dest's pool holds a reservation for the sequence (`blocks` None); the
    send claims it, and from then on the blocks are the sequence's (no lease can lapse under a
    write)."""

    dest: Worker
    blocks: list[int] | None = None
    num_sent: int = 0  # tokens whose KV, every layer, is in `blocks`
    epoch: int = 0  # seq.num_preemptions when num_sent was counted: a preemption drops it
    sent: Sent | None = None  # the events of the send that completed num_sent (its last layer)

    def num_sent_for(self, seq: Sequence) -> int:
        return self.num_sent if self.epoch == seq.num_preemptions else 0

    def mark_sent(self, seq: Sequence, num_tokens: int, sent: Sent) -> None:
        self.num_sent, self.epoch, self.sent = num_tokens, seq.num_preemptions, sent

    def release(self, seq_id: int, fence=None) -> None:
        """Gives dest's blocks back: claimed ones once `fence` (after every unpack this worker
        queued for dest) has fired, as a layer-wise unpack may still be writing them."""
        pool = self.dest.engine.pool
        if self.blocks is not None:
            pool.free_after(self.blocks, fence)
        else:
            pool.cancel(seq_id)


class _LayerJob(NamedTuple):
    """The chunks of one batch whose KV goes layer by layer to one destination: sent together, one
    pack, copy and unpack per layer over all their blocks (L1)."""

    dest: Engine
    seqs: list[tuple[Sequence, Handoff, int]]  # with the computed tokens once this batch is done
    src_ids: torch.Tensor  # every chunk's blocks, end to end, on both sides
    dst_ids: torch.Tensor


class Worker:
    def __init__(self, index: int, name: str, engine: Engine, mover: KVMover, listener: WorkerListener,
                 pick_dest: PickDest, policy: WorkerPolicy = WorkerPolicy(), cpu_cores: frozenset[int] | None = None):
        self.index = index
        self.name = name  # "cuda:0", "cpu:1" for the second CPU worker, "cuda:0/1" for a second on cuda:0
        self.engine = engine
        self.mover = mover
        self.listener = listener
        self.pick_dest = pick_dest
        self.policy = policy
        self.cpu_cores = cpu_cores  # a CPU worker's own cores (None: wherever the OS puts it)
        mover.add_device(engine.device)  # its peers are checked and warmed when the thread starts
        self.target_role: Role | None = None  # set while a role change is under way
        self.mode = "drain"
        self._change_asked_at = 0.0  # time.monotonic() of the change under way
        # target_role/mode are written by `request_role` (the loop) and cleared here: a generation
        # number tells a change that is done from one asked for meanwhile.
        self._role_lock = threading.Lock()
        self._role_gen = 0
        self._inbox: deque[Add | Arrive] = deque()
        self.wake = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None
        self.arrivals: list[Arrival] = []
        self.routed_prompt_tokens = 0  # written by the loop thread only
        self.done_prompt_tokens = 0  # written by this thread only
        self.last_batch_size = 0
        self.last_batch_tokens = 0
        self.num_stuck_handoffs = 0  # prefilled here, no room on any token worker (read by the router)
        self.num_steps = 0
        self.busy_s = 0.0
        self.num_role_changes = 0  # roles taken since start (Prometheus counts them)
        self._thread = threading.Thread(target=self._main, name=f"splitnode-{name}", daemon=True)

    # -- seen from the loop thread ------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self.engine.batcher.role  # stored once: what the batcher schedules by

    @property
    def accepts_prefill(self) -> bool:
        return self.target_role is None and self.role.takes_prompts

    @property
    def accepts_decode(self) -> bool:
        return self.target_role is None and self.role.decodes

    @property
    def decodes_after_change(self) -> bool:
        """Still a token-capable worker once the change under way (if any) is done."""
        return (self.target_role or self.role).decodes

    @property
    def pending_prompt_tokens(self) -> int:
        """Routed here and not yet prefilled. Recomputes (not routed here) also count as done:
        never below zero."""
        return max(0, self.routed_prompt_tokens - self.done_prompt_tokens)

    def post(self, msg: Add | Arrive) -> None:
        self._inbox.append(msg)
        self.wake.set()

    def request_role(self, role: Role | str, mode: str) -> int:
        """Asks for a role change; returns its generation, which `RoleReached` reports once the
        role is reached (a later request supersedes an earlier one)."""
        with self._role_lock:  # the worker compares and clears under the same lock
            self._role_gen += 1
            self.mode = mode
            self.target_role = Role(role)
            self._change_asked_at = time.monotonic()
            gen = self._role_gen
        self.wake.set()
        return gen

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread after its current turn (`join` waits for it)."""
        self._stopping = True
        self.wake.set()

    def join(self) -> None:
        self._thread.join()

    def held_sequence_ids(self) -> list[int]:
        """Every sequence this worker holds or has been sent. Read it from another thread only
        once this one is gone (after `on_failure`)."""
        b = self.engine.batcher
        return [s.seq_id for s in (*b.running, *b.waiting, *(a.seq for a in self.arrivals),
                                   *(m.seq for m in list(self._inbox)))]

    def status(self) -> dict:
        """This worker's part of a `DeviceStatus` (the runtime adds pins, borrowing, telemetry)."""
        e = self.engine
        return {
            "name": self.name, "device": str(e.device), "role": self.role.value,
            "target_role": None if self.target_role is None else self.target_role.value,
            "kv_blocks_used": e.pool.num_used, "kv_blocks_total": e.pool.num_blocks,
            "kv_blocks_reserved": e.pool.num_reserved, "waiting": len(e.batcher.waiting),
            "running": len(e.batcher.running), "arriving": len(self.arrivals),
            "batch_size": self.last_batch_size, "batch_tokens": self.last_batch_tokens,
            "pending_prompt_tokens": e.batcher.num_pending_prompt_tokens, "steps": self.num_steps,
            "busy_s": round(self.busy_s, 3), "error": None if self.error is None else repr(self.error),
            "role_change_waits_for": self._role_change_waits_for(), "role_changes": self.num_role_changes,
            "cpu_cores": None if self.cpu_cores is None else sorted(self.cpu_cores),
        }

    def _role_change_waits_for(self) -> str | None:
        """Why the change under way is not done yet, for status (read from the loop: a snapshot)."""
        target = self.target_role
        if target is None or target.decodes:
            return None
        num_decodes = sum(1 for s in list(self.engine.batcher.running) if s.is_decode)
        num_arriving = len(self.arrivals)
        if not num_decodes and not num_arriving:
            return None
        if self._keeps_decodes():
            left = self.policy.drain_timeout_s - (time.monotonic() - self._change_asked_at)
            how = f"draining {num_decodes} decodes here (then migrating them, in {max(0.0, left):.0f} s)"
        else:
            how = f"migrating {num_decodes} decodes to token workers with room"
        return how + (f"; {num_arriving} sequences landing first" if num_arriving else "")

    # -- the worker thread --------------------------------------------------------------------

    def _main(self) -> None:
        try:
            stream = contextlib.nullcontext()
            if self.engine.device.type == "cuda":
                torch.cuda.set_device(self.engine.device)
                stream = torch.cuda.stream(self.engine.compute_stream)
                self.mover.warm_up(self.engine.device)
            elif self.cpu_cores:
                # This thread and the OpenMP team it starts (threads inherit the mask) run on these
                # cores only; torch's intra-op thread count is per calling thread.
                os.sched_setaffinity(threading.get_native_id(), self.cpu_cores)
                torch.set_num_threads(len(self.cpu_cores))
            with stream, torch.inference_mode():
                while not self._stopping:
                    self._turn()
        except BaseException as e:  # surfaced by the runtime to every request on this worker
            log.exception("worker %s failed", self.name)
            self.error = e
            self.listener.on_failure(WorkerFailed(self.name, e))

    def _turn(self) -> None:
        """apply inbox -> free cancelled -> admit arrived sequences -> hand off finished
        prefills -> role change -> one batch (then hand off what it finished)."""
        self._apply_inbox()
        self.engine.pool.expire()  # reservations held here for requests that died elsewhere
        self._sweep_cancelled()
        self._admit_arrivals()
        self._hand_off()
        self._change_role()
        if not self.engine.has_work():
            self.last_batch_size = self.last_batch_tokens = 0
            # Woken by a post; the timeout only re-checks transfers, hand-offs and leases.
            self._wait(0.005 if (self.arrivals or self._waiting_handoffs()) else 0.5)
        elif self._run_batch():
            self._hand_off()

    def _wait(self, timeout_s: float) -> None:
        self.wake.wait(timeout_s)
        self.wake.clear()

    def _apply_inbox(self) -> None:
        while self._inbox:
            msg = self._inbox.popleft()
            if isinstance(msg, Add):
                self.engine.add(msg.seq)
            else:
                self.arrivals.append(Arrival(msg.seq, msg.event, msg.failed, time.monotonic()))

    def _run_batch(self) -> bool:
        """One step of the engine; False when nothing could be scheduled."""
        eng = self.engine
        for seq in [*eng.batcher.running, *eng.batcher.waiting]:
            h = seq.handoff
            if h is not None and h.blocks is None:
                h.dest.engine.pool.renew(seq.seq_id, self.policy.reservation_lease_s)
        t0 = time.perf_counter()
        # No wait for the transfer streams here (P1: the unpacks queued for this device wait for
        # other GPUs' prefills, and a decode waited for them all): an arriving sequence is waited
        # for alone, as it is admitted; blocks a transfer may still write are freed only once its
        # event has fired (`BlockPool.free_after`); blocks this worker sends are reused only after
        # the pack that reads them (`KVMover.wait_packed`).
        batch, seqs = eng.step(self._layer_hook)
        for seq in seqs:
            if seq.is_finished:  # e.g. at its first token, before any hand-off
                self._release_handoff(seq)
        if not batch:
            self._wait(0.005)
            return False
        self.done_prompt_tokens += sum(batch.chunk_lens[batch.num_decodes:])
        self.last_batch_size, self.last_batch_tokens = len(batch), batch.num_tokens
        self.num_steps += 1
        self.busy_s += time.perf_counter() - t0
        self._emit(seqs)
        return True

    def _emit(self, seqs: list[Sequence], reason: str | None = None) -> None:
        events = [TokenEvent(s.seq_id, s.num_tokens - s.num_prompt_tokens, reason or s.finish_reason, s.error)
                  for s in seqs]
        if events:
            self.listener.on_tokens(events)

    def _sweep_cancelled(self) -> None:
        b = self.engine.batcher
        for seq in [s for s in list(b.running) + list(b.waiting) if s.cancelled]:
            self._drop(seq)
            b.remove(seq)
        keep = []
        for a in self.arrivals:
            if a.seq.cancelled and a.copy_done():  # never free under a running copy
                self.engine.pool.free(a.seq.block_table)
                a.seq.block_table = []
                self.mover.count(in_flight=-1)
                self._drop(a.seq)
            else:
                keep.append(a)
        self.arrivals = keep

    def _release_handoff(self, seq: Sequence) -> None:
        """Gives back what the sequence holds on its token worker: the reservation, or the
        blocks the layer-wise transfer claimed (once what this worker queued for them is done).
        Every way out of this worker but the hand-off (finished here, cancelled, its token
        worker gone) goes through here."""
        h = seq.handoff
        if h is not None:
            h.release(seq.seq_id, None if h.blocks is None else self.mover.fence(self.engine, h.dest.engine))
            seq.handoff = None

    def _drop(self, seq: Sequence) -> None:
        self._release_handoff(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = "abort"
        self._emit([seq], "abort")

    def _admit_arrivals(self) -> None:
        """Sequences handed to this worker join its batches once their KV is complete; a transfer
        that failed or timed out is recomputed here. Each admitted sequence's event is what this
        worker's compute stream waits for, and all it waits for from the transfers (P1)."""
        eng, keep = self.engine, []
        for a in self.arrivals:
            timed_out = time.monotonic() - a.since > self.policy.transfer_timeout_s
            # a cancelled one's copy may still run: the sweep frees it once it is done
            if a.seq.cancelled or (not a.failed and not timed_out and not a.copy_done()):
                keep.append(a)
                continue
            self.mover.count(in_flight=-1, failed=int(a.failed or timed_out))
            if a.failed or timed_out:
                log.warning("KV transfer of request %d to %s %s: recomputing its prefill here",
                            a.seq.seq_id, self.name, "failed" if a.failed else "timed out")
                a.seq.num_computed = 0
                if not a.copy_done():  # a write of it may still land: recompute in other blocks
                    eng.pool.free_after(a.seq.block_table, a.event)
                    a.seq.reset_for_recompute()
            else:
                eng.streams.wait_event(eng.compute_stream, a.event)  # fired: orders, never stalls
            eng.add(a.seq)  # with its blocks the batcher runs it; without, it waits for room
        self.arrivals = keep

    # -- moving sequences out -------------------------------------------------------------------

    def _waiting_handoffs(self) -> bool:
        return any(self._handoff_due(s) for s in self.engine.batcher.running)

    def _handoff_due(self, seq: Sequence) -> bool:
        """A sequence whose prefill is done here and that decodes elsewhere."""
        if not seq.is_decode or seq.is_finished:
            return False
        return seq.handoff is not None or not self._keeps_decodes()

    def _keeps_decodes(self) -> bool:
        """Finish decodes here rather than hand them off."""
        if self.target_role is not None and not self.target_role.decodes:
            # leaving decode work: finish it here (drain, for a bounded time), or move it out
            return self.mode == "drain" and time.monotonic() - self._change_asked_at < self.policy.drain_timeout_s
        return (self.target_role or self.role).decodes

    # Waits between workers, and why they never close into a cycle. A sequence waiting to move
    # ("stuck": prefilled here, no room on any token worker) holds blocks here and waits for blocks
    # there. Blocks on a token worker are held by (a) its own sequences and arrivals, which run or
    # land without this worker and free them in finite time, and (b) reservations and claimed
    # blocks of sequences still waiting or mid-prefill here, which may wait for blocks here that
    # the stuck sequence holds: the one edge back. So when a hand-off finds no room, every
    # sequence here that is not yet prefilled gives up what it holds on token workers (it finds
    # room at its own hand-off, and layer-wise sending stops for it), and while any hand-off here
    # is stuck the router reserves nothing for new prompts routed here. A stuck sequence then waits
    # only for (a); every other wait here (for blocks on this worker) ends when it moves.
    def _hand_off(self) -> None:
        num_stuck = 0
        for seq in [s for s in self.engine.batcher.running if self._handoff_due(s)]:
            dest, blocks, sent = self._destination(seq)
            if dest is None:
                self._give_up_token_side_holds()
                dest, blocks = self.pick_dest(seq, self)
                sent = None
            if dest is None:
                num_stuck += 1
                continue  # keep the KV here and try again next turn
            self._move(seq, dest, blocks, sent)
        self.num_stuck_handoffs = num_stuck

    def _destination(self, seq: Sequence) -> tuple[Worker | None, list[int] | None, Sent | None]:
        """Where seq goes, its blocks there, and, if the layer-wise sends already wrote every
        computed token, the events of the last of them: its reservation (grown to the
        sequence), else any token worker with room."""
        h = seq.handoff
        if h is not None and (h.dest.error is not None or not h.dest.decodes_after_change):
            self._release_handoff(seq)  # its token worker died or is leaving decode work: find another
            h = None
        if h is not None:
            claimed, h.blocks = h.blocks, None
            sent = h.sent if claimed is not None and h.num_sent_for(seq) == seq.num_computed else None
            fence = None if claimed is None else self.mover.fence(self.engine, h.dest.engine)
            blocks = self._fit(h.dest, claimed if claimed is not None else h.dest.engine.pool.claim(seq.seq_id), seq,
                               fence)
            if blocks is not None:
                return h.dest, blocks, sent
        dest, blocks = self.pick_dest(seq, self)  # no reservation (or its lease ran out): room now
        return dest, blocks, None

    def _give_up_token_side_holds(self) -> None:
        """Sequences not yet prefilled here release their reservations and claimed blocks on
        token workers (see the comment above `_hand_off`)."""
        b = self.engine.batcher
        for seq in [*b.waiting, *b.running]:
            if seq.handoff is not None and not seq.is_decode:
                self._release_handoff(seq)

    @staticmethod
    def _fit(dest: Worker, blocks: list[int] | None, seq: Sequence, fence=None) -> list[int] | None:
        """Reserved blocks cover the prompt; grow them to the sequence as it is now. Blocks that
        do not fit go back once `fence` (after the layer-wise writes into them) has fired."""
        if blocks is None:
            return None
        pool = dest.engine.pool
        with pool.lock:  # other threads allocate from dest's pool too: check and take at once
            need = pool.blocks_for(seq.num_tokens) - len(blocks)
            if need <= 0:
                return blocks
            if not pool.can_allocate(need):
                pool.free_after(blocks, fence)
                return None
            return blocks + pool.allocate(need)

    def _move(self, seq: Sequence, dest: Worker, blocks: list[int], sent: Sent | None) -> None:
        """Sends what is not there yet (nothing if `sent`: the layer-wise sends wrote it all),
        then gives the sequence to dest, which admits it on the event of the last unpack. The
        source blocks are freed at once: this compute stream waits for the pack that reads them,
        not for the copy or the unpack (P2)."""
        eng = self.engine
        failed = False
        n = eng.pool.blocks_for(seq.num_computed)
        try:
            if sent is None:
                sent = self.mover.send(eng, dest.engine, seq.block_table[:n], blocks[:n],
                                       range(eng.model_config.num_hidden_layers))
            self.mover.wait_packed(eng, sent)
            event = sent.written
        except Exception:
            log.exception("KV transfer of request %d from %s to %s failed", seq.seq_id, self.name, dest.name)
            failed, event = True, self.mover.abandon(eng, dest.engine)  # dest recomputes after it
        eng.batcher.remove(seq)  # frees the source blocks
        seq.block_table = blocks
        seq.handoff = None
        self.mover.count(sequences=1, in_flight=1)
        self.listener.on_handoff(dest, Arrive(seq, event, failed))

    def _layer_hook(self, batch: Batch) -> Callable[[int], None] | None:
        """Layer-wise transfer: for the long prompts in the batch that decode elsewhere, send layer
        l's blocks as soon as layer l is written, while layer l+1 computes, in one send per
        destination. Short prompts move in one piece after their prefill (see `_hand_off`)."""
        jobs = self._layer_jobs(batch)
        if not jobs:
            return None
        eng, last = self.engine, self.engine.model_config.num_hidden_layers - 1
        failed: set[int] = set()  # jobs (by index) whose send raised: their hand-offs send every layer again

        def hook(layer: int) -> None:
            for i, job in enumerate(jobs):
                if i in failed:
                    continue
                try:
                    sent = self.mover.send(eng, job.dest, job.src_ids, job.dst_ids, range(layer, layer + 1))
                except Exception:  # the hand-off sends every layer again (or the token worker recomputes)
                    log.exception("layer-wise KV transfer of requests %s failed", [s.seq_id for s, _, _ in job.seqs])
                    failed.add(i)
                    continue
                if layer == last:  # one pair stream, in order: its events cover the earlier layers too
                    for seq, h, upto in job.seqs:
                        h.mark_sent(seq, upto, sent)

        return hook

    def _layer_jobs(self, batch: Batch) -> list[_LayerJob]:
        """The chunks of this batch whose KV goes to their token worker layer by layer, one job
        per destination."""
        pool, by_dest = self.engine.pool, {}
        for seq, n in zip(batch.seqs, batch.chunk_lens):
            h = seq.handoff
            if h is None or seq.is_decode or seq.num_prompt_tokens < self.policy.layerwise_min_tokens:
                continue
            if h.blocks is None:
                h.blocks = h.dest.engine.pool.claim(seq.seq_id)  # None if its lease ran out
            if h.blocks is None or len(h.blocks) < len(seq.block_table) or h.num_sent_for(seq) != seq.num_computed:
                continue  # the hand-off sends it all (an earlier chunk did not go layer by layer)
            lo, hi = seq.num_computed // pool.block_size, pool.blocks_for(seq.num_computed + n)
            seqs, src, dst = by_dest.setdefault(h.dest.engine, ([], [], []))
            seqs.append((seq, h, seq.num_computed + n))
            src += seq.block_table[lo:hi]
            dst += h.blocks[lo:hi]
        # ids made once per batch, each side's on the stream that reads it (see KVMover.block_ids)
        return [_LayerJob(dest, seqs, *self.mover.block_ids(self.engine, dest, src, dst))
                for dest, (seqs, src, dst) in by_dest.items()]

    # -- role changes ------------------------------------------------------------------------------

    def _change_role(self) -> None:
        """Flips the role once the work of the old kind is gone. Decodes are migrated to another
        token-capable worker ("migrate") or finished here ("drain"); prefills always finish here."""
        with self._role_lock:
            new, gen = self.target_role, self._role_gen
        if new is None:
            return
        if not new.decodes and (self.arrivals or any(s.is_decode for s in self.engine.batcher.running)):
            return  # drained here or handed off by `_hand_off`, turn by turn; arrivals land first
        with self._role_lock:
            self.num_role_changes += new != self.engine.batcher.role
            self.engine.batcher.role = new
            if self._role_gen == gen:  # else a newer change was asked meanwhile: the next turn takes it
                self.target_role = None
        self.listener.on_role_reached(RoleReached(self.name, gen, new))
