"""GGUF files (llama.cpp's format) of the supported architectures, read with the `gguf` package.

A GGUF file holds the config, the tokenizer and the weights in one file, under llama.cpp's names.
This module turns them into what a Hugging Face folder gives the rest of splitnode: a config.json
dict, a `tokenizers` Tokenizer with its tokenizer_config, and tensors under Hugging Face names.
The engine has no quantized matmul, so quantized weights are dequantized (one tensor at a time) to
the engine's dtype: a Q4 file takes as much memory once loaded as an F16 or BF16 one.

Mappings follow transformers' GGUF loader (`modeling_gguf_pytorch_utils.py`, `integrations/ggml.py`,
`integrations/gguf/gguf_tokenizer_mapping.py`), which the tests compare against, except where
llama.cpp (what wrote the file) is more precise: the pre-tokenizer of SmolLM/StarCoder vocabularies,
`add_space_prefix`, end-of-generation tokens and Llama 3's `rope_freqs`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from splitnode.model.config import ModelConfig, parse_dtype
from splitnode.model.demo import bytes_to_unicode

logger = logging.getLogger(__name__)

# GGUF `general.architecture` -> the Hugging Face class with the same computation. llama.cpp writes
# Mistral (7B, Nemo) as `llama` too.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# What the gguf package dequantizes and the tests (or the shipped smollm2 file) exercise. The IQ*
# and TQ* codebook types dequantize too, but slowly in numpy; refused rather than half-supported.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+: per-frequency rope factors, read into the config

# Text splits before byte-level BPE, by `tokenizer.ggml.pre`: transformers' table for the families
# splitnode serves, plus llama.cpp's split for SmolLM/StarCoder (digits one by one, then GPT-2's).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {**dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
           **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT)}
_DIGITS_FIRST = ("smollm", "starcoder", "refact")
# llama.cpp ends generation at these control tokens too, whatever the file's eos id says.
_END_OF_GENERATION = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<EOT>")
_CONTROL, _USER_DEFINED = 3, 4  # gguf TokenType values


def is_gguf_file(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix.lower() == ".gguf" and path.is_file()


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    """The file's checkpoint, opened once per process: parsing a 50k-token vocabulary takes
    seconds, and the tokenizer and every worker's loader read the same file."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    return _open_cached(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_cached(path: Path, size: int, mtime_ns: int) -> GGUFCheckpoint:
    return GGUFCheckpoint(path)


class GGUFCheckpoint:
    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        self.reader = GGUFReader(self.path)
        self.arch = self.meta("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"{self.path}: unsupported GGUF architecture {self.arch!r}; supported: "
                             f"{', '.join(ARCHITECTURES)} (Llama, Mistral, Qwen2/2.5, Qwen3)")
        self.infos = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise ValueError(f"{self.path}: tensor {t.name!r} has GGUF type {t.tensor_type.name}, which splitnode "
                                 f"cannot dequantize; supported: {', '.join(SUPPORTED_TYPES)}")
        self.hf_config = self._hf_config()
        self.config = ModelConfig.from_dict(self.hf_config, source=str(self.path))

    def meta(self, key: str, default=...):
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise ValueError(f"{self.path}: GGUF metadata has no {key!r}")
            return default
        return field.contents()

    def _arch_meta(self, key: str, default=...):
        value = self.meta(f"{self.arch}.{key}", default)
        if isinstance(value, list):
            raise ValueError(f"{self.path}: per-layer {self.arch}.{key} is not supported")
        return value

    # -- config -------------------------------------------------------------------------------

    def _hf_config(self) -> dict:
        """config.json as transformers' GGUF loader writes it for these architectures."""
        a = self._arch_meta
        hidden, heads = a("embedding_length"), a("attention.head_count")
        rope_dim = a("rope.dimension_count", None)
        # llama rotates whole heads, so its rope width is the head size (Mistral Nemo: 128, not 5120 / 32)
        head_dim = (a("attention.key_length", None) or (rope_dim if self.arch == "llama" else None)
                    or (hidden // heads if hidden % heads == 0 else None))
        if head_dim is None:
            raise ValueError(f"{self.path}: head size unknown: no {self.arch}.attention.key_length, and "
                             f"embedding_length {hidden} is not a multiple of head_count {heads}")
        if rope_dim is not None and rope_dim != head_dim:
            raise ValueError(f"{self.path}: rope over {rope_dim} of {head_dim} head dimensions (partial rotary) "
                             "is not supported")
        if self.meta(f"{self.arch}.rope.scaling.type", "none") not in ("none", ""):
            raise ValueError(f"{self.path}: rope scaling {self.meta(f'{self.arch}.rope.scaling.type')!r} is not "
                             "supported; supported: none, and Llama 3's (rope_freqs)")
        embed = self.infos.get("token_embd.weight")
        if embed is None:
            raise ValueError(f"{self.path}: missing tensor 'token_embd.weight'")
        theta = float(a("rope.freq_base", 10000.0))
        config = {
            "architectures": [ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "vocab_size": int(embed.shape[1]),  # ggml lists dimensions innermost first
            "hidden_size": hidden,
            "intermediate_size": a("feed_forward_length"),
            "num_hidden_layers": a("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": a("attention.head_count_kv", heads),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": a("context_length"),
            "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon")),
            # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta.
            "rope_theta": theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            # llama.cpp writes the output projection only when it is not the embedding.
            "tie_word_embeddings": "output.weight" not in self.infos,
            "attention_bias": "blk.0.attn_q.bias" in self.infos,
            "bos_token_id": self.meta("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": self.meta("tokenizer.ggml.eos_token_id", None),
        }
        if self.arch == "qwen2":
            del config["attention_bias"]  # Qwen2 always biases q/k/v
        if ROPE_FREQS in self.infos:
            config["rope_parameters"] = self._llama3_rope(config)
        return config

    def _llama3_rope(self, config: dict) -> dict:
        """llama.cpp stores Llama 3's rope scaling as the factor each frequency is divided by,
        computed from parameters it does not store. Every Llama 3.x uses the same three besides
        the factor; they are accepted only if they reproduce the stored factors."""
        from splitnode.model.llama import rope_inv_freq

        factors = torch.from_numpy(self._dequantize(ROPE_FREQS)).float()
        params = {"rope_type": "llama3", "rope_theta": config["rope_theta"], "factor": float(factors.max()),
                  "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        plain = ModelConfig.from_dict(config, source=str(self.path))
        scaled = ModelConfig.from_dict({**config, "rope_parameters": params}, source=str(self.path))
        implied = rope_inv_freq(plain) / rope_inv_freq(scaled)
        if implied.shape != factors.shape or not torch.allclose(implied, factors, rtol=1e-4, atol=0):
            raise ValueError(f"{self.path}: {ROPE_FREQS} holds rope factors that are not Llama 3's scaling; "
                             "not supported")
        return params

    def resolve_dtype(self, dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
        """'auto': float32 on CPU, as for a folder; elsewhere the file's float type, or bfloat16 for
        a quantized file (float16's range is too narrow for some models' activations)."""
        if dtype != "auto":
            return parse_dtype(dtype)
        if device.type == "cpu":
            return torch.float32
        kinds = {t.tensor_type.name for t in self.reader.tensors if len(t.shape) > 1}
        return {frozenset({"F32"}): torch.float32, frozenset({"F16"}): torch.float16}.get(
            frozenset(kinds), torch.bfloat16)

    # -- tensors ------------------------------------------------------------------------------

    def headers(self) -> dict[str, tuple[Path, tuple[int, ...], str]]:
        """Hugging Face name -> (file, shape, dtype) as the loader validates a safetensors folder;
        the dtype is F32, what every tensor dequantizes to."""
        out = {}
        for t in self.reader.tensors:
            if t.name == ROPE_FREQS:
                continue
            out[self._hf_name(t.name)] = (self.path, tuple(int(d) for d in reversed(t.shape.tolist())), "F32")
        return out

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, float32 tensor), dequantized one at a time. llama.cpp reorders the
        rows of each llama q/k head for its interleaved rotary; undo it for the half-split one."""
        c = self.config
        for t in self.reader.tensors:
            if t.name == ROPE_FREQS:
                continue
            name, w = self._hf_name(t.name), torch.from_numpy(self._dequantize(t.name))
            if self.arch == "llama" and ".q_proj." in name:
                w = _unpermute(w, c.num_attention_heads)
            elif self.arch == "llama" and ".k_proj." in name:
                w = _unpermute(w, c.num_key_value_heads)
            yield name, w

    def _dequantize(self, name: str):
        from gguf import dequantize

        t = self.infos[name]
        w = dequantize(t.data, t.tensor_type)
        return w if w.flags.writeable else w.copy()  # F32 comes back as a view of the read-only map

    def _hf_name(self, name: str) -> str:
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name]
        m = _LAYER_TENSOR.fullmatch(name)
        if m is None or m[2] not in _LAYER_NAMES:
            raise ValueError(f"{self.path}: unexpected tensor {name!r} for GGUF architecture {self.arch!r}")
        return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{m[3]}"

    # -- tokenizer ----------------------------------------------------------------------------

    def tokenizer_parts(self) -> tuple[HFTokenizer, dict, dict]:
        """(tokenizer, tokenizer_config.json, generation_config.json) from the tokenizer metadata."""
        kind = self.meta("tokenizer.ggml.model", None)
        tokens = self.meta("tokenizer.ggml.tokens", None)
        if tokens is None:
            raise ValueError(f"{self.path}: GGUF metadata has no tokenizer (tokenizer.ggml.tokens)")
        types = self.meta("tokenizer.ggml.token_type", None) or [1] * len(tokens)
        merges = self.meta("tokenizer.ggml.merges", None)
        if kind == "gpt2":
            tok = _byte_level_bpe(tokens, merges or [], self.meta("tokenizer.ggml.pre", None))
        elif kind == "llama":
            scores = self.meta("tokenizer.ggml.scores", None) or [0.0] * len(tokens)
            tok = _sentencepiece_bpe(tokens, scores, merges, self.meta("tokenizer.ggml.add_space_prefix", True))
        else:
            raise ValueError(f"{self.path}: unsupported GGUF tokenizer {kind!r}; supported: gpt2 (byte-level BPE), "
                             "llama (SentencePiece BPE)")
        spelled = set(bytes_to_unicode().values()) if kind == "gpt2" else None
        # Control tokens (<|im_start|>) stay whole and are skipped in decoding; a control token
        # outside the byte alphabet of a byte-level vocabulary is a llama.cpp mislabel (as in
        # transformers). User-defined tokens (<think>) stay whole but are text.
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
                                if k == _CONTROL and (spelled is None or set(t) <= spelled)])
        vocab = tok.get_vocab()
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                        if k == _USER_DEFINED and t in vocab])

        ids = {key: self.meta(f"tokenizer.ggml.{key}_token_id", None) for key in ("bos", "eos", "unknown", "padding")}
        names = {k: tokens[i] for k, i in ids.items() if i is not None and 0 <= i < len(tokens)}
        add_bos = bool(self.meta("tokenizer.ggml.add_bos_token", kind == "llama")) and "bos" in names
        add_eos = bool(self.meta("tokenizer.ggml.add_eos_token", False)) and "eos" in names
        single = " ".join([*(["$bos"] if add_bos else []), "$A", *(["$eos"] if add_eos else [])])
        single = single.replace("$bos", names.get("bos", "")).replace("$eos", names.get("eos", ""))
        pair = single + " " + single.replace("$A", "$B")
        special = [(names[k], ids[k]) for k, on in (("bos", add_bos), ("eos", add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "model_max_length": self.config.max_position_embeddings,
                  "add_bos_token": add_bos, "add_eos_token": add_eos}
        for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
            if key in names:
                config[name] = names[key]
        template = self.meta("tokenizer.chat_template", None)
        if template:
            config["chat_template"] = template
        eos_ids = [i for i in (ids["eos"], self.meta("tokenizer.ggml.eot_token_id", None),
                               self.meta("tokenizer.ggml.eom_token_id", None)) if i is not None]
        eos_ids += [i for i, (t, k) in enumerate(zip(tokens, types)) if k == _CONTROL and t in _END_OF_GENERATION]
        eos_ids = list(dict.fromkeys(eos_ids))
        generation = {"bos_token_id": ids["bos"], "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
        return tok, config, {k: v for k, v in generation.items() if v not in (None, [])}


def _unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute` (convert_hf_to_gguf.py): rows [head, dim/2, 2] -> [head, 2, dim/2]."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> HFTokenizer:
    """GPT-2 style BPE, as transformers' GGUF loader builds it. Tokens stored as raw text instead of
    in the byte alphabet (some user-defined ones) are respelled into it."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                                 continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGITS_FIRST:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        if pre not in (None, "default", "gpt-2", "gpt2"):
            logger.warning("GGUF pre-tokenizer %r is not known here; splitting text as GPT-2 does", pre)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(tokens: list[str], scores: list[float], merges: list[str] | None,
                       add_space_prefix: bool) -> HFTokenizer:
    """SentencePiece BPE with byte fallback, as transformers' LlamaTokenizer. Files from
    SentencePiece models list no merges: they are rebuilt from the scores, best first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges] if merges else _merges_from_scores(vocab, dict(zip(tokens, scores)))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if add_space_prefix
                                                 else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if add_space_prefix else []))
    return tok


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """transformers' `generate_merges`: every split of a token into two tokens is a merge, ranked
    by the merged token's score (then the shorter left part first)."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def convert_gguf(path: str | Path, out: str | Path, dtype: torch.dtype = torch.float16,
                 config_dtype: torch.dtype | None = None) -> None:
    """Write a GGUF file out as a Hugging Face folder (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json with the chat template, generation_config.json), weights stored in `dtype`
    and config.json's dtype set to `config_dtype` (what an accelerator runs it in; default `dtype`)."""
    from safetensors.torch import save_file

    ckpt, out = open_gguf(path), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: w.to(dtype).contiguous() for name, w in ckpt.tensors()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    tok, tok_config, generation = ckpt.tokenizer_parts()
    tok.save(str(out / "tokenizer.json"))
    dtype_name = str(config_dtype or dtype).removeprefix("torch.")
    for name, obj in (("config.json", {**ckpt.hf_config, "dtype": dtype_name}),
                      ("tokenizer_config.json", tok_config), ("generation_config.json", generation)):
        with open(out / name, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
