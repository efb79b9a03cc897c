"""One device's engine: model replica, paged KV pool, batcher and runner.

`step()` is the whole loop: schedule -> run -> postprocess. The single-device `LLM` drives one
engine in the `mixed` role; the multi-device runtime gives each worker one engine with its role.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from splitnode.engine.batcher import Batch, Batcher
from splitnode.engine.config import EngineConfig
from splitnode.engine.kv import BlockPool, allocate_kv_cache, kv_cache_bytes_per_block, layer_views
from splitnode.model.loader import load_model
from splitnode.engine.model_runner import ModelRunner
from splitnode.engine.sampling import SamplingParams, sample, top_logprobs
from splitnode.engine.sequence import Sequence, SeqStatus

log = logging.getLogger("splitnode")


def resolve_model_path(model: str | None) -> Path:
    if model is None:
        from splitnode.model.demo import demo_model_path

        return demo_model_path()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder not found: {path} (give a local Hugging Face folder with config.json, "
            "*.safetensors and tokenizer.json; no model at all runs the demo model)")
    return path


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return checkpoint_dtype or torch.bfloat16
    return getattr(torch, dtype)


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
        mc = self.model_config
        per_block = kv_cache_bytes_per_block(mc.num_hidden_layers, config.block_size, mc.num_key_value_heads,
                                             mc.head_dim, self.dtype)
        num_blocks = config.num_kv_blocks or self._auto_num_blocks(per_block, kv_share)
        self.pool = BlockPool(num_blocks, config.block_size)
        self.max_model_len = min(config.max_model_len or mc.max_model_len, mc.max_model_len,
                                 num_blocks * config.block_size)
        self.kv_cache = allocate_kv_cache(mc.num_hidden_layers, num_blocks, config.block_size,
                                          mc.num_key_value_heads, mc.head_dim, self.dtype, self.device)
        self.kv_caches = layer_views(self.kv_cache)
        # A compute stream and a transfer stream per engine, so KV moves overlap compute.
        cuda = self.device.type == "cuda"
        self.compute_stream = torch.cuda.Stream(self.device) if cuda else None
        self.transfer_stream = torch.cuda.Stream(self.device) if cuda else None
        self.batcher = Batcher(config, self.pool, role)
        self.runner = ModelRunner(self.model, self.kv_caches, config.block_size, self.max_model_len,
                                  config.max_num_seqs, self.device, config.enforce_eager)
        log.info("engine on %s: %d KV blocks of %d tokens (%.1f MiB), role %s", self.device, num_blocks,
                 config.block_size, num_blocks * per_block / 2**20, role)

    def _auto_num_blocks(self, per_block: int, kv_share: float) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = (total * self.config.gpu_memory_utilization - (total - free)) * kv_share
        else:
            budget = (self.config.kv_cache_gib or 1.0) * 2**30 * kv_share
        if budget < per_block:
            raise RuntimeError(f"no memory left for the KV cache on {self.device} after loading the model")
        return int(budget // per_block)

    @property
    def role(self) -> str:
        return self.batcher.role

    def check_request(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Rejects, before anything is queued, a request that could never run here."""
        if num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        params.check_vocab(self.model_config.vocab_size)
        total = num_prompt_tokens + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"the maximum model length {self.max_model_len} (the model's limit, capped by the KV pool "
                f"of {self.pool.num_blocks} blocks x {self.pool.block_size} tokens)")

    def add(self, seq: Sequence) -> None:
        self.batcher.add(seq)

    def abort(self, seq: Sequence) -> None:
        self.batcher.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"

    def has_work(self) -> bool:
        return self.batcher.has_work()

    def step(self, hook_for: Callable[[Batch], Callable[[int], None] | None] | None = None,
             ) -> tuple[Batch, list[Sequence]]:
        """Runs one batch. Returns it and the sequences that got a token in it (finished ones are
        already out of the batcher, their blocks free). `hook_for(batch)` may give a per-layer
        hook for the forward (the runtime's layer-wise KV transfer)."""
        with self.pool.lock:  # other threads reserve blocks here: check-then-allocate is atomic
            batch = self.batcher.schedule()
        if not batch:
            return batch, []
        rows, plan = self._logit_rows(batch)
        logits = self.runner.run(batch, rows, hook_for(batch) if hook_for else None)
        return batch, self._postprocess(batch, logits, plan)

    def _logit_rows(self, batch: Batch):
        """Which flat-batch rows need logits: the last row of every chunk that completes its
        sequence (to sample), and the prompt rows whose prompt logprobs are not recorded yet."""
        rows: list[int] = []
        plan: list[tuple[list[int], int | None]] = []  # per seq: prompt-logprob rows, sample row
        offset = 0
        for seq, n in zip(batch.seqs, batch.chunk_lens):
            start = seq.num_computed
            plp: list[int] = []
            if seq.prompt_logprobs is not None:
                # row at position p predicts prompt token p + 1; record each prompt token once
                first = max(start, len(seq.prompt_logprobs) - 1)
                for p in range(first, min(start + n, seq.num_prompt_tokens - 1)):
                    plp.append(len(rows))
                    rows.append(offset + p - start)
            srow = None
            if start + n == seq.num_tokens:
                srow = len(rows)
                rows.append(offset + n - 1)
            plan.append((plp, srow))
            offset += n
        return rows, plan

    def _postprocess(self, batch: Batch, logits: torch.Tensor, plan) -> list[Sequence]:
        sample_idx = [srow for _, srow in plan if srow is not None]
        sampled_seqs = [s for s, (_, srow) in zip(batch.seqs, plan) if srow is not None]
        if sample_idx:
            sl = logits[sample_idx]
            tokens = sample(sl, [s.params for s in sampled_seqs], [s.token_ids for s in sampled_seqs],
                            [s.generator for s in sampled_seqs])
            k = max((s.params.logprobs or 0) for s in sampled_seqs)
            want_lp = any(s.logprobs is not None for s in sampled_seqs)
            lps = top_logprobs(torch.log_softmax(sl, dim=-1), tokens, k) if want_lp else None
            tokens = tokens.tolist()
        out: list[Sequence] = []
        j = 0
        for seq, n, (plp, srow) in zip(batch.seqs, batch.chunk_lens, plan):
            if plp:
                seq_rows = logits[plp]
                targets = torch.tensor(seq.prompt_token_ids[len(seq.prompt_logprobs):][: len(plp)],
                                       device=seq_rows.device)
                seq.prompt_logprobs.extend(
                    _trim(top_logprobs(torch.log_softmax(seq_rows, dim=-1), targets, seq.params.prompt_logprobs),
                          seq.params.prompt_logprobs))
            seq.num_computed += n
            if srow is None:
                continue
            if seq.logprobs is not None:
                seq.logprobs.append(_trim([lps[j]], seq.params.logprobs)[0])
            seq.append_token(tokens[j])
            j += 1
            if seq.finish_reason is not None:
                self.batcher.remove(seq)
                seq.status = SeqStatus.FINISHED
            out.append(seq)
        return out


def _trim(rows, k: int):
    """top_logprobs ran with the batch's largest k: keep this request's k (plus its own token)."""
    trimmed = []
    for d in rows:
        items = list(d.items())
        keep = dict(items[: 1])
        keep.update({t: lp for t, lp in items[1:] if lp.rank <= k})
        trimmed.append(keep)
    return trimmed
