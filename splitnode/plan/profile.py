"""A device's cost model, measured on this box with the real engine (`splitnode plan --profile`).

What is measured, and why it is enough to replay splitnode's scheduling:
- prefill time of one fresh prompt against its tokens, a ladder up to the token budget; one batch
  of several prompts (what a batch shares: the step's fixed cost), and one chunk that runs after a
  prefix (attention over the prefix: the quadratic term chunked prefill pays);
- decode step time against batch size and context per sequence, a small grid;
- a mixed batch or two (a prefill and decodes in one step share the step's fixed cost);
- the KV move between two devices of the kind through the runtime's own mover, as a fixed cost
  per call plus a time per byte, for the whole-sequence and the per-layer path;
- with two or more devices of the kind, each step kind again while another device steps at the
  same time: workers are threads of one process, and on CPU the GIL couples them (README,
  "CPU devices"); the simulator applies the measured slowdown when devices overlap;
- on a GPU with NVML, the board's power while prefilling, decoding and idle (energy per token);
- a few requests alone through a real one-device `Runtime`, stamped as `bench serve` stamps them:
  what the runtime adds to the engine's steps (the worker's turn around each step, and the way
  from the client to the worker and back: thread hops, the event loop).

Between the measured points the model interpolates piecewise-linearly (and extrapolates from the
last segment). A profile is JSON in the user's cache dir, keyed by model, device name and dtype;
it records the splitnode version that measured it, and one from another version is refused (the
engine's speed is what it describes). `--profile-file` reads and writes any path, so a profile
measured on another box plans hardware that is not here.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import platform
import re
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

FORMAT = 1
PREFILL_LADDER = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
DECODE_BATCHES = (1, 256, 16, 64, 4, 128, 32, 8, 2)  # measured in this order: the corners first
DECODE_CONTEXTS = (16, 2048, 256, 1024, 64, 512, 4096, 128)


class ProfileError(ValueError):
    """A profile that cannot be used (missing, another version, malformed): one line for the user."""


def _version() -> str:
    from splitnode import __version__

    return __version__


def monotone(ys: list[float]) -> list[float]:
    """The closest non-decreasing sequence (least squares, pool adjacent violators): a step with
    more work never takes less time, and a shared machine's noise should not say otherwise."""
    blocks: list[list[float]] = []  # [sum, count]
    for y in ys:
        blocks.append([y, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    return [s / n for s, n in blocks for _ in range(n)]


def interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), xs ascending; below the first point its value (a step
    with less work still pays the fixed cost), above the last the last segment extended."""
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    i = bisect.bisect_left(xs, x)
    if i >= len(xs):
        i = len(xs) - 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass
class Profile:
    """One device kind running one model in one dtype. Times are seconds."""

    model: str
    device: str  # "NVIDIA H200", "AMD EPYC, 1 core"
    kind: str  # "cuda" or "cpu"
    dtype: str  # as asked ("auto" included): the key
    resolved_dtype: str
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    num_kv_blocks: int  # what the engine sized on the profiled device (the default capacity)
    kv_bytes_per_token: int  # every layer's K and V
    num_layers: int
    max_model_len: int
    prefill: dict  # {"tokens": [...], "s": [...], "shared_s": a, "quad_s": c}
    decode: list[dict]  # rows {"batch": b, "context": [...], "s": [...]}, ascending batch
    mixed: dict  # {"shared_s": s, "points": [[prefill_tokens, decodes, context, s], ...]}
    transfer: dict  # {"fixed_s", "s_per_byte", "layer_fixed_s", "sync"}
    # {own step kind: {the other device's step kind: [[batch or tokens, factor], ...]}}, kinds "decode"/"prefill"
    corun: dict | None = None
    power_w: dict | None = None  # {"prefill": W, "decode": W, "idle": W}; None: not measured (CPU)
    # {"step_s": added to every step, "latency_s": to every token's time, "loop_s_per_token": the event loop's
    # CPU per token (charged to the workers' steps when they take every one of the box's "cores")}
    overhead: dict | None = None
    measured: dict = field(default_factory=dict)  # when, how long, where, what was skipped
    version: str = field(default_factory=_version)
    format: int = FORMAT

    def __post_init__(self) -> None:
        self.decode = sorted(self.decode, key=lambda r: r["batch"])
        # The model reads the measured points made monotone (the JSON keeps them as measured): in
        # context along each row, then in batch size (a row is never below the one before it).
        self._rows = []
        for r in self.decode:
            ys = monotone(list(r["s"]))
            if self._rows:
                _, xs0, ys0 = self._rows[-1]
                ys = [max(y, interp(xs0, ys0, c)) for c, y in zip(r["context"], ys)]
            self._rows.append((r["batch"], list(r["context"]), ys))
        self._row_batches = [b for b, _, _ in self._rows]
        p = self.prefill
        self._pre = (list(p["tokens"]), monotone(list(p["s"])))
        self._shared, self._quad, self._mixed_shared = p["shared_s"], p["quad_s"], self.mixed["shared_s"]
        self._corun = {(own, other): ([a for a, _ in pts], [max(1.0, f) for _, f in pts])
                       for own, by_other in (self.corun or {}).items() for other, pts in by_other.items() if pts}
        over = self.overhead or {}
        self.step_overhead_s, self.latency_s = over.get("step_s", 0.0), over.get("latency_s", 0.0)
        self.loop_s_per_token, self.cores = over.get("loop_s_per_token", 0.0), over.get("cores")

    # -- the cost model ---------------------------------------------------------------------------

    def prefill_s(self, num_tokens: int) -> float:
        return interp(*self._pre, num_tokens)

    def chunk_s(self, num_tokens: int, num_computed: int) -> float:
        """A prefill chunk of `num_tokens` after `num_computed` tokens of its sequence: attention
        over the prefix adds 2*quad*n*k to a fresh prompt's time (the cross term of (n+k)^2)."""
        return self.prefill_s(num_tokens) + 2.0 * self._quad * num_tokens * num_computed

    def decode_s(self, num_decodes: int, context_sum: int) -> float:
        """A decode step of `num_decodes` sequences holding `context_sum` tokens in all."""
        rows, batches = self._rows, self._row_batches
        c = context_sum / num_decodes
        i = bisect.bisect_left(batches, num_decodes)
        if i < len(rows) and batches[i] == num_decodes or len(rows) == 1:
            return interp(rows[min(i, len(rows) - 1)][1], rows[min(i, len(rows) - 1)][2], c)
        if i == 0:
            return interp(rows[0][1], rows[0][2], c)
        if i >= len(rows):
            i = len(rows) - 1
        (b0, c0, s0), (b1, c1, s1) = rows[i - 1], rows[i]
        y0, y1 = interp(c0, s0, c), interp(c1, s1, c)
        return max(y0, y0 + (y1 - y0) * (num_decodes - b0) / (b1 - b0))

    def step_s(self, chunks: list[tuple[int, int]], num_decodes: int, context_sum: int) -> float:
        """One batch: prefill chunks [(tokens, computed before)], plus decodes. The chunks of one
        batch share the step's fixed cost once; a mixed batch shares it with its decodes."""
        t = 0.0
        if chunks:
            parts = [self.chunk_s(n, k) for n, k in chunks]
            t = max(max(parts), sum(parts) - self._shared * (len(parts) - 1))
        if num_decodes:
            d = self.decode_s(num_decodes, context_sum)
            t = max(t, d, t + d - self._mixed_shared) if chunks else d
        return t

    def move_s(self, num_bytes: int, layers: int = 0) -> float:
        """A KV move of `num_bytes`: in one mover call over every layer (the whole path), or in
        `layers` calls of one layer each (the layer-wise path)."""
        tr = self.transfer
        fixed = tr["layer_fixed_s"] * layers if layers else tr["fixed_s"]
        return fixed + num_bytes * tr["s_per_byte"]

    def corun_factor(self, is_prefill: bool, size: float, decoding: int, prefilling: int) -> float:
        """How much slower a step runs while other devices of the kind step at the same time:
        `decoding` of them in decode-only steps, `prefilling` in steps with prefill chunks (a
        decode step is mostly Python under the GIL, a prefill mostly matmuls that release it, so
        the neighbour's kind matters). Measured with one neighbour; more add up linearly."""
        own = "prefill" if is_prefill else "decode"
        f = 1.0
        for other, n in (("decode", decoding), ("prefill", prefilling)):
            pts = self._corun.get((own, other)) if n else None
            if pts is not None:
                f += (interp(*pts, size) - 1.0) * n
        return f

    def kv_blocks(self, block_size: int) -> int:
        """The profiled device's KV pool in blocks of `block_size` tokens (the same memory)."""
        return self.num_kv_blocks * self.block_size // block_size

    # -- storage ------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)  # a reader never sees half a profile
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProfileError(f"no profile at {path}: measure one with `splitnode plan --profile`") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ProfileError(f"{path} is not a readable profile ({e}); re-profile with `splitnode plan --profile`") from None
        return cls.from_json(data, str(path))

    @classmethod
    def from_json(cls, data: dict, where: str = "profile") -> Profile:
        if not isinstance(data, dict):
            raise ProfileError(f"{where} is not a splitnode profile (no JSON object); re-profile with `splitnode plan --profile`")
        version, now = data.get("version"), _version()
        if version != now or data.get("format") != FORMAT:
            raise ProfileError(f"{where} was measured by splitnode {version} (profile format {data.get('format')}); "
                               f"this is splitnode {now}, whose engine it may not describe: re-profile with "
                               "`splitnode plan --profile`")
        try:
            return cls(**data)
        except (TypeError, KeyError, IndexError, ValueError) as e:
            raise ProfileError(f"{where} is malformed ({e}); re-profile with `splitnode plan --profile`") from None


def profile_dir() -> Path:
    from splitnode.model.demo import default_cache_dir

    return default_cache_dir() / "profiles"


def profile_path(model: str, device: str, dtype: str) -> Path:
    """The cache file of (model, device name, dtype); the version is checked inside, so an old
    profile is found and refused with a reason instead of silently missing."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}--{device}--{dtype}").strip("_")
    return profile_dir() / f"{slug}.json"


def model_key(model: str | None) -> str:
    """The demo model's name, or a folder's name plus a hash of its config.json (the same
    checkpoint in another folder is the same model; a changed one is not)."""
    if model is None:
        from splitnode.model.demo import DEMO_NAME

        return DEMO_NAME
    path = Path(model).expanduser()
    config = path / "config.json"
    digest = hashlib.sha1(config.read_bytes()).hexdigest()[:8] if config.is_file() else "noconfig"
    return f"{path.name}-{digest}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name(worker: str, cpu_threads: int | None = None) -> str:
    """What a profile is keyed by: the GPU's name, or the CPU's with the cores one worker has."""
    from splitnode.runtime.config import torch_device

    dev = torch_device(worker)
    if dev == "cpu":
        n = cpu_threads or 1
        return f"{cpu_name()}, {n} core{'s' if n > 1 else ''}"
    import torch

    return torch.cuda.get_device_name(int(dev.partition(":")[2] or 0))


# -- measuring --------------------------------------------------------------------------------------------


class _Clock:
    """The measurement's time budget: optional points are skipped once it is spent."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.perf_counter(), budget_s
        self.skipped: list[str] = []

    @property
    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def allows(self, estimate_s: float, what: str) -> bool:
        if estimate_s <= self.left:
            return True
        self.skipped.append(what)
        return False


class _Meter:
    """Times the real engine on one device: fresh prompts, decodes placed as a hand-off places
    them (blocks allocated, prefix computed), mixed batches. Each point is the median of a few
    repetitions, more for short steps (a shared machine's noise is in the milliseconds)."""

    def __init__(self, engine, max_reps: int = 7):
        self.eng, self.max_reps = engine, max_reps
        self._ids = iter(range(1 << 62))

    def reps(self, estimate_s: float) -> int:
        return max(1, min(self.max_reps, int(0.5 / max(estimate_s, 1e-4))))

    def _seq(self, n: int, max_tokens: int):
        from splitnode.engine.sampling import SamplingParams
        from splitnode.engine.sequence import Sequence

        ids = [3 + (i * 7) % 250 for i in range(n)]  # byte ids: valid in every vocabulary here
        return Sequence(next(self._ids), ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))

    def _step(self) -> float:
        sync = self.eng.device.type == "cuda"
        if sync:
            import torch

            torch.cuda.synchronize(self.eng.device)
        t0 = time.perf_counter()
        self.eng.step()  # ends with the sampled ids on the host: the step is done
        return time.perf_counter() - t0

    def clear(self) -> None:
        b = self.eng.batcher
        for s in [*b.running, *b.waiting]:
            self.eng.abort(s)

    def prefill(self, n: int, prefix: int = 0, reps: int = 3) -> float:
        """A fresh prompt of n tokens (after `prefix` tokens of it in an earlier chunk: the token
        budget cuts the prompt there), one token out."""
        out = []
        for _ in range(reps):
            self.eng.add(self._seq(prefix + n, 1))
            if prefix:
                self._step()
            out.append(self._step())
        self.clear()
        return statistics.median(out)

    def batch_prefill(self, k: int, n: int, reps: int = 3) -> float:
        out = []
        for _ in range(reps):
            for _ in range(k):
                self.eng.add(self._seq(n, 1))
            out.append(self._step())
        self.clear()
        return statistics.median(out)

    def place_decodes(self, b: int, c: int) -> None:
        for _ in range(b):
            s = self._seq(c, 1 << 30)
            s.append_token(7)
            s.num_computed = c
            self.eng.pool.grow(s, c + 1)
            self.eng.add(s)  # arrives with its cache, as a hand-off does

    def decode(self, b: int, c: int, reps: int = 3) -> float:
        self.place_decodes(b, c)
        self._step()  # the first step after new sequences also sets them up (CPU decode mirror)
        out = [self._step() for _ in range(reps)]
        self.clear()
        return statistics.median(out)

    def mixed(self, n: int, b: int, c: int, reps: int = 3) -> float:
        self.place_decodes(b, c)
        self._step()
        out = []
        for _ in range(reps):
            self.eng.add(self._seq(n, 1))
            out.append(self._step())
        self.clear()
        return statistics.median(out)


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x (a, b >= 0)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
    return max(0.0, my - b * mx), b


def measure(devices: list[str], engine_kwargs: dict, budget_s: float = 60.0, progress=None) -> Profile:
    """Profiles the kind of `devices[0]` with the engine the runtime would build there (bound to
    its cores, as a CPU worker is); a second device of the kind, if given, gives the KV move and
    the co-run slowdown. `progress(description, fraction)` is told how far it is. Runs on a
    thread of its own, as a worker does (the binding is per thread)."""
    result: dict = {}

    def run() -> None:
        try:
            result["profile"] = _Profiler(devices, engine_kwargs, budget_s, progress or (lambda *_: None)).run()
        except BaseException as e:  # re-raised on the caller's thread
            result["error"] = e

    th = threading.Thread(target=run, name="splitnode-profile", daemon=True)
    th.start()
    th.join()
    if "error" in result:
        raise result["error"]
    return result["profile"]


def _bind(worker: str, cores: dict) -> None:
    """What `Worker._main` does for a CPU worker: this thread (and the OpenMP team it starts) on
    the worker's cores, torch's intra-op threads limited to them."""
    import torch

    mine = cores.get(worker)
    if mine:
        os.sched_setaffinity(threading.get_native_id(), mine)
        torch.set_num_threads(len(mine))


class _Profiler:
    """The phases of a measurement, in order of what the model cannot do without: prefill, decode,
    mixed, then (with a second device) moves and co-run. Optional points are skipped once the
    budget is spent; at least two prefill points and one decode point per batch row are kept."""

    def __init__(self, devices: list[str], engine_kwargs: dict, budget_s: float, progress):
        from splitnode.engine.config import EngineConfig
        from splitnode.runtime.config import cpu_core_sets, torch_device

        self.devices, self.budget_s, self.progress = devices, budget_s, progress
        fields = set(EngineConfig.__dataclass_fields__)
        self.cfg = EngineConfig(**{**{k: v for k, v in engine_kwargs.items() if k in fields}, "device": torch_device(devices[0])})
        kind = torch_device(devices[0]).partition(":")[0]
        self.same = [d for d in devices if torch_device(d).partition(":")[0] == kind]
        self.cores, _ = cpu_core_sets(devices, engine_kwargs.get("cpu_threads"))
        self.threads = len(self.cores[devices[0]]) if devices[0] in self.cores else (os.cpu_count() or 1)
        self.done = 0.0

    def tick(self, what: str, share: float) -> None:
        self.done = min(1.0, self.done + share)
        self.progress(what, self.done)

    def run(self) -> Profile:
        import torch

        from splitnode.engine.engine import Engine, resolve_model_path
        from splitnode.runtime.config import torch_device

        cfg, first = self.cfg, self.devices[0]
        unbound = os.sched_getaffinity(0)
        _bind(first, self.cores)
        path = resolve_model_path(cfg.model)
        t0 = time.perf_counter()
        self.progress(f"loading {cfg.model or 'the demo model'} on {first}", 0.0)
        with torch.inference_mode():
            eng = Engine(cfg, "mixed", torch_device(first), path)
            load_s = time.perf_counter() - t0
            self.clock = clock = _Clock(self.budget_s)
            m = _Meter(eng)
            for _ in range(2):  # warm-up: first calls allocate, compile and fill caches
                m.prefill(min(64, cfg.max_num_batched_tokens))
                m.decode(2, 16)
            mc = eng.model_config
            prof = Profile(model=model_key(cfg.model), device=device_name(first, self.threads), kind=eng.device.type,
                           dtype=cfg.dtype, resolved_dtype=str(eng.dtype).removeprefix("torch."), block_size=cfg.block_size,
                           max_num_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
                           num_kv_blocks=eng.pool.num_blocks,
                           kv_bytes_per_token=2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim
                           * eng.kv_cache.element_size(),
                           num_layers=mc.num_hidden_layers, max_model_len=eng.max_model_len,
                           prefill=self.prefill(m), decode=self.decode(m), mixed={"shared_s": 0.0, "points": []},
                           transfer={"fixed_s": 0.0, "s_per_byte": 0.0, "layer_fixed_s": 0.0, "sync": eng.device.type != "cuda"})
            prof = replace(prof, mixed=self.mixed(m, prof))
            if len(self.same) > 1:
                from splitnode.runtime.transfer import KVMover

                self.progress(f"loading a second engine on {self.same[1]}", self.done)
                other = Engine(cfg, "mixed", torch_device(self.same[1]), path)
                prof = replace(prof, transfer=_measure_moves(eng, other, KVMover(), clock))
                self.tick(f"KV moves {first} -> {self.same[1]}", 0.1)
                prof = replace(prof, corun=_measure_corun(m, other, self.same[1], self.cores, prof, clock, self.tick))
                del other
            power = _measure_power(m, first, prof, clock) if eng.device.type == "cuda" else None
            del m, eng  # the runtime below loads its own replica
        os.sched_setaffinity(threading.get_native_id(), unbound)  # the event loop's thread is nobody's worker
        overhead = self.overhead(prof)
        measured = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(self.budget_s - clock.left, 1),
                    "load_s": round(load_s, 1), "budget_s": self.budget_s, "host": platform.node(), "devices": self.devices,
                    "cpu_threads": self.threads if prof.kind == "cpu" else None, "skipped": clock.skipped}
        self.progress("done", 1.0)
        return replace(prof, power_w=power, overhead=overhead, measured=measured)

    def overhead(self, prof: Profile) -> dict:
        """Requests through a real Runtime on the first device (bound to its cores, as in any
        run), stamped by the bench's own `one_request`. One at a time: the median token gap over
        the engine's decode step is what the worker's turn adds to a step, and the TTFT over the
        prefill step (less that) the way from the client to the worker and back. Eight at once:
        the event loop's own CPU time per token delivered (its thread's CPU clock), which comes out
        of a worker's core when the workers take every core."""
        import asyncio

        from splitnode.goodput.load import one_request, run_load
        from splitnode.goodput.workloads import RequestSpec, prompt_ids
        from splitnode.runtime import Runtime, RuntimeConfig

        first = self.devices[0]
        fields = {k: getattr(self.cfg, k) for k in self.cfg.__dataclass_fields__ if k != "device"}
        cfg = RuntimeConfig(**fields, devices=[first], roles={first: "mixed"}, autoscale=False,
                            cpu_threads=self.threads if first.startswith("cpu") else None)
        specs = [RequestSpec(n, 12) for n in (16, 64, 16, 64, 16, 64, 16, 64) if n < prof.max_model_len - 12]
        batch = [RequestSpec(16, 48)] * 16
        vocab = list(range(3, 250))

        async def run() -> tuple[list[float], list[float], float]:
            ttft, gaps = [], []
            async with Runtime(cfg) as rt:
                for spec, ids in zip(specs, prompt_ids(specs, vocab)):
                    r = await one_request(rt, ids, spec, 0.0)
                    if not r.ok:
                        raise RuntimeError(f"a request alone failed while profiling: {r.error}")
                    ttft.append(r.ttft - prof.prefill_s(spec.prompt_len))
                    gaps += [g - prof.decode_s(1, spec.prompt_len + i + 1) for i, g in enumerate(r.gaps)]
                cpu0 = time.thread_time()  # this thread runs the event loop (and the client, as in the bench)
                done = await run_load(rt, prompt_ids(batch, vocab), batch, concurrency=8)
                loop_s = (time.thread_time() - cpu0) / max(1, sum(len(r.token_s) for r in done))
            return ttft, gaps, loop_s

        self.progress(f"requests through a runtime on {first}", self.done)
        ttft, gaps, loop_s = asyncio.run(run())
        step = max(0.0, statistics.median(gaps))
        self.tick("runtime overhead", 0.05)
        return {"step_s": step, "latency_s": max(0.0, statistics.median(ttft[2:]) - step), "loop_s_per_token": loop_s,
                "cores": len(os.sched_getaffinity(0))}

    def prefill(self, m: _Meter) -> dict:
        """A ladder of fresh prompts up to the budget; four prompts in one batch (what a batch's
        prompts share); one chunk after a prefix of a whole budget (the cross term)."""
        budget, max_len = self.cfg.max_num_batched_tokens, m.eng.max_model_len
        tokens: list[int] = []
        secs: list[float] = []
        for n in sorted({min(n, max_len - 1) for n in PREFILL_LADDER if n <= budget} | {min(budget, max_len - 1)}):
            one = secs[-1] * n / tokens[-1] if secs else 0.02
            if len(tokens) >= 2 and not self.clock.allows(one * m.reps(one), f"prefill {n}"):
                continue
            tokens.append(n)
            secs.append(m.prefill(n, reps=m.reps(one)))
            self.tick(f"prefill {n} tokens", 0.25 / 8)
        shared = 0.0
        if budget >= 256:
            one = interp(tokens, secs, 256)
            shared = (4 * interp(tokens, secs, 64) - m.batch_prefill(4, 64, reps=m.reps(one))) / 3
        quad = 0.0
        n = min(budget // 4, max_len - budget - 1)
        one = interp(tokens, secs, budget) + interp(tokens, secs, n)
        if n >= 16 and self.clock.allows(one * m.reps(one), "chunked prefill"):
            quad = max(0.0, (m.prefill(n, prefix=budget, reps=m.reps(one)) - interp(tokens, secs, n)) / (2 * n * budget))
            self.tick("a prefill chunk after a prefix", 0.05)
        return {"tokens": tokens, "s": secs, "shared_s": min(max(0.0, shared), secs[0]), "quad_s": quad}

    def decode(self, m: _Meter) -> list[dict]:
        """Decode steps over a grid of batch sizes and contexts, the cheapest points (fewest tokens
        held) first: a budget that runs out leaves out the largest, which are extrapolated."""
        cfg, cap_tokens = self.cfg, m.eng.pool.num_blocks * self.cfg.block_size
        points = sorted(((b, c) for b in DECODE_BATCHES if b <= cfg.max_num_seqs
                         for c in DECODE_CONTEXTS if c < m.eng.max_model_len and b * (c + 8) <= 0.9 * cap_tokens),
                        key=lambda p: (p[0] * p[1], p[0]))
        rows: dict[int, dict[int, float]] = {}
        for b, c in points:
            one = _decode_estimate(rows, b, c)
            reps = m.reps(one)
            if rows.get(b) and not self.clock.allows(one * (reps + 1), f"decode {b}x{c}"):
                continue
            rows.setdefault(b, {})[c] = m.decode(b, c, reps)
            self.tick(f"decode batch {b}, context {c}", 0.4 / len(points))
        return [{"batch": b, "context": sorted(r), "s": [r[c] for c in sorted(r)]} for b, r in sorted(rows.items())]

    def mixed(self, m: _Meter, prof: Profile) -> dict:
        """A prefill with decodes in one step: what they share, against the two alone."""
        budget, cap_tokens = self.cfg.max_num_batched_tokens, m.eng.pool.num_blocks * self.cfg.block_size
        points, shares = [], []
        for n, b, c in ((min(256, budget // 2), 8, 128), (min(64, budget // 4), 32, 256)):
            if b * (c + 8) + n > 0.9 * cap_tokens or n + b > budget or b > self.cfg.max_num_seqs - 1:
                continue
            f, d = prof.prefill_s(n), prof.decode_s(b, b * c)
            if shares and not self.clock.allows(3 * (f + d), f"mixed {n}+{b}"):
                continue
            t = m.mixed(n, b, c, reps=m.reps(f + d))
            points.append([n, b, c, t])
            shares.append(min(max(0.0, f + d - t), min(f, d)))
            self.tick(f"mixed batch: {n} prompt tokens + {b} decodes", 0.05)
        return {"shared_s": statistics.fmean(shares) if shares else 0.0, "points": points}


def _decode_estimate(rows: dict[int, dict[int, float]], b: int, c: int) -> float:
    """A guess at one decode step of (b, c) from the points so far (scaled by tokens held)."""
    seen = [(bb, cc, t) for bb, r in rows.items() for cc, t in r.items()]
    if not seen:
        return 0.05
    bb, cc, t = max(seen, key=lambda p: p[0] * p[1])
    return t * max(1.0, (b * c) / (bb * cc))


def _measure_moves(src, dst, mover, clock: _Clock) -> dict:
    """The mover's whole-sequence path at a few sizes (fixed cost + time per byte) and its
    per-layer path (the fixed cost of each layer's call)."""
    import torch

    n_layers = src.kv_cache.shape[1]
    per_block = src.kv_cache[:, :, 0].numel() * src.kv_cache.element_size()
    sizes, times = [], []
    cuda = src.device.type == "cuda" or dst.device.type == "cuda"

    def timed(blocks: int, layers: range) -> float:
        out = []
        for _ in range(3):
            ids = list(range(blocks))
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            mover.send(src, dst, ids, ids, layers)
            if cuda:
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    limit = min(src.pool.num_blocks, dst.pool.num_blocks)
    for blocks in (1, 16, 128, 512):
        if blocks <= limit and (len(sizes) < 2 or clock.allows(0.5, f"move {blocks} blocks")):
            sizes.append(blocks * per_block)
            times.append(timed(blocks, range(n_layers)))
    fixed, per_byte = _fit_line(sizes, times)
    blocks = min(16, limit)
    layer = timed(blocks, range(0, 1)) - blocks * per_block / n_layers * per_byte
    return {"fixed_s": fixed, "s_per_byte": per_byte, "layer_fixed_s": max(0.0, layer),
            "sync": src.device.type != "cuda", "bytes": sizes, "s": times}


def _measure_corun(m: _Meter, other, other_name: str, cores: dict, prof: Profile, clock: _Clock, tick) -> dict:
    """Each kind of step again while another engine of the kind steps without pause on its own
    thread (bound to its own cores), once decoding and once prefilling: the slowdown of devices
    that run at once, by what the neighbour runs. Each point is measured alone just before (the
    same minute of a shared machine)."""
    import torch

    points = [(kind, size) for kind, size in (("decode", 1), ("decode", 8), ("prefill", 64), ("decode", 32),
                                              ("prefill", 512), ("decode", 128))
              if size <= (prof.max_num_seqs if kind == "decode" else prof.max_num_batched_tokens)]

    def point(kind: str, size: int) -> float:
        one = prof.decode_s(size, size * 128) if kind == "decode" else prof.prefill_s(size)
        return m.decode(size, 128, m.reps(one)) if kind == "decode" else m.prefill(size, reps=m.reps(one))

    def background(mode: str, stop: threading.Event, started: threading.Event, errors: list) -> None:
        try:
            _bind(other_name, cores)
            om = _Meter(other)
            with torch.inference_mode():
                if mode == "decode":
                    om.place_decodes(16, 128)
                started.set()
                while not stop.is_set():
                    if mode == "prefill":
                        om.eng.add(om._seq(min(256, prof.max_num_batched_tokens), 1))
                    om._step()
                om.clear()
        except BaseException as e:
            errors.append(e)
            started.set()

    out: dict[str, dict[str, list]] = {"decode": {"decode": [], "prefill": []}, "prefill": {"decode": [], "prefill": []}}
    for i, (kind, size) in enumerate(points):
        one = prof.decode_s(size, size * 128) if kind == "decode" else prof.prefill_s(size)
        if i >= 2 and not clock.allows(9 * m.reps(one) * one, f"co-run {kind} {size}"):
            continue
        alone = point(kind, size)
        for mode in ("decode", "prefill"):
            stop, started, errors = threading.Event(), threading.Event(), []
            th = threading.Thread(target=background, args=(mode, stop, started, errors), name="splitnode-profile-corun",
                                  daemon=True)
            th.start()
            started.wait()
            try:
                if not errors:
                    out[kind][mode].append([size, point(kind, size) / alone])
            finally:
                stop.set()
                th.join()
            if errors:
                raise errors[0]
        tick(f"co-run {kind} {size}", 0.2 / len(points))
    return {own: {o: sorted(v) for o, v in by.items() if v} for own, by in out.items()}


def _measure_power(m: _Meter, worker: str, prof: Profile, clock: _Clock) -> dict | None:
    """NVML's power while prefills run back to back, while decodes do, and idle (about a second
    each); None where NVML gives no power."""
    from splitnode.telemetry import GPUSampler, nvml_targets

    if clock.left < 4:
        clock.skipped.append("power")
        return None
    sampler = GPUSampler(nvml_targets([worker]), interval_s=0.1)
    sampler.start()
    try:
        def watts(run) -> float | None:
            seen, t_end = [], time.perf_counter() + 1.0
            while time.perf_counter() < t_end:
                run()
                w = sampler.sample(worker).get("power_w")
                if w is not None:
                    seen.append(w)
            return statistics.fmean(seen) if seen else None

        pre = watts(lambda: m.prefill(prof.max_num_batched_tokens))
        dec = watts(lambda: m.decode(min(64, prof.max_num_seqs), 512))
        idle = watts(lambda: time.sleep(0.1))
    finally:
        sampler.stop()
    if pre is None or dec is None or idle is None or math.isnan(pre):
        return None
    return {"prefill": pre, "decode": dec, "idle": idle}
