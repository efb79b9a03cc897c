"""oneDNN's prepacked linears (model/cpu_linear.py) give torch's products, in each dtype's own
arithmetic, at every batch size, and a packed model the same logits as before packing."""

from __future__ import annotations

import pytest
import torch
from model_helpers import empty_kv_caches, prefill_context
from torch import nn

from splitnode.model import load_model
from splitnode.model.cpu_linear import PackedLinear, can_pack, pack_linears

DTYPES = [torch.float32, *([torch.bfloat16] if can_pack(torch.bfloat16) else [])]


@pytest.mark.skipif(not can_pack(torch.float32), reason="torch is built without oneDNN")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_a_packed_linear_gives_torchs_product(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    weight = (torch.randn(96, 80, generator=g) / 80 ** 0.5).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(rows, 80, generator=g).to(dtype)
    got = PackedLinear(weight, bias)(x)
    want = nn.functional.linear(x, weight, bias)
    assert got.dtype == dtype and got.shape == (rows, 96)
    # float32 stays float32 (only the order of the sums differs); bf16 rounds its output as torch's does
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.skipif(not can_pack(torch.float32), reason="torch is built without oneDNN")
@pytest.mark.parametrize("tied", [False, True])
def test_a_packed_model_gives_the_same_logits(make_hf_checkpoint, tied):
    path = make_hf_checkpoint("LlamaForCausalLM", tie_word_embeddings=tied, attention_bias=tied)
    model, config = load_model(path, "cpu", dtype="float32")
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))

    def logits():
        with torch.inference_mode():
            hidden = model(ids, torch.arange(40), prefill_context(empty_kv_caches(config), 40))
            return model.compute_logits(hidden)

    before = logits()
    num_linears = sum(type(m) is nn.Linear for m in model.modules())
    assert pack_linears(model) == num_linears and not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, PackedLinear)
    if tied:  # the head got a packed copy; the embedding still looks tokens up
        assert model.model.embed_tokens.weight.shape == (config.vocab_size, config.hidden_size)
    torch.testing.assert_close(logits(), before, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rows", [1, 32, 127, 128, 300])
def test_an_upcast_linear_gives_torchs_bf16_product(rows, monkeypatch):
    """bf16 in float32 from UPCAST_ROWS rows (the weight in slices: a small chunk here makes three):
    the same exact products summed in float32, so the same bf16 output but for rare one-ulp flips."""
    from splitnode.model import cpu_linear

    monkeypatch.setattr(cpu_linear, "UPCAST_CHUNK", 40 * 80)
    g = torch.Generator().manual_seed(rows)
    weight = (torch.randn(96, 80, generator=g) / 80 ** 0.5).to(torch.bfloat16)
    bias = torch.randn(96, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 80, generator=g).to(torch.bfloat16)
    got = cpu_linear.UpcastLinear(weight, bias)(x)
    want = nn.functional.linear(x.float(), weight.float(), bias.float())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=8e-3)  # bf16 rounding of the output
    assert (got == want.to(torch.bfloat16)).float().mean() > 0.99


def test_a_bf16_model_where_bf16_is_slower_multiplies_prefills_in_float32(make_hf_checkpoint, monkeypatch):
    """pack_linears on a CPU whose bf16 GEMMs are measured slower (forced here: the decision is the
    measurement's, tested by its own use in dtype auto): UpcastLinears sharing the loaded weights,
    the tied head left to the embedding, and the model's logits those of the unswapped model."""
    from splitnode.model import cpu_linear

    monkeypatch.setattr(cpu_linear, "bf16_is_faster", lambda: False)
    path = make_hf_checkpoint("LlamaForCausalLM", tie_word_embeddings=True)
    model, config = load_model(path, "cpu", dtype="bfloat16")
    ids = torch.randint(0, config.vocab_size, (200,), generator=torch.Generator().manual_seed(0))

    def logits():
        caches = [(k.bfloat16(), v.bfloat16()) for k, v in empty_kv_caches(config, num_blocks=16)]
        with torch.inference_mode():
            return model.compute_logits(model(ids, torch.arange(200), prefill_context(caches, 200)))

    before = logits()
    q = model.model.layers[0].self_attn.qkv_proj.weight
    num_linears = sum(type(m) is nn.Linear for m in model.modules())
    assert num_linears > 0 and pack_linears(model) == num_linears
    layer = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, cpu_linear.UpcastLinear) and layer.weight.data_ptr() == q.data_ptr()
    assert model.lm_head is None and not any(type(m) is nn.Linear for m in model.modules())
    after = logits()
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.95
    torch.testing.assert_close(after, before, atol=0.1, rtol=0)
