"""The ingest job end to end: real files, kill-and-resume, live sources, bad inputs, the CLI."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vidmini.demo.tiny import build_tiny_checkpoint
from vidmini.engine.checkpoint import load_checkpoint
from vidmini.engine.inference import Engine
from vidmini.ingest.job import IngestOptions, load_states, run_ingest
from vidmini.ingest.simple_decode import sample_frames
from vidmini.store.video_store import StoreCatalog

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "videos"
REPO = Path(__file__).resolve().parents[2]
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg CLI not on PATH")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ingest_ckpt"), seed=21)


@pytest.fixture(scope="module")
def engine(ckpt) -> Engine:
    loaded = load_checkpoint(ckpt)
    return Engine(loaded.model, loaded.tokenizer, loaded.processor, loaded.eos_ids, name=str(ckpt))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_ingest_fixture_matches_direct_encoding(engine, tmp_path):
    video = FIXTURES / "safari.mp4"
    progress = []
    result = run_ingest(str(video), engine, tmp_path, IngestOptions(chunk_frames=4), on_progress=progress.append)
    assert result.frames == 11 and not result.reused
    assert [p.frames_done for p in progress] == [4, 8, 11]
    assert progress[-1].total == 11
    store = StoreCatalog(tmp_path).get(result.video_id)
    assert store.complete
    assert store.timestamps().tolist() == [float(t) for t in range(11)]
    # the stored states are what encoding the same frames directly gives
    direct = engine.encode_frames(engine.frame_pixels(sample_frames(video).frames))
    stored = load_states(store)
    assert rel_err(stored.compressed, direct.compressed) < 1e-5  # batches differ: rounding only
    assert rel_err(stored.keys[-1], direct.keys[-1]) < 1e-5
    q = "What colour is the square?"
    assert rel_err(engine.first_logits(q, stored), engine.first_logits(q, direct)) < 1e-4
    # a known file with the same model reuses its store
    again = run_ingest(str(video), engine, tmp_path, IngestOptions(chunk_frames=4))
    assert again.reused and again.video_id == result.video_id
    assert len(store.thumbnail(0)) > 100 and store.thumbnail(0)[:2] == b"\xff\xd8"  # JPEG


KILL_SCRIPT = """
import sys
from pathlib import Path
from vidmini.engine.checkpoint import load_checkpoint
from vidmini.engine.inference import Engine
from vidmini.ingest.job import IngestOptions, run_ingest
ckpt, video, root = sys.argv[1:4]
loaded = load_checkpoint(ckpt)
engine = Engine(loaded.model, loaded.tokenizer, loaded.processor, loaded.eos_ids, name=ckpt)
run_ingest(video, engine, Path(root), IngestOptions(chunk_frames=2))
print("done")
"""


@needs_ffmpeg
def test_killed_ingest_resumes_to_the_same_store(ckpt, tmp_path):
    video = tmp_path / "clip.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=96x64:rate=10:duration=24",
                    "-c:v", "libx264", "-g", "20", "-pix_fmt", "yuv420p", str(video)], check=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(root: Path, kill_at_chunk: int | None = None) -> None:
        """The ingest in its own process; SIGKILLed as soon as `kill_at_chunk` chunks are on disk (mid-ingest,
        however long the start-up takes: the 24 frames make 12 chunks)."""
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(ckpt), str(video), str(root)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if kill_at_chunk is not None:
            deadline = time.monotonic() + 240
            while len(list(root.rglob("chunk-*.safetensors"))) < kill_at_chunk:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
        if kill_at_chunk is None:
            assert proc.returncode == 0, err.decode()[-2000:]
        else:
            assert proc.returncode == -signal.SIGKILL and b"done" not in out  # killed before the ingest ended

    clean = tmp_path / "clean"
    run(clean)
    expected = tree_bytes(clean)
    assert len(list(clean.rglob("chunk-*.safetensors"))) == 12
    for seed in (1, 2, 3):
        root = tmp_path / f"killed{seed}"
        run(root, kill_at_chunk=random.Random(seed).randint(1, 10))
        run(root)
        assert tree_bytes(root) == expected, f"seed {seed}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_ffmpeg
def test_growing_file_is_ingested_as_it_arrives(engine, tmp_path):
    rec = tmp_path / "recording.ts"
    writer = subprocess.Popen(["ffmpeg", "-v", "error", "-re", "-f", "lavfi", "-i",
                               "testsrc2=size=96x64:rate=10:duration=6", "-c:v", "libx264", "-g", "10",
                               "-tune", "zerolatency", "-f", "mpegts", "-flush_packets", "1", str(rec)])
    while not rec.exists() or rec.stat().st_size == 0:
        time.sleep(0.05)
    seen = []
    result = run_ingest(str(rec), engine, tmp_path / "data", IngestOptions(chunk_frames=1, live=True),
                        on_progress=lambda p: seen.append((time.monotonic(), p.frames_done)))
    writer.wait(timeout=30)
    assert result.frames == 6
    # frames were committed while the writer was still writing (its ~6 s of real time)
    assert seen[0][0] < seen[-1][0] - 2.5


@needs_ffmpeg
def test_loopback_http_stream(engine, tmp_path):
    port = _free_port()
    server = subprocess.Popen(["ffmpeg", "-v", "error", "-re", "-f", "lavfi", "-i",
                               "testsrc2=size=96x64:rate=10:duration=4", "-c:v", "libx264", "-g", "10",
                               "-f", "mpegts", "-listen", "1", f"http://127.0.0.1:{port}/live.ts"])
    try:
        url = f"http://127.0.0.1:{port}/live.ts"
        time.sleep(1.0)  # the one-shot listener serves the first client: no probing connection before ours
        result = run_ingest(url, engine, tmp_path / "data", IngestOptions(chunk_frames=2))
        assert 3 <= result.frames <= 4
    finally:
        server.kill()
        server.wait()


def vidmini(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vidmini.cli.main", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env}, timeout=300)


def test_cli_ingest_list_ask_rm(ckpt, tmp_path):
    env = {"VIDMINI_HOME": str(tmp_path / "home"), "VIDMINI_MODEL": str(ckpt)}
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    res = vidmini("ingest", str(FIXTURES / "realshort.mp4"), str(bad), str(FIXTURES / "safari.mp4"), "--json",
                  env=env)
    assert res.returncode == 2  # one bad input: reported, the others still ingested
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r.get("frames") for r in rows] == [2, None, 11]
    assert "error" in rows[1] and "bad.mp4" in res.stderr
    assert sum("error:" in line for line in res.stderr.splitlines()) == 1
    listed = json.loads(vidmini("list", "--json", env=env).stdout)
    assert sorted(i["frames"] for i in listed) == [2, 11]
    video_id = rows[2]["id"]
    ans = vidmini("ask", video_id[:10], "What colour is the square?", "--json", "--max-new-tokens", "3", env=env)
    assert ans.returncode == 0, ans.stderr
    assert json.loads(ans.stdout)["frames"] == 11
    assert vidmini("rm", video_id, env=env).returncode == 0
    assert len(json.loads(vidmini("list", "--json", env=env).stdout)) == 1
    gone = vidmini("rm", video_id, env=env)
    assert gone.returncode == 2 and len(gone.stderr.strip().splitlines()) == 1


def test_hwaccel_ingest_stores_the_software_frames(engine, tmp_path):
    """`hwaccel="cuda"` must give the same stored states: NVDEC where present, software fallback here."""
    source = str(FIXTURES / "realshort.mp4")
    soft = run_ingest(source, engine, tmp_path / "a", IngestOptions())
    hard = run_ingest(source, engine, tmp_path / "b", IngestOptions(hwaccel="cuda"))
    assert hard.frames == soft.frames == 2
    from vidmini.store.video_store import VideoStore

    a, b = (load_states(VideoStore.load_existing(r.store_path)) for r in (soft, hard))
    if not torch.cuda.is_available():  # software both times: bit-identical
        assert torch.equal(a.compressed, b.compressed)
    else:  # NVDEC's YUV→RGB differs slightly from swscale's
        assert rel_err(b.compressed, a.compressed) < 0.05
