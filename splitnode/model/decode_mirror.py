"""The CPU decode path: the decode batch's K/V of every layer kept contiguous across steps.

On the CPU, gathering every sequence's context out of the paged cache at every layer of every
decode step costs more than the attention itself. While the decode batch stays the same, each
step only adds one token per sequence, so the mirror keeps each layer's K/V as [B, Hkv, capacity,
D] and appends the new token in place. The paged cache stays the source of truth (prefill,
preemption and KV transfer read it, and every token is still stored there); the mirror is rebuilt
from it whenever the decode batch changes. GPUs use the paged Triton kernel under CUDA graphs.
"""

from __future__ import annotations

import torch


class DecodeMirror:
    def __init__(self, max_bytes: int, headroom: int = 64):
        self.max_bytes = max_bytes
        self.headroom = headroom  # steps a mirror lasts before it must grow (a rebuild)
        self.key: list[int] | None = None  # seq ids of the mirrored batch, in batch order
        self.lens: torch.Tensor | None = None  # [B] tokens mirrored per sequence
        self.k: list[torch.Tensor] = []  # per layer [B, Hkv, capacity, D]
        self.v: list[torch.Tensor] = []
        self.num_rebuilds = 0

    def prepare(self, seq_ids: list[int], num_cached: list[int], block_tables: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Before a forward whose decodes are `seq_ids` with `num_cached` tokens already in the
        paged cache. Returns False when the mirror is off for this batch (over its memory budget):
        the caller then uses the paged kernel."""
        lens = torch.tensor(num_cached, dtype=torch.int64)
        capacity = self.k[0].shape[2] if self.k else 0
        if (seq_ids == self.key and self.lens is not None and torch.equal(lens, self.lens)
                and int(lens.max()) < capacity):
            self._plan_step()
            return True
        k_cache = kv_caches[0][0]
        block_size, hkv, d = k_cache.shape[1:]
        capacity = -(-(int(lens.max()) + self.headroom) // block_size) * block_size
        b = len(seq_ids)
        if 2 * len(kv_caches) * b * hkv * capacity * d * k_cache.element_size() > self.max_bytes:
            self.reset()
            return False
        num_blocks = -(-int(lens.max()) // block_size) if int(lens.max()) else 0
        tables = block_tables[:, :num_blocks].long().clamp(min=0).flatten()
        self.k, self.v = [], []
        for kc, vc in kv_caches:
            mirrors = []
            for cache in (kc, vc):
                m = cache.new_zeros(b, hkv, capacity, d)  # finite past the context: 0 * pad, not NaN
                if num_blocks:
                    m[:, :, : num_blocks * block_size] = cache.index_select(0, tables).view(
                        b, num_blocks * block_size, hkv, d).transpose(1, 2)
                mirrors.append(m)
            self.k.append(mirrors[0])
            self.v.append(mirrors[1])
        self.key, self.lens = list(seq_ids), lens
        self.num_rebuilds += 1
        self._plan_step()
        return True

    def _plan_step(self) -> None:
        """What every layer of this step shares: where the new tokens go, and the mask."""
        self._rows = torch.arange(len(self.key))
        self._length = int(self.lens.max()) + 1
        self._hidden = (torch.arange(self._length)[None, :] > self.lens[:, None])[:, None, None, :]

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
               scale: float) -> torch.Tensor:
        """q [B, H, D]; the step's new k/v [B, Hkv, D] (also stored in the paged cache)."""
        b, h, d = q.shape
        km, vm = self.k[layer], self.v[layer]
        hkv = km.shape[1]
        km[self._rows, :, self.lens] = k_new
        vm[self._rows, :, self.lens] = v_new
        length = self._length
        qg = q.view(b, hkv, h // hkv, d).to(km.dtype) * scale
        scores = torch.matmul(qg, km[:, :, :length].transpose(-1, -2)).float()  # [B, Hkv, G, L]
        probs = scores.masked_fill_(self._hidden, float("-inf")).softmax(dim=-1)
        out = torch.matmul(probs.to(vm.dtype), vm[:, :, :length]).reshape(b, h, d).to(q.dtype)
        if layer == len(self.k) - 1:
            self.lens = self.lens + 1  # every layer has the step's token now
        return out

    def reset(self) -> None:
        self.key, self.lens, self.k, self.v = None, None, [], []
