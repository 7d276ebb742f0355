"""The streaming sampler and probe on generated edge cases and bad inputs (ffmpeg-made, real decoders)."""

from __future__ import annotations

import os
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from test_simple_decode import (
    CODECS,
    VFR_EXPECTED,
    VFR_SETPTS,
    _frame_pts,
    _make_coded,
    _read_code,
    needs_ffmpeg,
)

from vidmini.ingest.errors import (
    CorruptMedia,
    NotAVideo,
    SourceNotFound,
    SourcePermissionError,
    SourceUnreachable,
)
from vidmini.ingest.probe import probe
from vidmini.ingest.sampler import FrameSampler
from vidmini.ingest.simple_decode import sample_frames

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "videos"


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True, capture_output=True)


def codes(frames) -> list[int]:
    return [_read_code(f.image) for f in frames]


@pytest.mark.parametrize("name", ["safari.mp4", "cockatoo.mp4", "realshort.mp4"])
def test_exact_mode_equals_the_reference_sampler_on_fixtures(name):
    got = list(FrameSampler(FIXTURES / name))
    ref = sample_frames(FIXTURES / name)
    assert [f.t for f in got] == ref.timestamps
    assert all(np.array_equal(a.image, b) for a, b in zip(got, ref.frames, strict=True))
    info = probe(FIXTURES / name)
    assert info.duration_s is not None and len(got) == sum(1 for k in range(100) if k < info.duration_s)


@needs_ffmpeg
@pytest.mark.parametrize("codec", sorted(CODECS))
def test_exact_fast_every_k_and_size(tmp_path, codec):
    ext, args = CODECS[codec]
    path = _make_coded(tmp_path / f"cfr.{ext}", 125, 25, args)
    exact = list(FrameSampler(path))
    assert codes(exact) == [0, 25, 50, 75, 100]
    assert [f.pts for f in exact] == [0.0, 1.0, 2.0, 3.0, 4.0]
    fast = list(FrameSampler(path, mode="fast"))
    assert [f.t for f in fast] == [f.t for f in exact]
    for f in fast:  # within one frame of the displayed one, and the reported pts is the real one
        assert 0 <= f.t - f.pts <= 1 / 25 + 1e-9
        assert _read_code(f.image) == round(f.pts * 25)
    assert codes(FrameSampler(path, fps=None, every_k=10)) == list(range(0, 125, 10))
    assert codes(FrameSampler(path, fps=2.0))[:4] == [0, 12, 25, 37]  # 12 is on screen at 0.5 s
    small = next(iter(FrameSampler(path, size=(80, 16))))
    assert small.image.shape == (16, 80, 3)
    with pytest.raises(ValueError):
        FrameSampler(path, fps=31)
    with pytest.raises(ValueError):
        FrameSampler(path, fps=0.01)


@needs_ffmpeg
def test_vfr_start_offset_and_rotation(tmp_path):
    ext, args = CODECS["mkv-ffv1"]
    vfr = _make_coded(tmp_path / f"vfr.{ext}", 50, 25, [*args, "-fps_mode", "passthrough", "-enc_time_base",
                                                         "1/3000"], vf=VFR_SETPTS)
    assert _frame_pts(vfr)[11] == Fraction(5, 2)
    assert codes(FrameSampler(vfr, fps=4.0)) == VFR_EXPECTED
    assert probe(vfr).is_vfr
    offset = _make_coded(tmp_path / f"offset.{ext}", 125, 25, [*args, "-output_ts_offset", "3"])
    assert probe(offset).start_time_s == pytest.approx(3.0)
    got = list(FrameSampler(offset))
    assert [f.t for f in got] == [0.0, 1.0, 2.0, 3.0, 4.0] and codes(got) == [0, 25, 50, 75, 100]
    plain = _make_coded(tmp_path / "plain.mp4", 25, 25, CODECS["mp4-x264"][1])
    rotated = tmp_path / "rotated.mp4"
    ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(rotated))
    info = probe(rotated)
    if info.rotation_deg == 0:
        pytest.skip("this ffmpeg wrote no rotation")
    assert (info.display_width, info.display_height) == (info.height, info.width)
    frame = next(iter(FrameSampler(rotated)))
    assert frame.image.shape == (info.display_height, info.display_width, 3)
    assert np.array_equal(frame.image, sample_frames(rotated).frames[0])


@needs_ffmpeg
def test_odd_size_one_frame_10bit_interlaced(tmp_path):
    odd = tmp_path / "odd.mkv"
    raw = np.random.default_rng(0).integers(0, 256, (20, 241, 321, 3), dtype=np.uint8).tobytes()
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "321x241", "-r",
                    "10", "-i", "-", "-c:v", "ffv1", "-pix_fmt", "gbrp", str(odd)], input=raw, check=True)
    assert (probe(odd).width, probe(odd).height) == (321, 241)
    frames = list(FrameSampler(odd))
    assert len(frames) == 2 and frames[0].image.shape == (241, 321, 3)
    one = tmp_path / "one.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10", "-frames:v", "1", "-c:v", "libx264", str(one))
    assert len(list(FrameSampler(one))) == 1
    ten = tmp_path / "ten.mkv"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=2", "-c:v", "ffv1", "-pix_fmt",
           "yuv420p10le", str(ten))
    info = probe(ten)
    assert info.bit_depth == 10
    ten_frames = list(FrameSampler(ten))
    assert len(ten_frames) == 2 and ten_frames[0].image.dtype == np.uint8 and ten_frames[0].image.max() > 200
    inter = tmp_path / "interlaced.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25:duration=2", "-c:v", "libx264", "-flags",
           "+ildct+ilme", "-x264opts", "tff=1", "-pix_fmt", "yuv420p", str(inter))
    assert probe(inter).interlaced
    assert len(list(FrameSampler(inter))) == 2


@needs_ffmpeg
def test_two_video_streams(tmp_path):
    coded = _make_coded(tmp_path / "coded.mkv", 50, 25, CODECS["mkv-ffv1"][1])
    both = tmp_path / "both.mkv"
    ffmpeg("-i", str(coded), "-f", "lavfi", "-i", "color=c=red:size=160x32:rate=25:duration=2", "-map", "0:v",
           "-map", "1:v", "-c:v", "ffv1", str(both))
    info = probe(both)
    assert [s["index"] for s in info.video_streams] == [0, 1]
    assert codes(FrameSampler(both)) == [0, 25]
    red = next(iter(FrameSampler(both, stream=1))).image
    assert red[..., 0].mean() > 200 and red[..., 1].mean() < 50
    with pytest.raises(NotAVideo, match="index 5"):
        next(iter(FrameSampler(both, stream=5)))


@needs_ffmpeg
def test_damage_in_the_middle_is_skipped_and_reported(tmp_path):
    ts = _make_coded(tmp_path / "long.ts", 250, 25, ["-c:v", "libx264", "-g", "25", "-pix_fmt", "yuv444p",
                                                     "-f", "mpegts"])
    data = bytearray(ts.read_bytes())
    lo, hi = int(len(data) * 0.45), int(len(data) * 0.6)
    data[lo:hi] = os.urandom(hi - lo)
    damaged = tmp_path / "damaged.ts"
    damaged.write_bytes(bytes(data))
    sampler = FrameSampler(damaged)
    got = list(sampler)
    times = [f.t for f in got]
    assert times[:3] == [0.0, 1.0, 2.0] and times[-1] == 9.0  # before and after the damage
    assert len(got) < 10 and sampler.gaps  # some sampling times were lost, and said so
    lost = [float(k) for k in range(10) if float(k) not in times]
    assert all(any(a <= t < b for a, b in sampler.gaps) for t in lost)
    for f in got:  # whatever came back is the right picture for its time
        assert _read_code(f.image) == round(f.pts * 25)


def test_bad_inputs_get_typed_errors(tmp_path, monkeypatch):
    from PIL import Image

    with pytest.raises(SourceNotFound, match="nope.mp4"):
        probe(tmp_path / "nope.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(NotAVideo, match="empty"):
        probe(empty)
    text = tmp_path / "text.mp4"
    text.write_text("hello\n" * 100)
    with pytest.raises(NotAVideo):
        probe(text)
    png = tmp_path / "pic.png"
    Image.new("RGB", (32, 32)).save(png)
    with pytest.raises(NotAVideo, match="image"):
        probe(png)
    truncated = tmp_path / "truncated.mp4"  # a recording cut off before its index (moov) was written
    if (FIXTURES / "safari.mp4").exists():
        ffmpeg("-i", str(FIXTURES / "safari.mp4"), "-c", "copy", "-t", "3", str(tmp_path / "full.mp4"))
        truncated.write_bytes((tmp_path / "full.mp4").read_bytes()[: 60_000])
        with pytest.raises((CorruptMedia, NotAVideo)):
            probe(truncated)
    with pytest.raises(SourceUnreachable, match="127.0.0.1"):
        probe("http://127.0.0.1:9/none.ts")
    real = FIXTURES / "realshort.mp4"
    monkeypatch.setattr(os, "access", lambda p, mode: False)  # root reads anything: simulate a 0600 file
    with pytest.raises(SourcePermissionError, match="permission"):
        probe(real)


@needs_ffmpeg
def test_audio_only_is_not_a_video(tmp_path):
    audio = tmp_path / "sound.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=d=1", str(audio))
    with pytest.raises(NotAVideo, match="no video stream"):
        probe(audio)


SEEK_LOOP_CHECK = """
import sys, json
import numpy as np
from vidmini.ingest.sampler import FrameSampler
from vidmini.ingest.simple_decode import sample_frames
got = list(FrameSampler(sys.argv[1]))
ref = sample_frames(sys.argv[1])
print(json.dumps({"times": [f.t for f in got], "ref_times": ref.timestamps,
                  "same_images": all(np.array_equal(a.image, b) for a, b in zip(got, ref.frames, strict=True))}))
"""


@needs_ffmpeg
def test_a_seek_the_demuxer_lands_early_does_not_loop(tmp_path):
    """A synthetic-world video cut by stream copy where the demuxer's seek lands a GOP before the keyframe the
    index names: the sampler used to seek there again forever. It must finish, with the reference's frames."""
    import dataclasses
    import json
    import sys

    from vidmini.demo.render import write_video
    from vidmini.demo.world import generate_timeline

    whole = write_video(dataclasses.replace(generate_timeline(101, 900), duration_s=400), tmp_path / "whole.mp4")
    cut = tmp_path / "cut.mp4"
    ffmpeg("-ss", "360", "-i", str(whole), "-t", "40", "-c", "copy", str(cut))
    run = subprocess.run([sys.executable, "-c", SEEK_LOOP_CHECK, str(cut)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert len(out["times"]) == 40 and out["times"] == out["ref_times"] and out["same_images"]
