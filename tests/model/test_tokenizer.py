import json
import shutil

import pytest
from jinja2.exceptions import TemplateError

from splitnode.model import Tokenizer
from splitnode.model.demo import BOS, EOS

TEXT = "Héllo, wörld! 世界 🙂 tabs\tand\nnewlines"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More?"}]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from splitnode.model import demo_model_path
    return demo_model_path(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tok(demo_dir):
    return Tokenizer(demo_dir)


def test_encode_adds_bos_and_round_trips(tok):
    ids = tok.encode(TEXT)
    assert ids[0] == BOS and ids[1:] == list(TEXT.encode())
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + TEXT
    assert tok.encode(TEXT, add_special_tokens=False) == list(TEXT.encode())


def test_matches_transformers(tok, demo_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(demo_dir)
    assert tok.encode(TEXT) == hf(TEXT)["input_ids"]
    assert tok.apply_chat_template(CHAT) == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == hf.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=False)


def test_incremental_decoding_holds_back_split_characters(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    dec = tok.incremental_decoder()
    deltas = [dec.add([i]) for i in ids]
    assert "".join(deltas) == TEXT == dec.text
    assert all("\ufffd" not in d for d in deltas)
    emoji = len("Héllo, wörld! 世界 ".encode())
    assert deltas[emoji:emoji + 4] == ["", "", "", "🙂"]  # four bytes, one character
    assert dec.flush() == ""


def test_incremental_decoding_skips_special_tokens_and_flushes_a_broken_tail(tok):
    dec = tok.incremental_decoder()
    assert dec.add([BOS]) == ""
    assert dec.add(list(b"ok ")) == "ok "
    assert dec.add(list("世".encode())[:2]) == ""  # incomplete: held back
    assert dec.add([EOS]) == ""
    assert dec.flush() == "\ufffd"  # the stream ended mid-character


def test_flush_never_contradicts_the_text_already_given(tmp_path):
    """SentencePiece byte fallback decodes a run of byte tokens as a whole: once "E" is out, the
    window "E" + a lone lead byte decodes to two replacement characters, not "E" + one."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    hf = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.save(str(tmp_path / "tokenizer.json"))
    dec = Tokenizer(tmp_path).incremental_decoder()
    assert dec.add([1 + ord("E")]) == "E"
    assert dec.add([1 + 0xE2]) == ""
    assert dec.flush() == "" and dec.text == "E"


def test_eos_ids_gather_every_source(demo_dir, tmp_path):
    dst = tmp_path / "tok"
    shutil.copytree(demo_dir, dst)
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, 259]}))
    (dst / "config.json").write_text(json.dumps({"eos_token_id": 260}))
    assert Tokenizer(dst).eos_token_ids == {EOS, 259, 260}


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": False, "add_eos_token": True}])
@pytest.mark.parametrize("post_processor", [True, False])
def test_special_tokens_added_as_transformers_adds_them(demo_dir, tmp_path, flags, post_processor):
    """tokenizer.json's post-processor alone decides (transformers 5 ignores add_bos/eos_token here)."""
    from transformers import AutoTokenizer

    dst = tmp_path / "tok"
    shutil.copytree(demo_dir, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**config, **flags}))
    if not post_processor:
        tokenizer = json.loads((dst / "tokenizer.json").read_text())
        tokenizer["post_processor"] = None
        (dst / "tokenizer.json").write_text(json.dumps(tokenizer))
    ids = Tokenizer(dst).encode("ab")
    assert ids == AutoTokenizer.from_pretrained(dst)("ab")["input_ids"]
    assert ids == {(True, False): [BOS, 97, 98], (True, True): [BOS, 97, 98],
                   (False, False): [97, 98], (False, True): [97, 98]}[post_processor, bool(flags)]


def test_chat_template_errors(tok, demo_dir, tmp_path):
    with pytest.raises(TemplateError, match="unknown role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    dst = tmp_path / "tok"
    shutil.copytree(demo_dir, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no chat template"):
        Tokenizer(dst).apply_chat_template(CHAT)
    (dst / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer(dst).apply_chat_template(CHAT[:2]) == "[Be brief.][Hi 🙂]"


def test_chat_template_jinja_beside_the_tokenizer_wins_as_in_transformers(demo_dir, tmp_path):
    """Newer transformers save the template as chat_template.jinja; a folder with both reads that one."""
    from transformers import AutoTokenizer

    dst = tmp_path / "tok"
    shutil.copytree(demo_dir, dst)
    (dst / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    ours = Tokenizer(dst).apply_chat_template(CHAT[:2])
    assert ours == "<system>Be brief.<user>Hi 🙂"
    assert ours == AutoTokenizer.from_pretrained(dst).apply_chat_template(CHAT[:2], tokenize=False,
                                                                          add_generation_prompt=True)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no tokenizer.json in {tmp_path}"):
        Tokenizer(tmp_path)
