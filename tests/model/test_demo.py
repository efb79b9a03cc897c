import hashlib

import torch
from model_helpers import empty_kv_caches, prefill_context

from splitnode.model import Tokenizer, demo_model_path, load_model


def digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_demo_folder_is_byte_identical_every_time(tmp_path):
    a, b = demo_model_path(tmp_path / "a"), demo_model_path(tmp_path / "b")
    assert a.name == "demo-v1"
    assert digest(a) == digest(b)
    assert set(digest(a)) == {"config.json", "generation_config.json", "model.safetensors",
                              "tokenizer.json", "tokenizer_config.json"}
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert demo_model_path(tmp_path / "a") == a  # written once, then reused
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["demo-v1"]  # no temp folder left behind


def test_default_location_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo_model_path() == tmp_path / "splitnode" / "demo-v1"


def test_demo_loads_and_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    path = demo_model_path(tmp_path)
    model, config = load_model(path, "cpu")
    tok = Tokenizer(path)
    assert config.vocab_size == tok.vocab_size == 261
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 4, 32)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hello there!"}]),
                     add_special_tokens=False)
    t = len(ids)
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.tensor(ids), torch.arange(t),
                                            prefill_context(empty_kv_caches(config), t)))
    hf = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits.log_softmax(-1), ref.log_softmax(-1), atol=1e-4, rtol=0)
    assert logits.softmax(-1).max(-1).values.min() > 10 / config.vocab_size  # far from uniform
