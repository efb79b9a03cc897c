"""The Llama model family over a paged KV cache, its loader, tokenizer and demo checkpoint."""

from splitnode.model.attention import AttentionContext, PrefillChunk, attention
from splitnode.model.config import SUPPORTED_ARCHITECTURES, ModelConfig
from splitnode.model.demo import demo_model_path
from splitnode.model.llama import LlamaForCausalLM
from splitnode.model.loader import load_model
from splitnode.model.tokenizer import IncrementalDecoder, Tokenizer

__all__ = [
    "SUPPORTED_ARCHITECTURES", "AttentionContext", "IncrementalDecoder", "LlamaForCausalLM",
    "ModelConfig", "PrefillChunk", "Tokenizer", "attention", "demo_model_path", "load_model",
]
