"""How the consumer settles deliveries: fast handlers' acks go out together, in order.

The frames the broker would see are recorded by a stand-in channel; the real broker's view is
tested in tests/integration/test_wide_prefetch.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pika
import pytest

from shared import broker
from shared.broker import Consumer, Delivery
from shared.config import BrokerConfig
from shared.errors import DecodeError
from shared.topology import Topology


class RecordingChannel:
    """Records acks, nacks and publishes instead of sending them."""

    is_open = True

    def __init__(self) -> None:
        self.frames: list[tuple[Any, ...]] = []

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.frames.append(("ack", delivery_tag, multiple))

    def basic_nack(self, delivery_tag: int, requeue: bool = True) -> None:
        self.frames.append(("nack", delivery_tag, requeue))

    def basic_publish(self, exchange: str, routing_key: str, body: bytes, props: Any) -> None:
        self.frames.append(("dead-letter", body))


def consumer(handler: Callable[[Delivery], None] = lambda d: None) -> Consumer:
    made = Consumer(BrokerConfig(), Topology("t"), ["q"], handler, declare=lambda channel: None)
    made._channel = RecordingChannel()
    return made


def delivery(tag: int, body: bytes = b"{}", generation: int = 0) -> Delivery:
    return Delivery(
        queue="q",
        body=body,
        message_id=str(tag),
        headers={},
        redelivered=False,
        delivery_tag=tag,
        generation=generation,
        properties=pika.BasicProperties(),
    )


def frames(made: Consumer) -> list[tuple[Any, ...]]:
    return made._channel.frames  # type: ignore[union-attr]


def run_worker(made: Consumer, deliveries: list[Delivery]) -> list[list[int]]:
    """Queue ``deliveries`` up front, run the worker to the end; returns the tags per hand-over."""
    batches: list[list[int]] = []

    def schedule(callback: Any) -> None:
        batches.append([d.delivery_tag for d, _ in callback.args[0]])
        callback()

    made._schedule = schedule  # type: ignore[method-assign]
    for item in deliveries:
        made._work.put(item)
    made._work.put(None)
    made._work_loop()
    return batches


def test_a_run_of_acks_is_one_multiple_ack_and_other_outcomes_keep_their_place() -> None:
    made = consumer()
    outcomes = ["ack", "ack", "requeue", "ack", "dead", "ack", "ack"]
    made._settle_all(
        [(delivery(tag), (action, "why")) for tag, action in enumerate(outcomes, start=1)]
    )
    assert frames(made) == [
        ("ack", 2, True),  # 1 and 2
        ("nack", 3, True),
        ("ack", 4, True),
        ("dead-letter", b"{}"),
        ("ack", 5, False),  # the dead-lettered message, once its copy is confirmed
        ("ack", 7, True),  # 6 and 7
    ]


def test_deliveries_of_a_closed_channel_are_left_to_the_broker() -> None:
    made = consumer()
    made._generation = 1
    made._settle_all(
        [(delivery(9, generation=0), ("ack", "")), (delivery(1, generation=1), ("ack", ""))]
    )
    assert frames(made) == [("ack", 1, True)]


def test_fast_handlers_hand_over_their_acks_together_while_deliveries_wait() -> None:
    made = consumer()
    batches = run_worker(made, [delivery(tag) for tag in range(1, 151)])
    assert [tag for batch in batches for tag in batch] == list(range(1, 151))
    assert all(len(batch) <= broker.SETTLE_BATCH_MAX for batch in batches)
    assert len(batches) == -(-150 // broker.SETTLE_BATCH_MAX)
    assert frames(made) == [("ack", batch[-1], True) for batch in batches]


def test_a_slow_handler_hands_over_its_ack_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker, "SETTLE_BATCH_FAST_S", 0.001)
    made = consumer(lambda d: time.sleep(0.005))  # a pupil's lesson, in miniature
    batches = run_worker(made, [delivery(tag) for tag in range(1, 4)])
    assert batches == [[1], [2], [3]]


def test_a_refused_message_is_dead_lettered_between_the_acks_around_it() -> None:
    def handler(item: Delivery) -> None:
        if item.delivery_tag == 2:
            raise DecodeError("bad")

    made = consumer(handler)
    run_worker(made, [delivery(tag) for tag in (1, 2, 3)])
    assert frames(made) == [
        ("ack", 1, True),
        ("dead-letter", b"{}"),
        ("ack", 2, False),
        ("ack", 3, True),
    ]


def test_nothing_is_acked_before_the_batch_is_durable_and_a_failed_commit_requeues() -> None:
    events: list[str] = []
    made = Consumer(
        BrokerConfig(), Topology("t"), ["q"], lambda d: events.append(f"handled {d.delivery_tag}"),
        declare=lambda channel: None, before_settle=lambda: events.append("commit"),
    )  # fmt: skip
    made._channel = RecordingChannel()
    run_worker(made, [delivery(1), delivery(2), delivery(3)])
    assert events == ["handled 1", "handled 2", "handled 3", "commit"]
    assert frames(made) == [("ack", 3, True)]

    def disk_full() -> None:
        raise OSError("disk full")

    def refuse_empty(d: Delivery) -> None:
        if not d.body:
            raise DecodeError("empty body")

    failing = Consumer(
        BrokerConfig(), Topology("t"), ["q"], refuse_empty, declare=lambda channel: None,
        before_settle=disk_full,
    )  # fmt: skip
    failing._channel = RecordingChannel()
    run_worker(failing, [delivery(1), delivery(2, body=b"")])
    # The handled message goes back to the queue; the refused one is dead-lettered as before.
    assert frames(failing) == [("nack", 1, True), ("dead-letter", b""), ("ack", 2, False)]
