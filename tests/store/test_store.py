"""The chunked store: round trips, atomic commits, real SIGKILL-and-resume, verify, the library, fingerprints."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch

import vidmini.store.video_store as store_mod
from vidmini.store.video_store import (
    NON_COMPARED,
    StoreCatalog,
    StoreConflict,
    StoreKey,
    StoreMismatch,
    UnknownVideo,
    VideoStore,
    fingerprint,
    fingerprint_url,
)

REPO = Path(__file__).resolve().parents[2]
KEY = StoreKey("0123456789abcdef", "tiny-model", "cfg0", "fps1-exact-sauto")
META = {"source": "/videos/clip.mp4", "model": {"id": "tiny-model"}, "sampling": {"fps": 1.0}}


def frames(start: int, n: int) -> dict[str, torch.Tensor]:
    """Deterministic per-frame tensors of mixed dtypes, a pure function of the frame indices."""
    idx = torch.arange(start, start + n)
    g = torch.Generator().manual_seed(start)
    return {"compressed": (idx[:, None, None] + torch.randn(n, 1, 8, generator=g)).bfloat16(),
            "keys.0": torch.randn(n, 2, 5, 4, generator=g),
            "ids": idx[:, None].repeat(1, 3)}


def thumbs(start: int, n: int) -> list[bytes]:
    return [bytes([i % 251]) * (i % 7) for i in range(start, start + n)]  # sizes 0..6, including empty


def append(store: VideoStore, start: int, n: int) -> None:
    store.append_chunk([0.5 * i for i in range(start, start + n)], [0.5 * i + 0.01 for i in range(start, start + n)],
                       frames(start, n), thumbnails=thumbs(start, n), embeddings=torch.full((n, 4), float(start)),
                       start_frame=start)


def store_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in NON_COMPARED}


def build(root: Path, sizes: list[int], complete: bool = True) -> VideoStore:
    store = VideoStore.open(root, KEY, META)
    start = 0
    for n in sizes:
        append(store, start, n)
        start += n
    if complete:
        store.mark_complete([(1.0, 2.5)], duration=0.5 * start)
    return store


# ---- round trip ---------------------------------------------------------------------------------------------
def test_round_trip_across_chunks(tmp_path, monkeypatch):
    store = build(tmp_path, [4, 4, 2])
    assert store.path == tmp_path / "videos" / KEY.video_id and store.video_id == KEY.video_id
    assert store.committed_frames == 10 and store.tensor_names == ["compressed", "ids", "keys.0"]
    want = frames(0, 4), frames(4, 4), frames(8, 2)
    got = store.load()
    for name in store.tensor_names:
        expected = torch.cat([w[name] for w in want])
        assert got[name].dtype == expected.dtype and torch.equal(got[name], expected)
    ts = store.timestamps()
    assert ts.dtype == np.float64 and ts.tolist() == [0.5 * i for i in range(10)]
    assert store.pts().tolist() == [0.5 * i + 0.01 for i in range(10)]
    assert [store.thumbnail(i) for i in range(10)] == thumbs(0, 10)
    assert store.embeddings()[:, 0].tolist() == [0.0] * 4 + [4.0] * 4 + [8.0] * 2
    # a slice across a chunk boundary, a negative slice, a subset of names
    part = store.load(["keys.0"], frames=slice(3, 9))
    assert list(part) == ["keys.0"] and torch.equal(part["keys.0"], got["keys.0"][3:9])
    assert torch.equal(store.load(frames=slice(-3, None))["ids"], got["ids"][7:])
    # an empty slice keeps the trailing shape; an empty store loads nothing
    assert store.load(frames=slice(5, 5))["keys.0"].shape == (0, 2, 5, 4)
    assert VideoStore.open(tmp_path, StoreKey("other", "m", "c", "s"), {}).load() == {}
    # a slice reads only the chunks it covers
    opened = []
    real = safetensors.safe_open  # the store imports it where it reads (so listing stores never loads torch)
    monkeypatch.setattr(safetensors, "safe_open", lambda p, **kw: opened.append(Path(p).name) or real(p, **kw))
    store.load(frames=slice(5, 7))
    assert opened == ["chunk-000001.safetensors"]
    with pytest.raises(ValueError, match="contiguous"):
        store.load(frames=slice(0, 10, 2))
    with pytest.raises(KeyError, match="nope"):
        store.load(["nope"])
    with pytest.raises(IndexError):
        store.thumbnail(10)
    # the chunk files are plain safetensors with float64 timestamps
    from safetensors import safe_open

    with safe_open(str(store.path / "chunks" / "chunk-000002.safetensors"), framework="pt") as st:
        assert st.get_tensor("timestamps").dtype == torch.float64 and st.metadata() == {"start_frame": "8"}


def test_chunks_are_validated(tmp_path):
    store = build(tmp_path, [3], complete=False)
    with pytest.raises(ValueError, match="starts at frame 5"):
        store.append_chunk([0.0], [0.0], frames(5, 1), thumbnails=thumbs(5, 1), start_frame=5)
    with pytest.raises(ValueError, match="same number"):
        store.append_chunk([0.0, 1.0], [0.0], frames(3, 2))
    with pytest.raises(ValueError, match="reserved"):
        store.append_chunk([0.0], [0.0], {"timestamps": torch.zeros(1)})
    with pytest.raises(ValueError, match="differ"):
        store.append_chunk([0.0], [0.0], {"compressed": torch.zeros(1, 1, 8)}, thumbnails=[b""])
    with pytest.raises(ValueError, match="thumbnails"):
        store.append_chunk([1.5], [1.5], frames(3, 1), embeddings=torch.zeros(1, 4))
    assert store.committed_frames == 3 and store.verify() == []
    assert sorted(os.listdir(store.path / "chunks")) == ["chunk-000000.safetensors"]  # nothing half-written
    store.mark_complete([], duration=None)
    with pytest.raises(ValueError, match="complete"):
        append(store, 3, 1)


# ---- resume and atomicity -------------------------------------------------------------------------------------
def test_reopen_resumes_at_committed_frames(tmp_path):
    build(tmp_path, [4, 4], complete=False)
    store = VideoStore.open(tmp_path, KEY, {**META, "source": "/moved/clip.mp4"})  # same content, moved
    assert store.committed_frames == 8 and not store.complete
    assert store.manifest["meta"]["source"] == "/videos/clip.mp4"  # the stored meta is kept on resume
    append(store, 8, 2)
    store.mark_complete([(1.0, 2.5)], duration=5.0)
    assert store_files(store.path) == store_files(build(tmp_path / "clean", [4, 4, 2]).path)


def test_reopen_refuses_another_model_or_sampling(tmp_path):
    build(tmp_path, [2], complete=False)
    with pytest.raises(StoreMismatch, match="sampling"):
        VideoStore.open(tmp_path, KEY, {**META, "sampling": {"fps": 2.0}})
    with pytest.raises(StoreMismatch, match="model"):
        VideoStore.open(tmp_path, KEY, {**META, "model": {"id": "other"}})
    mpath = tmp_path / "videos" / KEY.video_id / "manifest.json"
    m = json.loads(mpath.read_text())
    m["key"]["model_id"] = "someone-else"
    mpath.write_text(json.dumps(m))
    with pytest.raises(StoreMismatch, match="another video/model"):
        VideoStore.open(tmp_path, KEY, META)
    with pytest.raises(ValueError, match="safe folder name"):
        StoreKey("../escape", "m", "c", "s")


def test_crash_between_chunk_file_and_manifest(tmp_path, monkeypatch):
    store = build(tmp_path / "crashed", [4], complete=False)
    real = os.replace

    def crash_on_manifest(src, dst):
        if Path(dst).name == "manifest.json":
            raise OSError("simulated crash before the manifest commit")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(OSError, match="simulated"):
        append(store, 4, 4)
    monkeypatch.setattr(os, "replace", real)
    assert store.committed_frames == 4  # the handle did not move ahead of the disk
    leftovers = {"chunks/chunk-000001.safetensors", "thumbs/chunk-000001.bin", "manifest.json.tmp"}
    assert leftovers <= set(store_files(store.path))
    reader = StoreCatalog(tmp_path / "crashed").get(KEY.video_id)  # readers ignore the unlisted chunk
    assert reader.committed_frames == 4 and reader.verify() == [] and len(reader.timestamps()) == 4

    store = VideoStore.open(tmp_path / "crashed", KEY, META)
    assert store.committed_frames == 4 and not leftovers & set(store_files(store.path))
    append(store, 4, 4)
    append(store, 8, 2)
    store.mark_complete([(1.0, 2.5)], duration=5.0)
    assert store_files(store.path) == store_files(build(tmp_path / "clean", [4, 4, 2]).path)


def test_leftover_temp_files_are_cleaned_on_reopen(tmp_path):
    path = build(tmp_path, [2], complete=False).path
    for junk in ("chunks/chunk-000001.safetensors.tmp", "chunks/chunk-000007.safetensors", "thumbs/x.tmp",
                 "manifest.json.tmp"):
        (path / junk).write_bytes(b"junk")
    VideoStore.open(tmp_path, KEY, META)
    assert sorted(store_files(path)) == ["chunks/chunk-000000.safetensors", "manifest.json",
                                         "thumbs/chunk-000000.bin"]


WRITER = r"""
import sys, time
from pathlib import Path
import torch
from vidmini.store.video_store import StoreKey, VideoStore

CHUNKS, PER = 40, 3

def main(root):
    store = VideoStore.open(Path(root), StoreKey("feedc0ffee", "tiny", "cfg", "fps1"), {"model": "tiny"})
    store.log_run({"started": time.time(), "resumed_from": store.committed_frames})  # wall time: not compared
    if "key_valid" not in store.manifest["meta"]:
        store.update_meta({"key_valid": [True, False]})
    for start in range(store.committed_frames, CHUNKS * PER, PER):
        g = torch.Generator().manual_seed(start)
        tensors = {"compressed": torch.randn(PER, 1, 256, generator=g).bfloat16(),
                   "keys.0": torch.randn(PER, 4, 64, 32, generator=g)}
        ts = [float(i) for i in range(start, start + PER)]
        store.append_chunk(ts, ts, tensors, thumbnails=[b"\xff\xd8" * (i + 1) for i in range(start, start + PER)],
                           embeddings=torch.randn(PER, 16, generator=g), start_frame=start)
    store.mark_complete([(7.0, 9.0)], duration=float(CHUNKS * PER), extra={"per_chunk": PER})
"""


def _committed(root: Path) -> int:
    try:
        return json.loads(next((root / "videos").glob("*/manifest.json")).read_text())["frames"]
    except (StopIteration, FileNotFoundError, ValueError):
        return -1


def _run_writer(root: Path, rng: random.Random | None) -> None:
    """Run WRITER in a fresh interpreter; with an rng, SIGKILL it once a random number of chunks is committed
    plus a random few milliseconds, so the kill lands anywhere: mid-chunk, mid-manifest, between commits."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER + "\nmain(sys.argv[1])", str(root)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if rng is not None:
        target = rng.randrange(0, 39) * 3
        while proc.poll() is None and _committed(root) < target:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.01))
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    if rng is None:
        assert proc.returncode == 0, err.decode()[-2000:]


def test_sigkilled_writer_resumes_to_an_identical_store(tmp_path):
    ns: dict = {}
    exec(WRITER, ns)
    ns["main"](tmp_path / "clean")
    (clean,) = (tmp_path / "clean" / "videos").iterdir()
    expected = store_files(clean)
    assert len([f for f in expected if f.startswith("chunks/")]) == 40

    def scenario(seed: int, kills: int) -> None:
        root, rng = tmp_path / f"seed{seed}", random.Random(seed)
        for _ in range(kills):
            _run_writer(root, rng)
            if _committed(root) >= 0:  # a reader sees a consistent store at every kill point
                reader = StoreCatalog(root).get("feedc0ffee")
                assert reader.committed_frames % 3 == 0 and reader.verify() == [] and not reader.complete
        _run_writer(root, None)
        (path,) = (root / "videos").iterdir()
        assert store_files(path) == expected, f"seed {seed}"
        assert len(VideoStore.load_existing(path).runs()) == kills + 1

    errors: list[BaseException] = []

    def worker(jobs: list[tuple[int, int]]) -> None:
        try:
            for job in jobs:
                scenario(*job)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(jobs,)) for jobs in ([(1, 1), (2, 2)], [(3, 1), (4, 1)])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# ---- state, verify, concurrency -------------------------------------------------------------------------------
def test_complete_only_when_marked(tmp_path):
    store = build(tmp_path, [2, 2], complete=False)
    assert not store.complete and not VideoStore.open(tmp_path, KEY, META).complete
    store.mark_failed("decoder gave up")
    assert not store.complete and store.manifest["failed"] == "decoder gave up"
    assert StoreCatalog(tmp_path).list()[0].failed == "decoder gave up"
    store.mark_complete([(1, 2)], duration=2.0, extra={"frames_dropped": 0})
    again = VideoStore.open(tmp_path, KEY, META)
    assert again.complete and again.manifest["gaps"] == [[1.0, 2.0]] and again.manifest["failed"] is None
    assert again.manifest["extra"] == {"frames_dropped": 0} and again.manifest["duration"] == 2.0
    with pytest.raises(ValueError, match="complete"):
        again.mark_failed("late")


def test_verify_catches_corruption_and_missing_files(tmp_path):
    store = build(tmp_path, [3, 3, 3])
    assert store.verify() == []
    chunk = store.path / "chunks" / "chunk-000001.safetensors"
    data = bytearray(chunk.read_bytes())
    data[-5] ^= 0x01
    chunk.write_bytes(bytes(data))
    (store.path / "chunks" / "chunk-000002.safetensors").unlink()
    (store.path / "thumbs" / "chunk-000000.bin").write_bytes(b"\x00")
    problems = store.verify()
    assert any("chunk-000001" in p and "checksum" in p for p in problems)
    assert any("chunk-000002" in p and "missing" in p for p in problems)
    assert any("chunk-000000" in p and "thumbnails checksum" in p for p in problems)
    assert len(problems) == 3
    # a frame count that disagrees with the manifest, with hashes skipped
    mpath = store.path / "manifest.json"
    m = json.loads(mpath.read_text())
    m["chunks"][0]["frames"] = 2
    mpath.write_text(json.dumps(m))
    store.refresh()
    assert any("has 3 frames, manifest says 2" in p for p in store.verify(check_hashes=False))


def test_second_writer_and_removal_are_detected(tmp_path):
    a = build(tmp_path, [2], complete=False)
    b = VideoStore.open(tmp_path, KEY, META)
    append(a, 2, 2)
    with pytest.raises(StoreConflict, match="another writer"):
        append(b, 2, 2)
    StoreCatalog(tmp_path).remove(KEY.video_id)
    with pytest.raises(StoreConflict, match="removed"):
        append(a, 4, 2)


def test_run_log_is_outside_the_compared_files(tmp_path):
    store = build(tmp_path, [2])
    before = store_files(store.path)
    store.log_run({"encode_s": time.perf_counter()})
    with open(store.path / "runs.jsonl", "a") as f:
        f.write('{"torn')  # a writer killed mid-line
    assert store_files(store.path) == before and len(store.runs()) == 1


# ---- library --------------------------------------------------------------------------------------------------
def test_library_list_find_get_remove(tmp_path):
    lib = StoreCatalog(tmp_path)
    assert lib.list() == []
    keys = [StoreKey("aaaa1111", "m", "c", "s"), StoreKey("aaaa2222", "m", "c", "s"), StoreKey("bbbb", "m2", "c", "s")]
    for i, key in enumerate(keys):
        s = VideoStore.open(tmp_path, key, {"source": f"v{i}.mp4"})
        append(s, 0, 2 + i)
        if i == 0:
            s.mark_complete([], duration=12.5)
    (tmp_path / "videos" / ".deleted-zzz").mkdir()  # a crashed removal: never listed
    (tmp_path / "videos" / "no-manifest").mkdir()  # killed before its first manifest: not a store
    infos = lib.list()
    assert [i.video_id for i in infos] == [k.video_id for k in keys]
    first = infos[0]
    assert (first.source, first.model_id, first.frames, first.duration, first.complete) == ("v0.mp4", "m", 2, 12.5, True)
    assert first.path == str(tmp_path / "videos" / keys[0].video_id) and first.bytes_on_disk > 0
    assert not infos[1].complete and infos[2].model_id == "m2"

    assert lib.find(keys[1]).committed_frames == 3 and lib.find(StoreKey("cccc", "m", "c", "s")) is None
    assert lib.get(keys[2].video_id).video_id == keys[2].video_id
    assert lib.get("bb").video_id == keys[2].video_id  # a unique prefix
    assert lib.get("aaaa1").video_id == keys[0].video_id
    with pytest.raises(UnknownVideo, match="matches 2"):
        lib.get("aaaa")
    with pytest.raises(KeyError, match="no stored video 'zz'"):
        lib.get("zz")
    assert str(UnknownVideo("no stored video 'x'")) == "no stored video 'x'"  # no KeyError quoting

    with store_mod._locked(tmp_path / "videos" / keys[2].video_id), pytest.raises(StoreConflict, match="written"):
        lib.remove("bb")  # a writer is mid-commit
    lib.remove("bb")
    assert [i.video_id for i in lib.list()] == [k.video_id for k in keys[:2]]
    assert not (tmp_path / "videos" / keys[2].video_id).exists()
    assert not list((tmp_path / "videos").glob(".deleted-*"))  # old tombstones swept too
    with pytest.raises(KeyError):
        lib.remove(keys[2].video_id)


def test_damaged_manifest_is_listed_and_removable(tmp_path):
    path = build(tmp_path, [2]).path
    (path / "manifest.json").write_text("{not json")
    lib = StoreCatalog(tmp_path)
    (info,) = lib.list()
    assert info.video_id == KEY.video_id and not info.complete and info.failed.startswith("unreadable")
    lib.remove(KEY.video_id)
    assert lib.list() == [] and not path.exists()


# ---- fingerprints ---------------------------------------------------------------------------------------------
def test_fingerprint_covers_size_head_and_tail_only(tmp_path):
    mib = 1 << 20
    base = bytes(random.Random(0).randbytes(3 * mib))
    f = tmp_path / "v.mp4"

    def fp(data: bytes) -> str:
        f.write_bytes(data)
        return fingerprint(f)

    ref = fp(base)
    assert len(ref) == 16 and fp(base) == ref
    flip = lambda i: base[:i] + bytes([base[i] ^ 1]) + base[i + 1 :]  # noqa: E731
    assert fp(flip(10)) != ref  # head
    assert fp(flip(3 * mib - 10)) != ref  # tail
    assert fp(base + b"\x00") != ref  # size
    assert fp(flip(int(1.5 * mib))) == ref  # the middle of a > 2 MiB file is NOT covered (documented)
    small = base[: mib + 100]
    assert fp(small) != fp(small[:mib] + bytes([small[mib] ^ 1]) + small[mib + 1 :])  # <= 2 MiB: all bytes
    assert fingerprint_url("rtsp://cam/1", "20250101T000000") == fingerprint_url("rtsp://cam/1", "20250101T000000")
    assert fingerprint_url("rtsp://cam/1", "20250101T000000") != fingerprint_url("rtsp://cam/1", "20250101T000001")
    StoreKey(fingerprint_url("rtsp://cam/1", "x"), "m", "c", "s")  # usable as a folder name
