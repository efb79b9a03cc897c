"""The predicted goodput of a running runtime's layout: `status()["prediction"]`, for `splitnode
status` and the dashboard ("predicted goodput at this layout 1p1t: 2.10 req/s (best: 2m, ...)").

What is predicted is what `splitnode plan` would say for this box at this moment:
- the profile is the one `splitnode plan` reads for the runtime's model, devices and dtype
  (`command._profile`: the cache dir's, or `profile_file`), looked up in the serving process,
  which already knows its GPUs (a helper asking CUDA for their names would open a context of its
  own on each);
- the workload is the prompt and output lengths of the last MAX_REQUESTS requests that ended by
  themselves (stop or length; a cancelled request's output says nothing of the traffic); until
  MIN_REQUESTS have, there is nothing to predict for, and the status says so;
- arrivals are Poisson at the rates the planner's goodput search tries (`Planner.evaluate`), the
  SLOs Splitwise's slowdowns, the policy the runtime's own knobs and KV pool: `splitnode plan`
  without --rate and --slo;
- for the layout the devices are in (a borrowed device counts in its home pool; the autoscaler
  as the runtime's policy says) and for every other layout of them, so the best one shows too.

The simulation is pure Python: in the serving process it would hold the GIL against the workers'
threads. It runs in a helper process (`python -m splitnode.plan.predict`, at the lowest CPU
priority, in a session of its own so that a Ctrl-C meant for the server does not reach it),
started with the first job, one job at a time; a job is sent only when the layout changed, or
RECOMPUTE_EVERY more requests ended since the last one. `status()` never waits for it: it
returns the latest figures with their age and what they were computed for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

from splitnode.goodput import workloads as W
from splitnode.plan import command
from splitnode.plan import planner as P
from splitnode.plan.profile import Profile, ProfileError, profile_path
from splitnode.runtime.pools import check_phases

MIN_REQUESTS = 20
MAX_REQUESTS = 200
RECOMPUTE_EVERY = 50
LOOKUP_RETRY_S = 10.0  # a profile that was missing is looked for again this often: one may have been measured since
NICENESS = 19
# RuntimeConfig fields the planner's policy does not take: the devices are the layout, the roles its counts.
NOT_POLICY = frozenset({"devices", "roles", "power_caps", "device", "autoscale"})


def current_layout(devices: list[dict], autoscale: bool) -> P.Layout:
    """The layout the devices are in, as the planner names it: a device moving to a role counts
    there, one borrowed into the mixed pool in its home pool, a failed one not at all; the
    autoscaler counts where it has something to do (both pools, a device it may move)."""
    live = [d for d in devices if not d.get("error")]
    roles = [d.get("borrowed_from") or d.get("target_role") or d["role"] for d in live]
    check_phases(roles)
    p, t, m = (roles.count(r) for r in ("prompt", "token", "mixed"))
    movable = any(not d.get("pinned") for d in live)
    return P.Layout(p, t, m, bool(autoscale and p and t and movable))


class Predictor:
    """Fills `Runtime.status()["prediction"]`: `Runtime(config, predictor=Predictor(config))`.
    The runtime calls `on_request_end` as each request ends, `status` from `status()`, and `close`
    when it stops. Calls come from the event loop; a lock keeps a scrape from another thread safe."""

    def __init__(self, config, profile_file: str | Path | None = None, min_requests: int = MIN_REQUESTS,
                 max_requests: int = MAX_REQUESTS, recompute_every: int = RECOMPUTE_EVERY, max_runs: int = 12,
                 clock=time.monotonic):
        self.config = config
        self.profile_file = Path(profile_file) if profile_file is not None else None
        # the profile once found: the runtime's devices, model and dtype never change, so later jobs
        # (on the event loop, under the lock) do not look it up and load it again; the helper reads it
        self._found: Path | None = None
        self.min_requests, self.recompute_every, self.max_runs = min_requests, recompute_every, max_runs
        self.clock = clock
        self.lengths: deque[tuple[int, int]] = deque(maxlen=max_requests)
        self.num_observed = 0  # requests whose lengths were taken, ever
        self.num_started = 0  # jobs sent to the helper
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._stderr = None  # the helper's stderr (a temporary file): its last words if it dies
        self._buf = b""
        self._job: dict | None = None  # what the job under way is for
        self._last: tuple | None = None  # (key, num_observed, time, found a profile) of the last job or lookup
        self._result: dict | None = None
        self._result_t = 0.0
        self._closed = False

    @property
    def helper_pid(self) -> int | None:
        """The helper process's id while there is one."""
        return self._proc.pid if self._proc is not None else None

    # -- what the runtime calls -------------------------------------------------------------------

    def on_request_end(self, state, finish_reason: str) -> None:
        """A `Runtime.request_end_hooks` hook: keeps the request's lengths, if it ended by itself."""
        if finish_reason in ("stop", "length"):
            seq = state.seq
            self.observe(seq.num_prompt_tokens, len(seq.token_ids) - seq.num_prompt_tokens)

    def observe(self, prompt_len: int, output_len: int) -> None:
        if prompt_len >= 1 and output_len >= 1:
            self.lengths.append((prompt_len, output_len))
            self.num_observed += 1

    def status(self, devices: list[dict], policy: dict) -> dict:
        """The latest prediction (never waits); sends a job first if one is due and none is under way."""
        with self._lock:
            self._collect()
            try:
                layout = current_layout(devices, policy.get("autoscale", False))
            except ValueError as e:  # every device failed, say
                return {"available": False, "reason": str(e), "computing": self._job is not None}
            num_blocks = min(d["kv_blocks_total"] for d in devices if not d.get("error"))
            key = (layout, num_blocks)
            if not self._closed and self._job is None and self._due(key):
                self._start(layout, num_blocks, key)
            return self._report(layout)

    def close(self) -> None:
        """Ends the helper, a job under way included (its figures would be for a runtime that is gone)."""
        with self._lock:
            self._closed = True
            if self._proc is not None:
                self._helper_gone("the runtime stopped")

    # -- when to compute --------------------------------------------------------------------------

    def _due(self, key) -> bool:
        if len(self.lengths) < self.min_requests:
            return False
        if self._last is None:
            return True
        last_key, num_then, t_then, found = self._last
        return (key != last_key or self.num_observed - num_then >= self.recompute_every
                or not found and self.clock() - t_then >= LOOKUP_RETRY_S)

    def _start(self, layout: P.Layout, num_blocks: int, key) -> None:
        now = self.clock()
        try:
            path = self._found or self._profile_path()
        except (ProfileError, ValueError) as e:  # none, another version's, CPU workers sharing cores
            self._last = (key, self.num_observed, now, False)
            self._set_result({"available": False, "reason": str(e)})
            return
        self._found = path
        self._last = (key, self.num_observed, now, True)
        kwargs = {**self._kwargs(), "num_kv_blocks": num_blocks}  # the workers' own pool, not the profiled device's
        job = {"profile": str(path), "kwargs": kwargs, "lengths": list(self.lengths), "max_runs": self.max_runs,
               "layout": [layout.num_prompt, layout.num_token, layout.num_mixed, layout.autoscale]}
        try:
            self._send(job)
        except OSError as e:
            self._helper_gone(f"the prediction helper could not take a job: {e}")
            return
        self._job = {"layout": layout.name, "num_requests": len(self.lengths)}
        self.num_started += 1

    def _profile_path(self) -> Path:
        """The profile `splitnode plan` would read for this runtime's devices (checked: it loads,
        it is this version's, of this kind of device)."""
        devices = list(self.config.devices)
        kinds = sorted({d.partition(":")[0] for d in devices})
        if len(kinds) > 1:
            raise ProfileError(f"the planner takes devices of one kind (one profile); this runtime has {' and '.join(kinds)}")
        prof = command._profile(SimpleNamespace(profile=False, profile_file=self.profile_file), devices, None,
                                self._kwargs())
        # `splitnode plan --profile` stores a profile at the path its own fields name, the one just found
        return self.profile_file or profile_path(prof.model, prof.device, prof.dtype)

    def _kwargs(self) -> dict:
        """The runtime's options as `splitnode plan` takes its engine flags."""
        return {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config) if f.name not in NOT_POLICY}

    # -- the helper -------------------------------------------------------------------------------

    def _send(self, job: dict) -> None:
        if self._proc is None:
            self._stderr = tempfile.TemporaryFile()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "splitnode.plan.predict"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=self._stderr, start_new_session=True,
                env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # it never needs a GPU: none to touch by mistake
            os.set_blocking(self._proc.stdout.fileno(), False)
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self._proc.pid, NICENESS)
            self._buf = b""
        # A few kB into an empty pipe (one job at a time): the write never waits for the helper.
        self._proc.stdin.write(json.dumps(job, default=str).encode() + b"\n")
        self._proc.stdin.flush()

    def _collect(self) -> None:
        """Takes the helper's answer, if one came (a non-blocking read)."""
        if self._proc is None or self._job is None:
            return
        try:
            chunk = os.read(self._proc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            return
        if not chunk:  # it exited
            self._helper_gone(f"the prediction helper exited (code {self._proc.wait()}): {self._last_words()}")
            return
        self._buf += chunk
        if b"\n" not in self._buf:
            return
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            answer = json.loads(line)
        except ValueError:
            self._helper_gone(f"the prediction helper answered garbage: {line[:80]!r}")
            return
        self._job = None
        if "error" in answer:
            self._set_result({"available": False, "reason": f"the prediction failed: {answer['error']}"})
        else:
            self._set_result({"available": True, **answer})

    def _helper_gone(self, reason: str) -> None:
        """The helper is of no more use: ended (the next job starts another), and the reason shown."""
        proc, self._proc, self._job = self._proc, None, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for f in (proc.stdin, proc.stdout, self._stderr):
                with contextlib.suppress(OSError):
                    f.close()
        self._set_result({"available": False, "reason": reason})

    def _last_words(self) -> str:
        try:
            self._stderr.seek(0)
            lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        except (OSError, ValueError):  # a file already closed
            return "no output"
        return lines[-1] if lines else "no output"

    def _set_result(self, result: dict) -> None:
        self._result, self._result_t = result, self.clock()

    def _report(self, layout: P.Layout) -> dict:
        computing = self._job is not None
        if self._result is None:
            if computing:
                reason = (f"computing the first prediction, for {self._job['layout']} on "
                          f"{self._job['num_requests']} finished requests")
            else:
                reason = f"waiting for {self.min_requests} finished requests, {self.num_observed} so far"
            return {"available": False, "reason": reason, "computing": computing, "current_layout": layout.name}
        return {**self._result, "computing": computing, "current_layout": layout.name,
                "age_s": self.clock() - self._result_t}


# -- the helper's side ---------------------------------------------------------------------------------


def predict(job: dict) -> dict:
    """One job: `splitnode plan`'s goodput search for every layout of the devices, on the job's
    lengths; the figures for the job's layout and the best one."""
    t0 = time.perf_counter()
    prof = Profile.load(job["profile"])
    said = io.StringIO()
    with contextlib.redirect_stderr(said):  # policy_for's warnings go into the answer, not the server's log
        policy = P.policy_for(job["kwargs"], prof)
    longest = P.longest_request(prof, policy)  # as `splitnode plan` sizes its requests
    specs = [W.fit(W.RequestSpec(p, o), longest) for p, o in job["lengths"]]
    current = P.Layout(*job["layout"])
    n = current.num_devices
    planner = P.Planner(prof, n, specs, W.poisson_arrivals(len(specs), 1.0, 0), policy)
    candidates = P.layouts(n, current.autoscale)
    evals = planner.evaluate(candidates, rate=None, sweep=True, max_runs=job["max_runs"])
    by_name = {e.layout.name: e.goodput for e in evals}
    return {"layout": current.name, "goodput": by_name[current.name], "best_layout": evals[0].layout.name,
            "best_goodput": evals[0].goodput, "layouts": by_name, "num_requests": len(specs),
            "profile": job["profile"], "computed_at": time.time(), "compute_s": time.perf_counter() - t0,
            "warnings": [line for line in said.getvalue().splitlines() if line.strip()]}


def main() -> int:
    """Jobs as JSON lines on stdin, answers as JSON lines on stdout; EOF (the server is gone) ends it."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything else printed must not garble the answers
    for line in sys.stdin:
        try:
            answer = predict(json.loads(line))
        except Exception as e:  # a bad profile, a request too long for it alone: the reason goes back
            answer = {"error": f"{type(e).__name__}: {e}"}
        answers.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
