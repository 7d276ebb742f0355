"""Live sources: a recording still being written, and stream URLs / devices that FFmpeg opens.

A growing file is read through `FollowFile`, a file object whose reads wait for more bytes (like
`tail -f`) until the file has not grown for `idle_timeout` seconds; the demuxer then sees an ordinary stream.
Use a streamable container for recordings in progress (MPEG-TS, Matroska, fragmented MP4); a plain MP4
writes its index last and cannot be read before it is finished.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path

LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "rtp://", "udp://", "tcp://", "srt://", "http://", "https://")


def is_stream_url(source: str) -> bool:
    return str(source).lower().startswith(LIVE_SCHEMES) or str(source).startswith("/dev/video")


class FollowFile(io.RawIOBase):
    """Reads a file that another process is still appending to; EOF only after `idle_timeout` s of no growth, or
    at once when `finished()` says the writer is done with it (a recorder that moved on to its next segment)."""

    def __init__(self, path: str | Path, idle_timeout: float = 5.0, poll: float = 0.05,
                 finished: Callable[[], bool] | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self._f = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self.idle_timeout, self.poll, self.finished = idle_timeout, poll, finished
        self.name = str(self.path)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False  # demuxers then read forward only, as from a pipe

    def readinto(self, buffer) -> int:
        waited = 0.0
        while True:
            n = self._f.readinto(buffer)
            if n:
                return n
            if waited >= self.idle_timeout:
                return 0
            size = os.fstat(self._f.fileno()).st_size
            if size > self._f.tell():
                continue
            if self.finished is not None and self.finished():
                if os.fstat(self._f.fileno()).st_size > self._f.tell():
                    continue  # its last bytes came before it was done
                return 0
            time.sleep(self.poll)
            waited += self.poll

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()
