"""One device's engine: model replica, paged KV pool, batcher and runner.

`step()` is the whole loop: `schedule()` a batch, then `execute()` it (run the model, sample,
record). The single-device `LLM` drives one engine in the `mixed` role; the multi-device runtime
gives each worker one engine with its role.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from splitnode.engine.batcher import Batch, Batcher
from splitnode.engine.config import EngineConfig
from splitnode.engine.kv import BlockPool, allocate_kv_cache, kv_budget_bytes, kv_cache_bytes_per_block, layer_views
from splitnode.engine.model_runner import MAX_GRAPH_BATCH, ModelRunner, graph_logits_bytes, prefill_peak_bytes
from splitnode.engine.sampling import Logprob, SamplingParams, argmax, sample, top_logprobs
from splitnode.engine.sequence import Sequence
from splitnode.engine.streams import STREAMS
from splitnode.model.attention import LayerHook
from splitnode.model.cpu_linear import pack_linears
from splitnode.model.loader import load_model, resolve_model_path

log = logging.getLogger("splitnode")


def check_length(num_prompt_tokens: int, max_tokens: int, max_model_len: int, limit: str) -> None:
    """Rejects a request whose prompt + max_tokens passes max_model_len; `limit` says whose it is."""
    total = num_prompt_tokens + max_tokens
    if total > max_model_len:
        raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
                         f"the maximum model length {max_model_len} ({limit})")


class _Rows(NamedTuple):
    """Which flat-batch rows get logits, and where each sequence's are among them."""

    rows: list[int]  # the flat-batch rows the runner returns logits of, in order
    samples: list[int | None]  # per sequence, its row to sample from; None: the chunk ends mid-prompt
    prompts: list[tuple[int, list[int]]]  # (sequence index, its rows scoring prompt tokens not scored yet)


class Engine:
    def __init__(self, config: EngineConfig, role: str = "mixed", device: str | None = None,
                 model_path: Path | None = None, kv_share: float = 1.0):
        self.config = config
        self.device = torch.device(device or config.device)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        path = model_path or resolve_model_path(config.model)
        self.model, self.model_config = load_model(path, self.device, config.dtype)
        self.dtype = next(self.model.parameters()).dtype
        if self.device.type == "cpu":
            pack_linears(self.model)  # oneDNN's layout: the CPU's GEMMs 1.1-1.5x faster (cpu_linear.py)
        mc = self.model_config
        per_block = kv_cache_bytes_per_block(mc.num_hidden_layers, config.block_size, mc.num_key_value_heads,
                                             mc.head_dim, self.dtype)
        num_blocks = config.num_kv_blocks or self._auto_num_blocks(per_block, kv_share)
        self.pool = BlockPool(num_blocks, config.block_size)
        # What sets the limit, for the message that refuses a prompt past it: the first that binds.
        limits = [(num_blocks * config.block_size, f"the KV pool of {num_blocks} blocks x {config.block_size} tokens"),
                  (mc.max_model_len, "the model's context length")]
        if config.max_model_len:
            limits.insert(0, (config.max_model_len, "set by max_model_len, --max-model-len"))
        self.max_model_len, self.max_model_len_reason = min(limits, key=lambda lim: lim[0])
        self.kv_cache = allocate_kv_cache(mc.num_hidden_layers, num_blocks, config.block_size,
                                          mc.num_key_value_heads, mc.head_dim, self.dtype, self.device)
        self.kv_caches = layer_views(self.kv_cache)
        # A compute stream and a transfer stream per engine, so KV moves overlap compute (None on the CPU).
        self.streams = STREAMS
        self.compute_stream = self.streams.new(self.device)
        self.transfer_stream = self.streams.new(self.device)
        self.batcher = Batcher(config, self.pool, role)
        self.runner = ModelRunner(self.model, self.kv_caches, config.block_size, self.max_model_len,
                                  config.max_num_seqs, self.device, config.enforce_eager)
        # E1: the cache was zeroed (and the graphs captured) on this thread's default stream; the
        # worker's streams are non-blocking ones, which nothing else orders after that work.
        self.streams.synchronize(self.device)
        log.info("engine on %s: %d KV blocks of %d tokens (%.1f MiB), role %s", self.device, num_blocks,
                 config.block_size, num_blocks * per_block / 2**20, role)

    def _auto_num_blocks(self, per_block: int, kv_share: float) -> int:
        """On CUDA: measured after a profiling prefill, leaving room for this engine's graph pool
        and temporaries and for the weights of the engines still to load on the device (see
        `kv_budget_bytes`). `kv_share` is 1/k for the k engines still to load there."""
        if self.device.type == "cuda":
            cfg, mc = self.config, self.model_config
            other = prefill_peak_bytes(self.model, mc, cfg.max_num_batched_tokens,
                                       min(cfg.max_num_seqs, cfg.max_num_batched_tokens), cfg.block_size, self.dtype,
                                       self.device)
            if not cfg.enforce_eager:
                other += graph_logits_bytes(min(cfg.max_num_seqs, MAX_GRAPH_BATCH), mc.vocab_size)
            weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
            free, total = torch.cuda.mem_get_info(self.device)
            budget = kv_budget_bytes(total, free, cfg.gpu_memory_utilization, weights, other, kv_share)
        else:
            budget = (self.config.kv_cache_gib or 1.0) * 2**30 * kv_share
        if budget < per_block:
            raise RuntimeError(f"no memory left for the KV cache on {self.device} after loading the model")
        return int(budget // per_block)

    def check_request(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Rejects, before anything is queued, a request that could never run here."""
        if num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        params.check_vocab(self.model_config.vocab_size)
        check_length(num_prompt_tokens, params.max_tokens, self.max_model_len, self.max_model_len_reason)

    def add(self, seq: Sequence) -> None:
        self.batcher.add(seq)

    def abort(self, seq: Sequence) -> None:
        self.batcher.remove(seq)
        seq.finish(seq.finish_reason or "abort")  # one that finished already keeps its reason

    def has_work(self) -> bool:
        return self.batcher.has_work()

    def schedule(self) -> Batch:
        with self.pool.lock:  # other threads reserve blocks here: check-then-allocate is atomic
            return self.batcher.schedule()

    def execute(self, batch: Batch, layer_hook: LayerHook | None = None) -> list[Sequence]:
        """Runs a scheduled (non-empty) batch. Returns, in batch order, the sequences that got a
        token in it and those that failed in it (finished ones are already out of the batcher,
        their blocks free). A failure of the forward is the device's and raises; one in a
        sequence's own sampling or logprobs fails that sequence alone (`Sequence.error`)."""
        plan = self._logit_rows(batch)
        logits = self.runner.run(batch, plan.rows, layer_hook)
        self._record_prompt_logprobs(batch, logits, plan.prompts)
        for seq, n in zip(batch.seqs, batch.chunk_lens):
            seq.num_computed += n  # the chunk's K/V is in the cache now
        if batch.num_decodes == len(batch):  # every row samples, and no prompt logprobs could fail one
            self._append_tokens(batch.seqs, logits)
            return list(batch.seqs)
        picked = [(s, r) for s, r in zip(batch.seqs, plan.samples) if r is not None and s.error is None]
        if picked:
            # Rows are in batch order: when every row samples they are the logits as they are, with
            # no index to copy to the device (H4).
            rows = logits if len(picked) == logits.shape[0] else logits.index_select(
                0, self.streams.ids([r for _, r in picked], logits.device))
            self._append_tokens([s for s, _ in picked], rows)
        return [s for s, r in zip(batch.seqs, plan.samples) if r is not None or s.error is not None]

    def step(self, hook_for: Callable[[Batch], LayerHook | None] | None = None) -> tuple[Batch, list[Sequence]]:
        """Schedules and runs one batch; returns it and what `execute` returns. `hook_for(batch)`
        may give a per-layer hook for the forward (the runtime's layer-wise KV transfer). Runs on
        this engine's device and compute stream whatever thread calls it (C2: an executor thread's
        current device is 0, and Triton launches on the current device with cuda:1 pointers)."""
        batch = self.schedule()
        if not batch:
            return batch, []
        with self.streams.on(self.compute_stream):
            return batch, self.execute(batch, hook_for(batch) if hook_for else None)

    def _logit_rows(self, batch: Batch) -> _Rows:
        """Which flat-batch rows need logits: the last row of every chunk that completes its
        sequence (to sample), and the prompt rows whose prompt logprobs are not recorded yet. A
        decode's one row is both its own and its sample (it scores no prompt token)."""
        nd = batch.num_decodes
        rows: list[int] = list(range(nd))
        samples: list[int | None] = list(range(nd))
        prompts: list[tuple[int, list[int]]] = []
        offset = nd
        for i in range(nd, len(batch)):
            seq, n = batch.seqs[i], batch.chunk_lens[i]
            start = seq.num_computed
            if seq.prompt_logprobs is not None:
                # row at position p predicts prompt token p + 1; record each prompt token once
                first = max(start, len(seq.prompt_logprobs) - 1)
                prompt = list(range(len(rows), len(rows) + max(0, min(start + n, seq.num_prompt_tokens - 1) - first)))
                rows.extend(range(offset + first - start, offset + first - start + len(prompt)))
                if prompt:
                    prompts.append((i, prompt))
            samples.append(len(rows) if start + n == seq.num_tokens else None)
            if samples[-1] is not None:
                rows.append(offset + n - 1)
            offset += n
        return _Rows(rows, samples, prompts)

    def _record_prompt_logprobs(self, batch: Batch, logits: torch.Tensor, prompts: list[tuple[int, list[int]]]) -> None:
        for i, prompt in prompts:
            seq = batch.seqs[i]
            try:
                done = len(seq.prompt_logprobs)
                targets = self.streams.ids(seq.prompt_token_ids[done:done + len(prompt)], logits.device)
                lps = torch.log_softmax(logits.index_select(0, self.streams.ids(prompt, logits.device)), dim=-1)
                seq.prompt_logprobs.extend(top_logprobs(lps, targets, seq.params.prompt_logprobs))
            except Exception as e:  # this sequence's own: the others' rows are fine
                self._fail(seq, "prompt logprobs", e)

    def _append_tokens(self, seqs: list[Sequence], rows: torch.Tensor) -> None:
        """Samples the next token of each sequence from its row of logits and appends it."""
        if all(s.plain_greedy for s in seqs):  # an argmax, and nothing that can fail per row
            now = time.perf_counter()
            for seq, token in zip(seqs, argmax(rows).tolist()):
                seq.append_token(token, now)
                if seq.finish_reason is not None:
                    self.batcher.remove(seq)
                    seq.finish(seq.finish_reason)
            return
        now = time.perf_counter()
        for seq, result in zip(seqs, self._sample_isolated(seqs, rows)):
            if isinstance(result, Exception):
                self._fail(seq, "sampling", result)
                continue
            token, lps = result  # (id, its logprobs or None)
            if seq.logprobs is not None:
                seq.logprobs.append(lps)
            seq.append_token(token, now)
            if seq.finish_reason is not None:  # a stop id, or max_tokens
                self.batcher.remove(seq)
                seq.finish(seq.finish_reason)

    def _sample_isolated(self, seqs: list[Sequence], rows: torch.Tensor) -> list[_Sampled | Exception]:
        """`_sample_rows` for the whole batch; if that raises, row by row, so that a row that still
        raises (its exception in its place) fails only its own sequence. Nothing to rewind: a draw
        is a function of the request's seed and position alone."""
        try:
            return self._sample_rows(seqs, rows)
        except Exception as e:  # the rows that still raise log their traceback below
            log.warning("sampling a batch of %d failed (%s); sampling it row by row", len(seqs), _one_line(e))
        results: list[_Sampled | Exception] = []
        for j, seq in enumerate(seqs):
            try:
                results.extend(self._sample_rows([seq], rows[j:j + 1]))
            except Exception as e:
                results.append(e)
        return results

    @staticmethod
    def _sample_rows(seqs: list[Sequence], rows: torch.Tensor) -> list[_Sampled | Exception]:
        """The next token of each sequence (penalties applied), with its logprobs if it asked; an
        exception in place of a row whose distribution is not one (NaN or inf in its logits)."""
        tokens = sample(rows, [s.params for s in seqs], [s.seed for s in seqs], [len(s.token_ids) for s in seqs],
                        [s.token_ids for s in seqs])
        ids = tokens.tolist()  # the step's one wait for the device
        lps: list[dict[int, Logprob] | None] = [None] * len(seqs)
        if any(s.logprobs is not None for s in seqs):
            k = max((s.params.logprobs or 0) for s in seqs)
            top = top_logprobs(torch.log_softmax(rows, dim=-1), tokens.clamp(min=0), k)
            lps = [None if s.logprobs is None else _trim(t, s.params.logprobs) for s, t in zip(seqs, top)]
        results: list[_Sampled | Exception] = list(zip(ids, lps))
        if min(ids) < 0:
            results = [r if r[0] >= 0 else RuntimeError(NO_DISTRIBUTION) for r in results]
        return results

    def _fail(self, seq: Sequence, stage: str, exc: Exception) -> None:
        """Ends seq alone and frees its blocks; `execute` returns it with the finished ones."""
        log.warning("sequence %d failed in %s", seq.seq_id, stage, exc_info=exc)
        self.batcher.remove(seq)
        seq.fail(f"{stage} failed: {_one_line(exc)}")


NO_DISTRIBUTION = "probability tensor contains inf or nan: no token to draw"


_Sampled = tuple[int, "dict[int, Logprob] | None"]  # a token and its logprobs (None: the request asked for none)


def _one_line(exc: Exception) -> str:
    """The error for a client: torch's messages run over several lines (the first says it)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


def _trim(row: dict[int, Logprob], k: int) -> dict[int, Logprob]:
    """top_logprobs ran with the batch's largest k: keep this request's k (plus its own token)."""
    items = list(row.items())
    keep = dict(items[:1])
    keep.update({t: lp for t, lp in items[1:] if lp.rank <= k})
    return keep
