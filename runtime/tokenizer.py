"""Tokenizer for the runtime: tokenizer.json (+ tokenizer_config.json) through `tokenizers`.

Used by the engine (EOS ids, incremental detokenization of streamed tokens), the OpenAI server
(encode prompts, render chat messages) and ``hydraserve generate``. No transformers needed.

Chat: the model's own Jinja ``chat_template`` from tokenizer_config.json (or
chat_template.jinja) when present, rendered in a sandbox the way transformers renders it
(trim_blocks, lstrip_blocks, ``raise_exception``, ``tojson``). Otherwise DEFAULT_CHAT_TEMPLATE:
each message as ``<|role|>\\ncontent\\n``, then ``<|assistant|>\\n`` to prompt the reply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from hydraserve.errors import InvalidRequestError
from hydraserve.weights.model_files import ModelFiles

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# How many prompt tokens the detokenizer decodes along with new ones, so tokenizers that
# drop a leading space (SentencePiece style) or merge across the boundary decode correctly.
DETOKENIZE_CONTEXT = 5


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, Mapping):
        return str(value.get("content")) if value.get("content") is not None else None
    return str(value) if value is not None else None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' tojson filter (templates for tool calling use its keyword arguments)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    """Llama 3.x templates print today's date with this global."""
    return datetime.now().strftime(fmt)


class Tokenizer:
    """Encode/decode, special token ids, chat rendering and incremental detokenizers."""

    def __init__(self, tokenizer_json: str, tokenizer_config: Mapping[str, Any] | None = None,
                 chat_template: str | None = None, eos_token_ids: Sequence[int] = ()) -> None:
        self._tok = HFTokenizer.from_str(tokenizer_json)
        config = dict(tokenizer_config or {})
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.bos_token_id = self._id_of(self.bos_token)
        self.eos_token_id = self._id_of(self.eos_token)
        self.pad_token_id = self._id_of(self.pad_token)
        ids = {int(i) for i in eos_token_ids}
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(ids)
        template = chat_template or config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template: str | None = template if isinstance(template, str) else None
        self._env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._env.globals["raise_exception"] = _raise_exception
        self._env.globals["strftime_now"] = _strftime_now
        self._env.filters["tojson"] = _tojson
        self._compiled = self._env.from_string(self.chat_template or DEFAULT_CHAT_TEMPLATE)

    @classmethod
    def from_files(cls, files: ModelFiles, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        """From a model's files (hydraserve.weights.model_files): tokenizer.json is required."""
        config_text = files.read_optional("tokenizer_config.json")
        return cls(
            files.read_text("tokenizer.json"),
            json.loads(config_text) if config_text else None,
            chat_template=files.read_optional("chat_template.jinja"),
            eos_token_ids=eos_token_ids,
        )

    @classmethod
    def from_dir(cls, model_dir: str, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        from hydraserve.weights.model_files import LocalModelFiles

        return cls.from_files(LocalModelFiles(model_dir), eos_token_ids)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render chat messages to the prompt text; template errors are the request's fault."""
        try:
            return str(self._compiled.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra))
        except TemplateError as exc:
            raise InvalidRequestError(f"chat template failed: {exc}", param="messages") from exc

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Render and encode a chat; BOS is added only if the template did not write it."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        has_bos = bool(self.bos_token) and text.startswith(self.bos_token or "")
        return self.encode(text, add_special_tokens=not has_bos)

    def detokenizer(self, prompt_token_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_token_ids)


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas as they arrive.

    Decodes a short window (a few tokens already emitted + the new ones) and emits the text the
    new tokens add; holds text back while it ends in an incomplete UTF-8 sequence (U+FFFD),
    since byte-level tokens can split a character. Same idea as vLLM's detokenizer.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_token_ids[-DETOKENIZE_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def step(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be empty)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of generation: whatever text is still held back."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._prefix_offset > 4 * DETOKENIZE_CONTEXT:  # ids before the window are never read again
            drop = self._prefix_offset
            self._ids = self._ids[drop:]
            self._prefix_offset -= drop
            self._read_offset -= drop
        return delta
