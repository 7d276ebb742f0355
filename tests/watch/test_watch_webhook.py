"""Webhook delivery through the dispatcher to a real loopback HTTP receiver that checks the HMAC."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

from watch_helpers import FAST, SECRET, free_port, wait_until

from vidmini.watch.alert import Alert
from vidmini.watch.dispatcher import Dispatcher
from vidmini.watch.outbox import DEAD, DELIVERED, Outbox
from vidmini.watch.webhook import TIMESTAMP_HEADER, WebhookConfig, sign, verify_signature


def alert(minute: int = 15, kind: str = "new") -> Alert:
    return Alert(watch="door", rule="person", kind=kind, start=f"2026-12-04T10:{minute:02d}:00+00:00",
                 confidence=0.8, thumbnail=b"\x89PNG", clip_path=f"/clips/{minute}.mp4")


def dispatcher(folder, url: str, **kw) -> Dispatcher:
    return Dispatcher(folder, [WebhookConfig("hook", url, SECRET, timeout_s=2.0)], FAST, idle_poll_s=0.05, **kw)


def test_verify_signature():
    body = b'{"key":"k"}'
    header = sign(SECRET, body)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert verify_signature(SECRET, body, header)
    assert not verify_signature(SECRET, body + b" ", header)
    assert not verify_signature("other", body, header)
    assert not verify_signature(SECRET, body, None) and not verify_signature(SECRET, body, header[7:])


def test_delivered_once_signed_with_its_key(tmp_path, receiver):
    hook = receiver()
    a = alert()
    with dispatcher(tmp_path, hook.url) as d:
        assert d.submit(a) and not d.submit(a)
        assert d.wait_idle(10)
        assert d.outbox.state(a.key, "hook") == DELIVERED
    [req] = hook.requests
    assert req.signed and req.key == a.key == "door:person:1796379300000:new"
    assert abs(int(req.headers[TIMESTAMP_HEADER]) - time.time()) < 60
    assert req.headers["Content-Type"] == "application/json"
    assert Alert.from_dict(json.loads(req.body)) == a


def test_500_twice_then_200_is_retried_with_the_same_key(tmp_path, receiver):
    hook = receiver([500, 500])
    a = alert()
    with dispatcher(tmp_path, hook.url) as d:
        d.submit(a)
        assert d.wait_idle(10)
        assert d.outbox.state(a.key, "hook") == DELIVERED and d.outbox.attempts(a.key, "hook") == 2
    assert hook.keys() == [a.key] * 3
    assert all(r.signed for r in hook.requests) and len({r.body for r in hook.requests}) == 1


def test_400_is_dead_lettered_at_once(tmp_path, receiver):
    hook = receiver([400])
    a, b = alert(15), alert(16)
    with dispatcher(tmp_path, hook.url) as d:
        d.submit(a)
        d.submit(b)
        assert d.wait_idle(10)
        assert d.outbox.state(a.key, "hook") == DEAD and d.outbox.state(b.key, "hook") == DELIVERED
    assert hook.keys() == [a.key, b.key]  # no retry of the rejected one; the next went on
    [line] = [json.loads(s) for s in (tmp_path / "dead-letters.jsonl").read_text().splitlines()]
    assert line["key"] == a.key and line["sink"] == "hook" and line["attempts"] == 1
    assert line["reason"].startswith("rejected: HTTP 400") and line["alert"]["kind"] == "new"


def test_unreachable_receiver_holds_the_sink_then_delivers_in_order(tmp_path, receiver):
    port = free_port()  # nothing listens here yet: connection refused
    a, b = alert(15), alert(16)
    policy = replace(FAST, max_attempts=100)
    with Dispatcher(tmp_path, [WebhookConfig("hook", f"http://127.0.0.1:{port}/hook", SECRET, timeout_s=2.0)],
                    policy, idle_poll_s=0.05) as d:
        d.submit(a)
        d.submit(b)
        wait_until(lambda: d.outbox.attempts(a.key, "hook") >= 2, what="two refused attempts")
        assert d.outbox.attempts(b.key, "hook") == 0  # the sink is held: b's attempts are not burnt
        hook = receiver(port=port)
        assert d.wait_idle(10)
    assert hook.keys() == [a.key, b.key]


def test_restart_delivers_what_was_pending_and_not_what_was_delivered(tmp_path, receiver):
    hook = receiver()
    first, second, third = alert(15), alert(16), alert(17)
    with dispatcher(tmp_path, hook.url) as d:
        d.submit(first)
        assert d.wait_idle(10)
    d = dispatcher(tmp_path, hook.url)  # never started: the process died with these on disk
    d.submit(second)
    d.close()
    with Outbox(tmp_path, ["hook"]) as box:  # or put there by another process
        box.put(third)
    assert hook.keys() == [first.key]
    with dispatcher(tmp_path, hook.url) as again:
        assert again.wait_idle(10)
    assert hook.keys() == [first.key, second.key, third.key]


def test_housekeeping_gives_the_space_of_delivered_alerts_back_to_the_disk(tmp_path, receiver):
    """Alerts with thumbnails delivered to a real receiver: the outbox on disk grows with them; once they are past
    `keep_done_s` the dispatcher's own housekeeping prunes them and shrinks the file (and its WAL) again."""
    hook = receiver()
    alerts = [Alert(watch="door", rule="person", kind="new", confidence=0.8, thumbnail=os.urandom(6000),
                    start=f"2026-12-04T{10 + minute // 60:02d}:{minute % 60:02d}:00+00:00") for minute in range(200)]
    with dispatcher(tmp_path, hook.url, keep_done_s=1.0, housekeeping_s=0.2) as d:
        for a in alerts:
            assert d.submit(a)
        assert d.wait_idle(30)
        grown = d.outbox.disk_bytes()
        assert grown > 200 * 6000  # the thumbnails are in it
        wait_until(lambda: d.outbox.alerts() == [] and d.outbox.disk_bytes() < grown / 8, 10,
                   "every alert pruned and the outbox shrunk")
        assert d.outbox.counts()["delivered"] == 0
        assert (tmp_path / "outbox.sqlite3-wal").stat().st_size < 64 * 1024  # truncated (a new commit or two since)
    assert sorted(hook.keys()) == sorted(a.key for a in alerts)
