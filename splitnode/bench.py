"""Throughput of the engine against Hugging Face transformers on the same requests.

Both run the same token-id prompts from the same model folder on the same device in float32,
greedy, with the same number of new tokens (EOS ignored), after one warm-up each. The greedy
outputs are compared request by request. transformers is a test dependency only: it is imported
here, inside the benchmark, never by the engine.

    python -m splitnode.bench                       # 32 concurrent requests on the demo model
    splitnode bench --baseline sequential           # transformers one request at a time
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass

DESCRIPTION = (
    "Run the same requests through splitnode (LLM.generate, all at once) and through transformers' "
    "generate (batched with left padding, or one request at a time), greedy, float32, the same "
    "number of new tokens; print tokens/s for both, their ratio, and how many requests gave "
    "identical tokens. Exits 1 when fewer than --min-agreement of the requests agree.")


@dataclass
class Result:
    name: str
    times: list[float]  # one per repeat
    num_prompt_tokens: int
    outputs: list[list[int]]

    @property
    def seconds(self) -> float:
        """The best repeat, as timeit reports: the run least disturbed by the rest of the machine."""
        return min(self.times)

    @property
    def median_seconds(self) -> float:
        return sorted(self.times)[len(self.times) // 2]

    @property
    def num_generated(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.num_generated / self.seconds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local Hugging Face model folder, .gguf file or smollm2; omitted: the demo model (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device for both (default: %(default)s)")
    p.add_argument("--num-requests", type=int, default=32, help="concurrent requests (default: %(default)s)")
    p.add_argument("--min-prompt-len", type=int, default=16, help="shortest prompt in tokens (default: %(default)s)")
    p.add_argument("--max-prompt-len", type=int, default=1024,
                   help="longest prompt in tokens; prompt lengths are drawn uniformly, as mixed as real traffic, "
                        "whose median prompt is ~1000 tokens in the Azure LLM traces (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64,
                   help="new tokens per request, EOS ignored (default: %(default)s)")
    p.add_argument("--min-tokens", type=int, default=None,
                   help="draw each request's new-token count from [--min-tokens, --max-tokens] (seeded), as "
                        "real requests differ; transformers' batched generate then runs every row to the "
                        "longest and keeps each request's own count (default: all --max-tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompt lengths and tokens (default: %(default)s)")
    p.add_argument("--baseline", choices=["batched", "sequential"], default="batched",
                   help="transformers all requests in one left-padded batch, or one at a time "
                        "(default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed runs of each side after the warm-up; the best is reported (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for both; default: torch's own choice")
    p.add_argument("--min-agreement", type=float, default=0.9,
                   help="fail below this fraction of requests with identical greedy tokens; random-weight "
                        "models have near-ties, so a few may differ (default: %(default)s)")


def make_prompts(tokenizer, vocab_size: int, num: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """Random token ids (no EOS) with lengths drawn uniformly from [lo, hi]."""
    if not 1 <= lo <= hi:
        raise ValueError(f"prompt lengths need 1 <= --min-prompt-len <= --max-prompt-len, got {lo}, {hi}")
    rng = random.Random(seed)
    allowed = [t for t in range(min(vocab_size, tokenizer.vocab_size)) if t not in tokenizer.eos_token_ids]
    return [[rng.choice(allowed) for _ in range(rng.randint(lo, hi))] for _ in range(num)]


def timed_alternately(fns: dict, repeat: int) -> dict[str, tuple[list[float], list[list[int]]]]:
    """Runs each fn once to warm up (allocator, kernels, caches at the real shapes), then `repeat`
    rounds that time each fn once in turn, so a slow spell of the machine (a shared host's load
    drifts over seconds) weighs on both sides alike. Returns each fn's times and last outputs."""
    for fn in fns.values():
        fn()
    results = {name: ([], None) for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs = fn()
            results[name][0].append(time.perf_counter() - t0)
            results[name] = (results[name][0], outs)
    return results


def splitnode_fn(llm, max_tokens: list[int], prompts: list[list[int]]):
    from splitnode.engine.sampling import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
    return lambda: [o.token_ids for o in llm.generate(prompts, params)]


def load_transformers(path, device: str):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    # No EOS: both sides produce exactly max_tokens, and greedy choices are not masked (as
    # min_new_tokens would do), so they stay comparable to the engine's ignore_eos.
    model.generation_config.eos_token_id = None
    return model


def _hf_generate(model, prompts: list[list[int]], max_tokens: int, pad_id: int) -> list[list[int]]:
    import torch

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    device = model.device
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_tokens, min_new_tokens=None, pad_token_id=pad_id)
    return out[:, width:].tolist()


def transformers_fn(model, prompts: list[list[int]], max_tokens: list[int], baseline: str, pad_id: int):
    if baseline == "batched":  # one batch runs to the longest request; each keeps its own count
        return lambda: [o[:n] for o, n in zip(_hf_generate(model, prompts, max(max_tokens), pad_id), max_tokens)]
    return lambda: [_hf_generate(model, [p], n, pad_id)[0] for p, n in zip(prompts, max_tokens)]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run(args: argparse.Namespace) -> int:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("splitnode bench: error: needs transformers, the reference (a test dependency): "
              "pip install -e '.[test]'", file=sys.stderr)
        return 2
    import torch

    from splitnode.engine.config import check_device
    from splitnode.engine.engine import resolve_model_path
    from splitnode.engine.llm import LLM

    check_device(args.device)  # before the model loads, and before transformers gets a device it cannot use
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    log = lambda msg: print(f"splitnode bench: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"loading {path} on {args.device} (float32), {torch.get_num_threads()} torch threads")
    llm = LLM(str(path), device=args.device, dtype="float32")
    prompts = make_prompts(llm.tokenizer, llm.engine.model_config.vocab_size, args.num_requests,
                           args.min_prompt_len, args.max_prompt_len, args.seed)
    hf = load_transformers(path, args.device)
    pad_id = next(iter(llm.tokenizer.eos_token_ids), 0)

    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    lo = args.max_tokens if args.min_tokens is None else args.min_tokens
    if not 1 <= lo <= args.max_tokens:
        raise ValueError(f"new tokens need 1 <= --min-tokens <= --max-tokens, got {lo}, {args.max_tokens}")
    rng = random.Random(args.seed + 1)
    max_tokens = [rng.randint(lo, args.max_tokens) for _ in prompts]
    log(f"{len(prompts)} requests: splitnode (all at once) and transformers ({args.baseline}), "
        f"a warm-up each, then {args.repeat} rounds timing each once in turn ...")
    ref_name = f"transformers ({args.baseline})"
    runs = timed_alternately({"splitnode": splitnode_fn(llm, max_tokens, prompts),
                              ref_name: transformers_fn(hf, prompts, max_tokens, args.baseline, pad_id)},
                             args.repeat)
    num_prompt = sum(map(len, prompts))
    ours, ref = (Result(name, runs[name][0], num_prompt, runs[name][1]) for name in ("splitnode", ref_name))

    same = sum(a == b for a, b in zip(ours.outputs, ref.outputs))
    prefix = sum(common_prefix(a, b) for a, b in zip(ours.outputs, ref.outputs)) / ours.num_generated
    agreement = same / len(prompts)
    lengths = [len(p) for p in prompts]

    print(f"model {path}, device {args.device}, float32, {torch.get_num_threads()} threads")
    print(f"{len(prompts)} requests, prompts {min(lengths)}..{max(lengths)} tokens "
          f"({sum(lengths)} in all), {min(max_tokens)}..{max(max_tokens)} new tokens each "
          f"({sum(max_tokens)} in all), greedy")
    print(f"{'':26} {'best s':>7} {'median s':>9} {'gen tok/s':>10} {'total tok/s':>12}")
    for r in (ours, ref):
        total = (r.num_prompt_tokens + r.num_generated) / r.seconds
        print(f"{r.name:26} {r.seconds:7.2f} {r.median_seconds:9.2f} {r.tokens_per_s:10.1f} {total:12.1f}")
    print(f"speedup, splitnode / transformers (best runs): {ours.tokens_per_s / ref.tokens_per_s:.2f}x")
    print(f"greedy agreement: {same}/{len(prompts)} requests identical ({agreement:.0%}), "
          f"{prefix:.1%} of tokens before the first difference")
    if agreement < args.min_agreement:
        print(f"splitnode bench: FAIL: agreement {agreement:.0%} is below --min-agreement "
              f"{args.min_agreement:.0%}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitnode.bench", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"splitnode bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
