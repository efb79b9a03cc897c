"""Move one layer's blocks of a sequence between a paged pool and a contiguous staging buffer."""

from __future__ import annotations

import torch


def kv_pack_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor) -> None:
    """caches [num_blocks, block_size, Hkv, D]; block_ids [n] int64; out [2, n, block_size, Hkv, D]."""
    torch.index_select(k_cache, 0, block_ids, out=out[0])
    torch.index_select(v_cache, 0, block_ids, out=out[1])


def kv_unpack_ref(staging: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    k_cache.index_copy_(0, block_ids, staging[0])
    v_cache.index_copy_(0, block_ids, staging[1])


def kv_pack(k_cache, v_cache, block_ids, out) -> None:
    kv_pack_ref(k_cache, v_cache, block_ids, out)


def kv_unpack(staging, k_cache, v_cache, block_ids) -> None:
    kv_unpack_ref(staging, k_cache, v_cache, block_ids)
