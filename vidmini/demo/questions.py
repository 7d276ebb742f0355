"""Question families over second ranges of a `Timeline`, with answers exact by construction.

A question covers the inclusive integer seconds start_s..end_s (the frames a 1-fps sampler shows the
model). It is only asked where its answer is well defined for that whole range, e.g. a count question only
where the count never changes inside the range. `make_questions` samples fast from per-second numpy
facts; `answer_for` recomputes an answer independently from `truth_at`, as the check.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from vidmini.common.timefmt import clock
from vidmini.demo.world import KINDS, SHAPE_COLOURS, Timeline, truth_at

__all__ = ["FAMILIES", "ORDER_RE", "PRESENCE_RE", "Question", "answer_for", "make_questions", "range_questions", "timeline_facts"]

FAMILIES = ("presence", "attribute", "count", "order", "text", "scene")
COLOURS = tuple(SHAPE_COLOURS)
ZERO_COUNT_SHARE = 0.15  # at most this share of count questions answer "0"
ORDER_MIN_GAP_S = 2

PRESENCE_Q = "Is there a {colour} {kind}?"
ATTRIBUTE_Q = "What colour is the {kind}?"
COUNT_Q = "How many {kind}s are there?"
ORDER_Q = "Which appears first, the {kind1} or the {kind2}?"
TEXT_Q = "What word is shown?"
SCENE_Q = "What colour is the background?"

PRESENCE_RE = re.compile(r"Is there a (\w+) (\w+)\?")
_ATTRIBUTE_RE = re.compile(r"What colour is the (\w+)\?")
_COUNT_RE = re.compile(r"How many (\w+)s are there\?")
ORDER_RE = re.compile(r"Which appears first, the (\w+) or the (\w+)\?")


@dataclass(frozen=True)
class Question:
    family: str
    question: str  # no time phrase: the range is given by the frames shown
    answer: str
    start_s: int
    end_s: int  # inclusive

    def with_range(self) -> str:
        """The question with its range spelled out, for people: "Between 1:00 and 2:05, is there ...?"."""
        q = self.question[0].lower() + self.question[1:]
        if self.start_s == self.end_s:
            return f"At {clock(self.start_s)}, {q}"
        return f"Between {clock(self.start_s)} and {clock(self.end_s)}, {q}"

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ answer_for

def answer_for(timeline: Timeline, family: str, question_text: str, start_s: int, end_s: int) -> str | None:
    """The answer from the ground truth, or None when the question is not well defined for the range."""
    if not 0 <= start_s <= end_s < timeline.duration_s:
        return None
    truths = [truth_at(timeline, t) for t in range(start_s, end_s + 1)]
    if family == "presence":
        m = PRESENCE_RE.fullmatch(question_text)
        if not m or m[1] not in SHAPE_COLOURS or m[2] not in KINDS:
            return None
        hit = any(s.colour == m[1] and s.kind == m[2] for tr in truths for s in tr.shapes)
        return "yes" if hit else "no"
    if family == "attribute":
        m = _ATTRIBUTE_RE.fullmatch(question_text)
        if not m or m[1] not in KINDS:
            return None
        colours = {s.colour for tr in truths for s in tr.shapes if s.kind == m[1]}
        return colours.pop() if len(colours) == 1 else None
    if family == "count":
        m = _COUNT_RE.fullmatch(question_text)
        if not m or m[1] not in KINDS:
            return None
        counts = {sum(s.kind == m[1] for s in tr.shapes) for tr in truths}
        return str(counts.pop()) if len(counts) == 1 else None
    if family == "order":
        m = ORDER_RE.fullmatch(question_text)
        if not m or m[1] not in KINDS or m[2] not in KINDS or m[1] == m[2]:
            return None
        firsts = []
        for kind in (m[1], m[2]):
            seen = [tr.t for tr in truths if any(s.kind == kind for s in tr.shapes)]
            if not seen or seen[0] == start_s:
                return None
            firsts.append(seen[0])
        if abs(firsts[0] - firsts[1]) < ORDER_MIN_GAP_S:
            return None
        return m[1] if firsts[0] < firsts[1] else m[2]
    if family == "text":
        if question_text != TEXT_Q:
            return None
        words = {tr.word for tr in truths if tr.word is not None}
        return words.pop() if len(words) == 1 else None
    if family == "scene":
        if question_text != SCENE_Q:
            return None
        backgrounds = {tr.background for tr in truths}
        return backgrounds.pop() if len(backgrounds) == 1 else None
    return None


# ------------------------------------------------------------------------------------------------ facts

@dataclass
class _Facts:
    """Per-second arrays (length duration_s) derived straight from the timeline's events."""

    duration: int
    counts: np.ndarray  # (kinds, D) int: shapes of each kind visible
    colour_bits: np.ndarray  # (kinds, D) int: bit c set when a shape of that kind has colour c
    background: np.ndarray  # (D,) int: index into `backgrounds`
    backgrounds: list[str]
    word_spans: list[tuple[int, int, str]]  # (first, last) second and text of each shown word, in order
    present: list[np.ndarray] = field(default_factory=list)  # per kind: sorted seconds where it is visible

    @classmethod
    def build(cls, timeline: Timeline) -> _Facts:
        d = timeline.duration_s
        counts = np.zeros((len(KINDS), d), dtype=np.int16)
        bits = np.zeros((len(KINDS), d), dtype=np.int16)
        for s in timeline.shapes:
            a, b = _seconds(s.t_in, s.t_out, d)
            if a <= b:
                k = KINDS.index(s.kind)
                counts[k, a:b + 1] += 1
                bits[k, a:b + 1] |= 1 << COLOURS.index(s.colour)
        names = sorted({sc.background for sc in timeline.scenes})
        background = np.zeros(d, dtype=np.int16)
        for sc in timeline.scenes:
            a, b = _seconds(sc.start, sc.end, d)
            background[a:b + 1] = names.index(sc.background)
        spans = []
        for w in sorted(timeline.words, key=lambda w: w.t_in):
            a, b = _seconds(w.t_in, w.t_out, d)
            if a <= b:
                spans.append((a, b, w.text))
        return cls(duration=d, counts=counts, colour_bits=bits, background=background, backgrounds=names,
                   word_spans=spans, present=[np.flatnonzero(c > 0) for c in counts])


def _seconds(t_in: float, t_out: float, duration: int) -> tuple[int, int]:
    """First and last integer second k with t_in <= k < t_out, clipped to the video."""
    return max(0, math.ceil(t_in)), min(duration - 1, math.ceil(t_out) - 1)


def _run_around(ok: np.ndarray, anchor: int) -> tuple[int, int]:
    """The maximal interval [lo, hi] containing `anchor` where `ok` is true (ok[anchor] must be)."""
    bad_left = np.flatnonzero(~ok[:anchor])
    bad_right = np.flatnonzero(~ok[anchor + 1:])
    lo = int(bad_left[-1]) + 1 if bad_left.size else 0
    hi = anchor + int(bad_right[0]) if bad_right.size else ok.size - 1
    return lo, hi


# ----------------------------------------------------------------------------------------------- ranges

def _length(rng: np.random.Generator, lo: int, hi: int) -> int:
    """A range length in lo..hi (lo >= 1): often the longest, sometimes the shortest, else roughly
    log-uniform (a uniform doubling bucket, then uniform inside it; integer draws only, no libm)."""
    if hi <= lo:
        return lo
    u = rng.random()
    if u < 0.15:
        return hi
    if u < 0.2:
        return lo
    starts = [lo]
    while starts[-1] * 2 <= hi:
        starts.append(starts[-1] * 2)
    i = int(rng.integers(len(starts)))
    top = hi if i + 1 == len(starts) else starts[i + 1] - 1
    return int(rng.integers(starts[i], top + 1))


def _around(rng: np.random.Generator, lo: int, hi: int, anchor: int, cap: int) -> tuple[int, int]:
    """A random sub-interval of [lo, hi] that contains `anchor`, at most `cap` long."""
    n = _length(rng, 1, min(cap, hi - lo + 1))
    first = int(rng.integers(max(lo, anchor - n + 1), min(anchor, hi - n + 1) + 1))
    return first, first + n - 1


def _anywhere(rng: np.random.Generator, duration: int, cap: int, min_len: int = 1) -> tuple[int, int] | None:
    if min(cap, duration) < min_len:
        return None
    n = _length(rng, min_len, min(cap, duration))
    first = int(rng.integers(0, duration - n + 1))
    return first, first + n - 1


def _choose(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def _lagging(rng: np.random.Generator, tags: Counter, a: str, b: str) -> bool:
    """True when `a` should come next: the rarer of the two so far, a coin flip on a tie (keeps 50/50)."""
    if tags[a] == tags[b]:
        return bool(rng.random() < 0.5)
    return tags[a] < tags[b]


# ----------------------------------------------------------------------------------------------- makers

@dataclass
class _Ctx:
    facts: _Facts
    rng: np.random.Generator
    cap: int
    per_family: int
    tags: Counter  # answers so far, by balancing tag, for the current family


Made = tuple[Question, str] | None


def _presence(c: _Ctx) -> Made:
    f, rng = c.facts, c.rng
    span = _anywhere(rng, f.duration, c.cap)
    if span is None:
        return None
    s, e = span
    bits = np.bitwise_or.reduce(f.colour_bits[:, s:e + 1], axis=1)
    seen = [(col, kind) for k, kind in enumerate(KINDS) for i, col in enumerate(COLOURS) if bits[k] >> i & 1]
    if _lagging(rng, c.tags, "yes", "no"):
        if not seen:
            return None
        colour, kind = _choose(rng, seen)
        return Question("presence", PRESENCE_Q.format(colour=colour, kind=kind), "yes", s, e), "yes"
    unseen = [(col, kind) for kind in KINDS for col in COLOURS if (col, kind) not in seen]
    if not unseen:
        return None
    # Hard negatives (the kind is there in another colour, or the colour on another kind) test binding.
    kinds, cols = {k for _, k in seen}, {col for col, _ in seen}
    hard = [(col, kind) for col, kind in unseen if kind in kinds or col in cols]
    colour, kind = _choose(rng, hard if hard and rng.random() < 0.6 else unseen)
    return Question("presence", PRESENCE_Q.format(colour=colour, kind=kind), "no", s, e), "no"


def _attribute(c: _Ctx) -> Made:
    f, rng = c.facts, c.rng
    anchor = int(rng.integers(f.duration))
    here = [k for k in range(len(KINDS)) if f.colour_bits[k, anchor]]
    if not here:
        return None
    k = _choose(rng, here)
    bit = int(f.colour_bits[k, anchor])
    if bit & (bit - 1):  # two colours of this kind at once: no single answer
        return None
    lo, hi = _run_around((f.colour_bits[k] & ~bit) == 0, anchor)
    s, e = _around(rng, lo, hi, anchor, c.cap)
    colour = COLOURS[bit.bit_length() - 1]
    return Question("attribute", ATTRIBUTE_Q.format(kind=KINDS[k]), colour, s, e), colour


def _count(c: _Ctx) -> Made:
    f, rng = c.facts, c.rng
    anchor = int(rng.integers(f.duration))
    counts = f.counts[:, anchor]
    zero_quota = math.floor(ZERO_COUNT_SHARE * c.per_family)
    absent = [k for k in range(len(KINDS)) if counts[k] == 0]
    if absent and c.tags["zero"] < zero_quota and rng.random() < ZERO_COUNT_SHARE:
        k = _choose(rng, absent)
    else:
        here = [k for k in range(len(KINDS)) if counts[k] > 0]
        if not here:
            return None
        k = _choose(rng, here)
    lo, hi = _run_around(f.counts[k] == counts[k], anchor)
    s, e = _around(rng, lo, hi, anchor, c.cap)
    n = int(counts[k])
    return Question("count", COUNT_Q.format(kind=KINDS[k]), str(n), s, e), "zero" if n == 0 else "nonzero"


def _first_in(seconds: np.ndarray, s: int, e: int) -> int | None:
    i = int(np.searchsorted(seconds, s))
    return int(seconds[i]) if i < seconds.size and seconds[i] <= e else None


def _order(c: _Ctx) -> Made:
    """Anchor on a kind's onset, start the range before it while the kind is absent, end it after."""
    f, rng = c.facts, c.rng
    if min(c.cap, f.duration) < 3:
        return None
    k1 = int(rng.integers(len(KINDS)))
    seconds = f.present[k1]
    if seconds.size == 0:
        return None
    onsets = seconds[np.diff(seconds, prepend=-2) > 1]
    onsets = onsets[onsets >= 1]
    if onsets.size == 0:
        return None
    onset = int(_choose(rng, list(onsets)))
    i = int(np.searchsorted(seconds, onset))
    prev = int(seconds[i - 1]) if i > 0 else -1
    s = int(rng.integers(max(prev + 1, onset - c.cap + 2), onset))
    n = _length(rng, onset - s + 1, min(c.cap, f.duration - s))
    e = s + n - 1
    firsts = {k: _first_in(f.present[k], s, e) for k in range(len(KINDS))}
    pairs = [(a, b) for a in range(len(KINDS)) for b in range(a + 1, len(KINDS))
             if firsts[a] is not None and firsts[b] is not None and firsts[a] != s and firsts[b] != s
             and abs(firsts[a] - firsts[b]) >= ORDER_MIN_GAP_S]
    if not pairs:
        return None
    a, b = _choose(rng, pairs)
    answer, other = (a, b) if firsts[a] < firsts[b] else (b, a)
    answer_first = _lagging(rng, c.tags, "first", "second")
    named = (answer, other) if answer_first else (other, answer)
    text = ORDER_Q.format(kind1=KINDS[named[0]], kind2=KINDS[named[1]])
    return Question("order", text, KINDS[answer], s, e), "first" if answer_first else "second"


def _text(c: _Ctx) -> Made:
    f, rng = c.facts, c.rng
    if not f.word_spans:
        return None
    i = int(rng.integers(len(f.word_spans)))
    a, b, word = f.word_spans[i]
    lo = f.word_spans[i - 1][1] + 1 if i > 0 else 0
    hi = f.word_spans[i + 1][0] - 1 if i + 1 < len(f.word_spans) else f.duration - 1
    if b - a + 1 <= c.cap and rng.random() < 0.5:  # the whole showing, maybe with blank seconds around it
        extra = _length(rng, b - a + 1, min(c.cap, hi - lo + 1)) - (b - a + 1)
        left = int(rng.integers(max(0, extra - (hi - b)), min(extra, a - lo) + 1))
        s, e = a - left, b + extra - left
    else:  # part of it, from a random second of the showing
        s, e = _around(rng, lo, hi, int(rng.integers(a, b + 1)), c.cap)
    return Question("text", TEXT_Q, word, s, e), word


def _scene(c: _Ctx) -> Made:
    f, rng = c.facts, c.rng
    anchor = int(rng.integers(f.duration))
    lo, hi = _run_around(f.background == f.background[anchor], anchor)
    s, e = _around(rng, lo, hi, anchor, c.cap)
    name = f.backgrounds[int(f.background[anchor])]
    return Question("scene", SCENE_Q, name, s, e), name


_MAKERS = {"presence": _presence, "attribute": _attribute, "count": _count, "order": _order, "text": _text,
           "scene": _scene}


def make_questions(timeline: Timeline, rng: np.random.Generator, per_family: int,
                   max_range_s: int | None = None) -> list[Question]:
    """Up to `per_family` distinct questions per family (fewer when the video cannot support them).

    Deterministic given the rng state. Presence answers alternate yes/no and order answers alternate the
    named-first/named-second position, so both are balanced; "0" is at most 15% of count answers.
    """
    facts = _Facts.build(timeline)
    cap = facts.duration if max_range_s is None else max(1, min(facts.duration, int(max_range_s)))
    seen: set[tuple[str, str, int, int]] = set()
    out: list[Question] = []
    for family in FAMILIES:
        ctx = _Ctx(facts=facts, rng=rng, cap=cap, per_family=per_family, tags=Counter())
        got = 0
        for _ in range(per_family * 40 + 40):
            if got >= per_family:
                break
            made = _MAKERS[family](ctx)
            if made is None:
                continue
            q, tag = made
            key = (q.family, q.question, q.start_s, q.end_s)
            if key in seen:
                continue
            seen.add(key)
            ctx.tags[tag] += 1
            out.append(q)
            got += 1
    return out


def timeline_facts(timeline: Timeline) -> _Facts:
    """The per-second facts `range_questions` reads; build once per timeline."""
    return _Facts.build(timeline)


def range_questions(facts: _Facts, start_s: int, end_s: int) -> list[Question]:
    """Every well-defined question of every family about seconds start_s..end_s, each with the answer
    `answer_for` gives: what training asks several of against one clip (the clip's LLM pass is shared)."""
    if not 0 <= start_s <= end_s < facts.duration:
        return []
    s, e = start_s, end_s
    out = []
    bits = np.bitwise_or.reduce(facts.colour_bits[:, s:e + 1], axis=1)
    for k, kind in enumerate(KINDS):
        for i, colour in enumerate(COLOURS):
            yes = "yes" if bits[k] >> i & 1 else "no"
            out.append(Question("presence", PRESENCE_Q.format(colour=colour, kind=kind), yes, s, e))
    for k, kind in enumerate(KINDS):
        b = int(bits[k])
        if b and not b & (b - 1):
            out.append(Question("attribute", ATTRIBUTE_Q.format(kind=kind), COLOURS[b.bit_length() - 1], s, e))
    for k, kind in enumerate(KINDS):
        counts = facts.counts[k, s:e + 1]
        if (counts == counts[0]).all():
            out.append(Question("count", COUNT_Q.format(kind=kind), str(int(counts[0])), s, e))
    firsts = [_first_in(facts.present[k], s, e) for k in range(len(KINDS))]
    for a, kind1 in enumerate(KINDS):
        for b, kind2 in enumerate(KINDS):
            fa, fb = firsts[a], firsts[b]
            if a == b or fa is None or fb is None or s in (fa, fb) or abs(fa - fb) < ORDER_MIN_GAP_S:
                continue
            out.append(Question("order", ORDER_Q.format(kind1=kind1, kind2=kind2), kind1 if fa < fb else kind2, s, e))
    words = {w for a, b, w in facts.word_spans if a <= e and b >= s}
    if len(words) == 1:
        out.append(Question("text", TEXT_Q, words.pop(), s, e))
    backgrounds = set(facts.background[s:e + 1].tolist())
    if len(backgrounds) == 1:
        out.append(Question("scene", SCENE_Q, facts.backgrounds[backgrounds.pop()], s, e))
    return out
