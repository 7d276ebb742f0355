"""`vidmini summarize --server URL` (and `$VIDMINI_SERVER`) against a live `vidmini serve` (a free loopback port, the
shipped demo model, keys and a media root): it prints what the local command prints and writes the same files
(outputs, event thumbnails, manifest), with no torch in its process; a file under the server's media root is
added by path, any other is uploaded. A missing file, a server that is down and a wrong key are one-line errors
with exit status 2; the REST summary route checks the options it now takes (400s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fixtures.app_helpers import world_video
from fixtures.serve_helpers import free_port, start_server, stop

from vidmini.engine.load import SHIPPED_MODEL_DIR

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-test-" + "s" * 24
pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")
# runs `vidmini` in-process, then says on stderr's last line whether torch was imported
PROBE = ("import sys; from vidmini.cli.main import main; rc = main(sys.argv[1:]); "
         "print('torch' in sys.modules, file=sys.stderr); sys.exit(rc)")


def vidmini(args: list[str], env: dict, cwd: Path, probe: bool = False) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    command = ["-c", PROBE] if probe else ["-m", "vidmini.cli.main"]
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("remote-summarize")
    media, elsewhere = tmp / "media", tmp / "elsewhere"
    media.mkdir()
    elsewhere.mkdir()
    inside, _ = world_video(media, seed=28, seconds=8)  # the word OWL at 1.5-4.5 s; background teal
    outside, _ = world_video(elsewhere, seed=40, seconds=8)  # the word 9; background brown
    base_env = {k: v for k, v in os.environ.items() if k not in ("VIDMINI_MODEL", "VIDMINI_SERVER", "VIDMINI_API_KEY")}
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEY}\n")
    proc, base = start_server(["--api-key-file", str(keys), "--media-root", str(media)],
                              {**base_env, "VIDMINI_HOME": str(tmp / "server-home")})
    yield {"base": base, "tmp": tmp, "media": media, "inside": inside, "outside": outside,
           "local": {**base_env, "VIDMINI_HOME": str(tmp / "local-home")},
           "client": {**base_env, "VIDMINI_HOME": str(tmp / "client-home"), "VIDMINI_API_KEY": KEY}}
    stop(proc)


def outputs(folder: Path) -> dict[str, bytes]:
    """Every file the batch wrote but the manifest, by path relative to the folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def manifest(folder: Path) -> dict:
    """The manifest without its timings."""
    data = json.loads((folder / "manifest.json").read_text())
    for entry in data["files"].values():
        entry.pop("finished"), entry.pop("seconds")
    return data


def test_general_summaries_of_a_media_root_folder_and_an_uploaded_file_equal_the_local_ones(server):
    """Four formats, `--json`: the same report (timing aside) and byte-equal files; the client imports no torch;
    the folder under the server's media root is added by path (no upload), the other file is uploaded."""
    args = ["summarize", str(server["media"]), str(server["outside"]), "--mode", "general", "--window", "4",
            "--format", "md", "--format", "json", "--format", "srt", "--format", "vtt", "--out", "out", "--quiet",
            "--json"]
    local = vidmini(args, server["local"], server["tmp"] / "local")
    assert local.returncode == 0, local.stderr
    remote = vidmini([*args, "--server", server["base"]], server["client"], server["tmp"] / "remote", probe=True)
    assert remote.returncode == 0, remote.stderr
    assert remote.stderr.strip().splitlines()[-1] == "False"  # no model, no torch in the client
    mine, theirs = json.loads(local.stdout), json.loads(remote.stdout)
    assert mine.pop("seconds") >= 0 and theirs.pop("seconds") >= 0
    assert theirs == mine and len(mine["done"]) == 2
    here, there = server["tmp"] / "local" / "out", server["tmp"] / "remote" / "out"
    files = outputs(here)
    assert sorted(files) == sorted(f"{stem}.{fmt}" for stem in ("world-seed28-8s", "world-seed40-8s")
                                   for fmt in ("md", "json", "srt", "vtt"))
    assert outputs(there) == files
    assert manifest(there) == manifest(here)
    uploads = list((server["tmp"] / "server-home" / "uploads").glob("*"))
    assert [p.name.split("-", 1)[1] for p in uploads] == [server["outside"].name]  # only the file outside the root


def test_surveillance_with_thumbnails_prints_and_writes_what_the_local_command_does(server):
    """Plain output (`$VIDMINI_SERVER` this time): the same line, the same event logs and thumbnails; a rerun
    skips both inputs, as the local rerun does."""
    args = ["summarize", str(server["inside"]), str(server["outside"]), "--mode", "surveillance", "--events",
            "the word OWL is shown", "the background is brown", "--format", "md", "--format", "vtt", "--out",
            "events", "--quiet"]
    client = {**server["client"], "VIDMINI_SERVER": server["base"]}
    for run in range(2):
        local = vidmini(args, server["local"], server["tmp"] / "local")
        remote = vidmini(args, client, server["tmp"] / "remote")
        assert local.returncode == 0 and remote.returncode == 0, remote.stderr
        assert remote.stdout == local.stdout == ("2 summarized, 0 already done, 0 failed → events\n",
                                                 "0 summarized, 2 already done, 0 failed → events\n")[run]
    here, there = server["tmp"] / "local" / "events", server["tmp"] / "remote" / "events"
    files = outputs(here)
    assert any(name.endswith(".jpg") for name in files) and "| the word OWL is shown |" in files[
        "world-seed28-8s.md"].decode()
    assert outputs(there) == files
    assert manifest(there) == manifest(here)


def test_a_missing_file_a_server_down_and_a_wrong_key_are_one_line_errors(server):
    cwd = server["tmp"] / "errors"
    missing = vidmini(["summarize", str(server["tmp"] / "nope.mp4"), "--quiet", "--server", server["base"]],
                      server["client"], cwd)
    assert missing.returncode == 2 and missing.stdout == "0 summarized, 0 already done, 1 failed → summaries\n"
    assert len(missing.stderr.splitlines()) == 1 and "nope.mp4: no such file here" in missing.stderr
    video = [str(server["inside"]), "--quiet", "--out", "never"]
    down = vidmini(["summarize", *video, "--server", f"http://127.0.0.1:{free_port()}"], server["client"], cwd)
    assert down.returncode == 2 and down.stderr.startswith("vidmini: error: cannot reach the server at http://")
    assert len(down.stderr.splitlines()) == 1
    wrong = vidmini(["summarize", *video, "--server", server["base"]], {**server["client"], "VIDMINI_API_KEY": "sk-no"},
                    cwd)
    assert wrong.returncode == 2 and len(wrong.stderr.splitlines()) == 1
    assert wrong.stderr.startswith(f"vidmini: error: the server at {server['base']} answered 401: ")
    ray = vidmini(["summarize", *video, "--ray", "--server", server["base"]], server["client"], cwd)
    assert ray.returncode == 2 and "run locally" in ray.stderr
    assert not (cwd / "never").exists()  # nothing was started


def test_the_summary_route_checks_window_events_and_exact(server):
    """What `start_summary` takes beyond the mode: a bad value is a 400 naming its field."""
    def post(path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(server["base"] + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    status, job = post("/v1/videos", {"source": str(server["inside"])})
    assert status == 202, job
    for _ in range(600):
        with urllib.request.urlopen(urllib.request.Request(f"{server['base']}/v1/jobs/{job['id']}", headers={
                "Authorization": f"Bearer {KEY}"}), timeout=60) as r:
            job = json.load(r)
        if job["status"] not in ("queued", "ingesting"):
            break
        time.sleep(0.1)
    assert job["status"] == "ready", job
    path = f"/v1/videos/{job['video_id']}/summaries"
    for body, param in [({"mode": "general", "window": 0}, "window"), ({"mode": "general", "window": "6"}, "window"),
                        ({"mode": "general", "window": True}, "window"), ({"mode": "surveillance"}, "events"),
                        ({"mode": "surveillance", "events": ["ok", ""]}, "events"),
                        ({"mode": "surveillance", "events": "a person enters"}, "events"),
                        ({"mode": "general", "events": ["the word OWL is shown"]}, "events"),
                        ({"mode": "general", "exact": "yes"}, "exact"), ({"mode": "chapters"}, "mode")]:
        status, reply = post(path, body)
        assert status == 400 and reply["error"]["param"] == param, (body, reply)
