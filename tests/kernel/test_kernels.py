"""Triton kernels against their torch references, on CPU under the Triton interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: @triton.jit reads it when it decorates

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from splitnode.kernels import kv_pack, paged_attention, prefill_attention, store_kv  # noqa: E402

if not isinstance(store_kv._store_kv_kernel, InterpretedFunction):
    # triton decides at import and @jit time; a module collected earlier imported it first.
    pytest.fail(
        "triton was imported before TRITON_INTERPRET=1 was set: set it in the environment "
        "(or in tests/conftest.py) to run the kernel tests on CPU", pytrace=False,
    )

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, g=None) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


# ---------------------------------------------------------------- store_kv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(1, 32, 16), (2, 64, 8), (3, 128, 16)])
def test_store_kv_triton_writes_each_row_at_its_slot_and_skips_minus_one(dtype, num_kv_heads, head_dim, block_size):
    g = _gen(0)
    num_blocks, n = 7, 13
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n]
    slots[[2, 5, 11]] = -1
    key = _randn(n, num_kv_heads, head_dim, dtype=dtype, g=g)
    value = _randn(n, num_kv_heads, head_dim, dtype=dtype, g=g)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, 7.0, dtype=dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    store_kv.store_kv_triton(key, value, k_cache, v_cache, slots)
    store_kv.store_kv_ref(key, value, k_ref, v_ref, slots)

    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0)
    kept = slots[slots >= 0]
    flat_k, flat_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat_k[kept], key[slots >= 0]) and torch.equal(flat_v[kept], value[slots >= 0])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[kept] = False
    assert flat_k[untouched].isnan().all() and (flat_v[untouched] == 7.0).all()


def test_store_kv_triton_reads_strided_rows_of_a_fused_qkv_buffer_and_int32_slots():
    g = _gen(1)
    n, heads, kv_heads, d, block_size = 5, 4, 2, 32, 16
    qkv = _randn(n, (heads + 2 * kv_heads) * d, g=g)
    key = qkv[:, heads * d:(heads + kv_heads) * d].view(n, kv_heads, d)
    value = qkv[:, (heads + kv_heads) * d:].view(n, kv_heads, d)
    assert not key.is_contiguous()
    slots = torch.tensor([17, 3, -1, 40, 0], dtype=torch.int32)
    k_cache = torch.full((3, block_size, kv_heads, d), -1.0)
    v_cache = torch.full_like(k_cache, -1.0)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    store_kv.store_kv_triton(key, value, k_cache, v_cache, slots)
    store_kv.store_kv_ref(key, value, k_ref, v_ref, slots.long())

    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


# ---------------------------------------------------------------- paged decode attention


def _paged_case(g, batch, num_heads, num_kv_heads, head_dim, block_size, context_lens, dtype, extra_columns=2):
    """Random caches and per-sequence tables of distinct, shuffled block ids, -1 padded with extra
    columns past the longest context. Every cache slot that no context covers is NaN in the
    poisoned copy, so a kernel that reads past a context or into a hole cannot match."""
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    max_blocks = max(blocks_per_seq) + extra_columns
    num_blocks = sum(blocks_per_seq) + 3
    ids = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.full((batch, max_blocks), -1, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = _randn(*shape, dtype=dtype, g=g), _randn(*shape, dtype=dtype, g=g)
    live = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for i, (n, nb) in enumerate(zip(context_lens, blocks_per_seq)):
        mine = [ids.pop() for _ in range(nb)]
        tables[i, :nb] = torch.tensor(mine, dtype=torch.int32)
        live.view(-1)[(torch.tensor(mine)[:, None] * block_size + torch.arange(block_size)).view(-1)[:n]] = True
    k_poisoned, v_poisoned = k_cache.clone(), v_cache.clone()
    k_poisoned[~live] = float("nan")
    v_poisoned[~live] = float("nan")
    q = _randn(batch, num_heads, head_dim, dtype=dtype, g=g)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return q, k_cache, v_cache, k_poisoned, v_poisoned, tables, lens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_triton_matches_reference_across_gqa_groups_and_splits(dtype, group, num_splits):
    g = _gen(2)
    num_kv_heads, head_dim, block_size = 2, 64, 16
    context_lens = [1, 37, 16, 70, 5]  # odd batch; one token; exactly one block; ragged tails
    q, k, v, k_bad, v_bad, tables, lens = _paged_case(
        g, 5, num_kv_heads * group, num_kv_heads, head_dim, block_size, context_lens, dtype
    )
    scale = head_dim**-0.5

    out = paged_attention.paged_decode_attention_triton(q, k_bad, v_bad, tables, lens, scale, num_splits=num_splits)
    ref = paged_attention.paged_decode_attention_ref(q, k, v, tables, lens, scale)

    assert out.dtype == dtype and out.shape == q.shape
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("head_dim,block_size", [(32, 8), (128, 16), (64, 32)])
def test_paged_decode_triton_handles_each_head_dim_and_block_size(head_dim, block_size):
    g = _gen(3)
    q, k, v, k_bad, v_bad, tables, lens = _paged_case(
        g, 3, 4, 1, head_dim, block_size, [block_size * 3 + 1, 2, 19], torch.float16
    )
    scale = 0.3
    out = paged_attention.paged_decode_attention_triton(q, k_bad, v_bad, tables, lens, scale, num_splits=2)
    ref = paged_attention.paged_decode_attention_ref(q, k, v, tables, lens, scale)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-3)


def test_paged_decode_triton_with_more_splits_than_context_leaves_empty_splits_harmless():
    g = _gen(4)
    q, k, v, k_bad, v_bad, tables, lens = _paged_case(g, 2, 2, 2, 32, 16, [3, 20], torch.float32, extra_columns=6)
    out = paged_attention.paged_decode_attention_triton(q, k_bad, v_bad, tables, lens, 1.0, num_splits=8)
    ref = paged_attention.paged_decode_attention_ref(q, k, v, tables, lens, 1.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_paged_decode_triton_reads_strided_q_and_gives_zeros_for_an_empty_context():
    g = _gen(5)
    heads, kv_heads, d = 4, 2, 32
    q_, k, v, _, _, tables, lens = _paged_case(g, 3, heads, kv_heads, d, 16, [9, 1, 30], torch.float32)
    fused = _randn(3, (heads + 2 * kv_heads) * d, g=g)
    q = fused[:, : heads * d].view(3, heads, d)
    assert not q.is_contiguous()
    out = paged_attention.paged_decode_attention_triton(q, k, v, tables, lens, 0.2)
    ref = paged_attention.paged_decode_attention_ref(q, k, v, tables, lens, 0.2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    empty = paged_attention.paged_decode_attention_triton(q, k, v, tables, torch.tensor([9, 0, 30], dtype=torch.int32), 0.2)
    assert torch.equal(empty[1], torch.zeros_like(empty[1]))
    torch.testing.assert_close(empty[[0, 2]], ref[[0, 2]], rtol=1e-5, atol=1e-5)


def test_paged_decode_splits_each_context_by_its_own_length_not_the_table_width():
    """K1: under CUDA graphs the table is max_model_len wide (here 128K positions). Each context is
    cut over the splits by its own length (whole tiles, at least _MIN_SPLIT_LEN each): a
    1,000-token context keeps 4 of 8 splits busy, a 3,000-token one all 8. Sized from the width
    (16K positions a split) both sat in split 0 with the rest idle. The result still matches the
    reference, written into a given `out` with strided rows."""
    g = _gen(10)
    q, k, v, k_bad, v_bad, tables, lens = _paged_case(g, 2, 4, 2, 32, 16, [1000, 3000], torch.float32)
    wide = torch.full((2, 131072 // 16), -1, dtype=torch.int32)
    wide[:, :tables.shape[1]] = tables
    _, _, sums = paged_attention._decode_launch(q, k_bad, v_bad, wide, lens, 0.3, 8, None)  # acc, max, sum
    assert (sums > 0).sum(-1).tolist() == [[4] * 4, [8] * 4]  # busy splits per (sequence, head)
    buf = torch.full((2, 3, 4, 32), float("nan"))
    out = buf[:, 1]
    paged_attention.paged_decode_attention_triton(q, k_bad, v_bad, wide, lens, 0.3, num_splits=8, out=out)
    torch.testing.assert_close(out, paged_attention.paged_decode_attention_ref(q, k, v, tables, lens, 0.3),
                               rtol=1e-5, atol=1e-5)
    assert buf[:, [0, 2]].isnan().all()  # only out's rows written
    one = torch.full_like(q, float("nan"))
    paged_attention.paged_decode_attention_triton(q, k_bad, v_bad, wide, lens, 0.3, num_splits=1, out=one)
    torch.testing.assert_close(one, out, rtol=1e-5, atol=1e-5)


def test_paged_decode_reference_matches_dense_attention_per_sequence():
    """The oracle itself: each sequence's context gathered by hand, softmax in float64."""
    g = _gen(6)
    heads, kv_heads, d, block_size = 6, 3, 32, 8
    q, k, v, _, _, tables, lens = _paged_case(g, 3, heads, kv_heads, d, block_size, [11, 1, 24], torch.float32)
    out = paged_attention.paged_decode_attention_ref(q, k, v, tables, lens, 0.5)
    for i, n in enumerate(lens.tolist()):
        slots = [int(tables[i, p // block_size]) * block_size + p % block_size for p in range(n)]
        ks = k.view(-1, kv_heads, d)[slots].double().repeat_interleave(heads // kv_heads, dim=1)  # [n, H, D]
        vs = v.view(-1, kv_heads, d)[slots].double().repeat_interleave(heads // kv_heads, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[i].double(), ks) * 0.5, dim=-1)
        torch.testing.assert_close(out[i].double(), torch.einsum("hn,nhd->hd", p, vs), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- paged prefill attention


def _prefill_case(g, chunks, num_heads, num_kv_heads, head_dim, block_size, dtype, lead_rows=2):
    """Chunks (q_len, ctx_len) of a flat batch after `lead_rows` decode rows; every context's
    positions at shuffled slots of one pool. Slots no context covers are NaN in the poisoned copy."""
    num_slots = sum(c for _, c in chunks) + 3 * block_size
    num_blocks = num_slots // block_size
    perm = torch.randperm(num_blocks * block_size, generator=g)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k, v = _randn(*shape, dtype=dtype, g=g), _randn(*shape, dtype=dtype, g=g)
    meta, slots, row, start = [], [], lead_rows, 0
    for q_len, ctx_len in chunks:
        meta.append((row, q_len, start, ctx_len))
        slots.append(perm[start:start + ctx_len])
        row, start = row + q_len, start + ctx_len
    slots = torch.cat(slots)
    live = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    live[slots] = True
    k_bad, v_bad = k.clone(), v.clone()
    k_bad.view(-1, num_kv_heads, head_dim)[~live] = float("nan")
    v_bad.view(-1, num_kv_heads, head_dim)[~live] = float("nan")
    q = _randn(row, num_heads, head_dim, dtype=dtype, g=g)
    return q, k, v, k_bad, v_bad, slots, torch.tensor(meta, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 32), (6, 2, 24), (8, 1, 64)])
def test_paged_prefill_triton_matches_reference_over_whole_prompts_and_later_chunks(dtype, heads, kv_heads, head_dim):
    """K3: one launch over chunks of every shape: a whole prompt longer than a tile, a later chunk
    (ctx > q), a one-token chunk, a one-token prompt; GQA groups of 1, 3 and 8; a head_dim that
    is not a power of two. Rows that are not prefill rows (the decodes before) stay untouched."""
    g = _gen(11)
    chunks = [(70, 70), (13, 50), (1, 29), (1, 1), (33, 33)]
    q, k, v, k_bad, v_bad, slots, meta = _prefill_case(g, chunks, heads, kv_heads, head_dim, 8, dtype)
    out = torch.full_like(q, float("nan"))
    prefill_attention.paged_prefill_attention_triton(q, k_bad, v_bad, slots, meta, 70, head_dim**-0.5, out)
    ref = torch.full_like(q, float("nan"))
    prefill_attention.paged_prefill_attention_ref(q, k, v, slots, meta, head_dim**-0.5, ref)
    assert out[:2].isnan().all() and not out[2:].isnan().any()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out[2:].float(), ref[2:].float(), rtol=tol, atol=tol)


def test_paged_prefill_triton_reads_strided_q_of_a_fused_qkv_buffer():
    g = _gen(12)
    heads, kv_heads, d = 4, 2, 32
    _, k, v, _, _, slots, meta = _prefill_case(g, [(9, 9), (5, 20)], heads, kv_heads, d, 16, torch.float32, lead_rows=0)
    qkv = _randn(14, (heads + 2 * kv_heads) * d, g=g)
    q = qkv[:, :heads * d].view(14, heads, d)
    out = torch.empty(14, heads, d)
    prefill_attention.paged_prefill_attention_triton(q, k, v, slots, meta, 9, 0.2, out)
    ref = torch.empty_like(out)
    prefill_attention.paged_prefill_attention_ref(q.contiguous(), k, v, slots, meta, 0.2, ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_paged_prefill_reference_matches_dense_causal_attention():
    """The oracle: each chunk's queries against its context by hand, float64, the mask lower-right."""
    g = _gen(13)
    heads, kv_heads, d = 6, 3, 16
    q, k, v, _, _, slots, meta = _prefill_case(g, [(4, 11), (7, 7)], heads, kv_heads, d, 8, torch.float32)
    out = torch.zeros_like(q)
    prefill_attention.paged_prefill_attention_ref(q, k, v, slots, meta, 0.4, out)
    for q_start, q_len, k_start, ctx_len in meta.tolist():
        s = slots[k_start:k_start + ctx_len]
        ks = k.view(-1, kv_heads, d)[s].double().repeat_interleave(heads // kv_heads, dim=1)  # [L, H, D]
        vs = v.view(-1, kv_heads, d)[s].double().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q_start:q_start + q_len].double(), ks) * 0.4
        seen = torch.arange(ctx_len)[None, :] <= (ctx_len - q_len + torch.arange(q_len))[:, None]
        p = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        torch.testing.assert_close(out[q_start:q_start + q_len].double(), torch.einsum("hqk,khd->qhd", p, vs),
                                   rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- kv_pack / kv_unpack


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 32, 16), (3, 64, 8)])
def test_kv_pack_then_unpack_moves_exactly_the_listed_blocks(dtype, index_dtype, num_kv_heads, head_dim, block_size):
    g = _gen(7)
    src_blocks, dst_blocks, n = 11, 9, 5
    shape = (src_blocks, block_size, num_kv_heads, head_dim)
    k_src, v_src = _randn(*shape, dtype=dtype, g=g), _randn(*shape, dtype=dtype, g=g)
    src_ids = torch.tensor([9, 2, 7, 0, 4]).to(index_dtype)
    dst_ids = torch.tensor([3, 8, 0, 5, 1]).to(index_dtype)

    staging = torch.full((2, n, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    staging_ref = staging.clone()
    kv_pack.kv_pack_triton(k_src, v_src, src_ids, staging)
    kv_pack.kv_pack_ref(k_src, v_src, src_ids.long(), staging_ref)
    assert torch.equal(staging, staging_ref)
    assert torch.equal(staging[0, 1], k_src[2]) and torch.equal(staging[1, 4], v_src[4])

    dst_shape = (dst_blocks, *shape[1:])
    k_dst = torch.full(dst_shape, float("nan"), dtype=dtype)
    v_dst = torch.full(dst_shape, 5.0, dtype=dtype)
    k_dst_ref, v_dst_ref = k_dst.clone(), v_dst.clone()
    kv_pack.kv_unpack_triton(staging, k_dst, v_dst, dst_ids)
    kv_pack.kv_unpack_ref(staging, k_dst_ref, v_dst_ref, dst_ids.long())
    torch.testing.assert_close(k_dst, k_dst_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(v_dst, v_dst_ref)
    assert torch.equal(k_dst[dst_ids.long()], k_src[src_ids.long()])
    assert torch.equal(v_dst[dst_ids.long()], v_src[src_ids.long()])
    untouched = [b for b in range(dst_blocks) if b not in dst_ids.tolist()]
    assert k_dst[untouched].isnan().all() and (v_dst[untouched] == 5.0).all()


def test_kv_pack_triton_handles_a_block_larger_than_one_program_chunk():
    g = _gen(8)
    shape = (4, 16, 3, 128)  # 6144 elements a block: two programs, the second one masked
    k, v = _randn(*shape, g=g), _randn(*shape, g=g)
    ids = torch.tensor([3, 1, 2])
    out = torch.full((2, 3, *shape[1:]), float("nan"))
    kv_pack.kv_pack_triton(k, v, ids, out)
    assert torch.equal(out[0], k[ids]) and torch.equal(out[1], v[ids])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_kv_pack_all_then_unpack_all_moves_every_layer_of_the_listed_blocks(dtype, index_dtype):
    """The whole-sequence move: one launch over every layer's K and V planes."""
    g = _gen(10)
    layers, block_size, num_kv_heads, head_dim = 3, 8, 2, 32
    src = _randn(2, layers, 10, block_size, num_kv_heads, head_dim, dtype=dtype, g=g)
    src_ids = torch.tensor([7, 0, 4, 9]).to(index_dtype)
    dst_ids = torch.tensor([2, 5, 0, 6]).to(index_dtype)
    staging = torch.full((2, layers, 4, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    staging_ref = staging.clone()
    kv_pack.kv_pack_all_triton(src, src_ids, staging)
    kv_pack.kv_pack_all_ref(src, src_ids.long(), staging_ref)
    assert torch.equal(staging, staging_ref)
    assert torch.equal(staging[1, 2, 3], src[1, 2, 9])  # V of the last layer, fourth block

    dst = torch.full((2, layers, 8, block_size, num_kv_heads, head_dim), 5.0, dtype=dtype)
    dst_ref = dst.clone()
    kv_pack.kv_unpack_all_triton(staging, dst, dst_ids)
    kv_pack.kv_unpack_all_ref(staging, dst_ref, dst_ids.long())
    assert torch.equal(dst, dst_ref)
    assert torch.equal(dst[:, :, dst_ids.long()], src[:, :, src_ids.long()])
    untouched = [b for b in range(8) if b not in dst_ids.tolist()]
    assert (dst[:, :, untouched] == 5.0).all()


# ---------------------------------------------------------------- dispatch


def test_dispatch_on_cpu_tensors_uses_the_reference():
    g = _gen(9)
    q, k, v, _, _, tables, lens = _paged_case(g, 2, 4, 2, 32, 16, [5, 17], torch.float32)
    assert torch.equal(
        paged_attention.paged_decode_attention(q, k, v, tables, lens, 0.1),
        paged_attention.paged_decode_attention_ref(q, k, v, tables, lens, 0.1),
    )
    key, value = _randn(2, 2, 32, g=g), _randn(2, 2, 32, g=g)
    slots = torch.tensor([4, -1])
    store_kv.store_kv(key, value, k, v, slots)
    assert torch.equal(k.view(-1, 2, 32)[4], key[0])
    out = torch.empty(2, 1, *k.shape[1:])
    kv_pack.kv_pack(k, v, torch.tensor([0]), out)
    assert torch.equal(out[0, 0], k[0])
