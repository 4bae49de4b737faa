"""A consumer with a wide prefetch window against a real RabbitMQ: every message settled once.

Fast handlers' acks go out as multiple-acks (shared/broker/worker.py); this checks that, with a
refused and a requeued message among hundreds, nothing is acked that was not handled, nothing is
left unacked, and the refused one is dead-lettered with its reason.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from shared.broker import Consumer, Delivery, Publisher, Requeue, connect
from shared.config import BrokerConfig
from shared.errors import DecodeError
from shared.topology import REASON_HEADER, Topology
from tests.support.private_broker import wait_for

pytestmark = pytest.mark.broker

MESSAGES = 300


def test_every_message_is_settled_once_with_a_wide_prefetch(broker_config: BrokerConfig) -> None:
    config = broker_config.model_copy(update={"prefetch": 50})
    topology = Topology(config.namespace)
    handled: Counter[str] = Counter()
    lock = threading.Lock()

    def handler(delivery: Delivery) -> None:
        message_id = str(delivery.message_id)
        with lock:
            handled[message_id] += 1
            attempt = handled[message_id]
        if message_id == "m17":
            raise DecodeError("m17 is refused")
        if message_id == "m42" and attempt == 1:
            raise Requeue("m42 is not ready yet")

    publisher = Publisher(config, lambda ch: topology.declare_all(ch, ("a",)))
    for index in range(MESSAGES):
        publisher.publish(topology.lessons_exchange, "", b"{}", f"m{index}")
    publisher.close()

    consumer = Consumer(
        config,
        topology,
        [topology.pupil_queue("a")],
        handler,
        declare=lambda ch: topology.declare_pupil(ch, "a"),
    )
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(handled) == MESSAGES and handled["m42"] == 2, 60.0)
    finally:
        stop.set()
        thread.join(timeout=20)

    assert set(handled) == {f"m{index}" for index in range(MESSAGES)}
    assert {k: v for k, v in handled.items() if v != 1} == {"m42": 2}
    connection = connect(config)
    try:
        channel = connection.channel()
        # The consumer is gone: anything it had not acked would be back in the queue by now.
        left = channel.queue_declare(topology.pupil_queue("a"), passive=True).method
        assert left.message_count == 0
        method, props, _body = channel.basic_get(topology.dead_queue, auto_ack=True)
        assert method is not None and props.message_id == "m17"
        assert "m17 is refused" in str(props.headers[REASON_HEADER])
        assert channel.basic_get(topology.dead_queue, auto_ack=True)[0] is None
    finally:
        connection.close()
