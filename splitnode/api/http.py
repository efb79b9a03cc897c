"""The OpenAI-compatible HTTP API (and Prometheus's /metrics) in front of a Runtime, on TCP and/or
a Unix socket, on the runtime's own event loop.

aiohttp, because its server runs on whatever loop is running: the routes are coroutines beside
the runtime's and the msgpack server's, with no second loop or thread to hand requests across
(uvicorn wants to own the loop it serves from). Its sockets are bound by hand (`bind`, before the
model loads, so a taken port fails in a second rather than after minutes of loading) and served
through `SockSite`s once the runtime runs: aiohttp's UnixSite, as CPython's create_unix_server,
would delete a live server's socket at its path without asking.

    srv = await serve_http(rt, "127.0.0.1", 8000)   # or uds=path; api_key="..." for Bearer auth
    ...
    await srv.shutdown(grace_s)   # new requests 503, open ones get grace_s, the rest a 503 error

Requests become `Runtime.generate` streams: one per choice (`n` > 1 and lists of prompts run as
several requests, each counted against the runtime's `max_active_requests`). A stream answers
its 200 only once every choice has its first token, so a refusal (429 overloaded, 400 a prompt
the runtime rejects) is still a plain error response; the client waits for that first token in
any case. A client that goes away cancels its requests (aiohttp's handler cancellation), which
frees their KV blocks. Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}};
the request bodies are read and checked in api/openai_schema.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hmac
import ipaddress
import logging
import math
import os
import socket
import stat
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web
from jinja2 import TemplateError

from splitnode.api import protocol as p
from splitnode.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from splitnode.api.metrics import Metrics, model_name
from splitnode.api.openai_schema import (
    MAX_CHOICES,
    APIError,
    _api_error,
    _Ask,
    _ask,
    _body,
    _dumps,
    _json,
    _messages,
    _opt,
    _prompts,
    _sampling,
)
from splitnode.api.socket_file import check_socket_free, prepare_socket_dir, release_socket_lock, take_socket_lock
from splitnode.engine.outputs import RequestOutput
from splitnode.engine.sampling import Logprob, SamplingParams
from splitnode.runtime import Runtime
from splitnode.runtime.runtime import MAX_CHARS_PER_TOKEN, Overloaded

log = logging.getLogger("splitnode.api")

MAX_BODY_BYTES = p.MAX_FRAME_BYTES  # a request body, as a socket message: any real prompt fits
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's max_tokens default for /v1/completions (chat: what fits)
_CLOSE_S = 1.0  # after the grace, how long connections get to take their last bytes
_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM sends this instead


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", "server_error", code="shutting_down")


# -- addresses ----------------------------------------------------------------------------------------

def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, or PORT alone for 127.0.0.1:PORT."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8000) or a port")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: where it points is not ours to know


def _tcp_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, not listening (connections are refused until the site starts), as asyncio's
    create_server would bind them: every address the host resolves to, IPv6 ones v6-only."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            s = socket.socket(family, type_, proto)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except PermissionError:
                raise PermissionError(f"cannot listen on {host}:{port}: permission denied") from None
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise p.SocketInUse(f"something already listens on {host}:{port}; stop it or choose another port") \
                        from None
                raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


# -- the server ---------------------------------------------------------------------------------------

class HTTPServer:
    """The OpenAI-compatible API with /health and /metrics; `metrics_only` serves /metrics and
    /health alone (`splitnode serve --metrics-port`). `api_key` guards the /v1 routes (Bearer)."""

    def __init__(self, tcp: list[tuple[str, int]] | tuple = (), uds: str | os.PathLike | None = None, *,
                 api_key: str | None = None, metrics_only: bool = False):
        self.tcp = list(tcp)
        self.uds = None if uds is None else Path(uds)
        self.api_key = api_key
        self.metrics_only = metrics_only
        self.rt: Runtime | None = None
        self.metrics: Metrics | None = None
        self.model_name = ""
        self._created = 0
        self.stopping = False  # shutdown began: new requests are answered 503
        self.urls: list[str] = []  # once bound: http://HOST:PORT (the real port, for port 0), unix:PATH
        self._own_metrics = False
        self._socks: list[socket.socket] = []
        self._uds_inode: tuple[int, int] | None = None
        self._lock_fd: int | None = None
        self._runner: web.AppRunner | None = None
        self._open: set[asyncio.Task] = set()  # the tasks answering requests, until they answer
        self._sse: dict[asyncio.Task, web.StreamResponse] = {}  # those whose stream has sent its 200
        self._finishing = False  # the grace is over: open requests are being cancelled and answered 503
        self._hurry = asyncio.Event()
        self._request_ended = asyncio.Event()
        self._stopped: asyncio.Future | None = None
        self._tokenize_pool: ThreadPoolExecutor | None = None
        self._token_text: dict[int, str] = {}  # token id -> its text, for logprobs

    @property
    def open_requests(self) -> int:
        return len(self._open)

    def _urls(self) -> list[str]:
        urls = []
        for s in self._socks:
            if s.family == socket.AF_UNIX:
                urls.append(f"unix:{self.uds}")
            else:
                host, port = s.getsockname()[:2]
                urls.append(f"http://[{host}]:{port}" if s.family == socket.AF_INET6 else f"http://{host}:{port}")
        return urls

    # -- start and stop -------------------------------------------------------------------------------

    async def bind(self) -> None:
        """Binds every address and the Unix socket (its folder, lock and stale check as for the
        msgpack socket); nothing is served before `start`."""
        if self._socks:
            return
        try:
            for host, port in self.tcp:
                self._socks += _tcp_sockets(host, port)
            if self.uds is not None:
                self._socks.append(await self._bind_uds(self.uds))
        except BaseException:
            self._close_sockets()
            raise
        self.urls = self._urls()

    async def _bind_uds(self, path: Path) -> socket.socket:
        prepare_socket_dir(path)
        self._lock_fd = take_socket_lock(path)
        await check_socket_free(path, remove_stale=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # 0600 from its first moment, as the msgpack socket
        try:
            sock.bind(str(path))
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        st = path.lstat()
        if not stat.S_ISSOCK(st.st_mode):  # never remove what is not ours
            sock.close()
            raise FileExistsError(f"{path} changed under the server as it bound it; not touching it")
        self._uds_inode = (st.st_dev, st.st_ino)
        return sock

    async def start(self, rt: Runtime, metrics: Metrics | None = None) -> None:
        """Serves on the bound sockets (binding them first if `bind` was not called). `metrics`:
        shared with another server of the same runtime; by default this one makes its own."""
        await self.bind()
        self.rt = rt
        self.metrics, self._own_metrics = (metrics, False) if metrics is not None else (Metrics(rt), True)
        self.model_name, self._created = model_name(rt), int(time.time())
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="splitnode-http")
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY_BYTES)
        routes = [web.get("/health", self._health), web.get("/metrics", self._metrics)]
        if not self.metrics_only:
            routes += [web.get("/v1/models", self._models), web.get("/v1/models/{model:.+}", self._model),
                       web.post("/v1/completions", self._completions),
                       web.post("/v1/chat/completions", self._chat)]
        app.add_routes(routes)
        # handler_cancellation: a client that disconnects cancels its handler, and so its requests
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=_CLOSE_S, access_log=None)
        await self._runner.setup()
        for s in self._socks:
            await web.SockSite(self._runner, s, backlog=p.MAX_CONNECTIONS).start()
        log.info("HTTP on %s", ", ".join(self.urls))

    def hurry(self) -> None:
        """Ends a shutdown's grace now (a second Ctrl-C); its open requests still get the 503."""
        self._hurry.set()

    async def close(self) -> None:
        await self.shutdown(0.0)

    async def shutdown(self, grace_s: float = 0.0) -> None:
        """Stops listening (and removes the Unix socket) first; open requests get `grace_s` to
        finish (`hurry()` cuts it short), new ones on kept-alive connections a 503; then each
        request still open is cancelled in the runtime and answered 503 (a stream: an error event
        and [DONE]). Called again meanwhile, it waits for the first call."""
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self._shutdown(grace_s))
        elif grace_s <= 0:
            self.hurry()
        await asyncio.shield(self._stopped)

    async def _shutdown(self, grace_s: float) -> None:
        self.stopping = True
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()
        self._remove_uds()
        await self._grace(grace_s)
        self._finishing = True
        open_tasks = list(self._open)
        for task in open_tasks:
            task.cancel()
        if open_tasks:
            await asyncio.wait(open_tasks, timeout=_CLOSE_S)
        if self._runner is not None:
            await self._runner.cleanup()
        self._close_sockets()
        if self._tokenize_pool is not None:
            self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        if self._own_metrics and self.metrics is not None:
            self.metrics.close()

    async def _grace(self, grace_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._open and not self._hurry.is_set() and (left := deadline - loop.time()) > 0:
            self._request_ended.clear()
            ended, hurry = (asyncio.ensure_future(e.wait()) for e in (self._request_ended, self._hurry))
            await asyncio.wait({ended, hurry}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
            hurry.cancel()

    def _remove_uds(self) -> None:
        """Only the socket this server bound: a path re-bound by someone else is left alone."""
        if self.uds is None or self._uds_inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            st = self.uds.lstat()
            if self._uds_inode == (st.st_dev, st.st_ino):
                self.uds.unlink()
        self._uds_inode = None

    def _close_sockets(self) -> None:
        self._remove_uds()
        for s in self._socks:
            s.close()
        if self._lock_fd is not None:
            release_socket_lock(self.uds, self._lock_fd)
            self._lock_fd = None

    # -- every request --------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """Errors in OpenAI's shape, the API key, 503 while stopping, and the shutdown's end: a
        request cancelled by `_shutdown` (not by its client leaving) is answered 503 here."""
        if self.stopping:
            return _shutting_down().response()
        if self.api_key is not None and request.path.startswith("/v1") and not self._authorized(request):
            return APIError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key").response()
        task = asyncio.current_task()
        self._open.add(task)
        try:
            return await handler(request)
        except APIError as e:
            return e.response()
        except web.HTTPException as e:  # aiohttp's own: no such route (404), method (405), body too large (413)
            return APIError(e.status, e.reason if e.status != 413 else f"request body over {MAX_BODY_BYTES} bytes",
                            code="not_found" if e.status == 404 else None).response()
        except asyncio.CancelledError:
            if not self._finishing:
                raise  # the client left: its requests are cancelled on the way out
            if hasattr(task, "uncancel"):
                task.uncancel()
            return await self._answer_shutdown(request)
        finally:
            self._open.discard(task)
            self._sse.pop(task, None)
            self._request_ended.set()

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _answer_shutdown(self, request: web.Request) -> web.StreamResponse:
        resp = self._sse.get(asyncio.current_task())
        if resp is None:
            return _shutting_down().response()
        with contextlib.suppress(ConnectionError):
            await _send(resp, _shutting_down().body())
            await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self._created, "owned_by": "splitnode",
                "root": self.model_name, "max_model_len": self.rt.max_model_len}

    async def _models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [self._model_card()]})

    async def _model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return _json(self._model_card())

    def _check_model(self, name) -> None:
        """None: the served model (OpenAI requires the field, vLLM does not)."""
        if name is None or name == self.model_name or (self.rt.config.model is not None and
                                                       name == str(self.rt.config.model)):
            return
        raise APIError(404, f"the model {p.brief(name)} does not exist; this server serves {self.model_name!r}",
                       param="model", code="model_not_found")

    # -- completions ----------------------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        self._check_model(body.get("model"))
        prompts = _prompts(body.get("prompt"))
        for name, default in (("echo", False), ("suffix", None), ("best_of", 1)):
            if body.get(name) not in (None, default):
                raise APIError(400, f"'{name}' is not supported by this server", param=name)
        logprobs = _opt(body, "logprobs", int, "an int (top log-probabilities per token)")
        ask = _ask(body, "text", logprobs, _opt(body, "max_tokens", int, "an int"))
        ids = await asyncio.gather(*(self._tokenize(pr) for pr in prompts))
        return await self._serve(request, ask, ids)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        self._check_model(body.get("model"))
        messages = _messages(body.get("messages"))
        for name, ok in (("tools", lambda v: not v), ("functions", lambda v: not v),
                         ("tool_choice", lambda v: v == "none"),
                         ("response_format", lambda v: isinstance(v, dict) and v.get("type") == "text")):
            if body.get(name) is not None and not ok(body[name]):
                raise APIError(400, f"'{name}' is not supported by this server", param=name)
        top = _opt(body, "top_logprobs", int, "an int")
        if _opt(body, "logprobs", bool, "a bool"):
            top = top or 0
        elif top is not None:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        max_tokens = _opt(body, "max_completion_tokens", int, "an int")
        ask = _ask(body, "chat", top, max_tokens if max_tokens is not None else _opt(body, "max_tokens", int, "an int"))
        add_generation_prompt = _opt(body, "add_generation_prompt", bool, "a bool")
        ids = await self._render_chat(messages, True if add_generation_prompt is None else add_generation_prompt)
        return await self._serve(request, ask, [ids])

    async def _tokenize(self, prompt: str | list[int]) -> list[int]:
        """Off the loop, as the runtime tokenizes: a long prompt would stall every stream. Text
        too long for any request is refused before it is tokenized."""
        if isinstance(prompt, list):
            return prompt
        self._check_chars(len(prompt), "prompt")
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, self.rt.tokenizer.encode, prompt)

    async def _render_chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        """The model's chat template writes the special tokens itself: encoded without adding any
        (as transformers does, and `LLM.chat`), which is why the runtime's text path is not used."""
        tok = self.rt.tokenizer
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")

        def render() -> list[int]:
            return tok.encode(tok.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, render)
        except ValueError as e:  # no chat template
            raise APIError(400, str(e), param="messages") from None
        except TemplateError as e:  # the template's own raise_exception, e.g. roles that must alternate
            raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None

    def _check_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.rt.max_model_len * MAX_CHARS_PER_TOKEN:
            raise APIError(413, f"prompt of {num_chars} characters is longer than any request this server can run "
                                f"(the maximum model length is {self.rt.max_model_len} tokens)", param=param,
                           code="context_length_exceeded")

    def _requests(self, ask: _Ask, prompt_ids: list[list[int]]) -> list[tuple[list[int], SamplingParams]]:
        """One (prompt, params) per choice, index = prompt * n + j; lengths checked against the
        runtime's maximum model length (prompt and output together)."""
        limit = self.rt.max_model_len
        if len(prompt_ids) * ask.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompt_ids)} prompts x n={ask.n} is more than {MAX_CHOICES} choices", param="n")
        out = []
        for ids in prompt_ids:
            if len(ids) >= limit:
                raise APIError(413, f"the prompt is {len(ids)} tokens; the maximum model length is {limit} tokens, "
                                    "prompt and output together", param="messages" if ask.kind == "chat" else "prompt",
                               code="context_length_exceeded")
            max_tokens = ask.max_tokens
            if max_tokens is None:
                max_tokens = limit - len(ids) if ask.kind == "chat" else min(DEFAULT_COMPLETION_TOKENS, limit - len(ids))
            elif len(ids) + max_tokens > limit:
                raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the maximum model "
                                    f"length {limit}", param="max_tokens", code="context_length_exceeded")
            for j in range(ask.n):
                seed = None if ask.params.seed is None else ask.params.seed + j  # n draws, each repeatable
                out.append((ids, _sampling(dataclasses.replace, ask.params, max_tokens=max_tokens, seed=seed)))
        return out

    async def _serve(self, request: web.Request, ask: _Ask, prompt_ids: list[list[int]]) -> web.StreamResponse:
        reqs = self._requests(ask, prompt_ids)
        reply = _Reply(self, ask, reqs)
        async with contextlib.aclosing(_merge([self.rt.generate(ids, params) for ids, params in reqs])) as events:
            if not ask.stream:
                async for i, ev in _refusals(events):
                    if ev.finished:
                        reply.final[i] = ev
                return _json(reply.whole())
            first = await _first_events(events, len(reqs))
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            self._sse[asyncio.current_task()] = resp  # for the shutdown's 503, once the 200 has gone out
            with contextlib.suppress(ConnectionError):  # the client left: its requests are cancelled on the way out
                try:
                    for i, ev in first:
                        await reply.send(resp, i, ev)
                    async for i, ev in events:
                        await reply.send(resp, i, ev)
                    if ask.include_usage:
                        await _send(resp, reply.usage_chunk())
                except (Overloaded, ValueError, RuntimeError) as e:  # a choice failed after the 200: its error event
                    await _send(resp, _api_error(e).body())
                await resp.write(b"data: [DONE]\n\n")
            return resp

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.rt.tokenizer.decode([token_id], skip_special_tokens=False)
        return text


# -- events --------------------------------------------------------------------------------------------

async def _merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice, event) from every stream as they come; the first error ends it (and, as leaving
    it early does, cancels the other streams)."""
    if len(gens) == 1:
        async with contextlib.aclosing(gens[0]) as events:
            async for ev in events:
                yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen) -> None:
        try:
            async with contextlib.aclosing(gen) as events:
                async for ev in events:
                    queue.put_nowait((i, ev))
        except Exception as e:
            queue.put_nowait((i, e))
        else:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                left -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _refusals(events) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The events, with the runtime's refusals as the API's errors."""
    try:
        async for item in events:
            yield item
    except (Overloaded, ValueError, RuntimeError) as e:
        raise _api_error(e) from None


async def _first_events(events, num_choices: int) -> list[tuple[int, RequestOutput]]:
    """Events until every choice has had one: each has then been accepted by the runtime."""
    got, seen = [], set()
    try:
        while len(seen) < num_choices:
            i, ev = await anext(events)
            got.append((i, ev))
            seen.add(i)
    except (Overloaded, ValueError, RuntimeError) as e:
        raise _api_error(e) from None
    return got


async def _send(resp: web.StreamResponse, obj) -> None:
    await resp.write(b"data: " + _dumps(obj).encode() + b"\n\n")


class _Reply:
    """The response objects of one request: whole (non-streaming) or chunk by chunk."""

    def __init__(self, server: HTTPServer, ask: _Ask, reqs: list[tuple[list[int], SamplingParams]]):
        self.server, self.ask, self.reqs = server, ask, reqs
        chat = ask.kind == "chat"
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())
        self.final: dict[int, RequestOutput] = {}
        self.num_tokens = [0] * len(reqs)
        self.offsets = [0] * len(reqs)  # completions' text_offset, per choice
        self.started: set[int] = set()

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.server.model_name}

    def usage(self) -> dict:
        # each prompt once, as OpenAI counts it with n > 1
        prompt = sum(len(ids) for ids, _ in self.reqs[::self.ask.n])
        completion = sum(self.num_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self) -> dict:
        choices = []
        for i in range(len(self.reqs)):
            ev = self.final[i]
            self.num_tokens[i] = len(ev.token_ids)
            choice = {"index": i, "logprobs": self._logprobs(i, ev.token_ids, ev.logprobs)}
            if self.ask.kind == "chat":
                choice["message"] = {"role": "assistant", "content": ev.text}
            else:
                choice["text"] = ev.text
            choice["finish_reason"] = ev.finish_reason
            if self.ask.return_token_ids:
                choice.update(prompt_token_ids=ev.prompt_token_ids, token_ids=ev.token_ids)
            choices.append(choice)
        return {**self._head(self.object), "choices": choices, "usage": self.usage()}

    async def send(self, resp: web.StreamResponse, i: int, ev: RequestOutput) -> None:
        chat = self.ask.kind == "chat"
        new = ev.new_token_ids
        self.num_tokens[i] = len(ev.token_ids)
        rows = None if ev.logprobs is None else ev.logprobs[len(ev.logprobs) - len(new):]
        choice: dict = {"index": i}
        if chat:
            if i not in self.started:
                self.started.add(i)
                await self._chunk(resp, {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None})
            if not (ev.delta or rows or ev.finished or self.ask.return_token_ids):
                return  # bytes of a character still incomplete: nothing to say yet
            choice["delta"] = {"content": ev.delta} if ev.delta or not ev.finished else {}
        else:
            if not (ev.delta or rows or ev.finished or self.ask.return_token_ids):
                return
            choice["text"] = ev.delta
        choice["logprobs"] = self._logprobs(i, new, rows)
        choice["finish_reason"] = ev.finish_reason
        if self.ask.return_token_ids:
            choice["token_ids"] = new
        await self._chunk(resp, choice)

    async def _chunk(self, resp: web.StreamResponse, choice: dict) -> None:
        chunk = {**self._head(self.object + (".chunk" if self.ask.kind == "chat" else "")), "choices": [choice]}
        if self.ask.include_usage:
            chunk["usage"] = None
        await _send(resp, chunk)

    def usage_chunk(self) -> dict:
        return {**self._head(self.object + (".chunk" if self.ask.kind == "chat" else "")), "choices": [],
                "usage": self.usage()}

    def _logprobs(self, i: int, ids: list[int], rows: list[dict[int, Logprob]] | None) -> dict | None:
        """Chat: {"content": [{token, logprob, bytes, top_logprobs}]}; completions: {tokens,
        token_logprobs, top_logprobs, text_offset}. Top entries are those of rank <= k."""
        if rows is None or self.ask.logprobs is None:
            return None
        k, text = self.ask.logprobs, self.server.token_text
        tops = [sorted(((t, lp) for t, lp in row.items() if lp.rank <= k), key=lambda e: e[1].rank) for row in rows]
        if self.ask.kind == "chat":
            def entry(t: int, lp: float) -> dict:
                s = text(t)
                return {"token": s, "logprob": _finite(lp), "bytes": list(s.encode())}

            return {"content": [{**entry(t, row[t].logprob), "top_logprobs": [entry(u, lp.logprob) for u, lp in top]}
                                for t, row, top in zip(ids, rows, tops)]}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, row, top in zip(ids, rows, tops):
            s = text(t)
            out["tokens"].append(s)
            out["token_logprobs"].append(_finite(row[t].logprob))
            out["top_logprobs"].append({text(t): _finite(row[t].logprob), **{text(u): _finite(lp.logprob)
                                                                            for u, lp in top}})
            out["text_offset"].append(self.offsets[i])
            self.offsets[i] += len(s)
        return out


def _finite(lp: float) -> float:
    return lp if math.isfinite(lp) else _MIN_LOGPROB


async def serve_http(rt: Runtime, host: str | None = None, port: int | None = None, *,
                     uds: str | os.PathLike | None = None, api_key: str | None = None, metrics: Metrics | None = None,
                     metrics_only: bool = False) -> HTTPServer:
    """Starts the HTTP API for `rt` on the running loop (port 0: any free port, see `urls`);
    `await server.shutdown(grace_s)` stops it."""
    tcp = [] if host is None and port is None else [(host or "127.0.0.1", port or 0)]
    server = HTTPServer(tcp, uds, api_key=api_key, metrics_only=metrics_only)
    await server.start(rt, metrics)
    return server
