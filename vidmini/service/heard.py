"""Speech in answers (issue 28): the transcript lines a question's prompt carries, and "what was said?" questions
answered from the transcript itself.

- `speech_context`: what a session needs to put a video's heard speech into a question's prompt
  (`vidmini.engine.speech_prompt`): its transcript's segments by range, the token budget, and a relevance (the
  question's words said in a line). None when speech is off, or the model is the shipped demo model (trained on
  prompts without speech: text it never saw would only disturb its answers about the pictures).
- `heard_answer`: for a question about the speech itself ("what word is said at 0:12?", "what did they say about
  X?", "when is X said?"), the transcript lines that answer it, with their times: the lines matching the
  question's words (the transcripts' text search), or without such words the lines of the range asked about,
  nearest the times the question names. Shown beside the model's answer as `heard`, the way "when" questions get
  `moments`: the demo model cannot answer such questions, and any model's answer can be checked against them.
"""

from __future__ import annotations

import re
from pathlib import Path

from vidmini.engine.speech_prompt import SpeechContext
from vidmini.engine.timerange import times_in_question
from vidmini.service.options import AskOptions

# `library` below is a `vidmini.service.library.Library` (not imported: the library imports this module)

__all__ = ["HEARD_ANSWERS", "heard_answer", "is_speech_question", "speech_context", "topic_terms"]

HEARD_ANSWERS = 5  # transcript lines given for a question about the speech
_SAY = (r"(?:say|says|said|saying|spoken|speak|speaks|spoke|speaking|mention|mentions|mentioned|mentioning|hear|"
        r"hears|heard|talk|talks|talked|talking|pronounce|pronounces|pronounced)")
SPEECH_QUESTION = re.compile(rf"^\s*(?:what|which|when|at what (?:time|point|moment))\b.*\b{_SAY}\b", re.I)
_CLOCK = re.compile(r"\d{1,3}:\d{2}(?::\d{2})?(?:\.\d+)?")
# who speaks and how: not what the question is about
_SPEAKERS = frozenset("""
speaker speakers person man woman men women people narrator lecturer presenter teacher host voice voices aloud loud
out audio sound exactly first last next word words hears speaking mentioning pronounce pronounces pronounced
""".split())


def speech_context(library, video_id: str | None, options: AskOptions, source: str | None = None
                   ) -> SpeechContext | None:
    """How a question about stored video `video_id` (or, without one, the local file `source`: the reference
    one-pass path) gets its heard speech, from the video's stored transcript; None when it gets none. Nothing is
    transcribed here: a file never ingested has no transcript yet."""
    if not options.speech or options.speech_tokens <= 0 or _is_demo_model(library):
        return None
    from vidmini.index.transcripts import query_terms, tokens
    from vidmini.speech.store import TranscriptStore

    if video_id is not None:
        video_fp = library.get_store(video_id).manifest["key"]["video_fp"]  # its transcripts' key
    elif source is not None and Path(source).is_file():
        from vidmini.common.fingerprint import fingerprint

        video_fp = fingerprint(source)
    else:
        return None

    def segments(start: float | None, end: float | None) -> list:
        try:
            best = TranscriptStore.best(library.root, video_fp)
            return best.segments(start, end) if best is not None else []
        except (OSError, ValueError, KeyError):  # a damaged transcript: the question goes on without speech
            return []

    def relevance(question: str, text: str) -> float:
        return float(len(set(query_terms(question)) & set(tokens(text))))

    return SpeechContext(segments, options.speech_tokens, relevance)


def _is_demo_model(library) -> bool:
    extra = getattr(library.engine.model.config, "extra", None) or {}
    return bool(extra.get("vidmini_demo"))


def is_speech_question(question: str) -> bool:
    """"What word is said?", "What did they say about X?", "When is X mentioned?": a question about the speech."""
    return bool(SPEECH_QUESTION.match(question))


def topic_terms(question: str) -> list[str]:
    """The words a speech question asks about ("what did she say about the budget?" → ["budget"]); empty when it
    names none ("what word is said at 0:12?")."""
    from vidmini.index.transcripts import STOPWORDS, tokens

    words = tokens(_CLOCK.sub(" ", question))
    return list(dict.fromkeys(w for w in words if w not in STOPWORDS and w not in _SPEAKERS and not w.isdigit()))


def heard_answer(library, question: str, video_id: str, time_range=None, k: int = HEARD_ANSWERS
                 ) -> list[dict]:
    """For a speech question about stored video `video_id`: up to k transcript lines {"start", "end", "text"}
    that answer it, best first, within `time_range` (a TimeRange, or its JSON dict; None: the whole video).
    Empty for other questions, or when nothing said matches."""
    if not is_speech_question(question):
        return []
    lo, hi = None, None
    if time_range is not None:
        lo, hi = (time_range["start"], time_range["end"]) if isinstance(time_range, dict) else \
            (time_range.start, time_range.end)
    terms = topic_terms(question)
    try:
        if terms:
            found = library.heard_search.search(" ".join(terms), video_id, k * 4)
            found = [m for m in found if (lo is None or m.end >= lo) and (hi is None or m.start <= hi)]
            return [{"start": m.start, "end": m.end, "text": m.text} for m in found[:k]]
        segments = library.transcript(video_id, lo, hi)
    except (OSError, ValueError, KeyError):
        return []
    focus = times_in_question(question)
    if focus:
        segments = sorted(segments, key=lambda s: (min(max(0.0, s.start - t, t - s.end) for t in focus), s.start))
    return [{"start": s.start, "end": s.end, "text": s.text} for s in segments[:k]]
