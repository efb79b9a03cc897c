"""The Client over a long life: msgids that wrap around, and a connection that died, against a
real server and Runtime."""

from __future__ import annotations

import asyncio
import itertools
import traceback

from splitnode.api import Client, serve
from splitnode.api import protocol as p

LONG = {"max_tokens": 400, "temperature": 0.0, "ignore_eos": True}


async def test_wrapped_msgid_never_collides_with_an_open_stream(rt, sock_dir):
    """After 2**32 requests the msgids wrap; one still open (a long-lived stream) is skipped, else
    the server would answer "msgid already in use", that answer would end the stream, and the call
    would never be answered."""
    srv = await serve(rt, sock_dir / "s.sock")
    try:
        async with Client(sock_dir / "s.sock") as c:
            events = c.generate("Hello", LONG)  # msgid 0
            await events.__anext__()
            c._msgids = itertools.count(p.MAX_MSGID + 1)  # 2**32 requests later: the next msgid is 0 again
            try:
                assert await asyncio.wait_for(c.ping(), 5) == "pong"
                assert not (await events.__anext__()).finished  # the stream lives on
            finally:
                await events.aclose()
    finally:
        await srv.close()


async def test_a_dead_connection_does_not_grow_one_traceback_per_call(rt, sock_dir):
    """Each call on a failed connection raises a new ConnectionError (chained to the cause): one
    instance raised again and again would grow its traceback by the caller's frames each time, and
    a dashboard polling status() while disconnected would keep them all alive."""
    srv = await serve(rt, sock_dir / "s.sock")
    c = Client(sock_dir / "s.sock")
    await c.connect()
    await c.ping()
    await srv.close()
    errors = []
    for _ in range(200):
        try:
            await c.status()
        except ConnectionError as e:
            errors.append(e)
    depth = len(traceback.extract_tb(errors[-1].__traceback__))
    await c.close()
    assert len(errors) == 200
    assert depth < 20, f"one exception instance, raised 200 times, carries {depth} traceback entries"

