"""Runs the model on one batch: flat inputs and attention metadata in, the needed logits out.
Decode-only batches on CUDA replay CUDA graphs captured at a ladder of batch sizes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from splitnode.engine.batcher import Batch
from splitnode.engine.kv import allocate_kv_cache, layer_views
from splitnode.engine.sequence import Sequence
from splitnode.kernels import cpu as cpu_kernels
from splitnode.model.attention import AttentionContext, LayerHook, PrefillChunk
from splitnode.model.decode_mirror import DecodeMirror

# The CPU decode mirror's budget: at least this, and as much as the paged KV cache itself (the
# decodes' K/V copied contiguously never needs more than that). At 256 MB alone, 32 sequences of
# 1K tokens in float32 (8 layers, 2 KV heads of 64) did not fit, and every decode step gathered its
# context from the paged cache instead: 4.6x slower steps (BENCHMARKS.md, "CPU engine").
DECODE_MIRROR_BYTES = 256 << 20
MAX_GRAPH_BATCH = 256  # decode batches past it run eagerly


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


class BlockTables:
    """The block tables of the sequences a runner decodes, kept across steps in one int32 array
    [rows, max_blocks] (-1 past each table) and, on a GPU, its device copy. A sequence keeps its row
    while it decodes; the row is written when the sequence joins and when its table grows (a block
    every block_size tokens), and a step gathers its rows by index: the tables are never rebuilt
    from the Python lists (H1). A row mirrors one list object, so a sequence whose table was
    replaced (a preemption, a hand-off) has its row written again."""

    def __init__(self, num_rows: int, max_blocks: int, device: torch.device):
        self.host = torch.full((num_rows, max_blocks), -1, dtype=torch.int32)
        self.np = self.host.numpy()
        self.table = self.host if device.type == "cpu" else self.host.to(device)
        self._row_of: dict[int, int] = {}  # id(seq) -> row: the list check below makes a reused id safe
        self._lists: list[list[int] | None] = [None] * num_rows  # the block_table object each row mirrors
        self._lens = [0] * num_rows  # entries written in each row
        self._free = list(range(num_rows - 1, -1, -1))

    def rows(self, seqs: list[Sequence]) -> tuple[list[int], int, list[tuple[int, int]]]:
        """The rows holding seqs' tables, brought up to date; the longest table's length; and the
        (row, end) spans the host wrote, for the device copy."""
        rows, written, width = [], [], 0
        row_of, lists, lens, table = self._row_of, self._lists, self._lens, self.np
        for seq in seqs:
            r = row_of.get(id(seq))
            if r is None:
                r = self._assign(seq, seqs)
            t = seq.block_table
            n = len(t)
            if lists[r] is not t:
                table[r, :n] = t
                table[r, n:lens[r]] = -1
                written.append((r, max(n, lens[r])))
                lists[r], lens[r] = t, n
            elif n > lens[r]:
                table[r, lens[r]:n] = t[lens[r]:]
                written.append((r, n))
                lens[r] = n
            rows.append(r)
            if n > width:
                width = n
        return rows, width, written

    def _assign(self, seq: Sequence, seqs: list[Sequence]) -> int:
        if not self._free:  # rows of sequences not in this batch go back (it has at most num_rows)
            live = {id(s) for s in seqs}
            for key, r in list(self._row_of.items()):
                if key not in live:
                    del self._row_of[key]
                    self._free.append(r)
        r = self._free.pop()
        self._row_of[id(seq)] = r
        self._lists[r] = None
        return r


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
        # CPU only, and only where the C kernels are not built (kernels/cpu.py reads the paged cache
        # as it is); GPUs read it with the Triton kernel under CUDA graphs.
        cache_bytes = sum(t.numel() * t.element_size() for kv in kv_caches for t in kv)
        self.decode_mirror = None
        if device.type == "cpu" and not (kv_caches and cpu_kernels.takes(device, kv_caches[0][0].dtype)):
            self.decode_mirror = DecodeMirror(max(DECODE_MIRROR_BYTES, cache_bytes))
        self.tables = BlockTables(max_num_seqs, self.max_blocks_per_seq, device)
        if device.type == "cuda" and not enforce_eager:
            self._capture_graphs(min(max_num_seqs, MAX_GRAPH_BATCH))

    def _upload(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """int64 host arrays as tensors on the device: on a GPU in one copy from pinned memory,
        queued on the stream (no wait); on the CPU the arrays themselves."""
        if self.device.type != "cuda":
            return [torch.from_numpy(a) for a in arrays]
        flat = torch.from_numpy(np.concatenate(arrays)).pin_memory().to(self.device, non_blocking=True)
        return list(flat.split([len(a) for a in arrays]))

    def _decode_inputs(self, seqs: list[Sequence]) -> tuple[np.ndarray, ...]:
        """Token ids, positions, cache slots and block-table rows of a decode per sequence (its one
        pending token is its last), and the longest table's length, with the device's table rows
        brought up to date."""
        rows, width, written = self.tables.rows(seqs)
        if written and self.device.type == "cuda":
            touched = np.array([r for r, _ in written], dtype=np.int64)
            end = max(e for _, e in written)
            index, = self._upload(touched)
            values = torch.from_numpy(self.tables.np[touched, :end]).pin_memory().to(self.device, non_blocking=True)
            self.tables.table[:, :end].index_copy_(0, index, values)
        num_cached = [s.num_computed for s in seqs]
        pos = np.array(num_cached, dtype=np.int64)
        ids = np.array([s.token_ids[-1] for s in seqs], dtype=np.int64)
        rows = np.array(rows, dtype=np.int64)
        bs = self.block_size
        slots = self.tables.np[rows, pos // bs].astype(np.int64) * bs + pos % bs
        return ids, pos, slots, rows, width, num_cached

    def prepare(self, batch: Batch, layer_hook: LayerHook | None = None):
        """The flat batch's inputs on the device: numpy arrays filled from the sequences' counters
        and the persistent block tables, moved in one copy per step."""
        nd, bs = batch.num_decodes, self.block_size
        ids, pos, slots = [], [], []
        spans = []  # per prefill chunk: whose context slots it needs on the device (None: its own rows)
        if nd:
            d_ids, d_pos, d_slots, rows, width, num_cached = self._decode_inputs(batch.seqs[:nd])
            ids.append(d_ids)
            pos.append(d_pos)
            slots.append(d_slots)
        offset = nd
        for seq, n in zip(batch.seqs[nd:], batch.chunk_lens[nd:]):
            start, end = seq.num_computed, seq.num_computed + n
            p = np.arange(end, dtype=np.int64)
            # every position's slot: a chunk after the first reads its whole context from the cache
            context = np.asarray(seq.block_table, dtype=np.int64)[p // bs] * bs + p % bs
            ids.append(np.asarray(seq.token_ids[start:end], dtype=np.int64))
            pos.append(np.arange(start, end, dtype=np.int64))
            slots.append(context[start:] if start else context)
            spans.append((offset, n, end, context if start else None))
            offset += n
        arrays = [np.concatenate(a) for a in (ids, pos, slots)]
        if nd:
            arrays += [rows, d_pos + 1]
        arrays += [c for *_, c in spans if c is not None]
        up = self._upload(*arrays)
        input_ids, positions, slot_mapping = up[:3]
        block_tables = context_lens = mirror = None
        if nd:
            if self.device.type == "cuda":
                block_tables = self.tables.table[:, :width].index_select(0, up[3])
            else:  # the rows themselves: a gather of [nd, width] entries, -1 past each table
                block_tables = torch.from_numpy(self.tables.np[rows, :width])
            context_lens = up[4].to(torch.int32)
            if self.decode_mirror is not None and self.decode_mirror.prepare(
                    [s.seq_id for s in batch.seqs[:nd]], num_cached, block_tables, self.kv_caches):
                mirror = self.decode_mirror
        contexts = iter(up[5:] if nd else up[3:])
        prefills = [PrefillChunk(q, n, end, None if c is None else next(contexts)) for q, n, end, c in spans]
        ctx = AttentionContext(
            kv_caches=self.kv_caches,
            slot_mapping=slot_mapping,
            num_decodes=nd,
            block_tables=block_tables,
            context_lens=context_lens,
            prefills=prefills,
            layer_hook=layer_hook,
            decode_mirror=mirror,
        )
        return input_ids, positions, ctx

    @torch.inference_mode()
    def run(self, batch: Batch, rows: list[int], layer_hook: LayerHook | None = None) -> torch.Tensor:
        """Runs the batch; returns float32 logits of the flat-batch rows asked for."""
        n = len(batch)
        if self.graphs and batch.num_decodes == n and layer_hook is None and n <= max(self.graphs):
            return self._replay(batch)  # a decode-only batch samples every row, in order
        input_ids, positions, ctx = self.prepare(batch, layer_hook)
        hidden = self.model(input_ids, positions, ctx)
        if not rows:  # every chunk in the batch is a partial prefill
            return hidden.new_empty(0, dtype=torch.float32)
        if len(rows) == hidden.shape[0]:  # rows are increasing: all of them, in order
            return self.model.compute_logits(hidden)
        index, = self._upload(np.array(rows, dtype=np.int64))
        return self.model.compute_logits(hidden.index_select(0, index))

    # CUDA graphs: static input buffers sized for the largest batch; each graph reads a prefix and
    # writes the logits of every row. One pinned host buffer carries a step's inputs in one copy;
    # the block tables are gathered on the device from the persistent ones.

    def _capture_graphs(self, max_bs: int) -> None:
        dev = self.device
        self.g_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.g_pos = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.g_slots = torch.full((max_bs,), -1, dtype=torch.int64, device=dev)
        self.g_tables = torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.g_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.g_host = torch.zeros(5 * max_bs, dtype=torch.int64).pin_memory()
        sizes = graph_sizes(max_bs)

        def run(bs: int) -> torch.Tensor:
            ctx = AttentionContext(self.kv_caches, self.g_slots[:bs], bs, self.g_tables[:bs], self.g_lens[:bs])
            return self.model.compute_logits(self.model(self.g_ids[:bs], self.g_pos[:bs], ctx))

        with torch.inference_mode():
            self.graphs, self.g_out, self.capture_stream = capture_ladder(torch.cuda, dev, sizes, run)

    def _replay(self, batch: Batch) -> torch.Tensor:
        n = len(batch)
        bs = min(b for b in self.graphs if b >= n)
        ids, pos, slots, rows, width, _ = self._decode_inputs(batch.seqs)
        # Safe to refill every step: the step ends in a sync (the sampled ids come to the host).
        # Padding rows: token 0 at position 0, stored nowhere (slot -1), one token of context.
        host = self.g_host[: 5 * bs].view(5, bs)
        h = host.numpy()
        for i, (real, pad) in enumerate(((ids, 0), (pos, 0), (slots, -1), (pos + 1, 1), (rows, 0))):
            h[i, :n], h[i, n:] = real, pad
        dev = host.to(self.device, non_blocking=True)
        self.g_ids[:bs].copy_(dev[0])
        self.g_pos[:bs].copy_(dev[1])
        self.g_slots[:bs].copy_(dev[2])
        self.g_lens[:bs].copy_(dev[3])
        # Padding rows and columns past `width` keep older entries, valid block ids or -1: never
        # read, every read is below context_len (and a padding row reads one slot of a real block).
        self.g_tables[:n, :width].copy_(self.tables.table[:, :width].index_select(0, dev[4, :n]))
        self.graphs[bs].replay()
        return self.g_out[bs][:n]
