"""`FakeNVML`: a test double for the `pynvml` module, with the calls splitnode makes (telemetry's
reads, the power caps' limits), in NVML's units (mW, mJ, bytes, °C, MHz), for boards named by UUID
or PCI bus id. Its set call changes the board dict it was given, never a card."""

from __future__ import annotations

import types

GIB = 1024**3


class FakeNVML:
    """Each read of the energy counter advances it by `energy_step_mj`, as a board drawing power
    would. `no_permission`: every set is refused as NVML refuses a caller without root."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_ERROR_NO_PERMISSION = 4

    class NVMLError(Exception):
        def __init__(self, message: str, value: int | None = None):
            super().__init__(message)
            self.value = value

    def __init__(self, boards: dict[str, dict], energy_step_mj: int = 0, unsupported: tuple[str, ...] = (),
                 no_permission: bool = False):
        self.boards = boards
        self.energy_step_mj = energy_step_mj
        self.unsupported = set(unsupported)
        self.no_permission = no_permission
        self.num_inits = self.num_shutdowns = 0
        self.sets: list[tuple[str, int]] = []  # (board key, mW) of every accepted set, in order

    def nvmlInit(self):
        self.num_inits += 1

    def nvmlShutdown(self):
        self.num_shutdowns += 1

    def _board(self, key):
        if key not in self.boards:
            raise self.NVMLError("Not Found")
        return self.boards[key]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return self._board(uuid)

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        return self._board(bus_id)

    def _get(self, board, field):
        if field in self.unsupported:
            raise self.NVMLError("Not Supported")
        return board[field]

    def nvmlDeviceGetPowerUsage(self, h):
        return self._get(h, "power_mw")

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self._get(h, "limit_mw")

    def nvmlDeviceGetPowerManagementLimit(self, h):
        return self._get(h, "limit_mw")

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h):
        return [self._get(h, "min_limit_mw"), self._get(h, "max_limit_mw")]

    def nvmlDeviceSetPowerManagementLimit(self, h, limit_mw):
        if self.no_permission:
            raise self.NVMLError("Insufficient Permissions", self.NVML_ERROR_NO_PERMISSION)
        if not h["min_limit_mw"] <= limit_mw <= h["max_limit_mw"]:
            raise self.NVMLError("Invalid Argument", 2)
        h["limit_mw"] = limit_mw
        self.sets.append((next(k for k, b in self.boards.items() if b is h), limit_mw))

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        value = self._get(h, "energy_mj")
        h["energy_mj"] += self.energy_step_mj
        return value

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=self._get(h, "util"), memory=0)

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=self._get(h, "mem_used"), total=self._get(h, "mem_total"), free=0)

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._get(h, "temp")

    def nvmlDeviceGetClockInfo(self, h, clock):
        assert clock == self.NVML_CLOCK_SM
        return self._get(h, "sm_mhz")


def board(power_mw=250_000, temp=61, limit_mw=700_000):
    """An H100-like board: 700 W limit, settable between 200 and 700 W."""
    return {"power_mw": power_mw, "limit_mw": limit_mw, "min_limit_mw": 200_000, "max_limit_mw": 700_000,
            "energy_mj": 5_000_000, "util": 87, "mem_used": 12 * GIB, "mem_total": 80 * GIB, "temp": temp,
            "sm_mhz": 1980}
