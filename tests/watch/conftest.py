"""Fixtures for the watch delivery tests (the parts themselves are in watch_helpers.py); each cleans up what it
started: brokers stopped, subscribers disconnected, receivers shut."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from watch_helpers import Broker, Receiver, Subscriber, free_port, mosquitto_binary


@pytest.fixture(scope="module")
def demo_engine():
    """The shipped demo model, loaded once per module (whatever $VIDMINI_MODEL says)."""
    from vidmini.engine.load import SHIPPED_MODEL_DIR, choose_model, open_engine

    if not (SHIPPED_MODEL_DIR / "config.json").exists():
        pytest.skip("no shipped demo model")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("VIDMINI_MODEL", raising=False)
        return open_engine(choose_model(None))


@pytest.fixture
def make_broker(tmp_path) -> Iterator[Callable[..., Broker]]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed (make sysdeps installs it)")
    brokers: list[Broker] = []

    def make(persistence: bool = False) -> Broker:
        folder = tmp_path / f"broker{len(brokers)}"
        folder.mkdir()
        broker = Broker(binary, folder, free_port(), persistence)
        broker.start()
        brokers.append(broker)
        return broker

    yield make
    for b in brokers:
        b.stop()


@pytest.fixture
def broker(make_broker) -> Broker:
    return make_broker()


@pytest.fixture
def subscribe() -> Iterator[Callable[..., Subscriber]]:
    subs: list[Subscriber] = []

    def make(port: int, topic: str = "vidmini/#", durable: bool = False) -> Subscriber:
        subs.append(Subscriber(port, topic, durable))
        return subs[-1]

    yield make
    for s in subs:
        s.close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(statuses: list[int] | None = None, port: int = 0) -> Receiver:
        made.append(Receiver(statuses, port=port))
        return made[-1]

    yield make
    for r in made:
        r.close()
