"""Alerts to an MQTT broker (paho-mqtt): `vidmini/<watch>/events` carries each alert as JSON at QoS 1, and the
retained `vidmini/<watch>/availability` says "online" while the watch's publisher is connected, "offline" after
it closes or dies (the broker sends the last will for a connection that drops without a clean disconnect).

A last will belongs to one connection, so each watch gets its own client. A delivery counts only once the broker
acknowledged it (PUBACK); while the broker is away the sink is not `ready()`, alerts stay pending in the outbox
(no attempts used), paho reconnects with backoff, and the dispatcher is woken on the CONNACK.
A publish cut off before its PUBACK may reach subscribers twice (paho re-sends it on reconnect, the outbox too):
subscribers drop repeats by the alert's `key`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import paho.mqtt.client as paho

from vidmini.watch.alert import Alert
from vidmini.watch.sink import RetryableError, Sink, SinkUnavailable

log = logging.getLogger(__name__)
ONLINE, OFFLINE = "online", "offline"


@dataclass(frozen=True)
class MqttConfig:
    """One broker. `watches` are announced "online" as soon as the sink starts; a watch not listed gets its
    client (and its availability) with its first alert."""

    name: str = "mqtt"
    host: str = "127.0.0.1"
    port: int = 1883
    watches: tuple[str, ...] = ()
    topic_prefix: str = "vidmini"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False  # the system's CA certificates
    keepalive_s: int = 30  # the broker sends the last will after 1.5× this without a word from a dead client
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    puback_timeout_s: float = 10.0
    include_thumbnail: bool = False  # events carry thumbnail_path; the bytes only when asked

    def events_topic(self, watch: str) -> str:
        return f"{self.topic_prefix}/{watch}/events"

    def availability_topic(self, watch: str) -> str:
        return f"{self.topic_prefix}/{watch}/availability"


def encode(alert: Alert, include_thumbnail: bool = False) -> bytes:
    return json.dumps(alert.to_dict(thumbnail=include_thumbnail), sort_keys=True, separators=(",", ":")).encode()


class MqttSink(Sink):
    def __init__(self, config: MqttConfig):
        super().__init__(config.name)
        self.config = config
        self._clients: dict[str, paho.Client] = {}
        self._lock = threading.Lock()
        self._closed = False
        for watch in config.watches:
            self._client(watch)

    def _client(self, watch: str) -> paho.Client:
        """The watch's connected-or-connecting client; the first call starts it (its network thread reconnects)."""
        with self._lock:
            if self._closed:
                raise SinkUnavailable(f"MQTT sink {self.name!r} is closed")
            if watch in self._clients:
                return self._clients[watch]
            c = self.config
            client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"vidmini-{watch}-{uuid.uuid4().hex[:8]}",
                                 clean_session=True, protocol=paho.MQTTv311)
            client.will_set(c.availability_topic(watch), OFFLINE, qos=1, retain=True)
            if c.username is not None:
                client.username_pw_set(c.username, c.password)
            if c.tls:
                client.tls_set()
            client.reconnect_delay_set(c.reconnect_min_s, c.reconnect_max_s)
            client.on_connect = lambda cl, _u, _f, rc, _p, w=watch: self._on_connect(cl, w, rc)
            client.on_disconnect = lambda _cl, _u, _f, rc, _p, w=watch: log.info(
                "MQTT %s:%d: watch %s disconnected (%s)", c.host, c.port, w, rc)
            client.connect_async(c.host, c.port, keepalive=c.keepalive_s)
            client.loop_start()
            self._clients[watch] = client
            return client

    def _on_connect(self, client: paho.Client, watch: str, rc: paho.ReasonCode) -> None:
        if rc.is_failure:
            log.warning("MQTT %s:%d refused watch %s: %s", self.config.host, self.config.port, watch, rc)
            return
        client.publish(self.config.availability_topic(watch), ONLINE, qos=1, retain=True)
        self.wake()

    def ready(self) -> bool:
        with self._lock:
            return all(c.is_connected() for c in self._clients.values())

    def deliver(self, alert: Alert) -> None:
        client = self._client(alert.watch)
        if not client.is_connected():
            raise SinkUnavailable(f"MQTT {self.config.host}:{self.config.port} not connected")
        info = client.publish(self.config.events_topic(alert.watch), encode(alert, self.config.include_thumbnail),
                              qos=1)
        if info.rc == paho.MQTT_ERR_NO_CONN:
            raise SinkUnavailable(f"MQTT {self.config.host}:{self.config.port} not connected")
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise RetryableError(f"MQTT publish failed: {paho.error_string(info.rc)}")
        deadline = time.monotonic() + self.config.puback_timeout_s
        while not info.is_published():
            if not client.is_connected():
                raise SinkUnavailable("MQTT connection lost before the PUBACK")
            if time.monotonic() > deadline:
                raise RetryableError(f"no PUBACK within {self.config.puback_timeout_s} s", sink_down=True)
            info.wait_for_publish(timeout=0.05)

    def close(self) -> None:
        """A clean goodbye per watch: the retained "offline" (a clean disconnect sends no last will)."""
        with self._lock:
            self._closed = True
            clients = list(self._clients.items())
        for watch, client in clients:
            try:
                if client.is_connected():
                    info = client.publish(self.config.availability_topic(watch), OFFLINE, qos=1, retain=True)
                    info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError) as e:
                log.warning("MQTT: could not say watch %s is offline: %s", watch, e)
            finally:
                client.disconnect()
                client.loop_stop()
