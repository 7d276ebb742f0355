"""The decord backend (optional: pip install vidmini[decord]): decord's VideoReader behind the same rule.

Frame times come from `VideoReader.get_frame_timestamp` (read in chunks, so memory does not grow with the
video); the `hold` rule picks the frame for each sampling time and `get_batch` decodes the picked frames a
chunk at a time. Limits, all from decord: times are float32 seconds, snapped here to the stream time base
(exact up to about an hour at common time bases); only the container's default video stream; decord applies
the display rotation itself; scaling uses decord's own filter (no `interpolation` choice); damage
raises inside decord, so no gaps are recorded and an undecodable frame ends the pass with CorruptMedia.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from vidmini.ingest.decode_common import (
    Decoded,
    SampledFrame,
    SamplerStats,
    SampleSpec,
    deinterlace,
    hold,
)
from vidmini.ingest.errors import CorruptMedia, IngestError, NotAVideo, one_line
from vidmini.ingest.probe import ProbeInfo, probe, source_name

CHUNK = 512  # frame times read per call
BATCH_BYTES = 48 << 20  # pictures decoded per get_batch call: at most this much RGB (1080p: 8 frames)


def _frames(vr, tb: Fraction, stats: SamplerStats) -> Iterator[Decoded]:
    origin = None
    for first in range(0, len(vr), CHUNK):
        times = vr.get_frame_timestamp(range(first, min(len(vr), first + CHUNK)))
        for i, (start, stop) in enumerate(times.tolist(), start=first):
            tick, end_tick = round(Fraction(start) / tb), round(Fraction(stop) / tb)
            if origin is None:
                origin = tick
            duration = (end_tick - tick) * tb if end_tick > tick else None
            yield Decoded((tick - origin) * tb, i, duration, lambda i=i: i)


def sample_decord(spec: SampleSpec, stats: SamplerStats, info: ProbeInfo | None) -> Iterator[SampledFrame]:
    """The decord backend: same rule and fields as the PyAV one, within decord's limits (module docstring)."""
    import decord

    name = source_name(spec.source)
    if not isinstance(spec.source, str | Path):
        raise IngestError(f"{name}: the decord backend reads paths, not file objects")
    info = info or probe(spec.source, stream=spec.stream)
    default = probe(spec.source).stream_index
    if info.stream_index != default:
        raise NotAVideo(f"{name}: the decord backend reads only the default video stream ({default})")
    kwargs = {}
    if spec.size is not None and not spec.deinterlace:
        kwargs = {"width": spec.size[0], "height": spec.size[1]}  # decord scales after its own rotation
    try:
        vr = decord.VideoReader(str(spec.source), ctx=decord.cpu(0), num_threads=0, **kwargs)
    except decord.DECORDError as e:
        raise CorruptMedia(f"{name}: decord cannot open it ({one_line(e)})") from None
    stats.strategy = "decord VideoReader, get_batch of the picked frames"
    tb = Fraction(info.time_base)
    nominal = 1 / Fraction(info.avg_fps).limit_denominator(100_000) if info.avg_fps else Fraction(1, 25)

    def picture(rgb: np.ndarray) -> np.ndarray:
        if spec.deinterlace and info.interlaced:
            rgb = deinterlace(rgb)
            if spec.size is not None:
                import av

                rgb = av.VideoFrame.from_ndarray(rgb, format="rgb24").to_ndarray(
                    width=spec.size[0], height=spec.size[1], format="rgb24", interpolation=spec.sws_interpolation)
        return rgb

    w, h = spec.size or (info.display_width, info.display_height)
    batch_len = max(1, min(CHUNK, BATCH_BYTES // max(1, w * h * 3)))

    def batches(events, by_frame: bool) -> Iterator[SampledFrame]:
        """Decode the picked frames a bounded batch at a time (decord is fastest on sorted batches)."""
        pending: list[tuple[int, Decoded]] = []
        for event in events:
            pending.append(event)
            if len(pending) == batch_len:
                yield from flush(pending, by_frame)
                pending = []
        yield from flush(pending, by_frame)

    def flush(pending: list[tuple[int, Decoded]], by_frame: bool) -> Iterator[SampledFrame]:
        if not pending:
            return
        wanted = sorted({d.index for _, d in pending})
        try:
            batch = vr.get_batch(wanted).asnumpy()
        except decord.DECORDError as e:
            raise CorruptMedia(f"{name}: decord failed to decode ({one_line(e)})") from None
        stats.frames_decoded += len(wanted)
        pictures = {i: picture(batch[j]) for j, i in enumerate(wanted)}
        used: set[int] = set()
        for k, d in pending:
            image = pictures[d.index]
            t = float(d.t) if by_frame else float(k * spec.step)
            yield SampledFrame(t, float(d.t), d.index, image.copy() if d.index in used else image)
            used.add(d.index)

    frames = _frames(vr, tb, stats)
    if spec.every_k:
        in_range = itertools.takewhile(lambda d: spec.end is None or d.t < spec.end, frames)
        picked = ((0, d) for d in in_range if d.index % spec.every_k == 0 and d.t >= spec.start)
        yield from batches(picked, by_frame=True)
    else:
        yield from batches(hold(frames, spec, stats, nominal), by_frame=False)
