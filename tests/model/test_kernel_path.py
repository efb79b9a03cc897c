"""The model's CUDA path run on CPU tensors under the Triton interpreter (the switch
`attention.USE_TRITON` forced on) against its torch path: the fused add+RMSNorm, q/k norm and
rotary, SiLU-and-mul (G1), the decode kernel writing into the layer's output, and every prefill
chunk in one launch (K3), on the demo model and random Qwen-style checkpoints, over a batch of
decodes, a chunk after an earlier one and a whole prompt."""

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see tests/kernel/test_kernels.py)

import pytest
import torch
from model_helpers import empty_kv_caches

from splitnode.model import AttentionContext, PrefillChunk, demo_model_path, load_model

# the module, not the function of its name that splitnode.model exports
attention_module = importlib.import_module("splitnode.model.attention")
from splitnode.kernels import cpu as cpu_kernels  # noqa: E402

pytest.importorskip("triton")

BLOCK = 8
# (prompt length, tokens prefilled before the batch): two decodes, a chunk after an earlier one,
# and a whole prompt
SEQS = [(11, 11), (19, 19), (23, 9), (14, 0)]


def _slots(seq: int, start: int, end: int) -> torch.Tensor:
    """Sequence i's blocks are 4i+3, 4i+2, ... (out of order), so a wrong table shows."""
    pos = torch.arange(start, end)
    return (4 * seq + 3 - pos // BLOCK) * BLOCK + pos % BLOCK


def _mixed_batch(model, config, kernels: bool, monkeypatch):
    """Prefills the earlier tokens (three whole prompts in one batch: the prefill kernel's slots a
    view of slot_mapping), then runs one flat batch (two decodes, a second chunk, a whole prompt:
    slots joined per chunk), both on the path asked for. Returns the batch's logits and the cache."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 250, (n + 1,), generator=g) for n, _ in SEQS]
    caches = empty_kv_caches(config, num_blocks=4 * len(SEQS), block_size=BLOCK, fill=1e4)
    before = [(i, done) for i, (_, done) in enumerate(SEQS) if done]
    monkeypatch.setattr(attention_module, "USE_TRITON", kernels)
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)  # the torch path is the references, not the C kernels
    with torch.inference_mode():
        ids = torch.cat([prompts[i][:done] for i, done in before])
        pos = torch.cat([torch.arange(done) for _, done in before])
        chunks, row = [], 0
        for i, done in before:
            chunks.append(PrefillChunk(row, done, done, None))
            row += done
        model(ids, pos, AttentionContext(caches, torch.cat([_slots(i, 0, d) for i, d in before]), prefills=chunks))
    # the batch: sequences 0 and 1 decode their next token, 2 and 3 prefill the rest of their prompt
    spans = [(11, 12), (19, 20), (9, 23), (0, 14)]
    ids = torch.cat([prompts[i][a:b] for i, (a, b) in enumerate(spans)])
    pos = torch.cat([torch.arange(a, b) for a, b in spans])
    slots = torch.cat([_slots(i, a, b) for i, (a, b) in enumerate(spans)])
    tables = torch.tensor([[3, 2, 1, 0], [7, 6, 5, 4]], dtype=torch.int32)
    ctx = AttentionContext(caches, slots, num_decodes=2, block_tables=tables,
                           context_lens=torch.tensor([12, 20], dtype=torch.int32),
                           prefills=[PrefillChunk(2, 14, 23, _slots(2, 0, 23)), PrefillChunk(16, 14, 14, None)])
    with torch.inference_mode():
        logits = model.compute_logits(model(ids, pos, ctx))
    return logits, caches


CHECKPOINTS = {
    "demo": lambda make, tmp: demo_model_path(tmp),
    # q/k norms (one launch with the rotary), head_dim apart from hidden / heads, GQA 4:1
    "qwen3": lambda make, tmp: make("Qwen3ForCausalLM", head_dim=32, num_attention_heads=8, num_key_value_heads=2),
    "qwen2": lambda make, tmp: make("Qwen2ForCausalLM"),  # q/k/v bias, GQA 2:1
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_the_kernel_path_gives_the_torch_paths_logits_and_cache(name, make_hf_checkpoint, tmp_path, monkeypatch):
    model, config = load_model(CHECKPOINTS[name](make_hf_checkpoint, tmp_path), "cpu")
    ref, ref_caches = _mixed_batch(model, config, False, monkeypatch)
    got, caches = _mixed_batch(model, config, True, monkeypatch)
    assert ref.std() > 0.5  # logits with margins, so the comparison means something
    torch.testing.assert_close(got.log_softmax(-1), ref.log_softmax(-1), atol=2e-4, rtol=0)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    for (k, v), (k_ref, v_ref) in zip(caches, ref_caches):  # K/V stored after the fused q/k norm and rotary
        torch.testing.assert_close(k, k_ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(v, v_ref, atol=2e-5, rtol=1e-5)


def test_the_switch_picks_the_kernels_on_cuda_tensors_only_unless_forced(monkeypatch):
    x = torch.zeros(2, 4)
    monkeypatch.setattr(attention_module, "USE_TRITON", None)
    assert not attention_module.use_triton(x)
    monkeypatch.setattr(attention_module, "USE_TRITON", True)
    assert attention_module.use_triton(x)


def test_a_decode_layer_on_the_kernel_path_is_four_gemms_and_six_launches(tmp_path, monkeypatch):
    """G1: the norms, rotary and SiLU-and-mul run as the fused kernels, none of their torch ops
    runs, and attention writes straight into the layer's output. Triton launches are counted
    through the kernels' pre-run hooks; torch ops through a dispatch mode (which also sees the
    interpreter's own bookkeeping: empty/set_/copy_ of the launch arguments, left out here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from splitnode.kernels import fused, paged_attention, store_kv

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model, config = load_model(demo_model_path(tmp_path), "cpu")
    layer, b = model.model.layers[1], 3
    caches = empty_kv_caches(config, num_blocks=8, block_size=BLOCK, fill=0.5)
    cos, sin = model.model.rotary_emb(torch.tensor([9, 4, 12]), torch.float32)
    ctx = AttentionContext(caches, torch.tensor([9, 20, 44]), num_decodes=b,
                           block_tables=torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32),
                           context_lens=torch.tensor([10, 5, 13], dtype=torch.int32))
    x, residual = torch.randn(b, config.hidden_size), torch.randn(b, config.hidden_size)
    kernels = {"rms_norm": fused._rms_norm_kernel, "rotary": fused._rotary_kernel, "silu_and_mul": fused._silu_and_mul_kernel,
               "store_kv": store_kv._store_kv_kernel, "decode": paged_attention._paged_decode_kernel}
    launched = []
    hooks = {name: (lambda *a, _name=name, **k: launched.append(_name)) for name in kernels}
    for name, kernel in kernels.items():
        kernel.add_pre_run_hook(hooks[name])
    elementwise = {"mul", "add", "pow", "mean", "rsqrt", "neg", "cat", "silu", "softmax", "matmul", "to", "copy_"}
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    try:
        for on in (False, True):
            monkeypatch.setattr(attention_module, "USE_TRITON", on)
            launched.clear()
            with torch.inference_mode(), Ops() as ops:
                layer(x, residual, cos, sin, ctx)
            bookkeeping = {"empty", "new_empty", "set_", "copy_"} if on else set()
            names = [n for n in ops.names if not (on and n in bookkeeping)]
            if on:
                assert launched == ["rms_norm", "rotary", "store_kv", "decode", "rms_norm", "silu_and_mul"]
                assert names.count("linear") == 4 and not set(names) & elementwise, names
            else:
                assert not launched and len(set(names) & elementwise) >= 8
    finally:
        for name, kernel in kernels.items():
            kernel.pre_run_hooks.remove(hooks[name])
