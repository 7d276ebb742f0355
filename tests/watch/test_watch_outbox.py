"""The alert record and the durable outbox on their own: idempotent puts, backoff, dead letters, restart, order."""

from __future__ import annotations

import json
import os
import random
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from vidmini.watch.alert import Alert
from vidmini.watch.outbox import DB_NAME, DEAD, DELIVERED, PENDING, Outbox, RetryPolicy

T0 = "2026-12-04T10:15:00.250+00:00"


class Clock:
    """Wall clock the test moves by hand."""

    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def alert(kind: str = "new", start: str = T0, **kw) -> Alert:
    return Alert(watch="door", rule="person", kind=kind, start=start, confidence=0.9, **kw)


def test_alert_key_json_round_trip_and_checks():
    a = alert(end="2026-12-04T11:15:01+01:00", thumbnail=b"\xff\xd8jpeg", clip_path="/clips/1.mp4")
    assert a.key == "door:person:1796379300250:new"
    assert a.event == "door:person:1796379300250"
    d = a.to_dict()
    assert json.loads(json.dumps(d)) == d and "thumbnail" not in d and d["thumbnail_b64"]
    assert Alert.from_dict(d) == a
    assert "thumbnail_b64" not in a.to_dict(thumbnail=False)
    with pytest.raises(ValueError, match="time zone"):
        alert(start="2026-12-04T10:15:00")
    with pytest.raises(ValueError, match="kind"):
        alert(kind="begin")
    with pytest.raises(ValueError, match="before it starts"):
        alert(end="2026-12-04T10:00:00+00:00")
    with pytest.raises(ValueError, match="topic"):
        Alert(watch="a/b", rule="r", kind="new", start=T0)


def test_backoff_is_exponential_jittered_and_capped():
    p = RetryPolicy(base_delay_s=1.0, factor=2.0, max_delay_s=10.0, jitter=0.25)
    rng = random.Random(0)
    for failures, raw in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)]:
        delays = [p.delay(failures, rng) for _ in range(200)]
        assert raw * 0.75 <= min(delays) < max(delays) <= raw * 1.25
    assert all(7.5 <= p.delay(n, rng) <= 10.0 for n in range(5, 60))
    assert RetryPolicy(jitter=0.0).delay(3) == 4.0


def test_put_persists_and_repeats_are_no_ops(tmp_path):
    box = Outbox(tmp_path, ["hook", "mqtt"])
    a = alert()
    assert box.put(a) is True
    assert box.put(alert()) is False  # same key: nothing new, still one delivery per sink
    assert box.counts() == {PENDING: 2, DELIVERED: 0, DEAD: 0}
    box.close()
    again = Outbox(tmp_path, ["hook", "mqtt"])  # a restarted process
    assert [d.alert for d in again.pending("hook")] == [a]
    assert again.put(a) is False


def test_failures_back_off_then_dead_letter_into_table_and_log(tmp_path):
    clock = Clock()
    box = Outbox(tmp_path, ["hook"], RetryPolicy(base_delay_s=10, max_delay_s=40, jitter=0, max_attempts=3),
                 clock=clock)
    a = alert()
    box.put(a)
    assert box.mark_failed(a.key, "hook", "HTTP 503") == clock.t + 10
    assert box.pending("hook") == [] and box.next_due("hook") == clock.t + 10
    clock.t += 10
    assert box.pending("hook")[0].attempts == 1
    assert box.mark_failed(a.key, "hook", "HTTP 503") == clock.t + 20
    clock.t += 20
    assert box.mark_failed(a.key, "hook", "HTTP 503") is None  # the third failure: out of attempts
    assert box.state(a.key, "hook") == DEAD and box.pending("hook") == [] and box.next_due("hook") is None
    [row] = box.dead_letters()
    assert row["key"] == a.key and row["attempts"] == 3 and row["reason"] == "out of attempts: HTTP 503"
    [line] = [json.loads(s) for s in box.dead_log.read_text().splitlines()]
    assert line["key"] == a.key and line["sink"] == "hook" and Alert.from_dict(line["alert"]) == a


def test_permanent_failure_and_max_age_dead_letter_at_once(tmp_path):
    clock = Clock()
    box = Outbox(tmp_path, ["hook", "mqtt"], RetryPolicy(max_age_s=3600), clock=clock)
    a, b = alert(), alert(start="2026-12-04T10:20:00+00:00")
    box.put(a)
    box.put(b)
    assert box.mark_failed(a.key, "hook", "HTTP 400", permanent=True) is None
    assert box.state(a.key, "hook") == DEAD and box.state(a.key, "mqtt") == PENDING  # sinks are independent
    clock.t += 3600
    assert box.expire() == 3  # never attempted (a broker away all the time) still ends in the dead letter
    assert box.counts() == {PENDING: 0, DELIVERED: 0, DEAD: 4}
    assert [r["reason"].split(":")[0] for r in box.dead_letters()] == ["rejected", "too old", "too old", "too old"]
    assert len(box.dead_log.read_text().splitlines()) == 4


def test_an_events_alerts_go_in_order_other_events_do_not_wait(tmp_path):
    clock = Clock()
    box = Outbox(tmp_path, ["hook"], RetryPolicy(base_delay_s=5, jitter=0), clock=clock)
    new, update, end = alert("new"), alert("update"), alert("end", end="2026-12-04T10:16:00+00:00")
    other = alert(start="2026-12-04T10:30:00+00:00")
    for a in (new, update, end, other):
        box.put(a)
    assert [d.key for d in box.pending("hook")] == [new.key, other.key]
    box.mark_failed(new.key, "hook", "timeout")
    assert [d.key for d in box.pending("hook")] == [other.key]  # the update waits for its new
    box.mark_delivered(other.key, "hook")
    clock.t += 5
    box.mark_delivered(new.key, "hook")
    assert [d.key for d in box.pending("hook")] == [update.key]


def test_reopened_outbox_keeps_what_was_delivered(tmp_path):
    box = Outbox(tmp_path, ["hook"])
    a, b = alert(), alert(start="2026-12-04T10:20:00+00:00")
    box.put(a)
    box.put(b)
    box.mark_delivered(a.key, "hook")
    box.mark_delivered(a.key, "hook")  # a repeat acknowledgement changes nothing
    box.close()
    with Outbox(tmp_path, ["hook"]) as again:
        assert [d.key for d in again.pending("hook")] == [b.key]
        assert again.state(a.key, "hook") == DELIVERED


def test_prune_forgets_only_finished_old_alerts(tmp_path):
    clock = Clock()
    box = Outbox(tmp_path, ["hook"], clock=clock)
    done, open_ = alert(), alert(start="2026-12-04T10:20:00+00:00")
    box.put(done)
    box.put(open_)
    box.mark_delivered(done.key, "hook")
    clock.t += 100
    assert box.prune(older_than_s=50) == 1
    assert box.state(done.key, "hook") is None and box.state(open_.key, "hook") == PENDING


def stream_of_alerts(n: int, first: int = 0, thumb_bytes: int = 6000):
    """`n` alerts of a busy watch, one a second from `first`, each with an incompressible JPEG-sized thumbnail."""
    t0 = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)
    for i in range(first, first + n):
        yield alert(start=(t0 + timedelta(seconds=i)).isoformat(), thumbnail=os.urandom(thumb_bytes))


def test_outbox_file_levels_off_under_a_steady_stream_of_delivered_alerts(tmp_path):
    """An hour of a watch that alerts 20 times a minute to two sinks, with a 10-minute retention: the database and its
    WAL on disk stop growing once the retention is full (the rows pruned give their pages back, the WAL is
    truncated), rather than keeping the high-water mark of every page and WAL frame ever written."""
    clock = Clock()
    box = Outbox(tmp_path, ["hook", "mqtt"], clock=clock)
    retention_s, per_minute = 600, 20
    sizes, rows = [], []
    for minute in range(60):
        for a in stream_of_alerts(per_minute, first=minute * per_minute):
            assert box.put(a)
            box.mark_delivered(a.key, "hook")
            box.mark_delivered(a.key, "mqtt")
        clock.t += 60
        box.prune(retention_s)
        box.compact()
        sizes.append(box.disk_bytes())
        rows.append(len(box.alerts()))
    db, wal = tmp_path / DB_NAME, tmp_path / f"{DB_NAME}-wal"
    print(f"\noutbox on disk per minute (kB): {[round(b / 1000) for b in sizes]}")
    assert rows[-1] == rows[30] == per_minute * (retention_s // 60 - 1)  # the retention's worth is kept
    kept_payload = per_minute * (retention_s // 60) * 8000  # 6000 bytes as base64, and the rest of the row
    full = max(sizes[10:20])  # the retention just filled
    assert max(sizes[20:]) <= full * 1.1  # level from then on (page reuse may wobble a little)
    assert sizes[-1] <= 2.0 * kept_payload  # and in proportion to what is kept
    assert (not wal.exists()) or wal.stat().st_size == 0  # checkpointed and truncated
    assert db.stat().st_size <= 2.0 * kept_payload
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
        assert raw.execute("PRAGMA freelist_count").fetchone()[0] <= 16  # free pages went back to the disk


def test_an_outbox_made_without_auto_vacuum_is_converted_once_and_then_shrinks(tmp_path):
    """A database from before the setting (auto_vacuum NONE) with 300 delivered alerts in it: opened, it is
    VACUUMed into INCREMENTAL mode once, keeping its alerts; from then on pruning gives its pages back."""
    clock = Clock()
    db = tmp_path / DB_NAME
    box = Outbox(tmp_path, ["hook"], clock=clock)
    alerts = list(stream_of_alerts(300))
    for a in alerts:
        box.put(a)
        box.mark_delivered(a.key, "hook")
    box.close()
    with sqlite3.connect(db) as raw:  # made as the earlier code made it
        raw.execute("PRAGMA auto_vacuum=NONE")
        raw.execute("VACUUM")
        assert raw.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    grown = db.stat().st_size
    box = Outbox(tmp_path, ["hook"], clock=clock)
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    assert [a.key for a in box.alerts()] == [a.key for a in alerts]  # nothing lost in the conversion
    clock.t += 100
    assert box.prune(older_than_s=50) == 300
    box.compact()
    assert db.stat().st_size < grown / 10
