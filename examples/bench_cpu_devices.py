"""Are `cpu:N` workers N devices? Decode step rate of one CPU worker alone on one core against two
decoding at once, each on its own core (and, for contrast, two sharing both cores).

    python examples/bench_cpu_devices.py                 # demo model, batch 8 per worker
    python examples/bench_cpu_devices.py --rounds 5 --batch 16
    python examples/bench_cpu_devices.py --hidden 1024 --layers 8   # a bigger random model of the demo's kind

Each configuration runs `--batch` decode-heavy requests per worker (16-token prompts, `--tokens`
new tokens, greedy) through the runtime; a worker's step rate is its steps over its busy seconds
(`status()`: steps, busy_s). Rounds alternate between the configurations so the host's drift
weighs on all alike; best and median over the rounds are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

from splitnode import SamplingParams
from splitnode.runtime import Runtime, RuntimeConfig


async def step_rates(devices: str, cpu_threads: int, batch: int, tokens: int, model: str | None) -> list[float]:
    n = int(devices.partition(":")[2])
    cfg = RuntimeConfig(model=model, devices=devices, roles={f"cpu:{i}": "mixed" for i in range(n)},
                        autoscale=False, cpu_threads=cpu_threads, num_kv_blocks=batch * (tokens // 16 + 4))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    async with Runtime(cfg) as rt:
        async def one(i):
            async for _ in rt.generate([3 + (i * 7 + j) % 250 for j in range(16)], params):
                pass

        await asyncio.gather(*(one(i) for i in range(batch * n)))
        return [d["steps"] / d["busy_s"] for d in rt.status()["devices"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: the demo model)")
    ap.add_argument("--batch", type=int, default=8, help="decoding requests per worker (default: %(default)s)")
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per request (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: %(default)s)")
    ap.add_argument("--hidden", type=int, default=None,
                    help="write a random model of the demo's kind with this hidden size (intermediate 2.75x, "
                         "head_dim 64) and use it instead of --model")
    ap.add_argument("--layers", type=int, default=4, help="its layers (default: %(default)s)")
    args = ap.parse_args()
    if args.hidden:
        from splitnode.model.demo import write_demo_model

        folder = Path(tempfile.mkdtemp(prefix="splitnode-bench-model-"))
        heads = args.hidden // 64
        write_demo_model(folder, {"hidden_size": args.hidden, "intermediate_size": args.hidden * 11 // 4,
                                  "num_hidden_layers": args.layers, "num_attention_heads": heads,
                                  "num_key_value_heads": max(1, heads // 4), "head_dim": 64})
        args.model = str(folder)
        print(f"random model: hidden {args.hidden}, {args.layers} layers, {heads} heads / {max(1, heads // 4)} KV heads")
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        raise SystemExit("bench_cpu_devices: needs two cores")
    configs = {"one worker, one core": ("cpu:1", 1), "two workers, a core each": ("cpu:2", 1),
               "two workers sharing both cores": ("cpu:2", 2)}
    rates: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(args.rounds):
        for name, (devices, threads) in configs.items():
            per_worker = asyncio.run(step_rates(devices, threads, args.batch, args.tokens, args.model))
            rates[name].append(min(per_worker))  # the slower worker of a pair
            print(f"round {r + 1}: {name:<32} {' '.join(f'{x:.1f}' for x in per_worker)} steps/s", flush=True)
    alone = rates["one worker, one core"]
    print(f"\n{'configuration':<32}{'best steps/s':>14}{'median':>10}{'vs alone (best, median)':>26}")
    for name, xs in rates.items():
        ratio = f"{max(xs) / max(alone):.2f}, {statistics.median(xs) / statistics.median(alone):.2f}"
        print(f"{name:<32}{max(xs):>14.1f}{statistics.median(xs):>10.1f}{ratio:>26}")


if __name__ == "__main__":
    main()
