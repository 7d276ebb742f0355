"""The reference's Llama-3.1 prompt, token for token, on a small Llama-3-style tokenizer built offline."""

from __future__ import annotations

import pytest

from vidmini.demo.tokenizer import build_llama3_style_tokenizer
from vidmini.engine.prompt import IMAGE_TOKEN_INDEX, SYSTEM_PROMPT, build_prompt, tokenize_with_image

VOCAB = 512
BOS, START, END, EOT = VOCAB + 0, VOCAB + 6, VOCAB + 7, VOCAB + 9  # Llama-3 order: 128000, 128006, 128007, 128009


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_llama3_style_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=VOCAB)


def plain(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def test_reference_prompt_has_two_bos_and_no_assistant_header(tok):
    question = "What colour is the square?"
    ids = build_prompt(tok, question).full().tolist()
    system_block = "\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" + SYSTEM_PROMPT
    expected = (
        [BOS, BOS, START] + plain(tok, "system") + [END] + plain(tok, system_block) + [EOT]
        + [START] + plain(tok, "user") + [END] + plain(tok, "\n\n")
        + [IMAGE_TOKEN_INDEX]
        + plain(tok, "\n" + question) + [EOT]
    )
    assert ids == expected
    assert ids[:2] == [BOS, BOS]
    assert ids[-1] == EOT  # the reference appends no assistant header


def test_corrected_prompt_single_bos_and_assistant_header(tok):
    question = "How many circles are there?"
    prompt = build_prompt(tok, question, style="corrected")
    ids = prompt.full().tolist()
    assert ids[0] == BOS and ids[1] == START
    assert ids.count(BOS) == 1
    assert ids[-len(plain(tok, "assistant")) - 3 :] == (
        [START] + plain(tok, "assistant") + [END] + plain(tok, "\n\n")
    )
    # the prefix is the reference's without its doubled BOS
    assert prompt.prefix.tolist() == build_prompt(tok, question).prefix.tolist()[1:]


def test_prefix_does_not_depend_on_the_question(tok):
    a, b = build_prompt(tok, "Is there a green triangle?"), build_prompt(tok, "What word is shown?")
    assert a.prefix.tolist() == b.prefix.tolist()
    assert a.question.tolist() != b.question.tolist()


def test_user_text_cannot_add_image_placeholders(tok):
    ids = build_prompt(tok, "compare <image> and <image>").full().tolist()
    assert ids.count(IMAGE_TOKEN_INDEX) == 1


def test_tokenize_with_image_without_auto_bos(tok):
    """A tokenizer that adds no BOS keeps every chunk whole."""

    class NoBos:
        bos_token_id = BOS

        def __call__(self, text):
            class Out:
                input_ids = plain(tok, text)
            return Out()

    ids = tokenize_with_image("ab<image>cd", NoBos())
    assert ids == plain(tok, "ab") + [IMAGE_TOKEN_INDEX] + plain(tok, "cd")
    assert tokenize_with_image("ab<image>cd", tok) == [BOS] + plain(tok, "ab") + [IMAGE_TOKEN_INDEX] + plain(tok, "cd")


def test_unknown_style_is_refused(tok):
    with pytest.raises(ValueError, match="prompt style"):
        build_prompt(tok, "q", style="chatml")
