"""GGUF files load as transformers' own GGUF loader loads them: same logits, same greedy tokens,
same token ids; what cannot be loaded is refused with the reason named."""

import json
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_helpers import BPE_VOCAB_SIZE, SP_VOCAB_SIZE, greedy, llama3_rope_factors, write_gguf
from model_helpers import empty_kv_caches, prefill_context

from splitnode.model import Tokenizer, load_model
from splitnode.model.gguf import convert_gguf, open_gguf
from splitnode.model.loader import resolve_model_path

TEXTS = ["the theater is on the other side", "  leading spaces, then\ttabs\nand newlines", "Héllo wörld 🙂 in 2024, 12345",
         "<|im_start|>user\nhi<|im_end|>", ""]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
# id -> (architecture, GGUF type of the 2-D weights, config overrides)
FILES = {
    "llama-F32": ("LlamaForCausalLM", Q.F32, {}),
    "llama-F16": ("LlamaForCausalLM", Q.F16, {}),
    "llama-Q8_0-tied": ("LlamaForCausalLM", Q.Q8_0, dict(tie_word_embeddings=True)),
    "llama-Q4_1": ("LlamaForCausalLM", Q.Q4_1, {}),
    "qwen2-Q5_0": ("Qwen2ForCausalLM", Q.Q5_0, {}),
    # head_dim != hidden / heads, read from qwen3.attention.key_length (transformers' GGUF loader
    # ignores that key and takes Qwen3Config's default, 128, which every real Qwen3 has)
    "qwen3-F32": ("Qwen3ForCausalLM", Q.F32, dict(head_dim=128)),
}


# float32 kernels that round unlike transformers' ops: see ATOL in tests/engine/test_parity.py
ATOL = 3e-4


@pytest.fixture(scope="module")
def gguf_files(make_hf_checkpoint, tmp_path_factory):
    made = {}

    def make(key, tokenizer="gpt2", pre="gpt-2"):
        if (key, tokenizer, pre) not in made:
            arch, qtype, overrides = FILES[key]
            vocab = BPE_VOCAB_SIZE if tokenizer == "gpt2" else SP_VOCAB_SIZE
            src = make_hf_checkpoint(arch, vocab_size=vocab, hidden_size=64, intermediate_size=128, **overrides)
            made[key, tokenizer, pre] = src, write_gguf(tmp_path_factory.mktemp("gguf") / f"{key}.gguf", src, qtype,
                                                        tokenizer, pre=pre)
        return made[key, tokenizer, pre]

    return make


def transformers_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def our_logits(path, ids):
    model, config = load_model(path, "cpu")
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)),
                                          prefill_context(empty_kv_caches(config), len(ids))))


@pytest.mark.parametrize("key", list(FILES))
def test_logits_and_greedy_tokens_match_transformers_gguf_loader(gguf_files, key):
    from splitnode.engine.llm import LLM
    from splitnode.engine.sampling import SamplingParams

    src, path = gguf_files(key)
    ref_model, ref_tok = transformers_gguf(path)
    ids = ref_tok("the theater is on the other side of the river")["input_ids"]
    assert len(ids) > 10
    logits = our_logits(path, ids)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    assert ref.std() > 1.0  # margins, so agreement means something
    torch.testing.assert_close(logits.log_softmax(-1), ref.log_softmax(-1), atol=ATOL, rtol=0)
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))

    out = LLM(str(path), num_kv_blocks=16).generate([ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    with torch.no_grad():
        ref_ids = greedy(ref_model, ids, 12)
    assert out[0].token_ids == ref_ids[0, len(ids):].tolist()


@pytest.mark.parametrize("key", ["llama-F32", "qwen3-F32"])
def test_f32_file_holds_exactly_the_source_checkpoint(gguf_files, key):
    """Independent of transformers: llama.cpp's q/k row permutation is undone exactly, and the
    head size comes from attention.key_length."""
    src, path = gguf_files(key)
    ours, from_folder = load_model(path, "cpu")[0], load_model(src, "cpu")[0]
    for (name, p), (_, q) in zip(ours.named_parameters(), from_folder.named_parameters()):
        assert torch.equal(p, q), name


def test_engine_dtype_and_memory(gguf_files):
    _, path = gguf_files("llama-Q8_0-tied")
    model, config = load_model(path, "cpu", dtype="bfloat16")
    assert config.tie_word_embeddings and model.lm_head is None
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # dequantized to the engine's dtype
    ckpt = open_gguf(path)
    assert ckpt.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert ckpt.resolve_dtype("auto", torch.device("meta")) == torch.bfloat16  # quantized file, accelerator
    assert open_gguf(gguf_files("llama-F16")[1]).resolve_dtype("auto", torch.device("meta")) == torch.float16


@pytest.mark.parametrize("tokenizer,pre", [("gpt2", "gpt-2"), ("gpt2", "llama-bpe"), ("gpt2", "qwen2"),
                                           ("llama", "default")])
def test_tokenizer_matches_transformers(gguf_files, tokenizer, pre):
    _, path = gguf_files("llama-F32", tokenizer, pre)
    tok, (_, ref) = Tokenizer(path), transformers_gguf(path)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert tok.apply_chat_template(CHAT) == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    if tokenizer == "gpt2":
        assert tok.encode(" the") == [tok.token_to_id("Ġthe")]  # the merges are applied
        assert tok.eos_token_ids == {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    else:
        assert tok.encode("the")[0] == 1  # BOS, as llama.cpp adds to SentencePiece vocabularies
        assert tok.eos_token_ids == {2}


def test_smollm_vocabulary_splits_digits_as_llama_cpp_does(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint("LlamaForCausalLM", vocab_size=BPE_VOCAB_SIZE, hidden_size=64, intermediate_size=128)
    gpt2, smollm = Tokenizer(write_gguf(tmp_path / "gpt2.gguf", src)), Tokenizer(write_gguf(
        tmp_path / "smollm.gguf", src, pre="smollm"))
    twenty = gpt2.token_to_id("20")
    assert gpt2.encode("x 2024") == [ord("x"), ord(" "), twenty, ord("2"), ord("4")]  # byte b is token b here
    assert smollm.encode("x 2024") == [ord("x"), ord(" "), ord("2"), ord("0"), ord("2"), ord("4")]


def test_unsupported_quant_type_is_named(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint("LlamaForCausalLM", vocab_size=BPE_VOCAB_SIZE, hidden_size=64, intermediate_size=128)
    path = write_gguf(tmp_path / "q.gguf", src, tensor_types={"blk.1.ffn_up.weight": Q.Q8_1})
    with pytest.raises(ValueError, match=r"tensor 'blk\.1\.ffn_up\.weight' has GGUF type Q8_1, which splitnode "
                                         r"cannot dequantize; supported: F32, F16, BF16, Q4_0"):
        load_model(path, "cpu")


def test_unsupported_architecture_is_named(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint("LlamaForCausalLM", vocab_size=BPE_VOCAB_SIZE, hidden_size=64, intermediate_size=128)
    path = write_gguf(tmp_path / "g.gguf", src, arch="gemma2")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gemma2'; supported: llama, qwen2, qwen3"):
        load_model(path, "cpu")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gemma2'"):
        Tokenizer(path)


def test_llama3_rope_freqs_become_llama3_scaling(make_hf_checkpoint, tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    src = make_hf_checkpoint("LlamaForCausalLM", vocab_size=BPE_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                             head_dim=64, num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=16384,
                             rope_parameters=rope)
    factors = llama3_rope_factors(500000.0, 64, 32.0)
    assert ((factors > 1.0) & (factors < 32.0)).any()  # the head spans all three bands
    path = write_gguf(tmp_path / "l3.gguf", src, rope_freqs=factors)
    assert open_gguf(path).config.rope_scaling == {k: v for k, v in rope.items() if k != "rope_theta"}
    ids = list(range(40))
    torch.testing.assert_close(our_logits(path, ids), our_logits(src, ids), atol=1e-5, rtol=0)
    bad = write_gguf(tmp_path / "bad.gguf", src, rope_freqs=factors * 1.5)
    with pytest.raises(ValueError, match="rope_freqs.weight holds rope factors that are not Llama 3's scaling"):
        load_model(bad, "cpu")


def test_converted_folder_loads_in_splitnode_and_transformers(gguf_files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path = gguf_files("llama-Q8_0-tied")
    out = tmp_path / "hf"
    convert_gguf(path, out, dtype=torch.float32)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    direct, folder = load_model(path, "cpu")[0], load_model(out, "cpu")[0]
    for (name, p), (_, q) in zip(direct.named_parameters(), folder.named_parameters()):
        assert torch.equal(p, q), name
    ids = Tokenizer(out).encode(TEXTS[0])
    assert ids == Tokenizer(path).encode(TEXTS[0]) == AutoTokenizer.from_pretrained(out)(TEXTS[0])["input_ids"]
    assert Tokenizer(out).apply_chat_template(CHAT) == Tokenizer(path).apply_chat_template(CHAT)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(our_logits(out, ids).log_softmax(-1), ref.log_softmax(-1), atol=ATOL, rtol=0)


def test_model_names_resolve(gguf_files, tmp_path, monkeypatch):
    _, path = gguf_files("llama-F32")
    assert resolve_model_path(str(path)) == path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()  # a folder of that name is what the user means
    assert resolve_model_path("smollm2") == Path("smollm2")
    with pytest.raises(FileNotFoundError, match=r"model not found: nowhere\.gguf .*a \.gguf file, or 'smollm2'"):
        resolve_model_path("nowhere.gguf")
