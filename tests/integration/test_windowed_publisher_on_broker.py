"""The windowed publisher and the master's lesson publishing over a real RabbitMQ.

What is tested is the issue's promise: with many confirms in flight, nothing is marked done
before its own confirm, and a nack or a lost connection loses nothing (the unconfirmed messages
go again). A private broker is used where the test blocks or drops every connection.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pika.adapters.blocking_connection import BlockingChannel

from bench.fast_backend import EchoGenerator, HashingEmbedder
from distill_swarm.local_broker import LocalBroker
from master.prompts import PromptItem
from master.service import MasterService
from master.store import Store
from master.teacher import lesson_id_for
from shared.backends import GenerationParams
from shared.broker import WindowedPublisher, connect
from shared.config import BrokerConfig, MasterConfig, Settings
from shared.topology import Topology
from tests.support.private_broker import require_rabbitmq_server, wait_for

pytestmark = pytest.mark.broker


def drain_ids(config: BrokerConfig, queue: str) -> list[str]:
    """Every message id waiting in ``queue``, oldest first (taken off the queue)."""
    connection = connect(config)
    try:
        channel = connection.channel()
        ids: list[str] = []
        while True:
            method, props, _ = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return ids
            ids.append(props.message_id)
    finally:
        connection.close()


def recorder(done: list[int], n: int) -> Callable[[], None]:
    return lambda: done.append(n)


def test_many_in_flight_each_marked_once_in_order(broker_config: BrokerConfig) -> None:
    topology = Topology(broker_config.namespace)

    def declare(channel: BlockingChannel) -> None:
        topology.declare_all(channel, ("a",))

    publisher = WindowedPublisher(broker_config, declare, window=50)
    done: list[int] = []
    try:
        for n in range(400):
            publisher.publish(topology.lessons_exchange, "", b"{}", f"m{n}", recorder(done, n))
        publisher.flush()
    finally:
        publisher.close()
    assert done == list(range(400))
    assert drain_ids(broker_config, topology.pupil_queue("a")) == [f"m{n}" for n in range(400)]


def test_nacked_messages_go_again_and_none_is_lost(broker_config: BrokerConfig) -> None:
    topology = Topology(broker_config.namespace)
    queue = topology.pupil_queue("a")

    def declare(channel: BlockingChannel) -> None:
        topology.declare_exchanges(channel)
        # Full at 3 messages, and then the broker nacks every publish instead of dropping one.
        arguments = {"x-max-length": 3, "x-overflow": "reject-publish"}
        channel.queue_declare(queue, durable=True, arguments=arguments)
        channel.queue_bind(queue, topology.lessons_exchange)

    received: list[str] = []
    stop = threading.Event()

    def consume() -> None:  # slowly makes room, as a pupil would
        connection = connect(broker_config)
        channel = connection.channel()
        while not stop.is_set():
            try:
                method, props, _ = channel.basic_get(queue, auto_ack=True)
            except Exception:
                time.sleep(0.05)  # the queue is not declared yet
                channel = connection.channel()
                continue
            if method is None:
                time.sleep(0.02)
            else:
                received.append(props.message_id)
                time.sleep(0.01)
        connection.close()

    consumer = threading.Thread(target=consume, daemon=True)
    publisher = WindowedPublisher(broker_config, declare, window=10)
    done: list[int] = []
    try:
        consumer.start()
        for n in range(30):
            publisher.publish(topology.lessons_exchange, "", b"{}", f"m{n}", recorder(done, n))
        publisher.flush()
        wait_for(lambda: len(set(received)) == 30, 30)
    finally:
        stop.set()
        consumer.join(timeout=10)
        publisher.close()
    assert publisher.republished > 0, "the queue never refused a message: nothing was tested"
    assert sorted(done) == list(range(30))
    assert len(done) == 30  # each marked once
    assert set(received) == {f"m{n}" for n in range(30)}


@pytest.fixture(scope="module")
def private_broker() -> Iterator[LocalBroker]:
    require_rabbitmq_server()
    with LocalBroker() as broker:
        yield broker


def test_a_lost_connection_loses_no_lesson_and_marks_none_early(
    private_broker: LocalBroker, tmp_path: Path
) -> None:
    namespace = "win"
    config = BrokerConfig(url=private_broker.url, namespace=namespace, max_backoff_s=1.0)
    topology = Topology(namespace)
    connection = connect(config)
    topology.declare_all(connection.channel(), ("a",))  # a pupil's queue: lessons are routable
    connection.close()
    settings = Settings(
        broker=config,
        master=MasterConfig(store=tmp_path / "m.sqlite3", metrics_port=0, ceiling=False),
    )
    items = [
        PromptItem(id=f"p{n}", goal_text=f"Explain topic {n}", split="train") for n in range(20)
    ]
    store = Store(settings.master.store)
    master = MasterService(settings, EchoGenerator(), HashingEmbedder(16), store, items)
    # A memory alarm: the broker stops reading from publishers, so no confirm can come back.
    assert private_broker.ctl("set_vm_memory_high_watermark", "0").returncode == 0
    thread = threading.Thread(target=master.publish_lessons, daemon=True)
    try:
        thread.start()
        wait_for(lambda: _saved(store) == 20, 30)  # every lesson made, stored and sent
        time.sleep(0.5)
        assert store.published_lesson_ids() == []  # ... and none marked: no confirm yet
        result = private_broker.ctl("close_all_connections", "test: lost connection")
        assert result.returncode == 0, result.stderr
    finally:
        private_broker.ctl("set_vm_memory_high_watermark", "0.4")
    thread.join(timeout=60)
    assert master.publishing_done.is_set() and not thread.is_alive()
    expected = [master.teacher.lesson_id(item) for item in items]
    assert store.published_lesson_ids() == expected
    got = drain_ids(config, topology.pupil_queue("a"))
    assert set(got) == set(expected)  # none lost (a lesson sent twice is deduped by the pupil)


def _saved(store: Store) -> int:
    return int(store.connection().execute("SELECT COUNT(*) FROM lessons").fetchone()[0])


class _Jittery(EchoGenerator):
    """Answers after a delay that varies by prompt (later prompts often first), counting how
    many answers are in flight at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = self.most = 0

    def generate(self, prompt: str, params: GenerationParams, system: str | None = None) -> str:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.01 * (zlib.crc32(prompt.encode()) % 7))
        with self._lock:
            self.now -= 1
        return super().generate(prompt, params, system)


def test_parallel_answers_keep_lesson_ids_and_prompt_order_on_the_wire(
    broker_config: BrokerConfig, tmp_path: Path
) -> None:
    topology = Topology(broker_config.namespace)
    connection = connect(broker_config)
    topology.declare_all(connection.channel(), ("a",))
    connection.close()
    items = [PromptItem(id=f"p{n}", goal_text=f"Explain topic {n}") for n in range(24)]
    master_config = MasterConfig(
        store=tmp_path / "m.sqlite3", metrics_port=0, ceiling=False, generate_in_flight=4
    )
    settings = Settings(broker=broker_config, master=master_config)
    generator = _Jittery()
    store = Store(master_config.store)
    master = MasterService(settings, generator, HashingEmbedder(16), store, items)
    master.publish_lessons()
    # The ids a one-at-a-time master gives these prompts, in prompt order, on the wire too.
    expected = [
        lesson_id_for(item, generator.model_name, master.teacher.render(item)) for item in items
    ]
    assert drain_ids(broker_config, topology.pupil_queue("a")) == expected
    assert store.published_lesson_ids() == expected == master.lesson_ids
    assert generator.most == 4
