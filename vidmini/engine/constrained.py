"""Answers held to a JSON schema (OpenAI's `response_format`), constrained by llguidance.

`JsonConstraint` serves one answer: before each token `decode` asks it for the logits with every token that
cannot continue a valid document set to -inf (`mask`), and after it tells it the chosen token (`advance`). The
stop ids (EOS) are allowed only where the text so far is a complete document; once the grammar can take no
further token (`done`, e.g. after an object's closing brace) the answer ends without one. The grammar itself
is llguidance's: vidmini writes no JSON grammar. Output is compact: no whitespace but ", " and ": " between
items (a schema's own "x-guidance" options override that).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable

import torch

from vidmini.common.errors import one_line

__all__ = ["JSON_OPTIONS", "JsonConstraint", "ll_tokenizer"]

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_lock = threading.Lock()
# HF tokenizer → {stop ids: llguidance tokenizer}; building one reads the whole vocabulary (up to ~1 s).
_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer, stop_ids: Iterable[int] = ()):
    """llguidance's view of a fast HF tokenizer, with `stop_ids` as its EOS tokens (the tokenizer's own EOS
    when empty); built once per tokenizer object and stop ids."""
    import llguidance.hf

    stops = tuple(int(i) for i in stop_ids)
    with _lock:
        per = _tokenizers.setdefault(tokenizer, {})
        found = per.get(stops)
        if found is None:
            try:
                found = llguidance.hf.from_tokenizer(tokenizer, eos_token=list(stops) or None)
            except ValueError as e:  # a slow (Python) tokenizer
                raise ValueError(f"JSON answers need a fast tokenizer: {one_line(e)}") from None
            per[stops] = found
        return found


class JsonConstraint:
    """The state of one answer held to `schema`. Not reusable: build one per answer.

    `tokenizer` is the engine's HF tokenizer; `stop_ids` the ids that end an answer (the SamplingConfig's).
    A schema llguidance cannot compile raises ValueError with a one-line message."""

    def __init__(self, tokenizer, schema: dict, stop_ids: Iterable[int] = ()) -> None:
        from llguidance import LLMatcher

        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema must be an object, not {type(schema).__name__}")
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise ValueError(f"invalid JSON schema: {one_line(e)}") from None
        self._tok = ll_tokenizer(tokenizer, stop_ids)
        self._matcher = LLMatcher(self._tok, grammar, log_level=0)
        if self._matcher.is_error():
            raise ValueError("invalid JSON schema: " + " ".join(self._matcher.get_error().split()))
        self._allowed: torch.Tensor | None = None  # the mask of the current step, computed once

    @property
    def done(self) -> bool:
        """True once no further token can be taken (the document is complete, or the matcher failed)."""
        return self._matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """True when the text so far is a complete document (it may still go on, e.g. a number's digits)."""
        return self._matcher.is_accepting()

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """(vocab_size,) bool: the tokens that may come next. Ids the tokenizer does not have are never allowed."""
        if self._allowed is None:
            bias = torch.frombuffer(bytearray(self._matcher.compute_logit_bias()), dtype=torch.uint8)
            self._allowed = bias != 0
        allowed = self._allowed
        if allowed.shape[0] >= vocab_size:
            return allowed[:vocab_size]
        return torch.cat([allowed, allowed.new_zeros(vocab_size - allowed.shape[0])])

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of (V,) `logits` with the tokens that may not come next set to -inf."""
        allowed = self.allowed(logits.shape[-1]).to(logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token: int) -> None:
        """Take the chosen token; a token the grammar does not allow is a bug in the caller (RuntimeError)."""
        self._allowed = None
        if not self._matcher.consume_token(int(token)):
            raise RuntimeError(f"token {token} does not fit the JSON schema: {self._matcher.get_error()}")
