"""The master service: publish lessons, ingest reports, track nodes, dispatch jobs.

Three threads, each with its own broker connection:
- the *consumer* (the caller's thread) ingests reports and hello/heartbeat/goodbye messages;
- the *publisher* thread waits for the expected pupils, then answers each prompt with the master
  model and publishes the lesson, skipping lessons an earlier run already published; while the
  master's model server is down it waits for it (probing with backoff) instead of failing the run;
- the *jobs* thread runs the :class:`~master.jobs.JobDispatcher` (which starts two more: deadlines
  and the master's own job answers).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from datetime import UTC, datetime, timedelta

from master.identity import check_identity
from master.job_store import JobStore
from master.jobs import JobDispatcher, MasterAnswerer
from master.prompts import PromptItem
from master.store import Store
from master.teacher import Teacher
from shared.backends import Embedder, TextGenerator, probe
from shared.broker import Consumer, Delivery, Publisher
from shared.config import Settings
from shared.errors import DecodeError, DistillSwarmError, ModelDown
from shared.health import Dependency
from shared.job_metrics import MasterJobMetrics
from shared.messages import Goodbye, Heartbeat, Hello, Report, decode, encode
from shared.metrics import MasterMetrics
from shared.topology import Topology

log = logging.getLogger(__name__)

# How often the publisher thread re-checks progress while it waits.
WAIT_POLL_S = 0.5


class MasterService:
    """One master: owns the store, the master model, and both broker connections."""

    def __init__(
        self,
        settings: Settings,
        generator: TextGenerator,
        embedder: Embedder,
        store: Store,
        prompts: list[PromptItem],
        stop: threading.Event | None = None,
        metrics: MasterMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.topology = Topology(
            settings.broker.namespace,
            settings.broker.quorum_queues,
            settings.master.jobs.offloaded,
        )
        self.store = store
        self.prompts = prompts
        self.metrics = metrics or MasterMetrics(settings.master.metrics_max_nodes)
        restore_metrics(store, self.metrics)
        # The master's model server, which lessons and the master's job answers wait for while it
        # is down (shared/health.py); probed through the raw backends, not the timed wrappers.
        self.model = Dependency(
            "master model",
            lambda: probe(generator, embedder),
            (ModelDown,),
            probe_base_s=settings.health.model_probe_base_s,
            probe_max_s=settings.health.model_probe_max_s,
        )
        self.metrics.watch_model(self.model)
        # One master model, timed once, for lessons and jobs alike.
        generator = self.metrics.timed_generator(generator)
        self.teacher = Teacher(
            settings.master, generator, self.metrics.timed_embedder(embedder), store
        )
        self.stop = stop or threading.Event()
        self.jobs = JobDispatcher(
            settings,
            JobStore(store),
            MasterAnswerer(settings, generator),
            embedder,
            MasterJobMetrics(self.metrics.registry, self.metrics.node_label),
            self.stop,
            rejected=self.metrics.rejected,
            model=self.model,
        )
        self.lesson_ids: list[str] = []
        self.publishing_done = threading.Event()
        self.failure: BaseException | None = None
        # Nodes count as present if they spoke since shortly before we started (a heartbeat
        # interval's grace), so a master restarted under a running swarm does not wait forever.
        self._started_iso = (datetime.now(UTC) - timedelta(seconds=90)).isoformat()

    # -- ingestion (consumer thread) --------------------------------------------------------

    def handle(self, delivery: Delivery) -> None:
        """Store one report or control message; raises DecodeError for anything invalid.

        Writes are committed per batch by the consumer (``before_settle``), before the acks.
        """
        self.store.defer_commits()
        if delivery.queue == self.topology.reports_queue:
            report = decode(delivery.body, Report)
            assert isinstance(report, Report)
            self._check_identity(report.node_id, delivery)
            new = self.store.add_report(report)
            self.metrics.record_report(report, new)
            if new:
                log.info(
                    "report %s from %s: before=%s adapted=%s",
                    report.lesson_id[:8],
                    report.node_id,
                    _fmt(report.similarity_before),
                    _fmt(report.similarity_adapted),
                )
            else:
                log.info(
                    "duplicate report %s from %s ignored", report.lesson_id[:8], report.node_id
                )
            return
        message = decode(delivery.body)
        if isinstance(message, Hello | Heartbeat | Goodbye):
            self._check_identity(message.node.node_id, delivery)
        if isinstance(message, Hello | Heartbeat):
            # "online", or what the node says it is doing instead ("model down").
            state = "online" if message.node.state == "ok" else message.node.state
            self.store.touch_node(message.node, state)
            self.metrics.record_node(message.node, online=True)
        elif isinstance(message, Goodbye):
            self.store.touch_node(message.node, "offline")
            self.metrics.record_node(message.node, online=False)
        else:
            raise DecodeError(f"unexpected {message.kind} message on the control queue")

    def _check_identity(self, node_id: str, delivery: Delivery) -> None:
        if self.settings.master.verify_node_identity:
            check_identity(node_id, delivery.properties.user_id)

    # -- publishing (publisher thread) ------------------------------------------------------

    def expected_nodes(self) -> list[str]:
        """Nodes present since this master started."""
        return self.store.nodes_seen_since(self._started_iso)

    def _wait_for_nodes(self) -> None:
        want = self.settings.master.expect_nodes
        if want == 0:
            return
        deadline = time.monotonic() + self.settings.master.expect_nodes_timeout_s
        while len(self.expected_nodes()) < want:
            if time.monotonic() > deadline:
                raise DistillSwarmError(
                    f"only {len(self.expected_nodes())} of {want} expected pupil nodes said hello "
                    f"within {self.settings.master.expect_nodes_timeout_s:.0f}s"
                )
            if self.stop.wait(WAIT_POLL_S):
                return
        log.info("pupils present: %s", ", ".join(self.expected_nodes()))

    def publish_lessons(self) -> None:
        """Answer every prompt and publish it as a lesson, once per lesson id."""
        publisher = Publisher(self.settings.broker, self.topology.declare_master, self.stop)
        try:
            self._wait_for_nodes()
            for seq, item in enumerate(self.prompts):
                if self.stop.is_set():
                    return
                # Waits out an outage of the master's model: the lesson is made once it is back.
                made = self.model.call(
                    functools.partial(self.teacher.lesson_for, item, seq), self.stop
                )
                if made is None:
                    return  # stopped while the model was down
                lesson, published = made
                self.lesson_ids.append(lesson.lesson_id)
                if published:
                    continue
                publisher.publish(
                    self.topology.lessons_exchange, "", encode(lesson), lesson.lesson_id
                )
                self.store.mark_published(lesson.lesson_id)
                self.metrics.lessons_published.inc()
                log.info(
                    "published lesson %d/%d (%s, %s)",
                    seq + 1,
                    len(self.prompts),
                    lesson.lesson_id[:8],
                    lesson.split,
                )
        finally:
            publisher.close()
            self.publishing_done.set()

    def complete(self) -> bool:
        """True when every lesson of this run has a report from every present node."""
        if not self.publishing_done.is_set():
            return False
        nodes = self.expected_nodes()
        want = len(self.lesson_ids) * len(nodes)
        return want > 0 and self.store.reported_pairs(self.lesson_ids, nodes) >= want

    # -- lifecycle -------------------------------------------------------------------------

    def run(self, exit_when_done: bool = False, timeout_s: float | None = None) -> None:
        """Serve until stopped (or, with ``exit_when_done``, until every report is in).

        Raises the publisher thread's error, or DistillSwarmError on timeout.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        def publish() -> None:
            try:
                self.publish_lessons()
            except BaseException as exc:
                self.failure = exc
                self.stop.set()

        def serve_jobs() -> None:
            try:
                self.jobs.run()
            except BaseException as exc:
                self.failure = self.failure or exc
                self.stop.set()

        def tick() -> None:
            if exit_when_done and self.complete():
                log.info("every report is in; stopping")
                self.stop.set()
            if deadline is not None and time.monotonic() > deadline:
                self.failure = DistillSwarmError(f"run did not complete within {timeout_s:.0f}s")
                self.stop.set()

        consumer = Consumer(
            self.settings.master_consumer_broker(),
            self.topology,
            [self.topology.reports_queue, self.topology.control_queue],
            self.handle,
            declare=self.topology.declare_master,
            on_tick=tick,
            tick_interval_s=1.0,
            on_dead_letter=self._dead_lettered,
            before_settle=self.store.commit_deferred,
        )
        self.metrics.watch_connection(consumer.connected)
        threads = [
            threading.Thread(target=publish, name="publisher", daemon=True),
            threading.Thread(target=serve_jobs, name="jobs", daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            consumer.run(self.stop)
        finally:
            self.stop.set()  # the consumer may end by raising: the other threads must end too
            for thread in threads:
                thread.join(timeout=10)
            self.model.close()
        if self.failure is not None:
            raise self.failure

    def _dead_lettered(self, delivery: Delivery, reason: str) -> None:
        queue = "reports" if delivery.queue == self.topology.reports_queue else "control"
        self.metrics.rejected(queue, reason)


def restore_metrics(store: Store, metrics: MasterMetrics) -> None:
    """Re-export every known node's latest figures from the store (after a master restart)."""
    for row in store.node_status():
        info = store.node_info(row.node_id)
        if info is None:
            continue
        last_seen_s = datetime.fromisoformat(row.last_seen).timestamp()
        online = row.state != "offline"  # "model down" is online: it heartbeats, it waits
        metrics.restore_node(info, online, last_seen_s, store.latest_reports(row.node_id))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
