"""ingest.probe and ingest.sampler (all backends) against real files: the shared fixtures, and clips made here.

Expectations come from ffprobe/ffmpeg or from what the test wrote (frame numbers as stripe codes, see
test_simple_decode), and from `ingest.simple_decode`, the exact reference sampler the CLI uses today.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import stat
import subprocess
import sys
import tempfile
import time
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_simple_decode import CODECS, VFR_EXPECTED, VFR_SETPTS, H, W, _make_coded, _read_code, needs_ffmpeg

from vidmini.ingest.errors import (
    CorruptMedia,
    IngestError,
    NotAVideo,
    SourceNotFound,
    SourcePermissionError,
    SourceUnreachable,
    UnsupportedCodec,
)
from vidmini.ingest.probe import ProbeInfo, probe
from vidmini.ingest.sampler import FrameSampler, SampledFrame, sample
from vidmini.ingest.simple_decode import MediaError, sample_frames

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "videos"
NAMES = ["safari.mp4", "cockatoo.mp4", "realshort.mp4"]
REPO = Path(__file__).resolve().parents[2]

try:
    import decord  # noqa: F401

    HAVE_DECORD = True
except ImportError:
    HAVE_DECORD = False


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"fixture {path} not present")
    return path


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True, capture_output=True)


def ffprobe_json(path: Path, *args: str) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", *args, "-of", "json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def ffmpeg_rgb(path: Path, w: int, h: int, vf: str | None = None) -> np.ndarray:
    """All frames as ffmpeg decodes them (autorotated), rgb24, in presentation order."""
    cmd = ["ffmpeg", "-v", "error", "-i", str(path)] + (["-vf", vf] if vf else [])
    raw = subprocess.run([*cmd, "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def codes(frames) -> list[int]:
    return [_read_code(f.image) for f in frames]


@functools.lru_cache(maxsize=32)
def run(name: str, **kwargs) -> tuple[list[SampledFrame], FrameSampler, float]:
    """Fixture results shared between tests (cockatoo takes about a second)."""
    sampler = FrameSampler(fixture(name), **kwargs)
    t0 = time.perf_counter()
    frames = list(sampler)
    return frames, sampler, time.perf_counter() - t0


@functools.lru_cache(maxsize=8)
def packet_pts(path: Path) -> list[Fraction]:
    """Every frame's pts in presentation order, from ffprobe's packet list (demux only)."""
    info = ffprobe_json(path, "-select_streams", "v:0", "-show_entries", "stream=time_base:packet=pts")
    tb = Fraction(info["streams"][0]["time_base"])
    return sorted(Fraction(p["pts"]) * tb for p in info["packets"])


@pytest.fixture(scope="module")
def coded(tmp_path_factory) -> Path:
    """5 s of stripe-coded frames at 25 fps, x264 with B-frames: frame n is shown from n/25 s."""
    return _make_coded(tmp_path_factory.mktemp("coded") / "cfr.mp4", 125, 25, CODECS["mp4-x264"][1])


# --- probe ------------------------------------------------------------------------------------------------


@needs_ffmpeg
@pytest.mark.parametrize("name", NAMES)
def test_probe_fixture_matches_ffprobe(name: str) -> None:
    path = fixture(name)
    ref = ffprobe_json(path, "-show_streams", "-show_format")
    video = [s for s in ref["streams"] if s["codec_type"] == "video"]
    audio = [s for s in ref["streams"] if s["codec_type"] == "audio"]
    v = video[0]
    info = probe(path)
    assert isinstance(info, ProbeInfo)
    assert (info.codec, info.pix_fmt) == (v["codec_name"], v["pix_fmt"])
    assert (info.width, info.height) == (v["width"], v["height"])
    assert (info.display_width, info.display_height) == (v["width"], v["height"])  # no rotation in these
    assert info.avg_fps == pytest.approx(float(Fraction(v["avg_frame_rate"])), rel=1e-9)
    assert info.duration_s == pytest.approx(float(v["duration"]), abs=1e-3)  # the video stream's, not the file's
    assert float(ref["format"]["duration"]) >= info.duration_s - 1e-3
    assert info.start_time_s == pytest.approx(float(v["start_time"]), abs=1e-6)
    assert info.time_base == v["time_base"]
    assert info.frame_count == int(v["nb_frames"])
    assert info.has_b_frames == (int(v["has_b_frames"]) > 0)
    assert info.bit_depth == int(v.get("bits_per_raw_sample", 8))
    assert info.interlaced is (v.get("field_order", "progressive") not in ("progressive", "unknown"))
    assert info.rotation_deg == 0 and not info.is_vfr and not info.is_live
    assert info.stream_index == v["index"]
    assert [(s["index"], s["codec"], s["width"], s["height"]) for s in info.video_streams] == [
        (s["index"], s["codec_name"], s["width"], s["height"]) for s in video]
    assert [(s["index"], s["codec"]) for s in info.audio_streams] == [(s["index"], s["codec_name"]) for s in audio]
    assert info.seekable and info.full_index and info.keyframe_interval_s > 0


# --- the sampling rule on real files ------------------------------------------------------------------------


@needs_ffmpeg
@pytest.mark.parametrize("name", NAMES)
def test_exact_equals_reference_sampler(name: str) -> None:
    """Same times, same pictures as simple_decode; pts and frame numbers as ffprobe's packet list says."""
    got, sampler, _ = run(name)
    ref = sample_frames(fixture(name))
    assert [f.t for f in got] == ref.timestamps
    for f, want in zip(got, ref.frames, strict=True):
        np.testing.assert_array_equal(f.image, want)
        assert f.image.dtype == np.uint8 and f.image.flags.c_contiguous
    pts = packet_pts(fixture(name))
    for f in got:
        i = max(j for j, p in enumerate(pts) if p - pts[0] <= Fraction(f.t).limit_denominator(10**6))
        assert f.index == i and f.pts == pytest.approx(float(pts[i] - pts[0]), abs=1e-9)
    assert sampler.gaps == [] and sampler.decode_errors == 0


@needs_ffmpeg
@pytest.mark.parametrize("name", NAMES)
def test_fast_mode_within_one_frame_and_no_slower(name: str) -> None:
    exact, ex_sampler, ex_time = run(name)
    fast, fa_sampler, fa_time = run(name, mode="fast")
    frame = 1 / probe(fixture(name)).avg_fps
    assert [f.t for f in fast] == [f.t for f in exact]
    for e, f in zip(exact, fast, strict=True):
        assert 0 <= e.pts - f.pts <= frame + 1e-9 and f.pts <= f.t  # never from the future
    assert fa_sampler.stats.frames_decoded <= ex_sampler.stats.frames_decoded
    assert fa_time <= 1.5 * ex_time + 0.1  # same work or less; generous for a busy 2-core machine


def test_exact_mode_decodes_less_than_everything() -> None:
    """Non-reference frames shown at no sampling time are skipped, provably: safari has 315 frames."""
    _, sampler, _ = run("safari.mp4")
    assert "skip non-reference" in sampler.strategy
    assert sampler.stats.frames_decoded < 200


@needs_ffmpeg
def test_sparse_sampling_seeks_and_stays_exact() -> None:
    """1 frame per 10 s over 1 s keyframe intervals: seek to keyframes, same frames as the reference."""
    path = fixture("safari.mp4")
    for fps in (0.1, 0.3):
        got, sampler, _ = run("safari.mp4", fps=fps)
        ref = sample_frames(path, fps=fps)
        assert "seek" in sampler.strategy
        assert [f.t for f in got] == ref.timestamps
        assert all(np.array_equal(a.image, b) for a, b in zip(got, ref.frames, strict=True))
        assert sampler.stats.frames_decoded < 100 and sampler.stats.index_exact
    assert [f.index for f in run("safari.mp4", fps=0.3)[0]] == [0, 99, 199, 299]  # from the MP4 index


def test_seek_that_lands_late_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Demuxers that seek by dts can land on a keyframe after the sampling time: simulate that once."""
    from vidmini.ingest import decode_pyav

    real_seek, calls = decode_pyav._Decoder._seek, []

    def late_seek(self, position: int, target: int) -> None:
        calls.append(position)
        real_seek(self, position + (45_000 if len(calls) == 1 else 0), target)  # 1.5 s later, first time

    monkeypatch.setattr(decode_pyav._Decoder, "_seek", late_seek)
    got = list(sample(fixture("safari.mp4"), fps=0.1))
    ref = sample_frames(fixture("safari.mp4"), fps=0.1)
    assert len(calls) >= 2 and calls[1] < calls[0] + 45_000  # retried, from an earlier keyframe
    assert [f.t for f in got] == ref.timestamps
    assert all(np.array_equal(a.image, b) for a, b in zip(got, ref.frames, strict=True))


def test_every_k(coded: Path) -> None:
    got = list(sample(coded, every_k=10))
    assert codes(got) == list(range(0, 125, 10)) == [f.index for f in got]
    assert [f.t for f in got] == [f.pts for f in got] == pytest.approx([n / 25 for n in range(0, 125, 10)])
    assert codes(sample(coded, every_k=1)) == list(range(125))
    assert codes(sample(coded, every_k=10, start=1.0, end=3.0)) == [30, 40, 50, 60, 70]


@pytest.mark.parametrize("fps", [0.0, -1.0, 0.049, 30.01, float("nan"), math.inf, None])
def test_fps_bounds(coded: Path, fps) -> None:
    with pytest.raises(ValueError, match="fps"):
        FrameSampler(coded, fps=fps)


def test_argument_checks(coded: Path) -> None:
    assert len(list(sample(coded, fps=30.0))) == 150  # 30 fps over 25 fps frames: every frame, some twice
    assert len(list(sample(coded, fps=0.05))) == 1
    for bad in (dict(every_k=0), dict(mode="slow"), dict(size=(0, 10)), dict(start=-1.0),
                dict(start=2.0, end=1.0), dict(interpolation="CUBIST")):
        with pytest.raises(ValueError):
            FrameSampler(coded, **bad)
    with pytest.raises(IngestError, match="unknown decode backend"):
        FrameSampler(coded, backend="gstreamer")


def test_start_end_on_the_global_grid(coded: Path) -> None:
    for backend in ("pyav", "ffmpeg"):
        got = list(sample(coded, fps=2.0, start=1.3, end=3.1, backend=backend))
        assert [f.t for f in got] == [1.5, 2.0, 2.5, 3.0]  # the grid k/fps does not move with start
        assert codes(got) == [37, 50, 62, 75] == [f.index for f in got]


def test_size_scales_inside_ffmpeg(coded: Path) -> None:
    full = next(sample(coded))
    for interpolation in ("BILINEAR", "NEAREST", "AREA"):
        small = next(sample(coded, size=(80, 16), interpolation=interpolation)).image
        assert small.shape == (16, 80, 3) and small.dtype == np.uint8
        ref = np.asarray(Image.fromarray(full.image).resize((80, 16), Image.NEAREST))
        assert mad(small, ref) < 8
    sq = next(sample(coded, size=(336, 336), interpolation="NEAREST")).image
    assert sq.shape == (336, 336, 3)


def test_memory_does_not_grow_with_length(tmp_path: Path) -> None:
    """A generator: peak Python-visible memory stays at a few frames whatever the length."""
    path = tmp_path / "long.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=40", "-c:v", "libx264", "-preset",
           "ultrafast", str(path))
    it = sample(path, fps=5.0)
    assert iter(it) is it
    tracemalloc.start()
    n = sum(1 for _ in it)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 200
    assert peak < 20 * 160 * 120 * 3  # 200 frames kept would be 11.5 MB


# --- generated edge cases ---------------------------------------------------------------------------------


@needs_ffmpeg
@pytest.mark.parametrize("codec", sorted(CODECS))
def test_variable_frame_rate(tmp_path: Path, codec: str) -> None:
    ext, args = CODECS[codec]
    out = [*args, "-fps_mode", "passthrough", "-enc_time_base", "1/3000"]
    path = _make_coded(tmp_path / f"vfr.{ext}", 50, 25, out, vf=VFR_SETPTS)
    info = probe(path)
    assert info.is_vfr
    for mode in ("exact", "fast"):
        got = list(sample(path, fps=4.0, mode=mode))
        assert [f.t for f in got] == [k / 4 for k in range(16)]
        if mode == "exact":
            assert codes(got) == VFR_EXPECTED == [f.index for f in got]
        for f in got:  # the reported pts is the real one of the frame returned
            n = _read_code(f.image)
            want = n * 0.1 if n < 10 else 1.0 if n == 10 else 2.5 + (n - 11) / 30
            assert f.pts == pytest.approx(want, abs=1e-3)  # Matroska stores milliseconds
    assert not probe(_make_coded(tmp_path / f"cfr.{ext}", 10, 25, args)).is_vfr


@needs_ffmpeg
@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotation_is_upright(tmp_path: Path, degrees: int) -> None:
    plain = _make_coded(tmp_path / "plain.mp4", 25, 25, CODECS["mp4-x264"][1])
    rotated = tmp_path / "rotated.mp4"
    ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", f"rotate={degrees}", str(rotated))  # ffmpeg 5
    info = probe(rotated)
    if info.rotation_deg == 0:
        pytest.skip("this ffmpeg wrote no display matrix")
    assert info.rotation_deg in (degrees, 360 - degrees)  # the direction is checked below, on the pictures
    w, h = (H, W) if degrees != 180 else (W, H)
    assert (info.width, info.height, info.display_width, info.display_height) == (W, H, w, h)
    ref = ffmpeg_rgb(rotated, w, h)  # ffmpeg autorotates
    for backend in ("pyav", "ffmpeg") + (("decord",) if HAVE_DECORD else ()):
        got = list(sample(rotated, backend=backend))
        assert got[0].image.shape == (h, w, 3), backend
        assert mad(got[0].image, ref[0]) < 1.0, backend
        small = next(sample(rotated, backend=backend, size=(20, 100))).image
        assert small.shape == (100, 20, 3), backend  # size is the upright output size


@needs_ffmpeg
def test_start_offset(tmp_path: Path) -> None:
    path = _make_coded(tmp_path / "offset.mkv", 125, 25, [*CODECS["mkv-ffv1"][1], "-output_ts_offset", "3"])
    info = probe(path)
    assert info.start_time_s == pytest.approx(3.0)
    for backend in ("pyav", "ffmpeg"):
        got = list(sample(path, backend=backend))
        assert [f.t for f in got] == [0.0, 1.0, 2.0, 3.0, 4.0] and codes(got) == [0, 25, 50, 75, 100]
        assert [f.pts for f in got] == [0.0, 1.0, 2.0, 3.0, 4.0]


@needs_ffmpeg
def test_odd_size(tmp_path: Path) -> None:
    path = tmp_path / "odd.mp4"  # 4:4:4, as 4:2:0 needs even sizes
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=10:duration=2", "-vf", "scale=321:241", "-c:v",
           "libx264", "-pix_fmt", "yuv444p", str(path))
    info = probe(path)
    assert (info.width, info.height) == (321, 241)
    ref = ffmpeg_rgb(path, 321, 241)
    for backend in ("pyav", "ffmpeg"):
        got = list(sample(path, backend=backend))
        assert [f.image.shape for f in got] == [(241, 321, 3)] * 2
        assert mad(got[1].image, ref[10]) < 1.0
        assert next(sample(path, backend=backend, size=(101, 77))).image.shape == (77, 101, 3)


@needs_ffmpeg
def test_one_frame_video(tmp_path: Path) -> None:
    path = tmp_path / "one.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=10", "-frames:v", "1", "-c:v", "libx264", str(path))
    for backend in ("pyav", "ffmpeg"):
        got = list(sample(path, backend=backend))
        assert [(f.t, f.pts, f.index) for f in got] == [(0.0, 0.0, 0)]
    assert [f.index for f in sample(path, every_k=3)] == [0]


@needs_ffmpeg
@pytest.mark.parametrize(("pix_fmt", "profile", "tolerance"), [("yuv420p10le", "high10", 6.0),
                                                               ("yuv444p10le", "high444", 1.0)])
def test_ten_bit(tmp_path: Path, pix_fmt: str, profile: str, tolerance: float) -> None:
    """10-bit in, 8-bit RGB out. 4:4:4 matches ffmpeg to rounding; on 4:2:0 this FFmpeg 8 and the 5.1 CLI
    upsample chroma differently (testsrc2's saturated edges make that a few levels on average)."""
    path = tmp_path / "ten.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=10:duration=2", "-c:v", "libx264", "-profile:v",
           profile, "-pix_fmt", pix_fmt, str(path))
    info = probe(path)
    assert (info.pix_fmt, info.bit_depth) == (pix_fmt, 10)
    ref = ffmpeg_rgb(path, 160, 120)
    got = list(sample(path))
    assert len(got) == 2 and got[0].image.dtype == np.uint8
    assert mad(got[1].image, ref[10]) < tolerance


@needs_ffmpeg
def test_interlaced(tmp_path: Path) -> None:
    path = tmp_path / "interlaced.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=2", "-c:v", "libx264", "-flags",
           "+ildct+ilme", "-x264opts", "tff=1", "-pix_fmt", "yuv420p", str(path))
    info = probe(path)
    assert info.interlaced and info.field_order in ("tt", "tb", "interlaced")
    plain = list(sample(path))
    assert len(plain) == 2 and plain[0].image.shape == (120, 160, 3)
    ref = ffmpeg_rgb(path, 160, 120, vf="scale=interl=1")  # chroma converted per field, as PyAV does
    assert mad(plain[1].image, ref[25]) < 1.0  # decoded as is by default
    soft = next(sample(path, deinterlace=True)).image.astype(np.int16)
    np.testing.assert_allclose(soft[1:-1:2], (soft[0:-2:2] + soft[2::2]) / 2, atol=1)  # top field kept


@needs_ffmpeg
def test_two_video_streams(tmp_path: Path) -> None:
    coded = _make_coded(tmp_path / "coded.mkv", 50, 25, CODECS["mkv-ffv1"][1])
    both = tmp_path / "both.mkv"
    ffmpeg("-i", str(coded), "-f", "lavfi", "-i", "color=c=red:size=160x32:rate=25:duration=2", "-map", "0:v",
           "-map", "1:v", "-c:v", "ffv1", str(both))
    info = probe(both)
    assert [s["index"] for s in info.video_streams] == [0, 1] and info.stream_index == 0
    assert probe(both, stream=1).stream_index == 1
    assert codes(sample(both)) == [0, 25]
    for backend in ("pyav", "ffmpeg"):
        red = next(sample(both, stream=1, backend=backend)).image
        assert red[..., 0].mean() > 200 and red[..., 1].mean() < 50, backend
    with pytest.raises(NotAVideo, match="index 5"):
        next(sample(both, stream=5))


@needs_ffmpeg
def test_damage_in_the_middle_is_skipped_and_reported(tmp_path: Path, caplog) -> None:
    ts = _make_coded(tmp_path / "long.ts", 250, 25, ["-c:v", "libx264", "-g", "25", "-pix_fmt", "yuv444p",
                                                     "-f", "mpegts"])
    data = bytearray(ts.read_bytes())
    lo, hi = int(len(data) * 0.45), int(len(data) * 0.6)
    data[lo:hi] = np.random.default_rng(0).integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged.ts"
    damaged.write_bytes(bytes(data))
    sampler = FrameSampler(damaged)
    with caplog.at_level(logging.WARNING):
        got = list(sampler)
    times = [f.t for f in got]
    assert times[:3] == [0.0, 1.0, 2.0] and times[-1] == 9.0  # before and after the damage
    assert sampler.gaps and sampler.decode_errors > 0 and caplog.records  # recorded and logged, not silent
    lost = [float(k) for k in range(10) if float(k) not in times]
    assert lost and all(any(a <= t < b for a, b in sampler.gaps) for t in lost)
    for f in got:  # whatever came back is the right picture for its time
        assert _read_code(f.image) == round(f.pts * 25) and f.pts <= f.t


# --- bad input ----------------------------------------------------------------------------------------------


def _check_error(exc: pytest.ExceptionInfo, source) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and str(source) in msg
    assert isinstance(exc.value, IngestError) and isinstance(exc.value, ValueError)
    assert not isinstance(exc.value, MediaError)


@needs_ffmpeg
def test_bad_inputs_get_typed_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    png = tmp_path / "picture.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(png)
    audio = tmp_path / "tone.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=d=1", "-c:a", "aac", str(audio))
    full = tmp_path / "full.mp4"  # ffmpeg writes the index (moov) last unless told otherwise
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=2", "-c:v", "libx264", str(full))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 6 // 10])
    unknown = tmp_path / "unknown.mkv"  # a Matroska codec id no decoder has
    ffmpeg("-i", str(full), "-c", "copy", str(tmp_path / "h264.mkv"))
    unknown.write_bytes((tmp_path / "h264.mkv").read_bytes().replace(b"V_MPEG4/ISO/AVC", b"V_QQQQQ/ISO/AVC"))
    cases = [(tmp_path / "missing.mp4", SourceNotFound, "no such file"), (empty, NotAVideo, "empty"),
             (text, NotAVideo, "not a readable video"), (png, NotAVideo, "image"), (audio, NotAVideo, "no video"),
             (cut, CorruptMedia, "truncated"), (unknown, UnsupportedCodec, "codec"),
             (tmp_path, NotAVideo, "directory"), ("http://127.0.0.1:9/none.ts", SourceUnreachable, "127.0.0.1")]
    for source, error, words in cases:
        with pytest.raises(error, match=words) as exc:
            probe(source)
        _check_error(exc, source)
        with pytest.raises(error) as exc:  # the sampler reports the same error before any frame
            next(sample(source))
        _check_error(exc, source)


@needs_ffmpeg
def test_truncated_with_index_first_keeps_what_decodes(tmp_path: Path) -> None:
    """Decided: moov at the end and cut → CorruptMedia (above); moov first and cut → frames up to the cut, and
    the missing tail recorded as a gap (the header still says how long the video was)."""
    full = _make_coded(tmp_path / "full.mp4", 250, 25, [*CODECS["mp4-x264"][1], "-movflags", "+faststart"])
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 6 // 10])
    sampler = FrameSampler(cut)
    got = list(sampler)
    assert 3 <= len(got) < 10
    assert all(_read_code(f.image) == round(f.pts * 25) for f in got)
    assert sampler.gaps and sampler.gaps[-1][1] == pytest.approx(10.0) and sampler.gaps[-1][0] == len(got)


def test_no_decodable_frame_is_corrupt(tmp_path: Path) -> None:
    """realshort.mp4 with its mdat payload zeroed: the container opens, no frame decodes."""
    data = bytearray(fixture("realshort.mp4").read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4 : at], "big")
    data[at + 4 : at - 4 + size] = bytes(size - 8)
    path = tmp_path / "zeroed.mp4"
    path.write_bytes(bytes(data))
    for call in (probe, lambda p: next(sample(p)), lambda p: next(sample(p, backend="ffmpeg"))):
        with pytest.raises(CorruptMedia, match="decod") as exc:
            call(path)
        _check_error(exc, path)


def test_permission_denied_simulated(monkeypatch: pytest.MonkeyPatch) -> None:
    """os.access semantics (root reads anything, so the real check runs as nobody in the next test)."""
    path = fixture("realshort.mp4")
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(SourcePermissionError, match="permission denied") as exc:
        probe(path)
    _check_error(exc, path)


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists(), reason="needs root and setpriv")
def test_permission_denied_for_real() -> None:
    """A chmod 000 file probed by the unprivileged user nobody."""
    folder = Path(tempfile.mkdtemp(prefix="vidmini-perm-"))
    try:
        folder.chmod(0o755)
        locked = folder / "locked.mp4"
        locked.write_bytes(fixture("realshort.mp4").read_bytes())
        locked.chmod(0)
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from vidmini.ingest.probe import probe\n"
                "try:\n    probe(sys.argv[2])\nexcept Exception as e:\n    print(type(e).__name__, e)")
        res = subprocess.run(["/usr/bin/setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                              sys.executable, "-c", code, str(REPO), str(locked)], capture_output=True, text=True)
        if res.returncode != 0 or not res.stdout:
            pytest.skip(f"cannot run as nobody here: {res.stderr.strip()[:200]}")
        assert res.stdout.strip() == f"SourcePermissionError {locked}: permission denied"
    finally:
        for p in folder.iterdir():
            p.chmod(stat.S_IRUSR | stat.S_IWUSR)
            p.unlink()
        folder.rmdir()


# --- backends -----------------------------------------------------------------------------------------------


@needs_ffmpeg
@pytest.mark.parametrize("kwargs", [{}, {"fps": 0.3}, {"fps": 7.0}, {"every_k": 7}, {"size": (100, 80)}],
                         ids=["1fps", "0.3fps", "7fps", "every7", "size"])
def test_ffmpeg_backend_equals_pyav(kwargs: dict) -> None:
    a, _, _ = run("safari.mp4", **kwargs)
    b = list(sample(fixture("safari.mp4"), backend="ffmpeg", **kwargs))
    assert [(f.t, f.pts, f.index) for f in b] == [(f.t, f.pts, f.index) for f in a]
    assert max(mad(x.image, y.image) for x, y in zip(a, b, strict=True)) < 1.0


@pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed (pip install vidmini[decord])")
@pytest.mark.parametrize("kwargs", [{}, {"every_k": 7}, {"fps": 2.0, "start": 3.3, "end": 8.0}])
def test_decord_backend_equals_pyav(kwargs: dict) -> None:
    a, _, _ = run("safari.mp4", **kwargs)
    b = list(sample(fixture("safari.mp4"), backend="decord", **kwargs))
    assert [(f.t, f.pts, f.index) for f in b] == [(f.t, f.pts, f.index) for f in a]
    assert max(mad(x.image, y.image) for x, y in zip(a, b, strict=True)) < 1.0


def test_decord_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch, coded: Path) -> None:
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord now raises ImportError
    with pytest.raises(IngestError, match=r"pip install vidmini\[decord\]"):
        FrameSampler(coded, backend="decord")


def test_hwaccel_falls_back_to_software(coded: Path, caplog) -> None:
    """No GPU here: hwaccel="cuda" logs a warning and decodes the same frames in software."""
    import av.codec.hwaccel

    with caplog.at_level(logging.WARNING):
        got = list(sample(coded, hwaccel="cuda"))
    assert codes(got) == [0, 25, 50, 75, 100]
    if "cuda" in av.codec.hwaccel.hwdevices_available() and not caplog.records:
        return  # a machine with a working CUDA device decoded on it
    assert any("software" in r.getMessage() for r in caplog.records)
