"""The socket server: msgpack-RPC over a Unix stream socket, in front of a Runtime.

`server = await serve(rt, path)` ... `await server.close()`; it runs on the runtime's event loop, so
`splitnode serve` and `splitnode up` (beside the dashboard) share one process and one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import stat
from pathlib import Path

import msgpack

from splitnode.api import protocol as p
from splitnode.runtime import Runtime

log = logging.getLogger("splitnode.api")

_READ_CHUNK = 64 * 1024
_DRAIN_EVERY = 64  # answers queued from one read before the server waits for the peer to take them
_CLOSE_FLUSH_S = 1.0  # how long a closing connection may take to flush what is queued to its peer


def prepare_socket_dir(path: Path) -> None:
    """Creates the socket's folder 0700; refuses a folder another user owns or others may write to,
    where someone else could swap the socket for their own."""
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode passes through the umask
    st = folder.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"socket folder {folder} is not a directory")
    if st.st_uid != os.getuid():
        raise PermissionError(f"socket folder {folder} is owned by uid {st.st_uid}, not by you (uid {os.getuid()})")
    if st.st_mode & 0o022:
        raise PermissionError(f"socket folder {folder} is writable by group or others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}); use a folder only you can write to")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def take_socket_lock(path: Path) -> int:
    """An flock on `<socket>.lock`, held for the server's life: only its holder may remove a stale
    socket, bind and listen, so two servers starting at once cannot both pass the stale check.
    Returns the lock's fd; raises SocketInUse where another server holds it."""
    lock = lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise p.SocketInUse(_in_use(path)) from None
        except BaseException:
            os.close(fd)
            raise
        # The holder before us unlinks the file as it lets go: a lock on that unlinked inode is no lock.
        try:
            st = lock.stat()
        except FileNotFoundError:
            st = None
        fst = os.fstat(fd)
        if st is not None and (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
            return fd
        os.close(fd)


def release_socket_lock(path: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        lock_path(path).unlink()
    os.close(fd)


def _in_use(path: Path) -> str:
    return f"a server is already listening at {path}; stop it first or choose another --socket"


def _lock_held(path: Path) -> bool:
    try:
        fd = os.open(lock_path(path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def check_socket_free(path: Path, timeout: float = 1.0, *, remove_stale: bool = False) -> None:
    """Raises SocketInUse if a server answers at `path` or holds its lock. A socket nobody listens
    on is stale; it is removed only with `remove_stale`, which only the lock's holder may pass: a
    server between bind() and listen() refuses connections too."""
    if not remove_stale and _lock_held(path):
        raise p.SocketInUse(_in_use(path))
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; not touching it")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    except (ConnectionRefusedError, FileNotFoundError):
        if remove_stale:
            log.info("removing stale socket %s", path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return
    except asyncio.TimeoutError:
        raise p.SocketInUse(f"something holds {path} but does not accept connections; not taking it over") from None
    writer.close()
    raise p.SocketInUse(_in_use(path))


class Server:
    """One listening socket; one `_Connection` per peer."""

    def __init__(self, rt: Runtime, path: str | os.PathLike | None = None, *,
                 max_frame_bytes: int = p.MAX_FRAME_BYTES, max_streams: int = p.MAX_STREAMS):
        self.rt = rt
        self.path = Path(path) if path is not None else p.default_socket_path()
        self.max_frame_bytes = max_frame_bytes
        self.max_streams = max_streams
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._lock_fd: int | None = None

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

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
            os.chmod(self.path, 0o600)
            st = self.path.stat()
            self._inode = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(self._on_connect, sock=sock)
        except BaseException:
            if sock is not None:
                sock.close()
            self._remove_socket()
            release_socket_lock(self.path, self._lock_fd)
            self._lock_fd = None
            raise
        log.info("listening on %s", self.path)

    async def close(self) -> None:
        """Stops listening and drops every peer at once: a peer that stopped reading cannot hold
        the shutdown up, and the socket is gone before any peer is waited on."""
        if self._server is None:
            return
        self._remove_socket()
        self._server.close()
        conns = list(self.connections)
        for conn in conns:
            conn.abort()
        await asyncio.gather(*(conn.done.wait() for conn in conns))
        self._server = None
        release_socket_lock(self.path, self._lock_fd)
        self._lock_fd = None

    def _remove_socket(self) -> None:
        """Only the socket this server bound: a path re-bound by someone else is left alone."""
        with contextlib.suppress(FileNotFoundError):
            st = self.path.lstat()
            if self._inode == (st.st_dev, st.st_ino):
                self.path.unlink()
        self._inode = None

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
            conn.done.set()


async def serve(rt: Runtime, path: str | os.PathLike | None = None, **limits) -> Server:
    """Starts a socket server for `rt` on the running loop; `await server.close()` stops it."""
    server = Server(rt, path, **limits)
    await server.start()
    return server


class _Connection:
    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.rt = server.rt
        self.reader = reader
        self.writer = writer
        self.tasks: dict[int, asyncio.Task] = {}  # msgid -> the task answering it
        self.closed = False
        self.done = asyncio.Event()  # serve() has returned

    async def serve(self) -> None:
        limit = self.server.max_frame_bytes
        unpacker = p.unpacker(limit)
        fed = 0  # bytes fed to the unpacker
        parsed = 0  # where the last whole message ended
        try:
            while not self.closed:
                data = await self.reader.read(_READ_CHUNK)
                if not data:
                    # EOF is the peer's half-close: it may still read. Its open requests finish; a
                    # peer that is really gone is caught by the first write that fails.
                    await self._finish_open_requests()
                    break
                unpacker.feed(data)
                fed += len(data)
                for n, message in enumerate(unpacker, 1):
                    parsed = unpacker.tell()
                    self._dispatch(message)
                    if n % _DRAIN_EVERY == 0:
                        await self._drain()
                # The unpacker builds a message as its bytes arrive and drops them (tell() counts
                # them as read): bound the unfinished message by its bytes so far, which
                # max_buffer_size does not.
                if fed - parsed > limit:
                    raise msgpack.BufferFull
                await self._drain()  # a peer that sends without reading its answers is read no further
        except msgpack.BufferFull:
            self._send_error(p.ProtocolError(
                f"message larger than the limit of {limit} bytes; closing the connection"))
        except (msgpack.UnpackException, ValueError, TypeError, p.ProtocolError) as e:
            # TypeError: a map keyed by an array or a map (unhashable in Python).
            self._send_error(p.ProtocolError(f"not a msgpack-RPC message ({e}); closing the connection"))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            await self.close()

    async def _finish_open_requests(self) -> None:
        while self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def close(self) -> None:
        """The peer is gone or broke the protocol: its requests are cancelled (their generate
        streams end, and the runtime frees their KV blocks); what is queued for it (an error
        notification) gets a moment to flush, then the connection is dropped."""
        self._cancel_requests()
        tasks = list(self.tasks.values())
        await asyncio.gather(*tasks, return_exceptions=True)
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), _CLOSE_FLUSH_S)
        except (ConnectionError, asyncio.TimeoutError):
            self.writer.transport.abort()

    def abort(self) -> None:
        """The server is stopping: drop the connection now, unsent answers included."""
        self._cancel_requests()
        self.writer.transport.abort()

    def _cancel_requests(self) -> None:
        self.closed = True
        for t in self.tasks.values():
            t.cancel()

    def _write(self, message) -> None:
        if self.closed or self.writer.is_closing():
            return
        try:
            data = p.pack(message)
        except (TypeError, ValueError, OverflowError) as e:
            if message[0] != p.RESPONSE:
                raise
            data = p.pack([p.RESPONSE, message[1], p.error_object(TypeError(f"result not serializable: {e}")), None])
        self.writer.write(data)

    def _send_error(self, exc: BaseException) -> None:
        self._write([p.NOTIFICATION, "error", [p.error_object(exc)]])

    def _dispatch(self, message) -> None:
        if not isinstance(message, (list, tuple)) or not message:
            raise p.ProtocolError(f"expected an array, got {type(message).__name__}")
        if message[0] == p.NOTIFICATION and len(message) == 3:
            return  # no client notifications are defined; the spec has them get no answer
        if message[0] != p.REQUEST or len(message) != 4:
            raise p.ProtocolError("expected a request [0, msgid, method, params]")
        _, msgid, method, params = message
        if not isinstance(msgid, int) or isinstance(msgid, bool) or not 0 <= msgid <= p.MAX_MSGID:
            raise p.ProtocolError(f"msgid must be a 32-bit unsigned int, got {msgid!r}")
        if msgid in self.tasks:
            self._reply(msgid, ValueError(f"msgid {msgid} is already in use by an open request"))
            return
        if len(self.tasks) >= self.server.max_streams:
            self._reply(msgid, p.ProtocolError(
                f"too many open requests on this connection (limit {self.server.max_streams}); "
                f"wait for some to finish"))
            return
        if method not in p.METHODS:
            self._reply(msgid, ValueError(f"unknown method {method!r}; methods are {list(p.METHODS)}"))
            return
        if not isinstance(params, (list, tuple)):
            self._reply(msgid, TypeError(f"params must be an array, got {type(params).__name__}"))
            return
        handler = self._generate if method == "generate" else self._call
        task = asyncio.get_running_loop().create_task(handler(msgid, method, list(params)))
        self.tasks[msgid] = task
        task.add_done_callback(lambda t: self.tasks.pop(msgid) if self.tasks.get(msgid) is t else None)

    def _reply(self, msgid: int, error: BaseException | None = None, result=None) -> None:
        self._write([p.RESPONSE, msgid, None if error is None else p.error_object(error), result])

    def _answer(self, msgid: int, error: BaseException | None = None, result=None) -> None:
        """A task's own response: the peer may reuse the msgid as soon as it reads it."""
        self.tasks.pop(msgid, None)
        self._reply(msgid, error, result)

    async def _call(self, msgid: int, method: str, params: list) -> None:
        rt = self.rt
        try:
            if method == "ping":
                _arity(method, params, 0, 0)
                result = "pong"
            elif method == "status":
                _arity(method, params, 0, 0)
                result = rt.status()
            elif method == "cancel":
                _arity(method, params, 1, 1)
                if not isinstance(params[0], int) or isinstance(params[0], bool):
                    raise TypeError(f"cancel: request_id must be an int, got {params[0]!r}")
                result = await rt.cancel(params[0])
            elif method == "release":
                _arity(method, params, 1, 1)
                rt.release(_str(method, "device", params[0]))
                result = None
            else:  # assign
                _arity(method, params, 2, 4)
                device, role, mode, pin = [*params, *["migrate", True][len(params) - 2:]]
                for name, v in (("device", device), ("role", role), ("mode", mode)):
                    _str(method, name, v)
                if not isinstance(pin, bool):
                    raise TypeError(f"assign: pin must be a bool, got {pin!r}")
                await rt.assign(device, role, mode=mode, pin=pin)
                result = None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._answer(msgid, e)
        else:
            self._answer(msgid, None, result)
        await self._drain()

    async def _generate(self, msgid: int, method: str, params: list) -> None:
        try:
            _arity(method, params, 1, 2)
            prompt = p.prompt_arg(params[0])
            sampling = p.sampling_params(params[1] if len(params) > 1 else None)
            first = True
            async with contextlib.aclosing(self.rt.generate(prompt, sampling)) as events:
                async for ev in events:
                    if ev.finished:
                        self._answer(msgid, None, p.full_event(ev))
                    else:
                        self._write([p.NOTIFICATION, "token", [msgid, p.delta_event(ev, first)]])
                        first = False
                    # A client that stops reading holds its stream back here, not the server's memory.
                    await self._drain()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._answer(msgid, e)
            await self._drain()

    async def _drain(self) -> None:
        """A write that fails means the peer is gone: its requests stop here."""
        try:
            await self.writer.drain()
        except ConnectionError:
            self._cancel_requests()


def _arity(method: str, params: list, lo: int, hi: int) -> None:
    if not lo <= len(params) <= hi:
        want = str(lo) if lo == hi else f"{lo} to {hi}"
        raise TypeError(f"{method}: takes {want} params, got {len(params)}")


def _str(method: str, name: str, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{method}: {name} must be a string, got {value!r}")
    return value
