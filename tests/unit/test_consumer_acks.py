"""How the consumer settles deliveries: fast handlers' acks go out together, in order.

The frames the broker would see are recorded by the stub broker's channel; the real broker's
view is tested in tests/integration/test_wide_prefetch.py.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import pika
import pytest

from shared.broker import Consumer, Delivery, Handler, Settlement, worker
from shared.broker.stub import StubChannel
from shared.broker.worker import Settled, Worker
from shared.config import BrokerConfig
from shared.errors import DecodeError, ReasonCode
from shared.topology import Topology

TOPOLOGY = Topology("t")


def consumer() -> tuple[Consumer, StubChannel]:
    made = Consumer(BrokerConfig(), TOPOLOGY, ["q"], lambda d: None, declare=lambda channel: None)
    channel = StubChannel()
    TOPOLOGY.declare_exchanges(channel)
    channel.queue_declare("q")
    made._channel = channel
    return made, channel


def deliver(channel: StubChannel, *bodies: bytes, generation: int = 0) -> list[Delivery]:
    """Put ``bodies`` on queue q and deliver them: delivery tags 1, 2, ... on a fresh channel."""
    for body in bodies:
        channel.basic_publish("", "q", body)
    return [
        Delivery("q", m.body, str(tag), {}, False, tag, generation, pika.BasicProperties())
        for tag, m in iter(lambda: channel.take("q"), None)
    ]


def settles(channel: StubChannel) -> list[tuple[Any, ...]]:
    """The frames after the deliveries' own, a dead-letter's republish as ("dead-letter", body)."""
    settling = [frame for frame in channel.frames if frame[:2] != ("publish", "")]
    return [("dead-letter", frame[3]) if frame[0] == "publish" else frame for frame in settling]


def run_worker(handler: Handler, bodies: list[bytes]) -> tuple[list[list[int]], StubChannel]:
    """Deliver ``bodies`` up front, run the worker to the end, send what it hands over.

    Returns the delivery tags of each hand-over, and the channel the settlements went out on.
    """
    made, channel = consumer()
    batches: list[list[int]] = []

    def hand_over(done: Settled) -> None:
        batches.append([d.delivery_tag for d, _ in done])
        made._settle_all(done)

    work: queue.Queue[Delivery | None] = queue.Queue()
    for item in deliver(channel, *bodies):
        work.put(item)
    work.put(None)
    Worker(handler, threading.Event(), 0.0).run(work, lambda d: True, hand_over)
    return batches, channel


def test_a_run_of_acks_is_one_multiple_ack_and_other_outcomes_keep_their_place() -> None:
    made, channel = consumer()
    why = ReasonCode.INVALID_MESSAGE
    outcomes = {
        "ack": Settlement.ack(),
        "requeue": Settlement.requeue(ReasonCode.RETRY_LATER, "why"),
        "dead": Settlement.dead_letter(why, "why"),
    }
    names = ["ack", "ack", "requeue", "ack", "dead", "ack", "ack"]
    delivered = deliver(channel, *[b"{}"] * len(names))
    made._settle_all([(d, outcomes[n]) for d, n in zip(delivered, names, strict=True)])
    assert settles(channel) == [
        ("ack", 2, True),  # 1 and 2
        ("nack", 3, True),
        ("ack", 4, True),
        ("dead-letter", b"{}"),
        ("ack", 5, False),  # the dead-lettered message, once its copy is confirmed
        ("ack", 7, True),  # 6 and 7
    ]


def test_deliveries_of_a_closed_channel_are_left_to_the_broker() -> None:
    made, channel = consumer()
    made._generation = 1
    made._settle_all(
        [
            (deliver(channel, b"old")[0], Settlement.ack()),
            (deliver(channel, b"new", generation=1)[0], Settlement.ack()),
        ]
    )
    assert settles(channel) == [("ack", 2, True)]  # "new" alone


def test_fast_handlers_hand_over_their_acks_together_while_deliveries_wait() -> None:
    batches, channel = run_worker(lambda d: None, [b"{}"] * 150)
    assert [tag for batch in batches for tag in batch] == list(range(1, 151))
    assert all(len(batch) <= worker.SETTLE_BATCH_MAX for batch in batches)
    assert len(batches) == -(-150 // worker.SETTLE_BATCH_MAX)
    assert settles(channel) == [("ack", batch[-1], True) for batch in batches]


def test_a_slow_handler_hands_over_its_ack_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "SETTLE_BATCH_FAST_S", 0.001)
    # A pupil's lesson, in miniature.
    batches, _ = run_worker(lambda d: time.sleep(0.005), [b"{}"] * 3)
    assert batches == [[1], [2], [3]]


def test_a_refused_message_is_dead_lettered_between_the_acks_around_it() -> None:
    def handler(item: Delivery) -> None:
        if item.delivery_tag == 2:
            raise DecodeError("bad")

    _, channel = run_worker(handler, [b"{}"] * 3)
    assert settles(channel) == [
        ("ack", 1, True),
        ("dead-letter", b"{}"),
        ("ack", 2, False),
        ("ack", 3, True),
    ]


class Writes:
    """Pending writes that record their commits, or fail them."""

    def __init__(self, events: list[str], fail: bool = False) -> None:
        self.events = events
        self.fail = fail

    def commit(self) -> None:
        if self.fail:
            raise OSError("disk full")
        self.events.append("commit")


def test_nothing_is_acked_before_the_batch_is_durable_and_a_failed_commit_requeues() -> None:
    events: list[str] = []
    writes = Writes(events)

    def handle(d: Delivery) -> Settlement:
        events.append(f"handled {d.delivery_tag}")
        return Settlement.ack(pending=writes)

    _, channel = run_worker(handle, [b"{}"] * 3)
    assert events == ["handled 1", "handled 2", "handled 3", "commit"]  # one commit for three
    assert settles(channel) == [("ack", 3, True)]

    def refuse_empty(d: Delivery) -> Settlement:
        if not d.body:
            raise DecodeError("empty body")
        return Settlement.ack(pending=Writes(events, fail=True))

    _, failing = run_worker(refuse_empty, [b"{}", b""])
    # The handled message goes back to the queue; the refused one is dead-lettered as before.
    assert settles(failing) == [("nack", 1, True), ("dead-letter", b""), ("ack", 2, False)]
