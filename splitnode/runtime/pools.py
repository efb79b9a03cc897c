"""The pool policy (the paper's mixed pool): when the prompt queue or the token side's KV memory
passes its threshold, a worker of the other pool is borrowed into the mixed pool; it goes back to
its own pool once no work of the other kind is pending; a worker borrowed for longer than
`repurpose_after_s` moves to the other pool for good. Pinned workers are never moved."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from splitnode.runtime.runtime import Runtime
    from splitnode.runtime.worker import Worker

log = logging.getLogger("splitnode")


class Autoscaler:
    def __init__(self, rt: "Runtime"):
        self.rt = rt
        self._borrowed: dict[str, tuple[str, float]] = {}  # name -> (home role, since)
        self.num_borrows = 0

    def borrowed_from(self, w: "Worker") -> str | None:
        b = self._borrowed.get(w.name)
        return None if b is None else b[0]

    def forget(self, w: "Worker") -> None:
        self._borrowed.pop(w.name, None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.rt.config.autoscale_interval_s)
            try:
                await self.tick()
            except ValueError as e:  # a move the phase check refused: try again next tick
                log.debug("autoscaler: %s", e)
            except Exception:  # the policy must outlive a bad tick; the runtime serves on
                log.exception("autoscaler tick failed")

    def _free(self, role: str) -> list["Worker"]:
        return [w for w in self.rt.workers if w.role == role and w.target_role is None
                and w.name not in self.rt.pins and w.name not in self._borrowed]

    async def tick(self) -> None:
        cfg = self.rt.config
        workers = self.rt.workers
        prompt_queue = sum(w.engine.batcher.num_pending_prompt_tokens for w in workers if w.role == "prompt")
        token_side = [w.engine.pool for w in workers if w.role == "token"]
        occupancy = (sum(p.num_used for p in token_side) / sum(p.num_blocks for p in token_side)
                     if token_side else 0.0)
        now = time.monotonic()
        if prompt_queue > cfg.borrow_prompt_tokens and len(self._free("token")) > 1:
            await self._borrow(self._free("token")[-1], "token", now)
        elif occupancy > cfg.borrow_kv_occupancy and len(self._free("prompt")) > 1:
            await self._borrow(self._free("prompt")[-1], "prompt", now)
        for name, (home, since) in list(self._borrowed.items()):
            w = self.rt.worker(name)
            if w.name in self.rt.pins or w.role != "mixed":
                self._borrowed.pop(name, None)
                continue
            if now - since > cfg.repurpose_after_s:
                other = "prompt" if home == "token" else "token"
                log.info("autoscaler: %s stayed mixed %.0f s; re-purposed %s -> %s", name, now - since, home, other)
                self._borrowed.pop(name)
                await self.rt.assign(name, other, mode="migrate", pin=False)
            elif self._other_work_done(w, home, prompt_queue, occupancy):
                self._borrowed.pop(name)
                await self.rt.assign(name, home, mode="migrate", pin=False)

    async def _borrow(self, w: "Worker", home: str, now: float) -> None:
        log.info("autoscaler: borrowing %s (%s) into the mixed pool", w.name, home)
        await self.rt.assign(w.name, "mixed", mode="drain", pin=False)
        self._borrowed[w.name] = (home, now)
        self.num_borrows += 1

    def _other_work_done(self, w: "Worker", home: str, prompt_queue: int, occupancy: float) -> bool:
        cfg = self.rt.config
        if home == "token":  # it was lent to the prompt side
            return w.engine.batcher.num_pending_prompt_tokens == 0 and prompt_queue <= cfg.borrow_prompt_tokens // 2
        return not any(s.is_decode for s in w.engine.batcher.running) and occupancy <= cfg.borrow_kv_occupancy
