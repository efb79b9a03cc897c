"""The phase-split runtime: one worker per device with a role, a router that assigns each request
its prompt and token workers at arrival, the pools (live role changes, pins, the autoscaler), and
the request streams.

Everything here runs on the event loop thread; model compute runs on the workers' threads, which
report through the runtime's `WorkerListener` methods (`on_*`), each hopping onto the loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import itertools
import logging
import random
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Protocol

from splitnode.engine.engine import Engine, resolve_model_path
from splitnode.engine.outputs import Prompt, RequestOutput, RequestState, new_request
from splitnode.engine.sampling import SamplingParams
from splitnode.model.tokenizer import Tokenizer
from splitnode.power import PowerCaps
from splitnode.runtime.config import RuntimeConfig, cpu_core_sets, default_roles, parse_devices, torch_device
from splitnode.runtime.messages import Add, Arrive, RoleReached, TokenEvent, WorkerFailed
from splitnode.runtime.pools import Autoscaler, Pools
from splitnode.runtime.router import Router
from splitnode.runtime.status import DeviceStatus, PolicyStatus, PredictionStatus, Status, percentiles
from splitnode.runtime.transfer import KVMover
from splitnode.runtime.worker import Worker
from splitnode.telemetry import GPUSampler, nvml_targets

log = logging.getLogger("splitnode")

__all__ = ["Overloaded", "Runtime", "RuntimeConfig", "default_roles", "parse_devices", "run_event_loop",
           "torch_device"]

# No tokenizer gives fewer tokens than characters / this (the longest tokens are runs of spaces or
# punctuation): a prompt longer than max_model_len * it can only be refused, and is, untokenized.
MAX_CHARS_PER_TOKEN = 64
IDLE_TRIM_S = 2.0  # idle this long, the process hands freed heap back to the OS (malloc_trim)


class Overloaded(RuntimeError):
    """Too many requests in flight (RuntimeConfig.max_active_requests): try again later."""


class Predictor(Protocol):
    """What fills `status()["prediction"]`: `splitnode.plan.predict.Predictor`. The planner sits
    above the runtime (it runs one to profile a device), so whoever builds the runtime passes it in."""

    def on_request_end(self, state: RequestState, finish_reason: str) -> None: ...
    def status(self, devices: list[DeviceStatus], policy: PolicyStatus) -> PredictionStatus: ...
    def close(self) -> None: ...


def run_event_loop(coro):
    """Runs the runtime's event loop: uvloop where it is installed, asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


@dataclass
class _Stream:
    """A request seen from the loop. The queue holds the workers' snapshots (`TokenEvent`s, a few
    bytes each); the consumer turns each into its event when it takes it, so a slow consumer costs
    a queue of snapshots, not a copy of the whole output per token."""

    state: RequestState
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    ended: bool = False  # no more snapshots will come (finished, cancelled, failed)
    cancelled: bool = False  # cancel() said True: the stream ends "abort", whatever comes after
    num_queued: int = 0


class Runtime:
    """`async with Runtime(RuntimeConfig(devices="cpu:3")) as rt:` then `rt.generate(...)`."""

    def __init__(self, config: RuntimeConfig | None = None, telemetry: GPUSampler | None = None,
                 power: PowerCaps | None = None, predictor: Predictor | None = None, **kwargs):
        self.config = config or RuntimeConfig(**kwargs)
        self.telemetry = telemetry  # default: NVML for the CUDA devices, made in start()
        self.power = power  # default: config.power_caps through NVML, made in start(); None: no caps
        self.predictor = predictor  # None: status() predicts nothing
        self.num_generated_tokens = 0
        self.num_finished = 0
        self.started_at: float | None = None
        self.mover = KVMover()
        self.workers: list[Worker] = []
        self.router = Router(self.workers, self.config.reservation_lease_s)
        self.pools = Pools(self.workers)
        self.autoscaler = Autoscaler(self.pools, self.config)
        self.tokenizer: Tokenizer | None = None
        self.max_model_len = 0
        self.cpu_warning: str | None = None  # CPU workers share cores (set in start())
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._seeds = random.Random(self.config.seed)  # seeds of unseeded requests: runs repeat
        self._streams: dict[int, _Stream] = {}
        self._finished_metrics: deque[dict[str, float]] = deque(maxlen=4096)
        # Called on the loop as each request ends, with its state and finish reason: how the API's
        # Prometheus histograms see every request (the socket's and the HTTP API's alike).
        self.request_end_hooks: list[Callable[[RequestState, str], None]] = []
        if predictor is not None:
            self.request_end_hooks.append(predictor.on_request_end)  # the lengths it predicts for
        self._tasks: list[asyncio.Task] = []
        # Tokenizing a long prompt takes long enough to stall every stream: off the loop it goes.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="splitnode-tokenize")

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        """Power caps go on first, so a refusal comes before minutes of loading; a start that
        fails (or is interrupted) after that puts every GPU's limit back."""
        cfg = self.config
        if self.power is None and cfg.power_caps:
            self.power = PowerCaps(cfg.power_caps, nvml_targets(cfg.devices))
        if self.power is not None:
            await asyncio.to_thread(self.power.apply, cfg.roles)
        try:
            await self._start()
        except BaseException:
            if self.power is not None:
                self.power.restore()  # not awaited: a cancelled start may not get another await
            raise

    async def _start(self) -> None:
        self.loop = asyncio.get_running_loop()
        cfg = self.config
        path = resolve_model_path(cfg.model)
        self.tokenizer = Tokenizer(path)
        cores, self.cpu_warning = cpu_core_sets(cfg.devices, cfg.cpu_threads)
        if self.cpu_warning:
            log.warning("%s", self.cpu_warning)
        per_device: dict[str, int] = {}
        for name in cfg.devices:
            dev = torch_device(name)
            per_device[dev] = per_device.get(dev, 0) + 1
        for i, name in enumerate(cfg.devices):
            dev = torch_device(name)
            # Workers sharing a GPU split its free memory; loaded one after another so each sees
            # what the previous ones took.
            share = 1.0 / per_device[dev] if dev != "cpu" else 1.0
            per_device[dev] -= 1 if dev != "cpu" else 0
            log.info("loading %s on %s (%s)", path, name, cfg.roles[name])
            engine = await asyncio.to_thread(Engine, cfg, cfg.roles[name], dev, path, share)
            self.workers.append(Worker(i, name, engine, self.mover, self, self.router.pick_dest,
                                       cfg.worker_policy, cores.get(name)))
        self.max_model_len = min(w.engine.max_model_len for w in self.workers)
        for w in self.workers:
            w.start()
        if cfg.autoscale:
            self._tasks.append(self.loop.create_task(self.autoscaler.run()))
        self._tasks.append(self.loop.create_task(self._trim_when_idle()))
        if self.telemetry is None:
            self.telemetry = GPUSampler(nvml_targets(cfg.devices))
        await asyncio.to_thread(self.telemetry.start)
        self.started_at = time.monotonic()

    async def stop(self) -> None:
        if self.power is not None:  # first, so nothing later in the way out can keep a GPU capped
            await asyncio.to_thread(self.power.restore)
        for t in self._tasks:
            t.cancel()
        for w in self.workers:
            w.stop()
        for w in self.workers:
            await asyncio.to_thread(w.join)
        for s in self._streams.values():
            if not s.ended:
                s.queue.put_nowait(RuntimeError("the runtime stopped"))
        self.pools.fail_all(RuntimeError("the runtime stopped"))
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.stop)
        if self.predictor is not None:
            await asyncio.to_thread(self.predictor.close)

    # -- requests -----------------------------------------------------------------------------------

    async def _new_request(self, prompt: Prompt, params: SamplingParams) -> RequestState:
        """Checked for size first (a 10 MB prompt is refused before it is tokenized), then
        tokenized and validated on the tokenizer threads. The id and the default seed are drawn
        here, in arrival order, so runs repeat."""
        if len(self._streams) >= self.config.max_active_requests:
            raise Overloaded(f"{len(self._streams)} requests in flight, the limit (max_active_requests); "
                             "try again later")
        limit = self.max_model_len * MAX_CHARS_PER_TOKEN if isinstance(prompt, str) else self.max_model_len
        if len(prompt) > limit:
            what = "characters" if isinstance(prompt, str) else "token ids"
            raise ValueError(f"prompt of {len(prompt)} {what} is longer than any request this runtime can run "
                             f"(the maximum model length is {self.max_model_len} tokens)")
        rid, seed = next(self._ids), self._seeds.getrandbits(63)
        return await self.loop.run_in_executor(self._tokenize_pool, new_request, rid, prompt, params, self.tokenizer,
                                               self.workers[0].engine, seed, self.max_model_len)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """One event per token (its `request_id` names the request for `cancel`); the last has
        `finished=True`. Leaving the loop early cancels the request. A request that fails on its
        own (its sampling raised) raises RuntimeError; the others go on."""
        st = await self._new_request(prompt, params or SamplingParams())
        worker = self.router.route(st.seq)  # may refuse: nothing is registered yet
        stream = _Stream(st)
        self._streams[st.request_id] = stream
        worker.post(Add(st.seq))
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    raise RuntimeError(f"request {st.request_id} failed: {item.error}")
                ev = st.update(st.num_seen if item.finish_reason == "abort" else item.num_out, item.finish_reason)
                if st.stopped_by_string and not stream.ended:
                    self._end(stream, "stop")
                    self._cancel(stream)
                yield ev
                if ev.finished:
                    return
        finally:
            if not stream.ended:
                self._cancel(stream)
            self._streams.pop(st.request_id, None)

    async def cancel(self, request_id: int) -> bool:
        """Stops a request; its stream ends with finish_reason "abort". False if unknown/done."""
        stream = self._streams.get(request_id)
        if stream is None or stream.ended:
            return False
        stream.cancelled = True
        self._cancel(stream)
        return True

    def _cancel(self, stream: _Stream) -> None:
        stream.state.seq.cancelled = True
        for w in self.workers:
            w.wake.set()

    def _end(self, stream: _Stream, finish_reason: str) -> None:
        stream.ended = True
        self.num_finished += 1
        self._finished_metrics.append(stream.state.metrics())
        for hook in self.request_end_hooks:
            hook(stream.state, finish_reason)

    async def _trim_when_idle(self) -> None:
        """glibc keeps the heap a load peak grew to (RSS went 3.6 -> 5.2 GB over ten load rounds in
        a soak): once nothing has run for IDLE_TRIM_S, it is handed back, once per idle spell."""
        trim = _malloc_trim()
        if trim is None:
            return
        seen, trimmed_at = -1, -1
        while True:
            await asyncio.sleep(IDLE_TRIM_S)
            busy = sum(w.num_steps for w in self.workers)
            if busy == seen and not self._streams and trimmed_at != busy:
                await asyncio.to_thread(trim, 0)
                trimmed_at = busy
            seen = busy

    # -- what the workers report (WorkerListener), called on their threads ----------------------------

    def on_tokens(self, events: list[TokenEvent]) -> None:
        self.loop.call_soon_threadsafe(self._take_events, events)

    def on_handoff(self, dest: Worker, arrive: Arrive) -> None:
        dest.post(arrive)  # a thread-safe append: no need to go through the loop

    def on_role_reached(self, msg: RoleReached) -> None:
        if self.power is not None:  # here, on the worker's thread: the loop never waits on NVML
            self.power.set_role(msg.worker, msg.role.value)
        self.loop.call_soon_threadsafe(self.pools.role_reached, msg)

    def on_failure(self, msg: WorkerFailed) -> None:
        self.loop.call_soon_threadsafe(self._worker_failed, msg)

    def _take_events(self, events: list[TokenEvent]) -> None:
        for ev in events:
            stream = self._streams.get(ev.seq_id)
            if stream is None or stream.ended:
                continue
            if stream.cancelled and ev.finish_reason is not None:
                ev = dataclasses.replace(ev, finish_reason="abort")  # its final event was on its way
            if ev.finish_reason != "abort":
                self.num_generated_tokens += max(0, ev.num_out - stream.num_queued)
                stream.num_queued = max(stream.num_queued, ev.num_out)
            stream.queue.put_nowait(ev)
            if ev.finish_reason is not None:
                self._end(stream, ev.finish_reason)

    def _worker_failed(self, msg: WorkerFailed) -> None:
        """Fails the requests the dead worker held (its thread is gone: reading its queues is
        safe); the router no longer picks it, and requests bound for it elsewhere go to another
        token worker at their hand-off."""
        worker = self.pools.worker(msg.worker)
        for seq_id in worker.held_sequence_ids():
            stream = self._streams.get(seq_id)
            if stream is not None and not stream.ended:
                stream.ended = True
                stream.queue.put_nowait(RuntimeError(f"worker {msg.worker} failed: {msg.error!r}"))
        self.pools.fail(msg.worker, RuntimeError(f"device {msg.worker} failed: {msg.error!r}"))

    # -- roles ---------------------------------------------------------------------------------------

    def worker(self, device: str) -> Worker:
        return self.pools.worker(device)

    async def assign(self, device: str, role: str, mode: str = "migrate", pin: bool = True) -> None:
        """Moves `device` to `role`. Its work of the old kind is migrated or drained, in-flight
        prefills finish, then the role flips. Pinned until `release(device)`; pin=False leaves it
        unpinned, a pin set before included: the autoscaling policy may move it again."""
        w = self.pools.check(device, role, mode)
        self.autoscaler.forget(w)  # a person's move ends a borrow
        if not pin:
            self.pools.release(device)
        await self.pools.assign(device, role, mode, pin)

    def release(self, device: str) -> None:
        """Unpins a device: the autoscaling policy may move it again."""
        self.pools.release(device)

    # -- what a person sees ---------------------------------------------------------------------------

    def status(self) -> Status:
        """The schema is `runtime.status.Status`; the socket, the CLI and the dashboard read it."""
        devices: list[DeviceStatus] = [{
            **w.status(), "pinned": w.name in self.pools.pins, "borrowed_from": self.autoscaler.borrowed_from(w),
            "gpu": self.telemetry.sample(w.name),  # NVML's latest, or why there is none
            "power_cap_w": None if self.power is None else self.power.cap_w(w.name),
        } for w in self.workers]
        active = [s.state for s in self._streams.values() if not s.ended]
        done = list(self._finished_metrics)
        policy: PolicyStatus = {k: getattr(self.config, k) for k in PolicyStatus.__annotations__}
        return {
            "runtime": {"model": self.config.model or "demo", "uptime_s": time.monotonic() - self.started_at,
                        "max_model_len": self.max_model_len,
                        "warnings": [self.cpu_warning] if self.cpu_warning else []},
            "devices": devices,
            "requests": {"active": len(active), "finished": self.num_finished,
                         "num_generated_tokens": self.num_generated_tokens,
                         "ttft_s": percentiles([m["ttft_s"] for m in done if "ttft_s" in m]),
                         "tbt_s": percentiles([m["tbt_mean_s"] for m in done if "tbt_mean_s" in m]),
                         "in_flight": [{"request_id": s.request_id, **s.metrics()} for s in active]},
            "transfers": asdict(self.mover.stats),
            "policy": policy,
            "signals": self.autoscaler.signals(),
            "prediction": (self.predictor.status(devices, policy) if self.predictor is not None
                           else {"available": False, "reason": "this runtime was started without a predictor"}),
        }


def _malloc_trim():
    """glibc's malloc_trim, or None where there is none (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
