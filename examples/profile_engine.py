"""Where the engine's time goes on one batch of requests: per step kind (prefill, decode, mixed),
per stage (scheduling, input preparation, the forward, logits and sampling, postprocess), and per
operator group (torch.profiler: GEMMs, attention, elementwise, copies).

    python examples/profile_engine.py                          # the bench's W1: 32 prompts 8..400, 32 new
    python examples/profile_engine.py --max-prompt-len 1024 --dtype bfloat16

The model is `splitnode bench --random-model`'s (hidden 512, 8 layers, GQA 8:2, vocab 4096) unless
--model; prompts are the bench's token-id prompts. One warm-up generate, then one timed generate
with the stages clocked, then one under torch.profiler (its own overhead makes that run slower:
read its shares, not its times).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

GROUPS = [  # (group, substrings of aten/mkldnn op names), first match wins
    ("GEMM (linears, lm head)", ("mkldnn", "linear", "aten::mm", "addmm", "matmul")),
    ("attention (bmm, softmax, SDPA)", ("bmm", "softmax", "scaled_dot_product", "flash_attention", "masked_fill",
                                        "cpu_paged_decode", "cpu_prefill")),
    ("elementwise (norm, rotary, SiLU, residual)", ("cpu_rms_norm", "cpu_rotary", "cpu_silu", "mul", "add",
                                                    "silu", "rsqrt", "pow", "mean", "neg", "cat", "sub",
                                                    "div", "exp", "sin", "cos")),
    ("copies and indexing", ("copy", "index", "gather", "scatter", "to_", "_to", "clone", "contiguous", "select",
                             "embedding", "fill", "empty", "zero")),
]


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other ops"


class Clock:
    """Wall time per (step kind, stage), by wrapping the engine's own methods."""

    def __init__(self, engine):
        self.t: dict[tuple[str, str], float] = defaultdict(float)
        self.steps: dict[str, int] = defaultdict(int)
        self.kind = "?"
        eng, runner = engine, engine.runner

        def wrap(obj, name, stage, set_kind=None):
            fn = getattr(obj, name)

            def timed(*a, **k):
                t0 = time.perf_counter()
                out = fn(*a, **k)
                if set_kind is not None:
                    self.kind = set_kind(out)
                    self.steps[self.kind] += 1
                self.t[(self.kind, stage)] += time.perf_counter() - t0
                return out
            setattr(obj, name, timed)

        def kind(batch) -> str:
            nd, n = batch.num_decodes, len(batch.seqs)
            return "decode" if nd == n else "prefill" if nd == 0 else "mixed"

        wrap(eng, "schedule", "schedule", kind)
        wrap(runner, "prepare", "prepare inputs")
        wrap(runner.model, "forward", "forward")
        wrap(runner.model, "compute_logits", "lm head")
        wrap(eng, "_append_tokens", "sample + postprocess")
        wrap(eng, "step", "whole step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a model folder (default: the bench's random Llama)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--min-prompt-len", type=int, default=8)
    ap.add_argument("--max-prompt-len", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=12, help="operators listed (default: %(default)s)")
    args = ap.parse_args()

    from splitnode import LLM, SamplingParams
    from splitnode.bench import make_prompts, random_model_path

    path = args.model or str(random_model_path())
    llm = LLM(path, dtype=args.dtype)
    prompts = make_prompts(llm.tokenizer, llm.engine.model_config.vocab_size, args.num_requests,
                           args.min_prompt_len, args.max_prompt_len, args.seed)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts, params)  # warm-up
    clock = Clock(llm.engine)
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    n_prompt, n_gen = sum(map(len, prompts)), len(prompts) * args.max_tokens
    print(f"{path}, {args.dtype}, {torch.get_num_threads()} threads; {len(prompts)} requests, "
          f"{n_prompt} prompt + {n_gen} generated tokens; {wall:.2f} s ({n_gen / wall:.0f} generated tok/s)")
    stages = ["schedule", "prepare inputs", "forward", "lm head", "sample + postprocess"]
    print(f"\n{'step kind':<9} {'steps':>5} {'step s':>7} " + " ".join(f"{s:>20}" for s in stages) + f" {'other':>8}")
    for k in ("prefill", "mixed", "decode"):
        if not clock.steps[k]:
            continue
        whole = clock.t[(k, "whole step")]
        parts = [clock.t[(k, s)] for s in stages]
        cells = " ".join(f"{p:>10.3f}s {p / whole:>7.1%}" for p in parts)
        print(f"{k:<9} {clock.steps[k]:>5} {whole:>7.3f} {cells} {whole - sum(parts):>7.3f}s")
    outside = wall - sum(clock.t[(k, "whole step")] for k in ("prefill", "mixed", "decode"))
    print(f"outside the steps (LLM.generate: requests in, detokenization, outputs): {outside:.3f} s ({outside / wall:.1%})")

    from torch.profiler import ProfilerActivity, profile, record_function

    from splitnode.kernels import cpu as cpu_kernels

    def labelled(name, fn):  # the C kernels are ctypes calls, which torch.profiler does not see
        def call(*a, **k):
            with record_function(f"splitnode::cpu_{name}"):
                return fn(*a, **k)
        return call

    for name in ("rms_norm", "rotary_qk_", "silu_and_mul", "paged_decode_attention", "prefill_attention"):
        setattr(cpu_kernels, name, labelled(name.rstrip("_").replace("_attention", ""), getattr(cpu_kernels, name)))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, params)
    events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::", "_C::", "splitnode"))]
    total = sum(e.self_cpu_time_total for e in events) or 1
    by_group: dict[str, float] = defaultdict(float)
    for e in events:
        by_group[group_of(e.key)] += e.self_cpu_time_total
    print("\noperators by group (self CPU time under torch.profiler, its own overhead included):")
    for g, t in sorted(by_group.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<46} {t / total:>6.1%}")
    print(f"top {args.top} operators:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"  {e.key:<46} {e.self_cpu_time_total / total:>6.1%} {e.count:>7} calls")


if __name__ == "__main__":
    main()
