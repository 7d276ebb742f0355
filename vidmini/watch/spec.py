"""What a watch is, as the user set it up, and where it lives on disk.

`<VIDMINI_HOME>/watches/<name>/`:
  watch.json      the `WatchSpec` (replaced atomically on every change: add, pause, resume)
  state.json      where the watch got to: its rule trackers' open events, the last frame it judged
  segments/       the recorded source (MPEG-TS segments and their index, `vidmini.watch.recorder`)
  alerts/         the alert outbox (`vidmini.watch.outbox`) and its dead letters
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from vidmini.common.files import atomic_write

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(d|h|m|s)", re.I)
_UNIT_S = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
DEFAULT_RETAIN_S = 24 * 3600.0


class WatchError(ValueError):
    """A watch that cannot be made or found as asked; the message is one line for the user."""


def parse_duration(text: str | float | int) -> float:
    """Seconds in '24h', '90m', '1h30m', '2d', '45s' or a bare number of seconds; > 0."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip()
        try:
            seconds = float(s)
        except ValueError:
            parts = _DURATION.findall(s)
            if not parts or _DURATION.sub("", s).strip():
                raise WatchError(f"not a duration: {text!r} (say e.g. 24h, 90m, 1h30m, 2d)") from None
            seconds = sum(float(n) * _UNIT_S[u.lower()] for n, u in parts)
    if not seconds > 0 or seconds == float("inf"):
        raise WatchError(f"a duration must be more than 0 s: {text!r}")
    return seconds


def check_name(name: str) -> str:
    if not NAME.fullmatch(name or ""):
        raise WatchError(f"a watch name is 1-64 letters, digits, '-' or '_', starting with a letter or digit: "
                         f"{name!r}")
    return name


@dataclass(frozen=True)
class WatchSpec:
    """A source watched around the clock. `rules` are `vidmini.watch.rules.RuleSpec` dicts (kept as dicts here so
    that listing watches needs no model code). Retention: segments older than `retain_s`, or beyond `retain_bytes`
    on disk, are removed (either bound, or both)."""

    name: str
    source: str
    fps: float = 1.0
    retain_s: float | None = DEFAULT_RETAIN_S
    retain_bytes: int | None = None
    rules: tuple[dict, ...] = ()
    sinks: tuple[dict, ...] = ()  # {"type": "webhook", "url", "secret"} / {"type": "mqtt", "host", "port", ...}
    segment_s: float = 60.0
    paused: bool = False
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        check_name(self.name)
        if not str(self.source).strip():
            raise WatchError("a watch needs a source: a stream URL or a file being written")
        if not 0.05 <= float(self.fps) <= 30:
            raise WatchError(f"fps must be between 0.05 and 30, got {self.fps!r}")
        if self.retain_s is not None and not self.retain_s > 0:
            raise WatchError("retention must be more than 0 s")
        if self.retain_bytes is not None and not self.retain_bytes > 0:
            raise WatchError("a retention in bytes must be more than 0")
        if self.retain_s is None and self.retain_bytes is None:
            raise WatchError("a watch needs a retention (--retain or --retain-gb): a stream runs forever")
        if not 1 <= float(self.segment_s) <= 3600:
            raise WatchError("segments must last 1 s to 1 h")
        object.__setattr__(self, "rules", tuple(dict(r) for r in self.rules))
        object.__setattr__(self, "sinks", tuple(dict(k) for k in self.sinks))
        for sink in self.sinks:
            if sink.get("type") == "webhook":
                if not str(sink.get("url", "")).startswith(("http://", "https://")):
                    raise WatchError(f"a webhook needs an http(s) URL, not {sink.get('url')!r}")
                if not sink.get("secret"):
                    raise WatchError("a webhook needs a secret to sign its alerts with (--webhook-secret)")
            elif sink.get("type") == "mqtt":
                port = sink.get("port", 1883)
                if not sink.get("host") or not isinstance(port, int) or not 0 < port < 65536:
                    raise WatchError(f"an MQTT broker is host[:port], not {sink.get('host')}:{port}")
            else:
                raise WatchError(f"unknown alert sink {sink.get('type')!r} (webhook or mqtt)")
        events = [r.get("event", "") for r in self.rules]
        if any(not str(e).strip() for e in events):
            raise WatchError("a rule needs an event, e.g. --rule 'a person enters'")
        if len(set(events)) != len(events):
            raise WatchError("two rules of one watch watch the same event")

    def to_json(self) -> dict:
        data = asdict(self)
        data["rules"] = [dict(r) for r in self.rules]
        data["sinks"] = [dict(k) for k in self.sinks]
        return data

    @classmethod
    def from_json(cls, data: dict) -> WatchSpec:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: (tuple(v) if k in ("rules", "sinks") else v) for k, v in data.items() if k in known})


class WatchFolders:
    """The watches under `<home>/watches`: each a folder named after it (see the module docstring)."""

    def __init__(self, home: str | Path) -> None:
        self.root = Path(home) / "watches"

    def folder(self, name: str) -> Path:
        return self.root / check_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "watch.json").is_file())

    def load(self, name: str) -> WatchSpec:
        path = self.folder(name) / "watch.json"
        if not path.is_file():
            raise WatchError(f"no watch named {name!r}")
        return WatchSpec.from_json(json.loads(path.read_text()))

    def all(self) -> list[WatchSpec]:
        return [self.load(n) for n in self.names()]

    def save(self, spec: WatchSpec) -> None:
        folder = self.folder(spec.name)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "watch.json"
        atomic_write(path, json.dumps(spec.to_json(), indent=1, sort_keys=True) + "\n")
        path.chmod(0o600)  # it holds the webhooks' secrets

    def add(self, spec: WatchSpec) -> WatchSpec:
        if (self.folder(spec.name) / "watch.json").exists():
            raise WatchError(f"a watch named {spec.name!r} exists already (remove it first, or pick another name)")
        self.save(spec)
        return spec

    def set_paused(self, name: str, paused: bool) -> WatchSpec:
        spec = replace(self.load(name), paused=paused)
        self.save(spec)
        return spec

    def remove(self, name: str) -> None:
        """The watch and everything it recorded. Renamed away first, so a half-removed watch is never listed."""
        folder = self.folder(name)
        if not (folder / "watch.json").is_file():
            raise WatchError(f"no watch named {name!r}")
        trash = self.root / f".removing-{name}"
        if trash.exists():
            shutil.rmtree(trash)
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def read_state(self, name: str) -> dict:
        path = self.folder(name) / "state.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_state(self, name: str, state: dict) -> None:
        atomic_write(self.folder(name) / "state.json", json.dumps(state, sort_keys=True) + "\n")
