"""Latency of each request, the SLOs it is held to, and goodput.

Two kinds of SLO, as the papers use them:
- **Slowdown** (Splitwise): each request against the same request alone on an idle device. TTFT
  may be 2x / 3x / 6x the idle one at p50 / p90 / p99 over requests; every token gap (TBT) and
  the end-to-end time (E2E) 1.25x / 1.5x / 5x. A run meets them when all nine hold. Gaps spread
  even on an idle device (on a CPU worker alone, p90 is ~1.5x and p99 ~2.6x the median gap:
  Python, the event loop, the allocator), so the TBT slowdown at a percentile is the gaps' (each
  over its request's idle median) at that percentile over the same percentile of the idle gaps:
  a layout is charged for the spread it adds, not for the one the device has alone.
- **Absolute** (DistServe, vLLM's `--goodput`): a request is good when its TTFT, its mean token
  gap (TPOT, called tbt here) and its E2E are under the limits given; a run meets them when at
  least `attainment` (default 90%) of its requests are good.

Goodput is the highest request rate at which a run meets its SLOs (`search_rate`), reported per
device as DistServe does. A failed request meets no SLO.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from splitnode.runtime.status import percentiles

SLOWDOWN_LIMITS = {"ttft": (2.0, 3.0, 6.0), "tbt": (1.25, 1.5, 5.0), "e2e": (1.25, 1.5, 5.0)}
QUANTILES = ("p50", "p90", "p99")
ABSOLUTE_KEYS = ("ttft", "tbt", "e2e")


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int  # asked for (EOS is ignored: every request runs to it)
    sent_s: float  # seconds after the run's start
    token_s: list[float] = field(default_factory=list)  # when each output token arrived, same clock
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and len(self.token_s) >= self.output_len

    @property
    def ttft(self) -> float:
        return self.token_s[0] - self.sent_s

    @property
    def e2e(self) -> float:
        return self.token_s[-1] - self.sent_s

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_s, self.token_s[1:])]

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (len(self.token_s) - 1) if len(self.token_s) > 1 else None

    @property
    def key(self) -> tuple[int, int]:
        return self.prompt_len, self.output_len


@dataclass(frozen=True)
class Alone:
    """One request alone on an idle device: the yardstick of the slowdown SLOs."""

    ttft: float
    tbt: float | None  # its median token gap; None for a one-token output
    e2e: float
    gap_ratios: tuple[float, ...] = ()  # each of its gaps over its median gap: the idle spread


def parse_slo(spec: str | None) -> dict[str, float]:
    """`ttft=MS,tbt=MS,e2e=MS` (any of them; `tpot` is tbt's other name) -> seconds."""
    if not spec:
        return {}
    out = {}
    for item in spec.split(","):
        key, sep, value = item.strip().partition("=")
        key = "tbt" if key == "tpot" else key
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if not sep or key not in ABSOLUTE_KEYS or not 0 < ms < math.inf:
            raise ValueError(f"--slo: {item!r} is not KEY=MILLISECONDS with KEY one of ttft, tbt, e2e (e.g. ttft=500,tbt=50)")
        out[key] = ms / 1000
    return out


def slowdowns(results: list[RequestResult], alone: dict[tuple[int, int], Alone]) -> dict[str, list[float]]:
    """Each request's TTFT and E2E over its idle ones, and each token gap over its idle median
    gap. A failed request counts as infinitely slow."""
    out: dict[str, list[float]] = {"ttft": [], "tbt": [], "e2e": []}
    for r in results:
        a = alone[r.key]
        if not r.ok:
            out["ttft"].append(math.inf)
            out["e2e"].append(math.inf)
            continue
        out["ttft"].append(r.ttft / a.ttft)
        out["e2e"].append(r.e2e / a.e2e)
        if a.tbt:
            out["tbt"].extend(g / a.tbt for g in r.gaps)
    return out


def slowdown_check(results: list[RequestResult], alone: dict[tuple[int, int], Alone]) -> dict:
    """The nine slowdown percentiles, their limits, and which fail. TBT's are over the idle
    spread of the same requests' gaps where it was measured (see the module's docstring)."""
    measured = {k: percentiles(v) for k, v in slowdowns(results, alone).items()}
    idle = percentiles([x for key in dict.fromkeys(r.key for r in results) for x in alone[key].gap_ratios])
    if idle and measured["tbt"]:
        measured["tbt"] = {q: measured["tbt"][q] / idle[q] for q in QUANTILES}
    failing = [f"{k} {q} {m[q]:.2f}x > {lim}x" for k, m in measured.items() if m
               for q, lim in zip(QUANTILES, SLOWDOWN_LIMITS[k]) if not m[q] <= lim]
    return {"percentiles": measured, "limits": SLOWDOWN_LIMITS, "failing": failing, "met": not failing}


def is_good(r: RequestResult, slo: dict[str, float]) -> bool:
    if not r.ok:
        return False
    values = {"ttft": r.ttft, "tbt": r.tpot or 0.0, "e2e": r.e2e}
    return all(values[k] <= limit for k, limit in slo.items())


def absolute_check(results: list[RequestResult], slo: dict[str, float], attainment: float = 0.9) -> dict:
    good = sum(is_good(r, slo) for r in results)
    share = good / len(results) if results else 0.0
    return {"slo_s": slo, "good": good, "attainment": share, "target": attainment, "met": share >= attainment}


def summarize(results: list[RequestResult], alone: dict[tuple[int, int], Alone] | None = None,
              slo: dict[str, float] | None = None, attainment: float = 0.9) -> dict:
    """Throughput and latency percentiles of one run, and whether it met its SLOs: the absolute
    ones when given, else the slowdown ones (both are reported where they can be computed)."""
    ok = [r for r in results if r.ok]
    start = min((r.sent_s for r in results), default=0.0)
    end = max((r.token_s[-1] for r in ok), default=start)
    wall = max(end - start, 1e-9)
    out = {
        "num_requests": len(results), "num_ok": len(ok), "num_failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_s": wall, "requests_per_s": len(ok) / wall, "num_output_tokens": sum(len(r.token_s) for r in ok),
        "output_tokens_per_s": sum(len(r.token_s) for r in ok) / wall,
        "ttft_s": percentiles([r.ttft for r in ok]), "tbt_s": percentiles([g for r in ok for g in r.gaps]),
        "e2e_s": percentiles([r.e2e for r in ok]),
    }
    if alone is not None:
        out["slowdown"] = slowdown_check(results, alone)
        lim_ttft, lim_e2e = SLOWDOWN_LIMITS["ttft"][0], SLOWDOWN_LIMITS["e2e"][0]
        within = [r for r in ok if r.ttft <= lim_ttft * alone[r.key].ttft and r.e2e <= lim_e2e * alone[r.key].e2e]
        out["within_p50_slowdown"] = len(within) / len(results) if results else 0.0
    if slo:
        out["absolute"] = absolute_check(results, slo, attainment)
    judge = out.get("absolute") or out.get("slowdown")
    out["met"] = bool(judge and judge["met"])
    return out


async def search_rate(meets: Callable[[float], Awaitable[bool]], start: float, max_runs: int = 8,
                      tolerance: float = 0.15, floor: float = 1e-3) -> tuple[float, list[tuple[float, bool]]]:
    """The highest rate at which `meets(rate)` holds, by bracketing: double (or halve) from
    `start` until the answer flips, then bisect (geometrically) until the bracket is within
    `tolerance` or `max_runs` runs are spent. Assumes that a rate which fails makes every higher
    one fail too, as queueing does. Returns the rate (0.0 if none met) and each run's (rate, met)."""
    if not start > 0:
        raise ValueError(f"the sweep's starting rate must be > 0, got {start}")
    history: list[tuple[float, bool]] = []

    async def run(rate: float) -> bool:
        history.append((rate, ok := bool(await meets(rate))))
        return ok

    lo = hi = None
    rate = start
    while len(history) < max_runs:
        if await run(rate):
            lo = rate
            if hi is not None:
                break
            rate *= 2
        else:
            hi = rate
            if lo is not None:
                break
            rate /= 2
            if rate < floor:
                return 0.0, history
    while lo is not None and hi is not None and hi / lo > 1 + tolerance and len(history) < max_runs:
        mid = math.sqrt(lo * hi)
        if await run(mid):
            lo = mid
        else:
            hi = mid
    return (lo or 0.0), history
