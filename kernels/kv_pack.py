"""Move a sequence's blocks between a paged pool and a contiguous staging buffer: one layer
(`kv_pack` / `kv_unpack`, what the layer-wise transfer sends while the next layer computes) or
every layer at once (`kv_pack_all` / `kv_unpack_all`, one launch each for a whole-sequence move)."""

from __future__ import annotations

import torch

try:  # optional: the CPU path needs only torch
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def kv_pack_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor) -> None:
    """caches [num_blocks, block_size, Hkv, D]; block_ids [n] int64; out [2, n, block_size, Hkv, D]."""
    torch.index_select(k_cache, 0, block_ids, out=out[0])
    torch.index_select(v_cache, 0, block_ids, out=out[1])


def kv_unpack_ref(staging: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    k_cache.index_copy_(0, block_ids, staging[0])
    v_cache.index_copy_(0, block_ids, staging[1])


# Elements one program moves: 8 KiB of bf16, enough in flight per program to keep the copy
# bandwidth-bound without leaving the tail of a small transfer to a few programs.
_CHUNK = 4096

if triton is not None:

    @triton.jit
    def _kv_copy_kernel(
        cache_k_ptr, cache_v_ptr, stage_k_ptr, stage_v_ptr, block_ids_ptr,
        BLOCK_NUMEL: tl.constexpr, CHUNK: tl.constexpr, PACK: tl.constexpr,
    ):
        """Grid (n, chunks per block): program (i, c) moves chunk c of block block_ids[i] between
        the cache and position i of the staging buffer (cache -> staging when PACK)."""
        i = tl.program_id(0)
        c = tl.program_id(1)
        blk = tl.load(block_ids_ptr + i).to(tl.int64)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        mask = offs < BLOCK_NUMEL
        cache_off = blk * BLOCK_NUMEL + offs
        stage_off = i.to(tl.int64) * BLOCK_NUMEL + offs
        if PACK:
            k = tl.load(cache_k_ptr + cache_off, mask=mask)
            v = tl.load(cache_v_ptr + cache_off, mask=mask)
            tl.store(stage_k_ptr + stage_off, k, mask=mask)
            tl.store(stage_v_ptr + stage_off, v, mask=mask)
        else:
            k = tl.load(stage_k_ptr + stage_off, mask=mask)
            v = tl.load(stage_v_ptr + stage_off, mask=mask)
            tl.store(cache_k_ptr + cache_off, k, mask=mask)
            tl.store(cache_v_ptr + cache_off, v, mask=mask)


def kv_pack_all_ref(kv: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor) -> None:
    """kv [2, L, num_blocks, block_size, Hkv, D] (the engine's whole cache); out [2, L, n, ...]."""
    torch.index_select(kv, 2, block_ids, out=out)


def kv_unpack_all_ref(staging: torch.Tensor, kv: torch.Tensor, block_ids: torch.Tensor) -> None:
    kv.index_copy_(2, block_ids, staging)


def _launch(k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, staging: torch.Tensor, pack: bool) -> None:
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and staging.is_contiguous()
    assert block_ids.dim() == 1 and block_ids.dtype in (torch.int32, torch.int64) and block_ids.is_contiguous()
    n = block_ids.shape[0]
    assert staging.shape == (2, n, *k_cache.shape[1:]), (staging.shape, n, k_cache.shape)
    assert staging.dtype == k_cache.dtype == v_cache.dtype, "staging and caches must share a dtype"
    devices = {t.device for t in (k_cache, v_cache, block_ids, staging)}
    assert len(devices) == 1, devices
    if n == 0:
        return
    block_numel = k_cache[0].numel()
    chunk = min(_CHUNK, triton.next_power_of_2(block_numel))
    grid = (n, triton.cdiv(block_numel, chunk))
    _kv_copy_kernel[grid](
        k_cache, v_cache, staging[0], staging[1], block_ids,
        BLOCK_NUMEL=block_numel, CHUNK=chunk, PACK=pack,
    )


if triton is not None:

    @triton.jit
    def _kv_planes_kernel(
        cache_ptr, stage_ptr, block_ids_ptr, n, plane_numel,
        BLOCK_NUMEL: tl.constexpr, CHUNK: tl.constexpr, PACK: tl.constexpr,
    ):
        """Grid (n, chunks per block, planes): program (i, c, p) moves chunk c of block
        block_ids[i] of plane p (a layer's K or V) between the cache and staging[p, i]."""
        i = tl.program_id(0)
        c = tl.program_id(1)
        p = tl.program_id(2).to(tl.int64)
        blk = tl.load(block_ids_ptr + i).to(tl.int64)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        mask = offs < BLOCK_NUMEL
        cache_off = p * plane_numel + blk * BLOCK_NUMEL + offs
        stage_off = (p * n + i) * BLOCK_NUMEL + offs
        if PACK:
            tl.store(stage_ptr + stage_off, tl.load(cache_ptr + cache_off, mask=mask), mask=mask)
        else:
            tl.store(cache_ptr + cache_off, tl.load(stage_ptr + stage_off, mask=mask), mask=mask)


def _launch_all(kv: torch.Tensor, block_ids: torch.Tensor, staging: torch.Tensor, pack: bool) -> None:
    assert kv.dim() == 6 and kv.shape[0] == 2 and kv.is_contiguous() and staging.is_contiguous(), kv.shape
    assert block_ids.dim() == 1 and block_ids.dtype in (torch.int32, torch.int64) and block_ids.is_contiguous()
    n = block_ids.shape[0]
    assert staging.shape == (2, kv.shape[1], n, *kv.shape[3:]), (staging.shape, n, kv.shape)
    assert staging.dtype == kv.dtype and staging.device == kv.device == block_ids.device
    if n == 0:
        return
    block_numel = kv[0, 0, 0].numel()
    chunk = min(_CHUNK, triton.next_power_of_2(block_numel))
    planes = 2 * kv.shape[1]
    grid = (n, triton.cdiv(block_numel, chunk), planes)
    _kv_planes_kernel[grid](kv, staging, block_ids, n, kv[0, 0].numel(),
                            BLOCK_NUMEL=block_numel, CHUNK=chunk, PACK=pack)


def kv_pack_all_triton(kv: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor) -> None:
    """Same contract as kv_pack_all_ref."""
    _launch_all(kv, block_ids, out, pack=True)


def kv_unpack_all_triton(staging: torch.Tensor, kv: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Same contract as kv_unpack_all_ref; no repeated ids."""
    _launch_all(kv, block_ids, staging, pack=False)


def kv_pack_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor) -> None:
    """Same contract as kv_pack_ref; block_ids int32 or int64, all in range."""
    _launch(k_cache, v_cache, block_ids, out, pack=True)


def kv_unpack_triton(staging: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Same contract as kv_unpack_ref; block_ids int32 or int64, all in range, no repeats."""
    _launch(k_cache, v_cache, block_ids, staging, pack=False)


def kv_pack(k_cache, v_cache, block_ids, out) -> None:
    if triton is not None and k_cache.is_cuda:
        kv_pack_triton(k_cache, v_cache, block_ids, out)
    else:
        kv_pack_ref(k_cache, v_cache, block_ids, out)


def kv_unpack(staging, k_cache, v_cache, block_ids) -> None:
    if triton is not None and k_cache.is_cuda:
        kv_unpack_triton(staging, k_cache, v_cache, block_ids)
    else:
        kv_unpack_ref(staging, k_cache, v_cache, block_ids)


def kv_pack_all(kv, block_ids, out) -> None:
    if triton is not None and kv.is_cuda:
        kv_pack_all_triton(kv, block_ids, out)
    else:
        kv_pack_all_ref(kv, block_ids, out)


def kv_unpack_all(staging, kv, block_ids) -> None:
    if triton is not None and kv.is_cuda:
        kv_unpack_all_triton(staging, kv, block_ids)
    else:
        kv_unpack_all_ref(staging, kv, block_ids)
