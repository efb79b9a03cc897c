"""OpenAI's request bodies for the HTTP API (api/http.py): each field checked and its type named in
a 400 before anything runs, the sampling fields turned into SamplingParams (whose own checks give
the message and the param), prompts and chat messages in the shapes OpenAI's clients send; and
OpenAI's error shape, {"error": {"message", "type", "param", "code"}}, for every refusal."""

from __future__ import annotations

import dataclasses
import json
import re

from aiohttp import web

from splitnode.api import protocol as p
from splitnode.engine.sampling import SamplingParams
from splitnode.runtime.runtime import Overloaded

MAX_CHOICES = 128  # n x prompts in one request: each is a request of its own in the runtime
_SAMPLING_FIELD = re.compile(r"SamplingParams\.(\w+)")


class APIError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return _json(self.body(), self.status)


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _json(obj, status: int = 200) -> web.Response:
    return web.Response(text=_dumps(obj), status=status, content_type="application/json")


@dataclasses.dataclass
class _Ask:
    """A request's fields, checked, before its prompts are tokenized."""

    kind: str  # "chat" or "text"
    n: int
    stream: bool
    include_usage: bool
    max_tokens: int | None  # None: what fits (chat), 16 (completions)
    logprobs: int | None  # top log-probabilities per token; None: none
    return_token_ids: bool  # extension (as vLLM's): token ids beside the text
    params: SamplingParams  # max_tokens and seed still to set per choice


_KINDS = {int: "an int", float: "a number", bool: "a bool", str: "a string", list: "a list", dict: "an object"}


def _opt(body: dict, name: str, kind: type | tuple, what: str | None = None):
    """body[name] if given (null is not given), refused with a 400 naming it if of another type."""
    v = body.get(name)
    if v is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(v, bool) if kinds == (bool,) else isinstance(v, kinds) and not isinstance(v, bool)
    if not ok:
        what = what or ("a number" if kinds == (int, float) else " or ".join(_KINDS[k] for k in kinds))
        raise APIError(400, f"'{name}' must be {what}, got {type(v).__name__} {p.brief(v)}", param=name)
    return v


def _sampling(make, *args, **kwargs) -> SamplingParams:
    """SamplingParams' own checks, its message as the 400's and the field it names as the param."""
    try:
        return make(*args, **kwargs)
    except ValueError as e:
        field = _SAMPLING_FIELD.search(str(e))
        raise APIError(400, str(e), param=field.group(1) if field else None) from None


def _ask(body: dict, kind: str, logprobs: int | None, max_tokens: int | None) -> _Ask:
    for name in ("presence_penalty", "frequency_penalty"):
        if _opt(body, name, (int, float)) not in (None, 0):
            raise APIError(400, f"'{name}' is not supported by this server (only 0); repetition_penalty "
                                "(an extension, as in vLLM) is", param=name)
    if _opt(body, "logit_bias", dict):
        raise APIError(400, "'logit_bias' is not supported by this server", param="logit_bias")
    n = _opt(body, "n", int)
    n = 1 if n is None else n
    if not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"'n' must be in [1, {MAX_CHOICES}], got {n}", param="n")
    stream = bool(_opt(body, "stream", bool))
    options = _opt(body, "stream_options", dict)
    if options is not None and not stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    include_usage = bool(_opt(options or {}, "include_usage", bool))
    stop = _opt(body, "stop", (str, list), "a string or a list of strings")
    fields = {"temperature": (int, float), "top_p": (int, float), "min_p": (int, float), "top_k": int,
              "seed": int, "repetition_penalty": (int, float), "ignore_eos": bool, "skip_special_tokens": bool,
              "stop_token_ids": list}
    kwargs = {k: v for k, kinds in fields.items() if (v := _opt(body, k, kinds)) is not None}
    if stop is not None:
        kwargs["stop"] = [stop] if isinstance(stop, str) else stop
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    params = _sampling(SamplingParams, max_tokens=1, logprobs=logprobs, **kwargs)
    return _Ask(kind, n, stream, include_usage, max_tokens, logprobs, bool(_opt(body, "return_token_ids", bool)),
                params)


async def _body(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _is_ids(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _prompts(prompt) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of those lists."""
    if isinstance(prompt, str):
        return [prompt]
    if _is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(x, str) or _is_ids(x) for x in prompt):
        if len(prompt) > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} prompts in one request, got {len(prompt)}", param="prompt")
        return prompt
    raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of those",
                   param="prompt")


def _messages(messages) -> list[dict]:
    """[{"role", "content"}], content a string or a list of text parts (joined)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(part["text"] for part in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def _api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, Overloaded):
        return APIError(429, str(e), "rate_limit_error", code="overloaded")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    return APIError(500, str(e) or type(e).__name__, "server_error")
