"""Prometheus metrics of a Runtime, in the text format (prometheus_client), named as vLLM names its
own with a `splitnode:` prefix and a `model_name` label.

Two sources. What the runtime already counts (queues, KV blocks, roles, transfers, GPU telemetry,
generated tokens) is read from `Runtime.status()` when Prometheus scrapes, by a custom collector:
nothing is copied or kept in step between scrapes. What needs every request (the latency
histograms, prompt tokens, finish reasons) is observed as each request ends, through
`Runtime.request_end_hooks`, for the socket's requests and the HTTP API's alike.

Per-device gauges carry `device` and `role`; per-device counters carry `device` only, since a
counter whose labels change midway (a role change) starts a new series and breaks `rate()`.
GPU series appear only where NVML gave a reading: a CPU worker has none, and none is made up.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from splitnode.engine.outputs import RequestState
from splitnode.runtime import Runtime

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROLES = ("prompt", "token", "mixed")

# vLLM's buckets, with finer steps at the low end for GPU decode steps of a few milliseconds
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)

# status()["devices"][i]["gpu"] key (and the device's power_cap_w) -> (gauge, help, scale); energy_j,
# NVML's total since the driver loaded, is a counter of its own
_GPU_GAUGES = {
    "power_w": ("splitnode:gpu_power_watts", "GPU power draw (NVML)", 1.0),
    "power_limit_w": ("splitnode:gpu_power_limit_watts", "GPU power limit (NVML)", 1.0),
    "util_pct": ("splitnode:gpu_utilization_percent", "GPU utilisation, 0-100 (NVML)", 1.0),
    "mem_used_bytes": ("splitnode:gpu_memory_used_bytes", "GPU memory in use (NVML)", 1.0),
    "mem_total_bytes": ("splitnode:gpu_memory_total_bytes", "GPU memory (NVML)", 1.0),
    "temp_c": ("splitnode:gpu_temperature_celsius", "GPU temperature (NVML)", 1.0),
    "sm_clock_mhz": ("splitnode:gpu_sm_clock_hertz", "GPU SM clock (NVML)", 1e6),
    "power_cap_w": ("splitnode:gpu_power_cap_watts", "Power cap splitnode set (--power-cap)", 1.0),
}


def model_name(rt: Runtime) -> str:
    """The served model's name: its folder's (or file's) name, "demo" for the built-in model."""
    model = rt.config.model
    return "demo" if model is None else str(model).rstrip("/").rsplit("/", 1)[-1]


class Metrics:
    """One registry per runtime (not prometheus_client's global one: two servers in one process,
    as in the tests, each count their own). `close()` stops observing."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.model_name = model_name(rt)
        self.registry = CollectorRegistry()
        labels, reg, m = ["model_name"], self.registry, self.model_name
        self.ttft = Histogram("splitnode:time_to_first_token_seconds", "Time from arrival to the first token",
                              labels, buckets=TTFT_BUCKETS, registry=reg).labels(m)
        self.itl = Histogram("splitnode:inter_token_latency_seconds", "Time between two tokens of a request",
                             labels, buckets=ITL_BUCKETS, registry=reg).labels(m)
        self.e2e = Histogram("splitnode:e2e_request_latency_seconds", "Time from arrival to the last token",
                             labels, buckets=E2E_BUCKETS, registry=reg).labels(m)
        self.prompt_tokens = Counter("splitnode:prompt_tokens", "Prompt tokens of the requests that ended",
                                     labels, registry=reg).labels(m)
        self.finished = Counter("splitnode:request_success", "Requests ended, by finish reason (stop, length, abort)",
                                ["model_name", "finished_reason"], registry=reg)
        reg.register(_StatusCollector(rt, m))
        ProcessCollector(registry=reg)  # RSS, CPU seconds, open fds of this process
        rt.request_end_hooks.append(self.observe)

    def observe(self, state: RequestState, finish_reason: str) -> None:
        seq = state.seq
        times = list(seq.token_times)  # the worker may still append to it (a stop string ended it)
        self.prompt_tokens.inc(seq.num_prompt_tokens)
        self.finished.labels(self.model_name, finish_reason).inc()
        if seq.first_token_time is None or not times:
            return
        self.ttft.observe(seq.first_token_time - seq.arrival_time)
        self.e2e.observe(times[-1] - seq.arrival_time)
        for a, b in zip(times, times[1:]):
            self.itl.observe(b - a)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def close(self) -> None:
        if self.observe in self.rt.request_end_hooks:
            self.rt.request_end_hooks.remove(self.observe)


class _StatusCollector:
    """Reads `Runtime.status()` at scrape time."""

    def __init__(self, rt: Runtime, model: str):
        self.rt = rt
        self.model = model
        self._last_busy: dict[str, tuple[float, float]] = {}  # device -> (time, busy_s) at the previous scrape

    def describe(self):
        return []  # names depend on the devices and on NVML: nothing to check at registration

    def collect(self):
        st, m = self.rt.status(), self.model
        req, devices = st["requests"], st["devices"]

        def gauge(name: str, doc: str, value: float, labels: dict | None = None) -> GaugeMetricFamily:
            labels = {"model_name": m, **(labels or {})}
            g = GaugeMetricFamily(name, doc, labels=list(labels))
            g.add_metric(list(labels.values()), value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([m], value)
            return c

        waiting = sum(d["waiting"] for d in devices)
        yield gauge("splitnode:num_requests_waiting", "Requests queued on a device with no KV blocks yet", waiting)
        yield gauge("splitnode:num_requests_running", "Requests in flight that are not waiting",
                    max(0, req["active"] - waiting))
        yield counter("splitnode:generation_tokens", "Tokens generated", req["num_generated_tokens"])
        yield from self._devices(devices, st["runtime"]["uptime_s"])
        t = st["transfers"]
        yield counter("splitnode:kv_transfer_bytes", "KV cache bytes moved between devices", t["bytes_moved"])
        yield counter("splitnode:kv_transfer_seconds", "Copy time of the KV moves", t["seconds"])
        yield counter("splitnode:kv_transfers", "KV moves issued (one per layer, or per sequence)", t["num_transfers"])
        yield counter("splitnode:kv_transfer_sequences", "Sequences whose KV moved", t["num_sequences"])
        yield counter("splitnode:kv_transfers_failed", "KV moves that failed or timed out (recomputed)", t["num_failed"])
        yield gauge("splitnode:kv_transfers_in_flight", "KV moves under way", t["in_flight"])

    def _devices(self, devices: list[dict], uptime_s: float):
        m = self.model
        dev_role, dev = ["model_name", "device", "role"], ["model_name", "device"]
        gauges = {key: GaugeMetricFamily(f"splitnode:{key}", doc, labels=dev_role) for key, doc in (
            ("kv_blocks_used", "KV cache blocks in use"),
            ("kv_blocks_reserved", "KV cache blocks reserved for prompts prefilled elsewhere"),
            ("kv_blocks_total", "KV cache blocks"),
            ("batch_size", "Sequences in the device's last batch"),
            ("batch_tokens", "Tokens in the device's last batch"),
        )}
        busy_share = GaugeMetricFamily("splitnode:device_busy_fraction", "Share of the time since the previous scrape "
                                       "spent in batches (rate(splitnode:device_busy_seconds_total) for any window)",
                                       labels=dev_role)
        role = GaugeMetricFamily("splitnode:device_role", "1 for the device's role, 0 for the others", labels=dev_role)
        busy = CounterMetricFamily("splitnode:device_busy_seconds", "Time spent in batches", labels=dev)
        changes = CounterMetricFamily("splitnode:device_role_changes", "Role changes since start", labels=dev)
        gpu: dict[str, GaugeMetricFamily] = {}
        energy = CounterMetricFamily("splitnode:gpu_energy_joules", "GPU energy since the driver loaded (NVML)",
                                     labels=dev)
        now = time.monotonic()
        for d in devices:
            name, labels = d["name"], [m, d["name"], d["role"]]
            for key, family in gauges.items():
                family.add_metric(labels, d[key])
            then, busy_then = self._last_busy.get(name, (now - uptime_s, 0.0))
            self._last_busy[name] = (now, d["busy_s"])
            share = (d["busy_s"] - busy_then) / (now - then) if now > then else 0.0
            busy_share.add_metric(labels, min(max(share, 0.0), 1.0))
            for r in ROLES:
                role.add_metric([m, name, r], float(r == d["role"]))
            busy.add_metric([m, name], d["busy_s"])
            changes.add_metric([m, name], d.get("role_changes", 0))
            sample = d.get("gpu") or {}
            if not sample.get("available"):
                continue  # a CPU worker, or no NVML: no reading, no series
            readings = {**sample, "power_cap_w": d.get("power_cap_w")}
            for key, (metric, doc, scale) in _GPU_GAUGES.items():
                if readings.get(key) is not None:
                    gpu.setdefault(metric, GaugeMetricFamily(metric, doc, labels=dev_role)).add_metric(
                        labels, readings[key] * scale)
            if sample.get("energy_j") is not None:
                energy.add_metric([m, name], sample["energy_j"])
        yield from (*gauges.values(), busy_share, role, busy, changes, *gpu.values())
        if energy.samples:
            yield energy
