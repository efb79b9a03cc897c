"""What a serving benchmark sends: request lengths (synthetic, shaped like the Azure LLM inference
2023 traces, or read from such a trace) and when each request arrives (Poisson, the trace's own
timestamps, or a closed loop).

The synthetic workloads are lognormal with the medians the Splitwise paper reports for the two
Azure traces (coding: prompt 1500, output 13 tokens; conversation: prompt 1020, output 129). The
spreads are ours, chosen so the tails look like the traces' published distributions: coding has
long prompts and short answers, conversation shorter prompts and much longer answers. `scale`
shrinks every length (at least one token) for small devices; the shapes stay.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class Distribution:
    prompt_median: float
    prompt_sigma: float  # of log(length)
    output_median: float
    output_sigma: float


WORKLOADS = {
    "coding": Distribution(prompt_median=1500, prompt_sigma=0.9, output_median=13, output_sigma=1.1),
    "conversation": Distribution(prompt_median=1020, prompt_sigma=0.8, output_median=129, output_sigma=0.9),
}
TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class RequestSpec:
    prompt_len: int
    output_len: int
    arrival_s: float | None = None  # from a trace: seconds after its first request


def synthetic(name: str, num: int, scale: float = 1.0, seed: int = 0, max_len: int | None = None) -> list[RequestSpec]:
    """`num` requests drawn from workload `name`; with `max_len`, each prompt + output fits it
    (the output is cut first, then the prompt, so short requests keep their shape)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)} or give --trace FILE.csv")
    if not scale > 0:
        raise ValueError(f"--scale must be > 0, got {scale}")
    d, rng = WORKLOADS[name], random.Random(seed)

    def draw(median: float, sigma: float) -> int:
        return max(1, round(rng.lognormvariate(math.log(median), sigma) * scale))

    return [fit(RequestSpec(draw(d.prompt_median, d.prompt_sigma), draw(d.output_median, d.output_sigma)), max_len)
            for _ in range(num)]


def fit(r: RequestSpec, max_len: int | None) -> RequestSpec:
    if max_len is None or r.prompt_len + r.output_len <= max_len:
        return r
    out = max(1, min(r.output_len, max_len // 4))
    return RequestSpec(min(r.prompt_len, max_len - out), out, r.arrival_s)


def read_trace(path: str | Path) -> tuple[list[RequestSpec], list[str]]:
    """A CSV with the public Azure traces' columns (TIMESTAMP,ContextTokens,GeneratedTokens;
    timestamps as dates or as seconds). Returns the good rows in time order and one message per
    bad row, naming its line, so nothing is dropped unseen."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: the header lacks {', '.join(missing)} (a trace needs {','.join(TRACE_COLUMNS)})")
        rows, bad = [], []
        for row in reader:
            line = reader.line_num
            try:
                t = _timestamp(row["TIMESTAMP"])
                prompt, output = _count(row["ContextTokens"]), _count(row["GeneratedTokens"])
            except (ValueError, TypeError) as e:
                bad.append(f"{path.name} line {line}: {e}")
                continue
            rows.append((t, prompt, output))
    if not rows:
        raise ValueError(f"{path}: no usable rows" + (f" ({len(bad)} bad, first: {bad[0]})" if bad else ""))
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    return [RequestSpec(p, o, t - t0) for t, p, o in rows], bad


def _timestamp(text: str | None) -> float:
    if text is None or not text.strip():
        raise ValueError("TIMESTAMP is empty")
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"TIMESTAMP {text!r} is neither a date nor seconds") from None


def _count(text: str | None) -> int:
    try:
        n = int((text or "").strip())
    except ValueError:
        raise ValueError(f"token count {text!r} is not an integer") from None
    if n < 1:
        raise ValueError(f"token count {n} is not >= 1")
    return n


def poisson_arrivals(num: int, rate: float, seed: int = 0) -> list[float]:
    """Open-loop arrival times (seconds from the start) at `rate` requests/s; the first at 0."""
    if not rate > 0:
        raise ValueError(f"--rate must be > 0 requests/s, got {rate}")
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(num):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def trace_arrivals(specs: list[RequestSpec], time_scale: float = 1.0) -> list[float]:
    """The trace's own timestamps, played `time_scale` times faster."""
    if not time_scale > 0:
        raise ValueError(f"--time-scale must be > 0, got {time_scale}")
    return [(s.arrival_s or 0.0) / time_scale for s in specs]


def prompt_ids(specs: list[RequestSpec], vocab: list[int], seed: int = 0) -> list[list[int]]:
    """Token ids for each request, drawn from `vocab` (the ids that are not special tokens)."""
    rng = random.Random(seed)
    return [[rng.choice(vocab) for _ in range(s.prompt_len)] for s in specs]
