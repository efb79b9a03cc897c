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
