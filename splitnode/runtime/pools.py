"""The pools: each worker's role, the changes under way and who pinned what (`Pools`), and the
autoscaling policy on top of it (the paper's mixed pool).

A role set by a person (`assign` with pin=True) is pinned until they `release` it. The autoscaler
borrows a worker of one pool into the mixed pool when the prompt queue or the token side's KV
memory passes its threshold; the worker goes back to its own pool once no work of the other kind is
pending, and one borrowed for longer than `repurpose_after_s` moves to the other pool for good.
Pinned workers are never moved. Everything here runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitnode.engine.batcher import Role
from splitnode.runtime.messages import RoleReached
from splitnode.runtime.status import PoolSignals
from splitnode.runtime.worker import Worker

if TYPE_CHECKING:
    from splitnode.runtime.config import RuntimeConfig

log = logging.getLogger("splitnode")

__all__ = ["MODES", "ROLES", "Autoscaler", "Pools", "Role", "check_phases"]

ROLES = tuple(r.value for r in Role)
MODES = ("migrate", "drain")


def check_phases(roles: Iterable[str]) -> None:
    """Refuses a layout that would leave a phase with no worker."""
    roles = [Role(r) for r in roles]
    if not any(r.takes_prompts for r in roles):
        raise ValueError("no worker could run the prompt phase (give one the prompt or mixed role)")
    if not any(r.decodes for r in roles):
        raise ValueError("no worker could run the token phase (give one the token or mixed role)")


class Pools:
    """Each worker's role (stored by its batcher), the role changes under way and their waiters,
    and the pins."""

    def __init__(self, workers: list[Worker]):
        self.workers = workers
        self.pins: set[str] = set()
        self._waiters: dict[str, list[tuple[int, asyncio.Future]]] = {}

    def worker(self, name: str) -> Worker:
        for w in self.workers:
            if w.name == name:
                return w
        raise ValueError(f"unknown device {name!r}; devices are {[w.name for w in self.workers]}")

    def check(self, name: str, role: str, mode: str) -> Worker:
        """The worker `assign(name, role, mode)` would move; raises what the move would refuse."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        w = self.worker(name)
        if w.error is not None:
            raise RuntimeError(f"device {name} failed ({w.error!r}); it takes no role")
        check_phases([role if x is w else (x.target_role or x.role) for x in self.workers])
        return w

    async def assign(self, name: str, role: str, mode: str = "migrate", pin: bool = True) -> None:
        """Moves worker `name` to `role`: its work of the old kind is migrated or drained,
        in-flight prefills finish, then the role flips. Returns once this change (or a later one
        that superseded it) is done. Pinned until `release(name)` unless pin=False."""
        w = self.check(name, role, mode)
        if pin:
            self.pins.add(name)
        if w.target_role is None and w.role == role:
            return
        gen = w.request_role(role, mode)
        fut = asyncio.get_running_loop().create_future()
        # registered before the loop runs anything else, so the worker's report cannot come first
        self._waiters.setdefault(name, []).append((gen, fut))
        await fut

    def release(self, name: str) -> None:
        """Unpins a worker: the autoscaling policy may move it again."""
        self.worker(name)
        self.pins.discard(name)

    def role_reached(self, msg: RoleReached) -> None:
        """The change `msg.gen` and the ones it superseded are done; a later one still waits."""
        waiting = []
        for g, fut in self._waiters.pop(msg.worker, []):
            if g > msg.gen:
                waiting.append((g, fut))
            elif not fut.done():
                fut.set_result(msg.role.value)
        if waiting:
            self._waiters[msg.worker] = waiting

    def fail(self, name: str, error: BaseException) -> None:
        """The role changes waited for on `name` end with `error` (it failed, or the runtime stopped)."""
        for _, fut in self._waiters.pop(name, []):
            if not fut.done():
                fut.set_exception(error)

    def fail_all(self, error: BaseException) -> None:
        for name in list(self._waiters):
            self.fail(name, error)


@dataclass
class _Borrow:
    home: Role  # the pool the worker was borrowed from
    since: float


class Autoscaler:
    def __init__(self, pools: Pools, config: RuntimeConfig):
        self.pools = pools
        self.config = config
        self._borrowed: dict[str, _Borrow] = {}
        self.num_borrows = 0

    def borrowed_from(self, w: Worker) -> str | None:
        b = self._borrowed.get(w.name)
        return None if b is None else b.home.value

    def forget(self, w: Worker) -> None:
        self._borrowed.pop(w.name, None)

    def signals(self) -> PoolSignals:
        """What the policy acts on; status() shows the same numbers."""
        workers = self.pools.workers
        token_side = [w.engine.pool for w in workers if w.role is Role.TOKEN]
        total = sum(p.num_blocks for p in token_side)
        return {
            "prompt_queue_tokens": sum(w.engine.batcher.num_pending_prompt_tokens
                                       for w in workers if w.role is Role.PROMPT),
            "token_kv_occupancy": sum(p.num_used for p in token_side) / total if total else 0.0,
        }

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.autoscale_interval_s)
            try:
                await self.tick()
            except ValueError as e:  # a move the phase check refused: try again next tick
                log.debug("autoscaler: %s", e)
            except Exception:  # the policy must outlive a bad tick; the runtime serves on
                log.exception("autoscaler tick failed")

    def _free(self, role: Role) -> list[Worker]:
        return [w for w in self.pools.workers if w.role is role and w.target_role is None
                and w.name not in self.pools.pins and w.name not in self._borrowed]

    async def tick(self) -> None:
        cfg = self.config
        sig = self.signals()
        now = time.monotonic()
        if sig["prompt_queue_tokens"] > cfg.borrow_prompt_tokens and len(self._free(Role.TOKEN)) > 1:
            await self._borrow(self._free(Role.TOKEN)[-1], Role.TOKEN, now)
        elif sig["token_kv_occupancy"] > cfg.borrow_kv_occupancy and len(self._free(Role.PROMPT)) > 1:
            await self._borrow(self._free(Role.PROMPT)[-1], Role.PROMPT, now)
        for name, b in list(self._borrowed.items()):
            w = self.pools.worker(name)
            if w.name in self.pools.pins or w.role is not Role.MIXED:
                self._borrowed.pop(name, None)
                continue
            if now - b.since > cfg.repurpose_after_s:
                other = Role.PROMPT if b.home is Role.TOKEN else Role.TOKEN
                log.info("autoscaler: %s stayed mixed %.0f s; re-purposed %s -> %s", name, now - b.since,
                         b.home.value, other.value)
                self._borrowed.pop(name)
                await self.pools.assign(name, other, mode="migrate", pin=False)
            elif self._other_work_done(w, b.home, sig):
                self._borrowed.pop(name)
                await self.pools.assign(name, b.home, mode="migrate", pin=False)

    async def _borrow(self, w: Worker, home: Role, now: float) -> None:
        log.info("autoscaler: borrowing %s (%s) into the mixed pool", w.name, home.value)
        await self.pools.assign(w.name, Role.MIXED, mode="drain", pin=False)
        self._borrowed[w.name] = _Borrow(home, now)
        self.num_borrows += 1

    def _other_work_done(self, w: Worker, home: Role, sig: PoolSignals) -> bool:
        cfg = self.config
        if home is Role.TOKEN:  # it was lent to the prompt side
            return (w.engine.batcher.num_pending_prompt_tokens == 0
                    and sig["prompt_queue_tokens"] <= cfg.borrow_prompt_tokens // 2)
        return not any(s.is_decode for s in w.engine.batcher.running) and sig["token_kv_occupancy"] <= cfg.borrow_kv_occupancy
