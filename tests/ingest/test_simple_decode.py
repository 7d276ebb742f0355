"""ingest.simple_decode against real files: the shared fixtures, and videos made here with the ffmpeg CLI.

Generated videos carry their frame number as a 10-bit code of black/white vertical stripes, which survives
any codec, so a test reads back exactly which source frame it was given. Expectations come from ffprobe or
from the timestamps we wrote, never from PyAV, so the sampler is checked against an independent decoder.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vidmini.ingest import simple_decode
from vidmini.ingest.simple_decode import MediaError, SampledFrames, load_image, media_kind, sample_frames

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "videos"
HAVE_FFMPEG = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None
needs_ffmpeg = pytest.mark.skipif(
    not HAVE_FFMPEG, reason="ffmpeg/ffprobe CLI not on PATH (apt-get install ffmpeg)"
)

W, H, BITS = 160, 32, 10  # stripe code: bit b of the frame number is stripe b (16 px wide), white = 1


def _fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"fixture {path} not present")
    return path


@functools.lru_cache(maxsize=16)
def _sampled(name: str, fps: float = 1.0) -> SampledFrames:
    """Fixture results shared between tests: decoding cockatoo.mp4 takes about a second."""
    return sample_frames(_fixture(name), fps=fps)


def _code_frame(n: int) -> np.ndarray:
    img = np.zeros((H, W, 3), np.uint8)
    for b in range(BITS):
        if n >> b & 1:
            img[:, b * 16 : (b + 1) * 16] = 255
    return img


def _read_code(rgb: np.ndarray) -> int:
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    return sum(int(rgb[:, b * 16 : (b + 1) * 16].mean() > 128) << b for b in range(BITS))


def _make_coded(path: Path, n: int, rate: int, out_args: list[str], vf: str | None = None) -> Path:
    """Encode frames 0..n-1 (stripe-coded) at `rate` with the ffmpeg CLI."""
    raw = b"".join(_code_frame(i).tobytes() for i in range(n))
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{W}x{H}"]
    cmd += ["-r", str(rate), "-i", "-"]
    if vf:
        cmd += ["-vf", vf]
    subprocess.run([*cmd, *out_args, str(path)], input=raw, check=True, capture_output=True)
    return path


def _ffprobe(path: Path, entries: str) -> dict:
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            entries,
            "-of",
            "json",
            str(path),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def _video_stream_info(path: Path) -> dict:
    return _ffprobe(path, "stream=duration,start_time,width,height,avg_frame_rate")["streams"][0]


def _frame_pts(path: Path) -> list[Fraction]:
    """Presentation times of every decoded video frame, in output order, as ffprobe reports them."""
    tb = Fraction(_ffprobe(path, "stream=time_base")["streams"][0]["time_base"])
    frames = _ffprobe(path, "frame=pts")["frames"]
    return [Fraction(f["pts"]) * tb for f in frames]


def _displayed_index(pts: list[Fraction], t: Fraction) -> int:
    """Oracle: the last frame (presentation order) with pts <= first pts + t."""
    return max(i for i, p in enumerate(pts) if p <= pts[0] + t)


def _expected_count(duration: float, fps: float) -> int:
    """Number of k >= 0 with k / fps < duration."""
    return sum(1 for k in range(int(duration * fps) + 2) if k / fps < duration)


CODECS = {
    "mkv-ffv1": ("mkv", ["-c:v", "ffv1", "-pix_fmt", "gbrp"]),
    "mp4-x264": (
        "mp4",
        ["-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p"],
    ),  # B-frames: pts != decode order
}


@pytest.fixture(scope="module", params=sorted(CODECS))
def coded_25fps(request, tmp_path_factory) -> Path:
    """5 s at 25 fps: frame n is shown from n/25 s to (n+1)/25 s."""
    if not HAVE_FFMPEG:
        pytest.skip("ffmpeg/ffprobe CLI not on PATH (apt-get install ffmpeg)")
    ext, args = CODECS[request.param]
    return _make_coded(tmp_path_factory.mktemp("cfr") / f"cfr.{ext}", 125, 25, args)


# --- the shared real-world fixtures -------------------------------------------------------------------


@needs_ffmpeg
@pytest.mark.parametrize("name", ["safari.mp4", "cockatoo.mp4", "realshort.mp4"])
@pytest.mark.parametrize("fps", [1.0, 2.0, 0.5])
def test_fixture_counts_match_ffprobe(name: str, fps: float) -> None:
    path = _fixture(name)
    info = _video_stream_info(path)
    duration = float(info["duration"])  # the video stream's, not the container's (that includes audio)
    got = _sampled(name, fps)
    n = _expected_count(duration, fps)
    assert len(got.frames) == len(got.timestamps) == n
    assert got.timestamps == [k / fps for k in range(n)]
    assert got.duration == pytest.approx(duration, abs=1e-3)
    assert got.source_fps == pytest.approx(float(Fraction(info["avg_frame_rate"])), rel=1e-6)
    for f in got.frames:
        assert f.shape == (info["height"], info["width"], 3) and f.dtype == np.uint8


def test_fixture_known_counts() -> None:
    """Spelled-out numbers from SOURCES.md, so a wrong ffprobe-based expectation cannot hide a bug."""
    assert len(_sampled("safari.mp4").frames) == 11  # 10.51 s: t = 0..10
    assert len(_sampled("cockatoo.mp4").frames) == 14  # exactly 14.0 s: t = 14 is not < 14
    assert len(_sampled("realshort.mp4", 2.0).frames) == 3  # 1.2 s: t = 0, 0.5, 1.0


@needs_ffmpeg
@pytest.mark.parametrize(("name", "ks"), [("safari.mp4", [0, 1, 3, 7, 10]), ("cockatoo.mp4", [0, 2, 5, 13])])
def test_fixture_frames_match_ffmpeg(name: str, ks: list[int]) -> None:
    """The frame at t=k is the one ffmpeg shows at k: picked by frame number from ffprobe's pts list.

    (ffmpeg's `-ss k` picks the first frame with pts >= k, one frame later on safari.mp4, so it is not the
    reference here: it differs from the displayed frame by a mean 2.6-4.5 levels there.)
    """
    path = _fixture(name)
    info = _video_stream_info(path)
    w, h = info["width"], info["height"]
    pts = _frame_pts(path)
    want = [_displayed_index(pts, Fraction(k)) for k in ks]
    select = "+".join(f"eq(n\\,{i})" for i in want)
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-vf", f"select='{select}'", "-fps_mode", "passthrough"]
        + ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        check=True,
        capture_output=True,
    ).stdout
    ref = np.frombuffer(raw, np.uint8).reshape(len(ks), h, w, 3)
    got = _sampled(name)
    for j, k in enumerate(ks):
        assert got.timestamps[k] == k
        mad = np.abs(got.frames[k].astype(np.int16) - ref[j]).mean()
        assert mad < 1.0, f"{name} t={k}: frame #{want[j]} differs from ffmpeg's by {mad:.2f}"


def test_max_frames_stops_decoding_early(monkeypatch: pytest.MonkeyPatch) -> None:
    path = _fixture("safari.mp4")
    opened: list[_CountingContainer] = []
    real_open = av.open

    def counting_open(*args, **kwargs):
        opened.append(_CountingContainer(real_open(*args, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(simple_decode.av, "open", counting_open)
    got = sample_frames(path, fps=1.0, max_frames=3)
    assert got.timestamps == [0.0, 1.0, 2.0] and len(got.frames) == 3
    # t=2 is settled by the first frame after it (#60 at 2.002 s); the video has 315 frames.
    assert opened[-1].decoded <= 62
    assert got.duration == pytest.approx(10.5105, abs=1e-3)  # from the header when stopping early
    monkeypatch.undo()
    full = _sampled("safari.mp4")
    for a, b in zip(got.frames, full.frames, strict=False):
        np.testing.assert_array_equal(a, b)


class _CountingContainer:
    """Wraps a PyAV container and counts the frames that decode() hands out."""

    def __init__(self, container) -> None:
        self._c = container
        self.decoded = 0

    def __getattr__(self, name: str):
        return getattr(self._c, name)

    def __enter__(self):
        self._c.__enter__()
        return self

    def __exit__(self, *exc):
        return self._c.__exit__(*exc)

    def decode(self, *args, **kwargs):
        for frame in self._c.decode(*args, **kwargs):
            self.decoded += 1
            yield frame


# --- generated videos ---------------------------------------------------------------------------------


def test_frame_exact_cfr(coded_25fps: Path) -> None:
    got = sample_frames(coded_25fps, fps=1.0)
    assert got.timestamps == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [_read_code(f) for f in got.frames] == [0, 25, 50, 75, 100]
    assert got.duration == pytest.approx(5.0, abs=1e-3)
    assert got.source_fps == pytest.approx(25.0)


def test_displayed_frame_not_nearest(coded_25fps: Path) -> None:
    """At fps=3, t=2/3 s falls at frame 16.67: the frame on screen is 16 (nearest-rounding would give 17)."""
    got = sample_frames(coded_25fps, fps=3.0)
    assert len(got.frames) == 15  # k/3 < 5
    assert got.timestamps[:3] == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert [_read_code(f) for f in got.frames] == [25 * k // 3 for k in range(15)]


@pytest.mark.parametrize(("fps", "count"), [(2.0, 10), (0.5, 3), (0.3, 2), (25.0, 125), (50.0, 250)])
def test_rates(coded_25fps: Path, fps: float, count: int) -> None:
    got = sample_frames(coded_25fps, fps=fps)
    assert len(got.frames) == count
    assert [_read_code(f) for f in got.frames] == [
        math.floor(Fraction(25 * k) / Fraction(fps).limit_denominator()) for k in range(count)
    ]


def test_max_frames_cuts_not_subsamples(coded_25fps: Path) -> None:
    got = sample_frames(coded_25fps, fps=2.0, max_frames=4)
    assert got.timestamps == [0.0, 0.5, 1.0, 1.5]
    assert [_read_code(f) for f in got.frames] == [0, 12, 25, 37]
    assert got.duration == pytest.approx(5.0, abs=0.05)
    assert len(sample_frames(coded_25fps, fps=1.0, max_frames=100).frames) == 5  # shorter video: all of it


@needs_ffmpeg
@pytest.mark.parametrize("codec", sorted(CODECS))
def test_nonzero_start_time(tmp_path: Path, codec: str) -> None:
    ext, args = CODECS[codec]
    path = _make_coded(tmp_path / f"offset.{ext}", 125, 25, [*args, "-output_ts_offset", "3"])
    assert float(_video_stream_info(path)["start_time"]) == pytest.approx(
        3.0
    )  # the file really starts at 3 s
    got = sample_frames(path, fps=1.0)
    assert got.timestamps == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [_read_code(f) for f in got.frames] == [0, 25, 50, 75, 100]
    assert got.duration == pytest.approx(5.0, abs=1e-3)


# Frames 0-9 every 0.1 s, frame 10 at 1.0 s held until 2.5 s, then frames 11-49 at 30 fps.
VFR_SETPTS = "settb=1/3000,setpts='if(lt(N,10),N*0.1,if(eq(N,10),1.0,2.5+(N-11)/30))/TB'"
# At fps=4: ties at 0.5 and 3.0 (a frame starts exactly there), the 1.0-2.5 s hold, then 30 fps.
VFR_EXPECTED = [0, 2, 5, 7, 10, 10, 10, 10, 10, 10, 11, 18, 26, 33, 41, 48]


@needs_ffmpeg
@pytest.mark.parametrize("codec", sorted(CODECS))
def test_variable_frame_rate(tmp_path: Path, codec: str) -> None:
    ext, args = CODECS[codec]
    out = [*args, "-fps_mode", "passthrough", "-enc_time_base", "1/3000"]
    path = _make_coded(tmp_path / f"vfr.{ext}", 50, 25, out, vf=VFR_SETPTS)
    pts = _frame_pts(path)
    assert len(pts) == 50 and pts[10] == 1 and pts[11] == Fraction(5, 2)  # the file is what we meant
    got = sample_frames(path, fps=4.0)
    assert got.timestamps == [k / 4 for k in range(16)]
    oracle = [_displayed_index(pts, Fraction(k, 4)) for k in range(16)]
    assert oracle == VFR_EXPECTED
    assert [_read_code(f) for f in got.frames] == VFR_EXPECTED
    # The frames held across the gap are equal but independent arrays.
    assert got.frames[5] is not got.frames[4]


@needs_ffmpeg
def test_rotation_metadata(tmp_path: Path) -> None:
    """A phone-style 90-degree display matrix: frames come out upright, as ffmpeg's autorotate shows them."""
    plain = _make_coded(tmp_path / "plain.mp4", 25, 25, CODECS["mp4-x264"][1])
    rotated = tmp_path / "rotated.mp4"
    base = ["ffmpeg", "-v", "error", "-y"]
    tries = [
        [*base, "-display_rotation", "90", "-i", str(plain), "-c", "copy", str(rotated)],  # ffmpeg >= 6
        [*base, "-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(rotated)],  # ffmpeg 5
    ]
    if not any(subprocess.run(cmd, capture_output=True).returncode == 0 for cmd in tries):
        pytest.skip("this ffmpeg cannot write a display matrix")
    side = _ffprobe(rotated, "stream_side_data=rotation")["streams"][0].get("side_data_list", [])
    if not any(abs(int(s.get("rotation", 0))) == 90 for s in side):
        pytest.skip("this ffmpeg wrote no 90-degree display matrix")
    raw = subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-i",
            str(rotated),
            "-frames:v",
            "1",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-",
        ],
        check=True,
        capture_output=True,
    ).stdout
    ref = np.frombuffer(raw, np.uint8).reshape(W, H, 3)  # autorotated: width and height swapped
    got = sample_frames(rotated, fps=1.0)
    assert got.frames[0].shape == (W, H, 3)
    assert np.abs(got.frames[0].astype(np.int16) - ref).mean() < 1.0


def test_truncated_file_keeps_what_decodes(tmp_path: Path) -> None:
    """A download cut short (moov at the front): the decodable part comes back, no exception."""
    data = _fixture("safari.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    got = sample_frames(cut, fps=1.0)
    assert 1 <= len(got.frames) < 11
    assert got.duration < 10.5


def test_animated_gif_is_video(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    imgs = [Image.new("RGB", (32, 16), c) for c in colors]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=500, loop=0)
    assert media_kind(path) == "video"
    got = sample_frames(path, fps=1.0)
    assert got.timestamps == [0.0, 1.0]  # frames at 0, 0.5, 1.0 s; the video ends at 1.5 s
    assert [tuple(int(v) for v in f[8, 16]) for f in got.frames] == [colors[0], colors[2]]


# --- images and bad input -----------------------------------------------------------------------------


def test_png_is_image(tmp_path: Path) -> None:
    path = tmp_path / "still.png"
    Image.new("RGBA", (40, 20), (10, 20, 30, 128)).save(path)
    assert media_kind(path) == "image"
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (40, 20)


def test_image_with_video_extension_is_image(tmp_path: Path) -> None:
    path = tmp_path / "photo.mp4"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path, format="JPEG")
    assert media_kind(path) == "image"


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    path = tmp_path / "phone.jpg"
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: display turned 90 degrees clockwise
    img.save(path, exif=exif, quality=95)
    up = load_image(path)
    assert up.size == (20, 40)
    top, bottom = np.asarray(up)[5, 10], np.asarray(up)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def _bad_files(tmp: Path) -> dict[str, Path]:
    text = tmp / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    empty = tmp / "empty.mp4"
    empty.write_bytes(b"")
    return {"missing": tmp / "nope.mp4", "text": text, "empty": empty, "directory": tmp}


@pytest.mark.parametrize("kind", ["missing", "text", "empty", "directory"])
@pytest.mark.parametrize("func", [media_kind, sample_frames], ids=["media_kind", "sample_frames"])
def test_bad_input_raises_media_error(tmp_path: Path, kind: str, func) -> None:
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(MediaError) as info:
        func(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg


@needs_ffmpeg
@pytest.mark.parametrize("func", [media_kind, sample_frames], ids=["media_kind", "sample_frames"])
def test_audio_only_raises_media_error(tmp_path: Path, func) -> None:
    path = tmp_path / "tone.m4a"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=d=1", "-c:a", "aac", str(path)],
        check=True,
        capture_output=True,
    )
    with pytest.raises(MediaError, match="no video stream") as info:
        func(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("func", [media_kind, sample_frames], ids=["media_kind", "sample_frames"])
def test_video_without_decodable_frames(tmp_path: Path, func) -> None:
    """realshort.mp4 with its mdat payload zeroed: the container opens, no frame decodes."""
    data = bytearray(_fixture("realshort.mp4").read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4 : at], "big")
    data[at + 4 : at - 4 + size] = bytes(size - 8)
    path = tmp_path / "zeroed.mp4"
    path.write_bytes(bytes(data))
    with pytest.raises(MediaError, match="decodable") as info:
        func(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_load_image_of_non_image(tmp_path: Path) -> None:
    path = _bad_files(tmp_path)["text"]
    with pytest.raises(MediaError, match="cannot read image"):
        load_image(path)


@pytest.mark.parametrize(
    ("fps", "max_frames"),
    [(0, None), (-1.0, None), (float("nan"), None), (math.inf, None), (1.0, 0), (1.0, -3)],
)
def test_bad_arguments(fps: float, max_frames: int | None) -> None:
    with pytest.raises(ValueError, match="fps|max_frames"):
        sample_frames(FIXTURES / "realshort.mp4", fps=fps, max_frames=max_frames)


def test_result_type() -> None:
    got = sample_frames(_fixture("realshort.mp4"))
    assert isinstance(got, SampledFrames)
    assert all(isinstance(t, float) for t in got.timestamps)
    assert all(f.flags.c_contiguous for f in got.frames)
