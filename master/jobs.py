"""The master's side of job offloading: policy, dispatch, deadlines, fallback, quality samples.

A submitter publishes a :class:`~shared.messages.Job` to the jobs exchange with the ``submit``
key, ``reply_to`` = its own queue and ``correlation_id`` = the job id. The dispatcher then:

1. validates it (kind known, payload complete); an invalid job is dead-lettered with the reason
   *and* the submitter gets a :class:`~shared.messages.JobResult` with that reason as ``error``;
2. stores it, then, by the policy (``master.jobs.critical``):
   - a critical kind is answered by the master itself and never published where a pupil can see it;
   - any other kind is published to that kind's shared queue, where competing pupils take it,
     with a per-message TTL of its deadline and ``reply_to`` = the job-result routing key;
3. answers the submitter with the first answer stored: a pupil's, or the master's when the
   deadline passes or the pupil reports failure (``fallback`` says which);
4. for a sample of offloaded jobs (``master.jobs.sample_rate``), answers the job itself as well
   and records the agreement between the two answers per kind and node.

Threads: the consumer's worker runs :meth:`JobDispatcher.handle`; a deadline thread moves
offloaded jobs whose deadline passed to the master; one master worker answers jobs with the master
model (fallbacks before quality samples). All share one confirming :class:`Publisher`.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import numpy as np
from pika.adapters.blocking_connection import BlockingChannel

from master.identity import IdentityCheck
from master.job_store import JobRow, JobStore
from shared.backends import Embedder, GenerationParams, TextGenerator
from shared.backends.templates import render_prompt
from shared.broker import (
    Broker,
    ConsumerHooks,
    Delivery,
    MessageConsumer,
    RabbitBroker,
    Subscription,
    broker_user,
)
from shared.config import Settings
from shared.errors import DecodeError, PublishNotConfirmed, one_line
from shared.health import Dependency
from shared.job_metrics import MasterJobMetrics
from shared.jobs import Fallback, job_kind, render_goal
from shared.messages import MASTER, Job, JobResult, decode, encode
from shared.similarity import cosine
from shared.topology import Topology

log = logging.getLogger(__name__)

T = TypeVar("T")

# Priorities of the master worker's queue: answers somebody waits for come before samples.
ANSWER, SAMPLE = 0, 1
# The deadline thread's longest sleep, so a stop is noticed promptly.
DEADLINE_POLL_S = 0.2


@dataclass(frozen=True)
class _Task:
    job_id: str
    sample_of: JobResult | None = None  # set for a quality sample: the pupil's result


class MasterAnswerer:
    """Answers a job the way the master answers a lesson: the kind's goal, the master template."""

    def __init__(self, settings: Settings, generator: TextGenerator) -> None:
        self._config = settings.master.generator
        self._generator = generator
        self.model_name = generator.model_name

    def answer(self, kind: str, text: str, params: dict[str, str]) -> str:
        """The master model's answer to one job (raises BackendError, InvalidJob)."""
        gen = self._config
        prompt = render_prompt(gen.template, render_goal(kind, text, params))
        limit = min(job_kind(kind).max_tokens, gen.max_tokens)
        params_ = GenerationParams(gen.temperature, gen.top_p, limit, gen.seed)
        answer = self._generator.generate(prompt, params_, system=gen.system)
        return answer.strip() or "(no answer)"


class JobDispatcher:
    """Everything the master does with jobs; :meth:`run` serves until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        answerer: MasterAnswerer,
        embedder: Embedder,
        metrics: MasterJobMetrics,
        stop: threading.Event,
        hooks: ConsumerHooks | None = None,
        model: Dependency | None = None,
        broker: Broker | None = None,
        on_master_answer: Callable[[JobRow, str], None] | None = None,
    ) -> None:
        self.settings = settings
        # Told of every answer the master gives itself (a fallback, a critical kind, a quality
        # sample), on the master worker thread: the master service makes lessons of them.
        self._on_master_answer = on_master_answer
        # The master's model server: while it is down, the master's answers wait for it (the
        # job stays open) instead of going to the submitter as errors.
        self.model = model
        self.config = settings.master.jobs
        self.topology = Topology(
            settings.broker.namespace, settings.broker.quorum_queues, self.config.offloaded
        )
        self.store = store
        self.answerer = answerer
        self.embedder = embedder
        self.metrics = metrics
        self.stop = stop
        self._hooks = hooks  # the intake consumer's (the master counts its dead letters)
        self.broker = broker or RabbitBroker(settings.broker, settings.master_consumer_broker())
        self.identity = IdentityCheck(
            settings.master.verify_node_identity, broker_user(settings.broker.url)
        )
        self.publisher = self.broker.publisher(self.declare, stop)
        self._deadlines: list[tuple[float, str]] = []  # (unix time, job id), a heap
        self._deadlines_lock = threading.Lock()
        self._work: queue.PriorityQueue[tuple[int, int, _Task | None]] = queue.PriorityQueue()
        self._seq = itertools.count()

    def declare(self, channel: BlockingChannel) -> None:
        """The master's whole topology, with one queue per offloaded job kind."""
        self.topology.declare_master(channel)

    # -- intake (consumer worker thread) ---------------------------------------------------

    def handle(self, delivery: Delivery) -> None:
        """A submitted job or a pupil's result; raises DecodeError for anything invalid."""
        if delivery.queue == self.topology.job_results_queue:
            self._on_result(delivery)
        else:
            self._on_submission(delivery)

    def _on_submission(self, delivery: Delivery) -> None:
        props = delivery.properties
        try:
            job = decode(delivery.body, Job)
            render_goal(job.job_kind, job.text, job.params)  # InvalidJob names what is wrong
        except DecodeError as exc:
            # The submitter waits on its reply queue: tell it why, then dead-letter the job.
            self._reply_error(props.reply_to, props.correlation_id, delivery, str(exc))
            raise
        critical = job.job_kind in self.config.critical
        state = "master" if critical else "offloaded"
        if not self.store.add(job, state, props.reply_to, props.correlation_id or job.job_id):
            self._redelivered(job)
            return
        self.metrics.submitted.labels(job.job_kind).inc()
        self.metrics.open.inc()
        if critical:
            log.info("job %s (%s): critical, the master answers it", job.job_id, job.job_kind)
            self._enqueue(_Task(job.job_id), ANSWER)
        else:
            self._offload(job)

    def _offload(self, job: Job) -> None:
        remaining_s = (job.deadline - datetime.now(UTC)).total_seconds()
        if remaining_s <= 0:
            self._fall_back(
                job.job_id, Fallback.DEADLINE, "deadline: it had passed when the job arrived"
            )
            return
        try:
            self.publisher.publish(
                self.topology.jobs_exchange,
                job.job_kind,
                encode(job),
                job.job_id,
                reply_to=self.topology.JOB_RESULT_KEY,
                correlation_id=job.job_id,
                # The broker drops a job nobody took before its deadline; the master has answered
                # it by then. Rounded up so it never expires before the deadline thread fires.
                expiration=str(int(remaining_s * 1000) + 1000),
            )
        except PublishNotConfirmed as exc:
            self._fall_back(job.job_id, Fallback.UNROUTABLE, f"unroutable: {exc}")
            return
        with self._deadlines_lock:
            heapq.heappush(self._deadlines, (job.deadline.timestamp(), job.job_id))
        log.info("job %s (%s): offloaded, deadline in %.1fs", job.job_id, job.job_kind, remaining_s)

    def _on_result(self, delivery: Delivery) -> None:
        result = decode(delivery.body, JobResult)
        self.identity.check(result.answered_by, delivery.properties.user_id)
        if result.answered_by == MASTER:
            raise DecodeError("a job result on the pupils' result queue claims to be the master's")
        row = self.store.get(result.job_id)
        if row is None:
            log.warning(
                "result for unknown job %s from %s ignored", result.job_id, result.answered_by
            )
            return
        if result.error is not None:
            log.warning("job %s: %s failed: %s", row.job_id, result.answered_by, result.error)
            reason = f"pupil failed: {result.answered_by}: {result.error}"
            self._fall_back(row.job_id, Fallback.PUPIL_FAILED, reason)
            return
        # Elapsed time is the submitter's: from submission, not from the pupil's receipt.
        final = result.model_copy(update={"elapsed_s": _since(row.submitted_at), "fallback": None})
        if not self.store.finish(final):
            self.metrics.late.labels(row.kind).inc()
            log.info("job %s: late answer from %s ignored", row.job_id, result.answered_by)
            return
        self._answered(row, final)
        if self._sampled(row.job_id):
            self._enqueue(_Task(row.job_id, sample_of=final), SAMPLE)

    # -- deadlines (deadline thread) -------------------------------------------------------

    def _watch_deadlines(self) -> None:
        while not self.stop.is_set():
            now = time.time()
            due: list[str] = []
            with self._deadlines_lock:
                while self._deadlines and self._deadlines[0][0] <= now:
                    due.append(heapq.heappop(self._deadlines)[1])
                wait = self._deadlines[0][0] - now if self._deadlines else DEADLINE_POLL_S
            for job_id in due:
                self._fall_back(job_id, Fallback.DEADLINE, "deadline: no pupil answered in time")
            self.stop.wait(min(max(wait, 0.0), DEADLINE_POLL_S))

    def _fall_back(self, job_id: str, code: Fallback, reason: str) -> None:
        """Hand an offloaded job to the master, if nobody has answered it yet."""
        if self.store.to_master(job_id, code, reason):
            row = self.store.get(job_id)
            kind = row.kind if row else "?"
            log.info("job %s (%s): the master answers it (%s)", job_id, kind, reason)
            self._enqueue(_Task(job_id), ANSWER)

    # -- the master's own answers (master worker thread) -----------------------------------

    def _enqueue(self, task: _Task, priority: int) -> None:
        self._work.put((priority, next(self._seq), task))

    def _master_loop(self) -> None:
        while (item := self._work.get()[2]) is not None:
            try:
                if item.sample_of is None:
                    self._answer(item.job_id)
                else:
                    self._sample(item.sample_of)
            except Exception:
                # One job must not end the worker; the job stays open and a restart retries it.
                log.exception("master could not do job %s", item.job_id)

    def _answer(self, job_id: str) -> None:
        row = self.store.get(job_id)
        if row is None or row.state != "master":
            return  # a pupil's answer won meanwhile
        started = time.perf_counter()
        error = None
        output = ""
        try:
            answer = self._with_model(lambda: self.answerer.answer(row.kind, row.text, row.params))
            if answer is None:
                return  # stopped while the model was down: the job stays open for the restart
            output = answer
        except Exception as exc:
            error = one_line(f"the master could not answer: {type(exc).__name__}: {exc}")[:2000]
        result = JobResult(
            job_id=row.job_id,
            job_kind=row.kind,
            answered_by=MASTER,
            model=self.answerer.model_name,
            output=output,
            error=error,
            fallback=row.fallback,
            elapsed_s=_since(row.submitted_at),
        )
        if self.store.finish(result):
            self._answered(row, result)
            if row.fallback_code is not None:
                self.metrics.fallbacks.labels(row.kind, row.fallback_code.value).inc()
            if error is None:
                self._master_answered(row, output)
            log.info(
                "job %s (%s): master answered in %.2fs", row.job_id, row.kind,
                time.perf_counter() - started,
            )  # fmt: skip

    def _sample(self, pupil: JobResult) -> None:
        row = self.store.get(pupil.job_id)
        if row is None:
            return

        def answer_and_embed() -> tuple[str, np.ndarray]:
            answer = self.answerer.answer(row.kind, row.text, row.params)
            return answer, self.embedder.embed([pupil.output or " ", answer])

        sampled = self._with_model(answer_and_embed)
        if sampled is None:
            return  # stopped while the model was down; a sample is only a measurement
        master, vectors = sampled
        self._master_answered(row, master)
        agreement = cosine(vectors[0], vectors[1])
        self.store.add_sample(
            row.job_id, row.kind, pupil.answered_by, pupil.output, master, agreement
        )
        self.metrics.agreement.labels(row.kind, self.metrics.node_label(pupil.answered_by)).observe(
            agreement
        )
        log.info(
            "job %s (%s): agreement with %s %.3f",
            row.job_id,
            row.kind,
            pupil.answered_by,
            agreement,
        )

    def _master_answered(self, row: JobRow, answer: str) -> None:
        if self._on_master_answer is None:
            return
        try:
            self._on_master_answer(row, answer)
        except Exception:
            # A lesson that could not be made costs the swarm one lesson, never the job's answer.
            log.exception("job %s: could not make a lesson of the master's answer", row.job_id)

    def _with_model(self, work: Callable[[], T]) -> T | None:
        """``work()``, waiting out outages of the master's model; None if stopped meanwhile."""
        if self.model is None:
            return work()
        return self.model.call(work, self.stop)

    def _sampled(self, job_id: str) -> bool:
        return is_sampled(job_id, self.config.sample_rate)

    # -- replies ---------------------------------------------------------------------------

    def _answered(self, row: JobRow, result: JobResult) -> None:
        self.metrics.open.dec()
        self.metrics.record_answer(
            row.kind, result.answered_by, result.error is None, result.elapsed_s
        )
        self._send(row.reply_to, row.correlation_id, result)

    def _redelivered(self, job: Job) -> None:
        # A submission seen before. Its first handling may have ended anywhere: the reply lost with
        # the connection (send it again), or before the job was published (publish it again; a
        # pupil answering twice costs only a late result, since the first answer stored wins).
        row = self.store.get(job.job_id)
        if row is None:
            return
        if row.result is not None:
            self._send(row.reply_to, row.correlation_id, row.result)
        elif row.state == "offloaded":
            self._offload(job)
        else:
            self._enqueue(_Task(row.job_id), ANSWER)

    def _reply_error(
        self, reply_to: str | None, correlation_id: str | None, delivery: Delivery, reason: str
    ) -> None:
        result = JobResult(
            job_id=(correlation_id or delivery.message_id or "unknown")[:64],
            job_kind="unknown",
            answered_by=MASTER,
            error=f"job refused: {reason}"[:2000],
        )
        self._send(reply_to, correlation_id, result)

    def _send(self, reply_to: str | None, correlation_id: str | None, result: JobResult) -> None:
        if not reply_to:
            return  # fire-and-forget submitter: the result is in the store (`distill-swarm jobs`)
        try:
            self.publisher.publish(
                "", reply_to, encode(result), result.message_id, correlation_id=correlation_id
            )
        except PublishNotConfirmed:
            log.info(
                "job %s: the submitter's queue %s is gone; result kept", result.job_id, reply_to
            )

    # -- lifecycle -------------------------------------------------------------------------

    def recover(self) -> None:
        """Pick up jobs an earlier run left open: deadlines to watch, master answers to give."""
        for row in self.store.open_jobs():
            self.metrics.open.inc()
            if row.state == "master":
                self._enqueue(_Task(row.job_id), ANSWER)
            else:
                with self._deadlines_lock:
                    heapq.heappush(self._deadlines, (row.deadline.timestamp(), row.job_id))

    def consumer(self) -> MessageConsumer:
        """The consumer of submissions and pupils' results (:meth:`run` runs it)."""
        # Like the report consumer, a window of master.prefetch (the broker's consumer config):
        # a burst of submissions must not wait a broker round trip each.
        queues = [self.topology.job_submissions_queue, self.topology.job_results_queue]
        hooks = self._hooks or ConsumerHooks()
        return self.broker.consumer(
            Subscription(self.topology, queues, self.handle, self.declare, hooks)
        )

    def run(self) -> None:
        """Consume submissions and results until ``stop``; the other threads live as long."""
        self.recover()
        threads = [
            threading.Thread(target=self._watch_deadlines, name="job-deadlines", daemon=True),
            threading.Thread(target=self._master_loop, name="job-master", daemon=True),
        ]
        for thread in threads:
            thread.start()
        consumer = self.consumer()
        try:
            consumer.run(self.stop)
        finally:
            self._work.put((-1, -1, None))
            for thread in threads:
                thread.join(timeout=10)
            self.publisher.close()


def is_sampled(job_id: str, rate: float) -> bool:
    """Whether the master also answers this job to measure agreement, at ``rate`` overall.

    Decided by a hash of the job id, not a random draw, so a restarted master (or a redelivered
    result) samples the same jobs.
    """
    digest = hashlib.sha256(job_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def _since(start: datetime) -> float:
    return max(0.0, (datetime.now(UTC) - start).total_seconds())
