"""Real parts for the watch tests: a Mosquitto broker run as a subprocess on a free loopback port, a paho
subscriber that records what arrives, a loopback webhook receiver that checks the HMAC; and live sources served by
ffmpeg on loopback (TCP, SRT, UDP, an HLS origin behind a Python HTTP server, a growing file)."""

from __future__ import annotations

import functools
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
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

    def __init__(self, video: Path, protocol: str = "tcp", copy: bool = False, start: bool = True) -> None:
        """`copy`: `video` is already what the camera sends (e.g. made by `Camera.encode`): sent as it is.
        `start=False`: the address is known now, the camera starts sending at `start()`."""
        self.port = free_port()
        self.url = f"{protocol}://127.0.0.1:{self.port}"
        out = f"{self.url}?listen=1" if protocol == "tcp" else f"{self.url}?pkt_size=1316"
        codec = ["-c", "copy"] if copy else self.ENCODE
        self.command = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-re", "-i", str(video), *codec,
                        "-muxdelay", "0", "-muxpreload", "0", "-f", "mpegts", out]
        self.proc: subprocess.Popen | None = None
        if start:
            self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

    @classmethod
    def encode(cls, video: Path, out: Path) -> Path:
        """What the camera would send, as an MPEG-TS file (to know its size, or to send it with `copy`)."""
        subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(video),
                        *cls.ENCODE, "-muxdelay", "0", "-muxpreload", "0", "-f", "mpegts", str(out)], check=True)
        return out

    def wait(self, timeout: float) -> None:
        self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Intersection over union of two time spans (seconds)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))


FPS, GOP = 10, 10  # the stamped test sources: a keyframe every second


def stamp_filter(epoch: float) -> str:
    """Each frame's pts = the wall clock it was made at (read in real time with -re), minus `epoch`: the truth
    the recorder's wall-clock estimates are checked against."""
    return f"settb=1/90000,setpts=(RTCTIME-{int(epoch * 1e6)})/1000000/TB"


def stamped_encode_args(epoch: float) -> list[str]:
    """testsrc2 in real time as H.264 in MPEG-TS, each frame's pts = the wall clock it was made at, minus `epoch`."""
    return ["-re", "-f", "lavfi", "-i", f"testsrc2=size=160x120:rate={FPS}", "-vf", stamp_filter(epoch),
            "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", str(GOP),
            "-muxdelay", "0", "-muxpreload", "0", "-f", "mpegts"]


def first_sent_pts(log: Path) -> float:
    """pts (s) of the first packet an ffmpeg run with `-debug_ts` handed to its muxer."""
    for line in log.read_text(errors="replace").splitlines():
        if m := re.search(r"muxer <- type:video pkt_pts:-?\d+ pkt_pts_time:(-?[\d.]+)", line):
            return float(m.group(1))
    raise AssertionError(f"{log}: no packet sent")


class LiveSource:
    """ffmpeg serving a stamped stream to one client on 127.0.0.1:`port`, over TCP (`tcp://...?listen=1`) or SRT
    (`srt://...?mode=listener`, the recorder calls); kill() and start() again keep the port and the epoch."""

    def __init__(self, folder: Path, epoch: float, protocol: str = "tcp") -> None:
        self.folder, self.epoch, self.protocol, self.port = folder, epoch, protocol, free_port()
        self.url = f"{protocol}://127.0.0.1:{self.port}"
        self.listen = f"{self.url}?listen=1" if protocol == "tcp" else f"{self.url}?mode=listener"
        self.proc: subprocess.Popen | None = None
        self.logs: list[Path] = []

    def start(self) -> None:
        self.logs.append(self.folder / f"server{len(self.logs)}.log")
        with open(self.logs[-1], "wb") as log:
            self.proc = subprocess.Popen(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "info", "-debug_ts",
                                          *stamped_encode_args(self.epoch), self.listen],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)

    def first_pts(self, n: int = 0) -> float:
        """pts (s) of the first packet server n sent."""
        return first_sent_pts(self.logs[n])

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class GrowingFile:
    """An ffmpeg writer appending a live stamped MPEG-TS stream to `path` (a new writer appends after the old one).
    `seconds`: stop by itself after that long."""

    def __init__(self, path: Path, epoch: float, seconds: float | None = None) -> None:
        self.path, self.epoch, self.seconds = path, epoch, seconds
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        limit = ["-t", f"{self.seconds:g}"] if self.seconds else []
        with open(self.path, "ab") as out:
            self.proc = subprocess.Popen(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error",
                                          *stamped_encode_args(self.epoch), *limit, "-flush_packets", "1", "pipe:1"],
                                         stdin=subprocess.DEVNULL, stdout=out)

    def stop(self) -> None:
        """SIGINT: the writer finishes its last packets, then the file stops growing."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class HlsOrigin:
    """A live HLS stream as a CDN origin serves one: ffmpeg plays `video` in real time (frames stamped as in
    `stamp_filter`) into a rolling playlist (`-hls_time`, `-hls_list_size`, old segments deleted) in a folder that
    a Python HTTP server serves at `url`. `stop_serving()` / `start_serving()` take the server away and back on
    the same port while the stream goes on being written. Every media segment served is kept (a copy, in order):
    `served` lists (time, name), `first_pts(name)` reads its first video pts."""

    def __init__(self, folder: Path, video: Path, epoch: float, hls_time: float = 2, list_size: int = 5,
                 gop: int = 24) -> None:
        self.www, self.kept = folder / "www", folder / "served"
        self.www.mkdir(parents=True)
        self.kept.mkdir()
        self.epoch, self.port = epoch, free_port()
        self.url = f"http://127.0.0.1:{self.port}/live.m3u8"
        self.served: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.log = folder / "hls-writer.log"
        with open(self.log, "wb") as log:
            self.writer = subprocess.Popen(
                ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-re", "-i", str(video),
                 "-vf", stamp_filter(epoch), "-fps_mode", "passthrough", "-an",
                 "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency", "-g", str(gop),
                 "-muxdelay", "0", "-muxpreload", "0",
                 "-f", "hls", "-hls_time", f"{hls_time:g}", "-hls_list_size", str(list_size),
                 "-hls_flags", "delete_segments+temp_file", "-hls_segment_filename", str(self.www / "live%05d.ts"),
                 str(self.www / "live.m3u8")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        self.server: ThreadingHTTPServer | None = None

    def start_serving(self) -> None:
        origin = self

        class Handler(SimpleHTTPRequestHandler):
            def copyfile(self, source, outputfile) -> None:
                data = source.read()
                name = self.path.rsplit("/", 1)[-1]
                if name.endswith(".ts"):
                    (origin.kept / name).write_bytes(data)
                    with origin.lock:
                        origin.served.append((time.time(), name))
                outputfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), functools.partial(Handler, directory=str(self.www)))
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop_serving(self) -> None:
        """Connections are refused from now on (a request being answered finishes)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def served_after(self, t: float) -> list[str]:
        with self.lock:
            return [name for at, name in self.served if at >= t]

    def first_pts(self, name: str) -> float:
        out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-read_intervals", "%+#1",
                              "-show_entries", "packet=pts_time", "-of", "json", str(self.kept / name)],
                             capture_output=True, text=True, timeout=30, check=True)
        return float(json.loads(out.stdout)["packets"][0]["pts_time"])

    def close(self) -> None:
        self.stop_serving()
        if self.writer.poll() is None:
            self.writer.kill()
            self.writer.wait(10)


def _udp_pair() -> tuple[socket.socket, socket.socket]:
    """Two UDP sockets bound on loopback to ports P (even) and P+1: RTP and its RTCP."""
    while True:
        rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rtp.bind(("127.0.0.1", 0))
        port = rtp.getsockname()[1]
        if port % 2 == 0:
            rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                rtcp.bind(("127.0.0.1", port + 1))
                return rtp, rtcp
            except OSError:
                rtcp.close()
        rtp.close()


def _starts_keyframe(payload: bytes) -> bool:
    """An H.264 RTP payload (RFC 6184) that begins an IDR access unit: an SPS or IDR NAL unit, alone, first in a
    STAP-A, or as the first FU-A fragment."""
    kind = payload[0] & 0x1F
    if kind == 24:  # STAP-A: 2-byte size, then the first NAL unit's header
        kind = payload[3] & 0x1F
    elif kind == 28:  # FU-A: the fragmented unit's type, and whether this is its start
        return payload[1] & 0x1F == 5 and bool(payload[1] & 0x80)
    return kind in (5, 7)


class RtspCamera:
    """An IP camera's RTSP server, small but real: ffmpeg encodes a stamped stream (`stamped_encode_args`) to RTP
    (H.264, its SDP written to a file); this server answers OPTIONS / DESCRIBE (that SDP, with a control URL) /
    SETUP (RTP over the RTSP connection, interleaved channels 0-1) / PLAY / GET_PARAMETER / TEARDOWN at `url`, and
    relays the RTP and RTCP packets to every client that is playing. `kill()` is the camera going off (encoder,
    listener and connections), `start()` it coming back on the same port."""

    def __init__(self, folder: Path, epoch: float) -> None:
        self.folder, self.epoch, self.port = folder, epoch, free_port()
        self.url = f"rtsp://127.0.0.1:{self.port}/live"
        self.proc: subprocess.Popen | None = None
        self.listener: socket.socket | None = None
        self.udp: tuple[socket.socket, socket.socket] | None = None
        self.clients: list[tuple[socket.socket, threading.Lock]] = []
        self.lock = threading.Lock()
        self.sdp = ""
        self.logs: list[Path] = []
        self.first_rtp: list[int | None] = []  # per start: the RTP timestamp of the encoder's first packet
        # per PLAY: (start, RTP timestamp of the first keyframe relayed to it: where ffmpeg's RTSP input starts)
        self.joined: list[tuple[int, int]] = []
        self._joining: set[socket.socket] = set()

    def start(self) -> None:
        self.udp = _udp_pair()
        rtp_port = self.udp[0].getsockname()[1]
        sdp_file = self.folder / f"camera-{self.port}.sdp"
        sdp_file.unlink(missing_ok=True)
        args = stamped_encode_args(self.epoch)[:-2]  # without "-f mpegts"
        self.logs.append(self.folder / f"camera{len(self.logs)}.log")
        self.first_rtp.append(None)
        with open(self.logs[-1], "wb") as log:
            self.proc = subprocess.Popen(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "info", "-debug_ts",
                                          *args, "-fps_mode", "passthrough", "-f", "rtp", "-sdp_file",
                                          str(sdp_file), f"rtp://127.0.0.1:{rtp_port}?pkt_size=1200"],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 20
        while not (sdp_file.exists() and "a=rtpmap" in sdp_file.read_text()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the camera's encoder wrote no SDP")
            time.sleep(0.02)
        lines = [ln for ln in sdp_file.read_text().splitlines() if ln and not ln.startswith("c=")]
        media = next(i for i, ln in enumerate(lines) if ln.startswith("m=video"))
        lines[media] = "m=video 0 RTP/AVP " + lines[media].split()[-1]
        lines.insert(media, "c=IN IP4 0.0.0.0")
        lines.insert(media + 2, "a=control:track0")
        self.sdp = "\r\n".join(lines) + "\r\n"
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.on = on = threading.Event()
        on.set()
        for sock in (self.listener, *self.udp):
            sock.settimeout(0.1)  # the threads look at `on` between waits
        for sock, channel in ((self.udp[0], 0), (self.udp[1], 1)):
            threading.Thread(target=self._relay, args=(sock, channel, on), daemon=True).start()
        threading.Thread(target=self._accept, args=(self.listener, on), daemon=True).start()

    def _accept(self, listener: socket.socket, on: threading.Event) -> None:
        while on.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _relay(self, sock: socket.socket, channel: int, on: threading.Event) -> None:
        while on.is_set():
            try:
                packet = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            frame = b"$" + bytes([channel]) + len(packet).to_bytes(2, "big") + packet
            stamp = int.from_bytes(packet[4:8], "big") if channel == 0 and len(packet) > 15 else None
            with self.lock:
                clients = list(self.clients)
                if stamp is not None and self.first_rtp[-1] is None:
                    self.first_rtp[-1] = stamp
                if stamp is not None and _starts_keyframe(packet[12:]):
                    for conn, _ in clients:
                        if conn in self._joining:
                            self._joining.discard(conn)
                            self.joined.append((len(self.logs) - 1, stamp))
            for conn, send_lock in clients:
                try:
                    with send_lock:
                        conn.sendall(frame)
                except OSError:
                    with self.lock:
                        if (conn, send_lock) in self.clients:
                            self.clients.remove((conn, send_lock))

    def _serve(self, conn: socket.socket) -> None:
        send_lock = threading.Lock()
        stream = conn.makefile("rb")
        try:
            while True:
                first = stream.read(1)
                if not first:
                    return
                if first == b"$":  # the client's RTCP receiver reports, interleaved: read past them
                    size = int.from_bytes(stream.read(3)[1:], "big")
                    stream.read(size)
                    continue
                head = [first + stream.readline()]
                while head[-1] not in (b"\r\n", b"\n", b""):
                    head.append(stream.readline())
                request = b"".join(head).decode("latin-1")
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (ln.partition(":") for ln in request.splitlines()[1:] if ":" in ln)}
                if int(headers.get("content-length", 0)):
                    stream.read(int(headers["content-length"]))
                method = request.split(" ", 1)[0]
                reply = [f"CSeq: {headers.get('cseq', '0')}"]
                body = ""
                if method == "OPTIONS":
                    reply.append("Public: OPTIONS, DESCRIBE, SETUP, PLAY, GET_PARAMETER, TEARDOWN")
                elif method == "DESCRIBE":
                    body = self.sdp
                    reply += [f"Content-Base: {self.url}/", "Content-Type: application/sdp"]
                elif method == "SETUP":
                    reply += ["Transport: RTP/AVP/TCP;unicast;interleaved=0-1", "Session: 4711;timeout=60"]
                elif method == "PLAY":
                    reply += ["Session: 4711", "Range: npt=0.000-"]
                elif method not in ("GET_PARAMETER", "TEARDOWN"):
                    reply = [reply[0]]
                status = "200 OK" if len(reply) > 1 or method in ("GET_PARAMETER", "TEARDOWN") else \
                    "501 Not Implemented"
                text = f"RTSP/1.0 {status}\r\n" + "".join(f"{h}\r\n" for h in reply)
                text += f"Content-Length: {len(body)}\r\n\r\n{body}"
                with send_lock:
                    conn.sendall(text.encode("latin-1"))
                if method == "PLAY":
                    with self.lock:
                        self.clients.append((conn, send_lock))
                        self._joining.add(conn)
                elif method == "TEARDOWN":
                    return
        except OSError:
            return
        finally:
            with self.lock:
                if (conn, send_lock) in self.clients:
                    self.clients.remove((conn, send_lock))
            conn.close()

    def first_pts(self, session: int) -> float:
        """pts (s, on the stamped clock) of the first keyframe PLAY number `session` got (a client's timeline
        starts there): an RTP timestamp is the encoder's first one plus the pts in 90 kHz ticks, and the encoder's
        log says its first pts."""
        start, stamp = self.joined[session]
        ticks = (stamp - self.first_rtp[start]) % (1 << 32)
        return first_sent_pts(self.logs[start]) + ticks / 90_000

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.listener is not None:
            self.on.clear()
            time.sleep(0.2)  # its threads have seen it
            self.listener.close()
            self.listener = None
        for sock in self.udp or ():
            sock.close()
        self.udp = None
        with self.lock:
            clients, self.clients = self.clients, []
        for conn, _ in clients:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
