"""Graceful shutdown: `Server.shutdown(grace_s)` in-process, and `splitnode serve` / `splitnode up`
stopped by SIGTERM end to end (the console script, the demo model on two CPU workers, real Clients).

Issue: on SIGTERM with streams in flight, `serve` dropped every connection before the runtime's
"stopped" error could reach it (clients saw a bare EOF), and a second SIGTERM ended it with -15."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import signal
import struct
import sys
import termios
from pathlib import Path

import pytest
from polling import until

from splitnode.api import Client, RemoteError, ServerNotRunning, serve

SPLITNODE = Path(sys.executable).with_name("splitnode")  # the console script of this venv
LONG = {"max_tokens": 1000, "temperature": 0.0, "ignore_eos": True}  # outlives every test here


def kv_used(rt) -> int:
    return sum(d["kv_blocks_used"] + d["kv_blocks_reserved"] for d in rt.status()["devices"])


async def rest_of(events) -> BaseException | None:
    """Reads a stream to its end: the exception it ended with, or None if it finished."""
    try:
        async for _ in events:
            pass
    except Exception as e:
        return e
    return None


async def test_shutdown_lets_streams_finish_in_the_grace_then_ends_the_rest_with_an_error(rt, sock_dir):
    srv = await serve(rt, sock_dir / "s.sock")
    async with Client(srv.path) as c:
        short = c.generate("Hi", {"max_tokens": 40, "temperature": 0.0, "ignore_eos": True})
        long = c.generate("Hello", LONG)
        await short.__anext__()
        await long.__anext__()
        stopping = asyncio.create_task(srv.shutdown(grace_s=600))
        await until(lambda: not srv.path.exists())  # the socket goes first
        with pytest.raises(ServerNotRunning):
            await Client(srv.path).connect()
        with pytest.raises(RemoteError, match="shutting down"):
            await c.ping()  # a new request in the grace is refused
        assert await rest_of(short) is None  # finished in the grace
        assert not stopping.done()
        srv.hurry()  # what a second SIGTERM does
        error = await rest_of(long)
        assert isinstance(error, RemoteError) and error.type == "ServerShuttingDown", error
        await asyncio.wait_for(stopping, 10)
    assert not srv.path.exists() and not srv.path.with_name("s.sock.lock").exists()
    await until(lambda: kv_used(rt) == 0 and rt.status()["requests"]["active"] == 0)


async def start(*args: str, **kwargs) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(SPLITNODE), *args, "--devices", "cpu:2", "--num-kv-blocks", "1024", **kwargs)


async def wait_listening(proc: asyncio.subprocess.Process, path: Path) -> None:
    await until(lambda: path.exists() or proc.returncode is not None, timeout=180)
    assert proc.returncode is None, f"exited with {proc.returncode} before listening"


async def open_streams(clients: list[Client], per_client: int) -> list[asyncio.Task]:
    """Streams that have each had their first event, read on to their end by tasks."""
    streams = [c.generate([5 + i] * 8, LONG) for c in clients for i in range(per_client)]
    await asyncio.gather(*(s.__anext__() for s in streams))
    return [asyncio.create_task(rest_of(s)) for s in streams]


def assert_all_shut_down(results: list) -> None:
    bad = [r for r in results if not (isinstance(r, RemoteError) and r.type == "ServerShuttingDown")]
    assert not bad, f"{len(bad)} of {len(results)} streams ended otherwise, e.g. {bad[0]!r}"


async def test_serve_on_sigterm_ends_every_stream_with_shutting_down_and_exits_0(sock_dir):
    path = sock_dir / "s.sock"
    proc = await start("serve", "--socket", str(path), "--shutdown-grace-s", "0.5", stderr=asyncio.subprocess.PIPE)
    try:
        await wait_listening(proc, path)
        clients = [Client(path) for _ in range(4)]
        await asyncio.gather(*(c.connect() for c in clients))
        streams = await open_streams(clients, 16)
        proc.send_signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*streams), 60)
        rc = await asyncio.wait_for(proc.wait(), 60)
        err = (await proc.stderr.read()).decode()
        assert rc == 0, err
        assert_all_shut_down(results)
        assert "splitnode: stopped" in err
        assert not path.exists() and not path.with_name("s.sock.lock").exists()
        await asyncio.gather(*(c.close() for c in clients))
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


async def test_serve_a_second_sigterm_ends_the_grace_at_once_and_still_exits_0(sock_dir):
    path = sock_dir / "s.sock"
    proc = await start("serve", "--socket", str(path), "--shutdown-grace-s", "600", stderr=asyncio.subprocess.PIPE)
    try:
        await wait_listening(proc, path)
        async with Client(path) as c:
            streams = await open_streams([c], 8)
            proc.send_signal(signal.SIGTERM)
            await until(lambda: not path.exists())  # shutting down: in the grace
            assert not any(s.done() for s in streams)
            proc.send_signal(signal.SIGTERM)
            assert_all_shut_down(await asyncio.wait_for(asyncio.gather(*streams), 60))
            assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


async def test_up_on_sigterm_stops_as_q_does(sock_dir):
    """The dashboard exits and gives the terminal back (leaves the alternate screen), the same
    shutdown runs, and the socket and its lock are removed."""
    path = sock_dir / "s.sock"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 35, 120, 0, 0))
    output = bytearray()
    loop = asyncio.get_running_loop()

    def read_terminal() -> None:
        try:
            output.extend(os.read(master, 65536))
        except OSError:  # EIO: the process and its terminal are gone
            loop.remove_reader(master)

    loop.add_reader(master, read_terminal)
    proc = await start("up", "--socket", str(path), "--shutdown-grace-s", "0.5", stdin=slave, stdout=slave,
                       stderr=slave, env={**os.environ, "TERM": "xterm-256color"}, start_new_session=True)
    os.close(slave)
    try:
        await wait_listening(proc, path)
        await until(lambda: b"\x1b[?1049h" in output, timeout=60)  # the dashboard is up
        async with Client(path) as c:
            streams = await open_streams([c], 4)
            shown = len(output)
            proc.send_signal(signal.SIGTERM)
            assert_all_shut_down(await asyncio.wait_for(asyncio.gather(*streams), 60))
            assert await asyncio.wait_for(proc.wait(), 60) == 0
        await until(lambda: b"splitnode: stopped" in output)
        given_back = output[shown:]
        assert b"\x1b[?1049l" in given_back, "the terminal was left in the alternate screen"
        assert given_back.rfind(b"\x1b[?25h") > given_back.rfind(b"\x1b[?25l"), "the cursor was left hidden"
        assert not path.exists() and not path.with_name("s.sock.lock").exists()
    finally:
        loop.remove_reader(master)
        os.close(master)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


async def test_serve_on_sigterm_while_loading_says_interrupted_instead_of_dying(sock_dir):
    """SIGTERM before the socket is up used to end the process with -15 mid-load."""
    path = sock_dir / "s.sock"
    proc = await start("serve", "--socket", str(path), stderr=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stderr.readline(), 120)
        assert b"loading" in line  # printed once the handlers are in place
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 120)
        err = (await proc.stderr.read()).decode()
        # mid-load it is an interruption (130); a load that won the race stops cleanly (0): never -15
        assert (rc, "splitnode: interrupted" in err) == (130, True) or (rc, "splitnode: stopped" in err) == (0, True), err
        assert "Traceback" not in err and not path.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
