"""Shared fixtures.

Model checkpoints: `make_hf_checkpoint(arch, sharded=False, **config_overrides) -> Path` writes a
tiny random-weight Hugging Face folder with transformers itself (byte tokenizer included), cached
per session; treat the folder as read-only (copy it to change it).
"""

from __future__ import annotations

import os

# Triton reads this when first imported (the model imports it through splitnode.kernels): kernel
# tests run the Triton kernels on the CPU through its interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

HF_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def _write_hf_checkpoint(path, arch: str, sharded: bool = False, seed: int = 0, init_std: float = 0.5,
                         **overrides):
    import torch
    import transformers

    from splitnode.model.demo import write_byte_tokenizer

    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    kwargs = dict(vocab_size=261, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=256, eos_token_id=257)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config_cls(**kwargs))
    with torch.no_grad():  # every tensor random (norms near 1, biases non-zero) so a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, init_std)
    model.save_pretrained(path, max_shard_size="40KB" if sharded else "5GB")
    write_byte_tokenizer(path, kwargs["max_position_embeddings"])
    return path


@pytest.fixture(scope="session")
def make_hf_checkpoint(tmp_path_factory):
    cache = {}

    def make(arch: str = "LlamaForCausalLM", sharded: bool = False, **overrides):
        key = (arch, sharded, repr(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(arch.removesuffix("ForCausalLM").lower())
            cache[key] = _write_hf_checkpoint(path, arch, sharded, **overrides)
        return cache[key]

    return make


@pytest.fixture
def sock_dir():
    """A short folder for Unix sockets: AF_UNIX paths are limited to ~107 bytes, and pytest's
    tmp_path can be longer."""
    import shutil
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
