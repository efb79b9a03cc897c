"""Sending a request list to a runtime (in this process, or a server behind its socket) as open-
or closed-loop load, and the layouts a benchmark compares.

A target is anything with `generate(prompt, params)` yielding RequestOutputs (`Runtime`, or the
socket's `Client`). Every request is greedy with EOS ignored, so it runs to its output length and
the same request list is the same work on every layout.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Callable

from splitnode.engine.sampling import SamplingParams
from splitnode.goodput.slo import Alone, RequestResult
from splitnode.goodput.workloads import RequestSpec
from splitnode.runtime.config import default_roles

LAYOUT_NAMES = ("colocated", "split", "policy")
_COUNTS = re.compile(r"^(?:(\d+)p)?(?:(\d+)t)?(?:(\d+)m)?$")


def layout_roles(name: str, devices: list[str]) -> tuple[dict[str, str], bool]:
    """A layout's roles and whether the autoscaler runs: `colocated` (every device mixed),
    `split` (the default split: a third prompt, the rest token), `policy` (the default split with
    the autoscaler on), or counts such as `1p1t`, `1p2t`, `2m`, `1p1t1m` that add up to the
    devices (prompt devices first, then token, then mixed)."""
    if name == "colocated":
        return dict.fromkeys(devices, "mixed"), False
    if name in ("split", "policy"):
        return default_roles(devices), name == "policy"
    m = _COUNTS.match(name)
    if not name or not m:
        raise ValueError(f"layout {name!r}: use colocated, split, policy, or counts like 1p1t, 1p2t, 1p1t1m")
    counts = [int(x or 0) for x in m.groups()]
    if sum(counts) != len(devices):
        raise ValueError(f"layout {name!r} names {sum(counts)} devices; there are {len(devices)} ({','.join(devices)})")
    roles = [r for r, n in zip(("prompt", "token", "mixed"), counts) for _ in range(n)]
    return dict(zip(devices, roles)), False


def params_for(spec: RequestSpec) -> SamplingParams:
    return SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=True)


async def one_request(target, prompt: list[int], spec: RequestSpec, t0: float) -> RequestResult:
    """Sends one request and stamps every token as it arrives (an event carrying several tokens
    stamps them all at its arrival)."""
    r = RequestResult(spec.prompt_len, spec.output_len, time.perf_counter() - t0)
    seen = 0
    try:
        async for ev in target.generate(prompt, params_for(spec)):
            now = time.perf_counter() - t0
            r.token_s.extend([now] * (len(ev.token_ids) - seen))
            seen = len(ev.token_ids)
    except Exception as e:  # a refused or failed request is a result too: it meets no SLO
        r.error = f"{type(e).__name__}: {e}"
    return r


async def run_load(target, prompts: list[list[int]], specs: list[RequestSpec], *, arrivals: list[float] | None = None,
                   concurrency: int | None = None, duration_s: float | None = None,
                   on_done: Callable[[RequestResult], None] | None = None) -> list[RequestResult]:
    """Open loop (`arrivals`: each request sent at its time, whatever is still running) or closed
    loop (`concurrency` requests in flight, the next sent as one finishes). `duration_s` stops
    sending after that long; what was sent runs to its end. Results are in request order."""
    if (arrivals is None) == (concurrency is None):
        raise ValueError("give arrival times (open loop) or a concurrency (closed loop), not both")
    t0 = time.perf_counter()

    def report(r: RequestResult) -> RequestResult:
        if on_done is not None:
            on_done(r)
        return r

    if arrivals is not None:
        async def at(i: int) -> RequestResult:
            await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
            return report(await one_request(target, prompts[i], specs[i], t0))

        chosen = [i for i in range(len(specs)) if duration_s is None or arrivals[i] < duration_s]
        return list(await asyncio.gather(*(at(i) for i in chosen)))

    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    results: dict[int, RequestResult] = {}
    cursor = iter(range(len(specs))) if duration_s is None else itertools.count()  # with a duration: round again

    async def client() -> None:
        for i in cursor:
            if duration_s is not None and time.perf_counter() - t0 >= duration_s:
                return
            j = i % len(specs)
            results[i] = report(await one_request(target, prompts[j], specs[j], t0))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return [results[i] for i in sorted(results)]


async def measure_alone(target, prompts: list[list[int]], specs: list[RequestSpec],
                        cache: dict[tuple[int, int], Alone], on_done: Callable[[], None] | None = None) -> None:
    """Each distinct (prompt, output) length alone on the idle `target`, one after another, into
    `cache` (kept for the whole invocation: every layout and rate is held to the same yardstick)."""
    t0 = time.perf_counter()
    for prompt, spec in zip(prompts, specs):
        key = (spec.prompt_len, spec.output_len)
        if key in cache:
            continue
        r = await one_request(target, prompt, spec, t0)
        if not r.ok:
            raise RuntimeError(f"a request alone on an idle device failed: {r.error}")
        gaps = sorted(r.gaps)
        median = gaps[len(gaps) // 2] if gaps else None
        cache[key] = Alone(r.ttft, median, r.e2e, tuple(g / median for g in r.gaps) if median else ())
        if on_done is not None:
            on_done()
