"""A discrete-event simulation of splitnode's own scheduling, timed by device profiles.

What it replays, rule for rule from the runtime (the comments name the function it follows):
- the router's joint choice at arrival (`Router.route`): the prompt device with the fewest pending
  prompt tokens, the token device with the most free KV blocks, its blocks reserved for the prompt;
  a mixed prompt device keeps its request; none reserved while the prompt device has stuck hand-offs;
- each device's batcher (`Batcher.schedule`, ported as it is): decodes that waited too long first,
  FCFS prefill chunks under the token budget, then the other decodes; preemption of the newest
  sequence outside the batch when blocks run out, bounded per request;
- the hand-off (`Worker._hand_off`): the reservation grown to the sequence, else any token device
  with room, else every not-yet-prefilled sequence gives its reservation up and the KV waits;
  prompts of `layerwise_min_tokens` and more send their KV layer by layer during the prefill, the
  others in one piece after it; a CPU worker copies on its own thread (its next batch waits), a
  GPU copies on its transfer stream;
- a worker's turn (`Worker._turn`): land arrived KV, hand off, change role, one batch; and the
  autoscaler's borrow/return/re-purpose rules (`Autoscaler.tick`) when it is on.

Step times come from each device's `Profile`, plus what the runtime adds around the engine, all
measured through a real runtime: a fixed time per step, a latency from the worker to the client on
every token, and, when CPU workers take every core, the event loop's CPU per token (charged to the
step that emitted them: the loop then runs on a worker's core). A step that starts while other
devices step is slowed by the profile's co-run factor for what they run (the GIL between CPU
workers). Not modelled: the GIL held by the event loop itself, the OS placing threads, lease
expiry, failures, the 5 ms poll a worker waits between retries of a stuck hand-off (the simulation
retries as soon as blocks free).

Speed: a decode that runs in every step of its device is not touched per token. Each device keeps
the end time of each of its steps; a sequence records runs of consecutive steps (device, first,
last) and its finish and next block boundary sit in heaps keyed by step number, so a step in which
every running decode takes part (the common case on a token device) costs O(1) plus the sequences
that finish or cross a block boundary in it. Every other step runs the ported batcher over the
device's sequences. Token times are expanded from the runs at the end (`RequestResult.token_s`).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field, replace
from itertools import chain

from splitnode.engine.batcher import Role
from splitnode.goodput.slo import Alone, RequestResult
from splitnode.goodput.workloads import RequestSpec
from splitnode.plan.profile import Profile

WAITING, RUNNING, ARRIVING, FINISHED = range(4)
_ARRIVE, _STEP_END, _TURN, _LAND, _TICK = range(5)


class SimDeadlock(RuntimeError):
    """Nothing left to happen while requests are unfinished: a policy bug (or a KV pool too small
    for one request), never a property of the workload."""


@dataclass(frozen=True)
class Policy:
    """The runtime's knobs the simulation follows (RuntimeConfig's fields of the same names)."""

    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_preemptions: int = 4
    decode_max_skips: int = 2
    layerwise_min_tokens: int = 512
    max_active_requests: int = 4096
    max_model_len: int | None = None
    num_kv_blocks: int | None = None  # per device; default: the profile's
    autoscale: bool = False
    borrow_prompt_tokens: int = 8192
    borrow_kv_occupancy: float = 0.9
    repurpose_after_s: float = 120.0
    autoscale_interval_s: float = 0.25
    drain_timeout_s: float = 60.0

    @classmethod
    def from_config(cls, config, **overrides) -> Policy:
        """From a RuntimeConfig (or EngineConfig): the same values the runtime runs with."""
        names = cls.__dataclass_fields__
        return cls(**{**{k: getattr(config, k) for k in names if hasattr(config, k)}, **overrides})


class _Seq:
    __slots__ = ("i", "prompt", "out", "arrival", "tok", "comp", "blocks", "state", "npre", "nskip", "dest", "hres",
                 "sent", "ready_t", "pieces", "run0", "runtok", "ver")

    def __init__(self, i: int, spec: RequestSpec, arrival: float):
        self.i, self.prompt, self.out, self.arrival = i, spec.prompt_len, spec.output_len, arrival
        self.tok, self.comp, self.blocks = spec.prompt_len, 0, 0  # tokens (prompt + out), with KV, blocks held
        self.state, self.npre, self.nskip = WAITING, 0, 0
        self.dest, self.hres, self.sent, self.ready_t = None, 0, 0, 0.0  # token side: device, blocks held there
        self.pieces: list[tuple[list[float], int, int]] = []  # token times: runs of a device's step ends
        self.run0, self.runtok, self.ver = -1, 0, 0  # the run under way: first step, tokens then; heap version

    @property
    def is_decode(self) -> bool:
        return self.comp > 0 and self.tok - self.comp == 1


class _Dev:
    def __init__(self, index: int, name: str, role: Role, profile: Profile, num_blocks: int, block_size: int):
        self.index, self.name, self.role, self.profile = index, name, role, profile
        self.block_bytes = profile.kv_bytes_per_token * block_size
        self.decoding = role.decodes  # role.decodes, read every step
        self.target: Role | None = None
        self.mode, self.change_t = "migrate", 0.0
        self.num_blocks = self.free = num_blocks
        self.times: list[float] = []  # end of each step; every token's time is one of these
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []  # prefills under way, in arrival order
        self.decodes: dict[_Seq, None] = {}  # prefilled sequences held here (an ordered set)
        self.arrivals: list[_Seq] = []  # KV landed: admitted at the next turn
        self.joiners: list[_Seq] = []  # decodes held here that are in no run (may be stale: checked on use)
        self.fin: list = []  # (step, seq index, version, seq): the step a running decode ends in
        self.grow: list = []  # (step, ...): the step a running decode may need a new block
        self.n_run = self.run_sum = 0  # running decodes in a run; sum of (runtok - run0) over them
        self.busy = self.in_step = self.blocked = False
        self.routed = self.done = self.stuck = self.num_handoffs = 0
        self.xfer_t = 0.0  # when this GPU's transfer stream is free
        self.step: tuple | None = None  # the batch in flight: (chunks, layer-wise jobs, is_prefill)
        self.steps = self.preemptions = self.bytes_moved = self.peak_used = 0
        self.busy_s = self.prefill_s = 0.0

    @property
    def accepts_prefill(self) -> bool:
        return self.target is None and self.role.takes_prompts

    @property
    def accepts_decode(self) -> bool:
        return self.target is None and self.role.decodes

    @property
    def decodes_after_change(self) -> bool:
        return (self.target or self.role).decodes

    def pending_prompt_tokens(self) -> int:
        return sum(s.tok - s.comp for s in self.waiting) + sum(s.tok - s.comp for s in self.running)


@dataclass
class SimResult:
    results: list[RequestResult]  # in the order of the specs given
    devices: list[dict] = field(default_factory=list)  # per device: role at the end, steps, busy time, KV peak, ...
    end_s: float = 0.0
    num_events: int = 0
    energy_j: float | None = None  # every device's, where each profile has power


class Simulator:
    """`Simulator(devices, policy).run(specs, arrivals)`; devices are (name, role, profile)."""

    def __init__(self, devices: list[tuple[str, str | Role, Profile]], policy: Policy = Policy()):
        if not devices:
            raise ValueError("no devices to simulate")
        self.policy = policy
        self.bs = policy.block_size
        self.devs = [_Dev(i, name, Role(role), prof, policy.num_kv_blocks or prof.kv_blocks(self.bs), self.bs)
                     for i, (name, role, prof) in enumerate(devices)]
        self.max_len = min([p.max_model_len for _, _, p in devices] + [d.num_blocks * self.bs for d in self.devs]
                           + ([policy.max_model_len] if policy.max_model_len else []))
        self._events: list = []
        self._seqno = 0
        self._in_step = self._in_prefill = 0  # devices in a step; of them, in a step with prefill chunks
        self._waiters: set[_Dev] = set()  # stuck hand-offs or an empty batch: woken when blocks free
        self._borrowed: dict[_Dev, tuple[Role, float]] = {}
        self.num_borrows = 0
        self.fast_path = True  # tests turn it off: both paths must give the same results
        self._max_batch = min(policy.max_num_seqs, policy.max_num_batched_tokens)
        # The event loop's CPU per token comes out of a worker's core when CPU workers take every
        # core of the profiled box (`bench serve` measures a request alone with a core to spare).
        cpu = [p for _, _, p in devices if p.kind == "cpu"]
        threads = sum((p.measured or {}).get("cpu_threads") or 1 for p in cpu)
        self._loop_s = {d.index: d.profile.loop_s_per_token if d.profile.kind == "cpu" and d.profile.cores
                        and threads >= d.profile.cores else 0.0 for d in self.devs}

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.bs)

    def _push(self, t: float, kind: int, obj) -> None:
        self._seqno += 1
        heapq.heappush(self._events, (t, self._seqno, kind, obj))

    # -- the run ---------------------------------------------------------------------------------------

    def run(self, specs: list[RequestSpec], arrivals: list[float]) -> SimResult:
        if len(specs) != len(arrivals):
            raise ValueError(f"{len(specs)} requests but {len(arrivals)} arrival times")
        order = sorted(range(len(specs)), key=lambda i: arrivals[i])
        results: list[RequestResult | None] = [None] * len(specs)
        seqs: list[_Seq | None] = [None] * len(specs)
        self._unfinished, self._to_arrive = 0, len(order)
        if order:
            self._push(arrivals[order[0]], _ARRIVE, 0)
        if self.policy.autoscale and order:
            self._push(arrivals[order[0]] + self.policy.autoscale_interval_s, _TICK, None)
        events = 0
        t = 0.0
        while self._events:
            t, _, kind, obj = heapq.heappop(self._events)
            events += 1
            if kind == _STEP_END:
                self._end_step(obj, t)
            elif kind == _ARRIVE:
                self._to_arrive -= 1
                i = order[obj]
                results[i], seqs[i] = self._arrive(i, specs[i], t)
                if obj + 1 < len(order):
                    self._push(arrivals[order[obj + 1]], _ARRIVE, obj + 1)
            elif kind == _LAND:
                dev, s = obj
                dev.arrivals.append(s)
                self._wake(dev, t)
            elif kind == _TURN:
                self._turn(obj, t)
            elif kind == _TICK and (self._unfinished or self._to_arrive):
                self._tick(t)
                if self._events or any(d.busy for d in self.devs):  # else nothing can happen any more
                    self._push(t + self.policy.autoscale_interval_s, _TICK, None)
        if self._unfinished:
            raise SimDeadlock(f"{self._unfinished} requests never finished: nothing was left to run at t={t:.3f}s")
        late = max(d.profile.latency_s for d in self.devs)  # client <-> worker, added to every token's time
        for i, s in enumerate(seqs):
            if s is not None:
                times = chain.from_iterable(times[a:b] for times, a, b in s.pieces)
                results[i].token_s = [x + late for x in times] if late else list(times)
        return SimResult(results, [self._device_stats(d, t) for d in self.devs], t, events, self._energy(t))

    def _arrive(self, i: int, spec: RequestSpec, t: float) -> tuple[RequestResult, _Seq | None]:
        r = RequestResult(spec.prompt_len, spec.output_len, t)
        if spec.prompt_len + spec.output_len > self.max_len:
            r.error = (f"ValueError: prompt ({spec.prompt_len} tokens) + max_tokens ({spec.output_len}) exceeds the "
                       f"maximum model length {self.max_len}")
            return r, None
        if self._unfinished >= self.policy.max_active_requests:
            r.error = "Overloaded: too many requests in flight (max_active_requests)"
            return r, None
        s = _Seq(i, spec, t)
        self._unfinished += 1
        p = self._route(s)
        p.waiting.append(s)
        self._wake(p, t)
        return r, s

    def _wake(self, d: _Dev, t: float) -> None:
        if not d.busy:
            d.busy = True
            self._push(t, _TURN, d)

    def _freed(self, t: float) -> None:
        """Blocks came free somewhere: devices waiting for room look again."""
        if self._waiters:
            waiters, self._waiters = sorted(self._waiters, key=lambda d: d.index), set()
            for d in waiters:  # in a fixed order: a run repeats exactly
                self._wake(d, t)

    # -- routing (Router.route, Router.pick_dest) ---------------------------------------------------------

    def _route(self, s: _Seq) -> _Dev:
        cands = [d for d in self.devs if d.accepts_prefill] or [d for d in self.devs if (d.target or d.role).takes_prompts]
        best = min(max(0, d.routed - d.done) for d in cands)
        ties = [d for d in cands if max(0, d.routed - d.done) == best]
        p = ties[0] if len(ties) == 1 else min(ties, key=lambda d: (d.pending_prompt_tokens(), d.index))
        p.routed += s.tok
        if (p.role is Role.MIXED and p.target is None) or p.stuck:
            return p
        n = self.blocks_for(s.prompt + 1)
        for d in self._by_headroom(p):
            if d.free >= n:
                d.free -= n
                s.dest, s.hres = d, n
                p.num_handoffs += 1
                self._note_used(d)
                break
        return p

    def _by_headroom(self, exclude: _Dev) -> list[_Dev]:
        return sorted((d for d in self.devs if d is not exclude and d.accepts_decode), key=lambda d: (-d.free, d.index))

    def _pick_dest(self, s: _Seq, exclude: _Dev) -> tuple[_Dev | None, int]:
        n = self.blocks_for(s.tok)
        for d in self._by_headroom(exclude):
            if d.free >= n:
                d.free -= n
                self._note_used(d)
                return d, n
        return None, 0

    def _release_handoff(self, s: _Seq, owner: _Dev, t: float) -> None:
        if s.dest is not None:
            s.dest.free += s.hres
            s.dest, s.hres, s.sent = None, 0, 0
            owner.num_handoffs -= 1
            self._freed(t)

    @staticmethod
    def _note_used(d: _Dev) -> None:
        used = d.num_blocks - d.free
        if used > d.peak_used:
            d.peak_used = used

    # -- a worker's turn (Worker._turn) --------------------------------------------------------------------

    def _turn(self, d: _Dev, t: float) -> None:
        if d.arrivals:  # Worker._admit_arrivals: the KV is complete
            for s in d.arrivals:
                s.state = RUNNING
                d.decodes[s] = None
            d.joiners += d.arrivals
            d.arrivals = []
        if d.decodes and (d.num_handoffs or d.target is not None or not d.decoding):
            dt = self._hand_off(d, t)
            if dt > 0:  # a CPU worker copies on its own thread: its batch waits for the copies
                self._push(t + dt, _TURN, d)
                return
        else:
            d.stuck = 0
        if d.target is not None:
            self._change_role(d)
        if not (d.waiting or d.running or (d.decoding and d.decodes)):
            d.busy = False
            return
        k = len(d.times)
        step = (self.fast_path and self._schedule_fast(d, k)) or self._schedule(d, k)
        chunks, num_decodes, context = step
        if not chunks and not num_decodes:
            d.busy, d.blocked = False, True  # nothing fits: wait for blocks to free
            self._waiters.add(d)
            return
        prof = d.profile
        jobs = ()
        if chunks:
            dur = prof.step_s([(n, s.comp) for s, n in chunks], num_decodes, context)
            jobs = self._layer_jobs(d, chunks)
            if jobs and prof.transfer["sync"]:  # the layer hook copies inside the forward
                dur += sum(prof.move_s(nbytes, layers=prof.num_layers) for _, nbytes in jobs)
        else:
            dur = prof.decode_s(num_decodes, context)
        loop_s = self._loop_s[d.index]
        if loop_s:  # the tokens this step hands to the event loop
            dur += loop_s * (num_decodes + sum(s.comp + n == s.tok for s, n in chunks))
        dur += prof.step_overhead_s
        if self._in_step:
            dur *= prof.corun_factor(bool(chunks), sum(n for _, n in chunks) if chunks else num_decodes,
                                     self._in_step - self._in_prefill, self._in_prefill)
        d.step = (chunks, jobs) if chunks else None
        d.in_step, d.blocked = True, False
        self._in_step += 1
        self._in_prefill += bool(chunks)
        d.busy_s += dur
        if chunks:
            d.prefill_s += dur
        self._seqno += 1
        heapq.heappush(self._events, (t + dur, self._seqno, _STEP_END, d))

    def _layer_jobs(self, d: _Dev, chunks) -> list[tuple[_Seq, int]]:
        """Worker._layer_jobs: chunks of long prompts whose reservation covers them, every
        earlier chunk sent layer by layer too. Returns (seq, bytes of the chunk over all layers)."""
        jobs = []
        bs = self.bs
        for s, n in chunks:
            if (s.dest is None or s.is_decode or s.prompt < self.policy.layerwise_min_tokens
                    or s.hres < s.blocks or s.sent != s.comp):
                continue
            nblocks = self.blocks_for(s.comp + n) - s.comp // bs
            jobs.append((s, nblocks * d.block_bytes))
        return jobs

    def _end_step(self, d: _Dev, t: float) -> None:
        d.in_step = False
        self._in_step -= 1
        self._in_prefill -= d.step is not None
        d.steps += 1
        k = len(d.times)
        d.times.append(t)
        fin = d.fin
        while fin and fin[0][0] <= k:
            step, _, ver, s = heapq.heappop(fin)
            if ver == s.ver:
                assert step == k, "a decode's last step went by"
                self._finish(d, s, k, t)
        if d.step is not None:
            self._end_chunks(d, k, t)
        self._turn(d, t)  # Worker._turn: hand off what the batch finished, then the next batch

    def _end_chunks(self, d: _Dev, k: int, t: float) -> None:
        chunks, jobs = d.step
        d.step = None
        for s, n in chunks:
            s.comp += n
            d.done += n
            if s.comp == s.tok:  # the chunk ends its sequence: one token sampled
                s.pieces.append((d.times, k, k + 1))
                s.tok += 1
                d.running.remove(s)
                if s.tok - s.prompt >= s.out:
                    self._finish(d, s, k, t)
                else:
                    d.decodes[s] = None
                    d.joiners.append(s)
            elif s.is_decode:  # one prompt token left: the batcher runs it as a decode, as the engine does
                d.running.remove(s)
                d.decodes[s] = None
                d.joiners.append(s)
        prof = d.profile
        for s, nbytes in jobs:
            s.sent = s.comp
            s.ready_t = t if prof.transfer["sync"] else t + prof.move_s(nbytes // prof.num_layers, layers=1)

    def _finish(self, d: _Dev, s: _Seq, k: int, t: float) -> None:
        if s.run0 >= 0:
            self._stop_run(d, s, k + 1)
        d.decodes.pop(s, None)
        d.free += s.blocks
        s.blocks = 0
        s.state = FINISHED
        self._release_handoff(s, d, t)
        self._unfinished -= 1
        self._freed(t)

    # -- runs of consecutive decode steps --------------------------------------------------------------

    def _start_run(self, d: _Dev, s: _Seq, k: int) -> None:
        s.run0, s.runtok, s.nskip = k, s.tok, 0
        s.ver += 1
        d.n_run += 1
        d.run_sum += s.tok - k
        heapq.heappush(d.fin, (k + s.out - (s.tok - s.prompt) - 1, s.i, s.ver, s))
        heapq.heappush(d.grow, (k + s.blocks * self.bs + 1 - s.tok, s.i, s.ver, s))

    def _stop_run(self, d: _Dev, s: _Seq, k: int) -> None:
        """Ends s's run before step k (its tokens so far come from steps run0..k-1)."""
        s.tok = s.runtok + k - s.run0
        s.comp = s.tok - 1
        if k > s.run0:
            s.pieces.append((d.times, s.run0, k))
        d.n_run -= 1
        d.run_sum -= s.runtok - s.run0
        s.run0 = -1
        s.ver += 1

    def _sync(self, d: _Dev, k: int) -> None:
        """Brings every running decode's token count up to step k (a run stays a run)."""
        for s in d.decodes:
            if s.run0 >= 0:
                s.tok = s.runtok + k - s.run0
                s.comp = s.tok - 1

    # -- batches (Batcher.schedule) ------------------------------------------------------------------

    def _schedule_fast(self, d: _Dev, k: int):
        """The step in which every running decode takes part and nothing else runs, when it is the
        batcher's choice too: no prefill work, room in the budget and in the blocks. None otherwise."""
        if d.waiting or d.running or not d.decoding or d.target is not None or len(d.decodes) > self._max_batch:
            return None
        bs, grow = self.bs, d.grow
        popped = []
        need = 0
        while grow and grow[0][0] <= k:
            e = heapq.heappop(grow)
            s = e[3]
            if e[2] == s.ver:
                popped.append(s)
                need += max(0, -(-(s.runtok + k - s.run0) // bs) - s.blocks)
        joiners = [s for s in d.joiners if s.run0 < 0 and s in d.decodes] if d.joiners else ()
        need += sum(max(0, -(-s.tok // bs) - s.blocks) for s in joiners)
        if need > d.free:
            for s in popped:
                heapq.heappush(grow, (k, s.i, s.ver, s))
            return None
        d.free -= need
        for s in popped:
            s.blocks = max(s.blocks, -(-(s.runtok + k - s.run0) // bs))
            heapq.heappush(grow, (s.run0 + s.blocks * bs + 1 - s.runtok, s.i, s.ver, s))
        for s in joiners:
            s.blocks = max(s.blocks, -(-s.tok // bs))
            self._start_run(d, s, k)
        d.joiners = []
        if need:
            self._note_used(d)
        return [], len(d.decodes), d.run_sum + k * d.n_run

    def _schedule(self, d: _Dev, k: int):
        """Batcher.schedule, ported as it is onto the simulation's sequences."""
        p, bs = self.policy, self.bs
        self._sync(d, k)
        running = sorted(chain(d.running, d.decodes), key=lambda s: s.i)
        was_decoding = list(d.decodes)
        taken: set[_Seq] = set()
        budget = [p.max_num_batched_tokens, p.max_num_seqs]

        def fits() -> bool:
            return budget[0] > 0 and budget[1] > 0

        def take(s: _Seq, n: int) -> None:
            budget[0] -= n
            budget[1] -= 1
            taken.add(s)

        def can_grow(s: _Seq, tokens: int) -> bool:
            return -(-tokens // bs) - s.blocks <= d.free

        def grow(s: _Seq, tokens: int) -> None:
            extra = -(-tokens // bs) - s.blocks
            if extra > 0:
                d.free -= extra
                s.blocks += extra

        def victim(exclude: set) -> _Seq | None:
            free = [s for s in reversed(running) if s not in exclude]
            for s in free:
                if s.npre < p.max_preemptions:
                    return s
            return free[0] if free else None

        def preempt(s: _Seq) -> None:
            running.remove(s)
            if s.run0 >= 0:
                self._stop_run(d, s, k)
            d.free += s.blocks
            s.blocks, s.comp, s.sent, s.state = 0, 0, 0, WAITING
            s.npre += 1
            d.preemptions += 1
            d.waiting.appendleft(s)

        def make_room(s: _Seq, tokens: int, only_newer: bool = False) -> bool:
            exclude = taken | {s} if only_newer else taken
            while not can_grow(s, tokens):
                v = victim(exclude)
                if v is None or (only_newer and v.i < s.i):
                    return False
                preempt(v)
                if v is s:
                    return False
            return True

        def insert_running(s: _Seq) -> None:
            i = len(running)
            while i > 0 and running[i - 1].i > s.i:
                i -= 1
            running.insert(i, s)

        def schedule_decodes(seqs: list[_Seq], past_a_miss: bool) -> list[_Seq]:
            out = []
            for s in seqs:
                if not fits():
                    break
                if s in taken or s.state != RUNNING:
                    continue
                if make_room(s, s.tok):
                    grow(s, s.tok)
                    out.append(s)
                    take(s, 1)
                elif not past_a_miss:
                    break
            return out

        def schedule_prefills() -> list[tuple[_Seq, int]]:
            chunks = []
            for s in [x for x in running if not x.is_decode] + list(d.waiting):
                if not fits():
                    break
                n = min(s.tok - s.comp, budget[0])
                end = s.comp + n
                ok = make_room(s, end, only_newer=True) if s.state == RUNNING else can_grow(s, end)
                if not ok:
                    break
                if s.state == WAITING:
                    d.waiting.remove(s)
                    s.state = RUNNING
                    insert_running(s)
                grow(s, end)
                chunks.append((s, n))
                take(s, n)
            return chunks

        ready = sorted((s for s in running if s.is_decode), key=lambda s: -s.nskip) if d.role.decodes else []
        urgent = ready if d.role is not Role.MIXED else [s for s in ready if s.nskip >= p.decode_max_skips]
        decodes = schedule_decodes(urgent, True)
        chunks = schedule_prefills()
        decodes += schedule_decodes(ready, False)
        for s in ready:
            s.nskip = 0 if s in taken else s.nskip + 1
        for s in was_decoding:  # runs that this step breaks
            if s.run0 >= 0 and s not in taken:
                self._stop_run(d, s, k)
        d.running = [s for s in running if not s.is_decode]
        d.decodes = dict.fromkeys(s for s in running if s.is_decode)
        for s in decodes:
            if s.run0 < 0:
                self._start_run(d, s, k)
        d.joiners = [s for s in d.decodes if s.run0 < 0]
        self._note_used(d)
        return chunks, len(decodes), sum(s.tok for s in decodes)

    # -- hand-offs (Worker._hand_off) ------------------------------------------------------------------

    def _keeps_decodes(self, d: _Dev, t: float) -> bool:
        if d.target is not None and not d.target.decodes:
            return d.mode == "drain" and t - d.change_t < self.policy.drain_timeout_s
        return (d.target or d.role).decodes

    def _hand_off(self, d: _Dev, t: float) -> float:
        """Moves out every prefilled sequence that decodes elsewhere; returns the time the
        worker's own thread spends copying (CPU), 0 when the copies run on a transfer stream."""
        if not d.decodes or (d.num_handoffs == 0 and d.target is None and d.decoding):
            d.stuck = 0
            return 0.0
        keeps = self._keeps_decodes(d, t)
        due = sorted((s for s in d.decodes if s.dest is not None or not keeps), key=lambda s: s.i)
        stuck, spent = 0, 0.0
        k = len(d.times)
        for s in due:
            if s.run0 >= 0:  # a decode leaving a device that ran it: its tokens up to now
                self._stop_run(d, s, k)
            dest, blocks, sent = self._destination(d, s, t)
            if dest is None:
                for x in [*d.waiting, *d.running]:  # Worker._give_up_token_side_holds
                    self._release_handoff(x, d, t)
                dest, blocks = self._pick_dest(s, d)
                sent = False
            if dest is None:
                stuck += 1
                d.joiners.append(s)
                continue
            spent += self._move(d, s, dest, blocks, sent, t + spent)
        d.stuck = stuck
        if stuck:
            self._waiters.add(d)
        return spent

    def _destination(self, d: _Dev, s: _Seq, t: float) -> tuple[_Dev | None, int, bool]:
        h = s.dest
        if h is not None and not h.decodes_after_change:
            self._release_handoff(s, d, t)
            h = None
        if h is not None:
            sent = 0 < s.sent == s.comp
            need = self.blocks_for(s.tok) - s.hres
            if need <= 0 or h.free >= need:
                if need > 0:
                    h.free -= need
                    self._note_used(h)
                blocks = s.hres + max(0, need)
                s.dest, s.hres = None, 0
                d.num_handoffs -= 1
                return h, blocks, sent
            self._release_handoff(s, d, t)
        dest, blocks = self._pick_dest(s, d)
        return dest, blocks, False

    def _move(self, d: _Dev, s: _Seq, dest: _Dev, blocks: int, layers_done: bool, t: float) -> float:
        prof = d.profile
        nbytes = self.blocks_for(s.comp) * d.block_bytes
        dt = 0.0 if layers_done else prof.move_s(nbytes)
        d.bytes_moved += nbytes
        d.free += s.blocks
        s.blocks = blocks
        s.sent = 0
        del d.decodes[s]
        s.state = ARRIVING
        if prof.transfer["sync"]:
            land, spent = t + dt, dt
        elif layers_done:
            land, spent = max(t, s.ready_t), 0.0
        else:
            d.xfer_t = max(d.xfer_t, t) + dt
            land, spent = d.xfer_t, 0.0
        self._push(land, _LAND, (dest, s))
        return spent

    # -- role changes and the autoscaler (Worker._change_role, Autoscaler.tick) -------------------------

    def _change_role(self, d: _Dev) -> None:
        new = d.target
        if new is None:
            return
        if not new.decodes and (d.arrivals or d.decodes):
            return
        d.role, d.target = new, None  # runs of decodes go on: step numbers are the device's
        d.decoding = new.decodes

    def assign(self, d: _Dev, role: Role, mode: str, t: float) -> None:
        d.target, d.mode, d.change_t = role, mode, t
        self._wake(d, t)

    def _tick(self, t: float) -> None:
        p = self.policy
        queue = sum(d.pending_prompt_tokens() for d in self.devs if d.role is Role.PROMPT)
        token_side = [d for d in self.devs if d.role is Role.TOKEN]
        total = sum(d.num_blocks for d in token_side)
        occupancy = sum(d.num_blocks - d.free for d in token_side) / total if total else 0.0

        def free(role: Role) -> list[_Dev]:
            return [d for d in self.devs if d.role is role and d.target is None and d not in self._borrowed]

        if queue > p.borrow_prompt_tokens and len(free(Role.TOKEN)) > 1:
            self._borrow(free(Role.TOKEN)[-1], Role.TOKEN, t)
        elif occupancy > p.borrow_kv_occupancy and len(free(Role.PROMPT)) > 1:
            self._borrow(free(Role.PROMPT)[-1], Role.PROMPT, t)
        for d, (home, since) in list(self._borrowed.items()):
            if d.role is not Role.MIXED and d.target is None:
                self._borrowed.pop(d)
                continue
            if d.target is not None:
                continue
            if t - since > p.repurpose_after_s:
                self._borrowed.pop(d)
                self.assign(d, Role.PROMPT if home is Role.TOKEN else Role.TOKEN, "migrate", t)
            elif (d.pending_prompt_tokens() == 0 and queue <= p.borrow_prompt_tokens // 2 if home is Role.TOKEN
                  else not d.decodes and occupancy <= p.borrow_kv_occupancy):
                self._borrowed.pop(d)
                self.assign(d, home, "migrate", t)

    def _borrow(self, d: _Dev, home: Role, t: float) -> None:
        self.assign(d, Role.MIXED, "drain", t)
        self._borrowed[d] = (home, t)
        self.num_borrows += 1

    # -- what comes out ----------------------------------------------------------------------------------

    def _device_stats(self, d: _Dev, end: float) -> dict:
        return {"name": d.name, "role": d.role.value, "steps": d.steps, "busy_s": d.busy_s, "prefill_busy_s": d.prefill_s,
                "utilization": d.busy_s / end if end > 0 else 0.0, "kv_blocks": d.num_blocks, "kv_peak_blocks": d.peak_used,
                "kv_free_at_end": d.free, "preemptions": d.preemptions, "bytes_moved": d.bytes_moved}

    def _energy(self, end: float) -> float | None:
        if any(d.profile.power_w is None for d in self.devs):
            return None
        total = 0.0
        for d in self.devs:
            w = d.profile.power_w
            total += d.prefill_s * w["prefill"] + (d.busy_s - d.prefill_s) * w["decode"] + max(0.0, end - d.busy_s) * w["idle"]
        return total


def simulate(devices: list[tuple[str, str | Role, Profile]], specs: list[RequestSpec], arrivals: list[float],
             policy: Policy = Policy()) -> SimResult:
    return Simulator(devices, policy).run(specs, arrivals)


def alone(profile: Profile, specs: list[RequestSpec], policy: Policy = Policy()) -> dict[tuple[int, int], Alone]:
    """Each distinct request alone on one idle device of `profile` (mixed, as `bench serve`
    measures it): the yardstick of the slowdown SLOs, simulated the same way as the load."""
    out: dict[tuple[int, int], Alone] = {}
    for spec in specs:
        key = (spec.prompt_len, spec.output_len)
        if key in out:
            continue
        r = simulate([("alone", Role.MIXED, profile)], [RequestSpec(*key)], [0.0], replace(policy, autoscale=False)).results[0]
        if not r.ok:
            raise ValueError(f"a request of {key[0]} + {key[1]} tokens cannot run alone on {profile.device}: {r.error}")
        gaps = sorted(r.gaps)
        out[key] = Alone(r.ttft, gaps[len(gaps) // 2] if gaps else None, r.e2e)
    return out
