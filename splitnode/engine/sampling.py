"""Sampling parameters (validated at the door) and the batched sampler."""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from splitnode.kernels import cpu as cpu_kernels

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


# The batched sampler. A drawn row takes its token by inverse CDF with one uniform of its own, a
# hash of the request's seed and the token's position (`uniforms`): there is no generator state,
# so a draw depends on nothing but its row: not the batch, not the worker, not a preemption.

CPU_WINDOWS = (64, 1024, 8192)  # sorted prefixes the CPU tries in turn before it sorts a whole row
GROUP = 32  # ids per group of the CPU's two-level top-w (a power of two dividing the vocabulary)
VOCAB_BLOCK = 256  # ids per block of the unfiltered rows' two-level search
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 that spreads every input bit over the output."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seeds: list[int], positions: list[int]) -> np.ndarray:
    """One float64 uniform in [0, 1) per (request seed, token position), in exact integer
    arithmetic on the host: the same on every machine and device, whatever else is in the batch."""
    s = _mix64(np.asarray(seeds, dtype=np.int64).view(np.uint64))
    z = _mix64(s + (np.asarray(positions, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int],
           histories: list[list[int]]) -> torch.Tensor:
    """logits [n, V] float32 (raw model output) -> sampled ids [n] int64 on the logits' device; -1
    for a row left with no distribution (NaN or inf got into it). Greedy rows take the argmax of the
    penalised logits; the others draw from their filtered distribution with `uniforms(seeds,
    positions)`, so a seeded request gives the same tokens whatever batch it shares and whichever
    worker runs it. Nothing here waits for the device, except on the CPU (where waiting costs
    nothing) the check that a sorted prefix held a row's whole nucleus."""
    n = logits.shape[0]
    logits = _penalise(logits, params, histories)
    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    if len(greedy) == n:
        return argmax(logits)
    u = uniforms(seeds, positions)
    filtered = [i for i, p in enumerate(params) if not p.is_greedy and (p.top_k > 0 or p.top_p < 1.0)]
    plain = [i for i, p in enumerate(params) if not p.is_greedy and not (p.top_k > 0 or p.top_p < 1.0)]
    out = None
    for rows, draw in ((greedy, None), (plain, _draw_plain), (filtered, _draw_filtered)):
        if not rows:
            continue
        x = _take(logits, rows)
        tokens = argmax(x) if draw is None else draw(x, [params[i] for i in rows], u[rows])
        if len(rows) == n:
            return tokens
        if out is None:
            out = torch.empty(n, dtype=torch.int64, device=logits.device)
        out.index_copy_(0, _on(logits.device, rows, np.int64), tokens)
    return out


def _c_kernels(x: torch.Tensor) -> bool:
    """Whether kernels/cpu.py samples these logits: float32 on a CPU where the C kernels are built."""
    return x.dtype == torch.float32 and cpu_kernels.supports(x)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) of logits [n, V]: in one C pass for float32 CPU rows (kernels/cpu.py)."""
    if x.stride(-1) == 1 and _c_kernels(x):
        return cpu_kernels.argmax(x)
    return x.argmax(dim=-1)


def _on(device: torch.device, values, dtype) -> torch.Tensor:
    """Host values as a tensor on `device`; from pinned memory on CUDA, so the copy is queued on the
    stream and the host goes on (a pageable one waits for the stream)."""
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=dtype))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _take(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t's rows (a strictly increasing list): t itself when it is all of them."""
    return t if len(rows) == t.shape[0] else t.index_select(0, _on(t.device, rows, np.int64))


def _penalise(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]]) -> torch.Tensor:
    """Repetition penalty on every id a row has seen (prompt and output), all rows in one gather and
    one scatter: positive logits divided by the penalty, negative ones multiplied."""
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 and histories[i]]
    if not rows:
        return logits
    seen = [np.unique(np.asarray(histories[i], dtype=np.int64)) for i in rows]
    counts = [len(s) for s in seen]
    dev = logits.device
    index = (_on(dev, np.repeat(rows, counts), np.int64), _on(dev, np.concatenate(seen), np.int64))
    penalty = _on(dev, np.repeat([params[i].repetition_penalty for i in rows], counts), np.float32)
    logits = logits.clone()  # the caller's logits also give the logprobs, which are unpenalised
    values = logits[index]
    logits.index_put_(index, torch.where(values > 0, values / penalty, values * penalty))
    return logits


def _probs(x: torch.Tensor, ps: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' logits over their temperatures, and their softmax."""
    temperatures = [p.temperature for p in ps]
    if any(t != 1.0 for t in temperatures):
        x = x / _on(x.device, temperatures, np.float32)[:, None]
    return x, torch.softmax(x, dim=-1)


def _pick(cum: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first position whose cumulative mass (cum [m, w] float64) passes target [m]:
    always one of nonzero mass, target being held inside [0, total) against rounding."""
    total = cum[:, -1]
    target = torch.minimum(target.clamp(min=0.0), torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cum, target[:, None], right=True).squeeze(1).clamp_(max=cum.shape[1] - 1)


def _checked(tokens: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(mass) & (mass > 0), tokens, -1)


def _plain(x: torch.Tensor, ps: list[SamplingParams]) -> torch.Tensor:
    """The probabilities of rows without top-k or top-p: the softmax, less the ids under min_p."""
    x, probs = _probs(x, ps)
    min_p = [p.min_p for p in ps]
    if any(min_p):
        floor = _on(x.device, min_p, np.float32)[:, None] * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs


def _draw_plain(x: torch.Tensor, ps: list[SamplingParams], u: np.ndarray) -> torch.Tensor:
    """Rows that keep the whole vocabulary (but for min_p): inverse CDF in vocabulary order, found
    in two levels, block sums then the block, so that no pass over the rows is a cumulative sum."""
    if _c_kernels(x):  # the same draw in one read of each row
        return cpu_kernels.sample_plain(x.contiguous(), [p.temperature for p in ps], [p.min_p for p in ps], u)
    probs = _plain(x, ps)
    dev = x.device
    m, vocab = probs.shape
    b = math.gcd(vocab, VOCAB_BLOCK)
    blocks = probs.view(m, vocab // b, b)
    cum = blocks.sum(dim=-1).double().cumsum(dim=-1)
    mass = cum[:, -1]
    target = _on(dev, u, np.float64) * mass
    j = _pick(cum, target)
    before = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
    inner = blocks.gather(1, j[:, None, None].expand(m, 1, b)).squeeze(1).double().cumsum(dim=-1)
    return _checked(j * b + _pick(inner, target - before), mass)


def _draw_filtered(x: torch.Tensor, ps: list[SamplingParams], u: np.ndarray) -> torch.Tensor:
    """Rows with top-k or top-p: inverse CDF over their kept ids in descending order (on the CPU
    with its C kernels: the same kept ids, found without a sort, drawn in vocabulary order)."""
    if _c_kernels(x):
        return cpu_kernels.sample_filtered(x.contiguous(), ps, u)
    out = None
    for rows, ids, kept in _filtered(*_probs(x, ps), ps):
        cum = kept.double().cumsum(dim=-1)
        mass = cum[:, -1]
        tokens = _checked(ids.gather(1, _pick(cum, _on(x.device, u[rows], np.float64) * mass)[:, None]).squeeze(1), mass)
        if len(rows) == x.shape[0]:
            return tokens
        if out is None:
            out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        out.index_copy_(0, _on(x.device, rows, np.int64), tokens)
    return out


def _filtered(x: torch.Tensor, probs: torch.Tensor, ps: list[SamplingParams]):
    """Yields (rows, ids [r, w], kept [r, w]) until every row is done: each row's w most likely
    ids, descending, and their probabilities with zeros for the ids its filters drop, for a w
    that holds every id it keeps. A GPU sorts each row (w = V); the CPU, where a sort of 128K ids
    costs milliseconds, first tries the 64, 1024 and 8192 most likely ids, skipping those that
    cannot hold a row (what a window lacked bounds how many more it keeps), and sorts only the
    rows none holds. Every w gives the same draw: the window is a prefix of the sorted row."""
    m, vocab = x.shape
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in ps]
    need = [k + 1 if k < vocab else 1 for k in top_k]  # the smallest window that may hold the row
    windows = [w for w in CPU_WINDOWS if w < vocab and x.device.type == "cpu"] + [vocab]
    rows, maxima = list(range(m)), None
    for w in windows:
        now = [r for r in rows if need[r] <= w or w == vocab]
        if not now:
            continue
        if maxima is None and w < vocab:
            maxima = _group_maxima(x, w)
        ids, kept, held, more = _window(_take(x, now), _take(probs, now), [ps[r] for r in now], [top_k[r] for r in now],
                                        w, None if maxima is None else _take(maxima, now))
        if w == vocab or bool(held.all()):
            yield now, ids, kept
            done = now
        else:  # the CPU: waiting for the device costs nothing there
            done = [r for r, h in zip(now, held.tolist()) if h]
            if done:
                yield done, ids[held], kept[held]
            for r, h, n in zip(now, held.tolist(), more.tolist()):
                if not h:
                    need[r] = max(need[r], n)
        if len(done) == len(rows):
            return
        done = set(done)
        rows = [r for r in rows if r not in done]


def _window(x: torch.Tensor, probs: torch.Tensor, ps: list[SamplingParams], top_k: list[int], w: int,
            maxima: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Each row's w most likely ids and their kept probabilities: top-k (ties at the k-th logit
    kept), min_p against the most likely, then top-p over the top-k mass (the smallest prefix
    whose mass reaches top_p, and every id tied with its last). Then per row whether the window
    held every kept id (always when w = V; never for a top-k of w or more), and a lower bound on
    the window that may: each id past this one has at most its last one's probability."""
    vocab = x.shape[1]
    dev = x.device
    vals, ids = _top(x, w, maxima)
    wp = probs.gather(1, ids)
    k = _on(dev, top_k, np.int64)
    min_p, top_p = _on(dev, [(p.min_p, p.top_p) for p in ps], np.float32).unbind(1)
    keep = vals >= vals.gather(1, k.clamp(max=w)[:, None] - 1)
    mass_k = torch.where(k < vocab, (wp * keep).sum(dim=-1), 1.0)  # top-p is relative to the top-k mass
    keep &= wp >= min_p[:, None] * wp[:, :1]
    q = wp * keep
    before = q.cumsum(dim=-1) - q
    last = ((before <= (top_p * mass_k)[:, None]).sum(dim=-1) - 1).clamp(min=0)
    keep &= (vals >= vals.gather(1, last[:, None])) | (top_p >= 1.0)[:, None]
    held = ~keep[:, -1] & ((k < w) | (k == vocab)) | (w == vocab)
    lacking = (top_p * mass_k - q.sum(dim=-1)).clamp(min=0.0) / wp[:, -1]
    more = w + torch.where(top_p < 1.0, lacking.nan_to_num(nan=1.0, posinf=vocab).clamp(1, vocab).ceil(), 1.0)
    return ids, wp * keep, held, more


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[n, V]: the probabilities `sample` draws each row's token from (after temperature, top-k,
    min_p and top-p; zero for every id the filters drop; not renormalised). A greedy row is one-hot
    at its argmax. What a request's parameters keep, for tests and for reading."""
    out = torch.zeros_like(logits)
    for i, p in enumerate(params):
        row = logits[i:i + 1]
        if p.is_greedy:
            out[i, row.argmax()] = 1.0
        elif p.top_k > 0 or p.top_p < 1.0:
            for _, ids, kept in _filtered(*_probs(row, [p]), [p]):
                out[i].scatter_(0, ids[0], kept[0])
        else:
            out[i] = _plain(row, [p])[0]
    return out


def _group_maxima(x: torch.Tensor, w: int) -> torch.Tensor | None:
    """The CPU's first level of a top-w: the maximum of each group of ids j, j + V/G, j + 2V/G, ...
    (a strided max, which reads each row once). None where one level is as fast (no G divides V,
    or w * G candidates would cover the row)."""
    m, vocab = x.shape
    g = math.gcd(vocab, GROUP)
    if g == 1 or w * g >= vocab:
        return None
    return x.reshape(m, g, vocab // g).amax(dim=1)


def _top(x: torch.Tensor, w: int, maxima: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The w largest logits of each row, descending, and their ids. With the group maxima, in two
    levels: the w largest lie in the w groups with the largest maxima, and only those w * G
    candidates are ranked."""
    m, vocab = x.shape
    if w >= vocab:
        return x.sort(dim=-1, descending=True, stable=True)
    groups = maxima.shape[1] if maxima is not None else vocab
    if maxima is None or w * (vocab // groups) >= vocab:
        return x.topk(w, dim=-1)
    strided = x.reshape(m, vocab // groups, groups)
    best = maxima.topk(w, dim=-1).indices  # [m, w]
    vals, pos = strided.gather(2, best[:, None, :].expand(m, vocab // groups, w)).flatten(1).topk(w, dim=-1)
    return vals, (pos // w) * groups + best.gather(1, pos % w)
