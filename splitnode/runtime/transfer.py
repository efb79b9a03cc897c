"""Moves a sequence's KV blocks from one worker's pool to another's.

Per layer: `kv_pack` gathers the blocks into a contiguous staging buffer on the source, one copy
(`copy_(non_blocking=True)`: a peer copy between GPUs, through the host where there is no P2P link)
moves it, `kv_unpack` scatters it into the destination's blocks. On CUDA the three run on the
workers' transfer streams, ordered against the source's compute stream by an event, and a final
event tells the destination when the KV is complete. On the CPU the same code runs synchronously
with the torch references. Moves inside one device skip the copy.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import torch

from splitnode.kernels.kv_pack import kv_pack, kv_pack_all, kv_unpack, kv_unpack_all


@dataclass
class TransferStats:
    num_transfers: int = 0  # layer (or whole-sequence) moves issued
    num_sequences: int = 0
    bytes_moved: int = 0
    seconds: float = 0.0  # host time spent issuing (CUDA) or running (CPU) moves
    num_failed: int = 0
    in_flight: int = 0  # sequences whose KV is on its way


class KVMover:
    """One per runtime; called from the source worker's thread."""

    def __init__(self):
        self.stats = TransferStats()
        self._lock = threading.Lock()

    def send(self, src, dst, src_blocks, dst_blocks, layers: range) -> None:
        """Copies `layers` of src_blocks (in src's pool) into dst_blocks (in dst's pool): lists, or
        int64 tensors already on each side's device (`block_ids`, made once per sequence). `src`
        and `dst` are engines with `.kv_cache` (and its per-layer `.kv_caches`), `.device` and, on CUDA, `.compute_stream` and
        `.transfer_stream`. On CUDA this only enqueues; `completion_event(dst)` marks the end."""
        assert len(src_blocks) == len(dst_blocks), "source and destination block counts differ"
        t0 = time.perf_counter()
        src_ids = block_ids(src_blocks, src.device)
        dst_ids = block_ids(dst_blocks, dst.device)
        nbytes = 0
        src_cuda, dst_cuda = src.device.type == "cuda", dst.device.type == "cuda"
        if src_cuda:
            src.transfer_stream.wait_stream(src.compute_stream)  # the layer's K/V is written
        # Every layer at once is one pack, one copy and one unpack over the whole cache; a layer at
        # a time (the layer-wise path) is the same three for that layer's K and V.
        whole = len(layers) == src.kv_cache.shape[1] and layers.start == 0 and layers.step == 1
        for layer in [None] if whole else layers:
            with _on(src):
                if whole:
                    staging = src.kv_cache.new_empty((2, src.kv_cache.shape[1], len(src_ids), *src.kv_cache.shape[3:]))
                    kv_pack_all(src.kv_cache, src_ids, staging)
                else:
                    k_src, v_src = src.kv_caches[layer]
                    staging = k_src.new_empty((2, len(src_ids), *k_src.shape[1:]))
                    kv_pack(k_src, v_src, src_ids, staging)
                if src_cuda and not dst_cuda:  # to the host: waits for the pack on this stream
                    staging = staging.to(dst.device)
                # Both devices' current streams are their transfer streams here, so a peer copy
                # (which orders itself after both) does not wait for the source's compute.
                with _on(dst):
                    if src_cuda and dst_cuda:
                        dst.transfer_stream.wait_stream(src.transfer_stream)
                        staging.record_stream(dst.transfer_stream)
                    if staging.device != dst.device:
                        staging = staging.to(dst.device, non_blocking=src_cuda and dst_cuda)
                    if whole:
                        kv_unpack_all(staging, dst.kv_cache, dst_ids)
                    else:
                        kv_unpack(staging, *dst.kv_caches[layer], dst_ids)
            nbytes += staging.numel() * staging.element_size()
        with self._lock:
            self.stats.num_transfers += 1
            self.stats.bytes_moved += nbytes
            self.stats.seconds += time.perf_counter() - t0

    @staticmethod
    def completion_event(src, dst):
        """After the last `send` of a sequence: an event the destination waits for (None on CPU).
        The source's compute stream also waits for it, so the source blocks are not reused before
        they are read."""
        if dst.device.type != "cuda":
            return None  # the copy to the host already waited for the source
        if src.device.type == "cuda" and dst.device != src.device:
            dst.transfer_stream.wait_stream(src.transfer_stream)
        ev = torch.cuda.Event()
        ev.record(dst.transfer_stream)
        if src.device.type == "cuda":
            src.compute_stream.wait_event(ev)
        return ev

    def count(self, sequences: int = 0, failed: int = 0, in_flight: int = 0) -> None:
        with self._lock:
            self.stats.num_sequences += sequences
            self.stats.num_failed += failed
            self.stats.in_flight += in_flight


def block_ids(blocks, device: torch.device) -> torch.Tensor:
    if isinstance(blocks, torch.Tensor):
        return blocks
    return torch.tensor(blocks, dtype=torch.int64).to(device, non_blocking=True)


def _on(engine):
    """The engine's device and transfer stream (nothing to enter on the CPU)."""
    if engine.device.type != "cuda":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.cuda.device(engine.device))
    stack.enter_context(torch.cuda.stream(engine.transfer_stream))
    return stack
