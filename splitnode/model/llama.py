"""The Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) as one module over a flat token batch.

Parameter names follow the Hugging Face checkpoint, except that q/k/v and gate/up are fused into
`qkv_proj` and `gate_up_proj` (one matmul each); the loader fills the fused weights. Numerics follow
transformers: RMSNorm in float32, rotary frequencies and cos/sin in float32 cast to the model dtype.

The layers carry the residual stream beside the hidden states, as vLLM's do, so that each
sublayer's residual add is fused with the norm after it. On CUDA the elementwise work goes through
kernels/fused.py (add+RMSNorm, q/k norm and rotary in one launch, SiLU-and-mul): about 10 kernels
per decode layer instead of ~38 tiny ones, which bound small-model decode even under CUDA graphs
(G1). On the CPU they go through the C kernels of kernels/cpu.c (one pass each, rather than torch's
pass and fork/join per op), and elsewhere, or where those are not built, through the torch
references, the ops this module always ran.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from splitnode.kernels import cpu as cpu_kernels
from splitnode.kernels import fused
from splitnode.model.attention import AttentionContext, attention, use_triton
from splitnode.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x); with `residual`, (rms_norm(residual + x), residual + x): the add of the
        sublayer before, in the same kernel."""
        if use_triton(x):
            if residual is None:
                return fused.rms_norm_triton(x, self.weight, self.eps)
            return fused.add_rms_norm_triton(x, residual, self.weight, self.eps)
        if cpu_kernels.supports(x) and x.dim() == 2:
            return cpu_kernels.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return fused.rms_norm_ref(x, self.weight, self.eps)
        return fused.add_rms_norm_ref(x, residual, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Float32 inverse frequencies, computed as transformers computes them (`default` and `llama3`)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (
        torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


class RotaryEmbedding(nn.Module):
    """cos/sin for the batch's positions, computed per forward from float32 frequencies: exact,
    and no per-position table to hold for 128k-position models."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute inv_freq in float32 on its device (after `to_empty` or a dtype cast)."""
        self.inv_freq = rope_inv_freq(self.config, self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        qw, kw, eps = (None, None, 0.0) if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight,
                                                                     self.q_norm.eps)
        if use_triton(x):  # in place on the qkv output, whose strided views the later kernels read as they are
            fused.rotary_qk_triton(q, k, cos, sin, qw, kw, eps)
        elif cpu_kernels.supports(x):  # the same, in place
            cpu_kernels.rotary_qk_(q, k, cos, sin, qw, kw, eps)
        else:
            q, k = fused.rotary_ref(q, cos, sin, qw, eps), fused.rotary_ref(k, cos, sin, kw, eps)
        return self.o_proj(attention(q, k, v, ctx, self.layer_idx, self.scale))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if use_triton(x):
            return self.down_proj(fused.silu_and_mul_triton(gate_up))
        if cpu_kernels.supports(x):
            return self.down_proj(cpu_kernels.silu_and_mul(gate_up))
        return self.down_proj(fused.silu_and_mul_ref(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(the MLP's output, the residual stream before it is added): the next layer's norm (or
        the final one) adds them, fused. The first layer gets residual None: x is the embedding."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, cos, sin, ctx), residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, ctx)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        # Tied embeddings: no lm_head module, compute_logits reads the embedding (a shared Parameter
        # would be untied again by `to_empty`).
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """input_ids/positions [T] -> hidden states [T, hidden_size], final norm applied."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden_size] -> float32 logits [n, vocab_size]."""
        if self.lm_head is not None:  # an nn.Linear, or on the CPU its packed form (cpu_linear.py)
            return self.lm_head(hidden).float()
        return F.linear(hidden, self.model.embed_tokens.weight).float()
