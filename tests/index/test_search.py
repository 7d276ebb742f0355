"""Moment search: FAISS indexes (exact and approximate, persisted, repaired), moments, and the CLI path on real
videos ingested with the shipped demo model."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vidmini.cli.main import main as cli
from vidmini.demo.render import write_video
from vidmini.demo.world import generate_timeline, truth_at
from vidmini.engine.load import SHIPPED_MODEL_DIR, choose_model, open_engine
from vidmini.index.library import LibraryIndex
from vidmini.index.moments import Hit, collapse_duplicates, merge_hits, scene_boundaries
from vidmini.index.vectors import FrameVectors, IndexCorrupt

REPO = Path(__file__).resolve().parents[2]
shipped = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Vectors in clusters, like frames of shots: the structure approximate indexes rely on."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(8, n // 200), dim))
    return unit(centres[rng.integers(len(centres), size=n)] + 0.35 * rng.standard_normal((n, dim)))


# ---- the FAISS layer ------------------------------------------------------------------------------------------
def test_exact_index_returns_the_true_nearest_frames():
    x = clustered(2000, 32, 0)
    index = FrameVectors.build(x, np.arange(2000) + 7, 32)
    assert index.spec.kind == "flat"
    q = unit(np.random.default_rng(1).standard_normal((5, 32)))
    scores, ids = index.search(q, 10)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10] + 7
    assert np.array_equal(ids, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, truth - 7, 1), rtol=1e-5, atol=1e-5)


def test_approximate_index_past_the_threshold_keeps_recall_and_supports_add_and_remove():
    x = clustered(30_000, 48, 2)
    index = FrameVectors.build(x[:25_000], np.arange(25_000), 48, exact_limit=10_000)
    assert index.spec.kind == "ivf"
    index.add(x[25_000:], np.arange(25_000, 30_000))
    q = x[np.random.default_rng(3).choice(30_000, 50, replace=False)] + 0.01
    _, ids = index.search(unit(q), 10)
    truth = np.argsort(-(unit(q) @ x.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert recall >= 0.9, recall
    assert index.remove(np.arange(25_000, 30_000)) == 5000 and index.size == 25_000
    _, ids = index.search(unit(q), 10)
    assert ids.max() < 25_000


def test_saved_index_round_trips_and_damage_is_detected(tmp_path):
    x = clustered(500, 16, 4)
    index = FrameVectors.build(x, np.arange(500), 16)
    index.save(tmp_path / "v.faiss")
    again = FrameVectors.load(tmp_path / "v.faiss")
    q = x[:3]
    assert np.array_equal(index.search(q, 5)[1], again.search(q, 5)[1])
    data = bytearray((tmp_path / "v.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "v.faiss").write_bytes(bytes(data))
    with pytest.raises(IndexCorrupt):
        FrameVectors.load(tmp_path / "v.faiss")
    (tmp_path / "v.faiss").write_bytes(bytes(data[:100]))
    with pytest.raises(IndexCorrupt):
        FrameVectors.load(tmp_path / "v.faiss")
    with pytest.raises(IndexCorrupt):
        FrameVectors.load(tmp_path / "missing.faiss")


# ---- moments --------------------------------------------------------------------------------------------------
def test_adjacent_hits_merge_into_segments_scored_by_their_best_frame():
    hits = [Hit("a", f, float(f), s) for f, s in [(3, 0.5), (4, 0.9), (5, 0.6), (9, 0.7), (20, 0.8), (21, 0.2)]]
    hits.append(Hit("b", 4, 4.0, 0.95))
    moments = merge_hits(hits, max_gap_s=1.5)
    spans = [(m.video_id, m.start, m.end, m.score, m.time) for m in moments]
    assert spans == [("b", 4.0, 4.0, 0.95, 4.0), ("a", 3.0, 5.0, 0.9, 4.0), ("a", 20.0, 21.0, 0.8, 20.0),
                     ("a", 9.0, 9.0, 0.7, 9.0)]


def test_a_static_scene_is_one_moment_not_the_whole_top_ten():
    rng = np.random.default_rng(5)
    static = unit(rng.standard_normal(16))
    other = unit(rng.standard_normal((3, 16)))
    vectors = {("cam", f): static for f in range(0, 100, 5)}  # the same view, hit at many separate times
    vectors.update({("cam", 200 + i): other[i] for i in range(3)})
    hits = [Hit("cam", f, float(f), 0.9 - f / 1000) for f in range(0, 100, 5)]
    hits += [Hit("cam", 200 + i, 200.0 + 10 * i, 0.5) for i in range(3)]
    moments = merge_hits(hits, max_gap_s=1.5)
    assert len(moments) == 23
    kept = collapse_duplicates(moments, lambda v, f: vectors[(v, f)])
    assert len(kept) == 4
    assert kept[0].frame == 0 and sorted(kept[0].frames) == list(range(0, 100, 5))


def test_scene_boundaries_are_the_cuts_not_the_drift():
    rng = np.random.default_rng(6)
    shots = [unit(rng.standard_normal(32)) for _ in range(4)]
    lengths = [30, 12, 40, 18]
    frames = []
    for shot, n in zip(shots, lengths, strict=True):
        drift = np.cumsum(0.02 * rng.standard_normal((n, 32)), axis=0)  # camera noise and slow change
        frames.append(unit(shot + drift))
    x = np.concatenate(frames)
    times = np.arange(len(x), dtype=float)
    assert scene_boundaries(x, times) == [30.0, 42.0, 82.0]
    assert scene_boundaries(x[:30], times[:30]) == []


# ---- real videos, the demo model, the CLI -------------------------------------------------------------------------
def _ingest(path: Path, capsys) -> str:
    assert cli(["ingest", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["id"]


def _search(capsys, *argv: str) -> dict:
    assert cli(["search", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@shipped
def test_search_finds_the_background_segment_and_forgets_a_removed_video(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VIDMINI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VIDMINI_MODEL", raising=False)
    timeline = generate_timeline(31337, 80)
    truths = [truth_at(timeline, t) for t in range(80)]
    first = _ingest(write_video(timeline, tmp_path / "a.mp4"), capsys)
    second = _ingest(write_video(generate_timeline(31338, 40), tmp_path / "b.mp4"), capsys)
    lib = LibraryIndex(tmp_path / "home")
    assert lib.sync().size == 120
    backgrounds = sorted({t.background for t in truths}, key=lambda b: sum(t.background == b for t in truths))
    rare = backgrounds[0]
    seconds = {t.t for t in truths if t.background == rare}
    out = _search(capsys, f"on a {rare} background", "--video", first[:10], "-k", "5")
    assert out["moments"] and all(m["video_id"] == first for m in out["moments"])
    assert any(m["start"] - 0.5 <= s <= m["end"] + 0.5 for m in out["moments"] for s in seconds), (out, seconds)
    spans = sorted((m["start"], m["end"]) for m in out["moments"])
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))  # segments are disjoint
    everywhere = _search(capsys, f"on a {rare} background", "-k", "10")
    assert {m["video_id"] for m in everywhere["moments"]} <= {first, second}
    assert cli(["rm", second]) == 0
    capsys.readouterr()
    assert LibraryIndex(tmp_path / "home").sync().size == 80
    assert all(m["video_id"] == first for m in _search(capsys, "a red circle", "-k", "10")["moments"])
    assert not (tmp_path / "home" / "index" / "videos" / f"{second}.faiss").exists()


@shipped
def test_corrupt_or_missing_index_files_are_rebuilt_from_the_store(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VIDMINI_HOME", str(tmp_path / "home"))
    video = _ingest(write_video(generate_timeline(4040, 30), tmp_path / "c.mp4"), capsys)
    before = _search(capsys, "a blue square", "--video", video, "-k", "3")
    index_dir = tmp_path / "home" / "index"
    (index_dir / "library.faiss").write_bytes(b"not an index")
    (index_dir / "videos" / f"{video}.faiss").unlink(missing_ok=True)
    lib = LibraryIndex(tmp_path / "home")
    assert lib.sync().size == 30 and "library" in lib.rebuilt
    assert lib.video(video).size == 30 and video in lib.rebuilt
    assert _search(capsys, "a blue square", "--video", video, "-k", "3") == before


@shipped
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")
def test_a_live_ingest_adds_frames_to_the_index_chunk_by_chunk(tmp_path):
    """A recording still being written (ffmpeg copying a synthetic video into MPEG-TS at 4× real time): each
    committed chunk is searchable at once, by incremental adds, never a rebuild."""
    from vidmini.ingest.job import IngestOptions, run_ingest

    engine = open_engine(choose_model(None))
    lib = LibraryIndex(tmp_path)
    sizes = []

    def on_chunk(store, first, vectors):
        lib.add_chunk(store, first, vectors)
        sizes.append((first, lib.video(store.video_id).size, lib.sync().size, time.monotonic()))

    source = write_video(generate_timeline(5050, 40), tmp_path / "source.mp4")
    rec = tmp_path / "recording.ts"
    writer = subprocess.Popen(["ffmpeg", "-v", "error", "-readrate", "4", "-i", str(source), "-c", "copy",
                               "-f", "mpegts", "-flush_packets", "1", str(rec)])
    while not rec.exists() or rec.stat().st_size == 0:
        time.sleep(0.05)
    result = run_ingest(str(rec), engine, tmp_path, IngestOptions(live=True, idle_timeout=2.0, chunk_frames=8),
                        on_chunk=on_chunk)
    writer.wait(timeout=60)
    assert result.frames == 40
    assert [s[:3] for s in sizes] == [(f, f + 8, f + 8) for f in range(0, 40, 8)]
    assert sizes[0][3] < sizes[-1][3] - 3  # the first frames were searchable while the rest was being written
    assert lib.rebuilt == []


def test_a_model_without_a_text_tower_ingests_and_search_says_it_is_unavailable(tmp_path, monkeypatch, capsys,
                                                                                 tiny_ckpt):
    monkeypatch.setenv("VIDMINI_HOME", str(tmp_path / "home"))
    engine = open_engine(choose_model(str(tiny_ckpt)))
    assert engine.retrieval is None
    video = _ingest_with(tmp_path, capsys, str(tiny_ckpt))
    assert cli(["search", "a red circle", "--model", str(tiny_ckpt)]) == 2
    assert "no text tower" in capsys.readouterr().err
    assert cli(["search", "a red circle", "--video", video]) == 2  # the default model: the video has no vectors
    assert "without retrieval embeddings" in capsys.readouterr().err


def _ingest_with(tmp_path: Path, capsys, model: str) -> str:
    path = write_video(generate_timeline(6060, 12), tmp_path / "t.mp4")
    assert cli(["ingest", str(path), "--json", "--model", model]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["id"]


@shipped
def test_search_slice_of_the_evaluation_finds_the_right_segment(tmp_path):
    spec = importlib.util.spec_from_file_location("eval_search", REPO / "research" / "bench" / "eval_search.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    found = module.evaluate(seed=5, n=30, workdir=tmp_path, min_s=60, max_s=150, log=lambda m: None, fps=4)
    assert len(found) == 30
    recall = np.mean([f.hit for f in found])
    assert recall >= 0.9, [(f.query.text, f.moments[:2]) for f in found if not f.hit]


@shipped
def test_retrieved_policy_fuses_the_frames_nearest_the_question_and_when_questions_get_moments(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VIDMINI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VIDMINI_MODEL", raising=False)
    timeline = generate_timeline(8080, 60)
    video = _ingest(write_video(timeline, tmp_path / "w.mp4"), capsys)
    question = "When is the word CAT shown?"
    assert cli(["ask", video, question, "--policy", "retrieved:4", "--json", "--max-new-tokens", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    engine = open_engine(choose_model(None))
    store = LibraryIndex(tmp_path / "home").library.get(video)
    scores = store.embeddings().float().numpy() @ engine.retrieval.embed_text([question])[0].numpy()
    assert out["policy"].startswith("retrieved") and out["fused_frames"] == sorted(np.argsort(-scores)[:4].tolist())
    assert 1 <= len(out["moments"]) <= 5
    assert all(0 <= m["start"] <= m["end"] <= 59 for m in out["moments"])
    assert cli(["ask", video, "What colour is the background?", "--json", "--max-new-tokens", "2"]) == 0
    assert "moments" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@shipped
def test_scenes_command_reports_the_hard_cuts_of_a_real_video(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VIDMINI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VIDMINI_MODEL", raising=False)
    timeline = generate_timeline(4242, 90)
    cuts = [t for t in range(1, 90) if truth_at(timeline, t).scene != truth_at(timeline, t - 1).scene]
    assert cuts  # this timeline has hard cuts
    video = _ingest(write_video(timeline, tmp_path / "s.mp4"), capsys)
    assert cli(["scenes", video, "--json"]) == 0
    starts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scene_starts"]
    assert all(any(abs(s - c) <= 1 for s in starts) for c in cuts), (cuts, starts)
    assert len(starts) < 90 / 5  # boundaries, not every frame-to-frame change
    assert cli(["scenes", "no-such-video"]) == 2
