import pytest

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
