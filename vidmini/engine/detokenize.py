"""Streaming an answer's text token by token without decoding the whole answer again at every token.

Decoding the full token list per token costs O(n²) over an answer (and a service streams many answers at once).
`IncrementalDetokenizer` decodes only a short window: the tokens of the last piece it gave, as context, plus
those after them. The new piece is what the window's text adds to the text of its context tokens. The context
matters: a SentencePiece token's leading space, or a tokenizer's clean-up of spaces before punctuation, show
only next to the token before. A piece is held back while the text ends in an incomplete UTF-8 sequence ("�",
a byte-fallback character split over tokens) and given whole once it completes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["IncrementalDetokenizer"]

INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """`push(token_id)` returns the text that token adds (often "", while held back); `flush()` what is left at
    the end. `decode(ids) -> str` is the tokenizer's decode (with the caller's special-token handling)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._context = 0  # the window starts here: the first token of the last piece given
        self._given = 0  # tokens whose text has been given

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._take(final=False)

    def flush(self) -> str:
        """What is left after the last token: text held back for an incomplete character, as decoded."""
        return self._take(final=True) if self._given < len(self._ids) else ""

    def _take(self, final: bool) -> str:
        before = self._decode(self._ids[self._context:self._given])
        after = self._decode(self._ids[self._context:])
        if len(after) <= len(before) or not after.startswith(before) or (after.endswith(INCOMPLETE) and not final):
            return ""
        self._context, self._given = self._given, len(self._ids)
        return after[len(before):]
