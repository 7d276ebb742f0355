"""The synthetic world as an event timeline, and its exact per-second ground truth.

The timeline is event based (scenes, shape lives, word showings), so a 3-hour video is a few thousand
records, not millions of frames. Every event (cut, enter, leave, word on/off) lies on a half second
(k + 0.5 s), so what is visible at an integer second is unambiguous even when a decoder returns a frame
one frame early or late. The video's own edges (0 and `duration_s`) are boundaries, not events: a shape
or scene may start at 0.0 and anything may be cut off at `duration_s`.

Layout: the top of the frame is a 3 x 2 grid of cells (cell = row * 3 + col, row 0 on top); the bottom
band (about 22% of the height) is reserved for the word. A shape keeps its cell, size, kind and colour
for its whole life and drifts (bouncing) inside its cell, so shapes never overlap or leave their cell.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "BACKGROUNDS", "CELLS", "KINDS", "SHAPE_COLOURS", "WORDS", "Scene", "SecondTruth", "ShapeSpec",
    "ShapeTruth", "Timeline", "WordSpec", "allowed_colours", "band_box", "cell_box", "generate_timeline",
    "band_height", "inner_box", "shape_box", "size_limits", "truth_at", "truth_table", "write_truth",
]

KINDS = ("circle", "square", "triangle", "star")
SHAPE_COLOURS = {
    "red": (225, 45, 45),
    "green": (40, 185, 70),
    "blue": (60, 110, 245),
    "yellow": (245, 215, 40),
    "white": (245, 245, 245),
    "purple": (165, 70, 215),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "gray": (120, 120, 120),
    "navy": (20, 30, 90),
    "brown": (100, 60, 30),
    "teal": (20, 110, 110),
}
WORDS = ("CAT", "DOG", "SUN", "BOX", "RUN", "MAP", "KEY", "RED", "TOP", "FOX", "JAM", "OWL", "3", "5", "7", "9")

COLS, ROWS = 3, 2
CELLS = COLS * ROWS
BAND_FRACTION = 0.22
CELL_PAD = 3  # px kept free at each cell edge, so shapes in neighbouring cells never touch
SIZE_RANGE = (0.45, 0.85)  # shape side as a fraction of the cell's smaller side
MIN_CONTRAST = 100.0  # RGB distance below which a shape colour is not used on a background
SCENE_S = (8, 60)  # scene length range, seconds
MIN_TAIL_S = 4  # no cut closer than this to the end: the last scene is never a flash
MIN_LIFE_S = 3  # shortest shape life (unless the video itself is shorter)
WORD_ON_S = (2, 8)
WORD_GAP_S = (3, 16)  # mean on 5 s, mean gap 9.5 s: words visible ~35% of the time
SPEED_QUARTERS = (2, 40)  # |velocity| in quarter pixels per second: 0.5 .. 10 px/s, a slow drift
FORMAT_VERSION = 1


def allowed_colours(background: str) -> tuple[str, ...]:
    """Shape colours far enough from `background` to be seen (green on teal is the one pair left out)."""
    bg = np.array(BACKGROUNDS[background], dtype=float)
    return tuple(name for name, rgb in SHAPE_COLOURS.items()
                 if float(np.linalg.norm(np.array(rgb, dtype=float) - bg)) >= MIN_CONTRAST)


# ----------------------------------------------------------------------------------------------- layout

def band_height(height: int) -> int:
    return round(height * BAND_FRACTION)


def band_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the word band, end exclusive."""
    return 0, height - band_height(height), width, height


def cell_box(width: int, height: int, cell: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a grid cell, end exclusive; cells tile the area above the band exactly."""
    if not 0 <= cell < CELLS:
        raise ValueError(f"cell must be in 0..{CELLS - 1}, got {cell}")
    row, col = divmod(cell, COLS)
    grid_h = height - band_height(height)
    return col * width // COLS, row * grid_h // ROWS, (col + 1) * width // COLS, (row + 1) * grid_h // ROWS


def inner_box(width: int, height: int, cell: int) -> tuple[int, int, int, int]:
    """The part of a cell a shape may occupy (the cell minus CELL_PAD on every side)."""
    x0, y0, x1, y1 = cell_box(width, height, cell)
    return x0 + CELL_PAD, y0 + CELL_PAD, x1 - CELL_PAD, y1 - CELL_PAD


def size_limits(width: int, height: int) -> tuple[int, int]:
    """Smallest and largest shape side in px for this frame size."""
    x0, y0, x1, y1 = cell_box(width, height, 0)
    side = min(x1 - x0, y1 - y0)
    ix0, iy0, ix1, iy1 = inner_box(width, height, 0)
    inner = min(ix1 - ix0, iy1 - iy0)
    hi = min(math.floor(side * SIZE_RANGE[1]), inner)
    lo = min(math.ceil(side * SIZE_RANGE[0]), hi)
    if lo < 1:
        raise ValueError(f"frame {width}x{height} is too small for the {COLS}x{ROWS} grid")
    return lo, hi


# ---------------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class Scene:
    """A stretch between hard cuts with one background; visible for start <= t < end."""

    start: float
    end: float
    background: str


@dataclass(frozen=True)
class ShapeSpec:
    """One shape's whole life: visible for t_in <= t < t_out.

    Motion: the top-left offset inside the cell's inner box starts at (x0, y0) px and moves at (vx, vy)
    px/s, reflecting at the inner box's edges (a triangle wave), so the position is closed-form in t.
    """

    kind: str
    colour: str
    cell: int
    size: int
    t_in: float
    t_out: float
    x0: float = 0.0
    y0: float = 0.0
    vx: float = 0.0
    vy: float = 0.0


@dataclass(frozen=True)
class WordSpec:
    """A word shown in the bottom band for t_in <= t < t_out."""

    text: str
    t_in: float
    t_out: float


@dataclass(frozen=True)
class ShapeTruth:
    kind: str
    colour: str
    cell: int
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) in px, end exclusive


@dataclass(frozen=True)
class SecondTruth:
    """What is on screen at integer second t."""

    t: int
    scene: int
    background: str
    shapes: tuple[ShapeTruth, ...]  # sorted by cell
    word: str | None

    def to_dict(self) -> dict:
        return {"t": self.t, "scene": self.scene, "background": self.background, "word": self.word,
                "shapes": [{"kind": s.kind, "colour": s.colour, "cell": s.cell, "bbox": list(s.bbox)}
                           for s in self.shapes]}


@dataclass
class _Index:
    """Sorted start times for O(log n) lookups at any t, built lazily once per timeline."""

    scene_starts: list[float]
    shapes: list[ShapeSpec]  # sorted by t_in
    shape_starts: list[float]
    max_life: float
    words: list[WordSpec]  # sorted by t_in
    word_starts: list[float]


@dataclass
class Timeline:
    width: int
    height: int
    duration_s: int
    fps: int
    seed: int
    scenes: tuple[Scene, ...]
    shapes: tuple[ShapeSpec, ...]
    words: tuple[WordSpec, ...]
    _index: _Index | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def frame_count(self) -> int:
        return self.duration_s * self.fps

    def index(self) -> _Index:
        if self._index is None:
            shapes = sorted(self.shapes, key=lambda s: (s.t_in, s.cell))
            words = sorted(self.words, key=lambda w: w.t_in)
            self._index = _Index(
                scene_starts=[s.start for s in self.scenes], shapes=shapes,
                shape_starts=[s.t_in for s in shapes],
                max_life=max((s.t_out - s.t_in for s in shapes), default=0.0),
                words=words, word_starts=[w.t_in for w in words])
        return self._index

    def scene_at(self, t: float) -> int:
        """Index of the scene visible at time t (clamped to the first/last scene)."""
        return max(0, bisect_right(self.index().scene_starts, t) - 1)

    def shapes_at(self, t: float) -> list[ShapeSpec]:
        """Shapes visible at time t, sorted by cell."""
        ix = self.index()
        hi = bisect_right(ix.shape_starts, t)
        lo = bisect_right(ix.shape_starts, t - ix.max_life - 1.0)
        return sorted((s for s in ix.shapes[lo:hi] if s.t_in <= t < s.t_out), key=lambda s: s.cell)

    def word_at(self, t: float) -> str | None:
        ix = self.index()
        i = bisect_right(ix.word_starts, t) - 1
        if i >= 0 and ix.words[i].t_in <= t < ix.words[i].t_out:
            return ix.words[i].text
        return None

    def to_dict(self) -> dict:
        return {"version": FORMAT_VERSION, "width": self.width, "height": self.height,
                "duration_s": self.duration_s, "fps": self.fps, "seed": self.seed,
                "scenes": [asdict(s) for s in self.scenes], "shapes": [asdict(s) for s in self.shapes],
                "words": [asdict(w) for w in self.words]}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal timelines give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> Timeline:
        if d.get("version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"unsupported timeline version {d.get('version')!r}")
        return cls(width=int(d["width"]), height=int(d["height"]), duration_s=int(d["duration_s"]),
                   fps=int(d["fps"]), seed=int(d["seed"]),
                   scenes=tuple(Scene(**s) for s in d["scenes"]),
                   shapes=tuple(ShapeSpec(**s) for s in d["shapes"]),
                   words=tuple(WordSpec(**w) for w in d["words"]))

    @classmethod
    def from_json(cls, text: str) -> Timeline:
        return cls.from_dict(json.loads(text))


# ------------------------------------------------------------------------------------------------ motion

def _fold(p: float, span: float) -> float:
    """Position p reflected into [0, span] (bouncing between the walls)."""
    if span <= 0:
        return 0.0
    m = p % (2 * span)
    return m if m <= span else 2 * span - m


def shape_box(timeline: Timeline, shape: ShapeSpec, t: float) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1), end exclusive, of `shape` at time t; always inside its cell."""
    cx0, cy0, cx1, cy1 = inner_box(timeline.width, timeline.height, shape.cell)
    dt = t - shape.t_in
    x = cx0 + math.floor(_fold(shape.x0 + shape.vx * dt, cx1 - cx0 - shape.size) + 0.5)
    y = cy0 + math.floor(_fold(shape.y0 + shape.vy * dt, cy1 - cy0 - shape.size) + 0.5)
    return x, y, x + shape.size, y + shape.size


# ------------------------------------------------------------------------------------------------- truth

def truth_at(timeline: Timeline, t: int) -> SecondTruth:
    """Ground truth at integer second t (0 <= t < duration_s)."""
    if not 0 <= t < timeline.duration_s:
        raise ValueError(f"t must be in 0..{timeline.duration_s - 1}, got {t}")
    scene = timeline.scene_at(t)
    shapes = tuple(ShapeTruth(s.kind, s.colour, s.cell, shape_box(timeline, s, t)) for s in timeline.shapes_at(t))
    return SecondTruth(t=t, scene=scene, background=timeline.scenes[scene].background, shapes=shapes,
                       word=timeline.word_at(t))


def truth_table(timeline: Timeline) -> list[SecondTruth]:
    return [truth_at(timeline, t) for t in range(timeline.duration_s)]


def write_truth(timeline: Timeline, path: str | Path) -> Path:
    """JSON with the timeline and one truth entry per second 0..duration_s-1."""
    path = Path(path)
    doc = {"timeline": timeline.to_dict(), "truth": [s.to_dict() for s in truth_table(timeline)]}
    path.write_text(json.dumps(doc, separators=(",", ":")))
    return path


# --------------------------------------------------------------------------------------------- generator

def _half(x: float) -> float:
    """The half second at or just after an integer-or-half-second x: 0 -> 0.5, 7.5 -> 7.5."""
    return math.floor(x) + 0.5


def _scene_bounds(rng: np.random.Generator, duration_s: int) -> list[tuple[float, float]]:
    cuts: list[float] = []
    cut = float(rng.integers(SCENE_S[0], SCENE_S[1] + 1)) + 0.5
    while duration_s - cut >= MIN_TAIL_S:
        cuts.append(cut)
        cut += float(rng.integers(SCENE_S[0], SCENE_S[1] + 1))
    edges = [0.0, *cuts, float(duration_s)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _scene_shapes(rng: np.random.Generator, start: float, end: float, background: str,
                  width: int, height: int) -> list[ShapeSpec]:
    """Shape lives for one scene: each cell alternates empty and occupied stretches."""
    colours = allowed_colours(background)
    # Per-scene tastes: uneven kind weights make repeats (and absent kinds) common; a preferred colour
    # per kind makes same-kind shapes often share a colour, so attribute questions are answerable.
    # Integer weights only: no libm calls, so the stream is the same on every machine.
    kind_cum = np.cumsum(rng.integers(0, 5, size=len(KINDS)) + (rng.integers(len(KINDS)) == np.arange(len(KINDS))))
    preferred = {k: _pick(rng, colours) for k in KINDS}
    life_max = int(rng.integers(6, 31))
    gap_max = int(rng.integers(2, 16))
    p_start = int(rng.integers(3, 10)) / 10
    lo_size, hi_size = size_limits(width, height)
    out: list[ShapeSpec] = []
    for cell in range(CELLS):
        ix0, iy0, ix1, iy1 = inner_box(width, height, cell)
        t_in = start if rng.random() < p_start else _half(start + int(rng.integers(1, gap_max + 1)))
        while t_in == start or end - t_in >= MIN_LIFE_S:
            t_out = min(_half(t_in + int(rng.integers(MIN_LIFE_S, life_max + 1))), end)
            kind = KINDS[int(np.searchsorted(kind_cum, rng.integers(kind_cum[-1]), side="right"))]
            colour = preferred[kind] if rng.random() < 0.7 else _pick(rng, colours)
            size = int(rng.integers(lo_size, hi_size + 1))
            sx = int(rng.integers(SPEED_QUARTERS[0], SPEED_QUARTERS[1] + 1)) * (1 if rng.random() < 0.5 else -1)
            sy = int(rng.integers(SPEED_QUARTERS[0], SPEED_QUARTERS[1] + 1)) * (1 if rng.random() < 0.5 else -1)
            out.append(ShapeSpec(kind=kind, colour=colour, cell=cell, size=size, t_in=t_in, t_out=t_out,
                                 x0=float(rng.integers(0, ix1 - ix0 - size + 1)),
                                 y0=float(rng.integers(0, iy1 - iy0 - size + 1)), vx=sx / 4, vy=sy / 4))
            if t_out >= end:
                break
            t_in = t_out + int(rng.integers(1, gap_max + 1))
    return out


def _words(rng: np.random.Generator, duration_s: int) -> list[WordSpec]:
    out: list[WordSpec] = []
    t = _half(float(rng.integers(0, WORD_GAP_S[1] + 1)))
    prev = None
    while True:
        length = int(rng.integers(WORD_ON_S[0], WORD_ON_S[1] + 1))
        if t + length > duration_s:
            break
        text = _pick(rng, [w for w in WORDS if w != prev])
        out.append(WordSpec(text=text, t_in=t, t_out=t + length))
        prev = text
        t += length + int(rng.integers(WORD_GAP_S[0], WORD_GAP_S[1] + 1))
    return out


def generate_timeline(seed: int, duration_s: int, width: int = 320, height: int = 240, fps: int = 24) -> Timeline:
    """A random timeline, identical for identical arguments (numpy's PCG64 stream, integer draws)."""
    if duration_s < 1:
        raise ValueError(f"duration_s must be >= 1, got {duration_s}")
    if fps < 2:
        raise ValueError(f"fps must be >= 2 so that frames fall on both sides of a half second, got {fps}")
    size_limits(width, height)  # validates the frame size
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    shapes: list[ShapeSpec] = []
    names = tuple(BACKGROUNDS)
    for start, end in _scene_bounds(rng, duration_s):
        background = _pick(rng, [b for b in names if not scenes or b != scenes[-1].background])
        scenes.append(Scene(start=start, end=end, background=background))
        shapes.extend(_scene_shapes(rng, start, end, background, width, height))
    shapes.sort(key=lambda s: (s.t_in, s.cell))
    return Timeline(width=width, height=height, duration_s=duration_s, fps=fps, seed=seed,
                    scenes=tuple(scenes), shapes=tuple(shapes), words=tuple(_words(rng, duration_s)))
