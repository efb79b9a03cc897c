import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitnode.model import load_model
from splitnode.model.loader import expected_tensors


@pytest.fixture
def llama_copy(make_hf_checkpoint, tmp_path):
    """A writable copy of a single-file Llama checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(make_hf_checkpoint("LlamaForCausalLM"), dst)
    return dst


def rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_loads_every_parameter_from_the_checkpoint(llama_copy):
    model, config = load_model(llama_copy, "cpu")
    tensors = load_file(llama_copy / "model.safetensors")
    params = dict(model.named_parameters())
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    k = tensors["model.layers.1.self_attn.k_proj.weight"]
    v = tensors["model.layers.1.self_attn.v_proj.weight"]
    assert torch.equal(params["model.layers.1.self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
    gate_up = torch.cat([tensors["model.layers.0.mlp.gate_proj.weight"], tensors["model.layers.0.mlp.up_proj.weight"]])
    assert torch.equal(params["model.layers.0.mlp.gate_up_proj.weight"], gate_up)
    assert sum(p.numel() for p in params.values()) == sum(t.numel() for t in tensors.values())
    assert all(not p.requires_grad for p in params.values())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_sharded_checkpoint_loads_through_its_index(make_hf_checkpoint):
    path = make_hf_checkpoint("Qwen2ForCausalLM", sharded=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, config = load_model(path, "cpu")
    assert set(expected_tensors(config)) == set(index["weight_map"])


def test_dtype_choice(llama_copy):
    assert load_model(llama_copy, "cpu")[0].lm_head.weight.dtype == torch.float32  # auto on CPU
    model, _ = load_model(llama_copy, "cpu", dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # rotary stays exact
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_model(llama_copy, "cpu", dtype="int8")


def test_missing_tensor_is_named(llama_copy):
    rewrite_weights(llama_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'") as e:
        load_model(llama_copy, "cpu")
    assert str(llama_copy) in str(e.value)


def test_shape_mismatch_names_file_and_tensor(llama_copy):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8].clone()
    rewrite_weights(llama_copy, shrink)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj"
                                         r"\.weight' has shape \[8, 64\], but config\.json implies \[32, 64\]"):
        load_model(llama_copy, "cpu")


def test_config_that_disagrees_with_weights_fails_before_allocating(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["intermediate_size"] = 256
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"gate_proj\.weight' has shape \[128, 64\], but config\.json implies \[256, 64\]"):
        load_model(llama_copy, "cpu")


def test_unexpected_tensor_is_an_error_but_rotary_buffers_are_ignored(llama_copy):
    rewrite_weights(llama_copy, lambda t: t.update({
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    load_model(llama_copy, "cpu")
    rewrite_weights(llama_copy, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.ones(64)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load_model(llama_copy, "cpu")


def test_unsupported_architecture_is_named(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPTNeoXForCausalLM'\].*"
                                         r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        load_model(llama_copy, "cpu")


def test_missing_files_name_the_path(llama_copy, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere", "cpu")
    (llama_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"no config.json at {llama_copy}"):
        load_model(llama_copy, "cpu")


def test_missing_weights_name_the_folder(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"no model.safetensors or model.safetensors.index.json in {llama_copy}"):
        load_model(llama_copy, "cpu")


def test_index_naming_a_missing_shard(make_hf_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(make_hf_checkpoint("Qwen2ForCausalLM", sharded=True), dst)
    shard = sorted(dst.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"names {shard.name}, which is missing"):
        load_model(dst, "cpu")
