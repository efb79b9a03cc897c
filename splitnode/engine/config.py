"""Engine configuration: one dataclass shared by the CLI, the library and the tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class EngineConfig:
    """How one device's engine runs. `model=None` is the demo model."""

    model: str | None = None
    device: str = "cpu"
    dtype: str = "auto"  # the checkpoint's dtype on CUDA; on CPU bf16 for half weights where bf16 GEMMs are faster, else fp32
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: sized from kv_cache_gib / gpu_memory_utilization
    kv_cache_gib: float | None = None  # KV pool size; default 1 GiB on CPU
    gpu_memory_utilization: float = 0.9  # CUDA: share of device memory for weights + KV
    max_num_batched_tokens: int = 2048  # token budget of one batch (the paper's prompt budget)
    max_num_seqs: int = 256
    max_model_len: int | None = None  # default: the model's, capped by the KV pool
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode
    max_preemptions: int = 4  # per request; past it a request is no longer picked as the victim
    decode_max_skips: int = 2  # mixed batches: a decode left out this many batches goes before prompts
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{type(self).__name__}.{name} must be {what}, got {getattr(self, name)!r}")

        need(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0, "block_size", "a power of two")
        need(self.num_kv_blocks is None or self.num_kv_blocks > 0, "num_kv_blocks", "None or > 0")
        need(self.kv_cache_gib is None or self.kv_cache_gib > 0, "kv_cache_gib", "None or > 0")
        need(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "in (0, 1]")
        need(self.max_num_batched_tokens > 0, "max_num_batched_tokens", "> 0")
        need(self.max_num_seqs > 0, "max_num_seqs", "> 0")
        need(self.max_model_len is None or self.max_model_len > 0, "max_model_len", "None or > 0")
        need(self.max_preemptions >= 0, "max_preemptions", ">= 0")
        need(self.decode_max_skips >= 0, "decode_max_skips", ">= 0")
        need(self.dtype in ("auto", "float32", "float16", "bfloat16"), "dtype",
             "one of auto, float32, float16, bfloat16")
        check_device(self.device)

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}")
        return cls(**kwargs)


def check_device(device) -> None:
    """A device the engine runs on (cpu, cuda, cuda:N), checked before the model loads: on a torch
    without CUDA, torch's own answer is an AssertionError from deep inside the first allocation."""
    name = str(device)
    kind, sep, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (sep and not index.isdigit()):
        raise ValueError(f"EngineConfig.device must be cpu, cuda or cuda:N, got {name!r}")
    if kind == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            why = "no CUDA device is visible" if torch.version.cuda else f"torch {torch.__version__} is built without CUDA"
            raise ValueError(f"EngineConfig.device is {name!r} but {why}; use cpu")
        if sep and int(index) >= count:
            raise ValueError(f"EngineConfig.device is {name!r} but only {count} CUDA device(s) are visible")
