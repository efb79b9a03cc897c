"""The CPU kernels of kernels/cpu.c: decode and prefill attention, the layer's fused elementwise
work (add+RMSNorm, q/k rotary in place, SiLU-and-mul), float32 and bfloat16; and the sampler's
argmax and draws over float32 logits.

Torch's CPU ops run each elementwise step as its own pass over memory with its own OpenMP
fork/join, and have no attention kernel for a decode's few query rows over a paged cache (SDPA's
flash kernel runs at a third of the copy bandwidth there). vLLM's CPU build ships C++ kernels for
both; these are ours, in plain C: built with the system's C compiler on first use (about a second)
into the user's cache, keyed by the source, the compiler and the CPU's flags, and loaded with
ctypes. No compiler, a failed build or SPLITNODE_CPU_KERNELS=0: `lib()` is None and the model
takes the torch references (kernels/fused.py, the decode mirror), which stay the exact contract the
tests hold these kernels to.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("splitnode")

SOURCE = Path(__file__).with_name("cpu.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}

# Off: the torch references everywhere (tests compare the two paths; SPLITNODE_CPU_KERNELS=0 too).
ENABLED = True

P, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "rms_norm": [P, I64, P, I64, P, P, I64, P, I64, I64, I64, F32],
    "rotary_qk": [P, I64, I64, P, I64, I64, P, P, P, P, I64, I64, I64, I64, F32],
    "silu_and_mul": [P, I64, P, I64, I64],
    "paged_decode": [P, I64, P, P, P, I64, P, I64, I64, I64, I64, I64, F32, P],
    "prefill_attention": [P, I64, P, I64, P, I64, I64, I64, I64, I64, I64, F32, P, I64],
}
RESTYPES = {"prefill_attention": ctypes.c_int}
UNTYPED = {  # float32 logits only: no dtype forms
    "argmax_rows": [P, I64, I64, I64, P],
    "sample_plain": [P, I64, I64, I64, P, P, P, P],
    "sample_filtered": [P, I64, I64, I64, P, P, P, P, P, P],
}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def build(cache_dir: Path | None = None) -> Path:
    """The shared library, compiled unless this source, compiler (its path and version) and CPU
    already have one cached.
    Raises RuntimeError (one line) when there is no compiler or it fails."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    # the compiler's own path too: a wrapper that adds flags prints the --version of what it wraps
    where = os.path.realpath(shutil.which(cc) or cc)
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), *map(str.encode, version), where.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    base = cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "splitnode" / "kernels"
    out = base / f"cpu-{key}.so"
    if out.exists():
        return out
    base.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=base)
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if r.returncode:
            first = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[0]
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {first}")
        os.replace(tmp, out)  # atomic: a concurrent build finds a whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded kernels, or None (torch references) when disabled or they cannot be built."""
    if os.environ.get("SPLITNODE_CPU_KERNELS", "1") == "0":
        return None
    try:
        so = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        log.warning("CPU kernels unavailable, using torch's ops: %s", str(e).splitlines()[0])
        return None
    for name, args in SIGNATURES.items():
        for sfx in DTYPES.values():
            fn = getattr(so, f"{name}_{sfx}")
            fn.argtypes, fn.restype = args, RESTYPES.get(name)
    for name, args in UNTYPED.items():
        getattr(so, name).argtypes = args
    so.built_with_avx512.argtypes, so.built_with_avx512.restype = [], ctypes.c_int
    so.set_bf16_dot.argtypes, so.set_bf16_dot.restype = [ctypes.c_int], ctypes.c_int
    return so


def best_times(calls: dict, rounds: int) -> dict:
    """Each call's best wall time in seconds over `rounds` alternating rounds, after one untimed call
    each: for the measured choices between two forms of the same work."""
    for f in calls.values():
        f()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for key, f in calls.items():
            t0 = time.perf_counter()
            f()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


@functools.cache
def bf16_dot_product() -> bool:
    """Whether bfloat16 prefill attention multiplies with AVX512-BF16's vdpbf16ps (where the build
    has it) or converts to float32 FMAs, whichever is faster here: measured once per process, on
    the first bf16 prefill, over a 384-token prompt (8 heads, 2 KV heads of 64), best of 5
    alternating calls (about 15 ms). The dot product wins on an AMD Zen 4 (twice the FMA rate); the
    conversion on an Intel Xeon without AMX (1.3-1.6x; BENCHMARKS.md, "CPU engine")."""
    so = lib()
    if not so.set_bf16_dot(1):
        return False
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(384, n, 64, generator=g).to(torch.bfloat16) for n in (8, 2, 2))
    out = torch.empty_like(q)

    def form(on: int):
        def run():
            so.set_bf16_dot(on)
            so.prefill_attention_bf16(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                                      384, 384, 8, 2, 64, 0.125, out.data_ptr(), out.stride(0))
        return run

    best = best_times({1: form(1), 0: form(0)}, 5)
    on = best[1] <= best[0]
    so.set_bf16_dot(int(on))
    log.info("bf16 prefill attention: %s (%.2f against %.2f ms)", "vdpbf16ps" if on else "float32 FMAs",
             best[1] * 1e3, best[0] * 1e3)
    return on


def takes(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the CPU kernels run a model on this device in this dtype: a CPU, a dtype they have,
    and the kernels built."""
    return ENABLED and device.type == "cpu" and dtype in DTYPES and lib() is not None


def supports(x: torch.Tensor) -> bool:
    """`takes` for the tensor a layer computes on."""
    return takes(x.device, x.dtype)


def built_with_avx512() -> bool:
    """Whether the build has the AVX-512 forms (-march=native on a CPU with AVX-512F): prefill
    attention has no other, and declines elsewhere (torch's tiled GEMMs take it)."""
    return bool(lib().built_with_avx512())


def _fn(name: str, x: torch.Tensor):
    return getattr(lib(), f"{name}_{DTYPES[x.dtype]}")


def _rows(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.stride(1) == 1


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """As fused.rms_norm_ref (residual None) or fused.add_rms_norm_ref: x/residual [T, N]."""
    assert _rows(x) and (residual is None or (_rows(residual) and residual.dtype == x.dtype))
    t, n = x.shape
    y = torch.empty(t, n, dtype=x.dtype)
    w = weight.contiguous()
    if residual is None:
        _fn("rms_norm", x)(x.data_ptr(), x.stride(0), None, 0, w.data_ptr(), y.data_ptr(), n, None, 0, t, n, eps)
        return y
    s = torch.empty_like(y)
    _fn("rms_norm", x)(x.data_ptr(), x.stride(0), residual.data_ptr(), residual.stride(0), w.data_ptr(),
                       y.data_ptr(), n, s.data_ptr(), n, t, n, eps)
    return y, s


def rotary_qk_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None, eps: float = 0.0) -> None:
    """As fused.rotary_qk_ref, in place: q [T, H, D], k [T, Hkv, D] (strided views of the fused QKV
    output are fine; each head's D values contiguous); cos/sin [T, D] in their dtype."""
    t, h, d = q.shape
    assert q.stride(2) == 1 and k.stride(2) == 1 and k.dtype == q.dtype and d % 2 == 0
    cos, sin = cos.contiguous(), sin.contiguous()
    qw = None if q_weight is None else q_weight.contiguous()
    kw = None if k_weight is None else k_weight.contiguous()
    _fn("rotary_qk", q)(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
                        cos.data_ptr(), sin.data_ptr(), None if qw is None else qw.data_ptr(),
                        None if kw is None else kw.data_ptr(), t, h, k.shape[1], d, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """As fused.silu_and_mul_ref: gate_up [T, 2I] -> [T, I]."""
    assert _rows(gate_up)
    t, i = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty(t, i, dtype=gate_up.dtype)
    _fn("silu_and_mul", gate_up)(gate_up.data_ptr(), gate_up.stride(0), y.data_ptr(), t, i)
    return y


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """As paged_attention.paged_decode_attention: q [B, H, D] (rows may be strided), caches
    [num_blocks, block_size, Hkv, D], block_tables [B, M] int32, context_lens [B] int32 (each at
    least 1). Writes `out` [B, H, D] (contiguous) when given."""
    b, h, d = q.shape
    assert q.stride(2) == 1 and q.stride(1) == d and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.dtype == context_lens.dtype == torch.int32 and k_cache.dtype == q.dtype
    tables, lens = block_tables.contiguous(), context_lens.contiguous()
    res = out if out is not None and out.is_contiguous() else torch.empty(b, h, d, dtype=q.dtype)
    if b:
        _fn("paged_decode", q)(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                               tables.shape[1], lens.data_ptr(), b, h, k_cache.shape[2], d, k_cache.shape[1], scale,
                               res.data_ptr())
    if out is not None and res is not out:
        out.copy_(res)
    return res


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, out: torch.Tensor) -> bool:
    """Causal attention of one prompt chunk, as attention._causal_attention: q [Lq, H, D] at the last
    Lq positions of k/v [Lk, Hkv, D], written into out [Lq, H, D] (rows may be strided; each
    token's heads contiguous). False, with nothing written, for a head_dim or CPU it has no form
    for (AVX-512, head_dim 64 or 128)."""
    lq, h, d = q.shape
    lk, hkv = k.shape[:2]
    if not all(x.stride(2) == 1 and x.stride(1) == d for x in (q, k, v, out)) or lq > lk or not lq:
        return False
    if q.dtype == torch.bfloat16:
        bf16_dot_product()  # the faster form, chosen on the first call
    return bool(_fn("prefill_attention", q)(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(),
                                            v.stride(0), lq, lk, h, hkv, d, scale, out.data_ptr(), out.stride(0)))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """As logits.argmax(dim=-1) for float32 CPU logits [m, V] (rows contiguous): the first largest
    id per row, or its first NaN's. torch's reduction costs 30-60 us for 256 rows of a few hundred
    ids and reads a 128K vocabulary at a third of the copy bandwidth."""
    assert logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1
    m, vocab = logits.shape
    out = torch.empty(m, dtype=torch.int64)
    if m and vocab:
        lib().argmax_rows(logits.data_ptr(), logits.stride(0), m, vocab, out.data_ptr())
    return out


def sample_plain(logits: torch.Tensor, temperatures: list[float], min_p: list[float], u) -> torch.Tensor:
    """As sampling._draw_plain for float32 CPU logits [m, V] (rows contiguous): per row the inverse
    CDF at u (float64 [m], in [0, 1)) of softmax(logits / t) less the ids under min_p, in one read
    of the row. Returns int64 ids [m], -1 for a row without finite mass."""
    assert logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1
    m, vocab = logits.shape
    t, mp, uu = _host(temperatures, np.float32), _host(min_p, np.float32), _host(u, np.float64)
    out = torch.empty(m, dtype=torch.int64)
    lib().sample_plain(logits.data_ptr(), logits.stride(0), m, vocab, t.ctypes.data, mp.ctypes.data, uu.ctypes.data,
                       out.data_ptr())
    return out


def sample_filtered(logits: torch.Tensor, ps: list, u) -> torch.Tensor:
    """As sampling._draw_filtered for float32 CPU logits [m, V] (rows contiguous) and their
    SamplingParams: the same kept set (top-k with ties, min_p, top-p over the top-k mass), drawn
    by inverse CDF at u in vocabulary order (the torch path draws in descending order: the same
    distribution, not the same id for a given u). Returns int64 ids [m], -1 for a row without
    finite mass."""
    assert logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1
    m, vocab = logits.shape
    t, k = _host([p.temperature for p in ps], np.float32), _host([p.top_k for p in ps], np.int64)
    tp, mp = _host([p.top_p for p in ps], np.float32), _host([p.min_p for p in ps], np.float32)
    uu = _host(u, np.float64)
    out = torch.empty(m, dtype=torch.int64)
    lib().sample_filtered(logits.data_ptr(), logits.stride(0), m, vocab, t.ctypes.data, k.ctypes.data, tp.ctypes.data,
                          mp.ctypes.data, uu.ctypes.data, out.data_ptr())
    return out


def _host(values, dtype) -> np.ndarray:
    """Per-row parameters as a C array (numpy: a third of torch.tensor's cost for a list)."""
    return np.ascontiguousarray(values, dtype=dtype)
