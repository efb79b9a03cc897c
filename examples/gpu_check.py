"""Check splitnode's Triton kernels on a CUDA GPU: correctness against the torch references at
Llama-3-8B-like sizes, then decode-attention and KV pack/unpack bandwidth against a plain
device-to-device copy, the fused layer kernels (add+RMSNorm, q/k norm and rotary, SiLU-and-mul)
against the unfused torch ops they replace, and the one-launch paged prefill attention (K3) against
the loop of one SDPA per sequence it replaced.

    PYTHONPATH=. python examples/gpu_check.py

Needs only torch and triton. Prints "no CUDA" and exits 0 on a machine without a GPU; exits 1 if
a kernel disagrees with its reference.
"""

from __future__ import annotations

import pathlib
import sys

import torch

# Import the kernels from this checkout's kernels/ folder (what setuptools installs as
# splitnode.kernels), so the script runs without `pip install -e .` and without importing the
# rest of splitnode and its dependencies.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from kernels import fused  # noqa: E402
from kernels.kv_pack import kv_pack_ref, kv_pack_triton, kv_unpack_ref, kv_unpack_triton  # noqa: E402
from kernels.paged_attention import paged_decode_attention_ref, paged_decode_attention_triton  # noqa: E402
from kernels.prefill_attention import paged_prefill_attention_ref, paged_prefill_attention_triton  # noqa: E402
from kernels.store_kv import store_kv_ref, store_kv_triton  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16  # Llama-3-8B
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
failures: list[str] = []


def report(name: str, err: float, tol: float) -> None:
    ok = err <= tol
    print(f"  {name:<58} max abs err {err:.2e}  (tol {tol:.0e})  {'ok' if ok else 'MISMATCH'}")
    if not ok:
        failures.append(name)


def make_pool(context_lens: list[int], dtype: torch.dtype, dev: str, spare_blocks: int = 64):
    """Caches with every sequence's blocks scattered through the pool; tables -1 padded."""
    blocks = [-(-n // BLOCK_SIZE) for n in context_lens]
    num_blocks = sum(blocks) + spare_blocks
    ids = torch.randperm(num_blocks, device=dev)
    tables = torch.full((len(context_lens), max(blocks) + 1), -1, dtype=torch.int32, device=dev)
    start = 0
    for i, nb in enumerate(blocks):
        tables[i, :nb] = ids[start:start + nb].int()
        start += nb
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k = torch.randn(shape, device=dev, dtype=dtype)
    v = torch.randn(shape, device=dev, dtype=dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=dev)
    return k, v, tables, lens


def random_lens(batch: int, low: int, high: int, gen: torch.Generator) -> list[int]:
    lens = torch.randint(low, high + 1, (batch,), generator=gen).tolist()
    lens[0] = high  # the longest context is always present
    return lens


def check_attention(dev: str, gen: torch.Generator) -> None:
    print("paged_decode_attention_triton vs reference")
    cases = [
        ("bf16 B=64 ctx 1..4096", torch.bfloat16, 64, 1, 4096, None),
        ("bf16 B=64 ctx 1..4096 one split", torch.bfloat16, 64, 1, 4096, 1),
        ("bf16 B=3 ctx 3000..4096 (split context)", torch.bfloat16, 3, 3000, 4096, None),
        ("fp16 B=17 ctx 1..2049", torch.float16, 17, 1, 2049, None),
        ("fp32 B=9 ctx 1..1000", torch.float32, 9, 1, 1000, None),
        ("bf16 B=8 ctx 1..4096, table 128K wide (graphs, K1)", torch.bfloat16, 8, 1, 4096, "wide"),
    ]
    for name, dtype, batch, low, high, splits in cases:
        k, v, tables, lens = make_pool(random_lens(batch, low, high, gen), dtype, dev)
        if splits == "wide":  # as under CUDA graphs: max_model_len wide, the splits sized from each context
            wide = torch.full((batch, 131072 // BLOCK_SIZE), -1, dtype=torch.int32, device=dev)
            wide[:, :tables.shape[1]] = tables
            tables, splits = wide, None
        q = torch.randn(batch, HEADS, HEAD_DIM, device=dev, dtype=dtype)
        scale = HEAD_DIM**-0.5
        out = paged_decode_attention_triton(q, k, v, tables, lens, scale, num_splits=splits)
        ref = paged_decode_attention_ref(q, k, v, tables, lens, scale)
        report(name, (out.float() - ref.float()).abs().max().item(), TOL[dtype])
        del k, v, out, ref


def check_store(dev: str) -> None:
    print("store_kv_triton vs reference")
    for dtype in (torch.bfloat16, torch.float32):
        num_blocks, n = 4096, 4099
        shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        k_cache = torch.full(shape, float("nan"), device=dev, dtype=dtype)
        v_cache = torch.full(shape, float("nan"), device=dev, dtype=dtype)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        slots = torch.randperm(num_blocks * BLOCK_SIZE, device=dev)[:n]
        slots[::7] = -1
        key = torch.randn(n, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
        value = torch.randn(n, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
        store_kv_triton(key, value, k_cache, v_cache, slots)
        store_kv_ref(key, value, k_ref, v_ref, slots)
        same = torch.equal(k_cache.nan_to_num(7.0), k_ref.nan_to_num(7.0)) and torch.equal(
            v_cache.nan_to_num(7.0), v_ref.nan_to_num(7.0))
        report(f"{str(dtype)[6:]} {n} rows, every 7th skipped (exact)", 0.0 if same else float("inf"), 0.0)


def check_pack(dev: str) -> None:
    print("kv_pack_triton / kv_unpack_triton vs reference")
    dtype, num_blocks, n = torch.bfloat16, 8192, 257
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k, v = torch.randn(shape, device=dev, dtype=dtype), torch.randn(shape, device=dev, dtype=dtype)
    ids = torch.randperm(num_blocks, device=dev)[:n]
    out = torch.full((2, n, *shape[1:]), float("nan"), device=dev, dtype=dtype)
    out_ref = torch.empty_like(out)
    kv_pack_triton(k, v, ids, out)
    kv_pack_ref(k, v, ids, out_ref)
    report(f"pack {n} blocks (exact)", 0.0 if torch.equal(out, out_ref) else float("inf"), 0.0)
    k2, v2 = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    k2_ref, v2_ref = k2.clone(), v2.clone()
    dst = torch.randperm(num_blocks, device=dev)[:n]
    kv_unpack_triton(out, k2, v2, dst)
    kv_unpack_ref(out, k2_ref, v2_ref, dst)
    same = torch.equal(k2.nan_to_num(7.0), k2_ref.nan_to_num(7.0)) and torch.equal(v2.nan_to_num(7.0), v2_ref.nan_to_num(7.0))
    report(f"unpack {n} blocks (exact)", 0.0 if same else float("inf"), 0.0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Error relative to the reference's magnitude (at least 1): one rounding of the dtype at any scale."""
    return ((a.float() - b.float()).abs() / b.float().abs().clamp(min=1)).max().item()


def check_fused(dev: str) -> None:
    print("fused layer kernels vs reference (Llama-3-8B: hidden 4096, intermediate 14336; relative error)")
    hidden, inter, tokens = 4096, 14336, 64
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(tokens, hidden, device=dev, dtype=dtype)
        r = torch.randn(tokens, hidden, device=dev, dtype=dtype)
        w = (1 + 0.1 * torch.randn(hidden, device=dev)).to(dtype)
        out, res = fused.add_rms_norm_triton(x, r, w, 1e-5)
        ref, ref_res = fused.add_rms_norm_ref(x, r, w, 1e-5)
        report(f"{str(dtype)[6:]} add+rms_norm T={tokens}", max(rel_err(out, ref), rel_err(res, ref_res)), TOL[dtype])
        qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=dev, dtype=dtype)
        ref_qkv = qkv.clone()
        pos = torch.arange(tokens, device=dev).float()[:, None] * (1e4 ** (-torch.arange(0, HEAD_DIM, 2, device=dev) / HEAD_DIM))
        cos, sin = torch.cat([pos, pos], -1).cos().to(dtype), torch.cat([pos, pos], -1).sin().to(dtype)
        views = [t[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM) for t in (qkv, ref_qkv)]
        kviews = [t[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM) for t in (qkv, ref_qkv)]
        fused.rotary_qk_triton(views[0], kviews[0], cos, sin)
        fused.rotary_qk_ref(views[1], kviews[1], cos, sin)
        report(f"{str(dtype)[6:]} rotary q+k T={tokens}", rel_err(qkv, ref_qkv), TOL[dtype])
        norms = [(1 + 0.1 * torch.randn(HEAD_DIM, device=dev)).to(dtype) for _ in range(2)]
        fused.rotary_qk_triton(views[0], kviews[0], cos, sin, *norms, 1e-6)
        fused.rotary_qk_ref(views[1], kviews[1], cos, sin, *norms, 1e-6)
        report(f"{str(dtype)[6:]} q/k norm + rotary (Qwen3) T={tokens}", rel_err(qkv, ref_qkv), TOL[dtype])
        gu = torch.randn(tokens, 2 * inter, device=dev, dtype=dtype)
        report(f"{str(dtype)[6:]} silu_and_mul T={tokens}", rel_err(fused.silu_and_mul_triton(gu), fused.silu_and_mul_ref(gu)),
               TOL[dtype])


def prefill_case(chunks: list[tuple[int, int]], dtype: torch.dtype, dev: str):
    """Chunks (q_len, ctx_len) of one flat batch, their contexts at shuffled slots of one pool:
    q, the caches, the kernel's slots and meta, and the longest chunk."""
    total = sum(c for _, c in chunks)
    num_blocks = -(-total // BLOCK_SIZE) + 8
    perm = torch.randperm(num_blocks * BLOCK_SIZE, device=dev)
    k = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    meta, row, start = [], 0, 0
    for q_len, ctx_len in chunks:
        meta.append((row, q_len, start, ctx_len))
        row, start = row + q_len, start + ctx_len
    q = torch.randn(row, HEADS, HEAD_DIM, device=dev, dtype=dtype)
    slots = perm[:total].contiguous()
    return q, k, v, slots, torch.tensor(meta, dtype=torch.int32, device=dev), max(q for q, _ in chunks)


PREFILL_CASES = [("16 prompts x 128", [(128, 128)] * 16), ("4 prompts x 512", [(512, 512)] * 4),
                 ("1 prompt x 2048", [(2048, 2048)]), ("8 chunks of 256 after 1792", [(256, 2048)] * 8),
                 ("mixed 17..1500", [(17, 17), (300, 300), (1500, 1500), (64, 900), (1, 1)])]


def check_prefill(dev: str) -> None:
    print("paged_prefill_attention_triton vs reference (one launch per batch of chunks)")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for name, chunks in PREFILL_CASES[3:]:
            q, k, v, slots, meta, max_q = prefill_case(chunks, dtype, dev)
            out, ref = torch.empty_like(q), torch.empty_like(q)
            paged_prefill_attention_triton(q, k, v, slots, meta, max_q, HEAD_DIM**-0.5, out)
            paged_prefill_attention_ref(q, k, v, slots, meta, HEAD_DIM**-0.5, ref)
            report(f"{str(dtype)[6:]} {name}", (out.float() - ref.float()).abs().max().item(), TOL[dtype])


def sdpa_loop(q, k, v, slots, meta, scale):
    """The prefill attention this kernel replaced (attention.py before K3): per sequence, its
    context gathered, K/V repeated over the GQA group, one SDPA (causal, or a boolean mask for a
    later chunk)."""
    import torch.nn.functional as F

    out = torch.empty_like(q)
    kf, vf = k.flatten(0, 1), v.flatten(0, 1)
    for q_start, q_len, k_start, ctx_len in meta.tolist():
        s = slots[k_start:k_start + ctx_len]
        ks = kf.index_select(0, s).repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(0, 1)
        vs = vf.index_select(0, s).repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(0, 1)
        qs = q[q_start:q_start + q_len].transpose(0, 1)
        if q_len == ctx_len:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        else:
            mask = torch.ones(q_len, ctx_len, dtype=torch.bool, device=q.device).tril(diagonal=ctx_len - q_len)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out[q_start:q_start + q_len] = o.transpose(0, 1)
    return out


def bench_prefill(dev: str) -> None:
    print("prefill attention, bf16, 32 q / 8 kv heads x 128: one paged launch vs the SDPA loop it replaced")
    for name, chunks in PREFILL_CASES:
        q, k, v, slots, meta, max_q = prefill_case(chunks, torch.bfloat16, dev)
        out, scale = torch.empty_like(q), HEAD_DIM**-0.5
        paged_prefill_attention_triton(q, k, v, slots, meta, max_q, scale, out)
        err = (sdpa_loop(q, k, v, slots, meta, scale).float() - out.float()).abs().max().item()
        a = bench_ms(lambda: paged_prefill_attention_triton(q, k, v, slots, meta, max_q, scale, out))
        b = bench_ms(lambda: sdpa_loop(q, k, v, slots, meta, scale))
        flops = sum(4 * ql * (cl - ql / 2) * HEADS * HEAD_DIM for ql, cl in chunks)
        print(f"  {name:<28} one launch {a * 1e3:8.1f} us ({flops / a / 1e9:5.0f} TFLOP/s)   loop {b * 1e3:8.1f} us"
              f"   ({b / a:4.1f}x)   max |diff| {err:.1e}")


def bench_fused(dev: str) -> None:
    print("fused layer kernels vs the unfused torch ops, bf16, decode batch of 64 rows")
    dtype, tokens, hidden, inter = torch.bfloat16, 64, 4096, 14336
    x, r = torch.randn(tokens, hidden, device=dev, dtype=dtype), torch.randn(tokens, hidden, device=dev, dtype=dtype)
    w = torch.ones(hidden, device=dev, dtype=dtype)
    gu = torch.randn(tokens, 2 * inter, device=dev, dtype=dtype)
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=dev, dtype=dtype)
    q = qkv[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
    cos = sin = torch.ones(tokens, HEAD_DIM, device=dev, dtype=dtype)
    for name, ours, theirs in [
        ("add+rms_norm", lambda: fused.add_rms_norm_triton(x, r, w, 1e-5), lambda: fused.add_rms_norm_ref(x, r, w, 1e-5)),
        ("rotary q+k", lambda: fused.rotary_qk_triton(q, k, cos, sin), lambda: fused.rotary_qk_ref(q, k, cos, sin)),
        ("silu_and_mul", lambda: fused.silu_and_mul_triton(gu), lambda: fused.silu_and_mul_ref(gu)),
    ]:
        a, b = bench_ms(ours), bench_ms(theirs)
        print(f"  {name:<14} fused {a * 1e3:7.1f} us   torch ops {b * 1e3:7.1f} us   ({b / a:4.1f}x)")


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_rate(dev: str) -> float:
    """Device-to-device copy of a 1 GiB buffer, in GB/s counting bytes read plus bytes written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def bench_attention(dev: str, gen: torch.Generator, copy_gbs: float) -> None:
    print("paged_decode_attention_triton bandwidth (K/V bytes read; ratio to copy read+write rate)")
    dtype = torch.bfloat16
    for batch, low, high in [(64, 1, 4096), (64, 4096, 4096), (256, 512, 1024), (8, 4096, 4096), (1, 4096, 4096)]:
        lens = random_lens(batch, low, high, gen)
        k, v, tables, lens_t = make_pool(lens, dtype, dev)
        q = torch.randn(batch, HEADS, HEAD_DIM, device=dev, dtype=dtype)
        ms = bench_ms(lambda k=k, v=v: paged_decode_attention_triton(q, k, v, tables, lens_t, HEAD_DIM**-0.5))
        kv_bytes = 2 * sum(lens) * KV_HEADS * HEAD_DIM * k.element_size()
        gbs = kv_bytes / ms / 1e6
        print(f"  B={batch:<4} ctx {low}..{high:<5} {ms * 1e3:8.1f} us  {gbs:7.0f} GB/s  {gbs / copy_gbs:5.2f}x copy")
        del k, v


def bench_pack(dev: str, copy_gbs: float) -> None:
    print("kv_pack / kv_unpack bandwidth (bytes read + written; ratio to copy)")
    dtype, num_blocks = torch.bfloat16, 16384
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k, v = torch.randn(shape, device=dev, dtype=dtype), torch.randn(shape, device=dev, dtype=dtype)
    for n in (32, 256, 4096):  # one layer of a 512-, 4096- and 64K-token prompt
        ids = torch.randperm(num_blocks, device=dev)[:n]
        staging = torch.empty((2, n, *shape[1:]), device=dev, dtype=dtype)
        moved = 2 * staging.numel() * staging.element_size()
        for name, fn in [
            ("pack", lambda: kv_pack_triton(k, v, ids, staging)),
            ("unpack", lambda: kv_unpack_triton(staging, k, v, ids)),
        ]:
            ms = bench_ms(fn)
            gbs = moved / ms / 1e6
            print(f"  {name:<6} {n:5} blocks ({staging.numel() * 2 / 2**20:6.1f} MiB) {ms * 1e3:8.1f} us"
                  f"  {gbs:7.0f} GB/s  {gbs / copy_gbs:5.2f}x copy")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA: nothing to check")
        return 0
    dev = "cuda"
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    check_attention(dev, gen)
    check_store(dev)
    check_pack(dev)
    check_fused(dev)
    check_prefill(dev)
    torch.cuda.empty_cache()
    copy_gbs = copy_rate(dev)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    bench_attention(dev, gen, copy_gbs)
    bench_pack(dev, copy_gbs)
    bench_fused(dev)
    bench_prefill(dev)
    if failures:
        print(f"FAILED: {', '.join(failures)}")
        return 1
    print("all kernels match their references")
    return 0


if __name__ == "__main__":
    sys.exit(main())
