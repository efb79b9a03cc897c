"""Tiny GGUF files written as llama.cpp's convert_hf_to_gguf.py writes them, from a transformers
checkpoint folder, so the GGUF tests need no download."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

from splitnode.model.demo import bytes_to_unicode

GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3"}
_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")

# Byte-level BPE: the 256 byte symbols, a few merges, three control tokens (vocabulary of 268).
BPE_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "2 0"]
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_VOCAB_SIZE = 256 + len(BPE_MERGES) + len(BPE_SPECIALS)
# SentencePiece BPE: unk/bos/eos, the 256 byte-fallback pieces, then scored pieces and no merges.
SP_PIECES = ["▁", "t", "h", "e", "a", "s", "i", "n", "r", "o", "l", "w", "d", "▁t", "he", "▁the", "▁a", "in", "er",
             "on", "▁s", "ll", "▁w", "or"]
SP_VOCAB_SIZE = 3 + 256 + len(SP_PIECES)


def bpe_tokenizer(w: gguf.GGUFWriter, pre: str = "gpt-2") -> None:
    chars = bytes_to_unicode()
    tokens = [chars[b] for b in range(256)] + [m.replace(" ", "") for m in BPE_MERGES] + BPE_SPECIALS
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3, 3, 3])
    w.add_token_merges(BPE_MERGES)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)


def sentencepiece_tokenizer(w: gguf.GGUFWriter) -> None:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SP_PIECES
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(SP_PIECES))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(SP_PIECES))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: each head's rows from [2, dim/2] halves to interleaved pairs."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def llama3_rope_factors(theta: float, dim: int, factor: float, low: float = 1.0, high: float = 4.0,
                        old_context: int = 8192) -> torch.Tensor:
    """convert_hf_to_gguf.py's rope_freqs for a Llama 3.1 checkpoint."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _encode(t: torch.Tensor, qtype: Q) -> tuple[np.ndarray, Q | None]:
    data = t.float().numpy()
    if qtype == Q.Q8_1:  # llama.cpp's activation type, which the gguf package cannot (de)quantize: bytes only
        return np.zeros(gguf.quant_shape_to_byte_shape(data.shape, qtype), dtype=np.uint8), qtype
    if qtype == Q.F32:
        return data, None
    if qtype == Q.F16:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, qtype), qtype


def write_gguf(path, hf_dir, qtype: Q = Q.F32, tokenizer: str = "gpt2", arch: str | None = None,
               rope_freqs: torch.Tensor | None = None, tensor_types: dict[str, Q] | None = None, pre: str = "gpt-2"):
    """The checkpoint in `hf_dir` as a GGUF file: 2-D weights in `qtype` (or `tensor_types[name]`),
    norms and biases in F32, llama q/k rows permuted, metadata under llama.cpp's keys."""
    c = json.loads((hf_dir / "config.json").read_text())
    arch = arch or GGUF_ARCH[c["architectures"][0]]
    tensors = load_file(hf_dir / "model.safetensors")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny " + arch)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
    w.add_rope_freq_base(theta)
    if arch == "llama":
        w.add_rope_dimension_count(c["head_dim"])
        w.add_vocab_size(c["vocab_size"])
    else:
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
    w.add_file_type(int(qtype) if qtype in (Q.F32, Q.F16) else {Q.Q8_0: 7, Q.Q4_0: 2, Q.Q4_1: 3}.get(qtype, 7))
    bpe_tokenizer(w, pre) if tokenizer == "gpt2" else sentencepiece_tokenizer(w)
    w.add_chat_template(CHAT_TEMPLATE)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.numpy())
    for name, t in tensors.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{_NAMES[module]}.{kind}"
        if arch == "llama" and ".q_proj." in name:
            t = permute(t, c["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            t = permute(t, c["num_key_value_heads"])
        kind = (tensor_types or {}).get(gname, qtype if t.dim() == 2 else Q.F32)
        data, raw = _encode(t, kind)
        w.add_tensor(gname, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def greedy(hf_model, ids: list[int], n: int) -> torch.Tensor:
    """transformers' greedy search for exactly n tokens, past EOS as `ignore_eos` goes (min_new_tokens
    would instead forbid EOS)."""
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    return hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
