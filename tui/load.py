"""The dashboard's built-in load: real requests through the backend, arriving as a Poisson stream
at an adjustable rate, so a demo shows the pools at work. Prompts mix short chat turns with a few
long documents (over `layerwise_min_tokens` with the byte-level demo tokenizer) so both KV
transfer paths, in one piece and layer by layer, show up."""

from __future__ import annotations

import asyncio
import random

from splitnode.engine.sampling import SamplingParams

_DOC = ("The prompt phase reads the whole prompt at once and is bound by compute; the token phase "
        "makes one token at a time and is bound by memory bandwidth. Splitting them across machines "
        "lets each run on hardware, and under a power cap, that suits it. ")

PROMPTS = (
    "Hello",
    "What is the capital of France?",
    "Write a haiku about GPUs.",
    "Explain paged attention in two sentences.",
    "Summarize the plot of Hamlet.",
    "Translate 'good morning' into German, French and Spanish.",
    "List three uses of a KV cache.",
    "Why is decode memory-bound?",
    "Summarize this document:\n" + _DOC * 3,
    "Answer questions about the following notes.\n" + _DOC * 6,
)
RATES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # requests per second, stepped by + and -


class LoadGenerator:
    def __init__(self, backend, rate: float = 4.0, max_in_flight: int = 64, seed: int = 0):
        self.backend = backend
        self.rate = rate
        self.max_in_flight = max_in_flight  # past it arrivals are skipped, not queued without end
        self.rng = random.Random(seed)
        self.num_sent = 0
        self.num_done = 0
        self.num_failed = 0
        self._tasks: set[asyncio.Task] = set()

    @property
    def num_in_flight(self) -> int:
        return len(self._tasks)

    def faster(self) -> float:
        self.rate = next((r for r in RATES if r > self.rate), self.rate)
        return self.rate

    def slower(self) -> float:
        self.rate = next((r for r in reversed(RATES) if r < self.rate), self.rate)
        return self.rate

    async def run(self) -> None:
        """Sends requests until cancelled; cancelling it cancels the requests it has in flight."""
        try:
            while True:
                await asyncio.sleep(self.rng.expovariate(self.rate))
                if len(self._tasks) < self.max_in_flight:
                    task = asyncio.get_running_loop().create_task(self._one(self.num_sent))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    self.num_sent += 1
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _one(self, n: int) -> None:
        prompt = self.rng.choice(PROMPTS)
        params = SamplingParams(max_tokens=self.rng.choice((16, 32, 64, 128)), temperature=0.8, seed=n,
                                ignore_eos=True)
        try:
            async for _ in self.backend.generate(prompt, params):
                pass
        except asyncio.CancelledError:
            raise
        except Exception:  # the runtime refused or failed this one: count it, keep going
            self.num_failed += 1
        else:
            self.num_done += 1
