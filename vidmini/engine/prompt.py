"""The reference's Llama-3.1 prompt (`llava_llama_3_1`), quirks included, and a corrected variant.

Reference: the tokenizer's chat template over [system, user "<image>\\n" + question] with
add_generation_prompt=False (no assistant header), then each `<image>`-separated chunk tokenized on its own
(`tokenizer_image_token`): the first chunk keeps its auto-added BOS and every chunk drops its first token, so
a Llama-3 tokenizer whose template also writes <|begin_of_text|> yields two BOS tokens.
Corrected (`style="corrected"`): assistant header appended, one BOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vidmini.engine.names import PROMPT_STYLES  # noqa: F401 - re-exported

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200


@dataclass(frozen=True)
class PromptIds:
    """The prompt split at the image placeholder: P (question-independent) and Q (the question's part)."""

    prefix: torch.Tensor
    question: torch.Tensor

    def full(self) -> torch.Tensor:
        """P, placeholder, Q: the ids the reference feeds to the model."""
        return torch.cat([self.prefix, torch.tensor([IMAGE_TOKEN_INDEX]), self.question])


def tokenize_with_image(prompt: str, tokenizer) -> list[int]:
    """The reference's `tokenizer_image_token`: chunks tokenized separately, joined by the placeholder id."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])  # every chunk drops its first token when the tokenizer adds BOS
    return ids


def render_chat(tokenizer, question: str, style: str = "reference", system: str = SYSTEM_PROMPT) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; LLaVA-Mini's prompt needs one")
    question = question.replace(IMAGE_TOKEN, "image")  # a user's text must not add placeholders
    messages = [{"role": "system", "content": system}, {"role": "user", "content": IMAGE_TOKEN + "\n" + question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=style == "corrected")


def build_prompt(tokenizer, question: str, style: str = "reference", system: str = SYSTEM_PROMPT) -> PromptIds:
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, not {style!r}")
    ids = tokenize_with_image(render_chat(tokenizer, question, style, system), tokenizer)
    bos = tokenizer.bos_token_id
    if style == "corrected" and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    cut = ids.index(IMAGE_TOKEN_INDEX)
    return PromptIds(torch.tensor(ids[:cut], dtype=torch.long), torch.tensor(ids[cut + 1 :], dtype=torch.long))
