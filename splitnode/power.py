"""Per-role GPU power caps, the Splitwise paper's HHcap: decode is memory-bound and loses little
speed under a lower power limit, so token GPUs can run capped while prompt GPUs keep theirs.

Opt-in (`RuntimeConfig.power_caps`, `--power-cap token=450`): without caps nothing here runs and
no card is touched. With them, every GPU's limit is written through NVML at start and again
whenever the GPU reaches another role, and put back to the limit it had before on stop, at exit
(atexit) and when the start fails. A limit belongs to a board, not to a worker: workers sharing a
GPU ("cuda:0" and "cuda:0/1") give it the lowest cap among their roles.
"""

from __future__ import annotations

import atexit
import logging
import threading
from dataclasses import dataclass, field

from splitnode.telemetry import nvml_handle

log = logging.getLogger("splitnode")

NVML_ERROR_NO_PERMISSION = 4  # nvml.h; pynvml has it under the same name


@dataclass
class _Board:
    name: str  # the first worker on it, for messages: "cuda:0"
    handle: object
    original_mw: int  # the limit it had before we wrote one; what restore() writes back
    min_mw: int
    max_mw: int
    workers: list[str] = field(default_factory=list)
    cap_mw: int | None = None  # the cap in force; None: the board is at its original limit
    changed: bool = False  # its limit is not the original: restore() writes that back


class PowerCaps:
    """`PowerCaps({"token": 450.0}, nvml_targets(devices))`; `apply(roles)` at start, `set_role`
    from any thread when a worker reaches a role, `restore()` (idempotent) at the end. `nvml` is
    the pynvml module (imported when not given); tests pass a test double."""

    def __init__(self, caps: dict[str, float], targets: dict[str, str | None], nvml=None):
        self.caps = dict(caps)
        self.targets = dict(targets)
        self._nvml = nvml
        self._lock = threading.RLock()  # worker threads change roles; restore() may come from atexit
        self._roles: dict[str, str] = {}
        self._boards: dict[str, _Board] = {}  # by NVML target
        self._active = False
        self._initialized = False

    def cap_w(self, name: str) -> float | None:
        """The cap in force on worker `name`'s GPU, in W; None where none is (a role without one,
        a CPU worker, after restore)."""
        board = self._board_of(name)
        return None if board is None or board.cap_mw is None or not self._active else board.cap_mw / 1000

    def apply(self, roles: dict[str, str]) -> None:
        """Opens NVML, checks every cap against every GPU's range (any GPU may take any role
        later), then writes each GPU's limit: its role's cap, or the limit it already has, so a
        caller without the right to set limits is refused here whatever the roles, not at the
        first role change. A refusal is one ValueError, with every limit as it was."""
        gpus = {n: t for n, t in self.targets.items() if t is not None}
        if not gpus:
            raise ValueError(f"power caps need NVML GPUs; the devices ({', '.join(self.targets)}) are CPU workers")
        with self._lock:
            try:
                if self._nvml is None:
                    import pynvml

                    self._nvml = pynvml
                self._nvml.nvmlInit()
            except Exception as e:
                raise ValueError(f"power caps need NVML, which did not start: {e}") from e
            self._initialized = True
            try:
                self._open(gpus)
                self._roles = {n: roles[n] for n in gpus}
                self._active = True
                for board in self._boards.values():
                    self._write(board)
            except BaseException:
                self.restore()
                raise
            atexit.register(self.restore)
        for board in self._boards.values():
            if board.cap_mw is not None:
                log.info("power cap %s: %g W (was %g W)", board.name, board.cap_mw / 1000, board.original_mw / 1000)

    def set_role(self, name: str, role: str) -> None:
        """Worker `name` now has `role`: its GPU gets that role's cap, or its original limit back.
        Never raises: a limit NVML will not take is a warning, and the worker serves on."""
        with self._lock:
            board = self._board_of(name)
            if board is None or not self._active:
                return
            self._roles[name] = role
            try:
                self._write(board)
            except ValueError as e:
                log.warning("%s", e)

    def restore(self) -> None:
        """Every GPU back at the limit it had before apply(); then NVML is closed."""
        with self._lock:
            atexit.unregister(self.restore)
            self._active = False
            for board in self._boards.values():
                board.cap_mw = None
                if board.changed:
                    try:
                        self._nvml.nvmlDeviceSetPowerManagementLimit(board.handle, board.original_mw)
                        board.changed = False
                    except Exception as e:
                        log.error("power cap %s: could not restore its %g W limit: %s", board.name,
                                  board.original_mw / 1000, e)
            if self._initialized:
                try:
                    self._nvml.nvmlShutdown()
                except Exception as e:
                    log.debug("nvmlShutdown: %s", e)
                self._initialized = False

    def _board_of(self, name: str) -> _Board | None:
        return self._boards.get(self.targets.get(name) or "")

    def _open(self, gpus: dict[str, str]) -> None:
        nv = self._nvml
        for name, target in gpus.items():
            if target not in self._boards:
                try:
                    handle = nvml_handle(nv, target)
                    original = nv.nvmlDeviceGetPowerManagementLimit(handle)
                    lo, hi = nv.nvmlDeviceGetPowerManagementLimitConstraints(handle)
                except Exception as e:
                    raise ValueError(f"power caps: NVML cannot read the power limits of {name} ({target}): {e}") from e
                self._boards[target] = _Board(name, handle, original, lo, hi)
            self._boards[target].workers.append(name)
        for board in self._boards.values():
            for role, watts in self.caps.items():
                if not board.min_mw <= round(watts * 1000) <= board.max_mw:
                    raise ValueError(f"power cap {role}={watts:g} W is outside {board.name}'s range "
                                     f"{board.min_mw / 1000:g}-{board.max_mw / 1000:g} W")

    def _write(self, board: _Board) -> None:
        caps = [self.caps[self._roles[n]] for n in board.workers if self._roles[n] in self.caps]
        cap_mw = round(min(caps) * 1000) if caps else None
        limit_mw = board.original_mw if cap_mw is None else cap_mw
        try:
            self._nvml.nvmlDeviceSetPowerManagementLimit(board.handle, limit_mw)
        except Exception as e:
            if getattr(e, "value", None) == getattr(self._nvml, "NVML_ERROR_NO_PERMISSION", NVML_ERROR_NO_PERMISSION):
                raise ValueError(f"power caps: NVML may not set the power limit of {board.name} ({e}); setting GPU "
                                 "power limits needs root (or admin) rights on most systems") from e
            raise ValueError(f"power caps: NVML would not set the power limit of {board.name}: {e}") from e
        board.cap_mw, board.changed = cap_mw, limit_mw != board.original_mw
