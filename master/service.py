"""The master service: publish lessons, ingest reports, track nodes, dispatch jobs.

Three threads, each with its own broker connection:
- the *consumer* (the caller's thread) ingests reports and hello/heartbeat/goodbye messages;
- the *publisher* thread waits for the expected pupils, then answers each prompt with the master
  model and publishes the lesson, skipping lessons an earlier run already published; while the
  master's model server is down it waits for it (probing with backoff) instead of failing the run.
  Answers are made ``master.generate_in_flight`` at a time and lessons published in prompt order
  with a window of confirms (:mod:`master.pipeline`). After the prompt set it keeps teaching:
  prompts sent with `distill-swarm teach` and the jobs that become lessons (docs/jobs.md), each
  stored as a request when it arrives and answered in arrival order;
- the *jobs* thread runs the :class:`~master.jobs.JobDispatcher` (which starts two more: deadlines
  and the master's own job answers).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from master.exam import Exam, ExamStore, eval_lessons, publish_exam
from master.identity import IdentityCheck
from master.job_store import JobRow, JobStore
from master.jobs import JobDispatcher, MasterAnswerer
from master.pipeline import LessonPipeline, Work
from master.prompts import PromptItem
from master.store import Store
from master.teach_store import LessonRequest, TeachStore
from master.teacher import Teacher
from shared.backends import Embedder, TextGenerator, probe
from shared.broker import (
    Broker,
    ConsumerHooks,
    Delivery,
    MessageConsumer,
    RabbitBroker,
    Settlement,
    Subscription,
    WindowedPublisher,
    broker_user,
)
from shared.config import Settings
from shared.errors import DecodeError, DistillSwarmError, ModelDown, PublishNotConfirmed, one_line
from shared.health import Dependency
from shared.job_metrics import MasterJobMetrics
from shared.jobs import render_goal
from shared.messages import (
    Goodbye,
    Heartbeat,
    Hello,
    Lesson,
    NodeInfo,
    Report,
    Teach,
    TeachOutcome,
    TeachResult,
    decode,
    encode,
)
from shared.metrics import CountRejected, MasterMetrics
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
        broker: Broker | None = None,
    ) -> None:
        self.settings = settings
        # Consumers with master.prefetch's window, publishers with the broker's settings.
        self.broker = broker or RabbitBroker(settings.broker, settings.master_consumer_broker())
        self.topology = Topology.for_settings(settings)
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
        self.teach_store = TeachStore(store)
        # Eval prompts' texts, so that none is ever taught (or learned from a job) as train.
        self.teach_store.add_stored_eval_lessons()
        self.teach_store.add_eval_texts(
            [item.goal_text for item in prompts if self.teacher.split(item) == "eval"]
        )
        self.pipeline = LessonPipeline(
            self.teacher,
            self.model,
            store,
            self.metrics,
            self.topology.lessons_exchange,
            settings.master.generate_in_flight,
            self.stop,
        )
        # Answers to teach requests (consumer and publisher threads: Publisher has a lock).
        self.replies = self.broker.publisher(self.topology.declare_master, self.stop)
        self._requests_waiting = threading.Event()  # set when a lesson request was stored
        self.jobs = JobDispatcher(
            settings,
            JobStore(store),
            MasterAnswerer(settings, generator),
            embedder,
            MasterJobMetrics(self.metrics.registry, self.metrics.node_label),
            self.stop,
            hooks=CountRejected(
                self.metrics,
                {
                    self.topology.job_submissions_queue: "jobs",
                    self.topology.job_results_queue: "job_results",
                },
            ),
            model=self.model,
            broker=self.broker,
            on_master_answer=self._job_answered,
        )
        self.exams = ExamStore(store)
        self.exam: Exam | None = None  # the exam this run held at its end (master.exam)
        self._has_eval: bool | None = None  # whether this run published eval lessons
        self.lesson_ids: list[str] = []
        self.identity = IdentityCheck(
            settings.master.verify_node_identity, broker_user(settings.broker.url)
        )
        # lesson_id -> split of every lesson a report named so far: lessons never change, and a
        # store lookup per report would cost the ingestion rate (docs/performance.md).
        self._splits: dict[str, str] = {}
        self._duplicates_logged: set[tuple[str, str, str]] = set()  # (node, instance, instance)
        self.publishing_done = threading.Event()
        self.failure: BaseException | None = None
        # Nodes count as present if they spoke since shortly before we started (a heartbeat
        # interval's grace), so a master restarted under a running swarm does not wait forever.
        self._started_iso = (datetime.now(UTC) - timedelta(seconds=90)).isoformat()

    # -- ingestion (consumer thread) --------------------------------------------------------

    def handle(self, delivery: Delivery) -> Settlement:
        """Store one report or control message; raises DecodeError for anything invalid.

        What is durable, and when: the message's writes go into this thread's write batch (one
        SQLite transaction for many messages), all or none of them. The ack returned carries the
        batch, and the consumer commits it before it sends that ack or any other of the batch
        (shared/broker/consumer.py): one commit per batch of up to 64 reports, nothing acked
        that is not stored, and a failed commit requeues them all.
        """
        batch = self.store.write_batch()
        with batch.message():
            self._ingest(delivery)
        return Settlement.ack(pending=batch)

    def _ingest(self, delivery: Delivery) -> None:
        if delivery.queue == self.topology.teach_queue:
            self._on_teach(delivery)
            return
        if delivery.queue == self.topology.reports_queue:
            report = decode(delivery.body, Report)
            self._check_identity(report.node_id, delivery)
            self._check_lesson(report)
            if report.exam_id is not None:
                self._add_exam_report(report)
                return
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
            self._check_instance(message.node)
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

    def _add_exam_report(self, report: Report) -> None:
        assert report.exam_id is not None
        if self.exams.get(report.exam_id) is None:
            raise DecodeError(
                f"report from node '{report.node_id}' answers exam '{report.exam_id}', which "
                "this master never held"
            )
        new = self.exams.add_report(report)
        log.info(
            "%s report %s of %s from %s: plain=%s%s",
            "exam" if new else "duplicate exam",
            report.lesson_id[:8],
            report.exam_id,
            report.node_id,
            _fmt(report.similarity_before),
            "".join(f" {m}={v:.3f}" for m, v in report.guided.items()),
        )

    def _check_identity(self, node_id: str, delivery: Delivery) -> None:
        self.identity.check(node_id, delivery.properties.user_id)

    def _check_instance(self, info: NodeInfo) -> None:
        """Tell the operator when two processes speak for one node id (log, metric, status).

        The message is still stored: both processes are the node as far as the broker knows, and
        the pupils' exclusive lesson consumer already keeps the second one from learning.
        """
        if info.instance_id is None:
            return  # a node too old to say which process it is
        other = self.store.record_instance(info.node_id, info.instance_id)
        if other is None:
            return
        self.metrics.record_duplicate(info.node_id)
        first, second = sorted((info.instance_id, other))
        pair = (info.node_id, first, second)
        if pair not in self._duplicates_logged:
            self._duplicates_logged.add(pair)
            log.warning(
                "duplicate node id '%s': two processes (instances %s and %s) speak for it at "
                "once, e.g. two machines from one SD card image; give each its own node id",
                info.node_id,
                other,
                info.instance_id,
            )

    def _check_lesson(self, report: Report) -> None:
        """Refuse a report for a lesson this master never made, or under another split.

        In every identity mode: a node's own credentials must not let it put figures for lessons
        that do not exist into `eval`, nor count an eval lesson as trained (or a train lesson as
        held out). An error report (a node refusing a lesson) passes if its lesson and split do.
        """
        split = self._splits.get(report.lesson_id)
        if split is None:
            split = self.store.lesson_split(report.lesson_id)
            if split is None:
                raise DecodeError(
                    f"report from node '{report.node_id}' names lesson '{report.lesson_id}', "
                    "which this master never made"
                )
            self._splits[report.lesson_id] = split
        if report.split != split:
            raise DecodeError(
                f"report from node '{report.node_id}' gives lesson '{report.lesson_id}' split "
                f"'{report.split}', but the lesson's split is '{split}'"
            )

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

    def _lesson_publisher(self) -> WindowedPublisher:
        return self.broker.windowed_publisher(
            self.topology.declare_master, self.stop, self.settings.master.publish_window
        )

    def publish_lessons(self) -> None:
        """Answer every prompt and publish it as a lesson, once per lesson id, in prompt order."""
        publisher = self._lesson_publisher()
        total = len(self.prompts)

        def done(seq: int, lesson: Lesson, new: bool) -> None:
            self.lesson_ids.append(lesson.lesson_id)
            if new:
                log.info(
                    "published lesson %d/%d (%s, %s)",
                    seq + 1,
                    total,
                    lesson.lesson_id[:8],
                    lesson.split,
                )

        try:
            self._wait_for_nodes()
            work = (
                Work(item, seq, on_done=functools.partial(done, seq))
                for seq, item in enumerate(self.prompts)
            )
            self.pipeline.run(work, publisher)
        finally:
            publisher.close()
            self.publishing_done.set()

    # -- teaching at any time (publisher thread, after the prompt set) ----------------------

    def serve_teaching(self) -> None:
        """Answer stored lesson requests (teach, jobs) as they come, until ``stop`` is set."""
        publisher = self._lesson_publisher()
        try:
            while not self.stop.is_set():
                if not self.teach_pending(publisher):
                    publisher.poll()  # an idle connection still answers the broker's heartbeats
                    self._requests_waiting.wait(WAIT_POLL_S)
                    self._requests_waiting.clear()
        finally:
            publisher.close()

    def teach_pending(self, publisher: WindowedPublisher) -> int:
        """Answer the stored requests pending now; returns how many there were."""
        pending = self.teach_store.pending()
        if pending:
            self.pipeline.run(self._request_work(pending), publisher)
        return len(pending)

    def _request_work(self, requests: list[LessonRequest]) -> Iterator[Work]:
        """The work of pending requests, in arrival order; refusals are answered on the way."""
        seq = self.teach_store.next_seq()
        lessons: set[str] = set()
        for request in requests:
            item = request.item
            lesson_id = self.teacher.lesson_id(item)
            if lesson_id in lessons:
                continue  # one lesson twice in a batch: the next batch finds it published
            lessons.add(lesson_id)
            split = self.teacher.split(item)
            if split == "train" and self.teach_store.is_eval_text(item.goal_text):
                self._request_done(
                    request, "refused", None, "its text is an eval prompt's: never a train lesson"
                )
                continue
            if split == "eval":
                self.teach_store.add_eval_texts([item.goal_text])
            yield Work(
                item,
                seq,
                request.answer,
                on_done=functools.partial(self._request_made, request),
                on_failed=functools.partial(self._request_failed, request),
            )
            seq += 1

    def _request_made(self, request: LessonRequest, lesson: Lesson, new: bool) -> None:
        outcome: TeachOutcome = "published" if new else "already_published"
        detail = "" if new else "published before: nothing new was sent"
        self._request_done(request, outcome, lesson, detail)

    def _request_failed(self, request: LessonRequest, exc: Exception) -> None:
        reason = one_line(f"the master could not answer: {type(exc).__name__}: {exc}")[:1000]
        self._request_done(request, "failed", None, reason)

    def _request_done(
        self, request: LessonRequest, outcome: TeachOutcome, lesson: Lesson | None, detail: str
    ) -> None:
        lesson_id = None if lesson is None else lesson.lesson_id
        self.teach_store.finish(request.request_id, outcome, lesson_id, detail)
        if request.source == "job":
            self.jobs.metrics.lessons.labels(request.kind, outcome).inc()
        else:
            self.metrics.taught.labels(outcome).inc()
        log.info(
            "%s %s: %s%s%s",
            "taught prompt" if request.source == "teach" else "lesson from",
            request.item.id if request.source == "teach" else request.request_id,
            outcome.replace("_", " "),
            "" if lesson_id is None else f" (lesson {lesson_id[:8]})",
            f": {detail}" if detail and outcome != "already_published" else "",
        )
        split = None if lesson is None else lesson.split
        result = TeachResult(
            prompt_id=request.item.id,
            outcome=outcome,
            lesson_id=lesson_id,
            split=split,
            detail=detail,
        )
        self._reply(request.reply_to, request.correlation_id, result)

    def _reply(self, reply_to: str | None, correlation_id: str | None, result: TeachResult) -> None:
        if not reply_to:
            return  # sent without waiting (`teach --no-wait`): the store has the outcome
        try:
            self.replies.publish(
                "", reply_to, encode(result), result.message_id, correlation_id=correlation_id
            )
        except PublishNotConfirmed:
            log.info("teach %s: the sender's queue %s is gone", result.prompt_id, reply_to)

    def _on_teach(self, delivery: Delivery) -> None:
        """Store a teach request (consumer thread); the publisher thread answers it."""
        props = delivery.properties
        try:
            teach = decode(delivery.body, Teach)
        except DecodeError as exc:
            refused = TeachResult(
                prompt_id="unknown", outcome="refused", detail=one_line(str(exc))[:2000]
            )
            self._reply(props.reply_to, props.correlation_id, refused)
            raise
        item = PromptItem(
            id=teach.prompt_id,
            goal_text=teach.goal_text,
            task=teach.task,
            preferences=teach.preferences,
            instructions=teach.instructions,
            split=teach.split,
        )
        stored = self.teach_store.add(
            teach.message_id, "teach", item, None, props.reply_to, props.correlation_id
        )
        if not stored:
            # A redelivery: answer again if it was answered (the reply may have been lost).
            known = self.teach_store.get(teach.message_id)
            if known is not None and known.outcome is not None:
                self._reply(
                    props.reply_to,
                    props.correlation_id,
                    TeachResult(
                        prompt_id=item.id,
                        outcome=known.outcome,
                        lesson_id=known.lesson_id,
                        detail=known.detail or "",
                    ),
                )
            return
        self._requests_waiting.set()

    def _job_answered(self, row: JobRow, answer: str) -> None:
        """A job the master answered itself (jobs thread): a lesson, if its kind opted in."""
        if row.kind not in self.settings.master.jobs.to_lessons:
            return
        goal = render_goal(row.kind, row.text, row.params)
        if self.teach_store.is_eval_text(goal, row.text):
            self.jobs.metrics.lessons.labels(row.kind, "refused").inc()
            log.info("job %s (%s): no lesson: its text is an eval prompt's", row.job_id, row.kind)
            return
        # Named by its text: the same job text seen again is the same lesson, taught once.
        prompt_id = "job:" + hashlib.sha256(goal.encode()).hexdigest()[:24]
        item = PromptItem(id=prompt_id, goal_text=goal[:16_000], task=row.kind, split="train")
        if self.teach_store.add(f"job:{row.job_id}", "job", item, answer):
            self._requests_waiting.set()

    def complete(self) -> bool:
        """True when every lesson of this run has a report from every present node that could
        have received it.

        A node the master first heard from after a lesson was published had no queue bound
        then, so it never gets that lesson (``status`` lists it as missed): waiting for it would
        only end in the run's timeout (Store.receivable_pairs).
        """
        if not self.publishing_done.is_set() or not self.lesson_ids:
            return False
        nodes = self.expected_nodes()
        if not nodes:
            return False
        want, have = self.store.receivable_pairs(self.lesson_ids, nodes)
        return have >= want

    def hold_exam(self) -> None:
        """Once every report of the run is in, send its eval lessons again as an exam.

        Runs on the publisher thread. Nodes answer the exam with what they serve at the end of
        the curriculum (their last LoRA version included); see :mod:`master.exam`.
        """
        while not self.complete():
            if self.stop.wait(WAIT_POLL_S):
                return
        if not self._run_has_eval():
            return
        publisher = self.broker.publisher(self.topology.declare_master, self.stop)
        try:
            self.exam = publish_exam(
                self.store, self.exams, publisher, self.topology, self.lesson_ids
            )
        finally:
            publisher.close()
        log.info(
            "curriculum done; exam %s sent: %d eval lessons",
            self.exam.exam_id,
            len(self.exam.lesson_ids),
        )

    def exam_complete(self) -> bool:
        """True when the run's exam (if it holds one) has a report from every present node."""
        if not self.settings.master.exam:
            return True
        if self.exam is None:
            # No exam (yet): a run without eval lessons never holds one.
            return self.publishing_done.is_set() and not self._run_has_eval()
        want, have = self.exams.answered(self.exam.exam_id, self.expected_nodes())
        return want > 0 and have >= want

    def _run_has_eval(self) -> bool:
        if self._has_eval is None:
            self._has_eval = bool(eval_lessons(self.store, self.lesson_ids))
        return self._has_eval

    def _log_missed(self) -> None:
        for node in self.expected_nodes():
            missed = set(self.store.missed_lessons(node)) & set(self.lesson_ids)
            if missed:
                log.warning(
                    "node %s joined after %d of this run's lessons were published and never got "
                    "them (see `distill-swarm status`)",
                    node,
                    len(missed),
                )

    # -- lifecycle -------------------------------------------------------------------------

    def report_queue_kinds(self) -> dict[str, str]:
        """The report consumer's queues, each with its `queue` label in the metrics."""
        return {
            self.topology.reports_queue: "reports",
            self.topology.control_queue: "control",
            self.topology.teach_queue: "teach",
        }

    def report_consumer(self, hooks: ConsumerHooks | None = None) -> MessageConsumer:
        """The consumer of reports and control messages; dead letters are counted by default."""
        kinds = self.report_queue_kinds()
        hooks = hooks or CountRejected(self.metrics, kinds)
        declare = self.topology.declare_master
        return self.broker.consumer(
            Subscription(self.topology, list(kinds), self.handle, declare, hooks)
        )

    def run(self, exit_when_done: bool = False, timeout_s: float | None = None) -> None:
        """Serve until stopped (or, with ``exit_when_done``, until every report is in).

        Raises the publisher thread's error, or DistillSwarmError on timeout.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        def publish() -> None:
            try:
                self.publish_lessons()
                if exit_when_done and self.settings.master.exam:
                    self.hold_exam()
                self.serve_teaching()
            except BaseException as exc:
                self.failure = exc
                self.stop.set()

        def serve_jobs() -> None:
            try:
                self.jobs.run()
            except BaseException as exc:
                self.failure = self.failure or exc
                self.stop.set()

        consumer = self.report_consumer(_RunHooks(self, exit_when_done, deadline, timeout_s))
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
            self.replies.close()
            self.model.close()
        if self.failure is not None:
            raise self.failure


class _RunHooks(CountRejected):
    """The report consumer's hooks: count dead letters; stop when the run is done or late."""

    tick_interval_s = 1.0

    def __init__(
        self,
        service: MasterService,
        exit_when_done: bool,
        deadline: float | None,
        timeout_s: float | None,
    ) -> None:
        super().__init__(service.metrics, service.report_queue_kinds())
        self._service = service
        self._exit_when_done = exit_when_done
        self._deadline = deadline
        self._timeout_s = timeout_s

    def on_tick(self) -> None:
        service = self._service
        if self._exit_when_done and service.complete() and service.exam_complete():
            service._log_missed()
            log.info("every report is in; stopping")
            service.stop.set()
        if self._deadline is not None and time.monotonic() > self._deadline:
            service.failure = DistillSwarmError(
                f"run did not complete within {self._timeout_s:.0f}s"
            )
            service.stop.set()


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
