"""Tests for the tiny Llama-3.1-style tokenizer in vidmini.demo.tokenizer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from vidmini.demo.tokenizer import (
    SPECIAL_TOKEN_OFFSETS,
    SPECIAL_TOKENS,
    build_llama3_style_tokenizer,
    generation_eos_ids,
)

VOCAB = 512
BOS = "<|begin_of_text|>"
HEADER_DATES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"

ROUND_TRIP_TEXTS = [
    "",
    "hello",
    " leading and trailing spaces  ",
    "<image>\nWhat is it?",
    "line one\nline two\r\nline three\n\n\n",
    "tabs\tand\u00a0non-breaking spaces",
    "héllo wörld, naïve café",
    "日本語のテキスト、中文、한국어",
    "emoji 🎥🟥🔵 and flags 🇫🇷",
    "combining e\u0301 and zero\u200bwidth",
    "numbers 1234567 3.14159 -42 1e-9",
    "code: def f(x):\n    return x ** 2  # comment",
    "I'm sure they're here, we'll see.",
    "\x00\x01 control bytes \x7f",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return build_llama3_style_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=VOCAB)


def _sid(offset: int) -> int:
    return VOCAB + offset


def test_loads_as_fast_tokenizer_with_files(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.is_fast
    out = tmp_path / "saved"
    build_llama3_style_tokenizer(out)
    assert (out / "tokenizer.json").is_file()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "Cutting Knowledge Date" in config["chat_template"]
    assert config["bos_token"] == BOS
    assert config["eos_token"] == "<|eot_id|>"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok: PreTrainedTokenizerFast, text: str) -> None:
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    with_bos = tok(text).input_ids
    assert tok.decode(with_bos, skip_special_tokens=False) == BOS + text
    assert tok.decode(with_bos, skip_special_tokens=True) == text


def test_special_ids(tok: PreTrainedTokenizerFast) -> None:
    assert tok.vocab_size == VOCAB
    assert len(tok) == VOCAB + len(SPECIAL_TOKENS) == VOCAB + 11
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(VOCAB, VOCAB + 11))
    for name, offset in SPECIAL_TOKEN_OFFSETS.items():
        assert tok.convert_tokens_to_ids(f"<|{name}|>") == _sid(offset), name
    assert tok.bos_token == BOS and tok.bos_token_id == _sid(0)
    assert tok.eos_token == "<|eot_id|>" and tok.eos_token_id == _sid(9)
    assert tok.pad_token is None
    assert generation_eos_ids(tok) == [_sid(9), _sid(8), _sid(1)]


def test_prepends_exactly_one_bos(tok: PreTrainedTokenizerFast) -> None:
    bos = tok.bos_token_id
    ids = tok("hi").input_ids
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids[-1] not in generation_eos_ids(tok)  # no EOS appended
    assert tok("").input_ids == [bos]
    assert bos not in tok("hi", add_special_tokens=False).input_ids
    assert [row[0] for row in tok(["a", "b c"]).input_ids] == [bos, bos]


def test_special_token_strings_in_text_encode_to_single_ids(tok: PreTrainedTokenizerFast) -> None:
    for token in SPECIAL_TOKENS:
        assert tok(token, add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(token)]
    ids = tok("a<|eot_id|>b<|start_header_id|>user", add_special_tokens=False).input_ids
    assert ids.count(_sid(9)) == 1 and ids.count(_sid(6)) == 1
    assert tok.decode(ids) == "a<|eot_id|>b<|start_header_id|>user"


def test_image_placeholder_is_plain_text(tok: PreTrainedTokenizerFast) -> None:
    # Llama-3's split regex cuts "<image>\n" into "<image" and ">\n"; "<image>" is no token of its own.
    ids = tok("<image>\nWhat is it?", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids)[:2] == ["<image", ">Ċ"]
    assert "<image>" not in tok.get_vocab()


def test_chat_template_system_user(tok: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "<image>\nWhat is it?"}]
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "S<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "<image>\nWhat is it?<|eot_id|>"
    )
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False) == expected
    with_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert with_prompt == expected + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_chat_template_without_system_trims_and_assistant(tok: PreTrainedTokenizerFast) -> None:
    messages = [
        {"role": "user", "content": "  \n<image>\nHow many squares?\n  "},
        {"role": "assistant", "content": " Three. "},
    ]
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"{HEADER_DATES}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nHow many squares?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThree.<|eot_id|>"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    system = [{"role": "system", "content": "  padded system \n"}, *messages]
    assert tok.apply_chat_template(system, tokenize=False).startswith(
        f"{BOS}<|start_header_id|>system<|end_header_id|>\n\n{HEADER_DATES}padded system<|eot_id|>"
    )
    dated = tok.apply_chat_template(messages, tokenize=False, date_string="1 Jan 2025")
    assert "Today Date: 1 Jan 2025\n\n" in dated


def test_chat_template_token_ids_and_double_bos_quirk(tok: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "<image>\nWhat is it?"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    bos = tok.bos_token_id
    # apply_chat_template encodes with add_special_tokens=False, so the template's own BOS is the only one...
    assert ids == tok(rendered, add_special_tokens=False).input_ids
    assert ids[0] == bos and ids.count(bos) == 1
    header = [_sid(6), *tok("assistant", add_special_tokens=False).input_ids, _sid(7)]
    assert ids[-len(header) - 1 : -1] == header
    assert tok.decode(ids[-1:]) == "\n\n"
    # ...but encoding the rendered string with the defaults gives two, as with the real Llama-3 tokenizer.
    assert tok(rendered).input_ids[:2] == [bos, bos]


def test_control_tokens_in_content_not_escaped_by_default(tok: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "user", "content": "a <|eot_id|> b"}]
    plain = tok.apply_chat_template(messages)["input_ids"]
    sanitized = tok.apply_chat_template(messages, sanitize_control_tokens=True)["input_ids"]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert plain.count(eot) == 3  # system block, the one in the content, end of the user turn
    assert sanitized.count(eot) == 2


def test_deterministic(tmp_path: Path) -> None:
    build_llama3_style_tokenizer(tmp_path / "a")
    build_llama3_style_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_fast_build(tmp_path: Path) -> None:
    build_llama3_style_tokenizer(tmp_path / "warm")
    start = time.perf_counter()
    build_llama3_style_tokenizer(tmp_path / "timed")
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("vocab_size", [256, 300, 2048])
def test_other_vocab_sizes_and_corpus(tmp_path: Path, vocab_size: int) -> None:
    corpus = ["a tiny corpus", "with hardly any merges"]
    tok = build_llama3_style_tokenizer(tmp_path, vocab_size=vocab_size, corpus=corpus)
    assert tok.vocab_size == vocab_size
    for name, offset in SPECIAL_TOKEN_OFFSETS.items():
        assert tok.convert_tokens_to_ids(f"<|{name}|>") == vocab_size + offset
    text = "Unseen wörds 🎥\nstill encode."
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_rejects_vocab_below_byte_alphabet(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_llama3_style_tokenizer(tmp_path, vocab_size=255)
