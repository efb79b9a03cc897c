"""Write new K/V rows into the paged cache at their slots."""

from __future__ import annotations

import torch


def store_kv_ref(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key/value [N, Hkv, D]; caches [num_blocks, block_size, Hkv, D]; slot_mapping [N] int64
    (slot = block * block_size + offset; -1 skips the row)."""
    keep = slot_mapping >= 0
    slots = slot_mapping if bool(keep.all()) else slot_mapping[keep]
    if not bool(keep.all()):
        key, value = key[keep], value[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value)


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    store_kv_ref(key, value, k_cache, v_cache, slot_mapping)
