"""A small Llama written as a real Hugging Face folder, so the default run uses the real loader.

Weights come from a fixed seed and the tokenizer is byte-level (one token per byte, no merges), so
the folder is byte-for-byte the same on every machine and any text round-trips. The model knows
nothing; its output is deterministic noise, which is what tests and the demo need.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.pre_tokenizers import ByteLevel

DEMO_NAME = "demo-v1"  # bump when the written bytes change
SPECIAL_TOKENS = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
BOS, EOS = 256, 257  # byte b is token b; special tokens follow

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256 + len(SPECIAL_TOKENS),
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta.
    "rope_theta": 10000.0,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "dtype": "float32",
}
INIT_STD = 0.1  # large enough that next-token distributions are far from uniform


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "splitnode"


def demo_model_path(cache_dir: str | Path | None = None) -> Path:
    """The demo model's folder, written on first use (atomically: a temp folder renamed into place)."""
    return cached_model_path(DEMO_NAME, None, cache_dir)


def cached_model_path(name: str, config: dict | None = None, cache_dir: str | Path | None = None) -> Path:
    """A random model of the demo's kind (`write_demo_model(path, config)`) in the cache folder as
    `name`, written once, atomically: a temp folder renamed into place, so concurrent first uses
    never see half a folder."""
    parent = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = parent / name
    if (final / "config.json").is_file():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
    try:
        write_demo_model(tmp, config)
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():  # not a lost race with another writer
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_demo_model(path: Path, config: dict | None = None) -> None:
    """The demo folder; `config` overrides sizes (hidden_size, num_hidden_layers, ...) for a
    bigger random model of the same kind, as the benchmarks use."""
    c = {**CONFIG, **(config or {})}
    hidden, inter, dim = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q_size, kv_size = c["num_attention_heads"] * dim, c["num_key_value_heads"] * dim
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen) * INIT_STD

    tensors = {"model.embed_tokens.weight": randn(c["vocab_size"], hidden)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": randn(q_size, hidden),
            p + "self_attn.k_proj.weight": randn(kv_size, hidden),
            p + "self_attn.v_proj.weight": randn(kv_size, hidden),
            p + "self_attn.o_proj.weight": randn(hidden, q_size),
            p + "mlp.gate_proj.weight": randn(inter, hidden),
            p + "mlp.up_proj.weight": randn(inter, hidden),
            p + "mlp.down_proj.weight": randn(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        })
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = randn(c["vocab_size"], hidden)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})

    _write_json(path / "config.json", c)
    _write_json(path / "generation_config.json", {"bos_token_id": BOS, "eos_token_id": EOS})
    write_byte_tokenizer(path, c["max_position_embeddings"], c["vocab_size"])


def write_byte_tokenizer(path: Path, model_max_length: int, vocab_size: int = CONFIG["vocab_size"]) -> None:
    """tokenizer.json and tokenizer_config.json of the byte tokenizer (vocab 261), with a chat template.
    A bigger `vocab_size` adds plain tokens "<|N|>" for ids 261..vocab_size - 1, so every id a random
    model of that size emits decodes to text here and in other engines (vLLM) reading the folder."""
    tok = byte_tokenizer()
    tok.add_tokens([AddedToken(f"<|{i}|>", special=False, normalized=False) for i in range(tok.get_vocab_size(), vocab_size)])
    tok.save(str(path / "tokenizer.json"))
    _write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    })


def byte_tokenizer() -> HFTokenizer:
    """One token per byte (ids 0-255, via the GPT-2 byte-to-unicode alphabet), then the special
    tokens; BOS is prepended by the post-processor."""
    alphabet = ByteLevel.alphabet()
    byte_to_char = bytes_to_unicode()
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    return tok


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenizes into)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _write_json(file: Path, obj: dict) -> None:
    with open(file, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
