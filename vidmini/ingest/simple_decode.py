"""A small, exact fixed-rate frame sampler for the CLI, until the fuller ingest pipeline replaces it.

Sampling rule: with ``origin`` the presentation time of the video stream's first decoded frame, the
sampling times are ``t_k = k / fps`` (relative to ``origin``) for k = 0, 1, ... while ``t_k < end``.
The frame returned for ``t_k`` is the frame *displayed* at ``t_k``: the last frame, in presentation
order, whose pts <= ``t_k``. This is a "sample and hold" rule, not ffmpeg's ``fps`` filter (which
rounds to the nearest frame), so a sampled frame never shows something from the future.

``end`` is the end of the *video stream*: last frame's pts + its duration (when a frame carries no
duration, the previous frame interval, else 1 / the stream's average rate). The container duration is
not used because it includes audio, which often runs past the last picture (safari.mp4: the video ends
at 10.51 s, the container at 10.54 s), and we would sample a frozen last frame.

Times are compared as exact fractions of the stream time base, so a frame whose pts equals a sampling
time exactly is always chosen (no float round-off at e.g. 1001/30000 time bases).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vidmini.ingest.errors import MediaError

__all__ = ["MediaError", "SampledFrames", "load_image", "media_kind", "sample_frames"]

log = logging.getLogger(__name__)

# Errors that PIL raises for files that are not (readable) images; plugins vary in what they raise.
_PIL_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class SampledFrames:
    """Frames sampled at a fixed rate, with the sampling time (seconds from the first frame) of each."""

    timestamps: list[float]
    frames: list[np.ndarray]  # each (H, W, 3) uint8 RGB, already rotated for display
    duration: float  # seconds from the first frame to the end of the video stream
    source_fps: float  # the stream's average frame rate (0.0 when unknown)


def _one_line(e: BaseException) -> str:
    """FFmpeg and PIL messages sometimes span lines; the CLI prints one."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise MediaError(f"no such file: {p}")
    if not p.is_file():
        raise MediaError(f"not a regular file: {p}")
    if p.stat().st_size == 0:
        raise MediaError(f"empty file (0 bytes): {p}")
    return p


def _pil_probe(p: Path) -> bool | None:
    """None: PIL cannot read it; False: a still image; True: an animated image (GIF, APNG, WebP...)."""
    try:
        with Image.open(p) as img:
            return bool(getattr(img, "is_animated", False))
    except _PIL_ERRORS:
        return None


def _video_frames_decodable(p: Path, need: int) -> tuple[int, str]:
    """How many of the first ``need`` video frames decode (0 with a reason when none)."""
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                return 0, "no video stream"
            n = 0
            for _ in container.decode(video=0):
                n += 1
                if n >= need:
                    break
            return n, "" if n else "no decodable video frames"
    except av.FFmpegError as e:
        return 0, _one_line(e)


def media_kind(path: str | Path) -> Literal["image", "video"]:
    """Image or video, decided by content rather than extension (files get renamed).

    Still images that PIL reads are "image". Animated images count as "video" when FFmpeg decodes at
    least two of their frames (else "image": PIL still gives the first frame). Anything else is a
    "video" if FFmpeg finds a video stream and decodes a frame from it; otherwise MediaError.
    """
    p = _check_file(path)
    animated = _pil_probe(p)
    if animated is False:
        return "image"
    if animated:
        return "video" if _video_frames_decodable(p, 2)[0] >= 2 else "image"
    n, reason = _video_frames_decodable(p, 1)
    if n:
        return "video"
    raise MediaError(f"not an image or a decodable video: {p} ({reason})")


def load_image(path: str | Path) -> Image.Image:
    """An RGB image, turned upright by its EXIF orientation (phone photos are stored sideways)."""
    p = _check_file(path)
    try:
        with Image.open(p) as img:
            img.load()
            return ImageOps.exif_transpose(img).convert("RGB")
    except _PIL_ERRORS as e:
        raise MediaError(f"cannot read image: {p} ({_one_line(e)})") from None


def _rotate(rgb: np.ndarray, rotation: float) -> np.ndarray:
    """Apply the display-matrix rotation (counter-clockwise degrees), as ffmpeg's autorotate does.

    Flips in the display matrix are ignored; they are very rare in real files.
    """
    k = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def _rgb(frame: av.VideoFrame) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")
    rotation = frame.rotation
    return _rotate(rgb, rotation) if rotation else rgb


def sample_frames(path: str | Path, fps: float = 1.0, max_frames: int | None = None) -> SampledFrames:
    """Sample the frame displayed at each t_k = k / fps (see the module docstring), decoding once in order.

    Only the chosen frames are converted to RGB and kept, so memory does not grow with video length.
    With ``max_frames`` decoding stops after that many samples (the video is cut, not subsampled).
    """
    if not (math.isfinite(float(fps)) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames!r}")
    p = _check_file(path)
    # Exact rational step, so that e.g. fps=0.3 gives t_k = 10k/3 exactly.
    exact = Fraction(float(fps))
    step = 1 / (exact.limit_denominator(1_000_000) or exact)
    try:
        container = av.open(str(p))
    except av.FFmpegError as e:
        raise MediaError(f"not a decodable video: {p} ({_one_line(e)})") from None

    with container:
        if not container.streams.video:
            raise MediaError(f"no video stream: {p}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        discard_all = getattr(getattr(av.stream, "Discard", None), "all", None)  # PyAV >= 14
        for other in container.streams:
            if other.index != stream.index and discard_all is not None:
                other.discard = discard_all  # the demuxer then skips their packets instead of reading them
        tb = stream.time_base or Fraction(1, 90_000)
        rate = stream.average_rate or stream.guessed_rate
        source_fps = float(rate) if rate else 0.0

        timestamps: list[float] = []
        frames: list[np.ndarray] = []
        origin: Fraction | None = None
        held: av.VideoFrame | None = None  # the last frame seen: the one on screen until the next one
        held_t = Fraction(0)  # its time, relative to origin
        held_rgb: np.ndarray | None = None  # its RGB, once converted
        interval: Fraction | None = None  # last interval between frames, for frames without pts/duration
        k = 0
        full = False
        decoded = 0

        def emit_until(t: Fraction) -> bool:
            """Emit the held frame for every sampling time before t; True once max_frames is reached."""
            nonlocal k, held_rgb
            while k * step < t:
                if held_rgb is None:
                    held_rgb = _rgb(held)
                    frames.append(held_rgb)
                else:  # the same picture held across samples (low-rate or VFR video): an independent copy
                    frames.append(held_rgb.copy())
                timestamps.append(float(k * step))
                k += 1
                if max_frames is not None and len(frames) >= max_frames:
                    return True
            return False

        try:
            for frame in container.decode(stream):
                decoded += 1
                ts = frame.pts if frame.pts is not None else frame.dts
                # Where a frame without any timestamp would be: right after the previous one.
                guess = (
                    Fraction(0)
                    if held is None
                    else (held_t + (interval or _frame_duration(held, tb) or _rate_interval(rate)))
                )
                if ts is None:
                    t = guess
                else:
                    if origin is None:
                        origin = Fraction(ts) * tb - guess
                    t = Fraction(ts) * tb - origin
                if held is not None:
                    if t > held_t:
                        interval = t - held_t
                    if emit_until(t):
                        full = True
                        break
                held, held_t, held_rgb = frame, t, None
        except av.FFmpegError as e:
            if held is None:
                raise MediaError(f"no decodable video frames: {p} ({_one_line(e)})") from None
            # A damaged tail: keep what decoded, as players do.
            log.warning("%s: decoding stopped after %d frames: %s", p, decoded, _one_line(e))

        if held is None:
            raise MediaError(f"no decodable video frames: {p}")
        if full:
            duration = _header_duration(stream, container, origin)
        else:
            last = _frame_duration(held, tb) or interval or _rate_interval(rate)
            end = held_t + last
            emit_until(end)
            if not frames:  # a lone frame of unknown (zero) length is still a picture: sample it at t=0
                emit_until(step)
            duration = float(end)
        if duration is None:  # stopped early and the header says nothing: what we know so far
            duration = float(held_t)
        return SampledFrames(timestamps=timestamps, frames=frames, duration=duration, source_fps=source_fps)


def _frame_duration(frame: av.VideoFrame | None, tb: Fraction) -> Fraction | None:
    """The frame's own duration in seconds, when the demuxer or decoder set one."""
    dur = getattr(frame, "duration", None) if frame is not None else None
    return Fraction(dur) * tb if dur else None


def _rate_interval(rate: Fraction | None) -> Fraction:
    return 1 / Fraction(rate) if rate else Fraction(0)


def _header_duration(
    stream: av.VideoStream, container: av.container.InputContainer, origin: Fraction | None
) -> float | None:
    """Video length from the headers, used only when we stop before the end (max_frames)."""
    tb = stream.time_base
    if stream.duration and tb:
        start = Fraction(stream.start_time or 0) * tb
        end = start + Fraction(stream.duration) * tb
    elif container.duration:
        end = Fraction(container.duration, 1_000_000) + Fraction(container.start_time or 0, 1_000_000)
    else:
        return None
    return float(end - (origin or 0))
