"""The phase-split runtime: one worker per device with a role, a router that assigns each request
its prompt and token workers at arrival, live role changes, and an autoscaler for the mixed pool.

Everything here runs on the event loop thread; model compute runs on the workers' threads.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator

import torch

from splitnode.engine.config import EngineConfig
from splitnode.engine.engine import Engine, resolve_model_path
from splitnode.engine.llm import Prompt
from splitnode.model.tokenizer import Tokenizer
from splitnode.engine.outputs import RequestOutput, RequestState
from splitnode.runtime.pools import Autoscaler
from splitnode.runtime.router import Router
from splitnode.engine.sampling import SamplingParams
from splitnode.engine.sequence import Sequence
from splitnode.telemetry import GPUSampler, nvml_targets
from splitnode.runtime.transfer import KVMover
from splitnode.runtime.worker import Worker

log = logging.getLogger("splitnode")

ROLES = ("prompt", "token", "mixed")
MODES = ("migrate", "drain")


@dataclass
class RuntimeConfig(EngineConfig):
    """Engine options (per worker) plus the runtime's: devices, roles, transfer and pool policy."""

    devices: str | list[str] | None = None  # "cuda", "cuda:0,cuda:2", "cpu:3"; default: cuda, else cpu:3
    roles: dict[str, str] | None = None  # {"cuda:0": "prompt", ...}; default split from the count
    layerwise_min_tokens: int = 512  # prompts this long send their KV layer by layer
    transfer_timeout_s: float = 30.0  # past it the token worker recomputes the prefill
    reservation_lease_s: float = 30.0  # a destination's reserved blocks return unless renewed
    autoscale: bool = True
    borrow_prompt_tokens: int = 8192  # queued prompt tokens past which a token worker turns mixed
    borrow_kv_occupancy: float = 0.9  # token KV occupancy past which a prompt worker turns mixed
    repurpose_after_s: float = 120.0  # a worker borrowed this long changes pool for good
    autoscale_interval_s: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        self.devices = parse_devices(self.devices)
        if self.roles is None:
            self.roles = default_roles(self.devices)
        for name, role in self.roles.items():
            if name not in self.devices:
                raise ValueError(f"RuntimeConfig.roles names {name!r}, which is not among devices {self.devices}")
            if role not in ROLES:
                raise ValueError(f"RuntimeConfig.roles[{name!r}] must be one of {ROLES}, got {role!r}")
        self.roles = {d: self.roles.get(d, "mixed") for d in self.devices}
        check_phases(self.roles.values())
        if self.layerwise_min_tokens < 1 or self.transfer_timeout_s <= 0 or self.reservation_lease_s <= 0:
            raise ValueError("RuntimeConfig: layerwise_min_tokens, transfer_timeout_s and reservation_lease_s "
                             "must be positive")
        if not 0 < self.borrow_kv_occupancy <= 1:
            raise ValueError(f"RuntimeConfig.borrow_kv_occupancy must be in (0, 1], got {self.borrow_kv_occupancy}")


def parse_devices(spec) -> list[str]:
    if spec is None:
        # every GPU; without one three CPU workers, so the default split (1 prompt, 2 token) shows
        spec = "cuda" if torch.cuda.is_available() else "cpu:3"
    if isinstance(spec, (list, tuple)):
        names = [str(s).strip() for s in spec]
    elif spec == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError("devices='cuda' but no CUDA device is visible (use 'cpu:N' on a machine without GPUs)")
        names = [f"cuda:{i}" for i in range(n)]
    elif spec.startswith("cpu") and "," not in spec:  # "cpu:N": N CPU workers
        count = spec.partition(":")[2] or "1"
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"devices={spec!r}: write 'cpu:N' with N >= 1 CPU workers")
        names = [f"cpu:{i}" for i in range(int(count))]
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        kind, _, idx = n.partition(":")
        if kind not in ("cuda", "cpu") or not idx.isdigit():
            raise ValueError(f"device {n!r} is not 'cuda:N' or 'cpu:N'")
        if kind == "cuda" and int(idx) >= torch.cuda.device_count():
            raise ValueError(f"device {n!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    # A device named again gets another worker on it, named "cuda:0/1", "cuda:0/2", ...: two roles
    # on one GPU (each its own replica and a share of the memory; moves between them skip the copy).
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        unique.append(n if k == 0 else f"{n}/{k}")
    return unique


def torch_device(worker_name: str) -> str:
    """The torch device a worker runs on: "cuda:0/1" -> "cuda:0"; every CPU worker -> "cpu"."""
    base = worker_name.partition("/")[0]
    return "cpu" if base.startswith("cpu") else base


def run_event_loop(coro):
    """Runs the runtime's event loop: uvloop where it is installed, asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def default_roles(devices: list[str]) -> dict[str, str]:
    """One device: mixed. More: a third of them (at least one) prompt, the rest token, as decode
    is the longer phase for most chat traffic."""
    if len(devices) == 1:
        return {devices[0]: "mixed"}
    num_prompt = max(1, len(devices) // 3)
    return {d: ("prompt" if i < num_prompt else "token") for i, d in enumerate(devices)}


def check_phases(roles) -> None:
    roles = list(roles)
    if not any(r in ("prompt", "mixed") for r in roles):
        raise ValueError("no worker could run the prompt phase (give one the prompt or mixed role)")
    if not any(r in ("token", "mixed") for r in roles):
        raise ValueError("no worker could run the token phase (give one the token or mixed role)")


@dataclass
class _Stream:
    """A request seen from the loop. The queue holds the workers' snapshots (outputs count,
    finish reason), a few bytes each; the consumer turns each into its event when it takes it, so a
    slow consumer costs a queue of ints, not a copy of the whole output per token."""

    state: RequestState
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    ended: bool = False  # no more snapshots will come (finished, cancelled, failed)
    num_queued: int = 0


class Runtime:
    """`async with Runtime(RuntimeConfig(devices="cpu:3")) as rt:` then `rt.generate(...)`."""

    def __init__(self, config: RuntimeConfig | None = None, telemetry: GPUSampler | None = None, **kwargs):
        self.config = config or RuntimeConfig(**kwargs)
        self.telemetry = telemetry  # default: NVML for the CUDA devices, made in start()
        self.num_generated_tokens = 0
        self.started_at: float | None = None
        self.mover = KVMover()
        self.workers: list[Worker] = []
        self.pins: set[str] = set()
        self._ids = itertools.count()
        self._seeds = random.Random(self.config.seed)  # seeds of unseeded requests: runs repeat
        self._streams: dict[int, _Stream] = {}
        self._role_waiters: dict[str, list[asyncio.Future]] = {}
        self._finished_metrics: deque[dict[str, float]] = deque(maxlen=4096)
        self.num_finished = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.autoscaler = Autoscaler(self)
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "Runtime":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        cfg = self.config
        path = resolve_model_path(cfg.model)
        self.tokenizer = Tokenizer(path)
        per_device: dict[str, int] = {}
        for name in cfg.devices:
            dev = torch_device(name)
            per_device[dev] = per_device.get(dev, 0) + 1
        for i, name in enumerate(cfg.devices):
            dev = torch_device(name)
            w = Worker(self, i, name, dev, cfg.roles[name])
            # Workers sharing a GPU split its free memory; loaded one after another so each sees
            # what the previous ones took.
            share = 1.0 / per_device[dev] if dev != "cpu" else 1.0
            per_device[dev] -= 1 if dev != "cpu" else 0
            log.info("loading %s on %s (%s)", path, name, w.role)
            w.engine = await asyncio.to_thread(Engine, cfg, w.role, dev, path, share)
            self.workers.append(w)
        self.max_model_len = min(w.engine.max_model_len for w in self.workers)
        self.router = Router(self.workers, cfg.reservation_lease_s)
        for w in self.workers:
            w.thread.start()
        if cfg.autoscale:
            self._tasks.append(self.loop.create_task(self.autoscaler.run()))
        if self.telemetry is None:
            self.telemetry = GPUSampler(nvml_targets(cfg.devices))
        await asyncio.to_thread(self.telemetry.start)
        self.started_at = time.monotonic()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for w in self.workers:
            w.stopping = True
            w.wake.set()
        for w in self.workers:
            await asyncio.to_thread(w.thread.join)
        for s in self._streams.values():
            if not s.ended:
                s.queue.put_nowait(RuntimeError("the runtime stopped"))
        for name in list(self._role_waiters):
            self._fail_role_waiters(name, RuntimeError("the runtime stopped"))
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.stop)

    # -- requests -----------------------------------------------------------------------------------

    def _post(self, fn, *args) -> None:
        """From a worker thread: run fn on the loop."""
        self.loop.call_soon_threadsafe(fn, *args)

    def _new_request(self, prompt: Prompt, params: SamplingParams) -> RequestState:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        engine = self.workers[0].engine
        vocab = engine.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        engine.check_request(len(ids), params)
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt + max_tokens = {total} exceeds the maximum model length {self.max_model_len}")
        rid = next(self._ids)
        seq = Sequence(rid, ids, params, frozenset(self.tokenizer.eos_token_ids),
                       default_seed=self._seeds.getrandbits(63))
        return RequestState(rid, prompt if isinstance(prompt, str) else None, seq, self.tokenizer)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """One event per token (its `request_id` names the request for `cancel`); the last has
        `finished=True`. Leaving the loop early cancels the request."""
        st = self._new_request(prompt, params or SamplingParams())
        worker = self.router.route(st.seq)  # may refuse: nothing is registered yet
        stream = _Stream(st)
        self._streams[st.request_id] = stream
        worker.post("add", st.seq)
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                num_out, reason = item
                ev = st.update(st.num_seen if reason == "abort" else num_out, reason)
                if st.stopped_by_string and not stream.ended:
                    self._end(stream)
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
        self._cancel(stream)
        return True

    def _cancel(self, stream: _Stream) -> None:
        stream.state.seq.cancelled = True
        for w in self.workers:
            w.wake.set()

    def _on_events(self, events: list[tuple[Sequence, int, str | None]]) -> None:
        for seq, num_out, reason in events:
            stream = self._streams.get(seq.seq_id)
            if stream is None or stream.ended:
                continue
            if reason != "abort":
                self.num_generated_tokens += max(0, num_out - stream.num_queued)
                stream.num_queued = max(stream.num_queued, num_out)
            stream.queue.put_nowait((num_out, reason))
            if reason is not None:
                self._end(stream)

    def _end(self, stream: _Stream) -> None:
        stream.ended = True
        self.num_finished += 1
        self._finished_metrics.append(stream.state.metrics())

    def _on_worker_error(self, worker: Worker, error: BaseException) -> None:
        """Fails the requests the dead worker held (its thread is gone: reading its queues is
        safe); the router no longer picks it, and requests bound for it elsewhere go to another
        token worker at their hand-off."""
        held = [*worker.engine.batcher.running, *worker.engine.batcher.waiting, *(a[0] for a in worker.arrivals),
                *(op[1] for op in list(worker.inbox) if op[0] in ("add", "arrive"))]
        for seq in held:
            stream = self._streams.get(seq.seq_id)
            if stream is not None and not stream.ended:
                stream.ended = True
                stream.queue.put_nowait(RuntimeError(f"worker {worker.name} failed: {error!r}"))
        self._fail_role_waiters(worker.name, RuntimeError(f"device {worker.name} failed: {error!r}"))

    def _fail_role_waiters(self, name: str, error: BaseException) -> None:
        for _, fut in self._role_waiters.pop(name, []):
            if not fut.done():
                fut.set_exception(error)

    # -- roles ---------------------------------------------------------------------------------------

    def worker(self, device: str) -> Worker:
        for w in self.workers:
            if w.name == device:
                return w
        raise ValueError(f"unknown device {device!r}; devices are {[w.name for w in self.workers]}")

    async def assign(self, device: str, role: str, mode: str = "migrate", pin: bool = True) -> None:
        """Moves `device` to `role`. Its work of the old kind is migrated or drained, in-flight
        prefills finish, then the role flips. Pinned until `release(device)` unless pin=False."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        w = self.worker(device)
        if w.error is not None:
            raise RuntimeError(f"device {device} failed ({w.error!r}); it takes no role")
        check_phases([role if x is w else (x.target_role or x.role) for x in self.workers])
        if pin:
            self.pins.add(device)
        self.autoscaler.forget(w)
        if (w.target_role or w.role) == role and w.target_role is None:
            return
        fut = self.loop.create_future()
        with w.role_lock:  # the worker compares and clears under the same lock
            w.role_gen += 1
            self._role_waiters.setdefault(device, []).append((w.role_gen, fut))
            w.mode = mode
            w.target_role = role
        w.wake.set()
        await fut

    def release(self, device: str) -> None:
        """Unpins a device: the autoscaling policy may move it again."""
        self.worker(device)
        self.pins.discard(device)

    def _on_role_changed(self, w: Worker, gen: int, role: str) -> None:
        """The worker reached the role asked by change `gen`: that change and the ones it
        superseded are done; a later one still waits."""
        waiting = []
        for g, fut in self._role_waiters.pop(w.name, []):
            if g > gen:
                waiting.append((g, fut))
            elif not fut.done():
                fut.set_result(role)
        if waiting:
            self._role_waiters[w.name] = waiting

    # -- what a person sees ---------------------------------------------------------------------------

    def status(self) -> dict:
        def pct(values: list[float]) -> dict[str, float] | None:
            if not values:
                return None
            q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
            return {"p50": q[49], "p90": q[89], "p99": q[98]}

        devices = []
        for w in self.workers:
            e = w.engine
            devices.append({
                "name": w.name, "device": str(e.device), "role": w.role, "target_role": w.target_role,
                "pinned": w.name in self.pins, "borrowed_from": self.autoscaler.borrowed_from(w),
                "kv_blocks_used": e.pool.num_used, "kv_blocks_total": e.pool.num_blocks,
                "kv_blocks_reserved": e.pool.num_reserved, "waiting": len(e.batcher.waiting),
                "running": len(e.batcher.running), "arriving": len(w.arrivals),
                "batch_size": w.last_batch_size, "batch_tokens": w.last_batch_tokens,
                "pending_prompt_tokens": e.batcher.num_pending_prompt_tokens, "steps": w.num_steps,
                "busy_s": round(w.busy_s, 3), "error": None if w.error is None else repr(w.error),
                "gpu": self.telemetry.sample(w.name),  # NVML's latest, or why there is none
            })
        active = [s.state for s in self._streams.values() if not s.ended]
        done = list(self._finished_metrics)
        ttft = [m["ttft_s"] for m in done if "ttft_s" in m]
        tbt = [m["tbt_mean_s"] for m in done if "tbt_mean_s" in m]
        policy = {k: getattr(self.config, k) for k in (
            "autoscale", "borrow_prompt_tokens", "borrow_kv_occupancy", "repurpose_after_s",
            "layerwise_min_tokens", "transfer_timeout_s", "reservation_lease_s", "max_num_batched_tokens")}
        return {
            "runtime": {"model": self.config.model or "demo", "uptime_s": time.monotonic() - self.started_at},
            "devices": devices,
            "requests": {"active": len(active), "finished": self.num_finished,
                         "num_generated_tokens": self.num_generated_tokens, "ttft_s": pct(ttft),
                         "tbt_s": pct(tbt),
                         "in_flight": [{"request_id": s.request_id, **s.metrics()} for s in active]},
            "transfers": asdict(self.mover.stats),
            "policy": policy,
        }
