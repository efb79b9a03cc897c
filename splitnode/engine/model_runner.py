"""Runs the model on one batch: flat inputs and attention metadata in, the needed logits out.
Decode-only batches on CUDA replay CUDA graphs captured at a ladder of batch sizes."""

from __future__ import annotations

from collections.abc import Callable

import torch

from splitnode.engine.batcher import Batch
from splitnode.engine.kv import allocate_kv_cache, layer_views
from splitnode.model.attention import AttentionContext, LayerHook, PrefillChunk
from splitnode.model.decode_mirror import DecodeMirror

DECODE_MIRROR_BYTES = 256 << 20
MAX_GRAPH_BATCH = 256  # decode batches past it run eagerly


def slot_of(table: list[int], pos: int, block_size: int) -> int:
    """The cache slot of a sequence's token at `pos`, from its block table."""
    return table[pos // block_size] * block_size + pos % block_size


def graph_sizes(max_bs: int) -> list[int]:
    """The batch sizes decode graphs are captured at: the smallest that fits is replayed."""
    return [b for b in (1, 2, 4, 8) + tuple(range(16, max_bs + 1, 16)) if b <= max_bs]


def graph_logits_bytes(max_bs: int, vocab_size: int) -> int:
    """The float32 logits every captured graph keeps alive in the graph pool: 1.1 GB at Llama-3's
    vocabulary and 256 sequences, which the KV budget must leave room for (M3)."""
    return sum(graph_sizes(max_bs)) * vocab_size * 4


def prefill_peak_bytes(model, mc, num_tokens: int, num_rows: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> int:
    """What a prefill of `num_tokens` (the batch budget) and logits for `num_rows` of them take on
    the device beyond the weights and the KV cache, measured by running one before the cache is
    sized, as vLLM profiles (M3). CUDA only: 0 on the CPU, whose KV size is set, not derived."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    kv = allocate_kv_cache(mc.num_hidden_layers, -(-num_tokens // block_size), block_size, mc.num_key_value_heads,
                           mc.head_dim, dtype, device)
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    positions = torch.arange(num_tokens, device=device)
    ctx = AttentionContext(layer_views(kv), positions, prefills=[PrefillChunk(0, num_tokens, num_tokens, None)])
    with torch.inference_mode():
        model.compute_logits(model(ids, positions, ctx)[-num_rows:])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base - kv.numel() * kv.element_size()
    del kv, ids, positions, ctx
    torch.cuda.empty_cache()  # so that mem_get_info counts it free again
    return max(0, peak)


def capture_ladder(cuda, device: torch.device, sizes: list[int], run: Callable[[int], torch.Tensor]):
    """CUDA graphs of `run(bs)` for each batch size, largest first (the smaller ones reuse its
    memory pool); returns the graphs, their outputs and the capture stream. `cuda` is torch.cuda
    (a recording double in the tests).

    Warm-up and capture run under `device` and on a capture stream of this engine's own, made on
    that device. Without `stream=`, torch.cuda.graph captures on one stream per process, made on
    the device current at the first capture: a second engine's graphs would be captured on the
    first engine's GPU, with its Triton kernels writing the other GPU's memory and its torch ops
    left out of the graph (C1). A stream of its own also gives each engine its own cuBLAS
    workspace in its graphs, so two engines on one GPU do not share one under concurrent replays
    (M4). Capture errors are thread-local: other threads may allocate or sync meanwhile."""
    stream = cuda.Stream(device)
    graphs, outs, pool = {}, {}, None
    cuda.synchronize(device)  # weights, cache and static inputs were written on the default stream
    with cuda.device(device), cuda.stream(stream):
        for bs in sorted(sizes, reverse=True):
            run(bs)  # warm-up: lazy initialisation (cuBLAS, Triton compiles) stays out of the graph
            graph = cuda.CUDAGraph()
            with cuda.graph(graph, pool, stream=stream, capture_error_mode="thread_local"):
                outs[bs] = run(bs)
            pool = graph.pool() if pool is None else pool
            graphs[bs] = graph
    cuda.synchronize(device)
    return graphs, outs, stream


class ModelRunner:
    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 max_model_len: int, max_num_seqs: int, device: torch.device, enforce_eager: bool):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_stream = None  # the stream the graphs were captured on (CUDA graphs only)
        # CPU only: GPUs read the paged cache with the Triton kernel under CUDA graphs.
        self.decode_mirror = DecodeMirror(DECODE_MIRROR_BYTES) if device.type == "cpu" else None
        if device.type == "cuda" and not enforce_eager:
            self._capture_graphs(min(max_num_seqs, MAX_GRAPH_BATCH))

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
        sizes = graph_sizes(max_bs)

        def run(bs: int) -> torch.Tensor:
            ctx = AttentionContext(self.kv_caches, self.g_slots[:bs], bs, self.g_tables[:bs], self.g_lens[:bs])
            return self.model.compute_logits(self.model(self.g_ids[:bs], self.g_pos[:bs], ctx))

        with torch.inference_mode():
            self.graphs, self.g_out, self.capture_stream = capture_ladder(torch.cuda, dev, sizes, run)

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
