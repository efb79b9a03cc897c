"""The fused decoder-layer kernels (G1) against their torch references, on CPU under the Triton
interpreter: random data, odd sizes, strided rows, outputs poisoned before the run."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see test_kernels.py)

import pytest
import torch

triton = pytest.importorskip("triton")

from splitnode.kernels import fused  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# one rounding of the dtype (the kernels round once, the references after each op), at values ~1-4
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _randn(*shape, dtype, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 64), (7, 100), (3, 333)])
def test_rms_norm_and_add_rms_norm_match_the_reference_on_strided_rows(dtype, rows, width):
    wide = _randn(rows, width + 13, dtype=dtype, seed=0, scale=2.0)
    x = wide[:, 5:5 + width]  # rows strided, as a view of a wider buffer
    residual = _randn(rows, width, dtype=dtype, seed=1)
    weight = (1 + _randn(width, dtype=torch.float32, seed=2) * 0.2).to(dtype)
    out = torch.full((rows, width), float("nan"), dtype=dtype)
    fused.rms_norm_triton(x, weight, 1e-6, out=out)
    _close(out, fused.rms_norm_ref(x, weight, 1e-6), dtype)

    out.fill_(float("nan"))
    res_out = torch.full((rows, width), float("nan"), dtype=dtype)
    fused.add_rms_norm_triton(x, residual, weight, 1e-5, out=out, residual_out=res_out)
    ref_out, ref_res = fused.add_rms_norm_ref(x, residual, weight, 1e-5)
    if dtype is torch.bfloat16:  # the interpreter rounds float32 to bfloat16 toward zero, torch to nearest
        _close(res_out, ref_res, dtype)
    else:
        assert torch.equal(res_out, ref_res)  # the residual stream is one rounded add: exact
    _close(out, ref_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 32), (3, 1, 16), (8, 8, 64), (5, 1, 48)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_of_q_and_k_in_one_launch_matches_the_reference_in_place(dtype, heads, kv_heads, head_dim, qk_norm):
    tokens = 5
    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=3)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    assert not q.is_contiguous() and not k.is_contiguous()
    angles = torch.arange(tokens)[:, None] * 0.37 + torch.arange(head_dim // 2)[None] * 0.11
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    ref = qkv.clone()
    q_ref = ref[:, :heads * head_dim].view(tokens, heads, head_dim)
    k_ref = ref[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    norms = (None, None, 0.0)
    if qk_norm:  # Qwen3's per-head q_norm and k_norm, in the same launch
        norms = tuple((1 + _randn(head_dim, dtype=torch.float32, seed=s) * 0.2).to(dtype) for s in (7, 8)) + (1e-6,)
    fused.rotary_qk_ref(q_ref, k_ref, cos, sin, *norms)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    fused.rotary_qk_triton(q, k, cos, sin, *norms)
    _close(q, q_ref, dtype)
    _close(k, k_ref, dtype)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 96), (6, 1500), (2, 2051)])
def test_silu_and_mul_matches_the_reference(dtype, rows, inter):
    gate_up = _randn(rows, 2 * inter, dtype=dtype, seed=4, scale=3.0)
    out = torch.full((rows, inter), float("nan"), dtype=dtype)
    fused.silu_and_mul_triton(gate_up, out=out)
    _close(out, fused.silu_and_mul_ref(gate_up), dtype)
