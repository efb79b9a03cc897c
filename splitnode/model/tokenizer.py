"""Text <-> token ids for a Hugging Face model folder (or a GGUF file's tokenizer metadata), with
streaming detokenization and the model's chat template, behaving as transformers' fast tokenizer does."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from splitnode.model.gguf import is_gguf_file


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    with open(file) as f:
        return json.load(f)


def _token_str(value) -> str | None:
    """Special tokens in tokenizer_config.json are strings or serialized AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        if is_gguf_file(path):
            from splitnode.model.gguf import open_gguf

            self._tok, config, generation = open_gguf(path).tokenizer_parts()
            eos_sources = [generation]
        else:
            file = path / "tokenizer.json"
            if not file.is_file():
                raise FileNotFoundError(f"no tokenizer.json in {path}")
            self._tok = HFTokenizer.from_file(str(file))
            config = _read_json(path / "tokenizer_config.json")
            eos_sources = [_read_json(path / "generation_config.json"), _read_json(path / "config.json")]
        self.eos_token = _token_str(config.get("eos_token"))
        self.special_tokens = {
            key: tok for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (tok := _token_str(config.get(key))) is not None
        }
        self.chat_template = self._find_chat_template(path, config)
        self.eos_token_ids = self._find_eos_ids(eos_sources)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """As `AutoTokenizer(...)(text)["input_ids"]` in transformers 5: the special tokens added are
        those of tokenizer.json's post-processor (tokenizer_config.json's add_bos_token does not
        change them there either). Text rendered by a chat template already holds
        its special tokens: encode it with add_special_tokens=False, as transformers does."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError(
                f"the tokenizer in {self.path} has no chat template (tokenizer_config.json 'chat_template', "
                "chat_template.jinja, or a GGUF file's tokenizer.chat_template); send a plain prompt instead")
        template = _compile_template(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **self.special_tokens)

    @staticmethod
    def _find_chat_template(path: Path, config: dict) -> str | None:
        jinja = path / "chat_template.jinja"
        if jinja.is_file():  # transformers >= 4.43 saves it here, and reads it before tokenizer_config's
            return jinja.read_text()
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default")
        return template

    def _find_eos_ids(self, sources: list[dict]) -> set[int]:
        """EOS from generation_config.json, config.json and tokenizer_config.json together: chat
        models often end turns with a token only the generation config names."""
        ids: set[int] = set()
        for source in sources:
            eos = source.get("eos_token_id")
            if eos is not None:
                ids.update(eos if isinstance(eos, list) else [eos])
        if self.eos_token is not None and (tid := self._tok.token_to_id(self.eos_token)) is not None:
            ids.add(tid)
        return ids


_templates: dict[str, object] = {}


def _compile_template(source: str):
    """A sandboxed jinja2 template set up as transformers sets it up."""
    if source not in _templates:
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _templates[source] = env.from_string(source)
    return _templates[source]


class IncrementalDecoder:
    """Streams text as tokens arrive. Each call returns only the new text; output that ends in an
    incomplete UTF-8 sequence (decoded as U+FFFD) is held back until the rest arrives. Decoding a
    short window that starts a few tokens back keeps tokenizers that merge spaces across tokens
    (SentencePiece) correct."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # window start: decoded for context, already emitted
        self._read_offset = 0  # tokens before this are emitted

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix_offset:self._read_offset], self.skip_special_tokens)
        full = decode(self.ids[self._prefix_offset:], self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of the stream: whatever was held back, replacement characters included."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix_offset:self._read_offset], self.skip_special_tokens)
        full = decode(self.ids[self._prefix_offset:], self.skip_special_tokens)
        # A window whose decode no longer starts with the emitted text adds nothing: the text
        # already given out is never contradicted.
        delta = full[len(prefix):] if full.startswith(prefix) else ""
        self._prefix_offset = self._read_offset = len(self.ids)
        self.text += delta
        return delta
