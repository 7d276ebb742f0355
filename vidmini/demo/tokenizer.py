"""A tiny, offline, deterministic stand-in for the Llama-3 / Llama-3.1-Instruct tokenizer.

`build_llama3_style_tokenizer` trains a byte-level BPE on a small built-in English corpus and saves it in Hugging
Face format. It mirrors the parts of Meta's tokenizer that matter for prompt construction:

* Llama-3's pre-tokenizer (its split regex, then byte-level mapping), byte-level decoder, and a BPE model with
  ``ignore_merges`` set, as in the real ``tokenizer.json``. All 256 bytes are in the vocabulary, so any text encodes
  and ``decode(encode(text)) == text``.
* Special tokens come after the regular vocabulary, in Llama-3.1's order (ids ``vocab_size + SPECIAL_TOKEN_OFFSETS``
  here, 128000 + offset there).
* The post-processor prepends ``<|begin_of_text|>`` when ``add_special_tokens=True`` and appends nothing.
* bos ``<|begin_of_text|>``, eos ``<|eot_id|>`` (as in the Instruct ``tokenizer_config.json``), no pad token.
* The chat template renders like Llama-3.1-Instruct's for system / user / assistant messages without tools.

One deliberate difference: ``clean_up_tokenization_spaces`` is False (the real config says True), so decoding gives
back the exact text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = [
    "BOS_TOKEN",
    "DEFAULT_CORPUS",
    "EOS_TOKEN",
    "LLAMA3_CHAT_TEMPLATE",
    "LLAMA3_SPLIT_PATTERN",
    "SPECIAL_TOKENS",
    "SPECIAL_TOKEN_OFFSETS",
    "build_llama3_style_tokenizer",
    "llama3_style_pipeline",
    "generation_eos_ids",
    "special_token_id",
]

# Llama-3.1's first eleven special tokens, in id order (128000..128010 there, vocab_size.. here).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)

SPECIAL_TOKEN_OFFSETS: dict[str, int] = {
    "begin_of_text": 0,
    "end_of_text": 1,
    "finetune_right_pad_id": 4,
    "start_header_id": 6,
    "end_header_id": 7,
    "eom_id": 8,
    "eot_id": 9,
}

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|eot_id|>"

# The split regex from Llama-3's tokenizer.json (tiktoken's cl100k-style pattern with 1-3 digit numbers).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama-3.1-Instruct's chat template, cut down to its tool-free path: same output for system / user / assistant
# messages. The system block (with the two date lines) is always written, with an empty system message if none is
# given; system and message contents are trimmed. ``date_string`` can be overridden like in the original.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    '    {%- set date_string = "26 Jul 2024" %}\n'
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "{%- endif %}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{{- system_message }}\n"
    '{{- "<|eot_id|>" }}\n'
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

LLAMA3_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

DEFAULT_CORPUS: tuple[str, ...] = (
    LLAMA3_SYSTEM_PROMPT,
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    "system\n\nuser\n\nassistant\n\n",
    "<image>\nWhat is happening in this video?",
    "<image>\nDescribe the video in detail.",
    "<image>\nWhat colour is the square?",
    "What colour is the circle? The circle is red.",
    "What colour is the triangle? The triangle is blue.",
    "The square is green and the circle is yellow.",
    "How many squares are there in the video? There are three squares.",
    "How many circles can you see? I can see two circles.",
    "Count the red shapes. There are four red shapes.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "There are 12 frames, 24 frames, 100 frames and 2048 frames.",
    "A red square moves from the left of the frame to the right.",
    "A blue circle bounces up and down in the middle of the screen.",
    "A green triangle rotates slowly in the top corner.",
    "The yellow square disappears after five seconds.",
    "At the start of the video, a white circle appears on a black background.",
    "At the end of the video, all the shapes stop moving.",
    "Which shape appears first? The red square appears first.",
    "Which shape is the largest? The blue circle is the largest.",
    "Where is the green triangle? It is in the bottom left corner.",
    "What happens after the circle turns orange?",
    "The circle turns purple, then pink, then grey.",
    "Is the square bigger than the circle? No, the square is smaller.",
    "Does the triangle move? Yes, it moves to the right.",
    "When does the second square appear? It appears at 00:15.",
    "Summarize the video in one sentence.",
    "The video shows coloured shapes moving across the screen.",
    "A person opens a door, walks into the kitchen and picks up a cup.",
    "A dog runs across the park and catches a ball.",
    "Two people are talking in a room while a clock ticks on the wall.",
    "The camera pans slowly over a city at night.",
    "Find the moment when the ball is thrown.",
    "What is the person holding in their hand?",
    "Why does the man stop walking?",
    "Answer the question using a single word or phrase.",
    "Please answer with the letter of the correct option: A, B, C or D.",
    "The answer is B. The answer is yes. The answer is no.",
    "Each frame of the video is shown to the model as one visual token.",
    "Long videos are sampled at one frame per second.",
    "The shapes are drawn with sharp edges and bright colours.",
    "There is a small black dot next to the large white square.",
    "How many times does the ball bounce? It bounces seven times.",
    "What is the total number of shapes? The total is nine.",
    "I'm not sure, but it's probably the red one. They're moving fast.",
    "Question: what colour is the background? Answer: the background is black.",
)


def special_token_id(tok: PreTrainedTokenizerFast, name: str) -> int:
    """Id of the special token ``<|name|>`` (``name`` without the ``<|``/``|>`` brackets)."""
    token_id = tok.convert_tokens_to_ids(f"<|{name}|>")
    if token_id is None or token_id == tok.unk_token_id:
        raise KeyError(name)
    return int(token_id)


def generation_eos_ids(tok: PreTrainedTokenizerFast) -> list[int]:
    """Ids that end generation: ``[eot_id, eom_id, end_of_text]`` (Llama-3.1's generation_config eos ids)."""
    return [special_token_id(tok, name) for name in ("eot_id", "eom_id", "end_of_text")]


def _train_bpe(vocab_size: int, corpus: Iterable[str]) -> Tokenizer:
    """Train the byte-level BPE and return it with a vocabulary of exactly ``vocab_size`` entries."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False), byte_level]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)

    # Rebuild the model from its JSON: set Llama-3's ignore_merges, and pad a vocabulary the corpus could not fill
    # with placeholders no text encodes to, so that the special tokens land at vocab_size + offset.
    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    for i in range(vocab_size - len(vocab)):
        vocab[f"<|vocab_pad_{i}|>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in data["model"]["merges"]]
    tokenizer.model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True)
    return tokenizer


def llama3_style_pipeline(vocab_size: int = 512, corpus: Iterable[str] | None = None) -> Tokenizer:
    """The `tokenizers` pipeline alone (trained BPE, Llama-3's pre-tokenizer and decoder, the special tokens, the
    bos-prepending post-processor), for callers that wrap it in a transformers class of their own version."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the byte alphabet), got {vocab_size}")
    tokenizer = _train_bpe(vocab_size, DEFAULT_CORPUS if corpus is None else corpus)
    if tokenizer.get_vocab_size() != vocab_size:
        raise AssertionError(f"trained vocabulary has {tokenizer.get_vocab_size()} entries, not {vocab_size}")

    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos_id = vocab_size + SPECIAL_TOKEN_OFFSETS["begin_of_text"]
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN}:0 $A:0",
                pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return tokenizer


def build_llama3_style_tokenizer(
    out_dir: str | Path, vocab_size: int = 512, corpus: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train, save to ``out_dir`` and reload a small Llama-3.1-Instruct-style tokenizer.

    ``vocab_size`` is the regular vocabulary (>= 256, the byte alphabet); the 11 special tokens take ids
    ``vocab_size`` to ``vocab_size + 10``, so ``len(tok) == vocab_size + 11``. No pad token is set, as in Llama-3.1;
    callers that pad can set ``tok.pad_token = "<|finetune_right_pad_id|>"``.
    """
    fast = PreTrainedTokenizerFast(
        tokenizer_object=llama3_style_pipeline(vocab_size, corpus),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir, save_jinja_files=False)
    return AutoTokenizer.from_pretrained(out_dir)
