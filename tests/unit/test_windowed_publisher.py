"""The windowed publisher on the stub broker: what is marked done, and when.

The wire (nacks, lost connections) is tested on RabbitMQ in
tests/integration/test_windowed_publisher_on_broker.py; here, the bookkeeping around confirms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from shared.broker.stub import StubBroker
from shared.errors import PublishNotConfirmed
from shared.topology import Topology

TOPOLOGY = Topology("stub")


def declare_with_queue(channel: Any) -> None:
    TOPOLOGY.declare_all(channel, ("a",))


def recorder(done: list[int], n: int) -> Callable[[], None]:
    return lambda: done.append(n)


def test_nothing_is_marked_done_before_its_confirm() -> None:
    broker = StubBroker()
    publisher = broker.windowed_publisher(declare_with_queue, window=10)
    publisher.hold_confirms = True
    done: list[int] = []
    for n in range(5):
        publisher.publish(TOPOLOGY.lessons_exchange, "", b"{}", f"m{n}", recorder(done, n))
    assert done == []  # five sent, none confirmed: none marked
    assert publisher.unconfirmed == 5
    assert len(broker.queued(TOPOLOGY.pupil_queue("a"))) == 5
    publisher.hold_confirms = False
    publisher.flush()
    assert done == [0, 1, 2, 3, 4]  # each once, in publishing order
    assert publisher.unconfirmed == 0


def test_publish_waits_only_when_the_window_is_full() -> None:
    broker = StubBroker()
    publisher = broker.windowed_publisher(declare_with_queue, window=3)
    done: list[int] = []
    for n in range(7):
        publisher.publish(TOPOLOGY.lessons_exchange, "", b"{}", f"m{n}", recorder(done, n))
        assert publisher.unconfirmed <= 3
    publisher.flush()
    assert done == list(range(7))


def test_an_unroutable_message_raises_after_the_earlier_ones_are_marked() -> None:
    broker = StubBroker()
    publisher = broker.windowed_publisher(TOPOLOGY.declare_master, window=10)
    done: list[str] = []
    publisher.publish(TOPOLOGY.reports_exchange, "report", b"{}", "ok", lambda: done.append("ok"))
    publisher.publish(TOPOLOGY.lessons_exchange, "", b"{}", "lost", lambda: done.append("lost"))
    with pytest.raises(PublishNotConfirmed, match="no queue is bound"):
        publisher.flush()
    assert done == ["ok"]
