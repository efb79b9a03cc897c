"""Runs the model on one batch: flat inputs and attention metadata in, the needed logits out.
Decode-only batches on CUDA replay CUDA graphs captured at a ladder of batch sizes."""

from __future__ import annotations

import torch

from splitnode.engine.batcher import Batch
from splitnode.model.attention import AttentionContext, LayerHook, PrefillChunk
from splitnode.model.decode_mirror import DecodeMirror

DECODE_MIRROR_BYTES = 256 << 20


def slot_of(table: list[int], pos: int, block_size: int) -> int:
    """The cache slot of a sequence's token at `pos`, from its block table."""
    return table[pos // block_size] * block_size + pos % block_size


class ModelRunner:
    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 max_model_len: int, max_num_seqs: int, device: torch.device, enforce_eager: bool):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # CPU only: GPUs read the paged cache with the Triton kernel under CUDA graphs.
        self.decode_mirror = DecodeMirror(DECODE_MIRROR_BYTES) if device.type == "cpu" else None
        if device.type == "cuda" and not enforce_eager:
            self._capture_graphs(min(max_num_seqs, 256))

    def _to_device(self, data, dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        return [slot_of(table, p, self.block_size) for p in range(start, end)]

    def prepare(self, batch: Batch, layer_hook: LayerHook | None = None):
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        tables: list[list[int]] = []
        context_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.chunk_lens)):
            start, end = seq.num_computed, seq.num_computed + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_mapping.extend(self._slots(seq.block_table, start, end))
            if i < batch.num_decodes:
                tables.append(seq.block_table)
                context_lens.append(end)
            else:
                slots = None if start == 0 else self._to_device(self._slots(seq.block_table, 0, end), torch.int64)
                prefills.append(PrefillChunk(len(input_ids) - n, n, end, slots))
        block_tables = None
        mirror = None
        if tables:
            width = max(len(t) for t in tables)
            block_tables = self._to_device([t + [-1] * (width - len(t)) for t in tables], torch.int32)
            decodes = batch.seqs[: batch.num_decodes]
            if self.decode_mirror is not None and self.decode_mirror.prepare(
                    [s.seq_id for s in decodes], [s.num_computed for s in decodes], block_tables, self.kv_caches):
                mirror = self.decode_mirror
        ctx = AttentionContext(
            kv_caches=self.kv_caches,
            slot_mapping=self._to_device(slot_mapping, torch.int64),
            num_decodes=batch.num_decodes,
            block_tables=block_tables,
            context_lens=self._to_device(context_lens, torch.int32) if tables else None,
            prefills=prefills,
            layer_hook=layer_hook,
            decode_mirror=mirror,
        )
        return self._to_device(input_ids, torch.int64), self._to_device(positions, torch.int64), ctx

    @torch.inference_mode()
    def run(self, batch: Batch, rows: list[int], layer_hook: LayerHook | None = None) -> torch.Tensor:
        """Runs the batch; returns float32 logits of the flat-batch rows asked for."""
        n = len(batch)
        if self.graphs and batch.num_decodes == n and layer_hook is None and n <= max(self.graphs):
            logits = self._replay(batch)  # a decode-only batch samples every row, in order
            return logits if rows == list(range(n)) else logits[rows]
        input_ids, positions, ctx = self.prepare(batch, layer_hook)
        hidden = self.model(input_ids, positions, ctx)
        if not rows:  # every chunk in the batch is a partial prefill
            return hidden.new_empty(0, dtype=torch.float32)
        index = torch.tensor(rows, dtype=torch.int64).to(hidden.device, non_blocking=True)
        return self.model.compute_logits(hidden.index_select(0, index))

    # CUDA graphs: static input buffers sized for the largest batch; each graph reads a prefix and
    # writes the logits of every row. One pinned host buffer carries a step's inputs in one copy.

    def _capture_graphs(self, max_bs: int) -> None:
        dev = self.device
        self.g_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.g_pos = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.g_slots = torch.full((max_bs,), -1, dtype=torch.int64, device=dev)
        self.g_tables = torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.g_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.g_host = torch.zeros(max_bs * (4 + self.max_blocks_per_seq), dtype=torch.int64).pin_memory()
        self.g_out: dict[int, torch.Tensor] = {}
        sizes = [b for b in (1, 2, 4, 8) + tuple(range(16, max_bs + 1, 16)) if b <= max_bs]
        pool = None
        with torch.inference_mode():
            for bs in reversed(sizes):
                ctx = AttentionContext(self.kv_caches, self.g_slots[:bs], bs, self.g_tables[:bs], self.g_lens[:bs])
                self.model.compute_logits(self.model(self.g_ids[:bs], self.g_pos[:bs], ctx))  # warm-up
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    self.g_out[bs] = self.model.compute_logits(self.model(self.g_ids[:bs], self.g_pos[:bs], ctx))
                pool = graph.pool() if pool is None else pool
                self.graphs[bs] = graph
        torch.cuda.synchronize(dev)

    def _replay(self, batch: Batch) -> torch.Tensor:
        n = len(batch)
        bs = min(b for b in self.graphs if b >= n)
        pad = bs - n
        width = max(len(s.block_table) for s in batch.seqs)
        pos = [s.num_computed for s in batch.seqs]
        flat = [s.token_ids[p] for s, p in zip(batch.seqs, pos)] + [0] * pad
        flat += pos + [0] * pad
        flat += [slot_of(s.block_table, p, self.block_size) for s, p in zip(batch.seqs, pos)] + [-1] * pad
        flat += [p + 1 for p in pos] + [1] * pad
        for s in batch.seqs:
            flat += s.block_table + [0] * (width - len(s.block_table))
        flat += [0] * (pad * width)
        # Safe to refill every step: the step ends in a sync (the sampled ids come to the host).
        host = self.g_host[: len(flat)]
        host.copy_(torch.tensor(flat, dtype=torch.int64))
        dev = host.to(self.device, non_blocking=True)
        self.g_ids[:bs].copy_(dev[:bs])
        self.g_pos[:bs].copy_(dev[bs:2 * bs])
        self.g_slots[:bs].copy_(dev[2 * bs:3 * bs])
        self.g_lens[:bs].copy_(dev[3 * bs:4 * bs])
        # Columns past `width` keep older entries: never read, every read is below context_len.
        self.g_tables[:bs, :width].copy_(dev[4 * bs:].view(bs, width))
        self.graphs[bs].replay()
        return self.g_out[bs][:n]
