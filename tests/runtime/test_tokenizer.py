"""Runtime tokenizer: parity with transformers' fast tokenizer, chat templates, detokenizing."""

from __future__ import annotations

from pathlib import Path

import pytest

from hydraserve.errors import InvalidRequestError
from hydraserve.runtime.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

TEXTS = ["Hello world!", "The lighthouse keeper climbed 112 steps.", "naïve café — 日本語 🙂", "  spaced\n\ttext  "]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def test_encode_decode_match_transformers(tiny_llama_dir: Path) -> None:
    import transformers
    ours = Tokenizer.from_dir(str(tiny_llama_dir))
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids
        assert ids[0] == ours.bos_token_id == 1
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text
    assert ours.eos_token_ids == {2} and ours.pad_token_id == 0


def test_models_own_chat_template_renders_like_transformers(tiny_llama_dir: Path) -> None:
    import transformers
    ours = Tokenizer.from_dir(str(tiny_llama_dir))
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert ours.chat_template is not None
    rendered = ours.apply_chat_template(MESSAGES)
    assert rendered == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    ids = ours.encode_chat(MESSAGES)
    assert ids[0] == ours.bos_token_id and ids[1] != ours.bos_token_id


def test_default_chat_template_when_model_has_none(tiny_opt_dir: Path) -> None:
    tok = Tokenizer.from_dir(str(tiny_opt_dir))
    assert tok.chat_template is None
    assert tok.apply_chat_template(MESSAGES) == "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n"
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("Hi there\n")
    assert "message['role']" in DEFAULT_CHAT_TEMPLATE


def test_chat_template_is_sandboxed_and_errors_are_request_errors(tiny_opt_dir: Path) -> None:
    text = (tiny_opt_dir / "tokenizer.json").read_text()
    evil = Tokenizer(text, chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidRequestError) as err:
        evil.apply_chat_template(MESSAGES)
    assert err.value.param == "messages"
    strict = Tokenizer(text, chat_template="{% if messages[0]['role'] != 'user' %}"
                                           "{{ raise_exception('first message must be user') }}{% endif %}ok")
    with pytest.raises(InvalidRequestError, match="first message must be user"):
        strict.apply_chat_template(MESSAGES)
    assert strict.apply_chat_template(MESSAGES[1:]) == "ok"


def test_incremental_detokenizer_holds_back_split_characters(tiny_llama_dir: Path) -> None:
    tok = Tokenizer.from_dir(str(tiny_llama_dir))
    prompt = tok.encode("Prompt:")
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        detok = tok.detokenizer(prompt)
        deltas = [detok.step(i) for i in ids]
        assert "".join(deltas) + detok.flush() == text
        assert not any("\ufffd" in d for d in deltas)  # multi-byte characters never come out half
    # an emoji is 4 bytes: byte-level BPE splits it, so some steps must emit nothing
    emoji_ids = tok.encode("🙂", add_special_tokens=False)
    assert len(emoji_ids) > 1
    detok = tok.detokenizer()
    assert [detok.step(i) for i in emoji_ids][:-1] == [""] * (len(emoji_ids) - 1)


def test_template_helpers_transformers_templates_use(tiny_opt_dir: Path) -> None:
    text = (tiny_opt_dir / "tokenizer.json").read_text()
    tok = Tokenizer(text, chat_template="{{ messages | tojson(indent=None, sort_keys=True) }}|"
                                        "{{ strftime_now('%Y') | length }}")
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '[{"content": "é", "role": "user"}]|4'


def test_generation_config_eos_ids_are_stop_tokens(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    from hydraserve.runtime.engine.factory import generation_eos_ids
    from hydraserve.weights.model_files import LocalModelFiles

    copy = Path(shutil.copytree(tiny_llama_dir, tmp_path / "m"))
    (copy / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    assert generation_eos_ids(LocalModelFiles(copy)) == [2, 7]
    (copy / "generation_config.json").unlink()
    assert generation_eos_ids(LocalModelFiles(copy)) == []
