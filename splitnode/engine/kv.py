"""Paged KV cache: the block pool (accounting, reservations under a lease) and its tensors."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from splitnode.engine.sequence import Sequence


@dataclass
class Reservation:
    blocks: list[int]
    expires_at: float


class BlockPool:
    """Blocks of `block_size` token slots, shared by all layers (block b is row b of every layer's
    cache). Allocation and free are exact: `num_free + num_used == num_blocks` at all times, reserved
    blocks (and freed ones still waiting for a transfer's event) counted as used. Thread-safe: the
    router reserves from the loop thread while the worker allocates."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._reservations: dict[object, Reservation] = {}
        # Freed blocks a KV transfer may still write (its copy queued on another stream), each
        # batch with the event after that write: counted as used until the event has fired.
        self._pending: list[tuple[object, list[int]]] = []
        self.lock = threading.RLock()

    @property
    def num_free(self) -> int:
        self._reclaim()
        return len(self._free)

    @property
    def num_pending(self) -> int:
        """Freed blocks waiting for their transfer's event (see `free_after`)."""
        self._reclaim()
        with self.lock:
            return sum(len(b) for _, b in self._pending)

    @property
    def num_reserved(self) -> int:
        with self.lock:
            return sum(len(r.blocks) for r in self._reservations.values())

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        self._reclaim()
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        with self.lock:
            self._reclaim()
            if num_blocks > len(self._free):
                raise RuntimeError(f"KV pool exhausted: {num_blocks} blocks asked, {len(self._free)} free")
            return [self._free.popleft() for _ in range(num_blocks)]

    def free(self, blocks: list[int]) -> None:
        with self.lock:
            self._free.extend(blocks)

    def free_after(self, blocks: list[int], event) -> None:
        """Frees blocks a transfer may still write once `event` has fired (None: at once). The
        token side's compute stream never waits for the transfers in bulk (a decode waits only
        for the copies of the sequences it reads), so a block that an unpack queued on another
        stream may still write must not be handed to a sequence before that write is done."""
        if event is None or event.query():
            self.free(blocks)
            return
        with self.lock:
            self._pending.append((event, list(blocks)))

    def _reclaim(self) -> None:
        if not self._pending:  # a list read under the GIL; the lock guards the change below
            return
        with self.lock:
            keep = []
            for event, blocks in self._pending:
                if event.query():
                    self._free.extend(blocks)
                else:
                    keep.append((event, blocks))
            self._pending = keep

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.can_allocate(max(0, self.blocks_for(num_tokens) - len(seq.block_table)))

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make seq's block table cover its first `num_tokens` tokens."""
        extra = self.blocks_for(num_tokens) - len(seq.block_table)
        if extra > 0:
            seq.block_table.extend(self.allocate(extra))

    def release(self, seq: Sequence) -> None:
        self.free(seq.block_table)
        seq.block_table = []

    # Reservations: a destination's blocks held for a request that is still being prefilled
    # elsewhere. A lease that is neither claimed nor renewed in time returns its blocks.

    def reserve(self, key: object, num_blocks: int, lease_s: float) -> list[int] | None:
        with self.lock:
            self._reclaim()
            if num_blocks > len(self._free):
                return None
            blocks = [self._free.popleft() for _ in range(num_blocks)]
            self._reservations[key] = Reservation(blocks, time.monotonic() + lease_s)
            return blocks

    def claim(self, key: object) -> list[int] | None:
        """Take the reserved blocks over (they become a sequence's); None if the lease is gone."""
        with self.lock:
            r = self._reservations.pop(key, None)
            return None if r is None else r.blocks

    def renew(self, key: object, lease_s: float) -> bool:
        with self.lock:
            r = self._reservations.get(key)
            if r is not None:
                r.expires_at = time.monotonic() + lease_s
            return r is not None

    def cancel(self, key: object) -> None:
        with self.lock:
            r = self._reservations.pop(key, None)
            if r is not None:
                self._free.extend(r.blocks)

    def expire(self, now: float | None = None) -> list[object]:
        now = time.monotonic() if now is None else now
        with self.lock:
            dead = [k for k, r in self._reservations.items() if r.expires_at <= now]
            for k in dead:
                self._free.extend(self._reservations.pop(k).blocks)
            return dead


def kv_cache_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                             dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One tensor for the whole cache, [2 (K, V), layers, num_blocks, block_size, Hkv, D]: a
    whole-sequence KV move is one gather over its block axis. Zeroed, so padding rows read finite
    values."""
    return torch.zeros(2, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)


def layer_views(kv: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer a contiguous (K, V) view [num_blocks, block_size, Hkv, D], as attention reads it."""
    return [(kv[0, layer], kv[1, layer]) for layer in range(kv.shape[1])]


def kv_budget_bytes(total: int, free: int, utilization: float, weight_bytes: int, other_bytes: int,
                    kv_share: float) -> float:
    """The KV cache bytes of an engine loading on a GPU (its weights already in), given
    `mem_get_info`'s total and free bytes. `kv_share` is 1/k for the k engines still to load on
    the device, this one included. Each of the k - 1 others will load its own copy of the weights,
    and each of the k takes `other_bytes` besides weights and KV (graph pool, prefill
    temporaries, logits: M3): both are set aside before the rest is split, so co-located engines
    get the same KV. Splitting first gave the second one (U - W)/2 - W against the first's
    (U - W)/2: 10 GB against 28 GB for an 8B model on 80 GB (M2)."""
    others = max(0, round(1 / kv_share) - 1)
    left = total * utilization - (total - free) - others * weight_bytes - (others + 1) * other_bytes
    return left * kv_share
