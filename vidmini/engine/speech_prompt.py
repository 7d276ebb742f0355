"""Heard speech in a question's prompt: the transcript lines of the range asked about, with their times, written
into the user's text before the question, within a budget of tokens.

The lines are part of the question's text (Q, after the image placeholder), so they go through the pre-fusion
layers with every fused frame like any question text — what LLaVA-Mini was trained on; P, cached at ingest, does
not change. The fusion cost grows with Q's length, hence the explicit budget (`DEFAULT_SPEECH_TOKENS`).

    <image>
    Heard speech:
    [0:12] good morning everyone
    [0:45] the red apple is on the table

    What is on the table?

Choosing under the budget: lines nearest the times the question names come first (without named times: the
lines sharing most words with the question, when a `relevance` is given), ties earliest first; a line that does
not fit is left out whole (a later, shorter one may still fit); the chosen lines are shown in time order. The
budget counts the tokens the block adds to the prompt, with the model's tokenizer: exactly, not estimated.
No lines (no transcript, nothing said in the range, speech off): the prompt is the question's alone, unchanged.

This module takes segment-like objects (`start`, `end`, `text`) and imports nothing from `vidmini.speech`: the
service hands the transcript in (`SpeechContext`). Importable without torch (`service.options` reads the default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vidmini.common.timefmt import clock

DEFAULT_SPEECH_TOKENS = 256  # the default budget: about 20 lines of speech, ~10x a short question's own tokens
SPEECH_HEADER = "Heard speech:\n"


@dataclass(frozen=True)
class HeardLine:
    """One transcript line as the prompt shows it: its times (seconds on the video's clock) and its text."""

    start: float
    end: float
    text: str

    def render(self) -> str:
        return f"[{clock(self.start)}] {self.text}\n"

    def to_json(self) -> dict:
        return {"start": self.start, "end": self.end, "text": self.text}


@dataclass(frozen=True)
class SpeechContext:
    """Where a question's heard speech comes from. `segments(start, end)`: the transcript's segments overlapping
    [start, end] (None: open), in time order; `budget`: tokens the speech may add to the prompt; `relevance(question,
    text)`: how much a line shares with the question (higher first when the question names no time)."""

    segments: Callable[[float | None, float | None], Sequence]
    budget: int = DEFAULT_SPEECH_TOKENS
    relevance: Callable[[str, str], float] | None = None


def with_speech(question: str, lines: Sequence[HeardLine]) -> str:
    """The user's text: the heard speech block, a blank line, the question; the question alone without lines."""
    if not lines:
        return question
    return SPEECH_HEADER + "".join(line.render() for line in lines) + "\n" + question


def speech_cost(tokenizer, question: str, lines: Sequence[HeardLine], style: str = "reference") -> int:
    """Tokens the lines add to the question's part of the prompt (Q), as the model's tokenizer counts them."""
    if not lines:
        return 0
    from vidmini.engine.prompt import build_prompt

    return (len(build_prompt(tokenizer, with_speech(question, lines), style).question)
            - len(build_prompt(tokenizer, question, style).question))


def _distance(start: float, end: float, focus: Sequence[float]) -> float:
    """Seconds from [start, end] to the nearest focus time (0 when one lies inside)."""
    return min(max(0.0, start - t, t - end) for t in focus)


def choose_lines(tokenizer, question: str, segments: Sequence, budget: int, focus: Sequence[float] = (),
                 relevance: Callable[[str, str], float] | None = None, style: str = "reference") -> list[HeardLine]:
    """The lines that go into the prompt, in time order: nearest `focus` (the question's named times) first, then
    most `relevance`, then earliest; each taken when it still fits `budget`, else left out whole. The result's
    `speech_cost` is at most `budget`."""
    lines = [HeardLine(float(s.start), float(s.end), " ".join(str(s.text).split())) for s in segments]
    lines = [line for line in lines if line.text]
    if budget <= 0 or not lines:
        return []

    def rank(line: HeardLine) -> tuple:
        near = _distance(line.start, line.end, focus) if focus else 0.0
        return (near, -(relevance(question, line.text) if relevance else 0.0), line.start, line.end)

    ordered = sorted(dict.fromkeys(lines), key=rank)  # a line said twice at the same time is one line
    # per-line costs (each line ends in a newline: the split is at line boundaries, so they add up), then the
    # block's own cost (header, the blank line) measured exactly
    costs = tokenizer([line.render() for line in ordered], add_special_tokens=False).input_ids
    used = speech_cost(tokenizer, question, [ordered[0]], style) - len(costs[0])  # header + separator
    chosen: list[int] = []
    for i, ids in enumerate(costs):
        if used + len(ids) <= budget:
            chosen.append(i)
            used += len(ids)
    picked = [ordered[i] for i in chosen]
    # exact check: a tokenizer may merge across a boundary; drop the farthest taken until the block fits
    while picked and speech_cost(tokenizer, question, sorted(picked, key=lambda x: (x.start, x.end)), style) > budget:
        picked.pop()
    return sorted(picked, key=lambda x: (x.start, x.end))


def lines_for(tokenizer, question: str, time_range, speech: SpeechContext, question_times: bool = True,
              style: str = "reference") -> list[HeardLine]:
    """The lines a question's prompt carries: those of `time_range` (a TimeRange; None: the whole video), nearest
    the times the question names first (when `question_times`), within `speech.budget` tokens."""
    from vidmini.engine.timerange import times_in_question

    lo, hi = (None, None) if time_range is None else (time_range.start, time_range.end)
    focus = times_in_question(question) if question_times else []
    return choose_lines(tokenizer, question, speech.segments(lo, hi), speech.budget, focus, speech.relevance, style)
