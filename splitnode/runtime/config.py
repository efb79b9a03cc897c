"""The runtime's configuration: the engine's options (per worker) plus the devices, their roles,
and the transfer and pool policy."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from splitnode.engine.config import EngineConfig
from splitnode.runtime.pools import ROLES, check_phases
from splitnode.runtime.worker import WorkerPolicy


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
    cpu_threads: int | None = None  # cores of each CPU worker; default: the machine's, shared out evenly
    drain_timeout_s: float = 60.0  # a drain-mode role change migrates what is left after this long
    max_active_requests: int = 4096  # requests in flight past which new ones are refused (overloaded)
    power_caps: dict[str, float] | None = None  # {"token": 450.0}: W per role, set through NVML (splitnode.power)

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
        if (self.layerwise_min_tokens < 1 or self.transfer_timeout_s <= 0 or self.reservation_lease_s <= 0
                or self.drain_timeout_s <= 0 or self.max_active_requests < 1):
            raise ValueError("RuntimeConfig: layerwise_min_tokens, transfer_timeout_s, reservation_lease_s, "
                             "drain_timeout_s and max_active_requests must be positive")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"RuntimeConfig.cpu_threads must be None or >= 1, got {self.cpu_threads}")
        if not 0 < self.borrow_kv_occupancy <= 1:
            raise ValueError(f"RuntimeConfig.borrow_kv_occupancy must be in (0, 1], got {self.borrow_kv_occupancy}")
        if self.power_caps is not None:
            self.power_caps = {role: _watts(role, w) for role, w in self.power_caps.items()}

    @property
    def worker_policy(self) -> WorkerPolicy:
        return WorkerPolicy(self.layerwise_min_tokens, self.transfer_timeout_s, self.reservation_lease_s,
                            self.drain_timeout_s)


def _watts(role: str, watts) -> float:
    if role not in ROLES:
        raise ValueError(f"RuntimeConfig.power_caps names the role {role!r}; roles are {ROLES}")
    if isinstance(watts, bool) or not isinstance(watts, (int, float)) or not 0 < watts < float("inf"):
        raise ValueError(f"RuntimeConfig.power_caps[{role!r}] must be a number of watts > 0, got {watts!r}")
    return float(watts)


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


def default_roles(devices: list[str]) -> dict[str, str]:
    """One device: mixed. More: a third of them (at least one) prompt, the rest token, as decode
    is the longer phase for most chat traffic."""
    if len(devices) == 1:
        return {devices[0]: "mixed"}
    num_prompt = max(1, len(devices) // 3)
    return {d: ("prompt" if i < num_prompt else "token") for i, d in enumerate(devices)}


def cpu_core_sets(worker_names: list[str], cpu_threads: int | None,
                  cores: list[int] | None = None) -> tuple[dict[str, frozenset[int]], str | None]:
    """Each CPU worker's own cores, so `cpu:N` workers are N devices that do not steal from each
    other: `cpu_threads` each (default: the cores this process may use, shared out evenly). With
    more CPU workers than cores and no `cpu_threads`, none is bound: pinned, two of them would
    share one core while another had one to itself, and the OS balances them better. Returns the
    sets and, where workers share cores, a warning that says so."""
    names = [n for n in worker_names if torch_device(n) == "cpu"]
    if not names:
        return {}, None
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    if cpu_threads is None and len(names) > len(cores):
        return {}, (f"{len(names)} CPU workers on {len(cores)} cores: the workers share cores and slow each "
                    f"other down (none is bound to cores; give at most {len(cores)} CPU workers)")
    each = cpu_threads or len(cores) // len(names)
    sets = {n: frozenset(cores[(i * each + j) % len(cores)] for j in range(each)) for i, n in enumerate(names)}
    if each * len(names) <= len(cores):
        return sets, None
    return sets, (f"{len(names)} CPU workers x {each} threads on {len(cores)} cores: the workers share cores "
                  f"and slow each other down (give fewer CPU workers or a smaller --cpu-threads)")
