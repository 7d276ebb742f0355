"""Who may use a server: API keys (a file of keys, held only as SHA-256 digests, compared in constant time), and
whether an address is this machine's own (served without keys)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from pathlib import Path

from vidmini.common.errors import UsageError


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """One key per line (blank lines and `#` comments ignored). A line `sha256:<hex>` is a digest already; any
    other line is a key, hashed as it is read, so the process never keeps a key in the clear."""

    def __init__(self, digests: set[str]) -> None:
        self.digests = digests

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise UsageError(f"cannot read the API key file {path}: {e.strerror or e}") from None
        digests = set()
        for line in (raw.strip() for raw in lines):
            if not line or line.startswith("#"):
                continue
            digests.add(line.removeprefix("sha256:").lower() if line.startswith("sha256:") else digest(line))
        if not digests:
            raise UsageError(f"the API key file {path} holds no keys")
        return cls(digests)

    def allows(self, key: str | None) -> bool:
        if not key:
            return False
        given = digest(key)
        return any(hmac.compare_digest(given, d) for d in self.digests)


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address: the only hosts a server may bind without keys."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
