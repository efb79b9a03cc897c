"""The socket API against a real Runtime on two CPU workers, over real Unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import stat

import aio_msgpack_rpc
import msgpack
import pytest
from polling import until

from splitnode import cli
from splitnode.api import Client, RemoteError, Server, SocketInUse, serve
from splitnode.api import server as server_mod
from splitnode.engine.sampling import SamplingParams
from splitnode.runtime import Runtime, RuntimeConfig

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True)
LONG = {"max_tokens": 400, "temperature": 0.0, "ignore_eos": True}  # outlives the test's disconnect


@pytest.fixture
async def server(rt, sock_dir):
    srv = await serve(rt, sock_dir / "s.sock")
    yield srv
    await srv.close()


class RawClient:
    """Plain msgpack + asyncio, to check the server against the spec rather than against our Client;
    msgpack's default Unpacker, which refuses integer map keys (strict_map_key=True)."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.unpacker = msgpack.Unpacker()

    @classmethod
    async def open(cls, path):
        return cls(*await asyncio.open_unix_connection(str(path)))

    def send(self, *message):
        self.writer.write(msgpack.packb(list(message), use_bin_type=True))

    async def recv(self):
        """The next message, or None at EOF."""
        while True:
            for message in self.unpacker:
                return message
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            if not data:
                return None
            self.unpacker.feed(data)

    async def call(self, msgid, method, *params):
        self.send(0, msgid, method, list(params))
        return await self.recv()

    def close(self):
        self.writer.close()


def kv_used(rt) -> int:
    return sum(d["kv_blocks_used"] + d["kv_blocks_reserved"] for d in rt.status()["devices"])


async def test_generate_over_socket_matches_runtime(rt, server):
    direct = [ev async for ev in rt.generate("Hello there", GREEDY)]
    async with Client(server.path) as c:
        remote = [ev async for ev in c.generate("Hello there", GREEDY)]
        by_dict = [ev async for ev in c.generate(list(direct[0].prompt_token_ids), {"max_tokens": 8, "temperature": 0.0,
                                                                                   "ignore_eos": True})]
    assert len(remote) == len(direct) == 8  # one event per token
    for a, b in zip(remote, direct):
        assert (a.token_ids, a.new_token_ids, a.text, a.delta) == (b.token_ids, b.new_token_ids, b.text, b.delta)
        assert a.logprobs == b.logprobs and a.finished == b.finished
        assert a.prompt == "Hello there" and a.prompt_token_ids == b.prompt_token_ids
    assert remote[-1].finish_reason == "length" and set(remote[-1].metrics) >= {"ttft_s", "e2e_s"}
    assert by_dict[-1].token_ids == direct[-1].token_ids and by_dict[-1].logprobs is None


async def test_raw_msgpack_rpc_client_streams_one_notification_per_token(server):
    raw = await RawClient.open(server.path)
    assert await raw.call(7, "ping") == [1, 7, None, "pong"]
    assert await raw.call(7, "ping") == [1, 7, None, "pong"]  # a msgid is free again once answered
    kind, msgid, error, st = await raw.call(8, "status")
    assert (kind, msgid, error) == (1, 8, None)
    assert [d["name"] for d in st["devices"]] == ["cpu:0", "cpu:1"]

    raw.send(0, 9, "generate", ["Hi", {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True, "logprobs": 1}])
    notes = []
    while (m := await raw.recv())[0] == 2:
        notes.append(m)
    assert len(notes) == 5 and all(n[1] == "token" and n[2][0] == 9 for n in notes)
    assert [len(n[2][1]["new_token_ids"]) for n in notes] == [1] * 5
    assert "prompt_token_ids" in notes[0][2][1] and "prompt_token_ids" not in notes[1][2][1]
    # each token's logprobs keyed by token ids as strings, the sampled token among them
    assert all(str(n[2][1]["new_token_ids"][0]) in n[2][1]["logprobs"][0] for n in notes)
    assert all(isinstance(t, str) for n in notes for t in n[2][1]["logprobs"][0])
    kind, msgid, error, final = m
    assert (kind, msgid, error) == (1, 9, None)
    assert final["finished"] and final["finish_reason"] == "length" and len(final["token_ids"]) == 6
    assert final["token_ids"][:5] == [n[2][1]["new_token_ids"][0] for n in notes]
    # stream=False: the response alone, for a client that cannot take notifications
    kind, msgid, error, alone = await raw.call(10, "generate", "Hi", {"max_tokens": 6, "temperature": 0.0,
                                                                     "ignore_eos": True}, False)
    assert (kind, msgid, error) == (1, 10, None) and alone["token_ids"] == final["token_ids"]
    raw.close()


async def test_a_third_party_msgpack_rpc_client_gets_the_whole_output(rt, server):
    """Issue: aio-msgpack-rpc's default Unpacker refused the integer map keys of logprobs, and the
    response was lost. Its notifications are logged as unexpected and skipped, as a plain client does."""
    direct = [ev async for ev in rt.generate("Hello there", GREEDY)][-1]
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    client = aio_msgpack_rpc.Client(reader, writer, response_timeout=30)
    try:
        final = await client.call("generate", "Hello there", dataclasses.asdict(GREEDY))
        assert final["finished"] and final["token_ids"] == direct.token_ids
        assert [{int(t): tuple(v) for t, v in row.items()} for row in final["logprobs"]] == direct.logprobs
        assert [d["name"] for d in (await client.call("status"))["devices"]] == ["cpu:0", "cpu:1"]
    finally:
        client.close()


async def test_unknown_method_and_bad_params_are_errors_and_server_keeps_serving(server):
    raw = await RawClient.open(server.path)
    bad = [
        ("shutdown", [], "ValueError", "unknown method"),
        ("__init__", [], "ValueError", "unknown method"),
        ("generate", ["Hi", {"max_tokens": 2, "bogus": 1}], "ValueError", "bogus"),
        ("generate", ["Hi", {"max_tokens": "two"}], "ValueError", "max_tokens"),
        ("generate", ["Hi", [1, 2]], "TypeError", "params"),
        ("generate", [5], "TypeError", "prompt"),
        ("generate", [[1, 99999]], "ValueError", "token ids"),
        ("generate", ["Hi", {}, "no"], "TypeError", "stream"),
        ("assign", ["cpu:0"], "TypeError", "takes 2 to 4 params"),
        ("assign", ["cpu:0", "gpu"], "ValueError", "role"),
        ("assign", ["cpu:9", "mixed"], "ValueError", "unknown device"),
        ("assign", ["cpu:0", "mixed", "migrate", "yes"], "TypeError", "pin"),
        ("cancel", ["x"], "TypeError", "request_id"),
        ("release", [], "TypeError", "takes 1 params"),
    ]
    for i, (method, params, type_, text) in enumerate(bad):
        kind, msgid, error, result = await raw.call(i, method, *params)
        assert (kind, msgid, result) == (1, i, None), method
        assert error["type"] == type_ and text in error["message"], (method, error)
    raw.send(0, 99, "ping", {"not": "an array"})
    assert (await raw.recv())[2]["type"] == "TypeError"
    assert await raw.call(100, "ping") == [1, 100, None, "pong"]
    raw.close()

    async with Client(server.path) as c:  # the Client raises what the runtime would, as a RemoteError
        with pytest.raises(ValueError, match="unknown SamplingParams field"):
            async for _ in c.generate("Hi", {"max_tokenz": 3}):
                pass
        with pytest.raises(RemoteError, match="role must be one of"):
            await c.assign("cpu:0", "gpu")
        assert await c.ping() == "pong"


async def test_oversize_frame_is_an_error_and_closes_the_connection(rt, sock_dir):
    async with Server(rt, sock_dir / "s.sock", max_frame_bytes=4096) as srv:
        raw = await RawClient.open(srv.path)
        raw.send(0, 1, "generate", ["x" * 10_000, {}])
        kind, method, (error,) = await raw.recv()
        assert (kind, method, error["type"]) == (2, "error", "ProtocolError")
        assert "larger than the limit of 4096 bytes" in error["message"]
        assert await raw.recv() is None  # closed
        raw = await RawClient.open(srv.path)  # the server itself is fine
        assert await raw.call(1, "ping") == [1, 1, None, "pong"]
        raw.send(0, 2, "generate", ["x" * 500, {"max_tokens": 1}])  # under the limit it works
        assert (await raw.recv())[:3] == [1, 2, None]
        raw.send("not", "rpc")
        assert (await raw.recv())[2][0]["type"] == "ProtocolError"
        assert await raw.recv() is None
        raw.close()


async def test_past_max_streams_a_request_waits_for_a_slot_instead_of_being_refused(rt, sock_dir):
    """Flow control, not refusal: this test pinned "too many open requests" for the request past
    max_streams (issue: pipelined requests refused before any ran); now that request waits until
    an open one ends. Calls that need no slot (ping, cancel) are answered meanwhile."""
    async with Server(rt, sock_dir / "s.sock", max_streams=2) as srv:
        raw = await RawClient.open(srv.path)
        raw.send(0, 1, "generate", ["a", LONG])
        raw.send(0, 2, "generate", ["b", LONG])
        raw.send(0, 3, "generate", ["c", {"max_tokens": 2, "temperature": 0.0}])  # past the limit
        raw.send(0, 2, "cancel", [0])  # msgid 2 is still streaming
        raw.send(0, 3, "ping", [])  # msgid 3 is waiting: in use too
        raw.send(0, 5, "ping", [])
        ids, answers = {}, {}
        while len(ids) < 2 or len(answers) < 3:
            m = await raw.recv()
            if m[0] == 2 and m[1] == "token":
                ids[m[2][0]] = m[2][1]["request_id"]
            else:
                answers[m[1]] = m
        assert set(ids) == {1, 2}, "the request past max_streams started"
        assert answers[5] == [1, 5, None, "pong"]
        for msgid in (2, 3):
            assert f"msgid {msgid} is already in use" in answers[msgid][2]["message"]
        raw.send(0, 6, "cancel", [ids[1]])  # frees a slot
        seen = []
        while (1, 3) not in seen:
            m = await raw.recv()
            seen.append((m[0], m[1]) if m[0] == 1 else (m[0], m[2][0] if m[1] == "token" else m[1]))
            if m[:2] == [1, 6]:
                assert m[2:] == [None, True]
        assert (1, 6) in seen and seen.index((1, 1)) < min(seen.index(x) for x in seen if x[1] == 3), seen
        raw.close()
    await until(lambda: kv_used(rt) == 0)


async def test_client_disconnect_mid_stream_frees_every_kv_block(rt, server):
    raw = await RawClient.open(server.path)
    for msgid in range(3):
        raw.send(0, msgid, "generate", [[5 + msgid] * 40, LONG])
    seen = set()
    while len(seen) < 3:
        kind, method, (msgid, event) = await raw.recv()
        seen.add(msgid)
    assert kv_used(rt) > 0 and rt.status()["requests"]["active"] == 3
    raw.close()
    await until(lambda: kv_used(rt) == 0 and rt.status()["requests"]["active"] == 0)
    assert rt.status()["requests"]["finished"] == 0  # cancelled, not run to the end


async def test_client_leaving_a_stream_early_cancels_it(rt, server):
    async with Client(server.path) as c:
        async for ev in c.generate("Hello", LONG):
            break
        await until(lambda: kv_used(rt) == 0 and rt.status()["requests"]["active"] == 0)
        assert await c.ping() == "pong"


async def test_cancel_over_the_socket_ends_the_stream_with_abort(rt, server):
    async with Client(server.path) as c:
        events = []
        async for ev in c.generate("Hello", LONG):
            if not events:
                assert await c.cancel(ev.request_id) is True
            events.append(ev)
        assert events[-1].finished and events[-1].finish_reason == "abort"
        assert len(events[-1].token_ids) < LONG["max_tokens"]
        assert await c.cancel(ev.request_id) is False  # done already
    await until(lambda: kv_used(rt) == 0)


async def test_assign_and_release_round_trip(server):
    async with Client(server.path) as c:
        await c.assign("cpu:0", "mixed", mode="drain")
        dev = (await c.status())["devices"][0]
        assert (dev["name"], dev["role"], dev["pinned"]) == ("cpu:0", "mixed", True)
        out = [ev async for ev in c.generate("Hi", GREEDY)]  # still serving
        assert out[-1].finish_reason == "length"
        await c.release("cpu:0")
        assert (await c.status())["devices"][0]["pinned"] is False


async def test_refuses_to_start_on_a_live_socket(rt, server):
    with pytest.raises(SocketInUse, match="already listening"):
        await serve(rt, server.path)
    async with Client(server.path) as c:  # the live server kept its socket
        assert await c.ping() == "pong"


async def test_removes_a_stale_socket(rt, sock_dir):
    path = sock_dir / "s.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # bound, never listening: what a killed server leaves behind
    dead.close()
    assert stat.S_ISSOCK(path.lstat().st_mode)
    async with Server(rt, path) as srv, Client(srv.path) as c:
        assert await c.ping() == "pong"
    assert not path.exists()  # removed at close


async def test_socket_folder_0700_socket_0600_and_unsafe_folders_refused(rt, sock_dir):
    path = sock_dir / "run" / "splitnode" / "s.sock"
    async with Server(rt, path):
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path.parent, 0o770)
    with pytest.raises(PermissionError, match="writable by group or others"):
        await serve(rt, path)
    (sock_dir / "file").write_text("")
    with pytest.raises(FileExistsError, match="not a socket"):
        await serve(rt, sock_dir / "file")
    assert (sock_dir / "file").exists()


async def test_cli_status_assign_release(server, capsys):
    sock = str(server.path)
    assert await asyncio.to_thread(cli.main, ["assign", "cpu:1", "mixed", "--socket", sock]) == 0
    assert await asyncio.to_thread(cli.main, ["status", "--socket", sock]) == 0
    out = capsys.readouterr().out
    assert "cpu:1: mixed (pinned)" in out
    header, row0, row1 = out.splitlines()[1:4]
    assert header.split()[:3] == ["DEVICE", "ROLE", "PIN"]
    assert row0.split()[:3] == ["cpu:0", "prompt", "0/64"] and row1.split()[:4] == ["cpu:1", "mixed", "yes", "0/64"]
    assert await asyncio.to_thread(cli.main, ["release", "cpu:1", "--socket", sock]) == 0
    assert await asyncio.to_thread(cli.main, ["assign", "cpu:9", "mixed", "--socket", sock]) == 2
    assert "splitnode assign: error: unknown device 'cpu:9'" in capsys.readouterr().err


async def test_cli_assign_no_pin_unpins_a_device_pinned_before(rt, server, capsys):
    """Issue: --no-pin left an existing pin in place while printing as if unpinned."""
    sock = str(server.path)
    assert await asyncio.to_thread(cli.main, ["assign", "cpu:1", "mixed", "--socket", sock]) == 0
    assert rt.status()["devices"][1]["pinned"]
    assert await asyncio.to_thread(cli.main, ["assign", "cpu:1", "token", "--no-pin", "--socket", sock]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "cpu:1: token (not pinned: the autoscaling policy may move it)"
    assert [(d["role"], d["pinned"]) for d in rt.status()["devices"]] == [("prompt", False), ("token", False)]


async def test_cli_flags_before_the_command_are_the_commands(server, capsys):
    """Issue: `splitnode --socket X status` was refused; a flag with no command says where it goes."""
    assert await asyncio.to_thread(cli.main, ["--socket", str(server.path), "status", "--json"]) == 0
    assert [d["name"] for d in json.loads(capsys.readouterr().out)["devices"]] == ["cpu:0", "cpu:1"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--socket", str(server.path)])
    assert exit_.value.code == 2
    assert "error: --socket goes after the command: splitnode COMMAND --socket" in capsys.readouterr().err


def test_cli_without_a_server_is_one_line_and_exit_2(sock_dir, capsys):
    assert cli.main(["status", "--socket", str(sock_dir / "none.sock")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no splitnode server at" in err and "splitnode serve" in err


async def test_a_client_cancels_only_the_requests_it_started(rt, server):
    """Issue: any connection could cancel any request. Another connection's id answers false, as
    an unknown one does; the request id a client may cancel is the one its own stream's events carry."""
    async with Client(server.path) as a, Client(server.path) as b:
        events = a.generate("Hello", LONG)
        ev = await events.__anext__()
        assert await b.cancel(ev.request_id) is False
        assert not (await events.__anext__()).finished  # still streaming
        assert await a.cancel(ev.request_id) is True
        async for last in events:
            pass
        assert last.finish_reason == "abort"
    await until(lambda: kv_used(rt) == 0)


def device(rt, name: str) -> dict:
    return next(d for d in rt.status()["devices"] if d["name"] == name)


async def test_a_closed_clients_queued_requests_end_at_once_and_free_their_blocks(sock_dir):
    """Issue: a closed client's queued requests kept running, and kept their KV blocks, until one
    of them wrote an answer that failed. Here a request of the test's own (not over the socket)
    fills the token worker for a while, so the client's long prompts wait on the prompt worker,
    prefilled or queued, writing nothing; the client closes: all of its requests end now, while
    the other one still runs, and every worker's blocks and reservations go back to 0."""
    config = RuntimeConfig(devices="cpu:2", roles={"cpu:0": "prompt", "cpu:1": "token"}, num_kv_blocks=64,
                           autoscale=False)
    async with Runtime(config) as rt, Server(rt, sock_dir / "s.sock") as srv:
        hog = asyncio.create_task(drain(rt.generate([7] * 600, SamplingParams(max_tokens=424, ignore_eos=True))))
        await until(lambda: device(rt, "cpu:1")["kv_blocks_used"] >= 38)  # 600 tokens of 1024 on cpu:1
        c = Client(srv.path)
        await c.connect()
        firsts = []
        streams = [asyncio.create_task(drain(c.generate([9] * 500, {"max_tokens": 8}), firsts)) for _ in range(6)]

        def settled() -> bool:  # two prefilled (all of cpu:0's 64 blocks) and their first token read, four queued
            cpu0 = device(rt, "cpu:0")
            return (cpu0["kv_blocks_used"], cpu0["running"], cpu0["waiting"], len(firsts)) == (64, 2, 4, 2)

        await until(settled)
        await c.close()

        def only_the_hog_left() -> bool:
            cpu0, cpu1 = device(rt, "cpu:0"), device(rt, "cpu:1")
            return (rt.status()["requests"]["active"] == 1 and cpu0["kv_blocks_used"] == 0
                    and cpu0["kv_blocks_reserved"] == 0 and cpu1["kv_blocks_reserved"] == 0)

        await until(only_the_hog_left)
        assert not hog.done(), "the client's requests ended only once the token worker had room again"
        hog.cancel()
        await asyncio.gather(hog, *streams, return_exceptions=True)
        await until(lambda: kv_used(rt) == 0 and rt.status()["requests"]["active"] == 0)


async def drain(events, firsts: list | None = None) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):  # the client closed, the runtime stopped
        async for ev in events:
            if firsts is not None and ev.new_token_ids == ev.token_ids:
                firsts.append(ev.request_id)


async def test_a_symlink_at_the_lock_path_is_refused_not_followed(rt, sock_dir):
    """Issue: the lock file was opened through a symlink planted at `<socket>.lock` (O_CREAT made
    its target, O_RDWR opened it, flock locked it)."""
    path = sock_dir / "s.sock"
    lock, target = sock_dir / "s.sock.lock", sock_dir / "elsewhere"
    os.symlink(target, lock)
    for _ in range(2):  # dangling, then pointing at a file
        with pytest.raises(FileExistsError, match="is a symlink; not following it"):
            await serve(rt, path)
        with pytest.raises(FileExistsError, match="is a symlink"):
            await server_mod.check_socket_free(path)  # `serve` and `up` check before loading
        assert os.path.islink(lock) and not path.exists()
        if not target.exists():  # it was not created through the link
            target.write_text("precious")
    assert target.read_text() == "precious"
    os.unlink(lock)
    async with Server(rt, path), Client(path) as c:
        assert await c.ping() == "pong"
    assert not path.exists() and not lock.exists()
