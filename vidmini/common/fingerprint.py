"""Content keys for videos: which file is this, without reading all of a multi-GB file."""

from __future__ import annotations

import hashlib
from pathlib import Path

HEAD_TAIL_BYTES = 1 << 20


def fingerprint(path: str | Path) -> str:
    """sha256 over decimal size || first 1 MiB || last 1 MiB, 16 hex chars: cheap for multi-GB files.

    Files up to 2 MiB are hashed whole; a change confined to the middle of a larger file that keeps its size
    is NOT detected (re-ingest such a file under an explicit key). The decimal size keeps the input unambiguous
    (its length grows with the size) and matches the first release, so existing stores are found again.
    """
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(HEAD_TAIL_BYTES))
        if size > HEAD_TAIL_BYTES:
            f.seek(max(HEAD_TAIL_BYTES, size - HEAD_TAIL_BYTES))
            h.update(f.read(HEAD_TAIL_BYTES))
    return h.hexdigest()[:16]


def fingerprint_url(url: str, started_at: str) -> str:
    """A live source has no fixed content: key it by what and when (the caller picks `started_at`)."""
    return "live-" + hashlib.sha256(f"{url}|{started_at}".encode()).hexdigest()[:11]
