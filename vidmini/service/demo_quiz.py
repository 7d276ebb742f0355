"""The offline end-to-end demo (`vidmini demo`, `make demo`): a synthetic-world video (made once), ingested
into the library, and one question of each family asked over its own time range, with the world's truth."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vidmini.common.errors import UsageError
from vidmini.service.library import Library
from vidmini.service.options import AskOptions, IngestOptions

DEMO_ANSWER_TOKENS = 8  # the demo world's answers are one or two words


@dataclass
class QuizLine:
    question: str  # with its time range, as the world's question writer phrases it
    answer: str
    truth: str

    @property
    def right(self) -> bool:
        return self.answer.strip().lower() == self.truth.lower()


@dataclass
class DemoQuiz:
    model: str
    path: Path
    video_id: str
    frames: int
    lines: list[QuizLine] = field(default_factory=list)


def run_demo_quiz(library: Library, seconds: int, seed: int, on_progress: Callable | None = None,
                  announce: Callable[[Path], None] | None = None) -> DemoQuiz:
    from vidmini.demo.questions import make_questions
    from vidmini.demo.world import generate_timeline

    if not 10 <= seconds <= 3 * 3600:
        raise UsageError("--seconds must be between 10 and 10800")
    timeline = generate_timeline(seed, seconds)
    path = library.sample_path(seconds, seed, announce=announce)
    result = library.ingest(str(path), IngestOptions(), on_progress=on_progress)
    quiz = DemoQuiz(library.engine.name, path, result.video_id, result.frames)
    store = library.get_store(result.video_id)
    times = store.timestamps()
    seconds_at = np.rint(times).astype(int)
    for q in make_questions(timeline, np.random.default_rng(seed), per_family=1):
        index = np.flatnonzero((seconds_at >= q.start_s) & (seconds_at <= q.end_s))
        # the range as the frames' own times: the frames whose whole second lies in [start_s, end_s]
        options = AskOptions(max_new_tokens=DEMO_ANSWER_TOKENS, policy="all",
                             start=float(times[index[0]]), end=float(times[index[-1]]))
        got = library.answer(result.video_id, q.question, options)
        quiz.lines.append(QuizLine(q.with_range(), got.text, q.answer))
    return quiz
