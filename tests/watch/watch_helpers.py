"""Real parts for the watch delivery tests: a Mosquitto broker run as a subprocess on a free loopback port, a paho
subscriber that records what arrives, and a loopback webhook receiver that checks the HMAC."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import paho.mqtt.client as paho

from vidmini.watch.outbox import RetryPolicy
from vidmini.watch.webhook import KEY_HEADER, SIGNATURE_HEADER, verify_signature

SECRET = "s3cret-for-tests"
# Small delays so retries happen within the test's time; jitter kept to check it does no harm.
FAST = RetryPolicy(base_delay_s=0.05, factor=2.0, max_delay_s=0.4, jitter=0.2, max_attempts=5, max_age_s=60.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` until true; fail the test naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


class Broker:
    """Mosquitto on 127.0.0.1:`port`; `stop()` and `start()` again keep the port (a restart)."""

    def __init__(self, binary: str, folder: Path, port: int, persistence: bool = False):
        self.binary, self.folder, self.port = binary, folder, port
        self.conf = folder / "mosquitto.conf"
        lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", f"persistence {str(persistence).lower()}",
                 "user root"]  # started as root, mosquitto would switch to its own user, locked out of tmp_path
        if persistence:  # kept across stop/start: an offline durable subscriber's queued messages survive
            lines += [f"persistence_location {folder}/", "autosave_interval 0"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = folder / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto not listening on {self.port}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (with persistence on, mosquitto writes its database first) and wait for the exit."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> dict:
        return json.loads(self.payload)


class Subscriber:
    """A paho client on `topic` (QoS 1) recording every message; re-subscribes after a reconnect.
    `durable`: a fixed client id and clean_session=False, so a persistent broker queues messages for it."""

    def __init__(self, port: int, topic: str = "vidmini/#", durable: bool = False):
        self.topic = topic
        self.messages: list[Message] = []
        self.cond = threading.Condition()
        self.subscribed = threading.Event()
        client_id = f"test-sub-{uuid.uuid4().hex[:8]}"
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not durable)
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_connect = lambda c, _u, _f, rc, _p: c.subscribe(self.topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_disconnect = lambda *_: self.subscribed.clear()
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(10), "test subscriber never subscribed"

    def _on_message(self, _c, _u, msg) -> None:
        with self.cond:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.cond.notify_all()

    def on(self, topic: str) -> list[Message]:
        with self.cond:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, predicate: Callable[[list[Message]], bool], timeout: float = 10.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what or 'messages'}; got "
                                         f"{[(m.topic, m.payload[:80]) for m in self.messages]}")
                self.cond.wait(left)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Request:
    body: bytes
    headers: dict[str, str]
    signed: bool

    @property
    def key(self) -> str:
        return self.headers[KEY_HEADER]


class Receiver:
    """A loopback webhook endpoint. `statuses`: the replies to the first requests in order (then 200).
    Records every request with whether its signature verified."""

    def __init__(self, statuses: list[int] | None = None, secret: str = SECRET, port: int = 0):
        self.statuses = list(statuses or [])
        self.requests: list[Request] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k: v for k, v in self.headers.items()}
                signed = verify_signature(secret, body, self.headers.get(SIGNATURE_HEADER))
                with receiver.cond:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.requests.append(Request(body, headers, signed))
                    receiver.cond.notify_all()
                reply = b"nope" if status >= 400 else b"ok"
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def keys(self) -> list[str]:
        with self.cond:
            return [r.key for r in self.requests]

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Request]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {n} requests, got {len(self.requests)}")
                self.cond.wait(left)
            return list(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Camera:
    """ffmpeg playing `video` in real time as H.264 in MPEG-TS (re-encoded as `write_video` encodes, crf 20, with a
    keyframe every 4 frames; pts from 0): to one TCP
    client (`tcp`), or pushed as UDP datagrams whether anyone listens or not, as many cameras do (`udp`)."""

    ENCODE = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-tune", "zerolatency", "-g", "4"]

    def __init__(self, video: Path, protocol: str = "tcp", copy: bool = False) -> None:
        """`copy`: `video` is already what the camera sends (e.g. made by `Camera.encode`): sent as it is."""
        self.port = free_port()
        self.url = f"{protocol}://127.0.0.1:{self.port}"
        out = f"{self.url}?listen=1" if protocol == "tcp" else f"{self.url}?pkt_size=1316"
        codec = ["-c", "copy"] if copy else self.ENCODE
        self.proc = subprocess.Popen(
            ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-re", "-i", str(video), *codec,
             "-muxdelay", "0", "-muxpreload", "0", "-f", "mpegts", out],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    @classmethod
    def encode(cls, video: Path, out: Path) -> Path:
        """What the camera would send, as an MPEG-TS file (to know its size, or to send it with `copy`)."""
        subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(video),
                        *cls.ENCODE, "-muxdelay", "0", "-muxpreload", "0", "-f", "mpegts", str(out)], check=True)
        return out

    def wait(self, timeout: float) -> None:
        self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Intersection over union of two time spans (seconds)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))
