"""The phase-split runtime as a library: three CPU workers (one prompt, two token) on the demo
model; stream a request, cancel another mid-way, move a worker to another role under load, and
read the status. Runs as is: `python examples/runtime.py`."""

import asyncio

from splitnode import Runtime, RuntimeConfig, SamplingParams


async def main() -> None:
    async with Runtime(RuntimeConfig(model=None, devices="cpu:3", num_kv_blocks=1024)) as rt:
        params = SamplingParams(max_tokens=24, temperature=0.0)

        async def consume(prompt: str, cancel_after: int | None = None) -> str:
            async for ev in rt.generate(prompt, params):
                if cancel_after is not None and len(ev.token_ids) == cancel_after:
                    await rt.cancel(ev.request_id)
            return f"{prompt[:24]!r}: {len(ev.token_ids)} tokens, finish_reason={ev.finish_reason}"

        jobs = [consume("Hello " * 100), consume("A long document. " * 60), consume("Short", cancel_after=3)]
        # move cpu:1 from token to prompt while the requests run; its decodes migrate to cpu:2
        move = rt.assign("cpu:1", "prompt", mode="migrate")
        *lines, _ = await asyncio.gather(*jobs, move)
        print("\n".join(lines))
        st = rt.status()
        for d in st["devices"]:
            print(f"{d['name']}: {d['role']:6} pinned={d['pinned']} KV blocks used {d['kv_blocks_used']}/{d['kv_blocks_total']}")
        moved = st["transfers"]
        print(f"KV moved: {moved['num_sequences']} sequences, {moved['bytes_moved'] / 2**20:.1f} MiB, "
              f"{moved['num_transfers']} layer moves; TTFT p50 {st['requests']['ttft_s']['p50'] * 1e3:.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
