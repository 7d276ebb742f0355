"""What a source is before decoding it: duration, rates, start, rotation, codec, streams, keyframe spacing.

Bad inputs become typed errors (`ingest.errors`) here, once, so every backend reports them the same way.
The probe reads only the container header, the first ~120 packets of the chosen stream and its first frame,
so it costs milliseconds even on a 3-hour file; the sampler uses it to choose a decode strategy.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import statistics
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av

from vidmini.ingest.errors import (
    CorruptMedia,
    NotAVideo,
    SourceNotFound,
    SourcePermissionError,
    SourceUnreachable,
    UnsupportedCodec,
    one_line,
)
from vidmini.ingest.live import is_stream_url

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 10.0
IMAGE_FORMATS = ("image2", "gif", "apng", "webp")
ANIMATED_FORMATS = ("gif", "apng", "webp")
# Leading bytes of containers FFmpeg reads: such a file that fails to open is damaged, not "not a video".
_MAGIC = ((4, b"ftyp"), (4, b"moov"), (4, b"mdat"), (4, b"free"), (4, b"wide"), (0, b"\x1a\x45\xdf\xa3"),
          (0, b"RIFF"), (0, b"OggS"), (0, b"FLV"), (0, b"\x00\x00\x01\xba"), (0, b"\x30\x26\xb2\x75"))
# FFmpeg's AVFieldOrder, as PyAV returns it.
_FIELD_ORDER = {0: "unknown", 1: "progressive", 2: "tt", 3: "bb", 4: "tb", 5: "bt"}


@dataclass
class ProbeInfo:
    """Facts about one video stream of a source; times in seconds, sizes in pixels."""

    source: str
    duration_s: float | None  # of the video stream (None: live or unknown)
    avg_fps: float
    is_vfr: bool
    start_time_s: float
    rotation_deg: int  # the display matrix's rotation as PyAV's frame.rotation gives it; frames come out upright
    codec: str
    pix_fmt: str
    bit_depth: int
    width: int  # coded, before rotation
    height: int
    display_width: int  # after rotation
    display_height: int
    interlaced: bool
    stream_index: int
    video_streams: list[dict] = field(default_factory=list)
    audio_streams: list[dict] = field(default_factory=list)
    is_live: bool = False
    field_order: str = "unknown"
    keyframe_interval_s: float | None = None  # median keyframe spacing (container index or packet scan)
    has_b_frames: bool = False
    frame_count: int | None = None  # from the header / index, when it says
    seekable: bool = False  # a file whose index lists keyframes: the sampler may seek
    full_index: bool = False  # the index lists every frame (MP4/MOV): exact frame numbers after a seek
    time_base: str = "1/90000"
    first_pts: int | None = None  # the first decoded frame's pts (time_base units): time 0 of the sampler
    format_name: str = ""


def source_name(source) -> str:
    """How messages name a source: the path or URL as given, or a file object's name."""
    return str(source) if isinstance(source, str | Path) else str(getattr(source, "name", source))


def _is_url(source) -> bool:
    return isinstance(source, str) and is_stream_url(source)


def _looks_like_media(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return any(head[at : at + len(magic)] == magic for at, magic in _MAGIC) or head[:1] == b"\x47"


def _check_path(p: Path, name: str) -> None:
    if not p.exists():
        raise SourceNotFound(f"{name}: no such file")
    if p.is_dir():
        raise NotAVideo(f"{name}: is a directory")
    if not os.access(p, os.R_OK):
        raise SourcePermissionError(f"{name}: permission denied")
    if p.stat().st_size == 0:
        raise NotAVideo(f"{name}: empty file (0 bytes)")


def _open_error(source, e: av.FFmpegError) -> Exception:
    name = source_name(source)
    if _is_url(source):
        return SourceUnreachable(f"{name}: cannot open stream ({one_line(e)})")
    if getattr(e, "errno", None) == errno.EACCES:
        return SourcePermissionError(f"{name}: permission denied")
    if isinstance(source, str | Path) and _looks_like_media(Path(source)):
        return CorruptMedia(f"{name}: a media container that does not open: truncated or missing its index "
                            f"({one_line(e)})")
    return NotAVideo(f"{name}: not a readable video ({one_line(e)})")


def open_container(source, timeout_s: float = OPEN_TIMEOUT_S, hwaccel: str | None = None):
    """av.open with typed errors; URLs get a network timeout; `hwaccel` falls back to software with a warning."""
    name = source_name(source)
    url = _is_url(source)
    if isinstance(source, str | Path) and not url:
        _check_path(Path(source), name)
    options = {"timeout": str(int(timeout_s * 1e6)), "rw_timeout": str(int(timeout_s * 1e6))} if url else {}
    target = str(source) if isinstance(source, str | Path) else source
    kwargs = {"options": options, "timeout": timeout_s if url else None}
    if hwaccel:
        try:
            from av.codec.hwaccel import HWAccel

            return av.open(target, hwaccel=HWAccel(device_type=hwaccel, allow_software_fallback=True), **kwargs)
        except (ImportError, av.FFmpegError, ValueError) as e:
            log.warning("%s: hardware decoding (%s) unavailable, decoding in software: %s", name, hwaccel,
                        one_line(e))
            if hasattr(target, "seekable") and target.seekable():
                target.seek(0)
    try:
        return av.open(target, **kwargs)
    except PermissionError:
        raise SourcePermissionError(f"{name}: permission denied") from None
    except av.FFmpegError as e:
        raise _open_error(source, e) from None
    except OSError as e:
        raise SourceUnreachable(f"{name}: {one_line(e)}") from None


def choose_stream(container, kind: str, stream: int | None):
    """The chosen stream of `kind` ("video", "audio"): by container index, else FFmpeg's "best" one; None when the
    file has none. LookupError (naming the indexes there are) when `stream` is not one of them."""
    found = list(getattr(container.streams, kind))
    if not found:
        return None
    if stream is None:
        try:
            return container.streams.best(kind) or found[0]
        except Exception:  # noqa: BLE001 - best() may fail on exotic inputs
            return found[0]
    for s in found:
        if s.index == stream:
            return s
    raise LookupError(f"no {kind} stream with index {stream} ({kind} streams: {[s.index for s in found]})")


def pick_stream(container, stream: int | None, name: str):
    """The chosen video stream: by container index, else FFmpeg's "best" video stream."""
    try:
        chosen = choose_stream(container, "video", stream)
    except LookupError as e:
        raise NotAVideo(f"{name}: {e}") from None
    if chosen is None:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise NotAVideo(f"{name}: no video stream (streams: {', '.join(kinds)})")
    return chosen


def check_decodable(vs, name: str) -> None:
    if vs.codec_context is None or vs.codec_context.name in ("", "none"):
        tag = getattr(getattr(vs, "codec_tag", None), "strip", lambda: "")() or "unknown"
        raise UnsupportedCodec(f"{name}: video stream {vs.index} has a codec this FFmpeg cannot decode ({tag})")


def codec_name(s) -> str:
    """FFmpeg's codec name as ffprobe prints it ("mp3", not the decoder's "mp3float")."""
    cc = s.codec_context
    return cc.codec.canonical_name if cc is not None and cc.codec is not None else "unknown"


def _stream_dict(s) -> dict:
    rate = s.average_rate or s.guessed_rate
    cc = s.codec_context
    return {"index": s.index, "codec": codec_name(s), "width": getattr(cc, "width", 0) or 0,
            "height": getattr(cc, "height", 0) or 0, "fps": float(rate) if rate else 0.0}


def bit_depth(pix_fmt: str) -> int:
    try:
        return max(c.bits for c in av.VideoFormat(pix_fmt).components)
    except (ValueError, TypeError):
        return 8


def keyframe_times(vs, limit: int = 50_000) -> list[int]:
    """Keyframe timestamps (stream time base) from the container index; empty when there is none."""
    entries = vs.index_entries
    n = min(len(entries), limit)
    return [e.timestamp for e in (entries[i] for i in range(n)) if e.is_keyframe]


def _median_spacing(ts: list[int], tb: Fraction) -> float | None:
    diffs = [b - a for a, b in zip(ts, ts[1:], strict=False) if b > a]
    return float(statistics.median(diffs) * tb) if diffs else None


def _image_check(container, name: str) -> None:
    fmt = container.format.name if container.format else ""
    if fmt.endswith("_pipe") or fmt in IMAGE_FORMATS:
        animated = fmt in ANIMATED_FORMATS and len(list(itertools.islice(container.decode(video=0), 2))) == 2
        if not animated:
            raise NotAVideo(f"{name}: is an image ({fmt}), not a video")
        container.seek(0)


def probe(source, stream: int | None = None, scan_packets: int = 120) -> ProbeInfo:
    """Probe a path, URL or file object; typed errors for anything that is not a decodable video."""
    name = source_name(source)
    live = _is_url(source) or str(source).startswith("/dev/")
    with open_container(source) as container:
        _image_check(container, name)
        vs = pick_stream(container, stream, name)
        check_decodable(vs, name)
        cc = vs.codec_context
        tb = vs.time_base or Fraction(1, 90000)
        rate = vs.average_rate or vs.guessed_rate
        duration = None
        if not live and vs.duration and tb:
            duration = float(vs.duration * tb)
        elif not live and container.duration:
            duration = container.duration / 1e6
        start = float(vs.start_time * tb) if vs.start_time is not None else 0.0
        keys = [] if live else keyframe_times(vs)
        full_index = bool(vs.frames) and len(vs.index_entries) == vs.frames
        scanned, scan_keys, first = _scan(container, vs, name, 0 if live else scan_packets)
        if first is None and not live:
            raise CorruptMedia(f"{name}: no video frame decodes (stream {vs.index}, {cc.name})")
        deltas = [b - a for a, b in zip(scanned, scanned[1:], strict=False) if b > a]
        is_vfr = bool(deltas) and max(deltas) > 1.5 * min(deltas)
        rotation = int(round(first.rotation or 0)) % 360 if first is not None else 0
        fmt = (first.format.name if first is not None else "") or getattr(cc, "pix_fmt", "") or ""
        w, h = int(cc.width or 0), int(cc.height or 0)
        dw, dh = (h, w) if rotation in (90, 270) else (w, h)
        order = _FIELD_ORDER.get(int(cc.field_order or 0), "unknown")
        if order in ("unknown", "progressive") and first is not None and first.interlaced_frame:
            order = "interlaced"  # the frame says so though the stream parameters do not
        return ProbeInfo(
            source=name, duration_s=duration, avg_fps=float(rate) if rate else 0.0, is_vfr=is_vfr,
            start_time_s=start, rotation_deg=rotation, codec=codec_name(vs), pix_fmt=fmt, bit_depth=bit_depth(fmt),
            width=w, height=h, display_width=dw, display_height=dh,
            interlaced=order not in ("unknown", "progressive"),
            stream_index=vs.index, video_streams=[_stream_dict(s) for s in container.streams.video],
            audio_streams=[{"index": s.index, "codec": codec_name(s)} for s in container.streams.audio],
            is_live=live, field_order=order,
            keyframe_interval_s=_median_spacing(keys, tb) or _median_spacing(scan_keys, tb),
            has_b_frames=bool(cc.has_b_frames), frame_count=vs.frames or None,
            seekable=isinstance(source, str | Path) and not live and len(keys) >= 2, full_index=full_index,
            time_base=f"{tb.numerator}/{tb.denominator}",
            first_pts=(first.pts if first.pts is not None else first.dts) if first is not None else None,
            format_name=container.format.name if container.format else "",
        )


def _scan(container, vs, name: str, n: int, max_packets: int = 400):
    """Sorted pts of the first `n` packets and of their keyframes (VFR and GOP estimates), and the first frame
    (rotation, pixel format, time 0) or None when none decodes: the sampler raises that error."""
    pts: list[int] = []
    keys: list[int] = []
    first = None
    try:
        for i, packet in enumerate(container.demux(vs)):
            if packet.pts is not None and len(pts) < n:
                pts.append(packet.pts)
                if packet.is_keyframe:
                    keys.append(packet.pts)
            if first is None:
                try:
                    first = next(iter(packet.decode()), None)
                except av.FFmpegError:
                    pass
            if (first is not None and len(pts) >= n) or i >= max(n, max_packets):
                break
    except av.FFmpegError as e:
        if not pts and first is None:
            raise CorruptMedia(f"{name}: cannot read packets ({one_line(e)})") from None
    # B-frames of the last packets may come after the scan: keep only the run of pts known to be complete
    complete = min(pts[-16:]) if len(pts) > 32 else None
    return sorted(x for x in pts if complete is None or x <= complete), keys, first
