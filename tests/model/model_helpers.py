"""Helpers the model tests import (a conftest is not importable by name when several exist)."""

import torch

from splitnode.model import AttentionContext, PrefillChunk


def empty_kv_caches(config, num_blocks=8, block_size=16, fill=float("nan")):
    """Poisoned caches, so a read of a slot that was never written shows."""
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return [(torch.full(shape, fill), torch.full(shape, fill)) for _ in range(config.num_hidden_layers)]


def prefill_context(kv_caches, num_tokens):
    """One sequence's whole prompt in one batch, stored at slots 0..T-1."""
    return AttentionContext(kv_caches=kv_caches, slot_mapping=torch.arange(num_tokens),
                            prefills=[PrefillChunk(0, num_tokens, num_tokens, None)])
