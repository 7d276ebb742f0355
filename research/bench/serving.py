"""A `vidmini serve` process for the benchmarks: on a free loopback port, returned once its model is loaded."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def start_serve(env: dict, args: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """(the server process, its base URL); stop it with `terminate()`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vidmini.cli.main", "serve", "--port", str(port), *args],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if json.load(r)["model_loaded"]:
                    return proc, base
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"vidmini serve exited with {proc.returncode}") from None
            time.sleep(0.2)
