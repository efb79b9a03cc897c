"""Offline batched generation with the library API, on the demo model (no download needed).

    python examples/generate.py
    python examples/generate.py path/to/hf-folder      # a local Llama / Mistral / Qwen2 / Qwen3 folder
"""

import sys

from splitnode import LLM, SamplingParams

model = sys.argv[1] if len(sys.argv) > 1 else None  # None: the demo model
llm = LLM(model, device="cpu", dtype="auto")

prompts = ["Hello, my name is", "The capital of France is", [1, 2, 3]]  # text or token ids
greedy = SamplingParams(max_tokens=16, temperature=0.0, logprobs=2)
for out in llm.generate(prompts, greedy):
    first = out.logprobs[0][out.token_ids[0]]
    print(f"{out.prompt or out.prompt_token_ids!r}\n"
          f"  -> {out.text!r}\n"
          f"  {len(out.token_ids)} tokens, finish_reason={out.finish_reason}, "
          f"first token logprob {first.logprob:.3f} (rank {first.rank})")

# Sampling with a per-request seed gives the same tokens on every run, whatever the batch.
sampled = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=1234)
a = llm.generate("Once upon a time", sampled)[0]
b = llm.generate(["Once upon a time", "Another prompt in the batch"], sampled)[0]
assert a.token_ids == b.token_ids
print(f"seeded sample: {a.text!r}")

# Chat models: the folder's chat template (tokenizer_config.json) is applied.
reply = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(max_tokens=8, temperature=0.0))
print(f"chat reply: {reply.text!r}")
