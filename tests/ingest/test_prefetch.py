"""Decoding in a child process while the model loads (`vidmini.ingest.prefetch`): the same frames, the same
errors and the same store as decoding in the ingest itself, memory bounded, and nothing left running."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vidmini.ingest.errors import IngestError
from vidmini.ingest.options import IngestOptions
from vidmini.ingest.prefetch import PrefetchedFrames
from vidmini.ingest.sampler import FrameSampler

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "videos"
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg CLI not on PATH")


def frames_of(iterable) -> list[tuple[float, float, int, bytes, tuple]]:
    return [(f.t, f.pts, f.index, f.image.tobytes(), f.image.shape) for f in iterable]


@pytest.mark.parametrize("name, options", [
    ("cockatoo.mp4", IngestOptions()),
    ("safari.mp4", IngestOptions(fps=2.5, mode="fast")),
    ("realshort.mp4", IngestOptions(every_k=7)),
])
def test_the_child_hands_back_the_samplers_own_frames(name, options):
    source = str(FIXTURES / name)
    sampler = FrameSampler(source, fps=None if options.every_k else options.fps, every_k=options.every_k,
                           mode=options.mode)
    expected = frames_of(sampler)
    with PrefetchedFrames(source, options) as prefetched:
        got = frames_of(prefetched)
    assert expected and got == expected
    assert prefetched.gaps == [tuple(g) for g in sampler.gaps]


def test_given_the_models_side_the_child_squares_frames_and_makes_thumbnails_from_the_full_frame():
    """What the parent would do itself (the engine's nearest pick to the side; the thumbnail of the full frame),
    byte for byte, done in the child."""
    from vidmini.engine.frames import resize_nearest
    from vidmini.ingest.thumbnails import thumbnail_jpeg

    source = str(FIXTURES / "cockatoo.mp4")
    full = list(FrameSampler(source))
    with PrefetchedFrames(source, IngestOptions(), side=80) as prefetched:
        got = list(prefetched)
    assert [(f.t, f.pts, f.index) for f in got] == [(f.t, f.pts, f.index) for f in full]
    for mine, theirs in zip(got, full, strict=True):
        assert mine.image.shape == (80, 80, 3)
        assert np.array_equal(mine.image, resize_nearest(theirs.image, 80))
        assert mine.thumbnail == thumbnail_jpeg(theirs.image)


def test_a_tiny_memory_bound_still_delivers_every_frame_in_order():
    source = str(FIXTURES / "safari.mp4")
    with PrefetchedFrames(source, IngestOptions(), max_bytes=1) as prefetched:
        times = [f.t for f in prefetched]
    assert times == [float(t) for t in range(11)]


@needs_ffmpeg
def test_bad_media_raises_the_samplers_error_type(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 100)
    truncated = tmp_path / "cut.mp4"
    data = (FIXTURES / "cockatoo.mp4").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    for path in (text, truncated):
        try:
            expected = frames_of(FrameSampler(str(path)))
            error = None
        except IngestError as e:
            expected, error = None, type(e)
        prefetched = PrefetchedFrames(str(path), IngestOptions())
        try:
            if error is None:
                assert frames_of(prefetched) == expected
            else:
                with pytest.raises(error):
                    frames_of(prefetched)
        finally:
            prefetched.close()


def test_close_mid_way_stops_the_child():
    prefetched = PrefetchedFrames(str(FIXTURES / "cockatoo.mp4"), IngestOptions(fps=10), max_bytes=1)
    first = next(iter(prefetched))
    assert first.t == 0.0
    prefetched.close()
    assert prefetched._child.poll() is not None  # killed and reaped, not left decoding
    assert not prefetched.folder.exists()  # its frames removed
    prefetched.close()  # twice is harmless


def test_library_ingest_with_a_cold_model_stores_what_a_warm_one_does(tmp_path, monkeypatch):
    """A cold library decodes in the child while it loads the model; a warm one decodes in-process: the stores
    hold the same frames, times and states."""
    import torch

    from vidmini.ingest.job import load_states
    from vidmini.service.library import Library

    clip = tmp_path / "clip.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25:d=12",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(clip)], check=True)
    cold = Library(tmp_path / "cold")
    assert not cold.model_loaded
    spawned = []
    real_popen = subprocess.Popen

    def watching_popen(*args, **kwargs):
        spawned.append(args[0])
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", watching_popen)
    a = cold.ingest(str(clip))
    monkeypatch.undo()
    assert any("vidmini.ingest.prefetch" in " ".join(map(str, cmd)) for cmd in spawned)
    warm = Library(tmp_path / "warm", engine=cold.engine)
    b = warm.ingest(str(clip))
    assert (a.frames, a.duration_s, a.gaps) == (b.frames, b.duration_s, b.gaps) == (12, 12.0, [])
    sa, sb = cold.get_store(a.video_id), warm.get_store(b.video_id)
    assert np.array_equal(sa.timestamps(), sb.timestamps())
    assert [sa.thumbnail(i) for i in range(12)] == [sb.thumbnail(i) for i in range(12)]
    xa, xb = load_states(sa), load_states(sb)
    assert torch.equal(xa.compressed, xb.compressed) and torch.equal(xa.keys[-1], xb.keys[-1])


def test_frames_squared_to_a_wrong_side_hint_are_not_used(tmp_path):
    """A hint that disagrees with the loaded model's processor (a model swapped under the same path) makes the
    ingest decode the source itself: the store is the one an unhinted ingest makes."""
    import torch

    from vidmini.ingest.job import load_states, run_ingest
    from vidmini.service.library import Library
    from vidmini.store.video_store import VideoStore

    source = str(FIXTURES / "safari.mp4")
    engine = Library(tmp_path / "lib").engine
    assert engine.frame_side != 37
    with PrefetchedFrames(source, IngestOptions(), side=37) as wrong:
        hinted = run_ingest(source, engine, tmp_path / "a", prefetched=wrong)
    plain = run_ingest(source, engine, tmp_path / "b")
    assert hinted.frames == plain.frames == 11
    sa, sb = VideoStore.load_existing(hinted.store_path), VideoStore.load_existing(plain.store_path)
    assert torch.equal(load_states(sa).compressed, load_states(sb).compressed)
    assert [sa.thumbnail(i) for i in range(11)] == [sb.thumbnail(i) for i in range(11)]
