"""A worker owns one device's engine and runs its batch loop on a thread of its own.

It talks to the event loop through its inbox (ops from the loop or from other workers) and
`loop.call_soon_threadsafe` (token events back). Each turn of the loop:
apply inbox -> free cancelled -> admit arrived sequences -> hand off finished prefills ->
role change -> one batch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import torch

from splitnode.engine.engine import Engine
from splitnode.engine.sequence import Sequence, SeqStatus
from splitnode.runtime.transfer import block_ids

if TYPE_CHECKING:
    from splitnode.runtime.runtime import Runtime

log = logging.getLogger("splitnode")


class Worker:
    def __init__(self, rt: "Runtime", index: int, name: str, device: str, role: str):
        self.rt = rt
        self.index = index
        self.name = name  # "cuda:0", or "cpu:1" for the second CPU worker
        self.device = device  # the torch device
        self.role = role
        self.target_role: str | None = None  # set while a role change is under way
        self.mode = "drain"
        # target_role/mode are written by the loop and cleared here: a generation number tells a
        # change that is done from one asked for meanwhile.
        self.role_lock = threading.Lock()
        self.role_gen = 0
        self.engine: Engine | None = None
        self.inbox: deque = deque()
        self.wake = threading.Event()
        self.stopping = False
        self.error: BaseException | None = None
        self.arrivals: list[tuple[Sequence, object, bool, float]] = []  # seq, event, failed, since
        self.routed_prompt_tokens = 0  # written by the loop thread only
        self.done_prompt_tokens = 0  # written by this thread only
        self.last_batch_size = 0
        self.last_batch_tokens = 0
        self.num_steps = 0
        self.busy_s = 0.0
        self.thread = threading.Thread(target=self._main, name=f"splitnode-{name}", daemon=True)

    # -- seen from the loop thread ------------------------------------------------------------

    @property
    def accepts_prefill(self) -> bool:
        return self.target_role is None and self.role in ("prompt", "mixed")

    @property
    def accepts_decode(self) -> bool:
        return self.target_role is None and self.role in ("token", "mixed")

    @property
    def decodes_after_change(self) -> bool:
        """Still a token-capable worker once the change under way (if any) is done."""
        return (self.target_role or self.role) in ("token", "mixed")

    @property
    def pending_prompt_tokens(self) -> int:
        # recomputes (not routed here) also count as done: never below zero
        return max(0, self.routed_prompt_tokens - self.done_prompt_tokens)

    def post(self, *op) -> None:
        self.inbox.append(op)
        self.wake.set()

    # -- the worker thread --------------------------------------------------------------------

    def _main(self) -> None:
        try:
            stream = contextlib.nullcontext()
            if self.engine.device.type == "cuda":
                torch.cuda.set_device(self.engine.device)
                stream = torch.cuda.stream(self.engine.compute_stream)
            with stream, torch.inference_mode():
                while not self.stopping:
                    self._turn()
        except BaseException as e:  # surfaced by the runtime to every request on this worker
            log.exception("worker %s failed", self.name)
            self.error = e
            self.rt._post(self.rt._on_worker_error, self, e)

    def _turn(self) -> None:
        eng = self.engine
        while self.inbox:
            op, *args = self.inbox.popleft()
            if op == "add":
                eng.add(args[0])
            elif op == "arrive":
                self.arrivals.append((*args, time.monotonic()))
        eng.pool.expire()  # reservations held here for requests that died elsewhere
        self._sweep_cancelled()
        self._admit_arrivals()
        self._hand_off()
        if self.target_role is not None:
            self._change_role()
        if not eng.has_work():
            self.last_batch_size = self.last_batch_tokens = 0
            # Woken by a post; the timeout only re-checks transfers, hand-offs and leases.
            self.wake.wait(0.005 if (self.arrivals or self._waiting_handoffs()) else 0.5)
            self.wake.clear()
            return
        for seq in [*eng.batcher.running, *eng.batcher.waiting]:
            if seq.dest is not None and seq.dest_blocks is None:
                seq.dest.engine.pool.renew(seq.seq_id, self.rt.config.reservation_lease_s)
        t0 = time.perf_counter()
        if eng.compute_stream is not None:
            # blocks freed since the last batch (a cancel, a preemption) may still be read or
            # written by a transfer on this device's transfer stream: finish that first
            eng.compute_stream.wait_stream(eng.transfer_stream)
        batch, seqs = eng.step(self._layer_hook)
        for seq in seqs:
            if seq.is_finished:  # e.g. at its first token, before any hand-off
                self._release_dest(seq)
        if not batch:
            self.wake.wait(0.005)
            self.wake.clear()
            return
        self.done_prompt_tokens += sum(batch.chunk_lens[batch.num_decodes:])
        self.last_batch_size, self.last_batch_tokens = len(batch), batch.num_tokens
        self.num_steps += 1
        self.busy_s += time.perf_counter() - t0
        self._emit(seqs)
        self._hand_off()

    def _emit(self, seqs: list[Sequence], reason: str | None = None) -> None:
        events = [(s, s.num_tokens - s.num_prompt_tokens, reason or s.finish_reason) for s in seqs]
        if events:
            self.rt._post(self.rt._on_events, events)

    def _sweep_cancelled(self) -> None:
        b = self.engine.batcher
        dead = [s for s in list(b.running) + list(b.waiting) if s.cancelled]
        for seq in dead:
            self._drop(seq)
            b.remove(seq)
        keep = []
        for item in self.arrivals:
            seq, event = item[0], item[1]
            if seq.cancelled and (event is None or event.query()):  # never free under a running copy
                self.engine.pool.free(seq.block_table)
                seq.block_table = []
                self.rt.mover.count(in_flight=-1)
                self._drop(seq)
            else:
                keep.append(item)
        self.arrivals = keep

    @staticmethod
    def _release_dest(seq: Sequence) -> None:
        """Gives back what the sequence holds on its token worker: the reservation, or the
        blocks the layer-wise transfer claimed. Every way out of this worker but the hand-off
        (finished here, cancelled, its token worker gone) goes through here."""
        if seq.dest is not None:
            if seq.dest_blocks is not None:
                seq.dest.engine.pool.free(seq.dest_blocks)
            else:
                seq.dest.engine.pool.cancel(seq.seq_id)
            seq.dest, seq.dest_blocks, seq.kv_sent = None, None, 0

    def _drop(self, seq: Sequence) -> None:
        self._release_dest(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = "abort"
        self._emit([seq], "abort")

    def _admit_arrivals(self) -> None:
        """Sequences handed to this worker join its batches once their KV is complete; a transfer
        that failed or timed out is recomputed here."""
        keep = []
        for seq, event, failed, since in self.arrivals:
            if seq.cancelled:  # its copy is still running: freed by the sweep once it is done
                keep.append((seq, event, failed, since))
                continue
            timed_out = time.monotonic() - since > self.rt.config.transfer_timeout_s
            if event is not None and not failed and not timed_out and not event.query():
                keep.append((seq, event, failed, since))
                continue
            self.rt.mover.count(in_flight=-1, failed=int(failed or timed_out))
            if failed or timed_out:
                log.warning("KV transfer of request %d to %s %s: recomputing its prefill here",
                            seq.seq_id, self.name, "failed" if failed else "timed out")
                seq.num_computed = 0
            seq.status = SeqStatus.RUNNING
            self.engine.add(seq)
        self.arrivals = keep

    # -- moving sequences out -------------------------------------------------------------------

    def _waiting_handoffs(self) -> bool:
        return any(self._handoff_due(s) for s in self.engine.batcher.running)

    def _handoff_due(self, seq: Sequence) -> bool:
        """A sequence whose prefill is done here and that decodes elsewhere."""
        if not seq.is_decode or seq.is_finished:
            return False
        return seq.dest is not None or not self._decodes_here()

    def _decodes_here(self) -> bool:
        if self.target_role is not None and self.target_role not in ("token", "mixed"):
            return self.mode == "drain"  # leaving decode work: finish it here, or move it out
        return (self.target_role or self.role) in ("token", "mixed")

    def _hand_off(self) -> None:
        for seq in [s for s in self.engine.batcher.running if self._handoff_due(s)]:
            if seq.dest is not None and (seq.dest.error is not None or not seq.dest.decodes_after_change):
                self._release_dest(seq)  # its token worker died or is leaving decode work: find another
            dest, blocks, sent = seq.dest, None, False
            if dest is not None:
                claimed, seq.dest_blocks = seq.dest_blocks, None
                # the layer-wise sends already wrote every computed token there
                sent = claimed is not None and seq.kv_sent == seq.num_computed
                blocks = self._fit(dest, claimed if claimed is not None else dest.engine.pool.claim(seq.seq_id), seq)
            if blocks is None:  # no reservation (or its lease ran out): find room now
                dest, blocks = self.rt.router.pick_dest(seq, exclude=self)
                sent = False
            if dest is None:
                continue  # no token worker has room: keep the KV here and try again next turn
            self._move(seq, dest, blocks, layers_done=sent)

    def _fit(self, dest: "Worker", blocks: list[int] | None, seq: Sequence) -> list[int] | None:
        """Reserved blocks cover the prompt; grow them to the sequence as it is now."""
        if blocks is None:
            return None
        need = dest.engine.pool.blocks_for(seq.num_tokens) - len(blocks)
        if need > 0:
            if not dest.engine.pool.can_allocate(need):
                dest.engine.pool.free(blocks)
                return None
            blocks = blocks + dest.engine.pool.allocate(need)
        return blocks

    def _move(self, seq: Sequence, dest: "Worker", blocks: list[int], layers_done: bool) -> None:
        """Sends what is not there yet, then gives the sequence to dest. The source blocks are
        free again once the copy has read them (the compute stream waits for it)."""
        eng = self.engine
        failed = False
        n = eng.pool.blocks_for(seq.num_computed)
        try:
            if not layers_done:
                self.rt.mover.send(eng, dest.engine, seq.block_table[:n], blocks[:n],
                                   range(eng.model_config.num_hidden_layers))
            event = self.rt.mover.completion_event(eng, dest.engine)
        except Exception:
            log.exception("KV transfer of request %d from %s to %s failed", seq.seq_id, self.name, dest.name)
            failed, event = True, None
        eng.batcher.remove(seq)  # frees the source blocks
        seq.block_table = blocks
        seq.dest = None
        seq.dest_blocks = None
        seq.kv_sent = 0
        self.rt.mover.count(sequences=1, in_flight=1)
        dest.post("arrive", seq, event, failed)

    def _layer_hook(self, batch):
        """Layer-wise transfer: for each long prompt in the batch that decodes elsewhere, send
        layer l's blocks as soon as layer l is written, while layer l+1 computes. Short prompts
        move in one piece after their prefill (see `_hand_off`)."""
        cfg = self.rt.config
        mover, eng = self.rt.mover, self.engine
        jobs = []
        for seq, n in zip(batch.seqs, batch.chunk_lens):
            if seq.dest is None or seq.is_decode or seq.num_prompt_tokens < cfg.layerwise_min_tokens:
                continue
            if seq.dest_blocks is None:
                # Claimed at the first send: the blocks are the sequence's from now on, so no
                # lease can run out (and hand them to another request) while KV is written there.
                seq.dest_blocks = seq.dest.engine.pool.claim(seq.seq_id)
            blocks = seq.dest_blocks
            if blocks is None or len(blocks) < len(seq.block_table) or seq.kv_sent != seq.num_computed:
                continue  # the hand-off sends it all (an earlier chunk did not go layer by layer)
            lo = seq.num_computed // eng.pool.block_size
            hi = eng.pool.blocks_for(seq.num_computed + n)
            dst = seq.dest.engine
            jobs.append((seq, block_ids(seq.block_table[lo:hi], eng.device), block_ids(blocks[lo:hi], dst.device),
                         seq.num_computed + n))
        if not jobs:
            return None

        failed: set[int] = set()

        def hook(layer: int) -> None:
            for seq, src, dst, upto in jobs:
                if seq.seq_id in failed:
                    continue
                try:
                    mover.send(eng, seq.dest.engine, src, dst, range(layer, layer + 1))
                except Exception:  # the hand-off sends every layer again (or the token worker recomputes)
                    log.exception("layer-wise KV transfer of request %d failed", seq.seq_id)
                    failed.add(seq.seq_id)
                    continue
                if layer == eng.model_config.num_hidden_layers - 1:
                    seq.kv_sent = upto

        return hook

    # -- role changes ------------------------------------------------------------------------------

    def _change_role(self) -> None:
        """Flips the role once the work of the old kind is gone. Decodes are migrated to another
        token-capable worker ("migrate") or finished here ("drain"); prefills always finish here."""
        with self.role_lock:
            new, gen = self.target_role, self.role_gen
        b = self.engine.batcher
        if new is None:
            return
        if new == "prompt" and (self.arrivals or any(s.is_decode for s in b.running)):
            return  # drained here or handed off by `_hand_off`, turn by turn; arrivals land first
        with self.role_lock:
            b.role = self.role = new
            if self.role_gen == gen:  # else a newer change was asked meanwhile: the next turn takes it
                self.target_role = None
        self.rt._post(self.rt._on_role_changed, self, gen, new)
