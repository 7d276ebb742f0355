"""What a source is before decoding it: duration, rates, start, rotation, codec, streams — or a typed error."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av

from ingest.errors import (
    CorruptMedia,
    NotAVideo,
    SourceNotFound,
    SourcePermissionError,
    SourceUnreachable,
    UnsupportedCodec,
    one_line,
)
from ingest.live import is_stream_url

OPEN_TIMEOUT_S = 10.0


@dataclass
class ProbeInfo:
    source: str
    duration_s: float | None
    avg_fps: float
    is_vfr: bool
    start_time_s: float
    rotation_deg: int
    codec: str
    pix_fmt: str
    bit_depth: int
    width: int
    height: int
    display_width: int
    display_height: int
    interlaced: bool
    stream_index: int
    video_streams: list[dict] = field(default_factory=list)
    audio_streams: list[dict] = field(default_factory=list)
    is_live: bool = False


def open_container(source, timeout_s: float = OPEN_TIMEOUT_S) -> av.container.InputContainer:
    """av.open with typed errors; URLs get a network timeout."""
    name = str(getattr(source, "name", source))
    if isinstance(source, str | Path) and not is_stream_url(str(source)):
        p = Path(source)
        if not p.exists():
            raise SourceNotFound(f"{name}: no such file")
        if p.is_dir():
            raise NotAVideo(f"{name}: is a directory")
        if not os.access(p, os.R_OK):
            raise SourcePermissionError(f"{name}: permission denied")
        if p.stat().st_size == 0:
            raise NotAVideo(f"{name}: empty file (0 bytes)")
    options = {}
    if isinstance(source, str) and is_stream_url(source):
        options = {"timeout": str(int(timeout_s * 1e6)), "rw_timeout": str(int(timeout_s * 1e6))}
    try:
        target = str(source) if isinstance(source, str | Path) else source
        return av.open(target, options=options, timeout=timeout_s if options else None)
    except PermissionError:
        raise SourcePermissionError(f"{name}: permission denied") from None
    except av.FFmpegError as e:
        if isinstance(source, str) and is_stream_url(source):
            raise SourceUnreachable(f"{name}: cannot open stream ({one_line(e)})") from None
        if getattr(e, "errno", None) == errno.EACCES:
            raise SourcePermissionError(f"{name}: permission denied") from None
        text = str(e).lower()
        if "moov atom not found" in text or "truncat" in text or "end of file" in text:
            raise CorruptMedia(f"{name}: truncated or missing its index ({one_line(e)})") from None
        raise NotAVideo(f"{name}: not a readable video ({one_line(e)})") from None
    except OSError as e:
        raise SourceUnreachable(f"{name}: {one_line(e)}") from None


def pick_stream(container, stream: int | None, name: str):
    videos = list(container.streams.video)
    if not videos:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise NotAVideo(f"{name}: no video stream (streams: {', '.join(kinds)})")
    if stream is None:
        try:
            return container.streams.best("video") or videos[0]
        except Exception:  # noqa: BLE001 - best() may fail on exotic inputs
            return videos[0]
    for s in videos:
        if s.index == stream:
            return s
    raise NotAVideo(f"{name}: no video stream with index {stream} (video streams: {[s.index for s in videos]})")


def _stream_dict(s) -> dict:
    rate = s.average_rate or s.guessed_rate
    cc = s.codec_context
    return {"index": s.index, "codec": cc.name if cc else "", "width": getattr(cc, "width", 0),
            "height": getattr(cc, "height", 0), "fps": float(rate) if rate else 0.0}


def probe(source, stream: int | None = None, scan_packets: int = 120) -> ProbeInfo:
    name = str(getattr(source, "name", source))
    live = isinstance(source, str) and is_stream_url(source)
    with open_container(source) as container:
        fmt_name = container.format.name if container.format else ""
        if fmt_name.endswith("_pipe") or fmt_name in ("image2", "gif", "apng", "webp"):
            if fmt_name not in ("gif", "apng", "webp") or sum(1 for _ in container.decode(video=0)) < 2:
                raise NotAVideo(f"{name}: is an image ({fmt_name}), not a video")
            container.seek(0)
        vs = pick_stream(container, stream, name)
        cc = vs.codec_context
        if cc is None or cc.name in ("", "none"):
            raise UnsupportedCodec(f"{name}: video codec is not supported by this FFmpeg build")
        try:
            av.codec.Codec(cc.name, "r")
        except Exception:  # noqa: BLE001
            raise UnsupportedCodec(f"{name}: no decoder for codec {cc.name!r}") from None
        tb = vs.time_base or Fraction(1, 90000)
        rate = vs.average_rate or vs.guessed_rate
        duration = None
        if vs.duration and tb:
            duration = float(vs.duration * tb)
        elif container.duration:
            duration = container.duration / 1e6
        start = float(vs.start_time * tb) if vs.start_time is not None else 0.0
        # variable frame rate: look at the spacing of the first packets' timestamps
        pts = []
        if not live:
            try:
                for packet in container.demux(vs):
                    if packet.pts is not None:
                        pts.append(packet.pts)
                    if len(pts) >= scan_packets:
                        break
            except av.FFmpegError as e:
                if not pts:
                    raise CorruptMedia(f"{name}: cannot read packets ({one_line(e)})") from None
        pts.sort()
        deltas = [b - a for a, b in zip(pts, pts[1:], strict=False) if b > a]
        is_vfr = bool(deltas) and max(deltas) > 1.5 * min(deltas)
        rotation = 0
        try:
            if pts:
                container.seek(0, stream=vs)
            for frame in container.decode(vs):
                rotation = int(round(frame.rotation or 0)) % 360
                break
        except av.FFmpegError:
            pass
        fmt = getattr(cc, "pix_fmt", "") or ""
        depth = 10 if "10" in fmt else 12 if "12" in fmt else 8
        w, h = int(cc.width or 0), int(cc.height or 0)
        dw, dh = (h, w) if rotation in (90, 270) else (w, h)
        field_order = getattr(cc, "field_order", 0)  # FFmpeg's AVFieldOrder: 0 unknown, 1 progressive, 2+ fields
        field_order = int(field_order) if isinstance(field_order, int) else 0
        return ProbeInfo(
            source=name, duration_s=duration, avg_fps=float(rate) if rate else 0.0, is_vfr=is_vfr,
            start_time_s=start, rotation_deg=rotation, codec=cc.name, pix_fmt=fmt, bit_depth=depth, width=w,
            height=h, display_width=dw, display_height=dh,
            interlaced=field_order >= 2,
            stream_index=vs.index, video_streams=[_stream_dict(s) for s in container.streams.video],
            audio_streams=[{"index": s.index, "codec": s.codec_context.name if s.codec_context else ""}
                           for s in container.streams.audio],
            is_live=live,
        )
