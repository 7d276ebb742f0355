"""Live watches' alert delivery: a durable outbox on disk, drained by a dispatcher to webhooks and MQTT.

Delivery is at-least-once: an alert is on disk before `put` returns, and a sink's copy is done only once the
receiver acknowledged it (a 2xx, an MQTT PUBACK). Receivers drop repeats by the alert's idempotency key.
Nothing here knows the model; the watch that finds events hands `Alert`s to a `Dispatcher`.
"""
