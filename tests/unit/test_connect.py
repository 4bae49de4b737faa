"""How `connect()` retries: bounded when a service starts, until stopped once it was connected.

No broker needed: a port nobody listens on refuses connections the way a stopped broker does.
"""

from __future__ import annotations

import threading
import time

import pytest

from distill_swarm.local_broker import free_port
from shared.broker import connect
from shared.config import BrokerConfig
from shared.errors import ConnectionClosed


def unreachable(attempts: int = 2) -> BrokerConfig:
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    return BrokerConfig(url=url, connect_attempts=attempts, max_backoff_s=0.05)


def test_a_first_connection_gives_up_after_connect_attempts() -> None:
    with pytest.raises(ConnectionClosed, match="after 2 attempts"):
        connect(unreachable(attempts=2))


def test_a_reconnect_keeps_trying_past_connect_attempts_until_stopped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionClosed, match="stopped while connecting"):
            connect(unreachable(attempts=1), stop, until_stopped=True)
    finally:
        timer.cancel()
    assert time.monotonic() - started >= 0.9  # it did not give up after its one attempt
    retries = [r for r in caplog.records if "until stopped" in r.getMessage()]
    assert len(retries) > 1


def test_a_stop_set_before_connecting_returns_at_once() -> None:
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    with pytest.raises(ConnectionClosed, match="stopped"):
        connect(unreachable(), stop, until_stopped=True)
    assert time.monotonic() - started < 1.0
