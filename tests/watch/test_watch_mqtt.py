"""MQTT delivery against a real Mosquitto broker (a subprocess per test) and a real paho subscriber: events at
QoS 1 counted after the PUBACK, the broker going away and coming back, restart of the outbox, and the retained
availability topic with its last will."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from watch_helpers import FAST, SECRET, wait_until

from vidmini.watch.alert import Alert
from vidmini.watch.dispatcher import Dispatcher
from vidmini.watch.mqtt import MqttConfig, MqttSink
from vidmini.watch.outbox import DELIVERED, PENDING
from vidmini.watch.webhook import WebhookConfig

REPO = Path(__file__).resolve().parents[2]
EVENTS, AVAILABILITY = "vidmini/door/events", "vidmini/door/availability"
DOWN_S = 20.0  # how long the broker stays away in the restart test (the issue: 20 s)


def alert(minute: int, kind: str = "new") -> Alert:
    return Alert(watch="door", rule="person", kind=kind, start=f"2026-12-04T10:{minute:02d}:00+00:00",
                 confidence=0.7, thumbnail=b"\xff\xd8", thumbnail_path=f"/thumbs/{minute}.jpg")


def mqtt(port: int, **kw) -> MqttConfig:
    return MqttConfig(name="mqtt", port=port, watches=("door",), reconnect_min_s=0.1, reconnect_max_s=0.5,
                      puback_timeout_s=5.0, **kw)


def event_keys(sub) -> list[str]:
    """Keys in the order they first arrived (at-least-once: a repeat is allowed, a gap is not)."""
    seen: list[str] = []
    for m in sub.on(EVENTS):
        if m.json()["key"] not in seen:
            seen.append(m.json()["key"])
    return seen


def has_events(n: int):
    return lambda msgs: len({m.payload for m in msgs if m.topic == EVENTS}) >= n


def test_event_published_at_qos1_and_counted_after_puback(tmp_path, broker, subscribe):
    sub = subscribe(broker.port)
    a, b = alert(15), alert(15, "end")
    with Dispatcher(tmp_path, [mqtt(broker.port)], FAST, idle_poll_s=0.05) as d:
        d.submit(a)
        d.submit(b)
        assert d.wait_idle(10)
        assert d.outbox.state(a.key, "mqtt") == DELIVERED == d.outbox.state(b.key, "mqtt")
    sub.wait_for(has_events(2), what="two events")
    first, second = [m.json() for m in sub.on(EVENTS)]
    assert (first["kind"], first["key"]) == ("new", "door:person:1796379300000:new")
    assert (second["kind"], second["key"]) == ("end", b.key)
    assert first["thumbnail_path"] == "/thumbs/15.jpg" and "thumbnail_b64" not in first
    assert Alert.from_dict(first) == Alert.from_dict({**a.to_dict(), "thumbnail_b64": None})


def test_alerts_wait_out_a_broker_restart_and_the_webhook_goes_on(tmp_path, make_broker, subscribe, receiver):
    broker = make_broker(persistence=True)  # keeps the durable subscriber's session across the restart
    sub = subscribe(broker.port, durable=True)
    hook = receiver()
    before, during = alert(10), [alert(11), alert(11, "end"), alert(12)]
    with Dispatcher(tmp_path, [mqtt(broker.port), WebhookConfig("hook", hook.url, SECRET, timeout_s=2.0)],
                    FAST, idle_poll_s=0.05) as d:
        mqtt_sink = d.sinks[0]
        d.submit(before)
        assert d.wait_idle(10)
        broker.stop()
        stopped = time.monotonic()
        wait_until(lambda: not mqtt_sink.ready(), what="the sink to see the broker gone")
        for a in during:
            d.submit(a)
        wait_until(lambda: all(d.outbox.state(a.key, "hook") == DELIVERED for a in during),
                   what="the webhook, which does not wait for the broker")
        time.sleep(max(0.0, DOWN_S - (time.monotonic() - stopped)))  # the outage itself, not a wait for a result
        assert all(d.outbox.state(a.key, "mqtt") == PENDING for a in during)
        assert all(d.outbox.attempts(a.key, "mqtt") == 0 for a in during)  # no attempt used while away
        broker.start()
        assert d.wait_idle(15)
        assert all(d.outbox.state(a.key, "mqtt") == DELIVERED for a in during)
    sub.wait_for(lambda _: len(event_keys(sub)) >= 4, what="the events held during the outage")
    keys = event_keys(sub)
    assert sorted(keys) == sorted(a.key for a in [before, *during])
    assert keys.index(during[0].key) < keys.index(during[1].key)  # an event's new before its end


def test_restarted_outbox_delivers_the_pending_not_the_delivered(tmp_path, broker, subscribe, receiver):
    sub = subscribe(broker.port)
    hook = receiver()
    sinks = [mqtt(broker.port), WebhookConfig("hook", hook.url, SECRET, timeout_s=2.0)]
    done, left = alert(20), alert(21)
    with Dispatcher(tmp_path, sinks, FAST, idle_poll_s=0.05) as d:
        d.submit(done)
        assert d.wait_idle(10)
    crashed = Dispatcher(tmp_path, sinks, FAST, idle_poll_s=0.05)  # on disk, never sent: the process died
    crashed.submit(left)
    crashed.close()
    with Dispatcher(tmp_path, sinks, FAST, idle_poll_s=0.05) as again:
        assert again.wait_idle(10)
    sub.wait_for(has_events(2), what="the pending event")
    assert [m.json()["key"] for m in sub.on(EVENTS)] == [done.key, left.key]
    assert hook.keys() == [done.key, left.key]


def test_availability_is_retained_online_then_offline_on_close(broker, subscribe):
    sink = MqttSink(mqtt(broker.port))
    try:
        wait_until(sink.ready, what="the sink to connect")
        late = subscribe(broker.port, AVAILABILITY)  # joins after the fact: gets the retained value
        late.wait_for(lambda msgs: any(m.payload == b"online" for m in msgs), what="retained online")
        assert late.on(AVAILABILITY)[0].retain
    finally:
        sink.close()
    after = subscribe(broker.port, AVAILABILITY)
    after.wait_for(lambda msgs: bool(msgs), what="retained availability")
    assert [(m.payload, m.retain) for m in after.on(AVAILABILITY)] == [(b"offline", True)]


PUBLISHER = """
import sys, time
from vidmini.watch.mqtt import MqttConfig, MqttSink
sink = MqttSink(MqttConfig(port=int(sys.argv[1]), watches=("door",), keepalive_s=60))
while not sink.ready():
    time.sleep(0.01)
print("connected", flush=True)
time.sleep(600)
"""


def test_last_will_says_offline_when_the_publisher_is_killed(broker, subscribe):
    sub = subscribe(broker.port, AVAILABILITY)
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(broker.port)], cwd=REPO, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == b"connected"
        sub.wait_for(lambda msgs: [m.payload for m in msgs] == [b"online"], what="online")
        os.kill(proc.pid, signal.SIGKILL)  # no clean disconnect: only the broker's last will can tell
        proc.wait(10)
        # the will comes when the broker sees the socket close, long before the 60 s keepalive would expire
        sub.wait_for(lambda msgs: [m.payload for m in msgs] == [b"online", b"offline"], timeout=10, what="the will")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    late = subscribe(broker.port, AVAILABILITY)
    late.wait_for(lambda msgs: bool(msgs), what="retained availability")
    assert [(m.payload, m.retain) for m in late.on(AVAILABILITY)] == [(b"offline", True)]
