"""The consumer's requeue backoff against a real RabbitMQ: it starts afresh after every success.

Issue 11: the backoff iterator was made once per process, so after a few early requeues every
later one waited the cap (15-27 s measured) on the only worker. The delays themselves are not
timed here: ``backoff_delays`` is replaced by one that yields 0 s and records which step of which
run of requeues each delay was.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

import shared.broker.worker
from shared.broker import Consumer, Delivery, Publisher, Requeue
from shared.config import BrokerConfig
from shared.topology import Topology
from tests.support.private_broker import wait_for

pytestmark = pytest.mark.broker

NODE = "a"  # one of tests/conftest.py's TEST_NODE_IDS, so teardown deletes its queue


def test_requeue_backoff_starts_afresh_after_a_success(
    broker_config: BrokerConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[int] = []  # the step of its backoff run that each requeue's delay was

    def recorded_delays(max_backoff_s: float, base_s: float = 0.5) -> Iterator[float]:
        step = 0
        while True:
            steps.append(step)
            step += 1
            yield 0.0

    monkeypatch.setattr(shared.broker.worker, "backoff_delays", recorded_delays)
    # "first" fails twice before it succeeds, "second" (sent after "first" was acked) once.
    failures_left = {"first": 2, "second": 1}
    handled: Counter[str] = Counter()

    def handler(delivery: Delivery) -> None:
        name = delivery.body.decode()
        handled[name] += 1
        if failures_left[name] > 0:
            failures_left[name] -= 1
            raise Requeue(f"{name} cannot be done yet")

    topology = Topology(broker_config.namespace)
    declare = functools.partial(topology.declare_pupil, node_id=NODE)
    consumer = Consumer(broker_config, topology, [topology.pupil_queue(NODE)], handler, declare)
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    publisher = Publisher(broker_config, declare)
    try:
        publisher.publish(topology.lessons_exchange, "", b"first", "first")
        wait_for(lambda: handled["first"] == 3, 20)
        publisher.publish(topology.lessons_exchange, "", b"second", "second")
        wait_for(lambda: handled["second"] == 2, 20)
    finally:
        publisher.close()
        stop.set()
        thread.join(timeout=10)
    # Two requeues of "first" back off from the start; after its success, so does "second"'s.
    assert steps == [0, 1, 0]
