import pytest
import torch

from splitnode.model import AttentionContext, PrefillChunk

# id -> (architecture, sharded, config overrides): one of each family member, plus the variants
# that change the weight layout (tied embeddings, attention bias) or the rotary (llama3 scaling).
CHECKPOINTS = {
    "llama3-rope": ("LlamaForCausalLM", False, dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-tied-bias": ("LlamaForCausalLM", False, dict(tie_word_embeddings=True, attention_bias=True)),
    "mistral": ("MistralForCausalLM", False, {}),
    "qwen2-sharded": ("Qwen2ForCausalLM", True, {}),
    "qwen3": ("Qwen3ForCausalLM", False, dict(head_dim=32)),  # head_dim != hidden / heads
}


@pytest.fixture(params=list(CHECKPOINTS))
def hf_checkpoint(request, make_hf_checkpoint):
    arch, sharded, overrides = CHECKPOINTS[request.param]
    return make_hf_checkpoint(arch, sharded=sharded, **overrides)


def empty_kv_caches(config, num_blocks=8, block_size=16, fill=float("nan")):
    """Poisoned caches, so a read of a slot that was never written shows."""
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return [(torch.full(shape, fill), torch.full(shape, fill)) for _ in range(config.num_hidden_layers)]


def prefill_context(kv_caches, num_tokens):
    """One sequence's whole prompt in one batch, stored at slots 0..T-1."""
    return AttentionContext(kv_caches=kv_caches, slot_mapping=torch.arange(num_tokens),
                            prefills=[PrefillChunk(0, num_tokens, num_tokens, None)])
