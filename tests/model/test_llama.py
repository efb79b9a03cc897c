import torch
from model_helpers import empty_kv_caches, prefill_context

from splitnode.model import AttentionContext, PrefillChunk, load_model

PROMPT = [256] + list(b"The quick brown fox jumps over the lazy dog, 12345 times!")
# float32 kernels that round unlike transformers' ops: see ATOL in tests/engine/test_parity.py
ATOL = 3e-4


def hf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_prefill_logits_match_transformers(hf_checkpoint):
    model, config = load_model(hf_checkpoint, "cpu")
    t = len(PROMPT)
    with torch.inference_mode():
        hidden = model(torch.tensor(PROMPT), torch.arange(t), prefill_context(empty_kv_caches(config), t))
        logits = model.compute_logits(hidden)
    ref = hf_logits(hf_checkpoint, PROMPT)
    assert logits.dtype == torch.float32 and logits.shape == (t, config.vocab_size)
    assert ref.std() > 1.0  # the checkpoint's logits have margins, so the comparison means something
    torch.testing.assert_close(logits.log_softmax(-1), ref.log_softmax(-1), atol=ATOL, rtol=0)
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_chunked_prefill_then_decode_matches_full_prefill(make_hf_checkpoint):
    """Positions past the first chunk and the paged decode path give the logits a single pass gives."""
    path = make_hf_checkpoint("Qwen3ForCausalLM")
    model, config = load_model(path, "cpu")
    t, split = len(PROMPT), 20
    ref = hf_logits(path, PROMPT)
    # Filled with a large finite value, not NaN: the decode reference multiplies masked slots by a
    # zero weight, and 0 * NaN would poison the row.
    caches = empty_kv_caches(config, block_size=8, fill=1e4)
    blocks = torch.tensor([5, 2, 7, 0, 3, 1, 4, 6])  # non-contiguous, to exercise the block table
    slots = blocks[torch.arange(t) // 8] * 8 + torch.arange(t) % 8
    ids = torch.tensor(PROMPT)
    with torch.inference_mode():
        model(ids[:split], torch.arange(split), AttentionContext(
            kv_caches=caches, slot_mapping=slots[:split], prefills=[PrefillChunk(0, split, split, None)]))
        hidden = model(ids[split:t - 1], torch.arange(split, t - 1), AttentionContext(
            kv_caches=caches, slot_mapping=slots[split:t - 1],
            prefills=[PrefillChunk(0, t - 1 - split, t - 1, slots[:t - 1])]))
        chunk_logits = model.compute_logits(hidden)
        hidden = model(ids[t - 1:], torch.tensor([t - 1]), AttentionContext(
            kv_caches=caches, slot_mapping=slots[t - 1:], num_decodes=1,
            block_tables=blocks[None].int(), context_lens=torch.tensor([t], dtype=torch.int32)))
        decode_logits = model.compute_logits(hidden)
    torch.testing.assert_close(chunk_logits.log_softmax(-1), ref[split:t - 1].log_softmax(-1), atol=ATOL, rtol=0)
    torch.testing.assert_close(decode_logits.log_softmax(-1), ref[t - 1:].log_softmax(-1), atol=ATOL, rtol=0)


def test_layer_hook_sees_every_layer_in_order(make_hf_checkpoint):
    model, config = load_model(make_hf_checkpoint("LlamaForCausalLM"), "cpu")
    seen = []
    ctx = prefill_context(empty_kv_caches(config), 4)
    ctx.layer_hook = seen.append
    with torch.inference_mode():
        model(torch.tensor(PROMPT[:4]), torch.arange(4), ctx)
    assert seen == list(range(config.num_hidden_layers))
