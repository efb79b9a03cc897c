"""The C kernels of kernels/cpu.c against their torch references: in bfloat16 bit for bit but for
rare one-ulp flips (they round where the references round, from float32 values summed in another
order), within float32 rounding in float32; the AVX-512 decode path
(head_dim 64/128, groups of 1-8) and the generic one (any other shape); strided q/k views of a
fused QKV output; the build's cache and its one-line failure."""

import os

import pytest
import torch

from splitnode.kernels import cpu, fused
from splitnode.kernels.paged_attention import paged_decode_attention_ref

if cpu.lib() is None:
    pytest.skip("the CPU kernels could not be built here (no C compiler)", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16]


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.dtype == torch.bfloat16:
        differ = got != want
        assert differ.float().mean() <= 0.01, differ.float().mean()
        torch.testing.assert_close(got[differ].float(), want[differ].float(), atol=0, rtol=2 ** -7)  # one ulp
    else:
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


def rand(*shape, dtype, scale=1.0, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])  # 300 x 512 crosses the size the kernels go parallel at
def test_rms_norm_and_add_rms_norm(dtype, rows):
    x, res = rand(rows, 512, dtype=dtype, scale=3), rand(rows, 512, dtype=dtype, scale=5, seed=1)
    w = rand(512, dtype=dtype, seed=2).abs() + 0.5
    close(cpu.rms_norm(x, w, 1e-6), fused.rms_norm_ref(x, w, 1e-6))
    y, s = cpu.rms_norm(x, w, 1e-6, res)
    y_ref, s_ref = fused.add_rms_norm_ref(x, res, w, 1e-6)
    assert torch.equal(s, s_ref)  # the residual stream is one rounded add
    close(y, y_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])  # Qwen3's per-head q/k RMSNorm first
def test_rotary_in_place_on_the_qkv_views(dtype, norm):
    t, h, hkv, d = 13, 8, 2, 64
    qkv = rand(t, (h + 2 * hkv) * d, dtype=dtype)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    q, k = q.view(t, h, d), k.view(t, hkv, d)  # strided: rows of the fused output
    v_before = v.clone()
    cos, sin = rand(t, d, dtype=dtype, seed=1), rand(t, d, dtype=dtype, seed=2)
    qw = kw = None
    if norm:
        qw, kw = rand(d, dtype=dtype, seed=3) + 1, rand(d, dtype=dtype, seed=4) + 1
    q_ref, k_ref = fused.rotary_ref(q, cos, sin, qw, 1e-6), fused.rotary_ref(k, cos, sin, kw, 1e-6)
    cpu.rotary_qk_(q, k, cos, sin, qw, kw, 1e-6)
    close(q.contiguous(), q_ref)
    close(k.contiguous(), k_ref)
    assert torch.equal(v, v_before)  # the kernel wrote q and k only


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    gu = rand(37, 2 * 1408, dtype=dtype, scale=4)  # |x| up to ~16: both tails of silu's exp
    gu[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 0.0]).to(dtype)  # past the exp's range: 0 and x
    close(cpu.silu_and_mul(gu), fused.silu_and_mul_ref(gu))


def _paged(dtype, lens, hkv, d, block_size=16, seed=0):
    """Caches with each sequence's blocks scattered in reverse order, and their tables."""
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    kc = rand(num_blocks, block_size, hkv, d, dtype=dtype, seed=seed)
    vc = rand(num_blocks, block_size, hkv, d, dtype=dtype, seed=seed + 1)
    width = max(-(-n // block_size) for n in lens) + 2
    tables = torch.full((len(lens), width), -1, dtype=torch.int32)
    free = list(range(num_blocks))[::-1]
    for i, n in enumerate(lens):
        for j in range(-(-n // block_size)):
            tables[i, j] = free.pop()
    return kc, vc, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hkv,d", [(8, 2, 64), (4, 4, 128), (16, 2, 64), (2, 1, 128),  # AVX-512 shapes
                                     (6, 2, 32), (3, 1, 48)])  # the generic loop
def test_paged_decode_attention(dtype, h, hkv, d):
    lens = [1, 16, 17, 200, 5]  # one token, a whole block, a block and one, many blocks
    kc, vc, tables, context_lens = _paged(dtype, lens, hkv, d)
    qkv = rand(len(lens), (h + 2 * hkv) * d, dtype=dtype, seed=9)
    q = qkv[:, :h * d].view(len(lens), h, d)  # strided rows, as the layer passes it
    want = paged_decode_attention_ref(q, kc, vc, tables, context_lens, d ** -0.5)
    out = torch.full((len(lens), h, d), float("nan"), dtype=dtype)
    got = cpu.paged_decode_attention(q, kc, vc, tables, context_lens, d ** -0.5, out=out)
    assert got is out
    if dtype == torch.bfloat16:  # float32 inside both, summed in another order, one rounding at the end
        torch.testing.assert_close(got.float(), want.float(), atol=8e-3, rtol=8e-3)
    else:
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


def test_decode_attention_work_split_for_a_batch_of_one():
    """One sequence (fewer than the threads): the work splits per KV head; same answer."""
    kc, vc, tables, lens = _paged(torch.float32, [300], 4, 64)
    q = rand(1, 16, 64, dtype=torch.float32)
    torch.testing.assert_close(cpu.paged_decode_attention(q, kc, vc, tables, lens, 0.125),
                               paged_decode_attention_ref(q, kc, vc, tables, lens, 0.125), atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq,lk,h,hkv,d", [(1, 1, 8, 2, 64), (7, 7, 8, 2, 64), (300, 300, 8, 2, 64),  # whole prompts
                                           (33, 90, 8, 2, 64), (5, 40, 16, 2, 64),  # a chunk after earlier ones
                                           (130, 130, 6, 2, 64), (200, 260, 4, 4, 128), (40, 40, 2, 1, 128)])
def test_prefill_attention(dtype, lq, lk, h, hkv, d):
    """Against the torch path (tiled GEMMs) in float32; rows of 8 cross tokens when the group is 6,
    tiles of 128 rows split a prompt, masks cut the last 32-key step anywhere."""
    from splitnode.model.attention import _causal_attention_cpu

    qkv = rand(lk, (h + 2 * hkv) * d, dtype=dtype, scale=2)  # the layer's strided views
    q = qkv[lk - lq:, :h * d].view(lq, h, d)
    k, v = (t.view(lk, hkv, d) for t in qkv[:, h * d:].split(hkv * d, dim=-1))
    out = torch.full((lq + 2, h, d), float("nan"), dtype=dtype)  # rows of a larger batch
    if not cpu.built_with_avx512():  # no form here: declined, nothing written
        assert not cpu.prefill_attention(q, k, v, d ** -0.5, out[1:-1]) and out.isnan().all()
        return
    assert cpu.prefill_attention(q, k, v, d ** -0.5, out[1:-1])
    want = _causal_attention_cpu(q.float(), k.float(), v.float(), d ** -0.5)
    assert out[0].isnan().all() and out[-1].isnan().all()  # nothing written outside its rows
    if dtype == torch.bfloat16:  # bf16 products of bf16 inputs, weights rounded to bf16, as torch's bf16 path
        torch.testing.assert_close(out[1:-1].float(), want, atol=1.5e-2, rtol=1.5e-2)
    else:
        torch.testing.assert_close(out[1:-1], want, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("lq,lk,h,hkv,d", [(300, 300, 8, 2, 64), (33, 90, 6, 2, 64), (200, 260, 4, 4, 128)])
def test_both_bf16_prefill_forms_match_the_torch_path(lq, lk, h, hkv, d):
    """vdpbf16ps (where the build has AVX512-BF16) and the conversion to float32 FMAs, whichever this
    CPU's measurement picked: each within bf16 rounding of the float32 reference."""
    from splitnode.model.attention import _causal_attention_cpu

    if not cpu.built_with_avx512():
        pytest.skip("no AVX-512: no prefill form")
    qkv = rand(lk, (h + 2 * hkv) * d, dtype=torch.bfloat16, scale=2)
    q = qkv[lk - lq:, :h * d].view(lq, h, d)
    k, v = (t.view(lk, hkv, d) for t in qkv[:, h * d:].split(hkv * d, dim=-1))
    want = _causal_attention_cpu(q.float(), k.float(), v.float(), d ** -0.5)
    chosen = cpu.bf16_dot_product()
    outs = {}
    try:
        for on in (1, 0):
            if cpu.lib().set_bf16_dot(on) != on:
                continue  # built without AVX512-BF16: the conversion only
            outs[on] = torch.empty(lq, h, d, dtype=torch.bfloat16)
            assert cpu.prefill_attention(q, k, v, d ** -0.5, outs[on])
            torch.testing.assert_close(outs[on].float(), want, atol=1.5e-2, rtol=1.5e-2)
    finally:
        cpu.lib().set_bf16_dot(int(chosen))
    assert 0 in outs  # and 1 where the compiler built AVX512-BF16 (-march=native on a CPU with it)
    if len(outs) == 2:  # two forms, not one twice: the dot product rounds the softmax weights to bf16
        assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("vocab", [1, 5, 16, 17, 261, 4096, 49152 + 3])
@pytest.mark.parametrize("rows", [1, 3, 40])  # 40 x 49155 crosses the size the argmax goes parallel at
def test_argmax_is_torchs(vocab, rows):
    x = rand(rows, vocab + 9, dtype=torch.float32, scale=3)[:, 4:vocab + 4]  # strided rows
    x[0, vocab // 2] = x[0].max()  # a tie: the first wins
    x[-1] = float("-inf")  # no finite logit: id 0, as torch
    if rows > 1 and vocab > 3:
        x[1, vocab - 1], x[1, 2] = float("nan"), float("nan")  # the first NaN wins
    if rows > 2:
        x[2, vocab - 1] = float("inf")  # past the last whole vector of 16
    assert torch.equal(cpu.argmax(x), x.argmax(dim=-1))


def test_the_build_has_the_avx512_forms_where_the_cpu_has_avx512():
    assert cpu.built_with_avx512() == (" avx512f" in cpu._cpu_flags())


def test_prefill_attention_declines_a_head_dim_it_has_no_form_for():
    q, k = torch.randn(4, 4, 32), torch.randn(4, 2, 32)
    out = torch.zeros(4, 4, 32)
    assert not cpu.prefill_attention(q, k, k, 0.2, out) and not out.any()


def test_build_is_cached_and_a_bad_compiler_is_one_line(tmp_path, monkeypatch):
    first = cpu.build(tmp_path)
    assert first.exists() and cpu.build(tmp_path) == first  # the second finds the cached build
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    with pytest.raises(RuntimeError, match="^false failed on cpu.c") as e:
        cpu.build(tmp_path / "other")
    assert "\n" not in str(e.value)
    assert list((tmp_path / "other").iterdir()) == []  # no half-written library left behind


def test_another_compiler_path_gets_its_own_build(tmp_path, monkeypatch):
    """A wrapper around the same compiler (it prints the same --version) may pass other flags:
    its build is not the plain compiler's."""
    import shutil

    real = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    first = cpu.build(tmp_path)
    wrapper = tmp_path / "cc-wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec "{shutil.which(real) or real}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    second = cpu.build(tmp_path)
    assert second.exists() and second != first


def test_disabled_kernels_leave_the_references(monkeypatch):
    x = torch.ones(2, 8)
    assert cpu.supports(x) and not cpu.supports(x.double())
    monkeypatch.setattr(cpu, "ENABLED", False)
    assert not cpu.supports(x)
