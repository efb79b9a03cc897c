"""The socket server: msgpack-RPC over a Unix stream socket, in front of a Runtime.

`server = await serve(rt, path)` ... `await server.shutdown(grace_s)` (or `close()`: no grace); it
runs on the runtime's event loop, so `splitnode serve` and `splitnode up` (beside the dashboard)
share one process and one loop.

What one peer can make the server hold is bounded: an unfinished message costs its bytes (up to
max_frame_bytes; all connections together max_buffered_bytes), a whole one is decoded within
msgpack's limits and a budget of containers; what waits for a peer to read it is the write buffer's
high-water mark plus one answer (one request writes at a time); past max_streams open requests a
connection is read no further; past max_connections a new one is turned away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from pathlib import Path

import msgpack

from splitnode.api import protocol as p
from splitnode.api.socket_file import check_socket_free, prepare_socket_dir, release_socket_lock, take_socket_lock
from splitnode.runtime import Runtime

log = logging.getLogger("splitnode.api")

_READ_CHUNK = 64 * 1024
_DRAIN_EVERY = 64  # answers queued from one read before the server waits for the peer to take them
_CLOSE_FLUSH_S = 1.0  # how long a closing connection may take to flush what is queued to its peer
_PROBE_S = 1.0  # how often a connection that is not being read checks that its peer is still there
_BACKLOG = 4096  # connections waiting for accept(); the kernel caps it at net.core.somaxconn
# Answered as they are read, in order, without a task or a slot of max_streams: they do not wait on
# anything, and a cancel must get through while a connection has max_streams streams open.
_INLINE = frozenset({"ping", "status", "cancel", "release"})


class Server:
    """One listening socket; one `_Connection` per peer."""

    def __init__(self, rt: Runtime, path: str | os.PathLike | None = None, *,
                 max_frame_bytes: int = p.MAX_FRAME_BYTES, max_streams: int = p.MAX_STREAMS,
                 max_connections: int = p.MAX_CONNECTIONS, max_buffered_bytes: int = p.MAX_BUFFERED_BYTES,
                 backlog: int = _BACKLOG):
        self.rt = rt
        self.path = Path(path) if path is not None else p.default_socket_path()
        self.max_frame_bytes = max_frame_bytes
        self.max_streams = max_streams
        self.max_connections = max_connections
        self.max_buffered_bytes = max_buffered_bytes
        self.backlog = backlog
        self.connections: set[_Connection] = set()
        self.buffered_bytes = 0  # unfinished messages, all connections together
        self.stopping = False  # shutdown began: new connections and requests are turned away
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._lock_fd: int | None = None
        self._hurry = asyncio.Event()  # the shutdown's grace is over
        self._request_ended = asyncio.Event()
        self._stopped: asyncio.Future | None = None  # the shutdown, once begun

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def open_requests(self) -> int:
        return sum(len(c.tasks) for c in self.connections)

    async def start(self) -> None:
        prepare_socket_dir(self.path)
        self._lock_fd = take_socket_lock(self.path)
        sock = None
        try:
            await check_socket_free(self.path, remove_stale=True)
            # Bound by hand: bind() fails on an existing path, where create_unix_server(path=...) would
            # delete whatever socket is there, a live server's included. The umask makes the socket
            # 0600 from its first moment; others must not connect between bind() and chmod().
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old_umask)
            st = self.path.lstat()
            if not stat.S_ISSOCK(st.st_mode):  # chmod follows symlinks: never chmod what is not ours
                raise FileExistsError(f"{self.path} changed under the server as it bound it; not touching it")
            self._inode = (st.st_dev, st.st_ino)
            os.chmod(self.path, 0o600)
            # A full backlog makes a client's connect() fail (EAGAIN): room for a crowd arriving at once.
            self._server = await asyncio.start_unix_server(self._on_connect, sock=sock, backlog=self.backlog)
        except BaseException:
            if sock is not None:
                sock.close()
            self._remove_socket()
            release_socket_lock(self.path, self._lock_fd)
            self._lock_fd = None
            raise
        log.info("listening on %s", self.path)

    async def close(self) -> None:
        """`shutdown` without a grace: every open request is answered "shutting down" at once."""
        await self.shutdown(0.0)

    async def shutdown(self, grace_s: float = 0.0) -> None:
        """Stops listening and removes the socket first (a client sees no server at once, not a
        dead one); lets open requests finish for up to `grace_s` (`hurry()` cuts it short); then
        answers each request still open with ServerShuttingDown, tells every peer, and closes:
        a peer that does not read gets _CLOSE_FLUSH_S, so none can hold the shutdown up. Called
        again meanwhile, it waits for the first call (with no grace left if it gives none)."""
        if self._stopped is None:
            if self._server is None:
                return
            self._stopped = asyncio.ensure_future(self._shutdown(grace_s))
        elif grace_s <= 0:
            self.hurry()
        await asyncio.shield(self._stopped)

    async def _shutdown(self, grace_s: float) -> None:
        self.stopping = True
        self._remove_socket()
        self._server.close()
        for conn in self.connections:  # not started yet: they do not get to start now
            conn.refuse_waiting(p.ServerShuttingDown("the server is shutting down"))
        await self._grace(grace_s)
        conns = list(self.connections)
        await asyncio.gather(*(c.finish(p.ServerShuttingDown("the server is shutting down")) for c in conns))
        await asyncio.gather(*(c.done.wait() for c in conns))
        self._server = None
        release_socket_lock(self.path, self._lock_fd)
        self._lock_fd = None

    def hurry(self) -> None:
        """Ends a shutdown's grace now (a second Ctrl-C); its open requests still get the error."""
        self._hurry.set()

    async def _grace(self, grace_s: float) -> None:
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.open_requests and not self._hurry.is_set():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            self._request_ended.clear()
            ended, hurry = (asyncio.ensure_future(e.wait()) for e in (self._request_ended, self._hurry))
            await asyncio.wait({ended, hurry}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
            hurry.cancel()

    def _remove_socket(self) -> None:
        """Only the socket this server bound: a path re-bound by someone else is left alone."""
        with contextlib.suppress(FileNotFoundError):
            st = self.path.lstat()
            if self._inode == (st.st_dev, st.st_ino):
                self.path.unlink()
        self._inode = None

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        if self.stopping:
            await conn.refuse(p.ServerShuttingDown("the server is shutting down"))
            return
        if len(self.connections) >= self.max_connections:
            await conn.refuse(p.ServerBusy(f"too many connections to this server (limit {self.max_connections}); "
                                           f"try again later"))
            return
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
            conn.done.set()


async def serve(rt: Runtime, path: str | os.PathLike | None = None, **limits) -> Server:
    """Starts a socket server for `rt` on the running loop; `await server.shutdown()` stops it."""
    server = Server(rt, path, **limits)
    await server.start()
    return server


class _Connection:
    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.rt = server.rt
        self.reader = reader
        self.writer = writer
        self.framer = p.Framer(server.max_frame_bytes)
        self.tasks: dict[int, asyncio.Task] = {}  # msgid -> the task answering it, until it answers
        # Requests read while max_streams were open, as their bytes (the decoded prompt may cost ten
        # times more), in arrival order: each starts as a slot frees.
        self.waiting: dict[int, bytes] = {}
        self._waiting_bytes = 0
        self.owned: set[int] = set()  # the runtime's ids of this connection's streams: all it may cancel
        self.closed = False  # nothing more is read or started
        self.done = asyncio.Event()  # serve() has returned
        self._sealed = False  # the last message (an error notification) is written: nothing follows it
        self._counted = 0  # this connection's share of server.buffered_bytes
        self._slot = asyncio.Event()  # a request answered (flow control, EOF)
        self._write_turn = asyncio.Lock()

    # -- reading --------------------------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            await self._read_loop()
        except p.ProtocolError as e:  # the framer's and decode's limits, bad shapes: the message says
            self._send_error(p.ProtocolError(f"{e}; closing the connection"))
        except (msgpack.UnpackException, ValueError, TypeError) as e:
            # TypeError: a map keyed by an array or a map (unhashable in Python).
            self._send_error(p.ProtocolError(f"not a msgpack-RPC message ({e}); closing the connection"))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as e:  # a bug, or MemoryError: one line per connection, not a traceback
            log.error("closing a connection after an unexpected error: %s: %s", type(e).__name__, p.brief(str(e)))
            log.debug("the unexpected error", exc_info=True)
            self._send_error(RuntimeError("internal server error; closing the connection"))
        finally:
            await self.close()

    async def _read_loop(self) -> None:
        while not self.closed:
            data = await self.reader.read(_READ_CHUNK)
            if not data:
                await self._after_eof()
                return
            frames = self.framer.feed(data)
            self._account()
            if self.server.buffered_bytes > self.server.max_buffered_bytes:
                raise p.ProtocolError(f"the server holds more than {self.server.max_buffered_bytes} bytes of "
                                      f"unfinished messages, its limit across connections")
            for n, frame in enumerate(frames, 1):
                if self.closed:
                    return
                await self._handle(frame)
                if n % _DRAIN_EVERY == 0:
                    await self._drain()
            await self._drain()  # a peer that sends without reading its answers is read no further
            await asyncio.sleep(0)  # read() returns buffered bytes without yielding: let others run

    def _account(self) -> None:
        now = 0 if self.closed else self.framer.buffered + self._waiting_bytes
        self.server.buffered_bytes += now - self._counted
        self._counted = now

    async def _after_eof(self) -> None:
        """EOF is a half-close or a peer gone, and reading cannot tell which; a write can: to a Unix
        socket whose peer closed it fails at once (EPIPE), to one that only shut down its write
        side it does not. So a half-closed peer (`nc -N -U`: send, shutdown(SHUT_WR), read to EOF)
        still gets its answers, while a closed one's requests, queued ones included (they write
        nothing that could fail), are cancelled now and their KV blocks and reservations freed.
        Probed again every _PROBE_S, for a peer that half-closes and goes later."""
        while (self.tasks or self.waiting) and not self.closed:
            if self._peer_gone():
                self._cancel_requests()
                return
            while (self.tasks or self.waiting) and await self._request_ended(_PROBE_S):
                pass

    async def _wait_for_room(self) -> None:
        """Flow control: with max_streams open requests and as many waiting (or max_frame_bytes of
        them), nothing more is read from this peer until one is answered; its bytes wait in the
        socket, then its writes block. Until then, requests that need no slot (a cancel above
        all) are answered as they come. A peer that goes meanwhile is caught by a probe every
        _PROBE_S (its EOF is not read while nothing is)."""
        while self._waiting_full() and not self.closed:
            if not await self._request_ended(_PROBE_S) and self._peer_gone():
                self._cancel_requests()

    def _waiting_full(self) -> bool:
        return len(self.waiting) >= self.server.max_streams or self._waiting_bytes >= self.server.max_frame_bytes

    async def _request_ended(self, timeout_s: float) -> bool:
        """True once a request of this connection is answered, False after timeout_s."""
        self._slot.clear()
        try:
            await asyncio.wait_for(self._slot.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def _peer_gone(self) -> bool:
        self._write([p.NOTIFICATION, p.NOOP, []])  # clients ignore notifications they do not know
        return self.writer.transport.is_closing()

    # -- dispatch -------------------------------------------------------------------------------------

    async def _handle(self, frame: bytes) -> None:
        message = p.decode(frame)
        if not isinstance(message, list) or not message:
            raise p.ProtocolError(f"expected an array, got {type(message).__name__}")
        if message[0] == p.NOTIFICATION and len(message) == 3:
            return  # no client notifications are defined; the spec has them get no answer
        if message[0] != p.REQUEST or len(message) != 4:
            raise p.ProtocolError("expected a request [0, msgid, method, params]")
        _, msgid, method, params = message
        if not isinstance(msgid, int) or isinstance(msgid, bool) or not 0 <= msgid <= p.MAX_MSGID:
            raise p.ProtocolError(f"msgid must be a 32-bit unsigned int, got {p.brief(msgid)}")
        if (error := self._refusal(msgid, method, params)) is not None:
            self._reply(msgid, error)
        elif method in _INLINE:
            await self._call_inline(msgid, method, params)
        elif len(self.tasks) < self.server.max_streams and not self.waiting:
            self._start(msgid, method, params)
        else:
            del message, params  # held as bytes while it waits
            self.waiting[msgid] = frame
            self._waiting_bytes += len(frame)
            self._account()
            await self._wait_for_room()

    def _refusal(self, msgid: int, method, params) -> BaseException | None:
        if msgid in self.tasks or msgid in self.waiting:
            return ValueError(f"msgid {msgid} is already in use by an open request")
        if self.server.stopping:
            return p.ServerShuttingDown("the server is shutting down")
        if method not in p.METHODS:
            return ValueError(f"unknown method {p.brief(method)}; methods are {list(p.METHODS)}")
        if not isinstance(params, list):
            return TypeError(f"params must be an array, got {type(params).__name__}")
        return None

    def _start(self, msgid: int, method: str, params: list) -> None:
        coro = self._generate(msgid, params) if method == "generate" else self._call(msgid, method, params)
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks[msgid] = task
        task.add_done_callback(lambda t: self._release(msgid, t))

    def _release(self, msgid: int, task: asyncio.Task | None = None) -> None:
        """msgid is free again, and its slot of max_streams: the first waiting request takes it."""
        if task is None or self.tasks.get(msgid) is task:
            self.tasks.pop(msgid, None)
        while self.waiting and len(self.tasks) < self.server.max_streams and not self.closed:
            waiting_id = next(iter(self.waiting))
            frame = self.waiting.pop(waiting_id)
            self._waiting_bytes -= len(frame)
            _, _, method, params = p.decode(frame)  # it decoded before: it does again
            if self.server.stopping:
                self._reply(waiting_id, p.ServerShuttingDown("the server is shutting down"))
            else:
                self._start(waiting_id, method, params)
        self._account()
        self._slot.set()
        self.server._request_ended.set()

    async def _call_inline(self, msgid: int, method: str, params: list) -> None:
        try:
            result = await self._run(method, params)
        except Exception as e:
            self._reply(msgid, e)
        else:
            self._reply(msgid, None, result)

    async def _call(self, msgid: int, method: str, params: list) -> None:
        try:
            result = await self._run(method, params)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._answer(msgid, e)
        else:
            await self._answer(msgid, None, result)

    async def _run(self, method: str, params: list):
        rt = self.rt
        if method == "ping":
            _arity(method, params, 0, 0)
            return "pong"
        if method == "status":
            _arity(method, params, 0, 0)
            return rt.status()
        if method == "cancel":
            _arity(method, params, 1, 1)
            request_id = params[0]
            if not isinstance(request_id, int) or isinstance(request_id, bool):
                raise TypeError(f"cancel: request_id must be an int, got {p.brief(request_id)}")
            # Only this connection's own: another's id answers false, as an unknown one does.
            return request_id in self.owned and await rt.cancel(request_id)
        if method == "release":
            _arity(method, params, 1, 1)
            rt.release(_str(method, "device", params[0]))
            return None
        _arity(method, params, 2, 4)  # assign
        device, role, mode, pin = [*params, *["migrate", True][len(params) - 2:]]
        for name, v in (("device", device), ("role", role), ("mode", mode)):
            _str(method, name, v)
        if not isinstance(pin, bool):
            raise TypeError(f"assign: pin must be a bool, got {p.brief(pin)}")
        await rt.assign(device, role, mode=mode, pin=pin)
        return None

    async def _generate(self, msgid: int, params: list) -> None:
        request_id = None
        try:
            _arity("generate", params, 1, 3)
            prompt = p.prompt_arg(params[0])
            sampling = p.sampling_params(params[1] if len(params) > 1 else None)
            stream = params[2] if len(params) > 2 else True
            if not isinstance(stream, bool):
                raise TypeError(f"generate: stream must be a bool, got {p.brief(stream)}")
            first = True
            async with contextlib.aclosing(self.rt.generate(prompt, sampling)) as events:
                async for ev in events:
                    if request_id is None:
                        request_id = ev.request_id
                        self.owned.add(request_id)
                    if ev.finished:
                        await self._answer(msgid, None, p.full_event(ev))
                    elif stream:
                        await self._send([p.NOTIFICATION, "token", [msgid, p.delta_event(ev, first)]])
                        first = False
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._answer(msgid, e)
        finally:
            self.owned.discard(request_id)

    # -- writing --------------------------------------------------------------------------------------

    async def _send(self, message) -> None:
        """A task's write, one task at a time and each once the peer has taken what is queued
        (the write buffer is under its high-water mark): what waits for a peer that stops reading
        is that mark plus one answer, however many requests are open. A client that stops reading
        holds its own streams back here, not the server's memory."""
        async with self._write_turn:
            await self._drain()
            self._write(message)

    async def _answer(self, msgid: int, error: BaseException | None = None, result=None) -> None:
        """A task's own response, its last write: the peer may reuse the msgid as soon as it reads it."""
        async with self._write_turn:
            await self._drain()
            if self.closed:
                return  # cancelled meanwhile: a shutdown answers it, a peer gone needs nothing
            self._release(msgid)
            self._reply(msgid, error, result)

    def _reply(self, msgid: int, error: BaseException | None = None, result=None) -> None:
        self._write([p.RESPONSE, msgid, None if error is None else p.error_object(error), result])

    def _send_error(self, exc: BaseException) -> None:
        """The last message to this peer."""
        self._write([p.NOTIFICATION, "error", [p.error_object(exc)]])
        self._sealed = True

    def _write(self, message) -> None:
        if self._sealed or self.writer.is_closing():
            return
        try:
            data = p.pack(message)
        except (TypeError, ValueError, OverflowError) as e:
            if message[0] != p.RESPONSE:
                raise
            data = p.pack([p.RESPONSE, message[1], p.error_object(TypeError(f"result not serializable: {e}")), None])
        self.writer.write(data)

    async def _drain(self) -> None:
        """A write that fails means the peer is gone: its requests stop here."""
        try:
            await self.writer.drain()
        except ConnectionError:
            self._cancel_requests()

    # -- the end --------------------------------------------------------------------------------------

    def _cancel_requests(self) -> None:
        self.closed = True
        self.waiting.clear()  # never started: nothing to cancel
        self._waiting_bytes = 0
        self._slot.set()
        for t in self.tasks.values():
            t.cancel()

    async def close(self) -> None:
        """The peer is gone, broke the protocol, or the server is stopping: its requests are
        cancelled (their generate streams end, and the runtime frees their KV blocks); what is
        queued for it gets _CLOSE_FLUSH_S to flush, then the connection is dropped."""
        self._cancel_requests()
        await asyncio.gather(*list(self.tasks.values()), return_exceptions=True)
        self._account()
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), _CLOSE_FLUSH_S)
        except (ConnectionError, asyncio.TimeoutError):
            self.writer.transport.abort()

    async def finish(self, error: BaseException) -> None:
        """The server stops: each request still open is cancelled and answered with `error`, the
        peer gets it as the error notification, and the connection closes (serve() returns)."""
        unanswered = [*self.tasks, *self.waiting]
        self._cancel_requests()
        await asyncio.gather(*list(self.tasks.values()), return_exceptions=True)
        for msgid in unanswered:
            self._reply(msgid, error)
        self._send_error(type(error)(f"{error}; closing the connection"))
        await self.close()

    def refuse_waiting(self, error: BaseException) -> None:
        for msgid in self.waiting:
            self._reply(msgid, error)
        self.waiting.clear()
        self._waiting_bytes = 0
        self._account()
        self._slot.set()

    async def refuse(self, error: BaseException) -> None:
        """A connection the server will not serve (too many, or shutting down): told why, closed."""
        self._send_error(error)
        await self.close()


def _arity(method: str, params: list, lo: int, hi: int) -> None:
    if not lo <= len(params) <= hi:
        want = str(lo) if lo == hi else f"{lo} to {hi}"
        raise TypeError(f"{method}: takes {want} params, got {len(params)}")


def _str(method: str, name: str, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{method}: {name} must be a string, got {p.brief(value)}")
    return value
