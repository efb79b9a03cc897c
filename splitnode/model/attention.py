"""Attention over the paged KV cache, for a flat batch of decodes and prefill chunks.

The batch is flat: every sequence's new tokens are concatenated, decodes first (one token each),
then prefill chunks. Metadata travels in an explicit `AttentionContext` handed down the forward
call, never through a module-level global.

On CUDA the decodes go through the paged decode kernel, writing into the layer's output, and every
prefill chunk through one paged prefill launch. On the CPU the decodes and prefill chunks go through the C
kernels of kernels/cpu.c (decode over the paged cache, prefill as flash attention), and where they
are not built through the decode mirror and torch's batched GEMMs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from splitnode.kernels import cpu as cpu_kernels
from splitnode.kernels.fused import HAVE_TRITON
from splitnode.kernels.paged_attention import paged_decode_attention, paged_decode_attention_triton
from splitnode.kernels.prefill_attention import paged_prefill_attention_triton
from splitnode.kernels.store_kv import store_kv, store_kv_triton
from splitnode.model.decode_mirror import DecodeMirror

# Which path the layers take. None: per tensor, the Triton kernels on CUDA and the torch ops (their
# references) elsewhere. True: the kernels on any device (tests run them on CPU tensors under
# TRITON_INTERPRET=1 against the torch path); False: the torch ops everywhere.
USE_TRITON: bool | None = None


def use_triton(x: torch.Tensor) -> bool:
    """Whether the layer computing on `x` takes the Triton kernels (see USE_TRITON)."""
    return (HAVE_TRITON and x.is_cuda) if USE_TRITON is None else USE_TRITON


@dataclass
class PrefillChunk:
    """One sequence's new tokens in the flat batch: rows [q_start, q_start + q_len), which sit at
    positions [ctx_len - q_len, ctx_len) of the sequence."""

    q_start: int
    q_len: int
    ctx_len: int
    slots: torch.Tensor | None  # [ctx_len] cache slots of every position, when ctx_len > q_len


# Called with the layer index once that layer's K/V for this batch is in the cache: the hook the
# layer-wise KV transfer hangs on.
LayerHook = Callable[[int], None]


@dataclass
class AttentionContext:
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [num_blocks, block_size, Hkv, D] x2
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token (-1: not stored)
    num_decodes: int = 0
    block_tables: torch.Tensor | None = None  # [num_decodes, max_blocks] int32, -1 padded
    context_lens: torch.Tensor | None = None  # [num_decodes] int32, tokens in cache incl. the new one
    prefills: list[PrefillChunk] = field(default_factory=list)
    layer_hook: LayerHook | None = None
    # CPU: the decodes' K/V kept contiguous across steps (see decode_mirror.py), prepared for this
    # batch; None: the paged kernel reads the cache.
    decode_mirror: DecodeMirror | None = None
    # The prefill kernel's metadata (kv slots, per-chunk rows, longest chunk), made by the first
    # layer's attention and read by every later one: once per forward, not once per layer.
    prefill_meta: tuple[torch.Tensor, torch.Tensor, int] | None = None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, layer: int, scale: float
) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] (rotary already applied) -> [T, H * D].

    Stores k/v into the layer's cache first, then attends over the cache."""
    k_cache, v_cache = ctx.kv_caches[layer]
    kernels = use_triton(q)
    (store_kv_triton if kernels else store_kv)(k, v, k_cache, v_cache, ctx.slot_mapping)
    if ctx.layer_hook is not None:
        ctx.layer_hook(layer)
    num_tokens, num_heads, head_dim = q.shape
    nd = ctx.num_decodes
    if nd == num_tokens and ctx.decode_mirror is not None:  # a decode-only batch: no copy
        return ctx.decode_mirror.attend(layer, q, k, v, scale).view(num_tokens, num_heads * head_dim)
    out = q.new_empty(num_tokens, num_heads, head_dim)
    if nd and ctx.decode_mirror is not None:
        out[:nd] = ctx.decode_mirror.attend(layer, q[:nd], k[:nd], v[:nd], scale)
    elif nd and kernels:  # straight into the output: no copy after (G1)
        paged_decode_attention_triton(q[:nd], k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, out=out[:nd])
    elif nd and cpu_kernels.supports(q):
        cpu_kernels.paged_decode_attention(q[:nd], k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale,
                                           out=out[:nd])
    elif nd:
        paged_decode_attention(q[:nd], k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, out=out[:nd])
    if ctx.prefills and kernels:
        kv_slots, meta, max_q_len = _prefill_meta(ctx)
        paged_prefill_attention_triton(q, k_cache, v_cache, kv_slots, meta, max_q_len, scale, out)
    elif ctx.prefills:
        c_kernel = cpu_kernels.supports(q)
        for chunk in ctx.prefills:
            rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            if chunk.slots is None:  # the whole context is in this batch: use it as computed
                ks, vs = k[rows], v[rows]
            else:
                ks = k_cache.flatten(0, 1).index_select(0, chunk.slots)
                vs = v_cache.flatten(0, 1).index_select(0, chunk.slots)
            if not (c_kernel and cpu_kernels.prefill_attention(q[rows], ks, vs, scale, out[rows])):
                out[rows] = _causal_attention(q[rows], ks, vs, scale)
    return out.view(num_tokens, num_heads * head_dim)


def _prefill_meta(ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The cache slots of every context position of every chunk, end to end, and per chunk
    (q_start, q_len, k_start, ctx_len) as int32 [S, 4]. A chunk holding its whole context reads
    its slots from slot_mapping; when every chunk does (a plain prefill batch) they are the tail of
    slot_mapping itself, with no copy."""
    if ctx.prefill_meta is None:
        chunks, sm = ctx.prefills, ctx.slot_mapping
        starts, n = [], 0
        for c in chunks:
            starts.append(n)
            n += c.ctx_len
        first = chunks[0].q_start
        if all(c.slots is None and c.q_start == first + s for c, s in zip(chunks, starts)):
            kv_slots = sm[first:first + n]
        else:
            kv_slots = torch.cat([sm[c.q_start:c.q_start + c.q_len] if c.slots is None else c.slots for c in chunks])
        meta = torch.tensor([(c.q_start, c.q_len, s, c.ctx_len) for c, s in zip(chunks, starts)], dtype=torch.int32)
        if sm.is_cuda:  # pinned: a pageable copy would wait for the stream; made on the stream that reads it
            meta = meta.pin_memory().to(sm.device, non_blocking=True)
        ctx.prefill_meta = (kv_slots.contiguous(), meta, max(c.q_len for c in chunks))
    return ctx.prefill_meta


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Lq, H, D] at the last Lq positions of k/v [Lk, Hkv, D]."""
    if q.device.type == "cpu":
        return _causal_attention_cpu(q, k, v, scale)
    lq, lk = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if lq == lk:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    else:
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return o.transpose(0, 1)


CPU_QUERY_TILE = 256


def _causal_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The same attention as two batched GEMMs per tile of queries, each tile reading only the keys
    it may see. On the CPU this is about 3x faster than SDPA's flash kernel at the head sizes of
    small models (measured at 1000 tokens, head_dim 32: 12 ms against 38 ms a layer). The GQA
    group's queries are rows of one GEMM per KV head ([Hkv, tile x G, D]), so K/V are read as they
    are, never broadcast into copies; only the tile's diagonal block is masked; softmax runs in
    float32 inside the kernel (bf16 scores are not copied to float32 and back): 1.7-2.3x faster in
    bfloat16 than per-(head, group) GEMMs, the same in float32."""
    lq, h, d = q.shape
    lk, hkv = k.shape[:2]
    g = h // hkv
    offset = lk - lq  # query i sits at position offset + i and sees keys 0..offset + i
    qg = (q * scale).view(lq, hkv, g, d).transpose(0, 1).contiguous()  # [Hkv, Lq, G, D]
    kt = k.permute(1, 2, 0).contiguous()  # [Hkv, D, Lk]
    vt = v.transpose(0, 1).contiguous()  # [Hkv, Lk, D]
    out = q.new_empty(lq, hkv, g, d)
    tile = min(lq, CPU_QUERY_TILE)
    # within a tile's last `t` keys (its diagonal block), query r sees keys 0..r
    future = torch.ones(tile, tile, dtype=torch.bool, device=q.device).triu_(1)[:, None, :]
    for start in range(0, lq, tile):
        end = min(lq, start + tile)
        t, seen = end - start, offset + end  # the last query of the tile sees `seen` keys
        scores = torch.bmm(qg[:, start:end].reshape(hkv, t * g, d), kt[:, :, :seen])  # [Hkv, t x G, seen]
        scores.view(hkv, t, g, seen)[..., seen - t:].masked_fill_(future[:t, :, :t], float("-inf"))
        out[start:end] = torch.bmm(scores.softmax(dim=-1), vt[:, :seen]).view(hkv, t, g, d).transpose(0, 1)
    return out.view(lq, h, d)
