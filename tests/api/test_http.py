"""The OpenAI-compatible HTTP API against a real Runtime (the demo model on two CPU workers), with the
official `openai` package as the client, over TCP loopback and over a Unix socket."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import tempfile
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio
from polling import until

from splitnode import cli
from splitnode.api import protocol as p
from splitnode.api.commands import _bind_http, http_servers, serving
from splitnode.api.http import HTTPServer, parse_address, serve_http
from splitnode.engine.sampling import SamplingParams
from splitnode.runtime import Runtime, RuntimeConfig

pytestmark = pytest.mark.asyncio(loop_scope="module")
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def folder():
    d = Path(tempfile.mkdtemp(dir="/tmp"))  # 0700, and short enough for AF_UNIX
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rt():
    async with Runtime(RuntimeConfig(devices="cpu:2", num_kv_blocks=64, autoscale=False)) as rt:
        yield rt


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(rt, folder):
    srv = await serve_http(rt, "127.0.0.1", 0, uds=folder / "http.sock")
    yield srv
    await srv.close()


@pytest_asyncio.fixture(loop_scope="module")
async def client(server):
    async with openai.AsyncOpenAI(base_url=server.urls[0] + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def kv_used(rt) -> int:
    return sum(d["kv_blocks_used"] + d["kv_blocks_reserved"] for d in rt.status()["devices"])


async def direct(rt, prompt, **params) -> object:
    """The last event of Runtime.generate for the same request."""
    async for ev in rt.generate(prompt, SamplingParams(**params)):
        pass
    return ev


def chat_ids(rt, messages) -> list[int]:
    tok = rt.tokenizer
    return tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)


async def test_chat_and_completions_give_the_tokens_runtime_generate_gives(rt, client):
    models = await client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    chat = await client.chat.completions.create(model="demo", messages=CHAT, max_tokens=8, **GREEDY)
    want = await direct(rt, chat_ids(rt, CHAT), max_tokens=8, temperature=0.0, ignore_eos=True)
    choice = chat.choices[0]
    assert choice.model_extra["token_ids"] == want.token_ids and len(want.token_ids) == 8
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == "length" and chat.model == "demo" and chat.object == "chat.completion"
    assert chat.usage.prompt_tokens == len(want.prompt_token_ids) and chat.usage.completion_tokens == 8

    text = await client.completions.create(model="demo", prompt="Hello", max_tokens=6, **GREEDY)
    want = await direct(rt, "Hello", max_tokens=6, temperature=0.0, ignore_eos=True)
    assert text.choices[0].text == want.text and text.choices[0].model_extra["token_ids"] == want.token_ids
    assert text.usage.total_tokens == len(want.prompt_token_ids) + 6
    ids = await client.completions.create(model="demo", prompt=want.prompt_token_ids, max_tokens=6, **GREEDY)
    assert ids.choices[0].model_extra["token_ids"] == want.token_ids


async def test_streams_end_with_done_and_usage_and_match_the_whole_reply(rt, client):
    whole = await client.chat.completions.create(model="demo", messages=CHAT, max_completion_tokens=7, **GREEDY)
    stream = await client.chat.completions.create(model="demo", messages=CHAT, max_completion_tokens=7, stream=True,
                                                  stream_options={"include_usage": True}, **GREEDY)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert sum(len(c.choices[0].model_extra["token_ids"]) for c in chunks[1:] if c.choices) == 7
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1

    text = [c async for c in await client.completions.create(model="demo", prompt="Hi", max_tokens=5, stream=True,
                                                             **GREEDY)]
    want = await direct(rt, "Hi", max_tokens=5, temperature=0.0, ignore_eos=True)
    assert "".join(c.choices[0].text for c in text) == want.text and text[-1].choices[0].finish_reason == "length"


async def test_logprobs_are_the_runtimes_in_openais_shapes(rt, client):
    chat = await client.chat.completions.create(model="demo", messages=CHAT, max_tokens=5, logprobs=True,
                                                top_logprobs=3, **GREEDY)
    want = await direct(rt, chat_ids(rt, CHAT), max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry, tok, row in zip(content, want.token_ids, want.logprobs):
        assert entry.logprob == pytest.approx(row[tok].logprob)
        assert entry.token == rt.tokenizer.decode([tok], skip_special_tokens=False)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy

    text = await client.completions.create(model="demo", prompt="Hello", max_tokens=4, logprobs=2, **GREEDY)
    want = await direct(rt, "Hello", max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2)
    lp = text.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([row[t].logprob for t, row in zip(want.token_ids, want.logprobs)])
    text_of = lambda t: rt.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    assert lp.tokens == [text_of(t) for t in want.token_ids] and lp.text_offset[0] == 0
    for tok, top, row in zip(want.token_ids, lp.top_logprobs, want.logprobs):  # the chosen token and the top 2
        assert text_of(tok) in top and len(top) <= 3  # fewer where two ids decode alike (lone UTF-8 bytes)
        assert all(any(text_of(u) == s and v == pytest.approx(e.logprob) for u, e in row.items()) for s, v in top.items())


async def test_stop_strings_cut_the_text_and_finish_with_stop(rt, client):
    full = await direct(rt, "Hello", max_tokens=40, temperature=0.0, ignore_eos=True)
    stop = next(c for c in full.text[3:] if c.isascii() and c.isprintable())  # a character the text really holds
    want = full.text[:full.text.index(stop)]
    got = await client.completions.create(model="demo", prompt="Hello", max_tokens=40, stop=[stop, "\x00\x01"],
                                          **GREEDY)
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    streamed = [c async for c in await client.completions.create(model="demo", prompt="Hello", max_tokens=40,
                                                                 stop=stop, stream=True, **GREEDY)]
    assert "".join(c.choices[0].text for c in streamed) == want and streamed[-1].choices[0].finish_reason == "stop"


async def test_seeded_sampling_repeats_and_n_draws_seed_plus_index(client):
    async def sample(seed: int, n: int = 1) -> list[str]:
        r = await client.completions.create(model="demo", prompt="Once", max_tokens=12, temperature=1.5, seed=seed, n=n,
                                            extra_body={"ignore_eos": True})
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first, again, other, both = await asyncio.gather(sample(7), sample(7), sample(8), sample(7, n=2))
    assert first == again and first != other
    assert both == first + other  # choice j draws with seed + j: each choice repeatable on its own
    streamed = ["", ""]
    async for chunk in await client.completions.create(model="demo", prompt="Once", max_tokens=12, temperature=1.5,
                                                       seed=7, n=2, stream=True, extra_body={"ignore_eos": True}):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == both


async def test_errors_are_openai_shaped_with_their_status(client, server):
    async with httpx.AsyncClient(base_url=server.urls[0]) as raw:
        r = await raw.post("/v1/completions", content=b'{"prompt": "x",')
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert "not valid JSON" in r.json()["error"]["message"]
        r = await raw.post("/v1/chat/completions", json={"messages": "Hello"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = await raw.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await raw.post("/v1/completions", content=b"x" * (p.MAX_FRAME_BYTES + 1))
        assert r.status_code == 413 and "error" in r.json()
    cases = [  # (request, status, param, words in the message)
        (dict(temperature="hot"), 400, "temperature", "must be a number"),
        (dict(top_p=0.0), 400, "top_p", "SamplingParams.top_p must be in (0, 1]"),  # SamplingParams' own check
        (dict(presence_penalty=0.5), 400, "presence_penalty", "not supported"),
        (dict(max_tokens=2000), 400, "max_tokens", "exceeds the maximum model length 1024"),
        (dict(prompt="a" * 2000), 413, "prompt", "maximum model length is 1024"),
        (dict(prompt=[999999]), 400, None, "token ids"),
        (dict(model="gpt-4"), 404, "model", "does not exist"),
    ]
    for request, status, param, words in cases:
        with pytest.raises(openai.APIStatusError) as e:
            await client.completions.create(**{"model": "demo", "prompt": "x", **request})
        assert e.value.status_code == status, request
        assert e.value.body["param"] == param and words in e.value.body["message"], (request, e.value.body)


async def test_a_client_that_disconnects_mid_stream_frees_its_kv_blocks(rt, client):
    before = rt.status()["requests"]["num_generated_tokens"]
    stream = await client.completions.create(model="demo", prompt="Hello", max_tokens=1000, stream=True,
                                             **GREEDY)
    async for chunk in stream:
        if chunk.choices[0].model_extra["token_ids"] and kv_used(rt) > 0:
            break
    await stream.close()
    await until(lambda: kv_used(rt) == 0 and rt.status()["requests"]["active"] == 0, timeout=5)
    assert rt.status()["requests"]["num_generated_tokens"] - before < 500  # cancelled, not run to its end

    before = rt.status()["requests"]["num_generated_tokens"]  # a whole reply the client stops waiting for
    with pytest.raises(openai.APITimeoutError):
        await client.with_options(timeout=0.5).completions.create(model="demo", prompt="Hello", max_tokens=1000,
                                                                   **GREEDY)
    await until(lambda: kv_used(rt) == 0 and rt.status()["requests"]["active"] == 0, timeout=5)
    assert rt.status()["requests"]["num_generated_tokens"] - before < 500


async def test_unix_socket_with_the_sync_client_gives_what_tcp_gives(client, server):
    def over_uds() -> str:
        http_client = httpx.Client(transport=httpx.HTTPTransport(uds=str(server.uds)))
        with openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http_client) as c:
            return c.chat.completions.create(model="demo", messages=CHAT, max_tokens=6, **GREEDY).choices[0].message

    tcp = await client.chat.completions.create(model="demo", messages=CHAT, max_tokens=6, **GREEDY)
    assert (await asyncio.to_thread(over_uds)).content == tcp.choices[0].message.content
    assert oct(server.uds.stat().st_mode & 0o777) == "0o600"


async def test_api_key_guards_the_v1_routes(rt, folder):
    srv = await serve_http(rt, uds=folder / "keyed.sock", api_key="sekrit")
    transport = httpx.AsyncHTTPTransport(uds=str(srv.uds))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as raw:
            assert (await raw.get("/v1/models")).status_code == 401
            r = await raw.get("/v1/models", headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert (await raw.get("/health")).status_code == 200  # probes and scrapes need no key
            assert (await raw.get("/metrics")).status_code == 200
            async with openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="sekrit", http_client=raw) as c:
                assert [m.id async for m in c.models.list()] == ["demo"]
    finally:
        await srv.close()
    assert not srv.uds.exists() and not srv.uds.with_name("keyed.sock.lock").exists()


def taken_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


async def test_serve_runs_http_after_the_load_and_stops_it_in_the_same_shutdown(folder, capsys):
    """Through `serving` (what `splitnode serve --http` and `up` run): a taken port fails before
    the model loads; then 429 past max_active_requests, 503 while stopping, and a stream still
    open at the end of the grace gets the error event."""
    config = RuntimeConfig(devices="cpu:1", num_kv_blocks=64, max_active_requests=1)
    blocker, port = taken_port()
    with blocker, pytest.raises(p.SocketInUse, match=f"127.0.0.1:{port}"):
        async with serving(config, folder / "a.sock", http=[HTTPServer([("127.0.0.1", port)])]):
            pass
    assert "loading" not in capsys.readouterr().err and not (folder / "a.sock").exists()

    http = HTTPServer([("127.0.0.1", 0)])
    async with serving(config, folder / "b.sock", shutdown_grace_s=30, http=[http]) as (rt, _, _):
        async with openai.AsyncOpenAI(base_url=http.urls[0] + "/v1", api_key="-", max_retries=0) as c, \
                httpx.AsyncClient(base_url=http.urls[0]) as idle:
            assert (await idle.get("/health")).status_code == 200  # a kept-alive connection, for later
            stream = await c.completions.create(model="demo", prompt="Hi", max_tokens=900, stream=True, **GREEDY)
            await anext(stream)
            with pytest.raises(openai.RateLimitError) as e:  # one request in flight is the limit
                await c.completions.create(model="demo", prompt="Hi", max_tokens=2)
            assert e.value.body["code"] == "overloaded"

            async def rest() -> openai.APIError | None:
                try:
                    async for _ in stream:
                        pass
                except openai.APIError as e:
                    return e
                return None

            reader = asyncio.create_task(rest())
            stopping = asyncio.create_task(http.shutdown(grace_s=30))
            await until(lambda: http.stopping)
            r = await idle.get("/health")
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            http.hurry()  # the grace ends: the open stream gets its error event
            error = await asyncio.wait_for(reader, 10)
            assert isinstance(error, openai.APIError) and error.body["code"] == "shutting_down", error
            await asyncio.wait_for(stopping, 10)
        await until(lambda: kv_used(rt) == 0 and rt.status()["requests"]["active"] == 0)
    assert f"OpenAI-compatible HTTP on {http.urls[0]}" in capsys.readouterr().err


async def test_flags_parse_addresses_and_a_host_beyond_loopback_is_warned_about(monkeypatch, capsys):
    assert parse_address("8000") == ("127.0.0.1", 8000) and parse_address("[::1]:80") == ("::1", 80)
    for bad in ("host:", ":8000", "host:99999", "x:y"):
        with pytest.raises(ValueError):
            parse_address(bad)
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["serve", "--http", "nowhere:"])
    assert e.value.code == 2 and "is not HOST:PORT" in capsys.readouterr().err
    monkeypatch.setenv("SPLITNODE_API_KEY", "from-env")
    args = cli.build_parser().parse_args(["serve", "--http", "0.0.0.0:0", "--metrics-port", "0"])
    api, metrics_only = http_servers(args)
    assert (api.tcp, api.api_key, metrics_only.tcp, metrics_only.metrics_only) == (
        [("0.0.0.0", 0)], "from-env", [("127.0.0.1", 0)], True)
    await _bind_http([api, metrics_only])  # bound, never listening: nothing is reachable here
    try:
        err = capsys.readouterr().err
        assert "warning: HTTP on 0.0.0.0:0 is reachable beyond this machine" in err and "127.0.0.1" not in err
    finally:
        await asyncio.gather(api.close(), metrics_only.close())


async def test_the_readmes_openai_example_runs(server, capsys):
    """The README's snippet as it is, pointed at this server's port instead of 8000."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (code,) = [b for b in re.findall(r"^```python\n(.*?)^```", readme, re.S | re.M) if "from openai import OpenAI" in b]
    assert "http://127.0.0.1:8000/v1" in code
    code = code.replace("http://127.0.0.1:8000", server.urls[0])
    await asyncio.to_thread(exec, compile(code, "README.md", "exec"), {"__name__": "__main__"})
    first, second = capsys.readouterr().out.splitlines()
    assert first.endswith(" length 20") and second.startswith("'")  # 12 + 8 tokens; the stream's chunks
