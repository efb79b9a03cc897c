"""Prefill attention: every prefill chunk of a batch in one launch, causal, over the paged K/V.

A chunk's new tokens are rows of the flat batch and sit at the last positions of its context; its
keys are read from the cache through one slot per context position (the new tokens' K/V were
stored there just before). One launch replaces a Python loop of one SDPA per sequence, GQA reads
each query head's K/V head in place (no `repeat_interleave` copies), and a chunk after earlier
ones (ctx > q) reads its context where it lies instead of gathering it and passing a boolean
mask, which ruled out the flash kernels (K3).
"""

from __future__ import annotations

import torch

from splitnode.kernels.paged_attention import _LOG2E, _needs_f32_dot

try:  # optional: the CPU path needs only torch
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def paged_prefill_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_slots: torch.Tensor, meta: torch.Tensor,
    scale: float, out: torch.Tensor,
) -> None:
    """q [T, H, D]; caches [num_blocks, block_size, Hkv, D]; meta [S, 4] int32 rows (q_start,
    q_len, k_start, ctx_len): sequence s's queries are rows q_start..q_start+q_len of q, at
    positions ctx_len-q_len..ctx_len-1, and kv_slots[k_start:k_start+ctx_len] (int64) are the
    cache slots of its positions 0..ctx_len-1. Writes those rows of out [T, H, D]; softmax in
    float32."""
    h, d = q.shape[1:]
    hkv = k_cache.shape[2]
    k_flat, v_flat = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    for q_start, q_len, k_start, ctx_len in meta.tolist():
        slots = kv_slots[k_start:k_start + ctx_len]
        k = k_flat.index_select(0, slots).float().transpose(0, 1)  # [Hkv, L, D]
        v = v_flat.index_select(0, slots).float().transpose(0, 1)
        qs = q[q_start:q_start + q_len].float().view(q_len, hkv, h // hkv, d).permute(1, 2, 0, 3)  # [Hkv, G, Lq, D]
        scores = torch.matmul(qs * scale, k[:, None].transpose(-1, -2))  # [Hkv, G, Lq, L]
        future = torch.ones(q_len, ctx_len, dtype=torch.bool, device=q.device).triu(ctx_len - q_len + 1)
        probs = scores.masked_fill(future, float("-inf")).softmax(-1)
        o = torch.matmul(probs, v[:, None])  # [Hkv, G, Lq, D]
        out[q_start:q_start + q_len] = o.permute(2, 0, 1, 3).reshape(q_len, h, d).to(out.dtype)


if triton is not None:

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, meta_ptr, out_ptr,
        q_stride_t, q_stride_h, o_stride_t, o_stride_h, scale_log2,
        GROUP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr,
    ):
        """Program (s, m, h): query rows [m * BLOCK_M, (m + 1) * BLOCK_M) of sequence s, query
        head h, over the keys those rows may see (FlashAttention-2's online softmax, log2 units)."""
        s = tl.program_id(0)
        mt = tl.program_id(1)
        h = tl.program_id(2)
        q_start = tl.load(meta_ptr + s * 4)
        q_len = tl.load(meta_ptr + s * 4 + 1)
        if mt * BLOCK_M >= q_len:  # the grid is sized for the longest chunk of the batch
            return
        k_start = tl.load(meta_ptr + s * 4 + 2).to(tl.int64)
        ctx_len = tl.load(meta_ptr + s * 4 + 3)
        offset = ctx_len - q_len  # query row i sits at position offset + i and sees keys 0..offset + i

        m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = m < q_len
        d = tl.arange(0, D_PAD)
        d_mask = d < D
        rows = (q_start + m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * q_stride_t + h * q_stride_h + d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        kvh = h // GROUP
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        q_pos = offset + m
        # the tile's last row sees keys up to offset + its index; key 0 is in every row's first
        # tile, so no row's running max stays -inf
        end = tl.minimum(ctx_len, offset + (mt + 1) * BLOCK_M)
        n = tl.arange(0, BLOCK_N)
        for start in range(0, end, BLOCK_N):
            k_pos = start + n
            k_mask = k_pos < end
            slot = tl.load(slots_ptr + k_start + k_pos, mask=k_mask, other=0)
            kv_off = slot * (HKV * D) + kvh * D
            kv_mask = k_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            if F32_DOT:
                scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            seen = k_mask[None, :] & (k_pos[None, :] <= q_pos[:, None])
            scores = tl.where(seen, scores * scale_log2, float("-inf"))
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
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * o_stride_t + h * o_stride_h + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_slots: torch.Tensor, meta: torch.Tensor,
    max_q_len: int, scale: float, out: torch.Tensor,
) -> None:
    """Same contract as paged_prefill_attention_ref; max_q_len (the longest chunk's q_len, known
    on the host) sizes the grid. q's and out's rows may be strided; each head's D values must be
    contiguous."""
    t, h, d = q.shape
    num_blocks, block_size, hkv, dk = k_cache.shape
    assert dk == d and v_cache.shape == k_cache.shape and h % hkv == 0, (q.shape, k_cache.shape)
    assert q.dtype == k_cache.dtype == v_cache.dtype == out.dtype, (q.dtype, k_cache.dtype, out.dtype)
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), q.dtype
    assert q.stride(2) == 1 and out.stride(2) == 1 and out.shape == q.shape, (q.stride(), out.stride())
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert kv_slots.dim() == 1 and kv_slots.dtype == torch.int64 and kv_slots.is_contiguous()
    assert meta.dim() == 2 and meta.shape[1] == 4 and meta.dtype == torch.int32 and meta.is_contiguous()
    assert len({x.device for x in (q, k_cache, v_cache, kv_slots, meta, out)}) == 1
    num_seqs = meta.shape[0]
    if num_seqs == 0 or max_q_len == 0:
        return
    d_pad = max(16, triton.next_power_of_2(d))
    f32 = _needs_f32_dot(q.dtype)
    # 64 x 64 tiles keep q, k and v of a 128-wide head in ~48 KiB of shared memory at 16 bits;
    # float32 dots (and wide heads) take half that, for registers.
    block = 32 if f32 or d_pad > 128 else 64
    grid = (num_seqs, triton.cdiv(max_q_len, block), h)
    _prefill_kernel[grid](
        q, k_cache, v_cache, kv_slots, meta, out, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        scale * _LOG2E, GROUP=h // hkv, HKV=hkv, D=d, D_PAD=d_pad, BLOCK_M=block, BLOCK_N=block, F32_DOT=f32,
    )
