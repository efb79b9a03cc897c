"""Load a Hugging Face folder (config.json + safetensors) or a GGUF file into `LlamaForCausalLM`.

Every tensor the config implies is checked against the safetensors headers (or the GGUF tensor
table) before anything is allocated on the device, so a bad checkpoint fails in milliseconds with
the file and tensor named.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from splitnode.model.config import ModelConfig, parse_dtype
from splitnode.model.cpu_linear import bf16_is_faster, cpu_has_native_bf16
from splitnode.model.gguf import is_gguf_file
from splitnode.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# Checkpoint tensors that carry nothing the model needs (old checkpoints saved rotary buffers).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class _Target:
    param: str  # parameter name in LlamaForCausalLM
    offset: int  # first row of this tensor inside the (possibly fused) parameter
    shape: tuple[int, ...]


def expected_tensors(config: ModelConfig) -> dict[str, _Target]:
    """Every checkpoint tensor the config implies, and where it goes in the model."""
    c = config
    hidden, inter, dim = c.hidden_size, c.intermediate_size, c.head_dim
    q_size, kv_size = c.num_attention_heads * dim, c.num_key_value_heads * dim
    out = {
        "model.embed_tokens.weight": _Target("model.embed_tokens.weight", 0, (c.vocab_size, hidden)),
        "model.norm.weight": _Target("model.norm.weight", 0, (hidden,)),
    }
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = _Target("lm_head.weight", 0, (c.vocab_size, hidden))
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        for name, offset, rows in (("q_proj", 0, q_size), ("k_proj", q_size, kv_size),
                                   ("v_proj", q_size + kv_size, kv_size)):
            out[f"{attn}{name}.weight"] = _Target(f"{attn}qkv_proj.weight", offset, (rows, hidden))
            if c.attention_bias:
                out[f"{attn}{name}.bias"] = _Target(f"{attn}qkv_proj.bias", offset, (rows,))
        out[f"{attn}o_proj.weight"] = _Target(f"{attn}o_proj.weight", 0, (hidden, q_size))
        if c.o_proj_bias:
            out[f"{attn}o_proj.bias"] = _Target(f"{attn}o_proj.bias", 0, (hidden,))
        if c.qk_norm:
            out[f"{attn}q_norm.weight"] = _Target(f"{attn}q_norm.weight", 0, (dim,))
            out[f"{attn}k_norm.weight"] = _Target(f"{attn}k_norm.weight", 0, (dim,))
        mlp = p + "mlp."
        out[f"{mlp}gate_proj.weight"] = _Target(f"{mlp}gate_up_proj.weight", 0, (inter, hidden))
        out[f"{mlp}up_proj.weight"] = _Target(f"{mlp}gate_up_proj.weight", inter, (inter, hidden))
        out[f"{mlp}down_proj.weight"] = _Target(f"{mlp}down_proj.weight", 0, (hidden, inter))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{p}{norm}.weight"] = _Target(f"{p}{norm}.weight", 0, (hidden,))
    return out


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder: the sharded index's, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index} names {file.name}, which is missing from {path}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """tensor name -> (file, shape, safetensors dtype), from the headers only."""
    found: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                found[name] = (file, tuple(sl.get_shape()), sl.get_dtype())
    return found


def validate_checkpoint(path: Path, config: ModelConfig, headers: dict, source: str = "config.json") -> None:
    expected = expected_tensors(config)
    for name, target in expected.items():
        if name not in headers:
            raise ValueError(
                f"checkpoint {path} is missing tensor {name!r} (expected shape {list(target.shape)} "
                f"for {config.architecture})")
        file, shape, dtype = headers[name]
        if shape != target.shape:
            raise ValueError(
                f"{file}: tensor {name!r} has shape {list(shape)}, but {source} implies "
                f"{list(target.shape)}")
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has dtype {dtype}; expected F32, F16 or BF16")
    extra = sorted(set(headers) - set(expected))
    ignorable = [n for n in extra if _IGNORED.match(n) or (n == "lm_head.weight" and config.tie_word_embeddings)]
    if ignorable:
        logger.warning("%s: ignoring %d tensor(s) the model does not use: %s", path, len(ignorable),
                       ", ".join(ignorable[:4]))
    unknown = [n for n in extra if n not in ignorable]
    if unknown:
        file = headers[unknown[0]][0]
        raise ValueError(
            f"{file}: unexpected tensor {unknown[0]!r} ({len(unknown)} unexpected in all) for "
            f"{config.architecture} as configured in {source}")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, config: ModelConfig, headers: dict) -> torch.dtype:
    """'auto': the checkpoint's dtype on an accelerator. On the CPU, bfloat16 where the weights are
    stored in half precision (bf16 or fp16), the CPU computes bf16 natively (AVX-512 BF16 or AMX)
    and its bf16 GEMMs are measured faster than float32's (`bf16_is_faster`): such weights lose
    nothing, and the engine runs 1.8x faster on a Zen 4 (BENCHMARKS.md, "CPU engine"). Float32
    otherwise: float32 checkpoints stay the exact path, a CPU without bf16 instructions would
    emulate it, and an Intel Xeon without AMX runs bf16 GEMMs slower than float32."""
    if dtype != "auto":
        return parse_dtype(dtype)
    if device.type == "cpu":
        stored = _SAFETENSORS_DTYPES[headers["model.embed_tokens.weight"][2]]
        return torch.bfloat16 if stored != torch.float32 and cpu_has_native_bf16() and bf16_is_faster() else torch.float32
    if config.dtype is not None:
        return config.dtype
    return _SAFETENSORS_DTYPES[headers["model.embed_tokens.weight"][2]]


def resolve_model_path(model: str | None) -> Path:
    """What `--model` / `LLM(model)` names: None is the demo model, "smollm2" the SmolLM2 demo
    (unless a path of that name exists), else a Hugging Face folder or a .gguf file."""
    if model is None:
        from splitnode.model.demo import demo_model_path

        return demo_model_path()
    path = Path(model).expanduser()
    if model == "smollm2" and not path.exists():
        from splitnode.model.smollm2 import smollm2_model_path

        return smollm2_model_path()
    if path.is_dir() or is_gguf_file(path):
        return path
    raise FileNotFoundError(
        f"model not found: {path} (give a local Hugging Face folder with config.json, *.safetensors and "
        "tokenizer.json, a .gguf file, or 'smollm2'; no model at all runs the demo model)")


@torch.no_grad()
def load_model(path: str | Path, device: str | torch.device, dtype: str | torch.dtype = "auto"
               ) -> tuple[LlamaForCausalLM, ModelConfig]:
    path = Path(path)
    device = torch.device(device)
    if is_gguf_file(path):
        from splitnode.model.gguf import open_gguf

        gguf = open_gguf(path)
        validate_checkpoint(path, gguf.config, gguf.headers(), source="its GGUF metadata")
        return _build(gguf.config, device, gguf.resolve_dtype(dtype, device), gguf.tensors()), gguf.config
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    config = ModelConfig.from_hf(path)
    headers = read_headers(checkpoint_files(path))
    validate_checkpoint(path, config, headers)
    dtype = resolve_dtype(dtype, device, config, headers)

    def tensors():
        by_file: dict[Path, list[str]] = {}
        for name in expected_tensors(config):
            by_file.setdefault(headers[name][0], []).append(name)
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in names:
                    yield name, f.get_tensor(name)

    return _build(config, device, dtype, tensors()), config


def _build(config: ModelConfig, device: torch.device, dtype: torch.dtype, tensors) -> LlamaForCausalLM:
    """The model on `device` in `dtype`, filled from (checkpoint name, tensor) pairs; names the
    model does not use (validated as ignorable) are skipped."""
    # Build on meta, then allocate uninitialised storage on the device: no random init to throw away.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.model.rotary_emb.reset_buffers()
    params = dict(model.named_parameters())
    targets = expected_tensors(config)
    for name, tensor in tensors:
        if (target := targets.get(name)) is not None:
            params[target.param].data.narrow(0, target.offset, target.shape[0]).copy_(tensor)
    model.requires_grad_(False)
    return model.eval()
