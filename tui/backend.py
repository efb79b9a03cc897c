"""How the dashboard reaches a runtime: the runtime's own interface (status, assign, release,
generate, cancel), in-process or over the socket. The app holds one of these and nothing else,
so `splitnode up` and `splitnode dash` run the same code."""

from __future__ import annotations

from typing import AsyncIterator, Protocol


class Backend(Protocol):
    where: str  # shown in the header: "in-process" or the socket path

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
    Its errors arrive as the client raises them (a refused role change is a ValueError there too)."""

    def __init__(self, client, where: str):
        self.client = client
        self.where = where

    async def status(self) -> dict:
        return await self.client.status()

    async def assign(self, device: str, role: str, mode: str = "migrate", pin: bool = True) -> None:
        await self.client.assign(device, role, mode=mode, pin=pin)

    async def release(self, device: str) -> None:
        await self.client.release(device)

    def generate(self, prompt, params) -> AsyncIterator:
        return self.client.generate(prompt, params)

    async def cancel(self, request_id: int) -> bool:
        return await self.client.cancel(request_id)

