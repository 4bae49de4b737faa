"""The broker layer against a real RabbitMQ: topology, confirms, dead-lettering, reconnects."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import pytest

from shared.broker import Consumer, Delivery, Handler, Publisher, connect
from shared.config import BrokerConfig
from shared.errors import PublishNotConfirmed
from shared.messages import Embedding, Lesson, decode, encode
from shared.topology import ORIGIN_QUEUE_HEADER, REASON_HEADER, Topology
from tests.support.private_broker import wait_for

pytestmark = pytest.mark.broker


def lesson(n: int) -> Lesson:
    return Lesson(
        lesson_id=f"l{n}",
        task="t",
        prompt="p",
        goal_text="g",
        master_model="m",
        master_answer="a",
        reference=Embedding(model="e", dim=2, values=[1.0, 0.0]),
        split="train",
    )


def get_all(config: BrokerConfig, queue: str) -> list[tuple[bytes, dict[str, object]]]:
    """Drain a queue with basic_get (acking), returning bodies and headers."""
    connection = connect(config)
    out: list[tuple[bytes, dict[str, object]]] = []
    try:
        channel = connection.channel()
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((body, dict(props.headers or {})))
    finally:
        connection.close()


def drain_until(
    config: BrokerConfig, queue: str, count: int, timeout_s: float = 20.0
) -> list[tuple[bytes, dict[str, object]]]:
    """Collect messages from a queue until ``count`` have arrived."""
    got: list[tuple[bytes, dict[str, object]]] = []

    def enough() -> bool:
        got.extend(get_all(config, queue))
        return len(got) >= count

    wait_for(enough, timeout_s)
    return got


@contextlib.contextmanager
def consuming(config: BrokerConfig, node_id: str, handler: Handler) -> Iterator[Consumer]:
    """Run a Consumer on one pupil's queue in a thread for the duration of the block."""
    topology = Topology(config.namespace)
    consumer = Consumer(
        config, topology, [topology.pupil_queue(node_id)], handler,
        declare=functools.partial(topology.declare_pupil, node_id=node_id),
    )  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield consumer
    finally:
        stop.set()
        thread.join(timeout=10)


def test_declaring_the_topology_twice_is_harmless(broker_config: BrokerConfig) -> None:
    topology = Topology(broker_config.namespace)
    connection = connect(broker_config)
    try:
        channel = connection.channel()
        topology.declare_all(channel, ("a",))
        topology.declare_all(channel, ("a",))  # same arguments: a no-op, no channel error
        assert channel.is_open
        ok = channel.queue_declare(topology.reports_queue, passive=True)
        assert ok.method.queue == topology.reports_queue
    finally:
        connection.close()


def test_lessons_fan_out_to_every_pupil_queue(broker_config: BrokerConfig) -> None:
    topology = Topology(broker_config.namespace)
    publisher = Publisher(broker_config, lambda ch: topology.declare_all(ch, ("a", "b")))
    sent = lesson(1)
    publisher.publish(topology.lessons_exchange, "", encode(sent), "l1")
    publisher.close()
    for node in ("a", "b"):
        ((body, _),) = get_all(broker_config, topology.pupil_queue(node))
        assert decode(body, Lesson) == sent


def test_unroutable_publish_is_an_error_not_a_silent_loss(broker_config: BrokerConfig) -> None:
    topology = Topology(broker_config.namespace)
    publisher = Publisher(broker_config, topology.declare_exchanges)
    with pytest.raises(PublishNotConfirmed, match="no queue is bound"):
        publisher.publish(topology.jobs_exchange, "nobody-does-this", b"{}", "x")
    publisher.close()


def test_poison_message_is_dead_lettered_with_reason_and_consuming_goes_on(
    broker_config: BrokerConfig,
) -> None:
    topology = Topology(broker_config.namespace)
    queue = topology.pupil_queue("a")
    handled: list[str] = []

    def handler(delivery: Delivery) -> None:
        message = decode(delivery.body, Lesson)
        handled.append(message.lesson_id)

    publisher = Publisher(broker_config, lambda ch: topology.declare_all(ch, ("a",)))
    publisher.publish(topology.lessons_exchange, "", encode(lesson(1)), "l1")
    publisher.publish(topology.lessons_exchange, "", b'{"kind": "lesson", "oops": 1}', "bad")
    publisher.publish(topology.lessons_exchange, "", b"\x00 not json", "worse")
    publisher.publish(topology.lessons_exchange, "", encode(lesson(2)), "l2")
    publisher.close()

    with consuming(broker_config, "a", handler):
        wait_for(lambda: len(handled) == 2, 20.0)
        dead = drain_until(broker_config, topology.dead_queue, 2)
    assert handled == ["l1", "l2"]
    reasons = {body: headers[REASON_HEADER] for body, headers in dead}
    assert "invalid message" in str(reasons[b'{"kind": "lesson", "oops": 1}'])
    assert "not valid JSON" in str(reasons[b"\x00 not json"])
    assert all(h[ORIGIN_QUEUE_HEADER] == queue for _, h in dead)
    # Nothing is left unacked or requeued on the pupil's queue.
    assert get_all(broker_config, queue) == []


def test_a_handler_crash_is_retried_once_then_dead_lettered(broker_config: BrokerConfig) -> None:
    topology = Topology(broker_config.namespace)
    attempts: list[bool] = []

    def handler(delivery: Delivery) -> None:
        attempts.append(delivery.redelivered)
        raise RuntimeError("bug in the handler")

    publisher = Publisher(broker_config, lambda ch: topology.declare_all(ch, ("a",)))
    publisher.publish(topology.lessons_exchange, "", encode(lesson(1)), "l1")
    publisher.close()
    with consuming(broker_config, "a", handler):
        dead = drain_until(broker_config, topology.dead_queue, 1)
    assert attempts == [False, True]
    assert "RuntimeError: bug in the handler" in str(dead[0][1][REASON_HEADER])
