"""Decode attention: one query token per sequence over its paged K/V."""

from __future__ import annotations

import torch


def paged_decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """q [B, H, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, M] int32 (-1 pads);
    context_lens [B] int32. Returns [B, H, D] in q's dtype."""
    b, h, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    max_len = block_tables.shape[1] * block_size
    pos = torch.arange(max_len, device=q.device)
    tables = block_tables.long().clamp(min=0)
    slots = tables[:, pos // block_size] * block_size + pos % block_size  # [B, L]
    k = k_cache.view(-1, hkv, d)[slots]  # [B, L, Hkv, D]
    v = v_cache.view(-1, hkv, d)[slots]
    g = h // hkv
    qf = q.float().view(b, hkv, g, d)
    scores = torch.einsum("bkgd,blkd->bkgl", qf, k.float()) * scale
    valid = pos[None, :] < context_lens[:, None].long()  # [B, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgl,blkd->bkgd", p, v.float())
    return out.reshape(b, h, d).to(q.dtype)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
