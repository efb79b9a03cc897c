import json

import pytest
import torch

from splitnode.model import ModelConfig

BASE = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256,
}


def parse(**fields):
    return ModelConfig.from_dict({**BASE, **fields})


def test_defaults_follow_transformers():
    c = parse()
    assert (c.num_key_value_heads, c.head_dim, c.rope_theta, c.rope_scaling) == (4, 16, 10000.0, None)
    assert not (c.attention_bias or c.o_proj_bias or c.qk_norm or c.tie_word_embeddings)
    assert c.max_model_len == 256 and c.dtype is None


def test_rope_is_read_from_transformers5_and_legacy_keys_alike():
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    v5 = parse(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **llama3})
    legacy = parse(rope_theta=500000.0, rope_scaling={"type": "llama3", **llama3})
    assert v5 == legacy
    assert v5.rope_theta == 500000.0 and v5.rope_scaling == {"rope_type": "llama3", **llama3}
    assert parse(rope_theta=1e6, rope_scaling=None).rope_theta == 1e6


def test_unsupported_rope_scaling_is_an_error():
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'; supported: default, llama3"):
        parse(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match=r"llama3 rope scaling is missing \['low_freq_factor'"):
        parse(rope_parameters={"rope_type": "llama3", "factor": 8.0})


def test_family_differences():
    qwen2 = parse(architectures=["Qwen2ForCausalLM"])
    assert qwen2.attention_bias and not qwen2.o_proj_bias
    qwen3 = parse(architectures=["Qwen3ForCausalLM"], head_dim=128, attention_bias=False)
    assert qwen3.qk_norm and qwen3.head_dim == 128 and not qwen3.attention_bias
    llama = parse(attention_bias=True, tie_word_embeddings=True, dtype="bfloat16")
    assert llama.attention_bias and llama.o_proj_bias and llama.tie_word_embeddings
    assert llama.dtype == torch.bfloat16
    assert parse(torch_dtype="float16").dtype == torch.float16


def test_sliding_window_caps_the_served_context():
    assert parse(architectures=["MistralForCausalLM"], sliding_window=128).max_model_len == 128
    assert parse(architectures=["MistralForCausalLM"], sliding_window=4096).max_model_len == 256
    # Qwen configs carry a window that only applies with use_sliding_window
    assert parse(architectures=["Qwen2ForCausalLM"], sliding_window=128).max_model_len == 256
    assert parse(architectures=["Qwen2ForCausalLM"], sliding_window=128, use_sliding_window=True).max_model_len == 128


@pytest.mark.parametrize("fields, message", [
    ({"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"hidden_size": 66}, r"hidden_size \(66\) is not a multiple of num_attention_heads \(4\)"),
    ({"vocab_size": None}, "missing required field 'vocab_size'"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"architectures": ["MixtralForCausalLM"]}, r"unsupported architecture \['MixtralForCausalLM'\]"),
])
def test_invalid_configs_are_rejected_clearly(fields, message):
    with pytest.raises(ValueError, match=message):
        parse(**fields)


def test_from_hf_reads_a_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    assert ModelConfig.from_hf(tmp_path).hidden_size == 64
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_hf(tmp_path / "missing")
