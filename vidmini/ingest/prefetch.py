"""Decoding that starts before the model is loaded.

A cold `vidmini ingest` spends ~3.5 s importing torch and transformers and loading weights before it can encode a
frame; decoding needs none of that. `PrefetchedFrames` runs the very same `FrameSampler` in a child process (its
own interpreter: no GIL shared with the imports) as soon as the ingest starts, and streams the frames back over a
pipe, so the decode overlaps the load instead of following it. The frames are byte-for-byte the sampler's; at
most `max_bytes` of them wait in memory (the child blocks on the pipe beyond that).

Run as `python -m vidmini.ingest.prefetch SPEC_JSON`: the child side (records on stdout; see `_write`).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator

import numpy as np

from vidmini.ingest import errors
from vidmini.ingest.decode_common import SampledFrame
from vidmini.ingest.options import IngestOptions

HEADER = struct.Struct("<I")  # the byte length of the JSON header that starts every record
DEFAULT_MAX_BYTES = 256 << 20


class PrefetchedFrames:
    """Iterate (once) for the `SampledFrame`s of `source` under `options`; `gaps` is filled when they end.
    Errors are the sampler's own types (an `IngestError` subclass for bad media), raised where the frames stop."""

    def __init__(self, source: str, options: IngestOptions, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        spec = {"source": str(source), "fps": None if options.every_k else options.fps, "every_k": options.every_k,
                "mode": options.mode, "stream": options.stream, "backend": options.backend,
                "hwaccel": options.hwaccel}
        self.gaps: list[tuple[float, float]] = []
        self.decode_errors = 0
        self._max_bytes = max_bytes
        self._items: deque[SampledFrame | BaseException | None] = deque()
        self._bytes = 0
        self._closed = False
        self._cv = threading.Condition()
        self._child = subprocess.Popen([sys.executable, "-m", "vidmini.ingest.prefetch", json.dumps(spec)],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, name="vidmini-prefetch", daemon=True)
        self._reader.start()

    # ---- the parent: a thread drains the pipe into a byte-bounded queue ----------------------------------
    def _put(self, item: SampledFrame | BaseException | None, size: int = 0) -> bool:
        with self._cv:
            while self._items and self._bytes + size > self._max_bytes and not self._closed:
                self._cv.wait()
            if self._closed:
                return False
            self._items.append(item)
            self._bytes += size
            self._cv.notify_all()
            return True

    def _read(self) -> None:
        pipe = self._child.stdout
        try:
            while True:
                raw = pipe.read(HEADER.size)
                if len(raw) < HEADER.size:
                    code = self._child.wait()
                    self._put(RuntimeError(f"the decoding process ended without finishing (exit code {code})"))
                    return
                header = json.loads(pipe.read(HEADER.unpack(raw)[0]))
                if "error" in header:
                    self._put(_rebuild(header))
                    return
                if header.get("end"):
                    self.gaps = [tuple(g) for g in header["gaps"]]
                    self.decode_errors = header["decode_errors"]
                    self._put(None)
                    return
                shape = tuple(header["shape"])
                data = bytearray(int(np.prod(shape)))
                if pipe.readinto(data) != len(data):
                    continue  # cut short: the next read reports how the child ended
                image = np.frombuffer(data, dtype=np.uint8).reshape(shape)
                if not self._put(SampledFrame(header["t"], header["pts"], header["index"], image), len(data)):
                    return
        except (OSError, ValueError) as e:  # the pipe closed under us (close() while reading)
            self._put(RuntimeError(f"the decoding process failed: {e}"))

    def __iter__(self) -> Iterator[SampledFrame]:
        while True:
            with self._cv:
                while not self._items:
                    self._cv.wait()
                item = self._items.popleft()
                if isinstance(item, SampledFrame):
                    self._bytes -= item.image.nbytes
                self._cv.notify_all()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the child (if still decoding) and the reader; safe to call twice."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._child.poll() is None:
            self._child.kill()
        self._child.wait()
        self._reader.join(timeout=5)
        if self._child.stdout is not None:
            self._child.stdout.close()

    def __enter__(self) -> PrefetchedFrames:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rebuild(header: dict) -> BaseException:
    """The child's error as the parent raises it: the ingest error types by name, anything else a RuntimeError."""
    cls = getattr(errors, header["error"], None)
    if isinstance(cls, type) and issubclass(cls, errors.IngestError):
        return cls(header["message"])
    return RuntimeError(f"decoding failed: {header['error']}: {header['message']}")


# ---- the child ------------------------------------------------------------------------------------------------
def _write(out, header: dict, payload: memoryview | None = None) -> None:
    data = json.dumps(header).encode()
    out.write(HEADER.pack(len(data)) + data)
    if payload is not None:
        out.write(payload)


def main(argv: list[str]) -> int:
    from vidmini.ingest.sampler import FrameSampler

    spec = json.loads(argv[0])
    out = sys.stdout.buffer
    sampler = FrameSampler(spec["source"], fps=spec["fps"], every_k=spec["every_k"], mode=spec["mode"],
                           stream=spec["stream"], backend=spec["backend"], hwaccel=spec["hwaccel"])
    try:
        for f in sampler:
            image = np.ascontiguousarray(f.image, dtype=np.uint8)
            _write(out, {"t": f.t, "pts": f.pts, "index": f.index, "shape": list(image.shape)},
                   memoryview(image).cast("B"))
        _write(out, {"end": True, "gaps": [list(g) for g in sampler.gaps], "decode_errors": sampler.decode_errors})
        out.flush()
    except BrokenPipeError:  # the parent stopped reading (a reused store, a cancel): nothing to report
        return 0
    except Exception as e:  # noqa: BLE001 - every failure goes back to the parent, which raises it
        try:
            _write(out, {"error": type(e).__name__, "message": str(e)})
            out.flush()
        except BrokenPipeError:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
