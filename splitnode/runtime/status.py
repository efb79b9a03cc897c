"""The one schema of `Runtime.status()`: what the socket sends, `splitnode status` prints and the
dashboard shows. TypedDicts cost nothing on the wire (msgpack still sees dicts) and let a type
checker follow every key from the runtime to its readers."""

from __future__ import annotations

import statistics
from typing import TypedDict


class Percentiles(TypedDict):
    p50: float
    p90: float
    p99: float


class GPUSample(TypedDict, total=False):
    """NVML's latest reading of the device (see `telemetry.GPUSampler.sample`); `available` False
    and `reason` say why there is none. Readings NVML cannot give are None, never invented."""

    available: bool
    reason: str  # only when not available
    time: float  # time.monotonic() of the reading
    power_w: float | None
    power_limit_w: float | None
    energy_j: float | None  # since the driver loaded
    util_pct: float | None
    mem_used_bytes: int | None
    mem_total_bytes: int | None
    temp_c: float | None
    sm_clock_mhz: float | None


class DeviceStatus(TypedDict):
    name: str  # the worker: "cuda:0", "cpu:1", "cuda:0/1" (a second worker on cuda:0)
    device: str  # the torch device
    role: str  # "prompt", "token" or "mixed"
    target_role: str | None  # the role it is moving to, while a change is under way
    pinned: bool  # set by a person (assign); the autoscaler leaves it alone until released
    borrowed_from: str | None  # the pool it was borrowed from into the mixed pool
    kv_blocks_used: int
    kv_blocks_total: int
    kv_blocks_reserved: int  # held for prompts prefilled elsewhere that will decode here
    waiting: int  # sequences with no blocks yet
    running: int  # sequences holding blocks here
    arriving: int  # sequences whose KV is on its way here
    batch_size: int  # sequences in the last batch
    batch_tokens: int  # tokens in the last batch
    pending_prompt_tokens: int  # prompt tokens queued in this device's batcher
    steps: int
    busy_s: float
    error: str | None  # why the worker failed (it takes no work)
    role_change_waits_for: str | None  # what the role change under way waits for, if it waits
    role_changes: int  # roles it has moved to since start
    cpu_cores: list[int] | None  # a CPU worker's own cores; None on a GPU
    gpu: GPUSample
    power_cap_w: float | None  # the power cap (RuntimeConfig.power_caps) in force on its GPU; None: none


class PoolSignals(TypedDict):
    """What the autoscaler acts on, computed once (`Autoscaler.signals`) for it and for status."""

    prompt_queue_tokens: int  # prompt tokens queued on prompt workers
    token_kv_occupancy: float  # used / total KV blocks over token workers


class RuntimeInfo(TypedDict):
    model: str
    uptime_s: float
    max_model_len: int  # the longest request (prompt + output) every worker can hold
    warnings: list[str]  # e.g. CPU workers sharing cores


class InFlight(TypedDict, total=False):
    request_id: int
    ttft_s: float
    e2e_s: float
    tbt_mean_s: float
    tbt_max_s: float


class RequestsStatus(TypedDict):
    active: int
    finished: int
    num_generated_tokens: int
    ttft_s: Percentiles | None
    tbt_s: Percentiles | None  # of each finished request's mean gap
    in_flight: list[InFlight]


class TransfersStatus(TypedDict):
    num_transfers: int  # layer (or whole-sequence) moves issued
    num_sequences: int
    bytes_moved: int
    seconds: float
    num_failed: int
    in_flight: int


class PolicyStatus(TypedDict):
    autoscale: bool
    borrow_prompt_tokens: int
    borrow_kv_occupancy: float
    repurpose_after_s: float
    layerwise_min_tokens: int
    transfer_timeout_s: float
    reservation_lease_s: float
    drain_timeout_s: float
    max_active_requests: int
    max_num_batched_tokens: int


class PredictionStatus(TypedDict, total=False):
    """`splitnode plan`'s predicted goodput for the layout the devices are in, on the lengths of the
    runtime's recently finished requests (`splitnode.plan.predict`); `available` False and `reason`
    say why there is none (yet). Computed in a helper process: these are the latest figures, for
    `layout` and `num_requests` as they were `age_s` ago, while `computing` says newer ones are on
    their way."""

    available: bool
    reason: str  # only when not available
    computing: bool  # a prediction is under way (for the layout the devices are in now)
    current_layout: str  # the layout the devices are in now ("1p1t", "1p2t+policy"); absent if none can serve
    layout: str  # the layout the figures below are for
    goodput: float  # requests/s meeting the SLOs there (Splitwise's slowdowns), predicted
    best_layout: str  # the layout with the highest predicted goodput among every one of the devices
    best_goodput: float
    layouts: dict[str, float]  # every layout's predicted goodput
    num_requests: int  # finished requests whose prompt and output lengths made the workload
    profile: str  # the profile's path
    computed_at: float  # time.time() when it was computed
    age_s: float  # since then
    compute_s: float  # how long the helper took
    warnings: list[str]  # what the planner warned about (a token budget past the profile's points, say)


class Status(TypedDict):
    runtime: RuntimeInfo
    devices: list[DeviceStatus]
    requests: RequestsStatus
    transfers: TransfersStatus
    policy: PolicyStatus
    signals: PoolSignals
    prediction: PredictionStatus


def percentiles(values: list[float]) -> Percentiles | None:
    if not values:
        return None
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


def format_ms(p: Percentiles | None, sep: str = " / ") -> str:
    """p50/p90/p99 in milliseconds, "-" where there are none yet."""
    if not p:
        return "-"
    return sep.join(f"{p[k] * 1000:.0f}" for k in ("p50", "p90", "p99")) + " ms"


def format_prediction(p: PredictionStatus | None) -> str:
    """One line for people: the predicted goodput at the devices' layout and at the best one, or
    why there is none."""
    if not p:
        return "predicted goodput: n/a (this server predicts none)"
    if not p.get("available"):
        return f"predicted goodput: n/a ({p.get('reason', '?')})"
    now = p.get("current_layout", p["layout"])
    where = f"this layout {now}" if now == p["layout"] else f"{p['layout']} (the layout before {now})"
    age = p.get("age_s", 0.0)
    line = (f"predicted goodput at {where}: {p['goodput']:.2f} req/s (best: {p['best_layout']}, "
            f"{p['best_goodput']:.2f} req/s); {p['num_requests']} requests, "
            + (f"{age:.0f} s ago" if age < 120 else f"{age / 60:.0f} min ago"))
    return line + ("; recomputing" if p.get("computing") else "")
