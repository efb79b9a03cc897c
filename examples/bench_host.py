"""Host overhead of the engine's step: scheduling, input preparation and postprocess per decode
step, with the device's work taken out, and the batched sampler on a Llama-3-sized vocabulary.

    python examples/bench_host.py                      # batch 1/64/256 x context 512/4096, then sampling
    python examples/bench_host.py --batches 256 --contexts 4096 --steps 64

The step runs the real engine (batcher, block pool, model runner, sampler, postprocess) on a tiny
model of the demo's kind whose forward is replaced by cached outputs of the right shapes, so what
is timed is host work: on a GPU the same Python runs while the device computes. The CPU-only decode
mirror (a copy of the decodes' K/V, device work on the CPU) is off. Every sequence decodes greedily
from its own context (staggered, so new KV blocks come at different steps); rounds alternate
between the shapes and each reports the best and the median per step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from splitnode.engine.config import EngineConfig
from splitnode.engine.engine import Engine
from splitnode.engine.sampling import SamplingParams, sample
from splitnode.engine.sequence import Sequence
from splitnode.model.demo import write_demo_model

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 8192}


class CachedForward:
    """Stands in for the model: returns cached hidden states and logits of the shapes asked for."""

    def __init__(self, hidden_size: int, vocab_size: int, max_rows: int):
        self.hidden = torch.zeros(max_rows, hidden_size)
        self.logits = torch.randn(max_rows, vocab_size, generator=torch.Generator().manual_seed(0))

    def __call__(self, input_ids, positions, ctx):
        return self.hidden[: input_ids.shape[0]]

    def compute_logits(self, hidden):
        return self.logits[: hidden.shape[0]]


def make_engine(model: str, batch: int, context: int, steps: int) -> Engine:
    block_size = 16
    blocks = batch * (-(-(context + block_size + steps) // block_size)) + 8
    cfg = EngineConfig(model=model, dtype="float32", block_size=block_size, num_kv_blocks=blocks, max_num_seqs=batch,
                       max_num_batched_tokens=max(2048, batch))
    eng = Engine(cfg)
    eng.runner.model = CachedForward(eng.model_config.hidden_size, eng.model_config.vocab_size, max(2048, batch))
    eng.runner.decode_mirror = None
    params = SamplingParams(temperature=0.0, max_tokens=steps * 4 + 2, ignore_eos=True)
    for i in range(batch):
        n = context + i % block_size  # staggered: sequences cross block boundaries at different steps
        seq = Sequence(i, [(7 * i + j) % 256 for j in range(n)], params)
        eng.pool.grow(seq, n)
        seq.num_computed = n - 1  # as a hand-off arrives: its prompt's K/V is in the cache, one token to run
        eng.add(seq)
    return eng


def time_steps(eng: Engine, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = eng.schedule()
        eng.execute(batch)
        times.append(time.perf_counter() - t0)
    return times


def bench_steps(args) -> None:
    folder = Path(tempfile.mkdtemp(prefix="splitnode-bench-host-"))
    write_demo_model(folder, TINY)
    shapes = [(b, c) for c in args.contexts for b in args.batches]
    engines = {s: make_engine(str(folder), *s, steps=args.steps * (args.rounds + 1)) for s in shapes}
    for eng in engines.values():
        time_steps(eng, 4)  # warm-up
    per_step: dict[tuple[int, int], list[float]] = {s: [] for s in shapes}
    for _ in range(args.rounds):
        for s in shapes:
            per_step[s] += time_steps(engines[s], args.steps)
    print(f"host time per decode step ({args.rounds} rounds x {args.steps} steps; goal 100 us + 1 us per sequence)")
    print(f"{'batch':>6} {'context':>8} {'best us':>9} {'median us':>10} {'goal us':>8}")
    for (b, c), ts in per_step.items():
        print(f"{b:>6} {c:>8} {min(ts) * 1e6:>9.0f} {statistics.median(ts) * 1e6:>10.0f} {100 + b:>8}")


def bench_sampling(args) -> None:
    n, vocab = 64, 128256
    g = torch.Generator().manual_seed(0)
    # Rows as peaked as a language model's: spreads from 4 to 8 give top-p 0.9 nuclei of about 900
    # down to 5 ids (SmolLM2-135M sampling a story at temperature 1: median 15, 99th percentile 565).
    peaked = torch.randn(n, vocab, generator=g) * torch.linspace(4.0, 8.0, n)[:, None]
    flat = torch.randn(n, vocab, generator=g) * 2.0  # nuclei of ~30K ids: every row sorted whole on the CPU
    cases = {"temperature 1": (peaked, SamplingParams(temperature=1.0)),
             "temperature 1, top_p 0.9": (peaked, SamplingParams(temperature=1.0, top_p=0.9)),
             "temperature 1, top_p 0.9, flat rows": (flat, SamplingParams(temperature=1.0, top_p=0.9))}
    print(f"sampling a [{n}, {vocab}] logits batch (goal 2 ms; {args.rounds} alternating rounds x 8 calls)")
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (logits, p) in cases.items():
            sample_batch(logits, p, n)  # untimed: the case's first call after another's
            for _ in range(8):
                t0 = time.perf_counter()
                sample_batch(logits, p, n)
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"  {name:<36} best {min(ts) * 1e3:8.2f} ms   median {statistics.median(ts) * 1e3:8.2f} ms")


def sample_batch(logits: torch.Tensor, p: SamplingParams, n: int) -> torch.Tensor:
    return sample(logits, [p] * n, list(range(n)), [100] * n, [[]] * n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--steps", type=int, default=32, help="timed steps per shape and round (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: %(default)s)")
    ap.add_argument("--skip-sampling", action="store_true")
    args = ap.parse_args()
    bench_steps(args)
    if not args.skip_sampling:
        bench_sampling(args)


if __name__ == "__main__":
    main()
