"""Decoding that starts before the model is loaded.

A cold `vidmini ingest` spends ~3.5 s importing torch and transformers and loading weights before it can encode a
frame; decoding needs none of that. `PrefetchedFrames` runs the very same `FrameSampler` in a child process (its
own interpreter: no GIL shared with the imports) as soon as the ingest starts. The child writes each frame's
pixels to a file of its own in a private folder (in memory-backed /dev/shm where there is one) and only a short
header on the pipe, so it never waits for the busy parent to copy megabytes; it waits only when `max_bytes` of
frames are not yet taken. The parent reads a frame's file when the job wants that frame and deletes it.

Given `side` (the model's frame side, `vidmini.engine.load.frame_side_hint`), the child also does the rest of the
per-frame work that needs no model: it squares each frame to `side` (the nearest pick the engine makes itself)
and makes its thumbnail from the full frame. A 1080p frame then crosses as 80-336 px plus a JPEG instead of
6 MB, the bound holds many more frames while the model loads, and the parent's share of the work shrinks.
Every byte equals what the parent would have made from the sampler's frame.

Run as `python -m vidmini.ingest.prefetch SPEC_JSON FOLDER MAX_BYTES`: the child side.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vidmini.ingest import errors
from vidmini.ingest.decode_common import SampledFrame
from vidmini.ingest.options import IngestOptions

DEFAULT_MAX_BYTES = 256 << 20
SHM = Path("/dev/shm")


class PrefetchedFrames:
    """Iterate (once) for the `SampledFrame`s of `source` under `options`; `gaps` is filled when they end.
    Errors are the sampler's own types (an `IngestError` subclass for bad media), raised where the frames stop."""

    def __init__(self, source: str, options: IngestOptions, max_bytes: int = DEFAULT_MAX_BYTES,
                 side: int | None = None) -> None:
        self.side = side
        spec = {"side": side, "source": str(source), "fps": None if options.every_k else options.fps, "every_k": options.every_k,
                "mode": options.mode, "stream": options.stream, "backend": options.backend,
                "hwaccel": options.hwaccel}
        self.gaps: list[tuple[float, float]] = []
        self.decode_errors = 0
        base = SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else None
        self.folder = Path(tempfile.mkdtemp(prefix="vidmini-prefetch-", dir=base))
        self._child = subprocess.Popen(
            [sys.executable, "-m", "vidmini.ingest.prefetch", json.dumps(spec), str(self.folder), str(max_bytes)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)

    def __iter__(self) -> Iterator[SampledFrame]:
        pipe = self._child.stdout
        for line in pipe:
            header = json.loads(line)
            if "error" in header:
                raise _rebuild(header)
            if header.get("end"):
                self.gaps = [tuple(g) for g in header["gaps"]]
                self.decode_errors = header["decode_errors"]
                return
            path = self.folder / header["file"]
            image = np.fromfile(path, dtype=np.uint8).reshape(header["shape"])
            path.unlink()
            thumbnail = None
            if "thumbnail" in header:
                thumb_path = self.folder / header["thumbnail"]
                thumbnail = thumb_path.read_bytes()
                thumb_path.unlink()
            yield SampledFrame(header["t"], header["pts"], header["index"], image, thumbnail)
        code = self._child.wait()
        raise RuntimeError(f"the decoding process ended without finishing (exit code {code})")

    def close(self) -> None:
        """Stop the child (if still decoding) and remove its folder; safe to call twice."""
        if self._child.poll() is None:
            self._child.kill()
        self._child.wait()
        if self._child.stdout is not None:
            self._child.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)

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
def _say(header: dict) -> None:
    sys.stdout.write(json.dumps(header) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    from vidmini.engine.frames import resize_nearest
    from vidmini.ingest.sampler import FrameSampler
    from vidmini.ingest.thumbnails import thumbnail_jpeg

    spec, folder, max_bytes = json.loads(argv[0]), Path(argv[1]), int(argv[2])
    side = spec["side"]
    sampler = FrameSampler(spec["source"], fps=spec["fps"], every_k=spec["every_k"], mode=spec["mode"],
                           stream=spec["stream"], backend=spec["backend"], hwaccel=spec["hwaccel"])
    waiting: deque[tuple[Path, int]] = deque()  # frames written and not yet taken by the parent, oldest first
    held = 0
    try:
        for n, f in enumerate(sampler):
            image = np.ascontiguousarray(f.image, dtype=np.uint8)
            header = {"t": f.t, "pts": f.pts, "index": f.index}
            files = {}
            if side is not None:
                files["thumbnail"] = (f"{n:08d}.jpg", thumbnail_jpeg(image))
                image = resize_nearest(image, side)
            files["file"] = (f"{n:08d}.rgb", image)
            size = sum(len(data) if isinstance(data, bytes) else data.nbytes for _, data in files.values())
            while waiting and held + size > max_bytes:  # the parent takes them in order
                if waiting[0][0].exists():
                    time.sleep(0.005)
                else:
                    held -= waiting.popleft()[1]
            for key, (name, data) in files.items():
                if isinstance(data, np.ndarray):
                    data.tofile(folder / f".{name}")  # no copy of a full frame
                else:
                    (folder / f".{name}").write_bytes(data)
                os.replace(folder / f".{name}", folder / name)  # whole before the parent can see it
                header[key] = name
            waiting.append((folder / files["file"][0], size))  # the frame's file goes last, with its thumbnail
            held += size
            _say({**header, "shape": list(image.shape)})
        _say({"end": True, "gaps": [list(g) for g in sampler.gaps], "decode_errors": sampler.decode_errors})
    except (BrokenPipeError, FileNotFoundError):  # the parent closed (a reused store, a cancel): nothing to report
        return 0
    except Exception as e:  # noqa: BLE001 - every failure goes back to the parent, which raises it
        try:
            _say({"error": type(e).__name__, "message": str(e)})
        except BrokenPipeError:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
