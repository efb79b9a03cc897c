"""What one peer can make the socket server hold or do (frame size, unfinished and whole messages'
memory, deeply nested values, a peer that stops reading, a half-close, bad map keys, pipelining),
many connections, shutdown with such a peer attached, and starting beside another server, against
a real Runtime on two CPU workers over real Unix sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import msgpack
import pytest
from polling import until

from splitnode.api import Client, Server, serve
from splitnode.api import protocol as p
from splitnode.api import server as server_mod
from splitnode.api.protocol import ServerBusy
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


# -- what unfinished and whole messages may cost ----------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def unfinished_request_of_empty_arrays(num_arrays: int) -> bytes:
    """[0, 1, "ping", [[[], [], ...], ...]]: params announced as num_arrays + 1 arrays of
    MAX_ARRAY_LEN empty arrays, of which num_arrays are sent (~1 MiB each): it never completes."""
    head = bytes([0x94, 0x00, 0x01, 0xA4]) + b"ping" + b"\xdd" + (num_arrays + 1).to_bytes(4, "big")
    one = b"\xdd" + p.MAX_ARRAY_LEN.to_bytes(4, "big") + b"\x90" * p.MAX_ARRAY_LEN
    return head + one * num_arrays


async def test_unfinished_messages_cost_their_bytes_not_the_objects_msgpack_builds(rt, sock_dir):
    """Issue: one unfinished 15 MB message of nested empty arrays made the server hold ~1 GiB (a
    streaming Unpacker builds the objects as the bytes arrive, ~64 bytes of heap per wire byte).
    Eight such connections at once: the server process stays within a few hundred MiB of idle."""
    limit = 384 * 2**20
    payload = unfinished_request_of_empty_arrays(15)
    loop = asyncio.get_running_loop()
    peers = []
    # the 15 MB shape: a server whose frame limit lets such a message in (the default is 4 MiB)
    async with Server(rt, sock_dir / "s.sock", max_frame_bytes=16 * 2**20) as srv:
        idle = rss_bytes()
        try:
            for _ in range(8):
                peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                peers.append(peer)
                peer.connect(str(srv.path))
                peer.setblocking(False)
                for at in range(0, len(payload), 2**20):
                    await loop.sock_sendall(peer, payload[at:at + 2**20])
                    grown = rss_bytes() - idle
                    assert grown < limit, f"{grown / 2**20:.0f} MiB for {len(peers)} unfinished message(s)"
            async with Client(srv.path) as c:  # the server is responsive, and holds all eight
                assert await c.ping() == "pong"
                assert len(srv.connections) == 9
            assert rss_bytes() - idle < limit
        finally:
            for peer in peers:
                peer.close()


async def test_a_whole_message_of_many_empty_arrays_is_refused_before_it_is_built(rt, sock_dir):
    """A whole message is decoded with a budget of arrays and maps: 100,000 empty arrays would
    cost ~6 MB of heap for 100 KB on the wire."""
    async with Server(rt, sock_dir / "s.sock") as srv:
        reader, writer = await asyncio.open_unix_connection(str(srv.path))
        writer.write(msgpack.packb([0, 1, "ping", [[[]] * 100_000]]))
        data = await asyncio.wait_for(reader.read(65536), 10)
        writer.close()
        kind, method, (error,) = msgpack.unpackb(data, raw=False)
        assert (kind, method, error["type"]) == (2, "error", "ProtocolError")
        assert f"more than {p.MAX_CONTAINERS} arrays and maps" in error["message"]


def nested(depth: int, leaf: bytes = b"\x90") -> bytes:
    """A msgpack array nested `depth` deep (msgpack.packb stops at 511)."""
    return b"\x91" * (depth - 1) + leaf


async def test_a_value_nested_a_thousand_deep_gets_a_brief_error_not_a_dropped_connection(rt, sock_dir, caplog):
    """Issue: such a value as the method name made formatting the error raise RecursionError outside
    the handled exceptions (no error notification, a traceback logged per connection). Errors show
    a client's value cut in depth and length; the connection goes on."""
    deep = nested(1000)
    cases = [  # (method, params) as msgpack bytes, and what the error says
        (deep, b"\x90", "unknown method [["),
        (b"\xa6cancel", b"\x91" + deep, "request_id must be an int, got [["),
        (b"\xa6assign", b"\x92" + deep + b"\xa5mixed", "device must be a string, got [["),
        (b"\xa6assign", b"\x94\xa5cpu:0\xa5mixed\xa7migrate" + deep, "pin must be a bool, got [["),
        (b"\xa8generate", b"\x92\xa2Hi\x81\xa5bogus" + deep, "bogus"),
        (b"\xa8generate", b"\x92\xa2Hi\x81\xa4stop" + deep, ""),  # the engine's check: answered, whatever it says
    ]
    async with Server(rt, sock_dir / "s.sock") as srv:
        reader, writer = await asyncio.open_unix_connection(str(srv.path))
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

        async def recv():
            while True:
                for m in unpacker:
                    return m
                data = await asyncio.wait_for(reader.read(65536), 10)
                if not data:
                    return None
                unpacker.feed(data)

        for i, (method, params, text) in enumerate(cases):
            writer.write(bytes([0x94, 0x00, i]) + method + params)
            answer = await recv()
            assert answer is not None and len(answer) == 4, f"case {i}: {answer}"
            kind, msgid, error, result = answer
            assert (kind, msgid, result) == (1, i, None) and text in error["message"], (i, error)
            assert len(error["message"]) < 400, error["message"]
        writer.write(msgpack.packb([0, 50, "ping", []]))
        assert await recv() == [1, 50, None, "pong"]
        writer.write(bytes([0x94, 0x00]) + deep + b"\xa4ping\x90")  # as the msgid: a protocol error
        kind, method, (error,) = await recv()
        assert (kind, method, error["type"]) == (2, "error", "ProtocolError") and "msgid must be" in error["message"]
        assert len(error["message"]) < 400 and await recv() is None
        writer.close()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# -- many requests, many connections --------------------------------------------------------------------

async def test_pipelined_requests_past_max_streams_are_slowed_not_refused(rt, sock_dir):
    """Issue: more than max_streams pipelined cheap requests were refused before any ran. They wait
    for a slot instead: all run, never more than max_streams at once."""
    n = 300
    async with Server(rt, sock_dir / "s.sock", max_streams=4) as srv:
        reader, writer = await asyncio.open_unix_connection(str(srv.path))
        writer.write(b"".join(msgpack.packb([0, i, "generate", ["Hi", {"max_tokens": 1}]]) for i in range(n)))
        writer.write(b"".join(msgpack.packb([0, n + i, "ping", []]) for i in range(n)))
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        answers, peak = {}, 0
        while len(answers) < 2 * n:
            unpacker.feed(await asyncio.wait_for(reader.read(65536), 30))
            for m in unpacker:
                if m[0] == 1:
                    answers[m[1]] = m
            peak = max(peak, rt.status()["requests"]["active"])
        writer.close()
    assert [answers[i][2] for i in range(2 * n) if answers[i][2] is not None] == []
    assert all(answers[i][3]["finished"] for i in range(n)) and {answers[n + i][3] for i in range(n)} == {"pong"}
    assert peak <= 4


async def test_what_waits_for_a_peer_that_reads_nothing_is_one_answer_past_the_mark(rt, sock_dir):
    """The bound on unread answers does not grow with the open requests: one request writes at a
    time, each once the write buffer is under its high-water mark. Here 64 streams whose first
    event carries ~60 KB of prompt logprobs."""
    params = {"max_tokens": 2, "temperature": 0.0, "ignore_eos": True, "prompt_logprobs": 20}
    async with Server(rt, sock_dir / "s.sock") as srv:
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(str(srv.path))
        peer.setblocking(False)
        data = b"".join(msgpack.packb([0, i, "generate", [[7] * 200, params]]) for i in range(64))
        await asyncio.get_running_loop().sock_sendall(peer, data)
        try:
            await until(lambda: rt.num_finished == 64, timeout=60)
            assert pending_bytes(srv) < 256 * 1024
        finally:
            peer.close()


async def test_three_hundred_clients_connecting_at_once_all_get_in(rt, sock_dir):
    """Issue: with a listen backlog of 100, 199 of 300 Clients connecting at once failed with
    OSError EINVAL (asyncio's connect on a full Unix-socket backlog)."""
    async with Server(rt, sock_dir / "s.sock") as srv:
        clients = [Client(srv.path) for _ in range(300)]
        try:
            await asyncio.gather(*(c.connect() for c in clients))
            assert await asyncio.gather(*(c.ping() for c in clients)) == ["pong"] * 300
        finally:
            await asyncio.gather(*(c.close() for c in clients))


async def test_a_backlog_that_stays_full_is_retried_then_a_clear_error(sock_dir):
    path = sock_dir / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)  # room for one waiting connection, which this takes; nothing accepts
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.setblocking(False)
    first.connect(str(path))
    try:
        with pytest.raises(ServerBusy, match="backlog stayed full"):
            await Client(path, connect_timeout_s=0.3).connect()
    finally:
        first.close()
        listener.close()


async def test_a_connection_over_the_limit_is_told_why_and_closed(rt, sock_dir):
    async with Server(rt, sock_dir / "s.sock", max_connections=2) as srv, Client(srv.path) as a:
        async with Client(srv.path) as b:
            assert [await a.ping(), await b.ping()] == ["pong", "pong"]
            reader, writer = await asyncio.open_unix_connection(str(srv.path))
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert await asyncio.wait_for(reader.read(65536), 10) == b""  # closed
            writer.close()
            kind, method, (error,) = msgpack.unpackb(data, raw=False)
            assert (kind, method, error["type"]) == (2, "error", "ServerBusy")
            assert "too many connections to this server (limit 2)" in error["message"]
        await until(lambda: len(srv.connections) == 1)
        async with Client(srv.path) as c:
            assert await c.ping() == "pong"
