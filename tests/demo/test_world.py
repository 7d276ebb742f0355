"""The synthetic world: determinism, layout invariants, truth files, real mp4 output, question answers."""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter

import av
import numpy as np
import pytest
from PIL import Image

from vidmini.common.timefmt import clock
from vidmini.demo import render
from vidmini.demo.questions import (
    FAMILIES,
    Question,
    answer_for,
    make_questions,
    range_questions,
    timeline_facts,
)
from vidmini.demo.render import INK_RGB, render_frame, render_samples, write_video
from vidmini.demo.world import (
    BACKGROUNDS,
    KINDS,
    SHAPE_COLOURS,
    WORDS,
    Scene,
    ShapeSpec,
    Timeline,
    WordSpec,
    allowed_colours,
    band_box,
    cell_box,
    generate_timeline,
    inner_box,
    shape_box,
    truth_at,
    write_truth,
)

CASES = [(0, 1), (1, 7), (2, 45), (3, 300), (4, 1200)]  # (seed, duration_s)


def _is_half(x: float) -> bool:
    return x % 1 == 0.5


# ------------------------------------------------------------------------------------------ hand-built

def hand_timeline() -> Timeline:
    """Known truth by construction (see `test_hand_truth`)."""
    return Timeline(
        width=320, height=240, duration_s=10, fps=24, seed=-1,
        scenes=(Scene(0.0, 5.5, "gray"), Scene(5.5, 10.0, "black")),
        shapes=(
            ShapeSpec("circle", "red", 0, 60, 0.5, 4.5),
            ShapeSpec("square", "blue", 1, 50, 2.5, 5.5),
            ShapeSpec("circle", "red", 3, 70, 6.5, 9.5),
            ShapeSpec("star", "yellow", 2, 60, 7.5, 10.0),
        ),
        words=(WordSpec("CAT", 1.5, 3.5), WordSpec("7", 6.5, 8.5)),
    )


def test_hand_truth():
    tl = hand_timeline()
    seen = [(tr.background, tuple((s.kind, s.colour, s.cell) for s in tr.shapes), tr.word, tr.scene)
            for tr in (truth_at(tl, t) for t in range(10))]
    circle0, square1 = ("circle", "red", 0), ("square", "blue", 1)
    star2, circle3 = ("star", "yellow", 2), ("circle", "red", 3)
    assert seen == [
        ("gray", (), None, 0),
        ("gray", (circle0,), None, 0),
        ("gray", (circle0,), "CAT", 0),
        ("gray", (circle0, square1), "CAT", 0),
        ("gray", (circle0, square1), None, 0),
        ("gray", (square1,), None, 0),
        ("black", (), None, 1),
        ("black", (circle3,), "7", 1),
        ("black", (star2, circle3), "7", 1),
        ("black", (star2, circle3), None, 1),
    ]
    x0, y0, _, _ = inner_box(320, 240, 0)
    assert truth_at(tl, 1).shapes[0].bbox == (x0, y0, x0 + 60, y0 + 60)  # no motion: stays at the corner
    with pytest.raises(ValueError):
        truth_at(tl, 10)


@pytest.mark.parametrize(("family", "text", "start", "end", "expected"), [
    ("presence", "Is there a red circle?", 0, 0, "no"),
    ("presence", "Is there a red circle?", 0, 1, "yes"),
    ("presence", "Is there a red circle?", 5, 6, "no"),
    ("presence", "Is there a yellow star?", 9, 9, "yes"),
    ("presence", "Is there a blue circle?", 0, 9, "no"),
    ("attribute", "What colour is the circle?", 0, 9, "red"),
    ("attribute", "What colour is the square?", 0, 9, "blue"),
    ("attribute", "What colour is the square?", 6, 9, None),
    ("attribute", "What colour is the star?", 0, 9, "yellow"),
    ("count", "How many circles are there?", 1, 4, "1"),
    ("count", "How many circles are there?", 0, 4, None),
    ("count", "How many circles are there?", 5, 6, "0"),
    ("count", "How many squares are there?", 3, 5, "1"),
    ("count", "How many squares are there?", 2, 5, None),
    ("count", "How many stars are there?", 8, 9, "1"),
    ("order", "Which appears first, the circle or the star?", 0, 9, "circle"),
    ("order", "Which appears first, the star or the square?", 0, 9, "square"),
    ("order", "Which appears first, the circle or the square?", 0, 9, "circle"),  # at 1 and 3
    ("order", "Which appears first, the square or the star?", 5, 9, None),  # square there at the start
    ("order", "Which appears first, the circle or the star?", 6, 9, None),  # at 7 and 8: too close
    ("order", "Which appears first, the star or the circle?", 6, 9, None),
    ("order", "Which appears first, the circle or the star?", 1, 9, None),  # circle there at the start
    ("text", "What word is shown?", 0, 9, None),
    ("text", "What word is shown?", 0, 5, "CAT"),
    ("text", "What word is shown?", 3, 6, "CAT"),
    ("text", "What word is shown?", 7, 8, "7"),
    ("text", "What word is shown?", 4, 6, None),
    ("scene", "What colour is the background?", 0, 9, None),
    ("scene", "What colour is the background?", 0, 5, "gray"),
    ("scene", "What colour is the background?", 6, 9, "black"),
    ("scene", "What colour is the background?", 5, 6, None),
    ("scene", "What colour is the background?", 8, 10, None),  # past the end
    ("count", "How many hexagons are there?", 0, 9, None),
])
def test_hand_answers(family, text, start, end, expected):
    assert answer_for(hand_timeline(), family, text, start, end) == expected


def test_hand_frames():
    tl = hand_timeline()
    f0, f1, f2 = render_frame(tl, 0), render_frame(tl, 1), render_frame(tl, 2)
    x0, y0, x1, y1 = truth_at(tl, 1).shapes[0].bbox
    centre = ((y0 + y1) // 2, (x0 + x1) // 2)
    assert tuple(f0[centre]) == BACKGROUNDS["gray"]
    assert tuple(f1[centre]) == SHAPE_COLOURS["red"]
    bx0, by0, bx1, by1 = band_box(320, 240)
    assert (f1[by0:by1] == BACKGROUNDS["gray"]).all()  # no word yet
    assert (f2[by0:by1] == INK_RGB).all(axis=2).sum() > 200  # "CAT" is drawn
    assert (f1[:by0] == f0[:by0]).all(axis=2).mean() > 0.9  # only the circle changed above the band


def all_question_texts() -> list[tuple[str, str]]:
    texts = [("presence", f"Is there a {c} {k}?") for k in KINDS for c in SHAPE_COLOURS]
    texts += [("attribute", f"What colour is the {k}?") for k in KINDS]
    texts += [("count", f"How many {k}s are there?") for k in KINDS]
    texts += [("order", f"Which appears first, the {a} or the {b}?") for a in KINDS for b in KINDS if a != b]
    return texts + [("text", "What word is shown?"), ("scene", "What colour is the background?")]


@pytest.mark.parametrize(("seed", "duration"), [(3, 90), (17, 90), (2024, 150)])
def test_range_questions_are_every_defined_question(seed, duration):
    """Per range: exactly the texts `answer_for` (the truth_at recheck) defines, with its answers."""
    tl = generate_timeline(seed, duration)
    facts = timeline_facts(tl)
    rng = np.random.default_rng(seed)
    ranges = [(0, 0), (0, duration - 1), (duration - 1, duration - 1)]
    for _ in range(80):
        a, b = sorted(int(x) for x in rng.integers(0, duration, size=2))
        ranges.append((a, b))
    families = Counter()
    for a, b in ranges:
        got = {(q.family, q.question): q.answer for q in range_questions(facts, a, b)}
        assert all(q.start_s == a and q.end_s == b for q in range_questions(facts, a, b))
        want = {}
        for family, text in all_question_texts():
            answer = answer_for(tl, family, text, a, b)
            if answer is not None:
                want[(family, text)] = answer
        assert got == want, (a, b)
        families.update(f for f, _ in got)
    assert set(families) == set(FAMILIES)
    assert range_questions(facts, 0, duration) == []  # past the end


def test_hand_questions_recheck():
    tl = hand_timeline()
    qs = make_questions(tl, np.random.default_rng(0), per_family=6)
    assert {q.family for q in qs} == set(FAMILIES)
    for q in qs:
        assert answer_for(tl, q.family, q.question, q.start_s, q.end_s) == q.answer, q


# ----------------------------------------------------------------------------------------- generation

def test_determinism():
    a, b, c = generate_timeline(11, 90), generate_timeline(11, 90), generate_timeline(12, 90)
    assert a.to_json() == b.to_json()
    assert a.to_json() != c.to_json()
    for t in (0.0, 3.0, 17.5, 41.0, 89.9):
        assert render_frame(a, t).tobytes() == render_frame(b, t).tobytes()
    assert any(render_frame(a, t).tobytes() != render_frame(c, t).tobytes() for t in (0.0, 30.0, 60.0))
    assert Timeline.from_json(a.to_json()) == a
    assert Timeline.from_json(a.to_json()).to_json() == a.to_json()


@pytest.mark.parametrize(("seed", "duration"), CASES)
def test_events_on_half_seconds(seed, duration):
    tl = generate_timeline(seed, duration)
    assert tl.scenes[0].start == 0.0 and tl.scenes[-1].end == duration
    for prev, nxt in itertools.pairwise(tl.scenes):
        assert prev.end == nxt.start and _is_half(nxt.start)
        assert prev.background != nxt.background
    for s in tl.shapes:
        assert s.t_in == 0.0 or _is_half(s.t_in)
        assert s.t_out == duration or _is_half(s.t_out)
    for w in tl.words:
        assert _is_half(w.t_in) and _is_half(w.t_out)


@pytest.mark.parametrize(("seed", "duration"), CASES)
def test_world_rules(seed, duration):
    tl = generate_timeline(seed, duration)
    for sc in tl.scenes[:-1]:
        assert 8 <= sc.end - sc.start <= 61
    side = min(cell_box(320, 240, 0)[2], cell_box(320, 240, 0)[3])
    for s in tl.shapes:
        assert 0.45 * side <= s.size <= 0.85 * side
        assert s.t_out - s.t_in >= 3 or s.t_out == duration
        scene = tl.scenes[tl.scene_at(s.t_in)]
        assert scene.start <= s.t_in and s.t_out <= scene.end  # a shape never crosses a cut
        assert s.colour in allowed_colours(scene.background) and s.kind in KINDS
    words = sorted(tl.words, key=lambda w: w.t_in)
    for w in words:
        assert 2 <= w.t_out - w.t_in <= 8 and w.text in WORDS and w.t_out <= duration
    for a, b in itertools.pairwise(words):
        assert b.t_in - a.t_out >= 3 and a.text != b.text
    if duration >= 1000:
        shown = sum(w.t_out - w.t_in for w in words) / duration
        assert 0.25 <= shown <= 0.45
        kinds = Counter(max(Counter(s.kind for s in truth_at(tl, t).shapes).values(), default=0)
                        for t in range(duration))
        assert sum(n for k, n in kinds.items() if k >= 2) > 0.2 * duration  # same kind twice is common


@pytest.mark.parametrize(("seed", "duration"), CASES[:4])
def test_shapes_stay_in_cells(seed, duration):
    tl = generate_timeline(seed, duration)
    for t in np.arange(0, duration, 1 / 6):
        cells = set()
        for s in tl.shapes_at(t):
            x0, y0, x1, y1 = shape_box(tl, s, t)
            ix0, iy0, ix1, iy1 = inner_box(tl.width, tl.height, s.cell)
            assert ix0 <= x0 and iy0 <= y0 and x1 <= ix1 and y1 <= iy1
            assert (x1 - x0, y1 - y0) == (s.size, s.size)
            assert s.cell not in cells
            cells.add(s.cell)


def test_boxes_move_and_bounce():
    tl = generate_timeline(5, 120)
    s = max(tl.shapes, key=lambda s: s.t_out - s.t_in)
    xs = {shape_box(tl, s, t)[0] for t in np.arange(s.t_in, s.t_out, 0.25)}
    assert len(xs) > 3


def test_truth_json(tmp_path):
    tl = generate_timeline(3, 37)
    path = write_truth(tl, tmp_path / "t.json")
    doc = json.loads(path.read_text())
    assert len(doc["truth"]) == 37 and [e["t"] for e in doc["truth"]] == list(range(37))
    assert Timeline.from_dict(doc["timeline"]) == tl
    for t in (0, 10, 36):
        assert doc["truth"][t] == truth_at(tl, t).to_dict()


def test_long_timeline_fast():
    t0 = time.perf_counter()
    tl = generate_timeline(9, 3 * 3600 + 5)
    assert time.perf_counter() - t0 < 2.0
    end = truth_at(tl, tl.duration_s - 1)
    assert end.scene == len(tl.scenes) - 1
    assert tl.scenes[-1].end == tl.duration_s and len(tl.scenes) > 150


# --------------------------------------------------------------------------------------------- render

def test_write_video(tmp_path):
    tl = generate_timeline(21, 12)
    path = write_video(tl, tmp_path / "v.mp4")
    assert path.with_suffix(".json").exists()
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 24
        assert (stream.width, stream.height) == (320, 240)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
    assert len(frames) == 12 * 24
    for k in range(12):
        diff = np.abs(frames[k * 24].astype(int) - render_frame(tl, k).astype(int)).mean()
        assert diff < 6, (k, diff)


def test_render_samples():
    tl = generate_timeline(4, 6)
    got = list(render_samples(tl))
    assert [t for t, _ in got] == [0, 1, 2, 3, 4, 5]
    assert all((f == render_frame(tl, t)).all() for t, f in got)
    assert [t for t, _ in render_samples(tl, fps=0.5)] == [0, 2, 4]
    half = list(render_samples(tl, fps=2.0))
    assert len(half) == 12 and (half[3][1] == render_frame(tl, 1.5)).all()


@pytest.mark.parametrize("freetype", [True, False])
def test_words_legible_at_80px(freetype):
    """Each letter stays a separate blob >= 6 px wide after a nearest resize of the frame to 80 x 80."""
    bx0, by0, bx1, by1 = band_box(320, 240)
    for word in WORDS:
        frame = np.full((240, 320, 3), 120, dtype=np.uint8)
        frame[by0:by1] = render._band(word, (120, 120, 120), 320, 240, freetype)
        ink_rows = (frame[by0:by1] == INK_RGB).all(axis=2).any(axis=1).sum()
        assert 0.6 * (by1 - by0) <= ink_rows <= 0.75 * (by1 - by0)
        small = np.asarray(Image.fromarray(frame).resize((80, 80), Image.NEAREST))
        cols = (small == INK_RGB).all(axis=2).any(axis=0)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], cols.astype(int), [0]])))
        widths = edges[1::2] - edges[::2]
        assert len(widths) == len(word) and widths.min() >= 6, (word, widths)


# ------------------------------------------------------------------------------------------ questions

@pytest.mark.parametrize(("seed", "duration", "max_range"), [(1, 120, None), (2, 600, 60), (3, 1800, None)])
def test_questions_recheck(seed, duration, max_range):
    tl = generate_timeline(seed, duration)
    qs = make_questions(tl, np.random.default_rng(seed), per_family=30, max_range_s=max_range)
    by_family = Counter(q.family for q in qs)
    assert set(by_family) == set(FAMILIES) and min(by_family.values()) >= 20
    assert len({(q.question, q.start_s, q.end_s) for q in qs}) == len(qs)
    for q in qs:
        assert 0 <= q.start_s <= q.end_s < duration
        if max_range is not None:
            assert q.end_s - q.start_s + 1 <= max_range
        assert answer_for(tl, q.family, q.question, q.start_s, q.end_s) == q.answer, q
    lengths = Counter(q.end_s - q.start_s + 1 for q in qs)
    assert lengths[1] > 0 and len(lengths) > 15  # single frames and varied lengths
    assert make_questions(tl, np.random.default_rng(seed), 30, max_range) == qs  # deterministic


def test_question_balance():
    tl = generate_timeline(8, 900)
    qs = make_questions(tl, np.random.default_rng(1), per_family=40)
    presence = Counter(q.answer for q in qs if q.family == "presence")
    assert presence == {"yes": 20, "no": 20}
    orders = [q for q in qs if q.family == "order"]
    named_first = sum(q.question.split(", the ")[1].startswith(q.answer + " ") for q in orders)
    assert abs(2 * named_first - len(orders)) <= 1
    counts = [q.answer for q in qs if q.family == "count"]
    assert counts.count("0") <= 0.15 * len(counts)
    assert all(a in {str(n) for n in range(7)} for a in counts)


def test_with_range():
    q = Question("presence", "Is there a green triangle?", "yes", 60, 125)
    assert q.with_range() == "Between 1:00 and 2:05, is there a green triangle?"
    assert Question("text", "What word is shown?", "CAT", 7, 7).with_range() == "At 0:07, what word is shown?"
    assert Question("scene", "What colour is the background?", "teal", 3599, 3725).with_range() == (
        "Between 59:59 and 1:02:05, what colour is the background?")
    assert clock(0) == "0:00" and clock(36000) == "10:00:00"
