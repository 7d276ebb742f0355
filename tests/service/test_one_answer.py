"""One question, one answer, whichever face asks: `vidmini ask` (a subprocess), the service call the app makes
(`Library.ask`), and the summaries' asker, on the same stored video with the same options (the shipped demo model,
greedy, 32 tokens, the same time range)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.app_helpers import reliable_questions, world_video

from vidmini.engine.load import SHIPPED_MODEL_DIR

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")


def test_cli_app_and_summaries_give_the_same_answer(tmp_path, monkeypatch):
    from vidmini.service.library import Library
    from vidmini.service.options import AskOptions
    from vidmini.store.session import open_store_session
    from vidmini.summaries.describe import Asker

    home = tmp_path / "home"
    monkeypatch.setenv("VIDMINI_HOME", str(home))
    monkeypatch.delenv("VIDMINI_MODEL", raising=False)
    path, timeline = world_video(tmp_path, seed=11, seconds=24)
    lib = Library(home)
    job = lib.wait(lib.add(str(path)).job_id, timeout=300)
    assert job.status == "ready", job.error
    questions = reliable_questions(timeline, seed=2, per_family=2)[:4]
    assert questions
    store = lib.get_store(job.video_id)
    asker = Asker(open_store_session(lib.engine, store))
    env = {**os.environ, "VIDMINI_HOME": str(home)}
    for q in questions:
        app = lib.answer(job.video_id, q.question, AskOptions(start=q.start_s, end=q.end_s, max_new_tokens=32)).answer
        res = subprocess.run([sys.executable, "-m", "vidmini.cli.main", "ask", job.video_id, q.question, "--from",
                              str(q.start_s), "--to", str(q.end_s), "--max-new-tokens", "32", "--json"],
                             capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        cli = json.loads(res.stdout)
        assert (cli["answer"], cli["token_ids"]) == (app.text, app.token_ids), q.question
        assert cli["frame_indices"] == app.frames and cli["range"]["start"] == app.range.start
        frames = range(app.frames[0], app.frames[-1] + 1)
        assert asker.answer(q.question, frames, max_new_tokens=32) == app.text, q.question
