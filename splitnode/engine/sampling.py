"""Sampling parameters (validated at the door) and the batched sampler."""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

# Temperatures below this are greedy. In float32 exp(-gap / t) is exactly 0 for any logit gap above
# ~1e-3 once t < 1e-5, so the draw already is the argmax (up to near-ties); taking it as greedy keeps
# tiny and subnormal values (1e-40, which overflows logits / t to inf and makes softmax NaN) away
# from the division, and accepts what clients send to mean "almost deterministic" instead of
# refusing it. vLLM's _SAMPLING_EPS is the same threshold.
GREEDY_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 1e4  # far past uniform already; keeps logits / t well inside float32
# logits * or / the penalty, then / temperature, stays finite in float32 (|logit| * 1e4 / 1e-5 << 3e38)
REPETITION_PENALTY_RANGE = (1e-4, 1e4)
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_STOP_STRINGS = 64  # every decoded delta is searched for each of them
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
INT32_MAX = 2**31 - 1  # token counts and ids reach the runner as int32 (context lengths)
SEED_RANGE = (-2**63, 2**63 - 1)  # torch.Generator.manual_seed takes int64 (vLLM's server bounds it so)


@dataclass
class SamplingParams:
    """Per-request sampling, with vLLM's names and defaults. A value of the wrong type or out of
    range raises a one-line ValueError naming the field, before the request reaches a device:
    the socket API builds these from a client's map, so this is what keeps a worker's sampler safe."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE): greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k log-probabilities per generated token
    prompt_logprobs: int | None = None  # top-k log-probabilities per prompt token
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self._check_types()
        self._check_ranges()
        self._check_stops()

    def _check_types(self) -> None:
        for name in ("ignore_eos", "skip_special_tokens"):
            _check_type(isinstance(getattr(self, name), bool), name, "a bool", getattr(self, name))
        for name in ("max_tokens", "top_k"):
            _check_type(_is_int(getattr(self, name)), name, "an int", getattr(self, name))
        for name in ("seed", "logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check_type(v is None or _is_int(v), name, "an int or None", v)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            setattr(self, name, _as_float(name, getattr(self, name)))
        self.stop = _as_list("stop", [self.stop] if isinstance(self.stop, str) else self.stop)
        self.stop_token_ids = _as_list("stop_token_ids", self.stop_token_ids)

    def _check_ranges(self) -> None:
        _check(1 <= self.max_tokens <= INT32_MAX, "max_tokens", f"an int in [1, {INT32_MAX}]", self.max_tokens)
        _check(0.0 <= self.temperature <= MAX_TEMPERATURE, "temperature", f"in [0, {MAX_TEMPERATURE:g}]",
               self.temperature)
        _check(-1 <= self.top_k <= INT32_MAX, "top_k", "-1, 0 (off) or a positive int", self.top_k)
        _check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
        _check(0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]", self.min_p)
        lo, hi = REPETITION_PENALTY_RANGE
        _check(lo <= self.repetition_penalty <= hi, "repetition_penalty", f"in [{lo:g}, {hi:g}]",
               self.repetition_penalty)
        lo, hi = SEED_RANGE
        _check(self.seed is None or lo <= self.seed <= hi, "seed", "None or a 64-bit signed int", self.seed)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or 0 <= v <= MAX_LOGPROBS, name, f"None or an int in [0, {MAX_LOGPROBS}]", v)

    def _check_stops(self) -> None:
        stop, ids = self.stop, self.stop_token_ids
        _check_type(all(isinstance(s, str) for s in stop), "stop", "a string or a list of strings", stop)
        _check(len(stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} strings", stop)
        _check(all(0 < len(s) <= MAX_STOP_STRING_CHARS for s in stop), "stop",
               f"strings of 1 to {MAX_STOP_STRING_CHARS} characters", stop)
        _check_type(all(_is_int(t) for t in ids), "stop_token_ids", "a list of ints", ids)
        _check(len(ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids", ids)
        _check(all(0 <= t <= INT32_MAX for t in ids), "stop_token_ids", "a list of token ids", ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def check_vocab(self, vocab_size: int) -> None:
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        _check(not bad, "stop_token_ids", f"ids below the vocabulary size {vocab_size}", bad)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_float(name: str, v) -> float:
    """A finite real number as a float: NaN and inf would reach the sampler's arithmetic."""
    _check_type(isinstance(v, (int, float)) and not isinstance(v, bool), name, "a number", v)
    try:
        f = float(v)
    except OverflowError:  # an int too large for a float
        f = math.inf
    _check(math.isfinite(f), name, "a finite number", v)
    return f


def _as_list(name: str, v) -> list:
    _check_type(v is None or isinstance(v, (list, tuple, set, frozenset)), name, "a list", v)
    return list(v or [])


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 60, 6, 6


def _short(value) -> str:
    """The value's repr, cut and depth-bounded: a client's value may be megabytes long, or nested
    a thousand deep."""
    r = _REPR.repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


def _check(ok: bool, name: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {expected}, got {_short(value)}")


def _check_type(ok: bool, name: str, expected: str, value) -> None:
    # ValueError too, not TypeError: every refused SamplingParams is a ValueError, as the socket
    # API's clients (RemoteValueError) and callers that catch ValueError already rely on.
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {expected}, got {type(value).__name__} {_short(value)}")


class Logprob(NamedTuple):
    """As vLLM returns them: the log-probability, its rank in the distribution (1 = most likely)."""

    logprob: float
    rank: int


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[dict[int, Logprob]]:
    """Per row: the chosen token's entry plus the top-k entries. logprobs [n, V], chosen [n]."""
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
    ranks = (logprobs > chosen_lp[:, None]).sum(1) + 1
    rows: list[dict[int, Logprob]] = []
    if k:
        top_v, top_i = logprobs.topk(k, dim=-1)
        top_v, top_i = top_v.tolist(), top_i.tolist()
    for r, (tok, lp, rank) in enumerate(zip(chosen.tolist(), chosen_lp.tolist(), ranks.tolist())):
        d = {tok: Logprob(lp, rank)}
        if k:
            for j, (t, v) in enumerate(zip(top_i[r], top_v[r])):
                d.setdefault(t, Logprob(v, j + 1))
        rows.append(d)
    return rows


def sample(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits [n, V] float32 (raw model output) -> sampled ids [n]. Greedy rows take the argmax of
    the penalised logits; the rest draw from their own generator so a seeded request gives the same
    tokens whatever batch it shares."""
    logits = logits.clone() if any(p.repetition_penalty != 1.0 for p in params) else logits
    for i, p in enumerate(params):
        if p.repetition_penalty != 1.0 and histories[i]:
            idx = torch.tensor(sorted(set(histories[i])), device=logits.device)
            row = logits[i, idx]
            logits[i, idx] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
    out = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.is_greedy:
            continue
        # Drawn on the CPU with the request's own CPU generator: the state then moves with the
        # request between devices, and the draw does not depend on the device.
        row = logits[i].cpu() / p.temperature
        if p.top_k > 0:
            kth = row.topk(min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            cum = sp.cumsum(0)
            drop = (cum - sp) > p.top_p  # keep the smallest prefix whose mass reaches top_p
            probs = probs.index_fill(0, si[drop], 0.0)
        out[i] = torch.multinomial(probs, 1, generator=generators[i]).item()
    return out
