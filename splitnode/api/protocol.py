"""The wire format: msgpack-RPC (msgpack-rpc/msgpack-rpc spec.md) over a Unix stream socket.

    request       [0, msgid, method, params]
    response      [1, msgid, error, result]     error: None or {"type": str, "message": str}
    notification  [2, method, params]

Methods (the server dispatches these names and no others):

    generate(prompt, params, stream=True)
                                      prompt: str or list of token ids; params: a dict of
                                      SamplingParams fields (missing ones take their defaults).
                                      Each event but the last arrives as a notification
                                      [2, "token", [msgid, event]]; the response to msgid carries
                                      the last one (finished=True), so a client that ignores
                                      notifications still gets the whole output. stream=False
                                      sends no notifications, for a client that cannot take them.
    cancel(request_id) -> bool        the stream ends with finish_reason "abort"
    assign(device, role, mode="migrate", pin=True) -> None
    release(device) -> None
    status() -> dict                  Runtime.status(), plain data
    ping() -> "pong"

Events are RequestOutput as a map. A notification carries what is new since the previous event
(`new_token_ids`, `delta`, `logprobs` of the new tokens only) and, on a stream's first event only,
`prompt`, `prompt_token_ids` and `prompt_logprobs`; the final event (the response) carries every
field in full. A client rebuilds cumulative RequestOutputs by appending (see `OutputBuilder`). This
keeps a long stream linear in its length on the wire. Logprobs are maps {token_id: [logprob, rank]}
whose keys are the token ids as strings ("42"): msgpack's Unpacker refuses integer map keys by
default (strict_map_key=True), and a plain client must not have to know to turn that off.

When the server cannot answer a request (a frame over MAX_FRAME_BYTES, bytes that are not
msgpack, a message that is not one of the three shapes) it sends the notification
[2, "error", [{"type": ..., "message": ...}]] and closes the connection; so it does to a
connection over MAX_CONNECTIONS, and to every connection as it shuts down.

Flow control: a connection with MAX_STREAMS open requests is read no further until one ends (a
pipelining client is slowed, not refused). `cancel` only reaches the connection's own requests.

The server may send the notification [2, "noop", []] (it probes whether a peer that sent EOF is
still there to read); clients ignore notifications they do not know.

Shutting down, the server stops accepting, lets open requests finish for a grace period, then
answers each request still open with the error {"type": "ServerShuttingDown", ...}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import reprlib
from pathlib import Path

import msgpack

from splitnode.engine.outputs import RequestOutput
from splitnode.engine.sampling import Logprob, SamplingParams

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
METHODS = ("generate", "cancel", "assign", "release", "status", "ping")

# The most one peer can make the server buffer for one message. A whole message is decoded at
# once, and msgpack's one-byte ints become Python objects of ~36 bytes: a message may cost ~40x
# its size for a moment (one message at a time, on the loop). 4 MiB holds any real prompt (a
# million characters, or more token ids than any context) and keeps that moment near 160 MiB.
MAX_FRAME_BYTES = 4 * 1024 * 1024
MAX_STREAMS = 256  # open requests per connection; past it the connection is read no further
MAX_CONNECTIONS = 512  # per server (each is two file descriptors: keep well under `ulimit -n`)
MAX_BUFFERED_BYTES = 256 * 1024 * 1024  # unfinished messages' bytes, all connections together
MAX_MSGID = 2**32 - 1  # the spec's msgid is a 32-bit unsigned int
MAX_ERROR_CHARS = 1000  # an error message longer than this is cut
NOOP = "noop"  # the server's probe notification

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


class RemoteError(Exception):
    """An error response from the server: `type` is the server-side exception's class name."""

    def __init__(self, type_: str, message: str):
        super().__init__(f"{type_}: {message}")
        self.type = type_
        self.message = message


class RemoteValueError(RemoteError, ValueError):
    """So `except ValueError` catches a bad role or parameter from the socket as it does in-process."""


class RemoteTypeError(RemoteError, TypeError):
    pass


class ServerNotRunning(ConnectionError):
    pass


class SocketInUse(RuntimeError):
    pass


class ServerBusy(ConnectionError):
    """The server cannot take a connection now: it has max_connections, or its listen backlog
    stayed full for the whole of the client's connect timeout."""


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed after the error is sent."""


class ServerShuttingDown(Exception):
    """What a request still open when the server stops is answered with."""


class _Brief(reprlib.Repr):
    def repr_bytes(self, x, level) -> str:  # reprlib would repr all of it first, then cut
        return repr(x[:self.maxstring]) + ("..." if len(x) > self.maxstring else "")

    repr_bytearray = repr_bytes


_BRIEF = _Brief()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 3, 60, 60, 40
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 6


def brief(value) -> str:
    """A client's value as an error message shows it: its repr, cut in depth and length. A peer's
    value may be nested a thousand deep (repr raises RecursionError) or megabytes long."""
    return _BRIEF.repr(value)


def _cut(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def remote_error(error) -> RemoteError:
    if not isinstance(error, dict):
        return RemoteError("Error", brief(error))
    type_, message = _cut(str(error.get("type", "Error")), 100), _cut(str(error.get("message", "")))
    cls = {"ValueError": RemoteValueError, "TypeError": RemoteTypeError}.get(type_, RemoteError)
    return cls(type_, message)


def error_object(exc: BaseException) -> dict:
    """Cut to MAX_ERROR_CHARS: the runtime's and the engine's messages may quote a client's value."""
    return {"type": type(exc).__name__, "message": _cut(str(exc))}


def default_socket_path() -> Path:
    """$XDG_RUNTIME_DIR/splitnode/splitnode.sock (a per-user tmpfs), else ~/.cache/splitnode/run/."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return Path(runtime_dir) / "splitnode" / "splitnode.sock"
    return Path.home() / ".cache" / "splitnode" / "run" / "splitnode.sock"


def pack(message) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


MAX_ARRAY_LEN = 1 << 20  # items in one array (a prompt's token ids); msgpack allocates the count up front
MAX_MAP_LEN = 1 << 16
# Arrays and maps in one message: a request has a handful. An empty one is one byte on the wire and
# ~64 bytes of heap: without this, a 4 MiB message would build a quarter of a GiB of them.
MAX_CONTAINERS = 4096


def unpacker(max_frame_bytes: int = MAX_FRAME_BYTES) -> msgpack.Unpacker:
    """The client's reader (it trusts its server). max_buffer_size bounds only the bytes not yet
    parsed (and each str/bin), not the objects the message in progress has been built into."""
    return msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max_frame_bytes,
                            max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN)


class FrameTooLarge(ProtocolError):
    pass


class Framer:
    """Cuts a peer's byte stream into whole messages without building them (msgpack's `skip`), so
    an unfinished message costs its bytes (about twice: this copy and the skipper's), never the
    objects msgpack would build from them: a streaming Unpacker builds as bytes arrive, and 15 MB
    of nested empty arrays held ~1 GiB. Only a whole message is decoded (`decode`)."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES):
        self.limit = max_frame_bytes
        self._skipper = _skipper()
        self._buf = bytearray()  # the unfinished message's bytes (and whatever came after it)
        self._base = 0  # the skipper's offset of _buf[0]

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """The messages `data` completes, as bytes; raises FrameTooLarge past the limit."""
        self._skipper.feed(data)
        self._buf += data
        frames, start = [], 0
        while True:
            try:
                self._skipper.skip()
            except msgpack.OutOfData:
                break
            end = self._skipper.tell() - self._base
            if end - start > self.limit:
                raise FrameTooLarge(f"message larger than the limit of {self.limit} bytes")
            with memoryview(self._buf) as view:  # one copy, and no export left to block the resize
                frames.append(bytes(view[start:end]))
            start = end
        if start:
            del self._buf[:start]
            self._base += start
            if max(map(len, frames)) > 1 << 20:
                self._restart()  # the skipper keeps the buffer a big message grew it to
        if len(self._buf) > self.limit:
            raise FrameTooLarge(f"message larger than the limit of {self.limit} bytes")
        return frames

    def _restart(self) -> None:
        self._skipper = _skipper()
        self._skipper.feed(bytes(self._buf))
        self._base = 0
        with contextlib.suppress(msgpack.OutOfData):  # what is left is the start of one message
            self._skipper.skip()


def _skipper() -> msgpack.Unpacker:
    # max_buffer_size 0: no cap of its own (Framer.feed bounds what it holds); read_size: its first
    # buffer, 1 MiB by default, per connection
    return msgpack.Unpacker(max_buffer_size=0, read_size=64 * 1024)


def _no_ext(code: int, data: bytes):
    raise ValueError(f"msgpack extension type {code} is not part of this protocol")


def decode(frame: bytes):
    """One whole message, with msgpack's limits and a budget of containers (MAX_CONTAINERS)."""
    count = 0

    def container(obj):
        nonlocal count
        count += 1
        if count > MAX_CONTAINERS:
            raise ProtocolError(f"more than {MAX_CONTAINERS} arrays and maps in one message")
        return obj

    return msgpack.unpackb(frame, raw=False, strict_map_key=False, max_array_len=MAX_ARRAY_LEN,
                           max_map_len=MAX_MAP_LEN, ext_hook=_no_ext, list_hook=container, object_hook=container)


# -- parameters ---------------------------------------------------------------------------------------

def sampling_params(params) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if not isinstance(params, dict):
        raise TypeError(f"generate: params must be a map of SamplingParams fields, got {type(params).__name__}")
    unknown = [k for k in params if k not in _SAMPLING_FIELDS]
    if unknown:
        shown = ", ".join(sorted(brief(k) for k in unknown[:8]))
        if len(unknown) > 8:
            shown += f" and {len(unknown) - 8} more"
        raise ValueError(f"generate: unknown SamplingParams field(s) {shown}; fields are {sorted(_SAMPLING_FIELDS)}")
    return SamplingParams(**params)


def sampling_dict(params: SamplingParams | dict | None) -> dict:
    if params is None:
        return {}
    if isinstance(params, SamplingParams):
        return dataclasses.asdict(params)
    return dict(params)


def prompt_arg(prompt) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise TypeError("generate: prompt must be a string or a list of token ids")


# -- events ---------------------------------------------------------------------------------------------

def _logprobs_out(rows):
    if rows is None:
        return None
    return [None if r is None else {str(t): [lp.logprob, lp.rank] for t, lp in r.items()} for r in rows]


def _logprobs_in(rows):
    if rows is None:
        return None
    return [None if r is None else {int(t): Logprob(float(v[0]), int(v[1])) for t, v in r.items()} for r in rows]


def full_event(ev: RequestOutput) -> dict:
    d = {f.name: getattr(ev, f.name) for f in dataclasses.fields(RequestOutput)}
    d["logprobs"] = _logprobs_out(ev.logprobs)
    d["prompt_logprobs"] = _logprobs_out(ev.prompt_logprobs)
    return d


def delta_event(ev: RequestOutput, first: bool) -> dict:
    num_old = len(ev.token_ids) - len(ev.new_token_ids)
    d = {"request_id": ev.request_id, "new_token_ids": ev.new_token_ids, "delta": ev.delta,
         "logprobs": None if ev.logprobs is None else _logprobs_out(ev.logprobs[num_old:]),
         "finished": ev.finished, "finish_reason": ev.finish_reason, "metrics": ev.metrics}
    if first:
        d.update(prompt=ev.prompt, prompt_token_ids=ev.prompt_token_ids,
                 prompt_logprobs=_logprobs_out(ev.prompt_logprobs))
    return d


class OutputBuilder:
    """Rebuilds one stream's cumulative RequestOutputs from its delta events and final event."""

    def __init__(self):
        self.prompt = None
        self.prompt_token_ids: list[int] = []
        self.prompt_logprobs = None
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list | None = None

    def add_delta(self, d: dict) -> RequestOutput:
        if "prompt_token_ids" in d:
            self.prompt, self.prompt_token_ids = d["prompt"], d["prompt_token_ids"]
            self.prompt_logprobs = _logprobs_in(d["prompt_logprobs"])
        self.token_ids += d["new_token_ids"]
        self.text += d["delta"]
        if d["logprobs"] is not None:
            self.logprobs = (self.logprobs or []) + _logprobs_in(d["logprobs"])
        return RequestOutput(
            request_id=d["request_id"], prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            token_ids=list(self.token_ids), text=self.text, new_token_ids=d["new_token_ids"], delta=d["delta"],
            logprobs=None if self.logprobs is None else list(self.logprobs), prompt_logprobs=self.prompt_logprobs,
            finished=d["finished"], finish_reason=d["finish_reason"], metrics=d["metrics"])

    @staticmethod
    def from_full(d: dict) -> RequestOutput:
        d = dict(d)
        d["logprobs"] = _logprobs_in(d["logprobs"])
        d["prompt_logprobs"] = _logprobs_in(d["prompt_logprobs"])
        return RequestOutput(**d)
