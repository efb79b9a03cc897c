"""Fused elementwise kernels of a decoder layer: RMSNorm (with the residual add before it),
rotary embedding of q and k in one launch (with Qwen3's per-head q/k RMSNorm before it), SiLU-and-mul.
Unfused, they are about 30 of the ~38 kernels per layer of a decode step (RMSNorm alone is 8 twice),
each ~2 us of GPU time even under a CUDA graph: the bound on small-model decode (G1). Each has the
torch reference beside it, written as the model computes it (RMSNorm in float32, the rest in the
model's dtype); the kernels compute in float32 and round once, so they match it to the rounding of
the dtype. splitnode/model/llama.py takes them on CUDA and the references on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional: the CPU path needs only torch
    import triton
    import triton.language as tl
except ImportError:
    triton = None

HAVE_TRITON = triton is not None


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, N]; weight [N]. As transformers: normalised in float32, cast back, times the weight."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Returns (rms_norm(residual + x), residual + x): the layer's `x = x + sublayer(...)` and the
    next norm, in one."""
    s = residual + x
    return rms_norm_ref(s, weight, eps), s


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weight: torch.Tensor | None = None,
               eps: float = 0.0) -> torch.Tensor:
    """x [T, heads, D] rotated (rotate-half) into a new tensor; cos/sin [T, D] in x's dtype. With
    weight [D], each head is RMSNormed first (Qwen3's q_norm and k_norm)."""
    if weight is not None:
        x = rms_norm_ref(x, weight, eps)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


def rotary_qk_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None, eps: float = 0.0) -> None:
    """rotary_ref of q [T, H, D] and of k [T, Hkv, D], written back in place (as the kernel does)."""
    q.copy_(rotary_ref(q, cos, sin, q_weight, eps))
    k.copy_(rotary_ref(k, cos, sin, k_weight, eps))


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate first, as the fused gate_up projection writes it) -> [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, x_stride, res_stride, n, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        """One program per row: (x + residual, stored), then its RMSNorm times the weight."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(res_ptr + row * res_stride + offs, mask=mask, other=0.0).to(tl.float32)
            s = (x + r).to(res_out_ptr.dtype.element_ty)  # the residual stream keeps the model dtype
            tl.store(res_out_ptr + row * n + offs, s, mask=mask)
            x = s.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
        normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_row, q_head, k_row, k_head, cs_row, eps,
                       NUM_Q_HEADS: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, NORM: tl.constexpr):
        """Program (t, h): head h of token t, a q head for h < NUM_Q_HEADS, else a k head. With
        NORM the head is RMSNormed first, rounded where the reference rounds (after the norm, after
        the weight), so that the rotary sees the values the unfused ops hand it."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        if h < NUM_Q_HEADS:
            base = q_ptr + t * q_row + h * q_head
            w_ptr = qw_ptr
        else:
            base = k_ptr + t * k_row + (h - NUM_Q_HEADS) * k_head
            w_ptr = kw_ptr
        offs = tl.arange(0, HALF_PAD)
        mask = offs < HALF
        x1 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            dt = q_ptr.dtype.element_ty
            rstd = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
            w1 = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)
            x1 = (w1 * (x1 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            x2 = (w2 * (x2 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        c1 = tl.load(cos_ptr + t * cs_row + offs, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * cs_row + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * cs_row + offs, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * cs_row + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(base + offs, (x1 * c1 - x2 * s1).to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(base + HALF + offs, (x2 * c2 + x1 * s2).to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(gu_ptr, out_ptr, gu_stride, n, BLOCK: tl.constexpr):
        """Program (t, c): columns [c * BLOCK, (c + 1) * BLOCK) of row t."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(gu_ptr + row * gu_stride + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * gu_stride + n + offs, mask=mask, other=0.0).to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # F.silu rounds first
        tl.store(out_ptr + row * n + offs, (silu * u).to(out_ptr.dtype.element_ty), mask=mask)


def _check_rows(x: torch.Tensor, name: str) -> None:
    assert x.dim() == 2 and x.stride(1) == 1, f"{name} must be [T, N] with contiguous rows, strides {x.stride()}"


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as rms_norm_ref; x's rows may be strided. `out` (contiguous [T, N]) may be given."""
    _check_rows(x, "x")
    t, n = x.shape
    assert weight.shape == (n,) and weight.is_contiguous() and weight.dtype == x.dtype, (weight.shape, weight.dtype)
    out = torch.empty((t, n), dtype=x.dtype, device=x.device) if out is None else out
    assert out.shape == (t, n) and out.is_contiguous() and out.dtype == x.dtype
    if t:
        _rms_norm_kernel[(t,)](x, x, weight, out, out, x.stride(0), 0, n, eps, HAS_RES=False,
                               BLOCK=triton.next_power_of_2(n))
    return out


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """Same contract as add_rms_norm_ref: (normed, residual + x), both new contiguous tensors
    unless given."""
    _check_rows(x, "x")
    _check_rows(residual, "residual")
    t, n = x.shape
    assert residual.shape == x.shape and residual.dtype == x.dtype, (residual.shape, x.shape)
    assert weight.shape == (n,) and weight.is_contiguous() and weight.dtype == x.dtype, (weight.shape, weight.dtype)
    out = torch.empty((t, n), dtype=x.dtype, device=x.device) if out is None else out
    residual_out = torch.empty_like(out) if residual_out is None else residual_out
    for o in (out, residual_out):
        assert o.shape == (t, n) and o.is_contiguous() and o.dtype == x.dtype
    if t:
        _rms_norm_kernel[(t,)](x, residual, weight, out, residual_out, x.stride(0), residual.stride(0), n, eps,
                               HAS_RES=True, BLOCK=triton.next_power_of_2(n))
    return out, residual_out


def rotary_qk_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None, eps: float = 0.0) -> None:
    """Same contract as rotary_qk_ref, one launch for both (and for their norms). q/k rows may be
    strided (views of the fused QKV output); each head's D values must be contiguous."""
    t, h, d = q.shape
    assert k.dim() == 3 and k.shape[0] == t and k.shape[2] == d and k.dtype == q.dtype, (q.shape, k.shape)
    assert d % 2 == 0, f"head_dim must be even, got {d}"
    for x in (q, k):
        assert x.stride(2) == 1 and x.stride(1) >= d, f"each head's D values must be contiguous, strides {x.stride()}"
    assert cos.shape == sin.shape == (t, d) and cos.stride() == sin.stride() and cos.stride(1) == 1
    assert cos.dtype == sin.dtype == q.dtype and len({x.device for x in (q, k, cos, sin)}) == 1
    norm = q_weight is not None
    assert norm == (k_weight is not None), "q and k are normed together or not at all"
    if norm:
        for w in (q_weight, k_weight):
            assert w.shape == (d,) and w.is_contiguous() and w.dtype == q.dtype, (w.shape, w.dtype)
    if t:
        half = d // 2
        _rotary_kernel[(t, h + k.shape[1])](q, k, cos, sin, q_weight if norm else q, k_weight if norm else k,
                                            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), eps,
                                            NUM_Q_HEADS=h, HALF=half, HALF_PAD=triton.next_power_of_2(half), NORM=norm)


def silu_and_mul_triton(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as silu_and_mul_ref; gate_up's rows may be strided."""
    _check_rows(gate_up, "gate_up")
    t, n2 = gate_up.shape
    assert n2 % 2 == 0, f"gate_up has an odd width {n2}"
    n = n2 // 2
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device) if out is None else out
    assert out.shape == (t, n) and out.is_contiguous() and out.dtype == gate_up.dtype
    if t:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), n, BLOCK=block)
    return out
