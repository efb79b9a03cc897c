"""Sampling parameters (validated at the door) and the batched sampler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


@dataclass
class SamplingParams:
    """Per-request sampling, with vLLM's names and defaults. Invalid values raise ValueError naming
    the field, before the request reaches a device."""

    max_tokens: int = 16
    temperature: float = 1.0
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
        for name in ("stop", "stop_token_ids"):
            v = getattr(self, name)
            if name == "stop" and isinstance(v, str):
                v = [v]
            _check(v is None or isinstance(v, (list, tuple, set, frozenset)), name, "a list", v)
            setattr(self, name, list(v or []))
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an int >= 1", self.max_tokens)
        _check(_is_number(self.temperature) and self.temperature >= 0.0, "temperature", ">= 0", self.temperature)
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k", "-1, 0 (off) or a positive int", self.top_k)
        _check(_is_number(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
        _check(_is_number(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]", self.min_p)
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0.0, "repetition_penalty", "> 0",
               self.repetition_penalty)
        _check(self.seed is None or _is_int(self.seed), "seed", "an int or None", self.seed)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and 0 <= v <= 20), name, "None or an int in [0, 20]", v)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings", self.stop)
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "a list of token ids", self.stop_token_ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def check_vocab(self, vocab_size: int) -> None:
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        _check(not bad, "stop_token_ids", f"ids below the vocabulary size {vocab_size}", bad)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A real number, not NaN (every comparison with NaN is false, so the range checks reject it)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(ok: bool, name: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {expected}, got {value!r}")


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
