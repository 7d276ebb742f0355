"""What the summarizer asks the model: window descriptions, chapter titles, and events as first-token probes.

Two vocabularies. A real video model gets plain prompts ("Describe what happens…", a yes/no question per event).
The shipped demo model only knows its synthetic world's templates (vidmini/demo/questions.py), so it gets those: the
background question for topics, the word question for text, and events such as "the word CAT is shown" become
"What word is shown?" with CAT as the answer looked for. `probe_for` tries the matchers in `MATCHERS` in order;
add one to teach the summarizer another model's vocabulary.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vidmini.common.timefmt import clock, span
from vidmini.demo.questions import SCENE_Q, TEXT_Q
from vidmini.demo.world import BACKGROUNDS, WORDS

if TYPE_CHECKING:  # torch-backed: imported where they run, so that `vidmini --help` does not load torch
    import torch

    from vidmini.engine.session import VideoSession
    from vidmini.engine.speech_prompt import SpeechContext


class Asker:
    """Questions over one stored video's frames (index ranges). First-token probabilities are cached for the token
    ids being tracked (the events' answer tokens), not whole vocabularies: a per-second scan for two events with
    the same template asks the model once per second, and a 3-hour scan keeps a few floats per second."""

    def __init__(self, session: VideoSession, policy: str = "auto", track: Sequence[int] = (),
                 speech: SpeechContext | None = None) -> None:
        self.session, self.policy, self.speech = session, policy, speech
        self.engine = session.engine
        self.timestamps = session.timestamps
        self.track = set(track)
        self._cache: dict[tuple[str, int, int], dict[int, float]] = {}
        self.questions = 0
        self.speech_used: list[tuple[float, float, list]] = []  # per answer asked with `heard`: its span, its lines

    def _bounds(self, frames: range) -> tuple[float, float]:
        return float(self.timestamps[frames.start]), float(self.timestamps[frames.stop - 1])

    def answer(self, question: str, frames: range, max_new_tokens: int = 32, heard: bool = False) -> str:
        """The greedy answer over exactly these frames; with `heard`, the speech of their span in the prompt too
        (when the summary has a transcript to give: `speech`)."""
        start, end = self._bounds(frames)
        from vidmini.engine.generate import SamplingConfig

        sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop_ids=self.engine.eos_ids)
        self.questions += 1
        speech = self.speech if heard else None
        got = self.session.ask(question, start, end, self.policy, sampling, question_times=False,
                               speech=speech).result()
        if speech is not None:
            self.speech_used.append((start, end, list(got.speech)))
        return got.text

    def probs(self, question: str, frames: range) -> torch.Tensor:
        """Softmax of the first answer token's logits over these frames (float32, vocabulary-sized; not cached)."""
        import torch

        start, end = self._bounds(frames)
        self.questions += 1
        logits = self.session.first_logits(question, start, end, self.policy)
        return torch.softmax(logits.reshape(-1, logits.shape[-1])[-1].float(), -1).cpu()

    def token_probs(self, question: str, frames: range, ids: Sequence[int]) -> dict[int, float]:
        """P(first answer token = id) for `ids` (and every tracked id), cached per question and frame range."""
        key = (question, frames.start, frames.stop)
        have = self._cache.get(key)
        if have is None or not set(ids) <= have.keys():
            probs = self.probs(question, frames)
            have = {**(have or {}), **{i: float(probs[i]) for i in self.track | set(ids)}}
            self._cache[key] = have
        return have


def first_token(tokenizer, text: str) -> int:
    return int(tokenizer.encode(text, add_special_tokens=False)[0])


@functools.lru_cache(maxsize=8)
def word_token_ids(tokenizer) -> torch.Tensor:
    """The first tokens of the synthetic world's words (`WORDS` order): the only answers the demo describer and its
    threshold's calibration read. Tokenized once per tokenizer, not once per window."""
    import torch

    return torch.tensor([first_token(tokenizer, w) for w in WORDS])


# ---- events --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EventProbe:
    """One user event as a question whose first answer token says whether the event is on screen.

    confidence = P(yes tokens) / (P(yes) + P(no)) when `no` is given (a yes/no question), else P(yes tokens)
    over the whole vocabulary (a template question whose answer names the thing looked for). `threshold` decides
    a single frame; `scan_threshold` (lower) marks a coarse window as worth refining frame by frame."""

    event: str
    question: str
    yes: tuple[int, ...]
    no: tuple[int, ...] = ()
    threshold: float = 0.5
    scan_threshold: float = 0.3

    @property
    def ids(self) -> tuple[int, ...]:
        return self.yes + self.no

    def confidence(self, probs) -> float:
        """From first-token probabilities (a vocabulary tensor or an id → probability mapping)."""
        p_yes = sum(float(probs[i]) for i in self.yes)
        if not self.no:
            return p_yes
        p_no = sum(float(probs[i]) for i in self.no)
        return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.0


Matcher = Callable[[str, object], EventProbe | None]

_WORD_EVENT = re.compile(r"(?:the )?(?:word|text|digit) ['\"]?(\w+)['\"]? (?:is |appears|gets )?"
                         r"(?:shown|displayed|visible|appears|on screen)", re.I)
_BACKGROUND_EVENT = re.compile(r"(?:the )?background (?:is|turns|becomes|goes) (\w+)", re.I)
# Calibrated on the shipped demo model with research/bench/calibrate_word_threshold.py: each frame of the videos of seeds 424242
# (80 s), 535353 (150 s) and 646464 (200 s), none a test seed, written as H.264 and ingested, asked on its own. Over the
# world's words only, a word on screen gets P(that word) >= 0.950 (median 0.997); a blank band gives every word
# P <= 0.935 (median 0.354; weights of 2026-12-03, research/bench/calibrate_word_threshold.log). Over the whole vocabulary
# a blank band's top token is often no word at all ("0", "1", end-of-turn at P up to 1.000), so the describer only
# ever chooses among the world's words.
DEMO_WORD_THRESHOLD = 0.945


def demo_world_matcher(event: str, engine) -> EventProbe | None:
    """The synthetic world's events for the demo model, asked with the templates it was trained on."""
    if not getattr(engine, "is_demo", False):
        return None
    tok = engine.tokenizer
    if m := _WORD_EVENT.fullmatch(event.strip().rstrip(".")):
        return EventProbe(event, TEXT_Q, (first_token(tok, m[1].upper()),), threshold=DEMO_WORD_THRESHOLD)
    if (m := _BACKGROUND_EVENT.fullmatch(event.strip().rstrip("."))) and m[1].lower() in BACKGROUNDS:
        return EventProbe(event, SCENE_Q, (first_token(tok, m[1].lower()),))
    return None


def yes_no_matcher(event: str, engine) -> EventProbe:
    """Any event for a general model: a yes/no question, read from the first token's Yes/No probabilities."""
    tok = engine.tokenizer
    yes = tuple(sorted({first_token(tok, w) for w in ("Yes", "yes", " Yes", " yes")}))
    no = tuple(sorted({first_token(tok, w) for w in ("No", "no", " No", " no")} - set(yes)))
    question = f'Does this happen in these frames: "{event.strip()}"? Answer yes or no.'
    return EventProbe(event, question, yes, no)


MATCHERS: list[Matcher] = [demo_world_matcher]


def probe_for(event: str, engine) -> EventProbe:
    if not event.strip():
        raise ValueError("an event needs a description")
    for matcher in MATCHERS:
        probe = matcher(event, engine)
        if probe is not None:
            return probe
    return yes_no_matcher(event, engine)


# ---- descriptions --------------------------------------------------------------------------------------------
@dataclass
class Description:
    """One window's description and the topic key adjacent windows are merged on."""

    text: str
    topic: str
    facts: dict = field(default_factory=dict)


class ModelDescriber:
    """Plain prompts for a general video model; summaries are the model's own over the window descriptions."""

    describe_q = "Describe what happens in these frames in one sentence."
    topic_q = "In at most four words, what is the topic of these frames?"
    title_q = "Give a short title, at most six words, for this part of the video."

    def describe(self, asker: Asker, frames: range) -> Description:
        text = asker.answer(self.describe_q, frames, 48)
        topic = re.sub(r"[^\w ]", "", asker.answer(self.topic_q, frames, 12).lower()).strip()
        return Description(text, topic)

    def chapter(self, asker: Asker, frames: range, parts: Sequence[Description], start: float, end: float,
                heard: Sequence = ()) -> tuple[str, list[str]]:
        """Title and two lines from the frames and the window notes, and from what was said in the chapter: the
        asker puts the span's transcript lines in these two prompts (a lecture is half speech)."""
        title = asker.answer(self.title_q, frames, 16, heard=True)
        notes = " ".join(p.text for p in parts)
        text = asker.answer(f"Notes on this part, in order: {notes}\nSummarize this part in two short sentences.",
                            frames, 64, heard=True)
        return title, two_lines(text)

    def overall(self, asker: Asker, frames: range, parts: Sequence[tuple[float, float, Description]]) -> str:
        notes = " ".join(f"[{span(a, b, always_range=True)}] {d.text}" for a, b, d in parts)
        return asker.answer(f"Notes on the video's parts, in order: {notes}\nSummarize the video in three "
                            "sentences.", frames, 96)


def two_lines(text: str) -> list[str]:
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]
    if len(sentences) <= 2:
        return (sentences + ["", ""])[:2]
    return [sentences[0], " ".join(sentences[1:])]


class DemoWorldDescriber:
    """The demo model's world in its own templates: a window is its background colour and the word shown (kept
    only when the model is sure, see DEMO_WORD_THRESHOLD); the topic is the background, as a scene is."""

    def describe(self, asker: Asker, frames: range) -> Description:
        background = asker.answer(SCENE_Q, frames, 4).lower()
        probs = asker.probs(TEXT_Q, frames)
        p, best = probs[word_token_ids(asker.engine.tokenizer)].max(-1)
        word = WORDS[int(best)] if float(p) >= DEMO_WORD_THRESHOLD else None
        text = f"{background.capitalize()} background, " + (f"the word {word} shown." if word else "no word shown.")
        return Description(text, background, {"background": background, "word": word})

    def chapter(self, asker: Asker, frames: range, parts: Sequence[Description], start: float, end: float,
                heard: Sequence = ()) -> tuple[str, list[str]]:
        """The demo model was trained without speech, so what was said (`heard`: the transcript's segments in the
        chapter) is added from the transcript itself: the title names its main spoken words, a line quotes it."""
        background = parts[0].facts["background"]
        words = list(dict.fromkeys(p.facts["word"] for p in parts if p.facts.get("word")))
        lines = [f"The background is {background} from {clock(start)} to {clock(end)}.",
                 f"Words shown: {', '.join(words)}." if words else "No words shown."]
        title = f"{background.capitalize()} scene"
        said = " ".join(s.text for s in heard if s.text.strip())
        if said:
            title += ": " + ", ".join(spoken_keywords(said))
            lines.append(f"Said: “{said}”")
        return title, lines

    def overall(self, asker: Asker, frames: range, parts: Sequence[tuple[float, float, Description]]) -> str:
        runs: list[list] = []
        for a, b, d in parts:
            if runs and runs[-1][2] == d.facts["background"]:
                runs[-1][1] = b
            else:
                runs.append([a, b, d.facts["background"]])
        words = list(dict.fromkeys(d.facts["word"] for _, _, d in parts if d.facts.get("word")))
        scenes = "; ".join(f"{bg} {span(a, b, always_range=True)}" for a, b, bg in runs)
        return (f"{len(runs)} background stretch{'es' if len(runs) != 1 else ''}: {scenes}. "
                + (f"Words shown: {', '.join(words)}." if words else "No words shown."))


def spoken_keywords(text: str, k: int = 2) -> list[str]:
    """The `k` words of `text` most likely to name its subject: stop words dropped, the longest ones, in the order
    they were said."""
    from vidmini.index.transcripts import query_terms

    terms = query_terms(text)
    longest = set(sorted(terms, key=len, reverse=True)[:k])
    return [t for t in terms if t in longest]


def describer_for(engine) -> DemoWorldDescriber | ModelDescriber:
    return DemoWorldDescriber() if getattr(engine, "is_demo", False) else ModelDescriber()


def frame_step(timestamps: np.ndarray) -> float:
    """The sampling interval (median gap between frames; 1 s for a single frame)."""
    return float(np.median(np.diff(timestamps))) if len(timestamps) > 1 else 1.0
