"""How the dashboard reaches a runtime: the runtime's own interface (status, assign, release,
generate, cancel), in-process or over the socket. The app holds one of these and nothing else,
so `splitnode up` and `splitnode dash` run the same code."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Protocol


class Backend(Protocol):
    where: str  # shown in the header: "in-process" or the socket path
    session: int  # changes when the backend reaches a new runtime (a restarted server)

    async def status(self) -> dict: ...
    async def assign(self, device: str, role: str, mode: str = "migrate", pin: bool = True) -> None: ...
    async def release(self, device: str) -> None: ...
    def generate(self, prompt, params) -> AsyncIterator: ...
    async def cancel(self, request_id: int) -> bool: ...


class LocalBackend:
    """A Runtime in this process, on this event loop."""

    def __init__(self, rt, where: str = "in-process"):
        self.rt = rt
        self.where = where
        self.session = 0

    async def status(self) -> dict:
        return self.rt.status()

    async def assign(self, device: str, role: str, mode: str = "migrate", pin: bool = True) -> None:
        await self.rt.assign(device, role, mode=mode, pin=pin)

    async def release(self, device: str) -> None:
        self.rt.release(device)

    def generate(self, prompt, params) -> AsyncIterator:
        return self.rt.generate(prompt, params)

    async def cancel(self, request_id: int) -> bool:
        return await self.rt.cancel(request_id)


class RemoteBackend:
    """A runtime behind `splitnode.api.server.serve`, through `splitnode.api.client.Client`.
    Its errors arrive as the client raises them (a refused role change is a ValueError there too).
    A failed Client stays failed, so once the connection is gone each call first tries a new one
    (backing off while nothing answers): `splitnode dash` reattaches to a restarted server."""

    session: int  # counts reattachments; a new session's counters start over (a new server)

    def __init__(self, client, where: str, retry_s: float = 0.1, max_retry_s: float = 2.0):
        self.client = client
        self.where = where
        self.session = 0
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self._backoff_s = 0.0
        self._next_try = 0.0
        self._reconnecting = asyncio.Lock()

    async def _connected(self):
        if self.client.error is None:
            return self.client
        async with self._reconnecting:
            if self.client.error is None:  # another call reattached while this one waited
                return self.client
            if time.monotonic() < self._next_try:
                raise ConnectionError(f"{self.client.error}; reconnecting")
            fresh = type(self.client)(self.client.path)
            try:
                await fresh.connect()
            except OSError as e:
                self._backoff_s = min(max(2 * self._backoff_s, self.retry_s), self.max_retry_s)
                self._next_try = time.monotonic() + self._backoff_s
                raise ConnectionError(f"{self.client.error}; reconnecting") from e
            old, self.client = self.client, fresh
            self._backoff_s = 0.0
            self.session += 1
            await old.close()
            return fresh

    async def close(self) -> None:
        await self.client.close()

    async def status(self) -> dict:
        return await (await self._connected()).status()

    async def assign(self, device: str, role: str, mode: str = "migrate", pin: bool = True) -> None:
        await (await self._connected()).assign(device, role, mode=mode, pin=pin)

    async def release(self, device: str) -> None:
        await (await self._connected()).release(device)

    async def generate(self, prompt, params) -> AsyncIterator:
        client = await self._connected()
        async with contextlib.aclosing(client.generate(prompt, params)) as events:
            async for ev in events:
                yield ev

    async def cancel(self, request_id: int) -> bool:
        return await (await self._connected()).cancel(request_id)
