"""`async with Client() as c:` — the Runtime's methods over the socket, with the same names, so a
dashboard can drive either (`status` is a coroutine here)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from splitnode.api import protocol as p
from splitnode.engine.outputs import RequestOutput
from splitnode.engine.sampling import SamplingParams


@dataclass
class _Stream:
    builder: p.OutputBuilder = field(default_factory=p.OutputBuilder)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    request_id: int | None = None
    abandoned: bool = False  # the caller left before the request's id was known: cancel it on arrival


class Client:
    def __init__(self, path: str | os.PathLike | None = None, connect_timeout_s: float = 10.0):
        self.path = Path(path) if path is not None else p.default_socket_path()
        self.connect_timeout_s = connect_timeout_s  # how long a full listen backlog is retried
        self._msgids = itertools.count()
        self._calls: dict[int, asyncio.Future] = {}
        self._streams: dict[int, _Stream] = {}
        self._reader_task: asyncio.Task | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._error: BaseException | None = None

    @property
    def error(self) -> BaseException | None:
        """Why the connection failed, or None while it works; a failed Client stays failed (connect
        a new one)."""
        return self._error

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        sock = await self._connect_socket()
        reader, self._writer = await asyncio.open_unix_connection(sock=sock)
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _connect_socket(self) -> socket.socket:
        """connect() by hand: a non-blocking Unix socket's connect fails with EAGAIN while the
        server's listen backlog is full (a crowd connecting at once), and asyncio's connect takes
        that for a connection and fails later (EINVAL). A full backlog is retried, backing off
        with jitter, for connect_timeout_s."""
        deadline, delay = time.monotonic() + self.connect_timeout_s, 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(str(self.path))
                return sock
            except BlockingIOError:
                sock.close()
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                raise p.ServerNotRunning(
                    f"no splitnode server at {self.path} ({e.strerror or e}); start one with `splitnode serve`") from None
            except BaseException:
                sock.close()
                raise
            if time.monotonic() + delay > deadline:
                raise p.ServerBusy(f"the splitnode server at {self.path} did not accept the connection in "
                                   f"{self.connect_timeout_s:g}s (its listen backlog stayed full); try again later")
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(2 * delay, 0.1)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task

    # -- the runtime's methods --------------------------------------------------------------------------

    async def generate(self, prompt: str | list[int],
                       params: SamplingParams | dict | None = None) -> AsyncIterator[RequestOutput]:
        """One RequestOutput per token, the last with finished=True. Leaving the loop early cancels
        the request on the server."""
        msgid = self._send("generate", [prompt, p.sampling_dict(params)])
        stream = self._streams[msgid] = _Stream()
        done = False
        try:
            while True:
                ev = await stream.queue.get()
                if isinstance(ev, BaseException):
                    done = True
                    raise ev
                done = ev.finished
                yield ev
                if done:
                    return
        finally:
            if done or stream.request_id is not None:
                self._streams.pop(msgid, None)
            if not done:
                if stream.request_id is None:
                    stream.abandoned = True
                else:
                    self._cancel_later(stream.request_id)

    async def cancel(self, request_id: int) -> bool:
        return await self._call("cancel", request_id)

    async def assign(self, device: str, role: str, mode: str = "migrate", pin: bool = True) -> None:
        await self._call("assign", device, role, mode, pin)

    async def release(self, device: str) -> None:
        await self._call("release", device)

    async def status(self) -> dict:
        return await self._call("status")

    async def ping(self) -> str:
        return await self._call("ping")

    # -- the wire -----------------------------------------------------------------------------------------

    def _send(self, method: str, params: list) -> int:
        if self._error is not None:
            # A new exception each time: re-raising the stored one would grow its traceback per call.
            raise ConnectionError(f"the connection to {self.path} is gone ({self._error}); "
                                  f"a new Client is needed") from self._error
        if self._writer is None:
            raise RuntimeError("Client is not connected; use `async with Client(...) as c:`")
        while True:  # after 2**32 requests the ids wrap: skip those still open
            msgid = next(self._msgids) % (p.MAX_MSGID + 1)
            if msgid not in self._calls and msgid not in self._streams:
                break
        self._writer.write(p.pack([p.REQUEST, msgid, method, params]))
        return msgid

    async def _call(self, method: str, *params):
        msgid = self._send(method, list(params))
        fut = self._calls[msgid] = asyncio.get_running_loop().create_future()
        try:
            return await fut
        finally:
            self._calls.pop(msgid, None)

    def _cancel_later(self, request_id: int) -> None:
        """From a stream's finally (maybe during garbage collection): a request whose answer nobody awaits."""
        if self._error is None and self._writer is not None and not self._writer.is_closing():
            msgid = self._send("cancel", [request_id])
            fut = self._calls[msgid] = asyncio.get_running_loop().create_future()

            def forget(_) -> None:
                self._calls.pop(msgid, None)
                if not fut.cancelled():
                    fut.exception()

            fut.add_done_callback(forget)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        unpacker = p.unpacker()
        try:
            while True:
                data = await reader.read(64 * 1024)
                if not data:
                    raise ConnectionResetError(f"the splitnode server at {self.path} closed the connection")
                unpacker.feed(data)
                for message in unpacker:
                    self._on_message(message)
        except asyncio.CancelledError:
            self._fail(ConnectionResetError("the client was closed"))
            raise
        except Exception as e:
            self._fail(e)

    def _on_message(self, message) -> None:
        if message[0] == p.RESPONSE:
            _, msgid, error, result = message
            if msgid in self._streams:
                stream = self._streams[msgid]
                if error is not None:
                    stream.queue.put_nowait(p.remote_error(error))
                else:
                    stream.queue.put_nowait(p.OutputBuilder.from_full(result))
                if stream.abandoned:
                    self._streams.pop(msgid, None)
            elif msgid in self._calls and not self._calls[msgid].done():
                fut = self._calls[msgid]
                if error is not None:
                    fut.set_exception(p.remote_error(error))
                else:
                    fut.set_result(result)
        elif message[0] == p.NOTIFICATION and message[1] == "token":
            msgid, event = message[2]
            stream = self._streams.get(msgid)
            if stream is None:
                return
            if stream.request_id is None:
                stream.request_id = event["request_id"]
            if stream.abandoned:
                self._streams.pop(msgid, None)
                self._cancel_later(stream.request_id)
                return
            stream.queue.put_nowait(stream.builder.add_delta(event))
        elif message[0] == p.NOTIFICATION and message[1] == "error":
            (error,) = message[2]
            self._fail(p.remote_error(error))

    def _fail(self, error: BaseException) -> None:
        """The connection is gone: every open call and stream gets the error."""
        self._error = error
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # a cancel nobody awaits must not log "never retrieved"
        for stream in self._streams.values():
            stream.queue.put_nowait(error)
