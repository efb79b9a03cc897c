"""Moves a sequence's KV blocks from one worker's pool to another's.

Per piece (a layer, or every layer at once, in chunks of at most `staging_bytes`): `kv_pack`
gathers the blocks into a staging buffer on the source, one copy (`copy_(non_blocking=True)`: a
peer copy between GPUs, through the host where there is no P2P link) moves it into a staging
buffer on the destination, and `kv_unpack` scatters it into the destination's blocks. On CUDA:

- packs and copies run on the source's transfer stream, after the compute that wrote the layer;
- unpacks run on a stream of the destination's device kept for this (source, destination) pair,
  so one source's transfers never queue behind another's, and the destination's compute stream
  never waits for the pair streams in bulk: it waits for the event of each sequence it admits;
- `send` returns two events: after the last pack (what the source's compute waits for before its
  blocks are reused) and after the last unpack (what the destination admits the sequence on);
- block ids and staging are made on the stream that reads them, so the caching allocator never
  hands their memory to another stream's work while a read is still queued.

A layer-wise send carries every sequence of a prefill batch that goes to one destination (the
worker joins their block ids once per batch): per layer and destination one stream wait, one pack,
one copy, one unpack, whatever the number of sequences. Sent per sequence, a layer cost k times
~0.3 ms of host work (L1), more than the layer's GPU time for short or many-prompt batches.

On the CPU the same code runs synchronously with the torch references; streams and events are
None. A move inside one device skips the copy and runs on the source's transfer stream.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from splitnode.engine.streams import STREAMS, Streams
from splitnode.kernels.kv_pack import kv_pack, kv_pack_all, kv_unpack, kv_unpack_all

log = logging.getLogger("splitnode")

# Bound on each staging buffer (one per source, one per pair on the destination): a whole-sequence
# move of a long context goes in chunks through it instead of two full copies of its KV (4 GiB each
# for 32K tokens of Llama-3-8B), which sat outside the KV budget and could OOM the token GPU.
STAGING_BYTES = 64 << 20


@dataclass
class TransferStats:
    num_transfers: int = 0  # layer (or whole-sequence) moves issued
    num_sequences: int = 0
    bytes_moved: int = 0
    seconds: float = 0.0  # host time spent issuing (CUDA) or running (CPU) moves
    num_failed: int = 0
    in_flight: int = 0  # sequences whose KV is on its way


class Sent(NamedTuple):
    """The events of a send (None on the CPU, where it is done when `send` returns)."""

    packed: Any  # on the source's transfer stream, right after its last pack: src's blocks are read
    written: Any  # on the pair stream, after its last unpack: dst's blocks hold the KV


def peer_copy(out: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
    """The one cross-device copy of a piece, staging to staging: a peer copy between GPUs, through
    the host where there is no P2P link. Issued with the pair stream current: torch runs it on the
    stream current on the source's device (its transfer stream, after the pack), makes it wait for
    what is queued on the pair stream, and the pair stream (the unpack) wait for it."""
    return out.copy_(stage, non_blocking=stage.is_cuda and out.is_cuda)


# How KV gets from one device to another, cheapest first (the router prefers the cheap ones).
SAME_DEVICE, PEER, THROUGH_HOST = 0, 1, 2


class KVMover:
    """One per runtime; `send` is called from the source worker's thread."""

    def __init__(self, streams: Streams = STREAMS, staging_bytes: int = STAGING_BYTES, can_access_peer=None):
        self.stats = TransferStats()
        self.streams = streams
        self.staging_bytes = staging_bytes
        self._can_access_peer = can_access_peer or torch.cuda.can_device_access_peer
        self._lock = threading.Lock()
        self._pair_streams: dict[tuple[object, object], Any] = {}
        self._staging: dict[tuple, torch.Tensor] = {}
        self._links: dict[tuple[int, int], int] = {}
        self._devices: list[torch.device] = []
        self._peers_logged = False

    # -- streams and ids ------------------------------------------------------------------------

    def pair_stream(self, src, dst):
        """The stream that writes what src sends into dst: dst's device, one per pair. A
        destination's own transfer stream is not it: the unpacks of several sources (each waiting
        for its own prefill's layers) would queue behind one another there, and so would the
        sources' next prefills, which wait for their copies (P2). On one device: src's transfer
        stream (no copy; the unpack reads the staging the pack wrote, on that one stream)."""
        if src.device == dst.device:
            return src.transfer_stream
        with self._lock:
            key = (src, dst)
            if key not in self._pair_streams:
                self._pair_streams[key] = self.streams.new(dst.device)
            return self._pair_streams[key]

    def block_ids(self, src, dst, src_blocks, dst_blocks) -> tuple[torch.Tensor, torch.Tensor]:
        """Each side's block ids, made on the stream that reads them: src's on its transfer
        stream (the packs), dst's on the pair stream (the unpacks). The caching allocator ties a
        tensor's memory to the stream it was made on, so once freed it is reused only by work
        queued after every read of it. Made on the destination's default stream instead (C3), an
        id buffer went to the next move before the earlier unpack had read it, and one
        sequence's KV landed in another's blocks. Tensors are passed through (made here once per
        batch for the layer-wise sends)."""
        s = self.streams
        with s.on(src.transfer_stream):
            a = src_blocks if isinstance(src_blocks, torch.Tensor) else s.ids(list(src_blocks), src.device)
        with s.on(self.pair_stream(src, dst)):
            b = dst_blocks if isinstance(dst_blocks, torch.Tensor) else s.ids(list(dst_blocks), dst.device)
        return a, b

    def _staging_for(self, key: tuple, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A staging view of `shape` in a buffer kept per key, made (under the stream current
        now) on like's device: grown, never past the bound, when a piece needs more. One thread
        uses each key (the source's), and every reuse is ordered on the GPU: the source buffer is
        written and read on the source's transfer stream only, the pair buffer written by the
        copy (which waits for everything queued on the pair stream) and read by the unpack."""
        numel = math.prod(shape)
        buf = self._staging.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            cap = self.staging_bytes // like.element_size()
            size = max(numel, min(cap, 2 * (buf.numel() if buf is not None else 0)))
            buf = self._staging[key] = like.new_empty(size)
        return buf[:numel].view(shape)

    # -- moves ------------------------------------------------------------------------------------

    def send(self, src, dst, src_blocks, dst_blocks, layers: range) -> Sent:
        """Copies `layers` of src_blocks (in src's pool) into dst_blocks (in dst's pool): lists,
        or the tensors `block_ids` made. `src` and `dst` are engines with `.kv_cache` (and its
        per-layer `.kv_caches`), `.device`, `.compute_stream` and `.transfer_stream` (None on the
        CPU). On CUDA this only enqueues; the returned events say when it is done."""
        assert len(src_blocks) == len(dst_blocks), "source and destination block counts differ"
        t0 = time.perf_counter()
        s, into = self.streams, self.pair_stream(src, dst)
        src_ids, dst_ids = self.block_ids(src, dst, src_blocks, dst_blocks)
        kv, copies = src.kv_cache, src.device != dst.device
        # Every layer at once is one pack, one copy and one unpack per chunk over the whole cache;
        # a layer at a time (the layer-wise path) is the same three for that layer's K and V.
        whole = len(layers) == kv.shape[1] and layers.start == 0 and layers.step == 1
        per_block = (kv[:, :, 0].numel() if whole else 2 * kv[0, 0, 0].numel()) * kv.element_size()
        chunk = max(1, self.staging_bytes // per_block)
        nbytes, packed = 0, None
        with s.on(src.transfer_stream):
            s.wait_stream(src.transfer_stream, src.compute_stream)  # the layers' K/V are written
            for layer in [None] if whole else layers:
                for lo in range(0, len(src_ids), chunk):
                    a, b = src_ids[lo:lo + chunk], dst_ids[lo:lo + chunk]
                    shape = (2, kv.shape[1], len(a), *kv.shape[3:]) if whole else (2, len(a), *kv.shape[3:])
                    stage = self._staging_for(("src", src), kv, shape)
                    if whole:
                        kv_pack_all(kv, a, stage)
                    else:
                        kv_pack(*src.kv_caches[layer], a, stage)
                    packed = s.record(src.transfer_stream)  # src's blocks are read (P2: all src waits for)
                    with s.on(into):
                        if copies:
                            stage = peer_copy(self._staging_for(("dst", src, dst), dst.kv_cache, shape), stage)
                        if whole:
                            kv_unpack_all(stage, dst.kv_cache, b)
                        else:
                            kv_unpack(stage, *dst.kv_caches[layer], b)
                    nbytes += stage.numel() * stage.element_size()
        written = s.record(into)
        with self._lock:
            self.stats.num_transfers += 1
            self.stats.bytes_moved += nbytes
            self.stats.seconds += time.perf_counter() - t0
        return Sent(packed, written)

    def wait_packed(self, src, sent: Sent) -> None:
        """src's compute stream waits until the sent blocks are read (they may be reused after):
        for the pack alone, not for the copy and the unpack on the destination."""
        self.streams.wait_event(src.compute_stream, sent.packed)

    def fence(self, src, dst):
        """An event after everything src has queued for dst so far (None on the CPU): blocks of
        dst that a send may still write go back to dst's pool on it (`BlockPool.free_after`).
        None too if dst's device cannot record one (a sticky CUDA error: nothing queued there
        runs any more), so that a dead peer does not take this worker down with it."""
        try:
            return self.streams.record(self.pair_stream(src, dst))
        except Exception:
            log.exception("could not fence the KV transfers from %s to %s", src.device, dst.device)
            return None

    def abandon(self, src, dst):
        """After a send that raised part-way: src's compute waits for all src queued (its blocks
        are freed now), and the fence dst waits for before it reuses the blocks."""
        try:
            self.streams.wait_stream(src.compute_stream, src.transfer_stream)
        except Exception:
            log.exception("could not order %s's compute after its failed KV transfer", src.device)
        return self.fence(src, dst)

    def count(self, sequences: int = 0, failed: int = 0, in_flight: int = 0) -> None:
        with self._lock:
            self.stats.num_sequences += sequences
            self.stats.num_failed += failed
            self.stats.in_flight += in_flight

    # -- peer access (T1) ---------------------------------------------------------------------------

    def add_device(self, device: torch.device) -> None:
        """A device a worker runs on (its peers are checked and warmed at its start)."""
        with self._lock:
            if device not in self._devices:
                self._devices.append(device)

    def link(self, src: torch.device, dst: torch.device) -> int:
        """How KV gets from src to dst: SAME_DEVICE, PEER (P2P: copy engines over NVLink or PCIe)
        or THROUGH_HOST (no P2P between the GPUs, or one side is the CPU). Without P2P the copy
        still works (the driver stages it through host memory), at a fraction of the rate."""
        if src == dst:
            return SAME_DEVICE
        if src.type != "cuda" or dst.type != "cuda":
            return THROUGH_HOST
        key = (src.index, dst.index)
        if key not in self._links:
            self._links[key] = PEER if self._can_access_peer(*key) else THROUGH_HOST
        return self._links[key]

    def peer_report(self) -> list[str]:
        """One line per ordered pair of the GPUs added: 'cuda:0 -> cuda:1: P2P' or '...: through the host'."""
        gpus = sorted({d for d in self._devices if d.type == "cuda"}, key=lambda d: d.index)
        return [f"{a} -> {b}: {'P2P' if self.link(a, b) == PEER else 'through the host (no P2P)'}"
                for a in gpus for b in gpus if a != b]

    def warm_up(self, device: torch.device) -> None:
        """On a worker's thread as it starts: logs the peer matrix once, and makes one small copy
        to every P2P peer, so that torch's lazy cudaDeviceEnablePeerAccess (which maps the peer's
        allocations) runs now and not on the first request's path. A failure is logged: the
        moves still work through the host."""
        with self._lock:
            first, self._peers_logged = not self._peers_logged, True
        report = self.peer_report()
        if first and report:
            log.info("GPU peer access: %s", "; ".join(report))
            if any("host" in line for line in report):
                log.warning("some GPU pairs have no P2P: KV between them goes through the host (slower); "
                            "the router prefers P2P-connected token workers")
        if device.type != "cuda":
            return
        try:
            x = torch.zeros(1, device=device)
            for peer in [d for d in self._devices if d.type == "cuda" and self.link(device, d) == PEER]:
                x.to(peer)
                torch.cuda.synchronize(peer)
            torch.cuda.synchronize(device)
        except Exception:
            log.exception("warming up peer access from %s failed", device)
