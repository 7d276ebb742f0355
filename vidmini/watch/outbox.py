"""The durable outbox: every alert on disk (SQLite, WAL, synchronous=FULL) before `put` returns, one delivery
state per (alert, sink), retries with capped exponential backoff and jitter, and a dead letter (table + JSON-lines
log) once a delivery has used up its attempts or its age. A new `Outbox` over the same folder (a restarted
process) picks up what is still pending; what was delivered stays delivered.

Deliveries of one event (an alert's `new`, `update`s and `end`) reach a sink in the order they were put: a later
one waits while an earlier one is pending. Different events don't wait on each other.

Disk stays flat for a watch that runs forever: `prune` forgets finished alerts (and dead-letter rows) past the
retention, and `compact` (the dispatcher's housekeeping runs both) gives the freed pages back to the file system
(auto_vacuum=INCREMENTAL; a file made before that setting is VACUUMed once when opened) and truncates the WAL
(`wal_checkpoint(TRUNCATE)`; between checkpoints `journal_size_limit` caps what a reset WAL keeps). The dead-letter
log rolls over to one `.1` file past `DEAD_LOG_MAX_BYTES`.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidmini.watch.alert import Alert

DB_NAME = "outbox.sqlite3"
DEAD_LOG_NAME = "dead-letters.jsonl"
DEAD_LOG_MAX_BYTES = 8 << 20  # then it becomes dead-letters.jsonl.1 (replacing the one before) and starts anew
BUSY_TIMEOUT_MS = 30_000  # how long a statement waits for another process' lock
COMPACT_WAIT_MS = 1_000
JOURNAL_SIZE_LIMIT = 1 << 20  # bytes a WAL keeps after a checkpoint resets it
_AUTO_VACUUM_INCREMENTAL = 2
PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    event TEXT NOT NULL,
    payload TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    key TEXT NOT NULL REFERENCES alerts(key),
    sink TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (key, sink)
);
CREATE INDEX IF NOT EXISTS deliveries_lane ON deliveries (sink, state, seq);
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (sink, event, state, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    sink TEXT NOT NULL,
    at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL
);
"""

# Due, pending, and no earlier delivery of the same event still pending for this sink (so new → update → end).
_ELIGIBLE = """
FROM deliveries d JOIN alerts a ON a.key = d.key
WHERE d.sink = ? AND d.state = 'pending' AND NOT EXISTS (
    SELECT 1 FROM deliveries e
    WHERE e.sink = d.sink AND e.event = d.event AND e.state = 'pending' AND e.seq < d.seq)
"""


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff before attempt n+1 after n failures: base·factor^(n-1), ±jitter (a fraction), capped at max_delay_s.
    A delivery is dead-lettered after `max_attempts` failed attempts or once its alert is `max_age_s` old."""

    base_delay_s: float = 1.0
    factor: float = 2.0
    max_delay_s: float = 300.0
    jitter: float = 0.2
    max_attempts: int = 25
    max_age_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s or self.factor < 1:
            raise ValueError(f"bad backoff: {self}")
        if not 0 <= self.jitter <= 1 or self.max_attempts < 1 or self.max_age_s <= 0:
            raise ValueError(f"bad retry limits: {self}")

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        raw = min(self.max_delay_s, self.base_delay_s * self.factor ** max(0, failures - 1))
        spread = raw * self.jitter
        return min(self.max_delay_s, max(0.0, raw + (rng or random).uniform(-spread, spread)))


@dataclass(frozen=True)
class Delivery:
    """One alert owed to one sink. `attempts`: failed attempts so far."""

    alert: Alert
    sink: str
    attempts: int
    next_at: float
    created: float

    @property
    def key(self) -> str:
        return self.alert.key


class Outbox:
    """The outbox in `folder` (created if missing). `sinks`: the sink names a new alert is owed to.

    Thread-safe (one connection behind a lock); several processes may open the same folder (SQLite locking).
    `clock` is wall-clock seconds: next-attempt times and ages are stored and must mean the same after a restart.
    """

    def __init__(self, folder: Path | str, sinks: Sequence[str], policy: RetryPolicy | None = None,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None):
        if len(set(sinks)) != len(sinks):  # none: the alerts are only kept (a watch's log and feed)
            raise ValueError(f"the outbox needs distinct sink names, got {list(sinks)}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sinks = tuple(sinks)
        self.policy = policy or RetryPolicy()
        self.dead_log = self.folder / DEAD_LOG_NAME
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.folder / DB_NAME, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
        with self._lock:
            self._set_auto_vacuum()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # WAL + NORMAL may lose the last commits on power loss
            self._db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            self._db.executescript(_SCHEMA)

    def _set_auto_vacuum(self) -> None:
        """auto_vacuum=INCREMENTAL, so that `compact` can shrink the file. A new database takes it as it is; one made
        before (tables already there) only through a VACUUM, once (the setting is kept in the file)."""
        if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] == _AUTO_VACUUM_INCREMENTAL:
            return
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
            self._db.execute("VACUUM")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before reading (BEGIN IMMEDIATE), so read-then-write can't race."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def put(self, alert: Alert, sinks: Sequence[str] | None = None) -> bool:
        """Persist `alert`, owed to `sinks` (default: all); False when its key is already here (nothing changes)."""
        now = self._clock()
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO alerts (key, event, payload, created) VALUES (?, ?, ?, ?)",
                             (alert.key, alert.event, json.dumps(alert.to_dict()), now))
            if cur.rowcount == 0:
                return False
            seq = cur.lastrowid
            db.executemany("INSERT INTO deliveries (key, sink, seq, event, state, attempts, next_at, updated) "
                           "VALUES (?, ?, ?, ?, 'pending', 0, ?, ?)",
                           [(alert.key, s, seq, alert.event, now, now) for s in (sinks or self.sinks)])
        return True

    def alerts(self, after_seq: int = 0, limit: int | None = None) -> list[Alert]:
        """The alerts kept here (delivered ones until `prune` forgets them), in the order they were put."""
        rows = self._read("SELECT payload FROM alerts WHERE seq > ? ORDER BY seq" + (" LIMIT ?" if limit else ""),
                          (after_seq, limit) if limit else (after_seq,))
        return [Alert.from_dict(json.loads(p)) for (p,) in rows]

    def pending(self, sink: str, limit: int = 100, now: float | None = None) -> list[Delivery]:
        """Deliveries to `sink` that are due now, oldest first (an event's later alerts after its earlier ones)."""
        now = self._clock() if now is None else now
        rows = self._read(f"SELECT a.payload, d.attempts, d.next_at, a.created {_ELIGIBLE} AND d.next_at <= ? "
                          "ORDER BY d.seq LIMIT ?", (sink, now, limit))
        return [Delivery(Alert.from_dict(json.loads(p)), sink, n, at, c) for p, n, at, c in rows]

    def next_due(self, sink: str) -> float | None:
        """When the earliest pending delivery to `sink` may be attempted (None: nothing pending)."""
        rows = self._read(f"SELECT MIN(d.next_at) {_ELIGIBLE}", (sink,))
        return rows[0][0]

    def state(self, key: str, sink: str) -> str | None:
        rows = self._read("SELECT state FROM deliveries WHERE key = ? AND sink = ?", (key, sink))
        return rows[0][0] if rows else None

    def attempts(self, key: str, sink: str) -> int:
        rows = self._read("SELECT attempts FROM deliveries WHERE key = ? AND sink = ?", (key, sink))
        return rows[0][0] if rows else 0

    def counts(self, sink: str | None = None) -> dict[str, int]:
        """{"pending": n, "delivered": n, "dead": n} over one sink or all."""
        where, args = ("WHERE sink = ?", (sink,)) if sink else ("", ())
        out = {PENDING: 0, DELIVERED: 0, DEAD: 0}
        out.update(dict(self._read(f"SELECT state, COUNT(*) FROM deliveries {where} GROUP BY state", args)))
        return out

    def mark_delivered(self, key: str, sink: str) -> None:
        """The receiver acknowledged it. A delivery already dead or delivered stays as it is."""
        now = self._clock()
        with self._tx() as db:
            db.execute("UPDATE deliveries SET state = 'delivered', last_error = NULL, updated = ? "
                       "WHERE key = ? AND sink = ? AND state = 'pending'", (now, key, sink))

    def mark_failed(self, key: str, sink: str, error: str, *, permanent: bool = False,
                    retry_after: float | None = None) -> float | None:
        """Count a failed attempt. Returns when the next attempt is due, or None when the delivery is not pending
        any more: dead-lettered now (permanent, out of attempts, or too old) or already done.
        `retry_after` (the receiver's wish) lengthens the backoff, within the cap."""
        now = self._clock()
        with self._tx() as db:
            row = db.execute("SELECT d.attempts, a.created, d.state FROM deliveries d JOIN alerts a ON a.key = d.key "
                             "WHERE d.key = ? AND d.sink = ?", (key, sink)).fetchone()
            if row is None:
                raise KeyError(f"no delivery of {key!r} to {sink!r}")
            attempts, created, state = row[0] + 1, row[1], row[2]
            if state != PENDING:
                return None
            if permanent or attempts >= self.policy.max_attempts or now - created >= self.policy.max_age_s:
                why = ("rejected" if permanent else
                       "out of attempts" if attempts >= self.policy.max_attempts else "too old")
                self._dead_letter(db, key, sink, attempts, f"{why}: {error}", now)
                return None
            delay = self.policy.delay(attempts, self._rng)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.policy.max_delay_s))
            db.execute("UPDATE deliveries SET attempts = ?, next_at = ?, last_error = ?, updated = ? "
                       "WHERE key = ? AND sink = ?", (attempts, now + delay, error, now, key, sink))
            return now + delay

    def expire(self, now: float | None = None) -> int:
        """Dead-letter pending deliveries whose alert is older than the policy's max age (also those never
        attempted, e.g. while an MQTT broker was away); how many."""
        now = self._clock() if now is None else now
        with self._tx() as db:
            rows = db.execute("SELECT d.key, d.sink, d.attempts, d.last_error FROM deliveries d "
                              "JOIN alerts a ON a.key = d.key WHERE d.state = 'pending' AND a.created <= ?",
                              (now - self.policy.max_age_s,)).fetchall()
            for key, sink, attempts, last in rows:
                self._dead_letter(db, key, sink, attempts, f"too old: {last or 'never delivered'}", now)
        return len(rows)

    def _dead_letter(self, db: sqlite3.Connection, key: str, sink: str, attempts: int, reason: str,
                     now: float) -> None:
        """The log line first (fsynced), then the commit: a crash between them leaves the delivery pending, to be
        dead-lettered again (a repeated line), never a dead delivery missing from the log."""
        payload = db.execute("SELECT payload FROM alerts WHERE key = ?", (key,)).fetchone()[0]
        line = {"at": now, "key": key, "sink": sink, "attempts": attempts, "reason": reason,
                "alert": json.loads(payload)}
        try:
            if self.dead_log.stat().st_size > DEAD_LOG_MAX_BYTES:
                os.replace(self.dead_log, self.dead_log.with_name(DEAD_LOG_NAME + ".1"))
        except FileNotFoundError:
            pass
        with open(self.dead_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        db.execute("UPDATE deliveries SET state = 'dead', attempts = ?, last_error = ?, updated = ? "
                   "WHERE key = ? AND sink = ?", (attempts, reason, now, key, sink))
        db.execute("INSERT INTO dead_letters (key, sink, at, attempts, reason) VALUES (?, ?, ?, ?, ?)",
                   (key, sink, now, attempts, reason))

    def dead_letters(self, sink: str | None = None) -> list[dict[str, Any]]:
        where, args = ("WHERE sink = ?", (sink,)) if sink else ("", ())
        rows = self._read(f"SELECT key, sink, at, attempts, reason FROM dead_letters {where} ORDER BY id", args)
        return [dict(zip(("key", "sink", "at", "attempts", "reason"), r, strict=True)) for r in rows]

    def prune(self, older_than_s: float, now: float | None = None) -> int:
        """Forget alerts older than this whose every delivery is done (delivered or dead), and dead-letter rows as
        old (the dead-letter log keeps them); how many alerts. Their keys are then no longer recognised as repeats,
        so keep this well beyond any re-send a watch may do. `compact` gives the space back to the disk."""
        now = self._clock() if now is None else now
        with self._tx() as db:
            keys = [k for (k,) in db.execute(
                "SELECT key FROM alerts a WHERE created <= ? AND NOT EXISTS "
                "(SELECT 1 FROM deliveries d WHERE d.key = a.key AND d.state = 'pending')",
                (now - older_than_s,)).fetchall()]
            db.executemany("DELETE FROM deliveries WHERE key = ?", [(k,) for k in keys])
            db.executemany("DELETE FROM alerts WHERE key = ?", [(k,) for k in keys])
            db.execute("DELETE FROM dead_letters WHERE at <= ?", (now - older_than_s,))
        return len(keys)

    def compact(self) -> None:
        """Free pages back to the file system (incremental vacuum) and the WAL checkpointed into the database and
        truncated to nothing (when no other connection is reading meanwhile; else as far as it can, to be done
        the next time)."""
        with self._lock:
            self._db.executescript("PRAGMA incremental_vacuum;")  # run to the end (one page per step otherwise)
            # a checkpoint waits for other connections' readers: briefly (puts wait for this lock meanwhile)
            self._db.execute(f"PRAGMA busy_timeout={COMPACT_WAIT_MS}")
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def disk_bytes(self) -> int:
        """What the outbox takes on disk: the database, its WAL and shared-memory index, the dead-letter logs."""
        names = (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", DEAD_LOG_NAME, DEAD_LOG_NAME + ".1")
        total = 0
        for name in names:
            try:
                total += (self.folder / name).stat().st_size
            except FileNotFoundError:
                pass
        return total

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
