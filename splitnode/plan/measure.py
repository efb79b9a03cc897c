"""Measuring a device's `Profile` with the real engine (`splitnode plan --profile`): the ladders of
prefills, the decode grid and mixed batches on one engine, the KV moves between two devices, the
slowdown of devices stepping at once, the board's power where NVML has it, and what the runtime
adds around the engine. What is measured, and why, is in profile.py's docstring; this module only
runs the measurements, within a time budget, with a progress callback.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import threading
import time
from dataclasses import replace

from splitnode.plan.profile import Profile, device_name, interp, model_key

PREFILL_LADDER = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
DECODE_BATCHES = (1, 256, 16, 64, 4, 128, 32, 8, 2)  # measured in this order: the corners first
DECODE_CONTEXTS = (16, 2048, 256, 1024, 64, 512, 4096, 128)

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
