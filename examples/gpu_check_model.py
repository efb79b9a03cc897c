"""GPU check of the model against transformers on CUDA: random tiny checkpoints of three
architectures (init std 0.5), in float32 and bfloat16, prefill then one paged decode step; prints
the largest log-probability difference and the argmax agreement (docs/gpu-checks.md).

    python examples/gpu_check_model.py

Needs a CUDA GPU and transformers; without a GPU it says so in one line and exits 0.
"""

import sys
import tempfile
from pathlib import Path

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA: examples/gpu_check_model.py needs a GPU; nothing to check")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import _write_hf_checkpoint
    from transformers import AutoModelForCausalLM

    from splitnode.model import AttentionContext, PrefillChunk, demo_model_path, load_model

    dev = "cuda"
    ids = [256] + list(b"The quick brown fox jumps over the lazy dog, 12345 times!")
    t = len(ids)
    cases = {
        "llama3": ("LlamaForCausalLM", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
        "qwen3": ("Qwen3ForCausalLM", dict(head_dim=32)),
        "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    }
    for name, (arch, kw) in cases.items():
        path = _write_hf_checkpoint(Path(tempfile.mkdtemp()), arch, **kw)
        for dtype in (torch.float32, torch.bfloat16):
            model, cfg = load_model(path, dev, dtype)
            shape = (8, 16, cfg.num_key_value_heads, cfg.head_dim)
            caches = [(torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev)) for _ in range(cfg.num_hidden_layers)]
            x = torch.tensor(ids, device=dev)
            with torch.inference_mode():
                h = model(x[:-1], torch.arange(t - 1, device=dev), AttentionContext(caches, torch.arange(t - 1, device=dev), prefills=[PrefillChunk(0, t - 1, t - 1, None)]))
                lp = model.compute_logits(h)
                h = model(x[-1:], torch.tensor([t - 1], device=dev), AttentionContext(caches, torch.tensor([t - 1], device=dev), num_decodes=1,
                          block_tables=torch.arange(8, device=dev, dtype=torch.int32)[None], context_lens=torch.tensor([t], device=dev, dtype=torch.int32)))
                ld = model.compute_logits(h)
            ours = torch.cat([lp, ld]).log_softmax(-1)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev)
            with torch.no_grad():
                ref = hf(x[None]).logits[0].float().log_softmax(-1)
            diff = (ours - ref).abs().max().item()
            agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
            print(f"{name} {dtype}: max|dlogp|={diff:.2e} argmax agree={agree:.3f} param dtype={model.model.embed_tokens.weight.dtype}")
    p = demo_model_path(tempfile.mkdtemp())
    m, c = load_model(p, dev)
    print("demo auto dtype on cuda:", m.lm_head.weight.dtype, m.model.rotary_emb.inv_freq.dtype, m.model.rotary_emb.inv_freq.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
