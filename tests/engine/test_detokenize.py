"""Streamed answer text: the pieces `IncrementalDetokenizer` gives, joined, are exactly what the tokenizer's own
`decode` makes of the whole token list, for the tokenizer kinds real checkpoints use (byte-level BPE as in Llama 3,
SentencePiece-style with byte fallback as in Llama 2), including characters split over several tokens."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vidmini.engine.detokenize import IncrementalDetokenizer

TEXT = [
    "The lecturer writes café, naïve and Zürich on the board.",
    "会议在三点开始 — the meeting starts at three.",
    "Goal! ⚽ 2–1 after 87′, then a 🟨 card.",
    "Don't stop: it's 10.5 km, isn't it? Yes , he said .",
]


def byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def sentencepiece_style() -> PreTrainedTokenizerFast:
    """Metaspace words, characters outside the vocabulary as <0xNN> byte tokens, which are ordinary vocabulary
    entries (as in Llama 2's tokenizer.json), so `skip_special_tokens` keeps them."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    ascii_only = [t.encode("ascii", "ignore").decode() for t in TEXT]  # the rest falls back to bytes
    tok.train_from_iterator(ascii_only * 3, trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<eos>"]))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<eos>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece_style"])
def tokenizer(request) -> PreTrainedTokenizerFast:
    return byte_level() if request.param == "byte_level" else sentencepiece_style()


def stream(tok: PreTrainedTokenizerFast, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(lambda part: tok.decode(part, skip_special_tokens=True))
    pieces = [detok.push(i) for i in ids]
    return [*pieces, detok.flush()]


def test_pieces_of_real_text_join_to_its_decode(tokenizer):
    for text in TEXT:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) > 8
        pieces = stream(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in p for p in pieces)  # a split character comes out whole, once complete
        assert sum(bool(p) for p in pieces) > len(ids) // 3  # streamed as it goes, not all at the end


def test_a_character_split_over_tokens_is_held_back_until_complete(tokenizer):
    ids = tokenizer("⚽", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the test needs a character spread over several tokens"
    pieces = stream(tokenizer, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and "".join(pieces).strip() == "⚽"


def test_random_text_streams_to_its_decode(tokenizer):
    """Random strings of the test text's characters (multi-byte ones too), tokenized: pieces join to the decode.
    (A token list that is not valid text at all, e.g. bytes that never form a character, may stream differently
    where the decoder replaces them; the answer's text is the full decode either way.)"""
    rng = random.Random(7)
    alphabet = sorted(set("".join(TEXT)))
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_each_push_decodes_a_short_window_not_the_whole_answer():
    seen: list[int] = []
    detok = IncrementalDetokenizer(lambda ids: (seen.append(len(ids)), " ".join(map(str, ids)))[1])
    out = "".join(detok.push(i) for i in range(500)) + detok.flush()
    assert out == " ".join(map(str, range(500)))
    assert max(seen) <= 2
