"""Async streaming: one event per generated token; several streams share the engine's batches.

    python examples/stream.py
"""

import asyncio

from splitnode import LLM, SamplingParams


async def main() -> None:
    llm = LLM()  # the demo model on the CPU
    params = SamplingParams(max_tokens=24, temperature=0.0)

    # One stream, printed as it comes.
    async for event in llm.stream("Hello", params):
        print(event.delta, end="", flush=True)
        if event.finished:
            print(f"\n[{len(event.token_ids)} tokens, {event.finish_reason}, "
                  f"TTFT {event.metrics['ttft_s'] * 1e3:.1f} ms]")

    # Several at once: the engine batches them. Leaving a loop early cancels that request and
    # frees its KV blocks.
    async def collect(prompt: str, limit: int | None = None) -> str:
        text = ""
        async for event in llm.stream(prompt, params):
            text += event.delta
            if limit is not None and len(event.token_ids) >= limit:
                break
        return text

    results = await asyncio.gather(collect("First"), collect("Second"), collect("Cut short", limit=4))
    for r in results:
        print(repr(r))


asyncio.run(main())
