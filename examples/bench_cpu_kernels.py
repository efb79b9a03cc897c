"""The CPU's C kernels (kernels/cpu.c) against the torch paths they replace, one operation at a
time, at the shapes of `splitnode bench --random-model` (8 query heads, 2 KV heads of 64, hidden
512, intermediate 1408): decode attention over 8 layers' caches against the decode mirror's SDPA,
prefill attention against the tiled GEMMs, and the fused elementwise ops against their references.

    python examples/bench_cpu_kernels.py [--dtype bfloat16]

Each figure is the best and the median of 10-20 runs after a warm-up, in milliseconds.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
import torch.nn.functional as F

from splitnode.kernels import cpu, fused

attention = importlib.import_module("splitnode.model.attention")


def timed(fn, *args, n: int = 20) -> str:
    for _ in range(3):
        fn(*args)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t0)
    return f"{min(ts) * 1e3:7.3f} / {statistics.median(ts) * 1e3:7.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--context", type=int, default=432, help="decode: the longest context (default: %(default)s)")
    args = ap.parse_args()
    if cpu.lib() is None:
        raise SystemExit("bench_cpu_kernels: the CPU kernels could not be built here (see the warning above)")
    dt = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"{args.dtype}, {torch.get_num_threads()} threads; best / median")

    b, length, layers, bs = 32, args.context, 8, 16  # decode: 32 sequences, 8 layers' caches (not all in cache)
    per = -(-length // bs)
    blocks = b * per + 8
    kcs = [torch.randn(blocks, bs, 2, 64).to(dt) for _ in range(layers)]
    vcs = [torch.randn(blocks, bs, 2, 64).to(dt) for _ in range(layers)]
    lens = torch.randint(8, length, (b,), dtype=torch.int32)
    lens[0] = length
    tables = torch.randperm(blocks)[:b * per].view(b, per).to(torch.int32)
    q = torch.randn(b, 8, 64).to(dt)
    mirrors = [(torch.randn(b, 2, length, 64).to(dt), torch.randn(b, 2, length, 64).to(dt)) for _ in range(layers)]
    visible = (torch.arange(length)[None, :] < lens[:, None])[:, None, None, :]
    qg = q.view(b, 2, 4, 64)
    print(f"decode attention, {b} x up to {length} tokens, {layers} layers")
    print("  C over the paged cache   ", timed(lambda: [cpu.paged_decode_attention(q, kc, vc, tables, lens, 0.125)
                                                        for kc, vc in zip(kcs, vcs)]))
    print("  decode mirror (SDPA)     ", timed(lambda: [F.scaled_dot_product_attention(qg, km, vm, attn_mask=visible,
                                                                                        scale=0.125)
                                                        for km, vm in mirrors]))

    for n in (200, 400, 1000):
        q1, k1, v1 = torch.randn(n, 8, 64).to(dt), torch.randn(n, 2, 64).to(dt), torch.randn(n, 2, 64).to(dt)
        out = torch.empty(n, 8, 64, dtype=dt)
        print(f"prefill attention, one prompt of {n}")
        print("  C flash attention        ", timed(cpu.prefill_attention, q1, k1, v1, 0.125, out, n=10))
        print("  tiled GEMMs (torch)      ", timed(attention._causal_attention_cpu, q1, k1, v1, 0.125, n=10))

    for t in (32, 2048):
        x, r, w = torch.randn(t, 512).to(dt), torch.randn(t, 512).to(dt), torch.ones(512).to(dt)
        qkv = torch.randn(t, 768).to(dt)
        qv, kv = qkv[:, :512].view(t, 8, 64), qkv[:, 512:640].view(t, 2, 64)
        cos, sin = torch.randn(t, 64).to(dt), torch.randn(t, 64).to(dt)
        gu = torch.randn(t, 2816).to(dt)
        print(f"elementwise, {t} tokens: C, then the torch reference")
        print("  add+RMSNorm              ", timed(cpu.rms_norm, x, w, 1e-6, r), "  ",
              timed(fused.add_rms_norm_ref, x, r, w, 1e-6))
        print("  rotary q and k           ", timed(cpu.rotary_qk_, qv, kv, cos, sin), "  ",
              timed(fused.rotary_qk_ref, qv.clone(), kv.clone(), cos, sin))
        print("  SiLU-and-mul             ", timed(cpu.silu_and_mul, gu), "  ",
              timed(fused.silu_and_mul_ref, gu))


if __name__ == "__main__":
    main()
