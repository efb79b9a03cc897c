"""bfloat16 on the CPU against transformers in bfloat16 on the same folder (issue 11). bf16 cannot
match to 1e-4 as float32 does (test_parity.py): each side rounds its own sums. The thresholds say
what bf16 parity means here: logprobs within 0.1 on average and never further from transformers'
bf16 than transformers' bf16 is from its own float32, and the greedy token equal to transformers'
argmax at 90% of the decode positions (teacher-forced on splitnode's tokens, so each position is
compared on the same prefix). The test models' weights are large (std 0.5) and their activations
with them, the hardest case for bf16: transformers' own bf16 differs from its float32 by up to 2
nats at some positions."""

from __future__ import annotations

import pytest
import torch
from test_parity import CHECKPOINTS, prompts

from splitnode import LLM, SamplingParams
from splitnode.model.cpu_linear import bf16_is_faster, can_pack, cpu_has_native_bf16

MAX_MEAN_LOGPROB_DIFF = 0.1
MIN_ARGMAX_AGREEMENT = 0.9


def reference(path, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("name", ["llama-tied-bias", "qwen2", "qwen3"])
def test_bf16_logprobs_and_greedy_tokens_agree_with_transformers_bf16(name, make_hf_checkpoint):
    arch, overrides = CHECKPOINTS[name]
    path = make_hf_checkpoint(arch, **overrides)
    llm = LLM(str(path), dtype="bfloat16", num_kv_blocks=128)
    assert llm.engine.dtype == torch.bfloat16
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=5, prompt_logprobs=5, ignore_eos=True)
    outs = llm.generate(prompts(), params)
    ours, own_drift, agree, num_decodes = [], [], 0, 0
    for prompt, out in zip(prompts(), outs):
        ids = prompt + out.token_ids
        ref, ref32 = reference(path, ids, torch.bfloat16), reference(path, ids, torch.float32)
        scored = [(i - 1, e) for i, e in enumerate(out.prompt_logprobs) if e is not None]
        scored += [(len(prompt) - 1 + j, e) for j, e in enumerate(out.logprobs)]
        for pos, entry in scored:
            for t, lp in entry.items():
                ours.append(abs(lp.logprob - ref[pos, t].item()))
                own_drift.append(abs(ref[pos, t].item() - ref32[pos, t].item()))
        for j, tok in enumerate(out.token_ids):
            agree += tok == ref[len(prompt) - 1 + j].argmax().item()
            num_decodes += 1
    mean, drift = sum(ours) / len(ours), sum(own_drift) / len(own_drift)
    assert mean <= MAX_MEAN_LOGPROB_DIFF and mean <= drift, (name, mean, drift)
    assert agree >= MIN_ARGMAX_AGREEMENT * num_decodes, (name, agree, num_decodes)
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


def test_auto_dtype_on_the_cpu_is_bf16_only_for_half_precision_weights_on_a_bf16_cpu(make_hf_checkpoint, tmp_path):
    """fp32 weights stay the exact float32 path; bf16 weights run in bf16 where the CPU has the
    instructions and its bf16 GEMMs are measured faster (this machine decides which way the second
    assertion goes)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from splitnode.model import load_model

    fp32 = make_hf_checkpoint("LlamaForCausalLM")
    assert load_model(fp32, "cpu")[0].lm_head.weight.dtype == torch.float32
    half = tmp_path / "bf16"
    shutil.copytree(fp32, half)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(half / "model.safetensors").items()}
    save_file(tensors, half / "model.safetensors", metadata={"format": "pt"})
    want = torch.bfloat16 if cpu_has_native_bf16() and bf16_is_faster() else torch.float32
    assert load_model(half, "cpu")[0].lm_head.weight.dtype == want
    assert load_model(half, "cpu", dtype="float32")[0].lm_head.weight.dtype == torch.float32


def test_a_bf16_engine_packs_its_linears_or_multiplies_prefills_in_float32(make_hf_checkpoint):
    """Where bf16 GEMMs are measured faster, oneDNN's packed ones (a tied head gets a packed copy);
    where they are slower, UpcastLinear (this machine decides which branch runs)."""
    from splitnode.model.cpu_linear import PackedLinear, UpcastLinear

    llm = LLM(str(make_hf_checkpoint("LlamaForCausalLM", tie_word_embeddings=True, attention_bias=True)),
              dtype="bfloat16", num_kv_blocks=64)
    model = llm.engine.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    if not bf16_is_faster():
        assert isinstance(qkv, UpcastLinear) and model.lm_head is None
    elif can_pack(torch.bfloat16):
        assert isinstance(model.lm_head, PackedLinear) and isinstance(qkv, PackedLinear)
    else:
        pytest.skip("bf16 faster here without oneDNN's packing: linears stay torch's")
