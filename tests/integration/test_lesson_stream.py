"""The lesson stream on a real RabbitMQ: late joiners, SIGKILL, retention, permissions, migration.

Each test has its own namespace (so its own stream, ``<ns>.lessons``). The pupils are the real
PupilService + PupilNode with the fast backends (bench/stream_swarm.py); the one that is
SIGKILLed runs in its own process. Permissions and the migration run on a private broker
(distill_swarm.local_broker), as tests/integration/test_access.py does.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions as pex
import pytest

from bench.stream_swarm import DIM, StreamSwarm, lesson, wait_until
from distill_swarm.local_broker import LocalBroker
from master.access import pupil_permissions
from master.status import format_table
from master.store import Store
from pupil_node.node import CHECKPOINT_NAME, Outcome
from shared.broker import Requeue, connect
from shared.broker.stream import stream_bounds
from shared.checkpoint import load_latest
from shared.config import BrokerConfig, LessonsConfig
from shared.errors import BrokerError
from shared.messages import encode
from shared.namespace import delete_namespace
from shared.topology import ORIGIN_QUEUE_HEADER, REASON_HEADER, Topology
from tests.support.private_broker import require_rabbitmq_server

pytestmark = pytest.mark.broker

# Tiny segments: retention drops whole segments, so a test sees it after a few dozen lessons.
SMALL = LessonsConfig(stream_segment_bytes=4_000, stream_max_bytes=12_000)


@pytest.fixture
def swarm(broker_config: BrokerConfig, tmp_path: Path) -> Iterator[StreamSwarm]:
    swarm = StreamSwarm(broker_config, tmp_path)
    swarm.declare()
    yield swarm
    swarm.close()


def done_ids(swarm: StreamSwarm, node_id: str) -> list[str]:
    return [lesson_id for lesson_id, _ in swarm.journal(node_id)]


def adapter_version(swarm: StreamSwarm, node_id: str) -> int:
    trainer = load_latest(swarm.state_dir(node_id) / CHECKPOINT_NAME, in_dim=DIM)
    assert trainer is not None
    return trainer.version


def test_a_new_node_learns_every_lesson_published_before_it_joined(
    swarm: StreamSwarm, caplog: pytest.LogCaptureFixture
) -> None:
    published = [lesson(i, "eval" if i % 5 == 4 else "train") for i in range(15)]
    swarm.publish(published)
    with caplog.at_level(logging.INFO, logger="pupil_node.service"):
        service = swarm.pupil("a", LessonsConfig(catch_up_log_every=5))
        wait_until(lambda: len(swarm.journal("a")) == 15, what="15 lessons journalled")
        wait_until(lambda: "caught up at offset" in caplog.text, what="the caught-up line")
    # The catch-up says so in the log, with its progress.
    assert "starting at the first retained lesson" in caplog.text
    assert caplog.text.count("lesson stream: catching up, at offset") >= 2
    journal = swarm.journal("a")
    # Every lesson, once, in publishing order, each with its stream offset.
    assert [i for i, _ in journal] == [x.lesson_id for x in published]
    offsets = [o for _, o in journal if o is not None]
    assert len(offsets) == 15 and offsets == sorted(set(offsets))
    info = service.info()
    assert info.stream_offset == offsets[-1] and info.stream_lost_first is None
    swarm.stop_pupils()
    # Trained on the 12 train lessons exactly once each; the 3 eval lessons never.
    assert adapter_version(swarm, "a") == 12


def test_a_node_killed_mid_catch_up_resumes_without_a_gap_or_a_repeat(
    swarm: StreamSwarm,
) -> None:
    published = [lesson(i) for i in range(40)]
    swarm.publish(published)
    proc = swarm.spawn("a", delay_s=0.05)
    wait_until(lambda: len(swarm.journal("a")) >= 12, what="a dozen lessons done")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    cut = len(swarm.journal("a"))
    assert 12 <= cut < 40, "the kill must land mid-catch-up"
    swarm.spawn("a")
    wait_until(lambda: len(swarm.journal("a")) == 40, what="all 40 lessons journalled")
    swarm.close()
    assert done_ids(swarm, "a") == [x.lesson_id for x in published]
    # Each lesson trained once: a repeat would have bumped the adapter's version past 40.
    assert adapter_version(swarm, "a") == 40
    log = (swarm.root / "a.log").read_text()
    assert "resuming at offset" in log


def test_a_node_behind_retention_is_told_which_lessons_it_lost(
    broker_config: BrokerConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    swarm = StreamSwarm(broker_config, tmp_path, lessons=SMALL)
    swarm.declare()
    try:
        swarm.publish([lesson(i) for i in range(3)])
        swarm.pupil("a")
        wait_until(lambda: len(swarm.journal("a")) == 3, what="the first 3 lessons")
        swarm.stop_pupils()
        last_done = swarm.journal("a")[-1][1]
        assert last_done is not None
        # The node is away while 60 more lessons go by: retention drops the oldest segments.
        swarm.publish([lesson(i) for i in range(3, 63)])
        bounds = stream_bounds(broker_config, swarm.topology.lessons_stream)
        assert bounds.first is not None and bounds.first > last_done + 1, bounds
        with caplog.at_level(logging.WARNING, logger="pupil_node.service"):
            service = swarm.pupil("a")
            wait_until(lambda: swarm.journal("a")[-1][0] == "lesson-00062", what="the head")
        info = service.info()
        # The lost range: from the node's next offset to just before the first retained one.
        assert (info.stream_lost_first, info.stream_lost_last) == (last_done + 1, bounds.first - 1)
        assert f"offsets {last_done + 1}-{bounds.first - 1}" in caplog.text
        assert service.metrics.registry.get_sample_value(
            "distill_swarm_lesson_stream_lost"
        ) == float(bounds.first - 1 - last_done)
        # Nothing it could still get was skipped: everything retained was learned, in order.
        ids = done_ids(swarm, "a")
        assert ids[:3] == [f"lesson-{i:05d}" for i in range(3)]
        retained = ids[3:]
        assert retained == sorted(retained) and retained[-1] == "lesson-00062"
        # `distill-swarm status` says so too (from the node's heartbeat).
        store = Store(tmp_path / "master.sqlite3")
        store.touch_node(info, "online")
        table = format_table(store.node_status())
        assert f"a lost lessons at stream offsets {last_done + 1}-{bounds.first - 1}" in table
    finally:
        swarm.close()
        delete_namespace(broker_config, ())


def test_status_shows_offset_and_lag(swarm: StreamSwarm, tmp_path: Path) -> None:
    swarm.publish([lesson(i) for i in range(4)])
    service = swarm.pupil("a")
    wait_until(lambda: len(swarm.journal("a")) == 4, what="4 lessons")
    caught_up = service.info()
    swarm.stop_pupils()
    swarm.publish([lesson(i) for i in range(4, 9)])  # 5 more while the node is away
    assert service.stream is not None
    service._probe_stream()  # what the keepalive thread does every head_probe_interval_s
    info = caught_up.model_copy(update=service.stream.facts(caught_up.stream_offset))
    assert info.stream_head is not None and info.stream_offset is not None
    store = Store(tmp_path / "master.sqlite3")
    store.touch_node(info, "online")
    (row,) = store.node_status()
    assert row.stream_offset == info.stream_offset and row.stream_lag is not None
    assert 5 <= row.stream_lag <= 6  # offsets: one per lesson, with the odd bookkeeping gap
    assert row.missed == ()  # a stream reader misses nothing it joined late for
    line = format_table([row]).splitlines()[2]
    assert str(row.stream_offset) in line and str(row.stream_lag) in line


def test_a_requeued_stream_lesson_is_redelivered_not_skipped(swarm: StreamSwarm) -> None:
    # Lesson 2 asks to be requeued once: a stream cannot requeue, so the consumer resubscribes
    # from the journal's offset and lesson 2 comes again. With a window of 4, lessons 3 and 4
    # are already in hand when that happens: neither may be done before it (its offset would
    # pass lesson 2's).
    swarm.broker = swarm.broker.model_copy(update={"prefetch": 4})
    service = swarm.pupil("a")
    original = service.node.process
    failed: list[str] = []

    def flaky(body: bytes, offset: int | None = None) -> Outcome:
        if b"lesson-00002" in body and not failed:
            failed.append("once")
            raise Requeue("not now")
        return original(body, offset)

    service.node.process = flaky  # type: ignore[method-assign]
    swarm.publish([lesson(i) for i in range(5)])
    wait_until(lambda: len(swarm.journal("a")) == 5, what="all 5 lessons")
    assert failed and done_ids(swarm, "a") == [f"lesson-{i:05d}" for i in range(5)]


def test_a_stream_declared_again_is_read_again_from_its_start(
    swarm: StreamSwarm, caplog: pytest.LogCaptureFixture
) -> None:
    # Deleting the stream (to change its retention, say) restarts its offsets at 0: a node must
    # not wait at its old offset for lessons that have lower ones now.
    swarm.publish([lesson(i) for i in range(6)])
    swarm.pupil("a")
    wait_until(lambda: len(swarm.journal("a")) == 6, what="6 lessons")
    swarm.stop_pupils()
    connection = connect(swarm.broker)
    try:
        connection.channel().queue_delete(swarm.topology.lessons_stream)
    finally:
        connection.close()
    swarm.declare()
    swarm.publish([lesson(i) for i in range(4, 8)])  # two it did, two new ones
    with caplog.at_level(logging.WARNING, logger="pupil_node.service"):
        swarm.pupil("a")
        wait_until(lambda: len(swarm.journal("a")) == 8, what="the 2 new lessons")
    assert "deleted and declared again" in caplog.text
    swarm.stop_pupils()
    assert done_ids(swarm, "a") == [f"lesson-{i:05d}" for i in range(8)]
    assert adapter_version(swarm, "a") == 8  # lessons 4 and 5 were not trained again


def test_a_bad_lesson_on_the_stream_is_dead_lettered_with_its_reason(swarm: StreamSwarm) -> None:
    # A stream cannot dead-letter: the pupil republishes to <ns>.dead with the reason, and
    # carries on with the next lesson.
    connection = connect(swarm.broker)
    try:
        props = pika.BasicProperties(message_id="garbage", delivery_mode=2)
        connection.channel().basic_publish(swarm.topology.lessons_exchange, "", b"not json", props)
    finally:
        connection.close()
    swarm.publish([lesson(0)])
    swarm.pupil("a")
    wait_until(lambda: len(swarm.journal("a")) == 1, what="the good lesson after the bad one")

    def dead() -> tuple[bytes, dict[str, object]] | None:
        connection = connect(swarm.broker)
        try:
            method, props, body = connection.channel().basic_get(
                swarm.topology.dead_queue, auto_ack=True
            )
        finally:
            connection.close()
        return None if method is None else (body, dict(props.headers or {}))

    body, headers = wait_until(dead, what="the dead letter")
    assert body == b"not json"
    assert "not valid JSON" in str(headers[REASON_HEADER])
    assert headers[ORIGIN_QUEUE_HEADER] == swarm.topology.lessons_stream


# -- a private broker: per-node permissions and the migration ---------------------------------


@pytest.fixture(scope="module")
def private() -> Iterator[LocalBroker]:
    require_rabbitmq_server()
    with LocalBroker() as broker:
        yield broker


def node_user(broker: LocalBroker, topology: Topology, node_id: str) -> BrokerConfig:
    """A per-node user with exactly the permissions `distill-swarm node add` grants."""
    perms = pupil_permissions(topology, node_id)
    for args in (
        ("add_user", node_id, f"{node_id}-pw"),
        ("set_permissions", "-p", "/", node_id, perms.configure, perms.write, perms.read),
    ):
        result = broker.ctl(*args)
        assert result.returncode == 0, result.stderr
    url = f"amqp://{node_id}:{node_id}-pw@127.0.0.1:{broker.port}/%2F"
    return BrokerConfig(
        url=url,
        namespace=topology.namespace,
        declare_exchanges=False,
        connect_attempts=2,
        max_backoff_s=0.5,
    )


def test_a_node_reads_the_stream_and_can_never_write_it(
    private: LocalBroker, tmp_path: Path
) -> None:
    admin = BrokerConfig(url=private.url, namespace="perm", max_backoff_s=0.5)
    swarm = StreamSwarm(admin, tmp_path)
    swarm.declare()
    swarm.publish([lesson(i) for i in range(3)])
    node = node_user(private, swarm.topology, "node-a")
    try:
        # It reads: the real pupil, as node-a, learns the three lessons from the stream.
        reader = StreamSwarm(node, tmp_path)
        reader.pupil("node-a")
        wait_until(lambda: len(reader.journal("node-a")) == 3, what="3 lessons as node-a")
        reader.stop_pupils()
        stream = swarm.topology.lessons_stream
        forged = encode(lesson(99))
        # It never writes: neither through the lessons exchange nor straight into the stream.
        for exchange, key in ((swarm.topology.lessons_exchange, ""), ("", stream)):
            connection = connect(node)
            channel = connection.channel()
            with pytest.raises(pex.ChannelClosedByBroker) as refused:
                channel.basic_publish(exchange, key, forged, pika.BasicProperties())
                channel.queue_declare(stream, passive=True)  # a round trip: the refusal lands
            assert refused.value.reply_code == 403, refused.value
            connection.close()
        # Nor delete or redeclare it.
        connection = connect(node)
        with pytest.raises(pex.ChannelClosedByBroker) as refused:
            connection.channel().queue_delete(stream)
        assert refused.value.reply_code == 403
        connection.close()
        assert stream_bounds(admin, stream).last is not None
        assert [x for x, _ in reader.journal("node-a")] == [lesson(i).lesson_id for i in range(3)]
    finally:
        swarm.close()
        delete_namespace(admin, ("node-a",))


def test_a_swarm_moves_from_per_node_queues_to_the_stream_without_losing_a_lesson(
    private: LocalBroker, tmp_path: Path
) -> None:
    """docs/stream.md, "Migration", step by step."""
    broker = BrokerConfig(url=private.url, namespace="move", max_backoff_s=0.5)
    queues = LessonsConfig(transport="queues")
    old = StreamSwarm(broker, tmp_path, lessons=queues)
    new = StreamSwarm(broker, tmp_path, lessons=LessonsConfig())
    try:
        # Today: per-node queues. Node a is up; node b is down with a backlog in its queue.
        old.declare()
        old.pupil("a")
        old.pupil("b")
        # A fanout reaches only the queues that exist: wait for both nodes' consumers.
        wait_until(
            lambda: (
                consumers(broker, old.topology.pupil_queue("a")) == 1
                and consumers(broker, old.topology.pupil_queue("b")) == 1
            ),
            what="both nodes consuming their queues",
        )
        old.publish([lesson(i) for i in range(3)])
        wait_until(lambda: len(old.journal("a")) == len(old.journal("b")) == 3, what="3 each")
        old.stop_pupils()
        old.publish([lesson(i) for i in range(3, 6)])  # waiting in both nodes' queues
        # Step 1: the master moves to the stream (it declares it on the same fanout). From now
        # on every lesson is both in the stream and in every per-node queue.
        new.declare()
        new.publish([lesson(i) for i in range(6, 9)])
        # Step 2: each node drains its queue (still on "queues") until it is empty...
        old.pupil("a")
        wait_until(lambda: queue_depth(broker, old.topology.pupil_queue("a")) == 0, what="drained")
        wait_until(lambda: len(old.journal("a")) == 9, what="a has 9")
        old.stop_pupils()
        # ...then restarts on the stream. It reads it from "first"; what it did from its queue
        # is in its journal and is only acked.
        new.pupil("a")
        # Node b, down since before step 1, does the same: lessons 3-5 are in its queue only.
        old.pupil("b")
        wait_until(lambda: queue_depth(broker, old.topology.pupil_queue("b")) == 0, what="b")
        old.stop_pupils()
        new.pupil("b")
        new.publish([lesson(i) for i in range(9, 12)])
        everything = [lesson(i).lesson_id for i in range(12)]
        wait_until(lambda: len(new.journal("a")) == len(new.journal("b")) == 12, what="all 12")
        new.stop_pupils()
        for node in ("a", "b"):
            assert done_ids(new, node) == everything  # every lesson once, none lost, in order
            assert adapter_version(new, node) == 12  # trained once each: nothing twice
        # Step 3: the old queues go.
        connection = connect(broker)
        for node in ("a", "b"):
            connection.channel().queue_delete(old.topology.pupil_queue(node))
        connection.close()
    finally:
        old.close()
        new.close()
        delete_namespace(broker, ("a", "b"))


def consumers(broker: BrokerConfig, queue: str) -> int:
    """The queue's consumer count; 0 while it does not exist."""
    connection = connect(broker)
    try:
        declared = connection.channel().queue_declare(queue, passive=True)
        return int(declared.method.consumer_count)
    except pex.ChannelClosedByBroker:
        return 0
    finally:
        connection.close()


def queue_depth(broker: BrokerConfig, queue: str) -> int:
    connection = connect(broker)
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def test_a_missing_stream_says_what_to_do(broker_config: BrokerConfig) -> None:
    topology = Topology(broker_config.namespace)
    connection = connect(broker_config)
    try:
        topology.declare_exchanges(connection.channel())
        with pytest.raises(BrokerError, match="start the master once"):
            topology.declare_pupil_stream(connection.channel(), declare_exchanges=False)
    finally:
        connection.close()
