"""`vidmini watch add|list|pause|resume|rm|alerts` as a user types them (a subprocess each): what they print, what
they leave in the watch's folder, and one-line errors for bad input with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def vidmini(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIDMINI_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "vidmini.cli.main", "watch", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_add_list_pause_resume_alerts_rm(tmp_path):
    home = tmp_path / "home"
    got = vidmini(home, "add", "rtsp://cam.local/stream1", "--name", "door", "--rule", "a person enters",
                  "--rule", 'the word "CAT" appears', "--retain", "1h30m", "--cooldown", "30s", "--on-frames", "3",
                  "--webhook", "http://127.0.0.1:9/hook", "--webhook-secret", "s3", "--mqtt", "broker.local:1884")
    assert got.returncode == 0, got.stderr
    assert "watch door: rtsp://cam.local/stream1 at 1 fps" in got.stdout
    spec = json.loads((home / "watches" / "door" / "watch.json").read_text())
    assert spec["retain_s"] == 5400 and spec["retain_bytes"] is None and spec["paused"] is False
    assert [r["event"] for r in spec["rules"]] == ["a person enters", 'the word "CAT" appears']
    assert spec["rules"][0]["on_frames"] == 3 and spec["rules"][0]["cooldown_s"] == 30
    assert spec["sinks"] == [{"type": "webhook", "url": "http://127.0.0.1:9/hook", "secret": "s3"},
                             {"type": "mqtt", "host": "broker.local", "port": 1884}]
    assert (home / "watches" / "door" / "watch.json").stat().st_mode & 0o777 == 0o600  # it holds a secret
    listed = json.loads(vidmini(home, "list", "--json").stdout)
    assert [(w["name"], w["paused"], w["frames"]) for w in listed] == [("door", False, 0)]
    assert vidmini(home, "pause", "door").stdout.strip() == "paused watch door"
    assert "paused" in vidmini(home, "list").stdout
    assert vidmini(home, "resume", "door").returncode == 0
    assert json.loads(vidmini(home, "list", "--json").stdout)[0]["paused"] is False
    alerts = vidmini(home, "alerts", "door", "--json")
    assert alerts.returncode == 0 and json.loads(alerts.stdout) == []
    assert vidmini(home, "rm", "door").stdout.strip() == "removed watch door"
    assert not (home / "watches" / "door").exists() and vidmini(home, "list").stdout.startswith("no watches")


@pytest.mark.parametrize(("args", "message"), [
    (["add", "udp://x:1", "--name", "bad name"], "a watch name is 1-64 letters"),
    (["add", "udp://x:1", "--name", "a", "--retain", "0h"], "a duration must be more than 0 s"),
    (["add", "udp://x:1", "--name", "a", "--retain", "soon"], "not a duration: 'soon'"),
    (["add", "udp://x:1", "--name", "a", "--webhook", "http://h/x"], "--webhook needs --webhook-secret"),
    (["add", "udp://x:1", "--name", "a", "--webhook", "ftp://h/x", "--webhook-secret", "s"], "http(s) URL"),
    (["add", "udp://x:1", "--name", "a", "--mqtt", "h:port"], "--mqtt takes HOST[:PORT]"),
    (["add", "udp://x:1", "--name", "a", "--fps", "90"], "fps must be between"),
    (["add", "udp://x:1", "--name", "a", "--rule", "x", "--rule", "x"], "the same event"),
    (["add", "udp://x:1", "--name", "a", "--on-frames", "0", "--rule", "x"], "on_frames"),
    (["pause", "nobody"], "no watch named 'nobody'"),
    (["rm", "nobody"], "no watch named 'nobody'"),
    (["alerts", "nobody"], "no watch named 'nobody'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    home = tmp_path / "home"
    got = vidmini(home, *args)
    assert got.returncode == 2 and got.stdout == ""
    assert len(got.stderr.strip().splitlines()) == 1 and message in got.stderr, got.stderr
    assert not (home / "watches").exists() or not any((home / "watches").iterdir())


def test_a_second_watch_of_the_same_name_is_refused(tmp_path):
    home = tmp_path / "home"
    assert vidmini(home, "add", "udp://127.0.0.1:5000", "--name", "gate").returncode == 0
    got = vidmini(home, "add", "udp://127.0.0.1:6000", "--name", "gate")
    assert got.returncode == 2 and "exists already" in got.stderr
    assert json.loads((home / "watches" / "gate" / "watch.json").read_text())["source"] == "udp://127.0.0.1:5000"
