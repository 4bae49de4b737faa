"""Reconnects: the broker drops every connection; publisher and consumer carry on by themselves.

Runs against a private RabbitMQ node so that closing all its connections disturbs nothing else.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from pika.adapters.blocking_connection import BlockingChannel

from distill_swarm.local_broker import LocalBroker
from shared.broker import Consumer, Delivery, Publisher
from shared.config import BrokerConfig
from shared.messages import Embedding, Lesson, decode, encode
from shared.topology import Topology
from tests.support.private_broker import require_rabbitmq_server, wait_for

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def private_broker() -> Iterator[LocalBroker]:
    require_rabbitmq_server()
    with LocalBroker() as broker:
        yield broker


def lesson(n: int) -> Lesson:
    return Lesson(
        lesson_id=f"l{n}", task="t", prompt="p", goal_text="g", master_model="m",
        master_answer="a", reference=Embedding(model="e", dim=2, values=[1.0, 0.0]),
        split="train",
    )  # fmt: skip


def test_consumer_and_publisher_survive_dropped_connections(private_broker: LocalBroker) -> None:
    config = BrokerConfig(url=private_broker.url, namespace="re", max_backoff_s=1.0)
    topology = Topology("re")
    handled: list[str] = []

    def handler(delivery: Delivery) -> None:
        message = decode(delivery.body, Lesson)
        handled.append(message.lesson_id)

    def declare(channel: BlockingChannel) -> None:
        topology.declare_all(channel, ("a",))

    publisher = Publisher(config, declare)
    stop = threading.Event()
    consumer = Consumer(config, topology, [topology.pupil_queue("a")], handler, declare=declare)
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(consumer.connected.is_set)
        publisher.publish(topology.lessons_exchange, "", encode(lesson(1)), "l1")
        wait_for(lambda: handled == ["l1"])

        result = private_broker.ctl("close_all_connections", "test: network blip")
        assert result.returncode == 0, result.stderr  # returns once they are closed

        # The publisher's connection is dead too: publish must reconnect and still confirm.
        publisher.publish(topology.lessons_exchange, "", encode(lesson(2)), "l2")
        wait_for(lambda: handled == ["l1", "l2"])
        assert consumer.connected.is_set()
    finally:
        stop.set()
        thread.join(timeout=10)
        publisher.close()
