"""Writing files so that a crash leaves the old content or the new one, never a mix."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """`<name>.tmp` in the same folder, fsync, rename over, fsync the folder. Stores clean up `*.tmp` leftovers
    of a crash when they open, so the temp name is part of the contract."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def locked_dir(path: Path, blocking: bool = True) -> Iterator[None]:
    """An exclusive flock on a folder (a store's writers take it around each commit); the kernel drops it when a
    killed writer's descriptors close. Not blocking: BlockingIOError when another holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        yield
    finally:
        os.close(fd)
