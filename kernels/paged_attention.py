"""Decode attention: one query token per sequence over its paged K/V."""

from __future__ import annotations

import functools
import os

import torch

try:  # optional: the CPU path needs only torch
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def paged_decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """q [B, H, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, M] int32 (-1 pads);
    context_lens [B] int32. Returns [B, H, D] in q's dtype."""
    b, h, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    if b == 0:
        return q.new_empty(b, h, d)
    # Gather only the blocks the longest context reaches, not all M columns of the table: the CPU
    # engine calls this every decode step, and tables may be padded well past the batch's contexts.
    num_blocks = min(block_tables.shape[1], -(-int(context_lens.max()) // block_size))
    max_len = num_blocks * block_size
    tables = block_tables[:, :num_blocks].long().clamp(min=0).flatten()
    # Whole blocks through index_select (several times faster on CPU than per-slot fancy indexing),
    # then one copy to [B, Hkv, L, D] so both products are plain batched GEMMs over contiguous
    # operands (on CPU, SDPA's flash kernel and matmuls on strided K cost several times more for
    # a decode's few query rows). Each kv head's group of query heads shares its K/V: no repeat.
    k = k_cache.index_select(0, tables).view(b, max_len, hkv, d).transpose(1, 2).contiguous().float()
    v = v_cache.index_select(0, tables).view(b, max_len, hkv, d).transpose(1, 2).contiguous().float()
    valid = torch.arange(max_len, device=q.device)[None, :] < context_lens[:, None].long()  # [B, L]
    scores = torch.matmul(q.float().view(b, hkv, h // hkv, d) * scale, k.transpose(-1, -2))  # [B, Hkv, G, L]
    probs = scores.masked_fill_(~valid[:, None, None, :], float("-inf")).softmax(dim=-1)
    out = torch.matmul(probs, v)
    return out.reshape(b, h, d).to(q.dtype)


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
        out_ptr, m_ptr, l_ptr,
        q_stride_b, q_stride_h, out_stride_b, bt_stride_b, max_blocks, scale_log2, num_splits,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, MIN_TILES: tl.constexpr, SPLIT: tl.constexpr,
        F32_DOT: tl.constexpr,
    ):
        """Program (b, kv head, split) attends the whole GQA group of query heads over tokens
        [split * part_len, (split + 1) * part_len) of sequence b, so each K/V row is read once.

        part_len comes from the sequence's own context, read here, not from the table's width:
        under CUDA graphs the table is max_model_len wide (128K positions for Llama-3.1), and a
        part_len sized from it left a 4K context in split 0 with the other programs idle (K1).
        Each sequence's context is spread over the splits in whole tiles, at least MIN_TILES each.

        Without SPLIT (one split) it writes the normalised output [B, H, D] (rows out_stride_b
        apart); with SPLIT it writes float32 partials (running max m and sum l in log2 units,
        unnormalised acc [B, H, S, D]) that _paged_decode_reduce_kernel merges."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        ctx_len = tl.load(context_lens_ptr + b)
        part_len = tl.maximum(tl.cdiv(tl.cdiv(ctx_len, num_splits), TILE), MIN_TILES) * TILE
        start = split * part_len
        end = tl.minimum(start + part_len, ctx_len)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D)
        g_mask = g < GROUP
        heads = kvh * GROUP + g
        q = tl.load(
            q_ptr + b.to(tl.int64) * q_stride_b + heads[:, None] * q_stride_h + d[None, :],
            mask=g_mask[:, None], other=0.0,
        )
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        t = tl.arange(0, TILE)
        table = block_tables_ptr + b.to(tl.int64) * bt_stride_b
        for tile_start in range(start, end, TILE):
            pos = tile_start + t
            blk_idx = pos // BLOCK_SIZE
            valid = (pos < end) & (blk_idx < max_blocks)
            blk = tl.load(table + blk_idx, mask=valid, other=0)
            valid = valid & (blk >= 0)  # a hole inside the context is a caller bug: never read it
            rows = (blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * (HKV * D) + kvh * D
            k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            if F32_DOT:
                scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(valid[None, :], scores * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if F32_DOT:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        row = b.to(tl.int64) * (HKV * GROUP) + heads  # [GROUP_PAD] flat (b, h)
        if not SPLIT:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            dst = out_ptr + b.to(tl.int64) * out_stride_b + heads[:, None] * D + d[None, :]
            tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
        else:
            part = row * num_splits + split
            tl.store(m_ptr + part, m_i, mask=g_mask)
            tl.store(l_ptr + part, l_i, mask=g_mask)
            tl.store(out_ptr + part[:, None] * D + d[None, :], acc, mask=g_mask[:, None])

    @triton.jit
    def _paged_decode_reduce_kernel(
        acc_ptr, m_ptr, l_ptr, out_ptr, num_splits, out_stride_b,
        H: tl.constexpr, D: tl.constexpr, SPLITS_PAD: tl.constexpr,
    ):
        """Program per flat (b, h) row: merges its num_splits partial softmaxes."""
        row = tl.program_id(0).to(tl.int64)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, D)
        s_mask = s < num_splits
        part = row * num_splits + s
        m = tl.load(m_ptr + part, mask=s_mask, other=float("-inf"))
        l = tl.load(l_ptr + part, mask=s_mask, other=0.0)
        acc = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=s_mask[:, None], other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)  # empty splits weigh nothing
        num = tl.sum(acc * w[:, None], 0)
        den = tl.sum(l * w, 0)
        out = num / tl.where(den > 0, den, 1.0)
        tl.store(out_ptr + (row // H) * out_stride_b + (row % H) * D + d, out.to(out_ptr.dtype.element_ty))


_LOG2E = 1.4426950408889634
# Shortest stretch of context worth its own program when a small batch is split along the context.
_MIN_SPLIT_LEN = 256


def _needs_f32_dot(dtype: torch.dtype) -> bool:
    """float32 caches take exact (not tf32) dots. So do bf16 ones under TRITON_INTERPRET: the
    interpreter's numpy dot reads bf16 (stored as uint16) as integers."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _auto_num_splits(q: torch.Tensor, num_programs: int, max_len: int) -> int:
    """Split the context (flash-decoding) until there are ~8 programs per SM: on an H200 that
    beat fewer splits for batch x kv heads up to 512 and lost to none at 2048."""
    if not q.is_cuda:
        return 1
    want = triton.cdiv(8 * _num_sms(q.device), num_programs)
    return max(1, min(want, max_len // _MIN_SPLIT_LEN))


def paged_decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, num_splits: int | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as paged_decode_attention_ref. q's rows may be strided (a view of a fused QKV
    output) but each head's D values must be contiguous. Contexts of length 0 give zeros. `out`
    ([B, H, D], rows may be strided, each row's H * D contiguous) takes the result in place of a
    new tensor: the attention writes straight into the layer's output, no copy after.

    num_splits: how many programs share one sequence's context (None: chosen from the GPU's SM
    count, the batch and the table's width). The count depends only on shapes, so it is stable
    under CUDA graphs; how the context is cut into them depends on each sequence's length, read
    on the device."""
    b, h, d = q.shape
    if out is None:
        out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    assert out.shape == (b, h, d) and out.dtype == q.dtype and out.device == q.device, (out.shape, out.dtype)
    assert out.stride(2) == 1 and out.stride(1) == d, f"each row of out must be contiguous, strides {out.stride()}"
    if b == 0:
        return out
    acc_m_l = _decode_launch(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, out)
    if acc_m_l is not None:
        acc, m, l = acc_m_l
        num_splits = m.shape[2]
        _paged_decode_reduce_kernel[(b * h,)](
            acc, m, l, out, num_splits, out.stride(0), H=h, D=d, SPLITS_PAD=triton.next_power_of_2(num_splits),
        )
    return out


def _decode_launch(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, out):
    """Checks and launches the split kernel. With one split it writes `out` and returns None; with
    more, the float32 partials (acc [B, H, S, D], m and l [B, H, S]) for the reduce."""
    b, h, d = q.shape
    num_blocks, block_size, hkv, dk = k_cache.shape
    assert dk == d and v_cache.shape == k_cache.shape, (q.shape, k_cache.shape, v_cache.shape)
    assert h % hkv == 0, f"{h} query heads over {hkv} kv heads"
    assert d >= 16 and d & (d - 1) == 0, f"head_dim {d} must be a power of two >= 16"
    assert block_size & (block_size - 1) == 0, f"block_size {block_size} must be a power of two"
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), q.dtype
    assert q.stride(2) == 1, f"q strides {q.stride()}"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.dim() == 2 and block_tables.shape[0] == b and block_tables.dtype == torch.int32
    assert block_tables.stride(1) == 1, f"block_tables strides {block_tables.stride()}"
    assert context_lens.shape == (b,) and context_lens.dtype == torch.int32 and context_lens.is_contiguous()
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, context_lens)}
    assert len(devices) == 1, devices

    group = h // hkv
    max_blocks = block_tables.shape[1]
    max_len = max_blocks * block_size
    # ~8K elements of K (and of V) per tile, and never less than one whole block.
    tile = max(block_size, min(128, 8192 // d), 16)
    if num_splits is None:
        num_splits = _auto_num_splits(q, b * hkv, max_len)
    num_splits = max(1, min(num_splits, triton.cdiv(max_len, tile)))
    meta = dict(
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HKV=hkv, D=d, BLOCK_SIZE=block_size,
        TILE=tile, MIN_TILES=triton.cdiv(_MIN_SPLIT_LEN, tile), SPLIT=num_splits > 1, F32_DOT=_needs_f32_dot(q.dtype),
    )
    grid = (b, hkv, num_splits)
    if num_splits == 1:
        args = (q.stride(0), q.stride(1), out.stride(0), block_tables.stride(0), max_blocks, scale * _LOG2E, 1)
        _paged_decode_kernel[grid](q, k_cache, v_cache, block_tables, context_lens, out, out, out, *args, **meta)
        return None
    acc = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)
    m = torch.empty(b, h, num_splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    args = (q.stride(0), q.stride(1), 0, block_tables.stride(0), max_blocks, scale * _LOG2E, num_splits)
    _paged_decode_kernel[grid](q, k_cache, v_cache, block_tables, context_lens, acc, m, l, *args, **meta)
    return acc, m, l


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, out=None):
    if triton is not None and q.is_cuda:
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, out=out)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
    return ref if out is None else out.copy_(ref)
