"""GPU telemetry from NVML (nvidia-ml-py): power, power limit, energy counter, utilization, memory,
temperature and SM clock of each CUDA device the runtime drives, sampled on a thread of its own
so the event loop only ever reads the latest sample.

Where a number cannot be read it is not made up: a CPU worker, a missing NVML library or a device
NVML cannot find reads `{"available": False, "reason": ...}`, and a single counter a GPU does not
support (the energy counter on older boards, say) is `None`.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("splitnode")

# What a sample holds for a GPU; the dashboard and `status()` read these names.
FIELDS = ("power_w", "power_limit_w", "energy_j", "util_pct", "mem_used_bytes", "mem_total_bytes",
          "temp_c", "sm_clock_mhz")


def nvml_targets(devices: list[str]) -> dict[str, str | None]:
    """For each runtime device, what NVML should look it up by: "GPU-<uuid>" or a PCI bus id
    ("00000000:17:00.0"), never the torch index: CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER renumber
    torch's devices, NVML's indices do not move. None for a CPU worker."""
    targets: dict[str, str | None] = {}
    for name in devices:
        kind, _, idx = name.partition("/")[0].partition(":")  # "cuda:0/1": a second worker on cuda:0
        if kind != "cuda":
            targets[name] = None
            continue
        import torch

        props = torch.cuda.get_device_properties(int(idx or 0))
        uuid = getattr(props, "uuid", None)
        if uuid is not None:
            text = str(uuid)
            targets[name] = text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"
        elif getattr(props, "pci_bus_id", None) is not None:
            targets[name] = (f"{getattr(props, 'pci_domain_id', 0):08x}:{props.pci_bus_id:02x}:"
                             f"{getattr(props, 'pci_device_id', 0):02x}.0")
        else:
            targets[name] = f"unresolved:{name}"
    return targets


def nvml_handle(nv, target: str):
    """NVML's handle of the board `nvml_targets` named."""
    if target.startswith(("GPU-", "MIG-")):
        return nv.nvmlDeviceGetHandleByUUID(target)
    if target.startswith("unresolved:"):
        raise LookupError("torch gave neither a UUID nor a PCI bus id for it")
    return nv.nvmlDeviceGetHandleByPciBusId(target)


class GPUSampler:
    """`GPUSampler(nvml_targets(devices))`; `start()`, then `sample(name)` from any thread, then
    `stop()`. `nvml` is the pynvml module (imported when not given); tests pass a test double."""

    def __init__(self, targets: dict[str, str | None], interval_s: float = 0.5, nvml=None):
        self.targets = dict(targets)
        self.interval_s = interval_s
        self._nvml = nvml
        self._handles: dict[str, object] = {}
        self._samples: dict[str, dict] = {
            name: {"available": False, "reason": "cpu worker" if t is None else "not sampled yet"}
            for name, t in self.targets.items()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._initialized = False

    def sample(self, name: str) -> dict:
        """The latest sample of `name` (a copy: the caller may keep or change it)."""
        return dict(self._samples.get(name) or {"available": False, "reason": f"unknown device {name!r}"})

    def start(self) -> None:
        """Opens NVML, takes a first sample, and starts the sampling thread. Blocking (NVML's init
        can take a moment): call it off the event loop. Never raises for a missing NVML."""
        gpus = {name: t for name, t in self.targets.items() if t is not None}
        if not gpus:
            return  # CPU workers only: nothing to open
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._initialized = True
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded...
            self._set_all(gpus, f"NVML not available: {e}")
            return
        for name, target in gpus.items():
            try:
                self._handles[name] = nvml_handle(self._nvml, target)
            except Exception as e:
                self._samples[name] = {"available": False, "reason": f"NVML has no device {target}: {e}"}
        self._read_all()
        self._thread = threading.Thread(target=self._run, name="splitnode-telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 4 * self.interval_s))  # an NVML call may hang: don't wait forever
            self._thread = None
        # live readings go stale now; a reason why there were none stays
        self._set_all([n for n, smp in self._samples.items() if smp.get("available")], "telemetry stopped")
        if self._initialized:
            try:
                self._nvml.nvmlShutdown()
            except Exception as e:
                log.debug("nvmlShutdown: %s", e)
            self._initialized = False

    def _set_all(self, names, reason: str) -> None:
        for name in names:
            self._samples[name] = {"available": False, "reason": reason}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._read_all()

    def _read_all(self) -> None:
        for name, handle in self._handles.items():
            # One new dict per device, swapped in whole: readers on other threads never see half.
            self._samples[name] = self._read(handle)

    def _read(self, handle) -> dict:
        nv = self._nvml

        errors: list[Exception] = []

        def get(fn, *args, scale: float = 1.0):
            try:
                value = fn(handle, *args)
            except Exception as e:  # NVMLError_NotSupported and friends: that one field is unknown
                errors.append(e)
                return None
            return value / scale if scale != 1.0 else value

        util = get(nv.nvmlDeviceGetUtilizationRates)
        mem = get(nv.nvmlDeviceGetMemoryInfo)
        reads = {
            "available": True,
            "time": time.monotonic(),
            "power_w": get(nv.nvmlDeviceGetPowerUsage, scale=1000.0),  # mW
            "power_limit_w": get(nv.nvmlDeviceGetEnforcedPowerLimit, scale=1000.0),  # mW
            "energy_j": get(nv.nvmlDeviceGetTotalEnergyConsumption, scale=1000.0),  # mJ since driver load
            "util_pct": None if util is None else util.gpu,
            "mem_used_bytes": None if mem is None else mem.used,
            "mem_total_bytes": None if mem is None else mem.total,
            "temp_c": get(nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU),
            "sm_clock_mhz": get(nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_SM),
        }
        if len(errors) == 7:  # nothing could be read: the GPU is lost (fell off the bus, reset)
            return {"available": False, "reason": f"NVML read failed: {errors[0]}"}
        return reads
