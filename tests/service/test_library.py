"""The library service (vidmini/service/library.py) and the app's HTTP routes (vidmini/ui/routes.py), on the shipped demo model and
real synthetic-world videos: background ingest with progress, streamed uploads under sanitized names, failed
ingests as readable errors, delete, concurrent questions, search, summaries, model loading."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from pathlib import Path

import pytest
from fixtures.app_helpers import corrupt_file, reliable_questions, world_video

from vidmini.service.library import (
    COPY_CHUNK,
    UPLOADS,
    Library,
    LibraryError,
    ModelLoadError,
    sanitize_filename,
)
from vidmini.service.options import AskOptions


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Library:
    library = Library(tmp_path_factory.mktemp("lib-home"))
    yield library
    library.close()


@pytest.fixture(scope="module")
def world(lib, tmp_path_factory):
    """One ingested 30 s video: (video_id, timeline)."""
    path, timeline = world_video(tmp_path_factory.mktemp("videos"), seed=3)
    job = lib.wait(lib.add(str(path)).job_id, timeout=300)
    assert job.status == "ready", job.error
    return job.video_id, timeline


# ---- names and uploads ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("clip.mp4", "clip.mp4"),
    ("../../../etc/passwd", "passwd"),
    ("..\\..\\windows\\evil.mp4", "evil.mp4"),
    ("/abs/path/to/x.mkv", "x.mkv"),
    (".hidden.mp4", "hidden.mp4"),
    ("..", "upload"),
    ("", "upload"),
    ("my video (final) #2.mov", "my_video_final_2.mov"),
    ("vidéo-été.mp4", "video-ete.mp4"),
    ("a" * 500 + ".mp4", "a" * 116 + ".mp4"),
])
def test_sanitize_filename(name, expected):
    assert sanitize_filename(name) == expected


class Zeros(io.RawIOBase):
    """`size` bytes produced on demand (nothing held), recording the largest read asked for."""

    def __init__(self, size: int) -> None:
        self.left, self.largest = size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        self.largest = max(self.largest, len(buf))
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def test_upload_is_streamed_in_chunks_under_the_data_root(tmp_path):
    library = Library(tmp_path / "home")
    source = Zeros(3 * COPY_CHUNK + 123)
    dest = library.save_upload(source, "../../outside/../../big video.mp4")
    uploads = (tmp_path / "home" / UPLOADS).resolve()
    assert dest.resolve().parent == uploads and dest.name.endswith("-big_video.mp4")
    assert dest.stat().st_size == 3 * COPY_CHUNK + 123
    assert source.largest <= COPY_CHUNK  # read piece by piece, never the whole file at once
    assert not list(tmp_path.glob("outside*")) and not list(uploads.glob("*.part"))


def test_a_failed_upload_leaves_no_partial_file(tmp_path):
    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, buf):
            raise OSError("connection reset")

    library = Library(tmp_path / "home")
    with pytest.raises(OSError):
        library.save_upload(Broken(), "x.mp4")
    assert list((tmp_path / "home" / UPLOADS).iterdir()) == []


# ---- ingest jobs ----------------------------------------------------------------------------------------------
def test_background_ingest_reports_progress_and_other_videos_stay_usable(lib, world, tmp_path):
    video_id, timeline = world
    q = reliable_questions(timeline)[0]
    path, _ = world_video(tmp_path, seed=11, seconds=150)
    job = lib.add(str(path))
    seen: set[float] = set()
    answer = None
    listed: list[int] = []
    while job.active:
        if job.fraction is not None:
            seen.add(round(job.fraction, 3))
        listed.append(sum(r.source == job.source for r in lib.videos()))  # the job's row only, never its store too
        if answer is None:  # a question on another video while this one ingests
            answer = lib.answer(video_id, q.question, AskOptions(start=q.start_s, end=q.end_s))
        time.sleep(0.01)
    assert job.status == "ready", job.error
    assert any(0 < f < 1 for f in seen), f"no intermediate progress seen: {seen}"
    assert set(listed) == {1}, "a running ingest was listed twice (its job and its incomplete store)"
    assert answer is not None and answer.text.lower() == q.answer.lower()
    row = lib.video(job.video_id)
    assert row.status == "ready" and row.frames == 150 and row.duration == pytest.approx(150, abs=0.1)
    assert row.usable and lib.thumbnails(job.video_id, 8)


def test_a_corrupt_file_fails_readably_and_the_worker_goes_on(lib, tmp_path):
    bad = lib.wait(lib.add(str(corrupt_file(tmp_path / "broken.mp4"))).job_id)
    assert bad.status == "failed"
    assert "broken.mp4" in bad.error and "\n" not in bad.error and "Traceback" not in bad.error
    assert bad.error.split(":")[0] in ("CorruptMedia", "NotAVideo")
    rows = [r for r in lib.videos() if r.job_id == bad.job_id]
    assert len(rows) == 1 and rows[0].status == "failed" and not rows[0].usable
    good_path, _ = world_video(tmp_path, seed=5, seconds=12)
    good = lib.wait(lib.add(str(good_path)).job_id)
    assert good.status == "ready"
    lib.remove(job_id=bad.job_id)
    assert not [r for r in lib.videos() if r.job_id == bad.job_id]


@pytest.mark.parametrize("source, why", [("/no/such/file.mp4", "no such file"), ("", "give a file path"),
                                         (".", "is a folder")])
def test_bad_sources_are_refused_at_once(lib, source, why):
    with pytest.raises(LibraryError, match=why):
        lib.add(source)


def test_delete_removes_store_index_and_uploaded_source(lib, tmp_path):
    path, _ = world_video(tmp_path, seed=8, seconds=10)
    with open(path, "rb") as f:
        job = lib.add_upload(f, "to delete.mp4")
    lib.wait(job.job_id)
    assert job.status == "ready"
    uploaded = Path(job.source)
    assert uploaded.is_file() and uploaded.parent == lib.root / UPLOADS
    lib.remove(job.video_id)
    assert job.video_id not in [r.video_id for r in lib.videos()]
    assert not uploaded.exists()
    assert not (lib.root / "index" / "videos" / f"{job.video_id}.faiss").exists()
    with pytest.raises(LibraryError):
        lib.ask(job.video_id, "What word is shown?")


# ---- questions and search -------------------------------------------------------------------------------------
def test_answers_stream_and_report_range_and_frames(lib, world):
    video_id, timeline = world
    q = reliable_questions(timeline)[0]
    asking = lib.ask(video_id, q.question, AskOptions(start=q.start_s, end=q.end_s))
    pieces = list(asking.text())
    got = asking.result()
    assert "".join(pieces).strip() == got.text and got.text.lower() == q.answer.lower()
    assert got.answer.range.start == q.start_s and got.answer.range.end == q.end_s
    assert got.answer.timestamps == [float(t) for t in range(q.start_s, q.end_s + 1)]


def test_two_tabs_asking_at_once_each_get_their_own_answer(lib, world):
    video_id, timeline = world
    questions = reliable_questions(timeline, per_family=3)[:4]
    alone = [lib.answer(video_id, q.question, AskOptions(start=q.start_s, end=q.end_s)).text for q in questions]
    assert [a.lower() for a in alone] == [q.answer.lower() for q in questions]
    together: list[str | None] = [None] * len(questions)
    start = threading.Barrier(len(questions))

    def tab(i: int) -> None:
        q = questions[i]
        start.wait()
        together[i] = "".join(lib.ask(video_id, q.question, AskOptions(start=q.start_s, end=q.end_s)).text()).strip()

    threads = [threading.Thread(target=tab, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone


def test_a_lagging_stream_gets_the_tokens_that_queued_up_in_one_chunk(lib, world):
    """The HTTP service's streamed answer (`api.server._generation`): while its reader is busy the answer goes
    on, and what queued up comes out as one piece, not a piece per token; the pieces still join to the answer."""
    from vidmini.api.server import _generation

    video_id, _ = world
    schema = {"type": "object", "required": ["note"], "additionalProperties": False,
              "properties": {"note": {"type": "string"}}}
    options = AskOptions(max_new_tokens=40, json_schema=schema)
    alone = lib.answer(video_id, "Describe what happens in this video.", options)
    assert len(alone.answer.token_ids) == 40

    async def read(lagging: bool) -> tuple[list[str], str]:
        asking = lib.ask(video_id, "Describe what happens in this video.", options)
        pieces, result = [], None
        async for kind, value in _generation(asking, []):
            if kind == "piece":
                pieces.append(value)
                if lagging and len(pieces) == 1:  # busy until the whole answer has been chosen
                    for _ in range(600):
                        if asking._stream._done:
                            break
                        await asyncio.sleep(0.05)
            else:
                result = value[1]
        return pieces, result.text

    prompt_pieces, text = asyncio.run(read(lagging=False))
    lag_pieces, lag_text = asyncio.run(read(lagging=True))
    assert text == lag_text == alone.text
    assert "".join(lag_pieces).strip() == "".join(prompt_pieces).strip() == alone.text
    assert len(lag_pieces) == 2  # the first piece, then everything that queued while it was being "written"


def test_a_streamed_answer_sends_its_first_piece_at_once_then_at_most_one_chunk_per_interval(lib, world):
    """`api.server._generation` paces a stream: the first piece as soon as it is chosen, then the pieces that
    came meanwhile at most once per `interval_s` (fewer writes and client-side parses; still 50 a second)."""
    from vidmini.api.server import STREAM_INTERVAL_S, _generation

    video_id, _ = world
    schema = {"type": "object", "required": ["note"], "additionalProperties": False,
              "properties": {"note": {"type": "string"}}}
    options = AskOptions(max_new_tokens=60, json_schema=schema)
    alone = lib.answer(video_id, "Describe what happens in this video.", options)

    async def read(interval_s: float) -> tuple[list[str], list[float]]:
        loop = asyncio.get_running_loop()
        asking = lib.ask(video_id, "Describe what happens in this video.", options)
        pieces, times = [], []
        async for kind, value in _generation(asking, [], interval_s):
            if kind == "piece":
                pieces.append(value)
                times.append(loop.time())
        return pieces, times

    paced, times = asyncio.run(read(STREAM_INTERVAL_S))
    every, _ = asyncio.run(read(0.0))
    assert "".join(paced).strip() == "".join(every).strip() == alone.text
    assert len(times) > 2 and all(b - a >= STREAM_INTERVAL_S - 2e-3 for a, b in zip(times, times[1:], strict=False))
    assert len(paced) <= len(every)


def test_bad_questions_are_readable_errors(lib, world):
    video_id, _ = world
    with pytest.raises(LibraryError, match="empty question"):
        lib.ask(video_id, "  ")
    with pytest.raises(LibraryError, match="before it starts"):
        lib.ask(video_id, "What word is shown?", AskOptions(start=20, end=10))
    with pytest.raises(LibraryError, match="unknown policy"):
        lib.ask(video_id, "What word is shown?", AskOptions(policy="everything"))
    with pytest.raises(LibraryError, match="no stored video"):
        lib.ask("nope", "What word is shown?")


def test_search_gives_moments_and_a_relevance_curve(lib, world):
    video_id, timeline = world
    result = lib.search("the word shown", video_id, k=5)
    assert result.moments and all(m.video_id == video_id for m in result.moments)
    assert len(result.times) == len(result.scores) == timeline.duration_s
    best = max(result.moments, key=lambda m: m.score)
    assert result.scores.max() == pytest.approx(best.score, abs=1e-4)
    with pytest.raises(LibraryError, match="empty search"):
        lib.search(" ", video_id)
    assert lib.scenes(video_id) is not None


def test_summary_file_is_read_when_present(lib, world):
    video_id, _ = world
    assert lib.summary(video_id) is None
    folder = lib.root / "summaries"
    folder.mkdir(exist_ok=True)
    (folder / f"{video_id}.json").write_text(json.dumps({"summary": ["a navy scene", "the word OWL"]}))
    assert lib.summary(video_id) == "- a navy scene\n- the word OWL"
    (folder / f"{video_id}.md").write_text("## Summary\nShapes drift.")
    assert lib.summary(video_id) == "## Summary\nShapes drift."
    for f in folder.iterdir():
        f.unlink()


def test_model_info_and_a_model_that_does_not_load(lib, world, tmp_path):
    info = lib.model_info()
    assert info.is_demo and "DEMO" in info.notice and info.device == "cpu" and info.searchable
    assert info.parameters > 0 and info.process_rss_bytes > 0
    (tmp_path / "not-a-model").mkdir()
    for target in (str(tmp_path / "not-a-model"), str(tmp_path / "missing"), "nobody/no-such-model"):
        with pytest.raises(ModelLoadError) as e:
            lib.load_model(target)
        assert "\n" not in str(e.value)
    video_id, timeline = world
    q = reliable_questions(timeline)[0]
    assert lib.answer(video_id, q.question, AskOptions(start=q.start_s, end=q.end_s)).text.lower() == q.answer.lower()


# ---- the HTTP routes ------------------------------------------------------------------------------------------
def _call(route, method: str, path: str, query: str, headers: dict, body_parts: list[bytes]):
    """One request through a Starlette route, the body arriving in `body_parts` pieces."""
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()], "root_path": "",
             "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1234), "path_params": {}}
    _, child = route.matches(scope)  # what routing adds: the path parameters
    scope.update(child)
    parts = list(body_parts)
    sent: dict = {"body": b""}

    async def main():
        done = asyncio.Event()
        body_sent = False

        async def receive():
            nonlocal body_sent
            if parts:
                return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()  # a client that stays connected until the response has been sent
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                sent["body"] += message.get("body", b"")
                if not message.get("more_body"):
                    done.set()

        await route.handle(scope, receive, send)

    asyncio.run(main())
    return sent["status"], sent["body"]


def test_upload_route_streams_to_disk_and_checks_the_token(tmp_path):
    from vidmini.ui.routes import UPLOAD_PATH, make_routes

    library = Library(tmp_path / "home")
    upload = make_routes(lambda: library)[0]
    path, _ = world_video(tmp_path, seed=4, seconds=6)
    data = path.read_bytes()
    pieces = [data[i:i + 4096] for i in range(0, len(data), 4096)]
    status, _ = _call(upload, "PUT", UPLOAD_PATH, "name=x.mp4", {"X-Vidmini-Token": "wrong"}, pieces)
    assert status == 403
    status, body = _call(upload, "PUT", UPLOAD_PATH, "name=..%2F..%2Fevil.mp4",
                         {"X-Vidmini-Token": library.upload_token}, pieces)
    assert status == 200, body
    reply = json.loads(body)
    assert reply["bytes"] == len(data) and reply["name"] == "../../evil.mp4"
    job = library.wait(reply["job_id"])
    stored = Path(job.source)
    assert stored.parent == (tmp_path / "home" / UPLOADS).resolve() and stored.read_bytes() == data
    assert job.status == "ready"
    status, body = _call(upload, "PUT", UPLOAD_PATH, "name=empty.mp4", {"X-Vidmini-Token": library.upload_token}, [])
    assert status == 400 and b"empty" in body
    library.close()


def test_media_route_serves_ranges(lib, world):
    from vidmini.ui.routes import MEDIA_PATH, make_routes

    video_id, _ = world
    media = make_routes(lambda: lib)[1]
    path = f"{MEDIA_PATH}/{video_id}"
    status, body = _call(media, "GET", path, f"token={lib.upload_token}", {"Range": "bytes=0-99"}, [])
    assert status == 206 and len(body) == 100
    assert body == lib.media_path(video_id).read_bytes()[:100]
    status, _ = _call(media, "GET", path, "token=nope", {}, [])
    assert status == 403
