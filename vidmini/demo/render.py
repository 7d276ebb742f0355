"""Drawing frames of a `Timeline` and writing them as real H.264 files.

Frames are pure functions of (timeline, t): flat colours, no noise, no anti-aliasing on the word, so the
same call gives the same bytes. The word is drawn in big thick letters with wide gaps so it stays legible
after a nearest resize to ~80 x 80 (each letter >= 6 px wide there).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vidmini.demo.world import BACKGROUNDS, SHAPE_COLOURS, Timeline, band_height, shape_box, write_truth

__all__ = ["frame_state", "render_frame", "render_samples", "write_video"]

PLATE_RGB = (235, 235, 235)  # the word sits dark-on-light on this plate, whatever the background
INK_RGB = (20, 20, 20)
CAP_FRACTION = 0.66  # cap height / band height, before the bold stroke (which adds ~4 px)
MIN_LETTER_AT_80 = 8  # px: narrower letters are stretched so they keep this width after a resize to 80 wide
STAR_INNER = 0.45  # inner / outer radius: a chunkier star than the classic 0.38, easier to see when small

# Fallback 5x7 block glyphs, used only when Pillow has no FreeType (load_default cannot take a size).
_GLYPHS = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".###."),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "#####"),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": (".###.", "#....", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "....#", ".###."),
}

# Star outline in a unit box: 10 vertices, outer radius fills the width, top point at the top edge.
_R = 0.5 / math.sin(math.radians(72))
_STAR = tuple(
    (0.5 + r * math.cos(a), _R + (1 - _R - _R * math.cos(math.radians(36))) / 2 + r * math.sin(a))
    for i in range(10)
    for r, a in [((_R if i % 2 == 0 else _R * STAR_INNER), math.radians(-90 + 36 * i))]
)


# ------------------------------------------------------------------------------------------------ word

@lru_cache(maxsize=64)
def _font(cap_px: int) -> ImageFont.FreeTypeFont | None:
    """The default FreeType font sized so capitals are `cap_px` tall; None without FreeType."""
    try:
        font = ImageFont.load_default(size=cap_px)
    except (TypeError, ImportError, OSError):
        return None
    if not isinstance(font, ImageFont.FreeTypeFont):
        return None
    l, t, r, b = font.getbbox("H")  # noqa: E741
    return ImageFont.load_default(size=max(4, round(cap_px * cap_px / max(1, b - t))))


def _glyph_masks(text: str, cap_px: int, use_freetype: bool) -> list[np.ndarray]:
    """One boolean mask per character, all with the same height, tight left/right."""
    font = _font(cap_px) if use_freetype else None
    if font is not None:
        stroke = max(1, cap_px // 18)  # thickens the regular face into a bold one
        boxes = [font.getbbox(ch, stroke_width=stroke) for ch in text]
        top, bottom = min(b[1] for b in boxes), max(b[3] for b in boxes)
        masks = []
        for ch, (l, _, r, _) in zip(text, boxes, strict=True):  # noqa: E741
            img = Image.new("L", (r - l, bottom - top), 0)
            draw = ImageDraw.Draw(img)
            draw.fontmode = "1"  # no anti-aliasing: crisp, exactly reproducible edges
            draw.text((-l, -top), ch, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
            masks.append(np.asarray(img) > 127)
        return masks
    sy = max(1, round(cap_px / 7))
    sx = sy + max(1, sy // 4)
    out = []
    for ch in text:
        rows = _GLYPHS.get(ch.upper(), ("#####",) * 7)
        bits = np.array([[c == "#" for c in row] for row in rows], dtype=bool)
        out.append(np.kron(bits, np.ones((sy, sx), dtype=bool)))
    return out


def _at_least(mask: np.ndarray, min_w: int) -> np.ndarray:
    """The glyph cropped to its ink columns, stretched (nearest) to at least `min_w` columns."""
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size:
        mask = mask[:, cols[0]:cols[-1] + 1]
    w = mask.shape[1]
    if 0 < w < min_w:
        mask = mask[:, np.arange(min_w) * w // min_w]
    return mask


@lru_cache(maxsize=256)
def _band(word: str | None, background: tuple[int, int, int], width: int, height: int,
          use_freetype: bool = True) -> np.ndarray:
    """The bottom band's pixels: background, plus the word on a light plate when there is one."""
    bh = band_height(height)
    band = np.empty((bh, width, 3), dtype=np.uint8)
    band[:] = background
    if not word:
        band.flags.writeable = False
        return band
    cap = max(5, round(bh * CAP_FRACTION))
    masks = _glyph_masks(word, cap, use_freetype)
    masks = [_at_least(m, math.ceil(MIN_LETTER_AT_80 * width / 80)) for m in masks]
    gap = max(5, cap // 5)  # >= 4 px so a gap column survives a 1/4 nearest resize
    text_w = sum(m.shape[1] for m in masks) + gap * (len(masks) - 1)
    text_h = max(m.shape[0] for m in masks)
    margin = max(2, (bh - text_h) // 2 - 1)
    px0 = max(0, (width - text_w) // 2 - 2 * margin)
    px1 = min(width, px0 + text_w + 4 * margin)
    py0 = max(0, (bh - text_h) // 2 - margin)
    band[py0:min(bh, py0 + text_h + 2 * margin), px0:px1] = PLATE_RGB
    x, y = max(0, (width - text_w) // 2), max(0, (bh - text_h) // 2)
    for m in masks:
        h, w = min(m.shape[0], bh - y), min(m.shape[1], width - x)
        if w <= 0:
            break
        band[y:y + h, x:x + w][m[:h, :w]] = INK_RGB
        x += m.shape[1] + gap
    band.flags.writeable = False
    return band


# ---------------------------------------------------------------------------------------------- frames

def frame_state(timeline: Timeline, t: float) -> tuple:
    """Everything that decides the pixels at time t (hashable), so equal states share one drawing."""
    background = BACKGROUNDS[timeline.scenes[timeline.scene_at(t)].background]
    shapes = tuple((s.kind, SHAPE_COLOURS[s.colour], shape_box(timeline, s, t)) for s in timeline.shapes_at(t))
    return background, shapes, timeline.word_at(t)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], rgb: tuple) -> None:
    x0, y0, x1, y1 = box
    s = x1 - x0 - 1  # drawing coordinates are inclusive
    if kind == "circle":
        draw.ellipse((x0, y0, x0 + s, y0 + s), fill=rgb)
    elif kind == "square":
        draw.rectangle((x0, y0, x0 + s, y0 + s), fill=rgb)
    elif kind == "triangle":
        draw.polygon([(x0 + s / 2, y0), (x0 + s, y0 + s), (x0, y0 + s)], fill=rgb)
    elif kind == "star":
        draw.polygon([(x0 + u * s, y0 + v * s) for u, v in _STAR], fill=rgb)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def _draw_state(state: tuple, width: int, height: int) -> np.ndarray:
    background, shapes, word = state
    grid_h = height - band_height(height)
    img = Image.new("RGB", (width, grid_h), background)
    draw = ImageDraw.Draw(img)
    for kind, rgb, box in shapes:
        _draw_shape(draw, kind, box, rgb)
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:grid_h] = np.asarray(img)
    frame[grid_h:] = _band(word, background, width, height)
    return frame


def render_frame(timeline: Timeline, t: float) -> np.ndarray:
    """The (H, W, 3) uint8 RGB picture at time t seconds."""
    return _draw_state(frame_state(timeline, t), timeline.width, timeline.height)


def render_samples(timeline: Timeline, fps: float = 1.0) -> Iterator[tuple[float, np.ndarray]]:
    """(t_k, frame) for t_k = k / fps < duration, without encoding a file.

    The frame is the one a sample-and-hold sampler (as in `ingest`) returns for t_k: the last video frame
    at or before t_k. At fps=1 that is exactly the frame at t = 0, 1, 2, ... .
    """
    step = 1 / Fraction(float(fps)).limit_denominator(1_000_000)
    k = 0
    while (t_k := k * step) < timeline.duration_s:
        index = math.floor(t_k * timeline.fps)
        yield float(t_k), render_frame(timeline, index / timeline.fps)
        k += 1


def write_video(timeline: Timeline, path: str | Path, crf: int = 20, preset: str = "veryfast") -> Path:
    """Encode every frame as H.264 (libx264, yuv420p) mp4 at timeline.fps; writes the truth JSON beside it.

    Frames whose state repeats the previous one (shapes move by whole pixels, a few times a second)
    reuse its converted picture, which is most of the speed.
    """
    if timeline.width % 2 or timeline.height % 2:
        raise ValueError(f"yuv420p needs even width and height, got {timeline.width}x{timeline.height}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    time_base = Fraction(1, timeline.fps)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=timeline.fps, options={"crf": str(crf), "preset": preset})
        stream.width, stream.height, stream.pix_fmt = timeline.width, timeline.height, "yuv420p"
        last_state, picture = None, None
        for i in range(timeline.frame_count):
            state = frame_state(timeline, i / timeline.fps)
            if state != last_state or picture is None:
                rgb = _draw_state(state, timeline.width, timeline.height)
                picture = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
                last_state = state
            picture.pts, picture.time_base = i, time_base
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))
    write_truth(timeline, path.with_suffix(".json"))
    return path
