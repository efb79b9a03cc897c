"""The wire format: msgpack-RPC (msgpack-rpc/msgpack-rpc spec.md) over a Unix stream socket.

    request       [0, msgid, method, params]
    response      [1, msgid, error, result]     error: None or {"type": str, "message": str}
    notification  [2, method, params]

Methods (the server dispatches these names and no others):

    generate(prompt, params)          prompt: str or list of token ids; params: a dict of
                                      SamplingParams fields (missing ones take their defaults).
                                      Each event but the last arrives as a notification
                                      [2, "token", [msgid, event]]; the response to msgid carries
                                      the last one (finished=True), so a client that ignores
                                      notifications still gets the whole output.
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
with integer keys (unpack with strict_map_key=False).

When the server cannot answer a request (a frame over MAX_FRAME_BYTES, bytes that are not
msgpack, a message that is not one of the three shapes) it sends the notification
[2, "error", [{"type": ..., "message": ...}]] and closes the connection.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import msgpack

from splitnode.engine.outputs import RequestOutput
from splitnode.engine.sampling import Logprob, SamplingParams

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
METHODS = ("generate", "cancel", "assign", "release", "status", "ping")

MAX_FRAME_BYTES = 16 * 1024 * 1024  # the most one peer can make the server buffer for one message
MAX_STREAMS = 256  # open requests (generate streams included) per connection
MAX_MSGID = 2**32 - 1  # the spec's msgid is a 32-bit unsigned int

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


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed after the error is sent."""


def remote_error(error) -> RemoteError:
    if not isinstance(error, dict):
        return RemoteError("Error", repr(error))
    type_, message = str(error.get("type", "Error")), str(error.get("message", ""))
    cls = {"ValueError": RemoteValueError, "TypeError": RemoteTypeError}.get(type_, RemoteError)
    return cls(type_, message)


def error_object(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc)}


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


def unpacker(max_frame_bytes: int = MAX_FRAME_BYTES) -> msgpack.Unpacker:
    """max_buffer_size bounds only the bytes not yet parsed (and each str/bin): a reader also bounds
    the bytes of the message in progress (fed minus `tell()` after the last whole message), as the
    server does."""
    return msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max_frame_bytes,
                            max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN)


# -- parameters ---------------------------------------------------------------------------------------

def sampling_params(params) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if not isinstance(params, dict):
        raise TypeError(f"generate: params must be a map of SamplingParams fields, got {type(params).__name__}")
    unknown = sorted(str(k) for k in params if k not in _SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"generate: unknown SamplingParams field(s) {unknown}; fields are {sorted(_SAMPLING_FIELDS)}")
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
    return [None if r is None else {t: [lp.logprob, lp.rank] for t, lp in r.items()} for r in rows]


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
