"""Engine fixtures: tiny random-weight checkpoints (tests/conftest.py writes them with transformers)
and LLMs over them with a small KV pool, so a test never allocates the default 1 GiB."""

from __future__ import annotations

import pytest
import torch

from splitnode import LLM

# The tiny test models' matmuls are microseconds long: one thread runs them fastest, and OpenMP's
# second thread spin-waits for milliseconds whenever another process holds the other core.
torch.set_num_threads(1)


@pytest.fixture
def make_llm(make_hf_checkpoint):
    def make(arch: str = "LlamaForCausalLM", overrides: dict | None = None, **engine_kwargs) -> LLM:
        engine_kwargs.setdefault("num_kv_blocks", 128)
        path = make_hf_checkpoint(arch, **(overrides or {}))
        return LLM(str(path), device="cpu", dtype="float32", **engine_kwargs)

    return make


@pytest.fixture(scope="module")
def qwen3_llm(make_hf_checkpoint):
    """A default-sized LLM over the Qwen3 checkpoint, shared by a module's reference runs."""
    return LLM(str(make_hf_checkpoint("Qwen3ForCausalLM")), dtype="float32", num_kv_blocks=128)
