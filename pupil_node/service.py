"""The pupil node as a service: hello, heartbeats, the lesson and job consumers, goodbye.

Threads:
- the consumer's I/O thread keeps its connection alive (AMQP heartbeats) while
- the consumer's worker thread runs a lesson, which may take minutes on a Pi;
- with ``pupil.jobs`` set, a second consumer (I/O + worker thread, its own connection) takes jobs
  from the shared job queues, so a job never waits for a lesson's delivery to be acked;
- a keepalive thread sends the node's heartbeat messages and keeps the publisher's connection
  answering AMQP heartbeats between lessons.
Reports and control messages go out on a separate, confirming publisher connection; a lesson is
acked only after its report is confirmed. The keepalive work has its own thread because a
publisher waiting for a broker that is down (or for the worker's publish) must never stall the
consumer's I/O thread.

With ``lessons.transport = "stream"`` (the default) the lesson consumer reads the swarm's one
lesson stream from the offset the node's journal holds (docs/stream.md): "first" for a new node,
after the last lesson done for one that ran before. The keepalive thread looks up the stream's
head every ``lessons.head_probe_interval_s`` (and heartbeats report it), so the node can log its
catch-up and the master show its lag; a node
that resumes behind the stream's retention logs, exports and reports the offsets it lost.

The node's model server is a :class:`~shared.health.Dependency` both consumers pause on: while it
is down, the lesson in hand stays unacked, no new lesson or job is taken, a prober thread asks the
server with backoff, and the heartbeat says ``model down`` (sent at once, not at the next
interval), so `distill-swarm status` shows it.
"""

from __future__ import annotations

import logging
import threading
import time

from pika.adapters.blocking_connection import BlockingChannel

from pupil_node.disk import StateWriteFailed
from pupil_node.jobs import JobWorker
from pupil_node.journal import Journal
from pupil_node.node import PupilNode
from shared.backends import probe
from shared.broker import (
    Broker,
    ConsumeOptions,
    Delivery,
    MessageConsumer,
    RabbitBroker,
    Subscription,
)
from shared.broker.stream import FIRST, StreamBounds, delivery_offset, stream_bounds
from shared.config import Settings
from shared.errors import BrokerError, EmbeddingMismatch, ModelDown, NodeIdInUse, QueueInUse
from shared.health import Dependency
from shared.job_metrics import PupilJobMetrics
from shared.messages import (
    MODEL_DOWN,
    Goodbye,
    Heartbeat,
    Hello,
    Lesson,
    Message,
    NodeInfo,
    Report,
    decode,
    encode,
)
from shared.metrics import CountRejected, PupilMetrics
from shared.topology import Topology

log = logging.getLogger(__name__)

# How often the keepalive thread wakes up to send a due heartbeat or pump the publisher.
KEEPALIVE_INTERVAL_S = 1.0


class PupilService:
    """Runs one :class:`PupilNode` against the broker until stopped."""

    def __init__(
        self,
        settings: Settings,
        node: PupilNode,
        stop: threading.Event | None = None,
        metrics: PupilMetrics | None = None,
        broker: Broker | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker or RabbitBroker(settings.broker)
        self.node = node
        self.metrics = metrics or PupilMetrics()
        self.topology = Topology(
            settings.broker.namespace, settings.broker.quorum_queues, lessons=settings.lessons
        )
        self.stream = (
            StreamPosition(node.journal, settings.lessons.catch_up_log_every)
            if self.topology.uses_stream
            else None
        )
        self.stop = stop or threading.Event()
        self.publisher = self.broker.publisher(self._declare, self.stop)
        # A full state disk stops a node's learning (its lessons wait): say so on /metrics.
        self.metrics.watch_free_space(node.state_free_bytes)
        health = settings.health
        self.model = Dependency(
            "model",
            lambda: probe(node.generator, node.embedder),
            (ModelDown,),
            probe_base_s=health.model_probe_base_s,
            probe_max_s=health.model_probe_max_s,
        )
        self.metrics.watch_model(self.model)
        self.model.on_change(self._model_changed)
        # Lessons also pause while the state disk cannot take their writes (jobs write nothing).
        self.state_disk = Dependency(
            "state disk",
            node.probe_state_disk,
            (StateWriteFailed,),
            probe_base_s=health.disk_probe_base_s,
            probe_max_s=health.disk_probe_max_s,
        )
        self.jobs = JobWorker(
            node, self.publisher, self.topology, PupilJobMetrics(self.metrics.registry), self.model
        )
        self._next_heartbeat = 0.0
        self._next_head_probe = 0.0
        self._failure: BaseException | None = None
        if self.stream is not None:
            stream = self.stream
            self.metrics.watch_stream(
                lambda: (stream.offset or 0, stream.head or 0, stream.lost_count)
            )

    def _declare(self, channel: BlockingChannel) -> None:
        broker = self.settings.broker
        if self.topology.uses_stream:
            self.topology.declare_pupil_stream(channel, broker.declare_exchanges)
        else:
            self.topology.declare_pupil(channel, self.node.node_id, broker.declare_exchanges)

    def _declare_jobs(self, channel: BlockingChannel) -> None:
        kinds = tuple(self.node.config.jobs)
        if self.settings.broker.declare_exchanges:
            self.topology.declare_exchanges(channel)
            for kind in kinds:
                self.topology.declare_job_queue(channel, kind)
        else:
            # A per-node user may only read job queues, not declare them: the master did.
            self.topology.check_job_queues(channel, kinds)

    def _serve_jobs(self, lessons_consumed: threading.Event) -> None:
        # Jobs only once this process holds the node's lesson queue: a second process with the
        # same node id, refused that queue, must not take the swarm's jobs while it waits.
        while not lessons_consumed.wait(KEEPALIVE_INTERVAL_S):
            if self.stop.is_set():
                return
        consumer = self.job_consumer()
        try:
            consumer.run(self.stop)
        except BaseException as exc:
            self._failure = exc
            self.stop.set()

    def job_consumer(self) -> MessageConsumer:
        """The consumer of the job queues of ``pupil.jobs``, paused while the model is down."""
        queues = [self.topology.job_queue(kind) for kind in self.node.config.jobs]
        counted = CountRejected(self.metrics, dict.fromkeys(queues, "jobs"))
        # One job at a time across all kinds: a busy node leaves the others to idle pupils.
        one_job = ConsumeOptions(shared_prefetch=True)
        return self.broker.consumer(
            Subscription(
                self.topology, queues, self.jobs.handle, self._declare_jobs, counted,
                pause_while=(self.model,), options=one_job,
            )
        )  # fmt: skip

    def lesson_consumer(self) -> MessageConsumer:
        """The consumer of this node's lessons, paused while the model or disk is down."""
        if self.topology.uses_stream:
            return self._stream_consumer()
        queue = self.topology.pupil_queue(self.node.node_id)
        # One process per node id: a second one (a cloned SD card) is refused by the broker
        # instead of silently taking half of this node's lessons.
        alone = ConsumeOptions(exclusive=True, in_use_wait_s=self.node.config.queue_in_use_wait_s)
        subscription = Subscription(
            self.topology,
            [queue],
            self.handle,
            self._declare,
            CountRejected(self.metrics, {queue: "lessons"}),
            pause_while=(self.model, self.state_disk),
            options=alone,
        )
        return self.broker.consumer(subscription)

    def _stream_consumer(self) -> MessageConsumer:
        stream = self.topology.lessons_stream
        subscription = Subscription(
            self.topology,
            [stream],
            self.handle,
            self._declare,
            CountRejected(self.metrics, {stream: "lessons"}),
            pause_while=(self.model, self.state_disk),
            stream_start=self._stream_start,
        )
        return self.broker.consumer(subscription)

    def _stream_start(self) -> int | str:
        """I/O thread, at every (re)subscribe: where this node resumes the lesson stream."""
        assert self.stream is not None
        resume = self.node.journal.resume_offset()
        bounds = self._probe_stream()
        if resume is not None and bounds is not None and resume > (bounds.last or -1) + 1:
            # Offsets only grow: a stream that ends before this node's offset was deleted and
            # declared again, and its offsets started over. Resuming at ours would skip its first
            # lessons; reading it all again costs only acks for what the journal holds.
            log.warning(
                "lesson stream: it ends at offset %s, before this node's next offset %d: it was "
                "deleted and declared again; reading it again from the first retained lesson",
                bounds.last,
                resume,
            )
            self.node.journal.forget_offsets()
            resume = None
        self.stream.resume_from = 0 if resume is None else resume
        if resume is None:
            log.info(
                "lesson stream: a new reader, starting at the first retained lesson (%s)",
                self.stream.describe(),
            )
            return FIRST
        if bounds is not None and bounds.first is not None and resume < bounds.first:
            self.stream.lose(resume, bounds.first - 1)
            log.warning(
                "lesson stream: this node resumes at offset %d but retention has dropped "
                "everything before %d: the lessons at offsets %d-%d (up to %d lessons) are gone "
                "and it cannot learn them; raise lessons.stream_max_bytes / stream_max_age if "
                "nodes stay away this long",
                resume,
                bounds.first,
                resume,
                bounds.first - 1,
                bounds.first - resume,
            )
        log.info("lesson stream: resuming at offset %d (%s)", resume, self.stream.describe())
        return resume

    def _probe_stream(self) -> StreamBounds | None:
        """The stream's bounds (also noting its head); None if the probe failed."""
        assert self.stream is not None
        try:
            bounds = stream_bounds(self.settings.broker, self.topology.lessons_stream)
        except BrokerError as exc:
            log.warning("could not look up the lesson stream's head: %s", exc)
            return None
        self.stream.see_head(bounds.last)
        return bounds

    def info(self) -> NodeInfo:
        """The node's hello/heartbeat facts, with its state (``model down`` during an outage)."""
        info = self.node.info()
        if self.stream is not None:
            info = info.model_copy(update=self.stream.facts(self.node.journal.offset))
        return info if self.model.up else info.model_copy(update={"state": MODEL_DOWN})

    def _model_changed(self, _up: bool, _reason: str) -> None:
        # Tell the master now rather than at the next heartbeat: the keepalive thread sends one
        # within KEEPALIVE_INTERVAL_S.
        self._next_heartbeat = 0.0

    def _control(self, message: Message) -> None:
        # Not mandatory: hello/heartbeat are soft state that the next heartbeat repeats, and a
        # pupil that starts before the master has declared its queues must not fail for it.
        # Reports, in contrast, are mandatory: an unroutable one leaves the lesson unacked.
        key = self.topology.control_key(message.kind, self.node.node_id)
        self.publisher.publish(
            self.topology.control_exchange,
            key,
            encode(message),
            message.message_id,
            mandatory=False,
        )

    def handle(self, delivery: Delivery) -> None:
        """Run the lesson flow, then publish the report; raising leaves the ack undone."""
        offset = None if self.stream is None else delivery_offset(delivery.headers)
        if offset is not None and self.stream is not None and offset < self.stream.resume_from:
            return  # before the offset asked for (the broker sends whole chunks): done already
        try:
            outcome = self.node.process(delivery.body, offset)
        except EmbeddingMismatch as exc:
            self._report_refusal(delivery, str(exc))
            raise
        self.metrics.record_lesson(outcome.report, outcome.replayed)
        if offset is not None and self.stream is not None:
            self.stream.done(offset)
        if outcome.reported:
            return  # the broker confirmed this report before: only the ack was lost
        self.publisher.publish(
            self.topology.reports_exchange,
            self.topology.REPORT_KEY,
            outcome.report,
            f"{outcome.lesson_id}:{self.node.node_id}",
        )
        self.node.mark_reported(outcome.lesson_id)

    def _report_refusal(self, delivery: Delivery, reason: str) -> None:
        # Tell the master why this node will never do the lesson, so nobody waits for it.
        lesson = decode(delivery.body, Lesson)  # it decoded once already, only its space is wrong
        report = Report(
            lesson_id=lesson.lesson_id,
            node_id=self.node.node_id,
            split=lesson.split,
            pupil_model=self.node.generator.model_name,
            error=reason[:2000],
        )
        self.publisher.publish(
            self.topology.reports_exchange,
            self.topology.REPORT_KEY,
            encode(report),
            report.message_id,
        )

    def tick(self) -> None:
        """Runs on the keepalive thread: heartbeat when due, else keep the publisher alive."""
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.node.config.heartbeat_interval_s
            if self.stream is not None and now >= self._next_head_probe:
                # The head this heartbeat (and the next ones, until the next probe) reports.
                self._next_head_probe = now + self.settings.lessons.head_probe_interval_s
                self._probe_stream()
            try:
                self._control(Heartbeat(node=self.info()))
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
        else:
            self.publisher.pump()

    def _keepalive(self) -> None:
        while not self.stop.wait(KEEPALIVE_INTERVAL_S):
            self.tick()

    def run(self) -> None:
        """Say hello, consume lessons until stopped, say goodbye."""
        self._control(Hello(node=self.info()))
        self._next_heartbeat = time.monotonic() + self.node.config.heartbeat_interval_s
        consumer = self.lesson_consumer()
        self.metrics.watch_connection(consumer.connected)
        threads = [threading.Thread(target=self._keepalive, name="keepalive", daemon=True)]
        if self.node.config.jobs:
            threads.append(
                threading.Thread(
                    target=self._serve_jobs, args=(consumer.connected,), name="jobs", daemon=True
                )
            )
        for thread in threads:
            thread.start()
        # Study rounds run in the background (their own thread and child process); node.close()
        # stops them.
        self.node.lora.start()
        refused = False
        try:
            consumer.run(self.stop)
        except QueueInUse as exc:
            refused = True
            node_id = self.node.node_id
            raise NodeIdInUse(
                f"another process consumes the lessons of node '{node_id}' ({exc}): two "
                f"machines run as '{node_id}' (a cloned SD card?). Give this one its own node id "
                "(`distill-swarm node add NEW-ID` on the server, then pupil.node_id) and its own "
                "state directory"
            ) from None
        finally:
            self.stop.set()  # the consumer may also end by raising: the other threads must end too
            for thread in threads:
                thread.join(timeout=60)
            try:
                # A refused process never was the node: its goodbye would mark the real one
                # offline.
                if not refused:
                    self._control(Goodbye(node=self.info()))
            except Exception as exc:
                log.warning("goodbye not sent: %s", exc)
            self.model.close()
            self.state_disk.close()
            self.publisher.close()
            self.node.close()
        if self._failure is not None:
            raise self._failure


class StreamPosition:
    """Where a node stands in the lesson stream: what it has done, the head, what it lost.

    Written by the consumer's threads, read by the keepalive thread and at each scrape; plain
    int assignments, so no lock. The offset done is the journal's, which records it with each
    lesson; nothing here keeps a second copy.
    """

    def __init__(self, journal: Journal, log_every: int) -> None:
        self.log_every = log_every
        self._journal = journal
        self.head: int | None = None
        self.resume_from = 0  # deliveries below this offset were done before this subscribe
        self.lost: tuple[int, int] | None = None
        self._since_log = 0

    @property
    def offset(self) -> int | None:
        """The highest offset done (None before the node read the stream)."""
        return self._journal.offset

    @property
    def lost_count(self) -> int:
        """How many offsets retention dropped before the node got them (an upper bound)."""
        return 0 if self.lost is None else self.lost[1] - self.lost[0] + 1

    def see_head(self, head: int | None) -> None:
        """Note the stream's last offset, as a probe found it."""
        if head is not None:
            self.head = max(head, self.head or 0)

    def lose(self, first: int, last: int) -> None:
        """Note that retention dropped offsets ``first``..``last`` before the node got them."""
        self.lost = (first, last)

    def describe(self) -> str:
        """The head and lag, for a log line."""
        if self.head is None:
            return "the stream is empty or its head unknown"
        behind = self.head - (self.offset if self.offset is not None else -1)
        return f"head at offset {self.head}, up to {max(0, behind)} lessons to catch up on"

    def done(self, offset: int) -> None:
        """Worker thread, after each stream lesson (journalled at ``offset``): log the catch-up
        every so many lessons."""
        if self.head is None or offset > self.head:
            self.head = offset
        if self.head - offset <= 0:
            if self._since_log:
                log.info("lesson stream: caught up at offset %d", offset)
            self._since_log = 0
            return
        self._since_log += 1
        if self._since_log >= self.log_every:
            self._since_log = 0
            log.info(
                "lesson stream: catching up, at offset %d of %d (up to %d lessons behind)",
                offset,
                self.head,
                self.head - offset,
            )

    def facts(self, offset: int | None) -> dict[str, int | None]:
        """The heartbeat's stream fields (NodeInfo)."""
        head = self.head if offset is None or self.head is None else max(self.head, offset)
        return {
            "stream_offset": offset,
            "stream_head": head,
            "stream_lost_first": None if self.lost is None else self.lost[0],
            "stream_lost_last": None if self.lost is None else self.lost[1],
        }
