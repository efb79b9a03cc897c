"""The model's shape, read once from a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {value}; use float32, float16 or bfloat16")
        return value
    name = value.removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {value!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict | None = None  # None (plain RoPE) or a "llama3" parameter dict
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    o_proj_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rotary (Qwen3)
    dtype: torch.dtype | None = None  # the checkpoint's dtype, when config.json says it
    sliding_window: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(
                f"config: rms_norm_eps and rope_theta must be positive, got {self.rms_norm_eps}, {self.rope_theta}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"config: sliding_window must be positive, got {self.sliding_window}")

    @property
    def max_model_len(self) -> int:
        """Longest context served exactly. Sliding-window attention is not implemented; within the
        window it equals full attention, so contexts are capped at the window instead."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from a model folder (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config.json at {file}")
        with open(file) as f:
            hf = json.load(f)
        return cls.from_dict(hf, source=str(file))

    @classmethod
    def from_dict(cls, hf: dict, source: str = "config.json") -> ModelConfig:
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: unsupported hidden_act {hf['hidden_act']!r}; only 'silu' is implemented")
        if hf.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported")

        def need(key):
            if hf.get(key) is None:
                raise ValueError(f"{source}: missing required field {key!r}")
            return hf[key]

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        head_dim = hf.get("head_dim") or (hidden // heads if heads and hidden % heads == 0 else None)
        if head_dim is None:
            raise ValueError(
                f"{source}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) "
                "and head_dim is not given")
        rope_theta, rope_scaling = _parse_rope(hf, source)

        is_qwen = arch.startswith("Qwen")
        sliding_window = hf.get("sliding_window")
        if is_qwen and not hf.get("use_sliding_window", False):
            sliding_window = None  # Qwen writes a window it does not use unless asked to
        dtype = hf.get("dtype") or hf.get("torch_dtype")
        attention_bias = True if arch == "Qwen2ForCausalLM" else bool(hf.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=need("max_position_embeddings"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            # Llama and Qwen3 put the same bias flag on o_proj; Qwen2 biases q/k/v only.
            o_proj_bias=attention_bias and arch != "Qwen2ForCausalLM",
            qk_norm=arch == "Qwen3ForCausalLM",
            dtype=parse_dtype(dtype) if dtype else None,
            sliding_window=sliding_window,
        )


def _parse_rope(hf: dict, source: str) -> tuple[float, dict | None]:
    """transformers 5 writes `rope_parameters` (with rope_theta inside); older configs write
    `rope_theta` and `rope_scaling` at top level. Accept both."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor is not supported")
    if kind == "default":
        return float(theta), None
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in params]
        if missing:
            raise ValueError(f"{source}: llama3 rope scaling is missing {missing}")
        return float(theta), {"rope_type": "llama3", **{k: params[k] for k in keys}}
    raise ValueError(f"{source}: unsupported rope scaling type {kind!r}; supported: default, llama3")
