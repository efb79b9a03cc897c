"""What one peer can make the socket server hold or do (frame size, a peer that stops reading, a
half-close, bad map keys), shutdown with such a peer attached, and starting beside another server,
against a real Runtime on two CPU workers over real Unix sockets."""

from __future__ import annotations

import asyncio
import socket

import msgpack
import pytest
from polling import until

from splitnode.api import Server, serve
from splitnode.api import server as server_mod
from splitnode.engine.outputs import RequestOutput


def pending_bytes(srv: Server) -> int:
    return sum(c.writer.transport.get_write_buffer_size() for c in srv.connections)


async def test_close_does_not_hang_on_a_peer_that_stopped_reading(rt, sock_dir):
    """A client that sends requests and never reads its answers fills the server's write buffer,
    which can never flush: Server.close() (`splitnode serve` on SIGTERM, `q` in `splitnode up`)
    must drop such a peer rather than wait for it, and remove the socket file."""
    srv = await serve(rt, sock_dir / "s.sock")
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(str(srv.path))
    peer.setblocking(False)
    data = b"".join(msgpack.packb([0, i, "status", []]) for i in range(20_000))
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(peer, data)  # the server reads it all as it answers; we read nothing
    await until(lambda: pending_bytes(srv) > 0)
    try:
        await asyncio.wait_for(srv.close(), 5)
    except asyncio.TimeoutError:
        pytest.fail("Server.close() hung on a peer that does not read; socket left at "
                    f"{srv.path} (exists: {srv.path.exists()})")
    finally:
        peer.close()
    assert not srv.path.exists()


async def test_stale_check_does_not_delete_a_socket_being_bound_by_another_server(rt, sock_dir):
    """Between bind() and listen() a starting server's socket refuses connections just as a stale
    one does: the check alone (without the socket's lock) must not remove it, or a second server
    starting at the same moment would unlink the first one's socket and bind its own."""
    path = sock_dir / "s.sock"
    starting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    starting.bind(str(path))  # server A, between bind() and listen()
    try:
        await server_mod.check_socket_free(path)  # server B's check
        assert path.exists(), "B removed A's freshly bound socket"
    finally:
        starting.close()


async def test_a_peer_that_stops_reading_does_not_make_the_server_hold_every_event(rt, sock_dir):
    """The server sends deltas and waits for the peer before the next event, but the runtime runs
    the request to its end regardless: what it queues for the stalled stream must not be cumulative
    copies of the output (O(N^2) for N tokens), and what the server holds for the peer is bounded
    by one answer per open request past the write buffer's high-water mark, not by tokens."""
    srv = await serve(rt, sock_dir / "s.sock")
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(str(srv.path))
    peer.setblocking(False)
    gen = msgpack.packb([0, 0, "generate", [[7] * 8, {"max_tokens": 400, "temperature": 0.0, "ignore_eos": True}]])
    fill = b"".join(msgpack.packb([0, i, "status", []]) for i in range(1, 20_000))  # fills the buffer
    await asyncio.get_running_loop().sock_sendall(peer, gen + fill)
    try:
        await until(lambda: rt.num_finished == 1, timeout=60)  # the runtime ran it to the end anyway
        (stream,) = rt._streams.values()
        held = list(stream.queue._queue)
        copies = [item for item in held if isinstance(item, RequestOutput)]
        assert not copies, f"{len(copies)} whole outputs queued for a peer that reads nothing"
        assert pending_bytes(srv) < 1024 * 1024
    finally:
        peer.close()
        await srv.close()


async def test_a_map_with_an_unhashable_key_is_a_protocol_error_not_an_unhandled_exception(rt, sock_dir):
    """The unpacker raises TypeError for a map keyed by an array or a map: the peer gets the
    documented [2, "error", ...] notification before the connection closes, as for any bad frame."""
    async with Server(rt, sock_dir / "s.sock") as srv:
        reader, writer = await asyncio.open_unix_connection(str(srv.path))
        # [0, 1, "ping", [{[1]: 2}]]
        writer.write(bytes([0x94, 0x00, 0x01, 0xA4]) + b"ping" + bytes([0x91, 0x81, 0x91, 0x01, 0x02]))
        data = await asyncio.wait_for(reader.read(65536), 10)
        writer.close()
        assert data, "connection closed with no error notification"
        kind, method, (error,) = msgpack.unpackb(data, raw=False)
        assert (kind, method, error["type"]) == (2, "error", "ProtocolError")


async def test_assign_of_a_failed_worker_is_answered_not_left_hanging(rt, sock_dir):
    """Assigning a role to a device whose worker failed is refused with an error answer; it must
    not wait forever on a worker that will never change role (holding an open-request slot)."""
    from splitnode.api import Client, RemoteError

    w = rt.worker("cpu:1")

    def broken(now=None):
        raise RuntimeError("injected device failure")

    w.engine.pool.expire = broken  # called at the top of every worker turn
    await until(lambda: w.error is not None)
    async with Server(rt, sock_dir / "s.sock") as srv, Client(srv.path) as c:
        assert (await c.status())["devices"][1]["error"]
        with pytest.raises(RemoteError):
            await asyncio.wait_for(c.assign("cpu:1", "mixed"), 5)


async def test_socket_is_never_connectable_by_others_even_for_a_moment(rt, sock_dir, monkeypatch):
    """The socket is 0600 from the moment bind() creates it, whatever the process's umask: in an
    existing folder others may enter (0755), another local user looping on connect() must find no
    window before the chmod in which to get in and keep a connection."""
    import os
    import stat

    modes = []
    real_chmod = os.chmod

    def chmod(path, mode, *a, **k):
        if str(path).endswith(".sock"):
            modes.append(stat.S_IMODE(os.lstat(path).st_mode))
        return real_chmod(path, mode, *a, **k)

    monkeypatch.setattr(os, "chmod", chmod)
    folder = sock_dir / "run"
    folder.mkdir(mode=0o755)
    real_chmod(folder, 0o755)
    old = os.umask(0)
    try:
        srv = await serve(rt, folder / "s.sock")
    finally:
        os.umask(old)
    await srv.close()
    assert modes and not modes[0] & 0o077, f"socket was {modes[0]:04o} between bind() and chmod()"


async def test_frame_limit_bounds_a_message_made_of_many_small_items(rt, sock_dir):
    """The frame limit bounds a whole message, not only msgpack's unparsed bytes: the streaming
    unpacker drops bytes as it builds the object, and a message of many small arrays costs ~56
    bytes of heap per wire byte. Here: a 128 KiB limit (above the server's 64 KiB reads) and a
    ~1 MB request made of small items."""
    async with Server(rt, sock_dir / "s.sock", max_frame_bytes=128 * 1024) as srv:
        reader, writer = await asyncio.open_unix_connection(str(srv.path))
        writer.write(msgpack.packb([0, 1, "ping", [[[0] * 1000] * 1000]]))
        data = await asyncio.wait_for(reader.read(65536), 10)
        writer.close()
        message = msgpack.unpackb(data, raw=False)
        assert message[:2] == [2, "error"] and "larger than the limit" in message[2][0]["message"], message


async def test_a_peer_that_half_closes_after_its_request_still_gets_the_answer(rt, sock_dir):
    """EOF on the read side is a half-close, not a peer gone: a one-shot client that sends a
    request and shuts down its write side (`nc -N -U`, or sendall + shutdown(SHUT_WR) + read to
    EOF) still gets its answer, then EOF."""
    async with Server(rt, sock_dir / "s.sock") as srv:
        reader, writer = await asyncio.open_unix_connection(str(srv.path))
        writer.write(msgpack.packb([0, 1, "generate", ["Hi", {"max_tokens": 4, "temperature": 0.0}]]))
        writer.write_eof()
        data = b""
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            data += chunk
        writer.close()
        messages = list(msgpack.Unpacker(__import__("io").BytesIO(data), raw=False, strict_map_key=False))
        assert messages and messages[-1][:3] == [1, 1, None], messages
