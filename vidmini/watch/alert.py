"""One alert of a live watch, as every sink carries it (JSON) and the outbox stores it."""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any, Literal

Kind = Literal["new", "update", "end"]
KINDS: tuple[str, ...] = ("new", "update", "end")


def parse_time(value: str) -> datetime:
    """An ISO 8601 wall-clock time that names its time zone; a naive time is refused (which zone would it be?)."""
    t = datetime.fromisoformat(value)
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"time without a time zone: {value!r}")
    return t


@dataclass(frozen=True)
class Alert:
    """An event a watch's rule saw: `new` when it starts, `update` while it goes on, `end` when it is over.

    `key` is the idempotency key, the same for every delivery of this alert to any sink (and on every retry);
    left empty it is `<watch>:<rule>:<start in epoch ms>:<kind>`, so one event's new/update/end differ, and
    the watch re-sending the same event after a restart makes the same key (the outbox keeps it once).
    An `update` that should not collapse into the last one needs its own key (e.g. with a sequence number).
    """

    watch: str
    rule: str
    kind: Kind
    start: str  # ISO 8601 with a time zone, e.g. 2026-12-04T10:15:00.250+00:00
    end: str | None = None  # unknown while the event goes on
    confidence: float = 1.0
    thumbnail_path: str | None = None
    thumbnail: bytes | None = None  # JPEG/PNG bytes; base64 in JSON ("thumbnail_b64")
    clip_path: str | None = None
    key: str = ""

    def __post_init__(self) -> None:
        if not self.watch or "/" in self.watch or "+" in self.watch or "#" in self.watch:
            raise ValueError(f"watch name must be non-empty, without '/', '+' or '#' (an MQTT topic level): "
                             f"{self.watch!r}")
        if not self.rule:
            raise ValueError("alert without a rule")
        if self.kind not in KINDS:
            raise ValueError(f"alert kind must be one of {KINDS}, not {self.kind!r}")
        start = parse_time(self.start)
        if self.end is not None and parse_time(self.end) < start:
            raise ValueError(f"alert ends ({self.end}) before it starts ({self.start})")
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], not {self.confidence}")
        if not self.key:
            object.__setattr__(self, "key", f"{self.event}:{self.kind}")

    @property
    def event(self) -> str:
        """`<watch>:<rule>:<start in epoch ms>`: what a new, its updates and its end share (delivered in that order)."""
        return f"{self.watch}:{self.rule}:{round(parse_time(self.start).timestamp() * 1000)}"

    def to_dict(self, thumbnail: bool = True) -> dict[str, Any]:
        """JSON-ready; the thumbnail bytes as base64 under `thumbnail_b64` (left out with `thumbnail=False`)."""
        d = asdict(self)
        data = d.pop("thumbnail")
        if thumbnail and data is not None:
            d["thumbnail_b64"] = base64.b64encode(data).decode("ascii")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alert:
        """The inverse of `to_dict`; unknown keys are ignored, so a newer writer's extra fields don't break."""
        names = {f.name for f in fields(cls)} - {"thumbnail"}
        kwargs = {k: v for k, v in d.items() if k in names}
        if d.get("thumbnail_b64") is not None:
            kwargs["thumbnail"] = base64.b64decode(d["thumbnail_b64"])
        return cls(**kwargs)
