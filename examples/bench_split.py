"""Split versus colocated: the same workload through the runtime on the same devices.

    python examples/bench_split.py                      # cpu:3, demo model
    python examples/bench_split.py --devices cuda --model /path/to/hf-folder

Prints, per configuration, throughput and TTFT/TBT percentiles, and the KV moved and the time
spent issuing the moves. On a CPU box the split has nothing to win (the workers share the same
cores); the figure is the runtime's overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from splitnode import SamplingParams
from splitnode.runtime import Runtime, RuntimeConfig, default_roles, parse_devices


def pct(values, q):
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def run(config: RuntimeConfig, workload, rate: float, seed: int) -> dict:
    rng = random.Random(seed)
    async with Runtime(config) as rt:
        async def one(delay, prompt, n):
            await asyncio.sleep(delay)
            t0 = time.perf_counter()
            times = []
            async for ev in rt.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)):
                times.append(time.perf_counter())
            return ev.token_ids, t0, times

        delays, t = [], 0.0
        for _ in workload:
            delays.append(t)
            t += rng.expovariate(rate) if rate > 0 else 0.0
        start = time.perf_counter()
        results = await asyncio.gather(*[one(d, p, n) for d, (p, n) in zip(delays, workload)])
        wall = time.perf_counter() - start
        moved = rt.status()["transfers"]
    ttft = [times[0] - t0 for _, t0, times in results]
    tbt = [b - a for _, _, times in results for a, b in zip(times, times[1:])]
    tokens = sum(len(ids) for ids, _, _ in results)
    return {"tokens": [ids for ids, _, _ in results], "tok_s": tokens / wall, "wall": wall,
            "ttft": (pct(ttft, 50), pct(ttft, 90), pct(ttft, 99)), "tbt": (pct(tbt, 50), pct(tbt, 90), pct(tbt, 99)),
            "moved": moved}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: the demo model)")
    ap.add_argument("--devices", default="cpu:3", help="devices as RuntimeConfig takes them (default: cpu:3)")
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (0: all at once)")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(64, 768), metavar=("MIN", "MAX"))
    ap.add_argument("--max-tokens", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    ap.add_argument("--num-kv-blocks", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    workload = [([rng.randrange(3, 256) for _ in range(rng.randint(*args.prompt_len))], rng.randint(*args.max_tokens))
                for _ in range(args.num_requests)]
    devices = parse_devices(args.devices)
    configs = {
        "split " + "/".join(default_roles(devices).values()): default_roles(devices),
        "colocated (all mixed)": dict.fromkeys(devices, "mixed"),
    }
    print(f"{args.num_requests} requests, prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, "
          f"outputs {args.max_tokens[0]}-{args.max_tokens[1]}, devices {','.join(devices)}, rate {args.rate or 'burst'}")
    print(f"{'configuration':<28}{'tok/s':>9}{'TTFT p50/p90/p99 (s)':>26}{'TBT p50/p90/p99 (ms)':>26}"
          f"{'KV moved':>11}{'move time':>11}")
    outs = {}
    for name, roles in configs.items():
        cfg = RuntimeConfig(model=args.model, devices=devices, roles=roles, num_kv_blocks=args.num_kv_blocks,
                            autoscale=False)
        r = outs[name] = asyncio.run(run(cfg, workload, args.rate, args.seed))
        m = r["moved"]
        print(f"{name:<28}{r['tok_s']:>9.1f}{'/'.join(f'{x:.2f}' for x in r['ttft']):>26}"
              f"{'/'.join(f'{x * 1e3:.0f}' for x in r['tbt']):>26}{m['bytes_moved'] / 2**20:>9.1f}Mi"
              f"{m['seconds'] * 1e3:>9.1f}ms")
    a, b = outs.values()
    same = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
    print(f"identical greedy outputs: {same}/{len(workload)}; split/colocated throughput ratio "
          f"{a['tok_s'] / b['tok_s']:.2f}")


if __name__ == "__main__":
    main()
