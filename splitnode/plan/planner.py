"""Every role layout of a box's devices, simulated on a workload and ranked by predicted goodput.

A layout is a count of prompt, token and mixed devices: the devices are identical (one profile),
so which device gets which role does not matter and each count is simulated once. Layouts that
leave a phase without devices are dropped by the runtime's own check (`pools.check_phases`).
Each layout is judged by the benchmark's code: the simulated runs are lists of `RequestResult`
that `goodput.slo.summarize` reads as it reads measured ones, against the same requests simulated
alone on one idle device (the slowdown SLOs) or against absolute limits, and goodput is the
benchmark's own rate search (`search_rate`) over simulated runs.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from splitnode.goodput import slo as S
from splitnode.goodput.workloads import RequestSpec
from splitnode.plan.profile import Profile
from splitnode.plan.sim import Policy, SimResult, alone, simulate
from splitnode.runtime.pools import check_phases


@dataclass(frozen=True)
class Layout:
    num_prompt: int
    num_token: int
    num_mixed: int
    autoscale: bool = False  # the runtime's pool policy on top of the roles

    @property
    def name(self) -> str:
        """The name `bench serve --compare` and `goodput.load.layout_roles` take (prompt, token,
        mixed counts, zeros left out)."""
        name = "".join(f"{n}{c}" for n, c in ((self.num_prompt, "p"), (self.num_token, "t"), (self.num_mixed, "m")) if n)
        return name + ("+policy" if self.autoscale else "")

    @property
    def num_devices(self) -> int:
        return self.num_prompt + self.num_token + self.num_mixed

    def roles(self) -> list[str]:
        """Prompt devices first, then token, then mixed: the order `layout_roles` gives them."""
        return ["prompt"] * self.num_prompt + ["token"] * self.num_token + ["mixed"] * self.num_mixed


def layouts(num_devices: int, autoscale: bool = False) -> list[Layout]:
    """Every (prompt, token, mixed) count of `num_devices` identical devices that can serve (a
    phase without devices is refused by the runtime, so it is left out); with `autoscale`, each
    layout that has both a prompt and a token device once more with the pool policy on."""
    if num_devices < 1:
        raise ValueError(f"a layout needs at least one device, got {num_devices}")
    out = []
    for p in range(num_devices + 1):
        for t in range(num_devices + 1 - p):
            lay = Layout(p, t, num_devices - p - t)
            try:
                check_phases(lay.roles())
            except ValueError:
                continue
            out.append(lay)
            if autoscale and p and t:
                out.append(replace(lay, autoscale=True))
    return out


def parse_layout(name: str, num_devices: int) -> Layout:
    """`1p1t`, `2m`, `1p2t1m`, `colocated` (all mixed), `split` (the runtime's default split);
    `+policy` turns the autoscaler on."""
    from splitnode.goodput.load import layout_roles

    base, _, extra = name.partition("+")
    if extra not in ("", "policy"):
        raise ValueError(f"layout {name!r}: only '+policy' may follow the counts")
    roles, policy = layout_roles(base, [f"d{i}" for i in range(num_devices)])
    values = list(roles.values())
    check_phases(values)
    return Layout(values.count("prompt"), values.count("token"), values.count("mixed"), policy or extra == "policy")


def policy_for(kwargs: dict, prof: Profile) -> Policy:
    """The runtime's values for the flags given (RuntimeConfig checks them); the KV pool from
    --num-kv-blocks, --kv-cache-gib (CPU) or the profiled device's."""
    from splitnode.runtime.config import RuntimeConfig

    cfg = RuntimeConfig(devices=["cpu:0"], **{k: v for k, v in kwargs.items() if k != "cpu_threads"})
    blocks = cfg.num_kv_blocks
    if blocks is None and cfg.kv_cache_gib is not None and prof.kind == "cpu":
        blocks = int(cfg.kv_cache_gib * 2**30 // (prof.kv_bytes_per_token * cfg.block_size))
    if cfg.max_num_batched_tokens > max(prof.prefill["tokens"]) * 1.01:
        print(f"splitnode plan: warning: the token budget {cfg.max_num_batched_tokens} is past the profile's largest "
              f"prefill ({max(prof.prefill['tokens'])}); longer batches are extrapolated", file=sys.stderr)
    return Policy.from_config(cfg, num_kv_blocks=blocks or prof.kv_blocks(cfg.block_size), autoscale=False)


def longest_request(prof: Profile, policy: Policy) -> int:
    """The longest request (prompt + output) one device of the profile holds under `policy`: what
    the planner's, the validation's and the status prediction's requests are fitted to."""
    blocks = policy.num_kv_blocks or prof.kv_blocks(policy.block_size)
    return min(prof.max_model_len, blocks * policy.block_size, policy.max_model_len or 1 << 62)


def devices_spec(devices: list[str]) -> str:
    """How --devices names these workers (cpu:N for N CPU workers)."""
    return f"cpu:{len(devices)}" if devices[0].startswith("cpu") else ",".join(devices)


def arrivals_at(base: list[float], rate: float | None) -> list[float]:
    """`base` arrival times played at `rate` requests/s on average (None: as they are): the bench's
    rescaling (goodput.command), so a simulated run and a measured one send the same requests at
    the same times."""
    if rate is None:
        return base
    span = base[-1] - base[0] if len(base) > 1 else 0.0
    mean_rate = (len(base) - 1) / span if span > 0 else 1.0
    return [t * mean_rate / rate for t in base]


@dataclass
class Evaluation:
    layout: Layout
    goodput: float | None = None  # requests/s; None: not searched
    runs: list[tuple[float, bool]] = field(default_factory=list)  # the search's (rate, met)
    at_rate: dict | None = None  # summarize() of the run at the reference rate, with "energy_j_per_token"

    @property
    def per_device(self) -> float | None:
        return None if self.goodput is None else self.goodput / self.layout.num_devices


class Planner:
    """Simulates layouts of `num_devices` devices of `profile` on one request list."""

    def __init__(self, profile: Profile, num_devices: int, specs: list[RequestSpec], base: list[float],
                 policy: Policy = Policy(), slo: dict[str, float] | None = None, attainment: float = 0.9):
        self.profile, self.num_devices, self.specs, self.base = profile, num_devices, specs, base
        self.policy, self.slo, self.attainment = policy, slo or {}, attainment
        self.alone = None if self.slo else alone(profile, specs, policy)
        self.num_sims = 0

    def run(self, layout: Layout, rate: float | None) -> SimResult:
        devices = [(f"{self.profile.kind}:{i}", role, self.profile) for i, role in enumerate(layout.roles())]
        self.num_sims += 1
        return simulate(devices, self.specs, arrivals_at(self.base, rate), replace(self.policy, autoscale=layout.autoscale))

    def judge(self, layout: Layout, rate: float | None) -> dict:
        """The bench's summary of one simulated run (`slo.summarize`), plus energy per token."""
        sim = self.run(layout, rate)
        out = S.summarize(sim.results, self.alone, self.slo, self.attainment)
        tokens = sum(len(r.token_s) for r in sim.results if r.ok)
        out["energy_j_per_token"] = sim.energy_j / tokens if sim.energy_j is not None and tokens else None
        out["devices"] = sim.devices
        out["rate"] = rate
        return out

    def sweep_start(self) -> float:
        """The bench's first rate: the devices' count over the mean E2E of a request alone."""
        ref = self.alone or alone(self.profile, self.specs, self.policy)
        return self.num_devices / (sum(a.e2e for a in ref.values()) / len(ref))

    def goodput(self, layout: Layout, start: float, max_runs: int = 12, tolerance: float = 0.03) -> tuple[float, list]:
        async def meets(rate: float) -> bool:
            return self.judge(layout, rate)["met"]

        return asyncio.run(S.search_rate(meets, start, max_runs, tolerance))

    def evaluate(self, candidates: list[Layout], rate: float | None, sweep: bool, max_runs: int = 12,
                 tolerance: float = 0.03, on_done: Callable[[Evaluation], None] | None = None) -> list[Evaluation]:
        """Each layout's goodput (when `sweep`) and its run at `rate` (default: the best goodput,
        so that every layout is seen at one load); ranked best first."""
        start = self.sweep_start() if sweep else None
        evals = []
        for lay in candidates:
            ev = Evaluation(lay)
            if sweep:
                ev.goodput, ev.runs = self.goodput(lay, start, max_runs, tolerance)
            evals.append(ev)
            if on_done is not None:
                on_done(ev)
        ref = rate if rate is not None else max((e.goodput or 0.0 for e in evals), default=0.0) or start
        for ev in evals:
            ev.at_rate = self.judge(ev.layout, ref)
        return rank(evals)


def rank(evals: list[Evaluation]) -> list[Evaluation]:
    """Best first: the highest goodput; at one rate only, those meeting the SLOs, then the share of
    good requests; ties by the lower p99 TTFT, then the lower p99 TBT."""
    def p99(ev: Evaluation, key: str) -> float:
        p = (ev.at_rate or {}).get(key)
        return p["p99"] if p else float("inf")

    def key(ev: Evaluation):
        at = ev.at_rate or {}
        att = (at.get("absolute") or {}).get("attainment", at.get("within_p50_slowdown", 0.0))
        return (-(ev.goodput or 0.0), not at.get("met", False), -att, p99(ev, "ttft_s"), p99(ev, "tbt_s"), ev.layout.name)

    return sorted(evals, key=key)
