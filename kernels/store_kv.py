"""Write new K/V rows into the paged cache at their slots."""

from __future__ import annotations

import torch

try:  # optional: the CPU path needs only torch
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def store_kv_ref(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key/value [N, Hkv, D]; caches [num_blocks, block_size, Hkv, D]; slot_mapping [N] int64
    (slot = block * block_size + offset; -1 skips the row)."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value)


if triton is not None:

    @triton.jit
    def _store_kv_kernel(
        key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
        key_stride, value_stride,
        ROW: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program per token: copies its Hkv * D contiguous elements to the slot's row."""
        i = tl.program_id(0)
        slot = tl.load(slot_ptr + i).to(tl.int64)
        if slot < 0:
            return
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        k = tl.load(key_ptr + i.to(tl.int64) * key_stride + offs, mask=mask)
        v = tl.load(value_ptr + i.to(tl.int64) * value_stride + offs, mask=mask)
        tl.store(k_cache_ptr + slot * ROW + offs, k, mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, v, mask=mask)


def store_kv_triton(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Same contract as store_kv_ref. key/value rows may be strided (views of a fused QKV output),
    but each row's [Hkv, D] must be contiguous."""
    n, hkv, d = key.shape
    assert value.shape == key.shape, (value.shape, key.shape)
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (hkv, d), (k_cache.shape, key.shape)
    assert k_cache.dtype == v_cache.dtype == key.dtype == value.dtype, "cache and new rows must share a dtype"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    for t in (key, value):
        assert t.stride(2) == 1 and t.stride(1) == d, f"row [Hkv, D] must be contiguous, strides {t.stride()}"
    assert slot_mapping.shape == (n,) and slot_mapping.dtype in (torch.int32, torch.int64)
    assert slot_mapping.is_contiguous()
    devices = {t.device for t in (key, value, k_cache, v_cache, slot_mapping)}
    assert len(devices) == 1, devices
    if n == 0:
        return
    row = hkv * d
    _store_kv_kernel[(n,)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), value.stride(0),
        ROW=row, BLOCK=triton.next_power_of_2(row),
    )


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    if triton is not None and k_cache.is_cuda:
        store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(key, value, k_cache, v_cache, slot_mapping)
