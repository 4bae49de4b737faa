"""A pupil's job worker: take jobs of the configured kinds, answer them, send the result back.

Jobs come from one shared queue per kind (competing consumers: whichever pupil is free takes the
next one) on a consumer of their own, so a lesson in progress never holds a job's delivery. For
each job:

- a job that does not decode, or that this node does not do, is dead-lettered with the reason, and
  the master is told at once (a result with ``error``), so it answers the job itself instead of
  waiting for the deadline;
- a job whose deadline has passed is dropped: the master has answered it already;
- otherwise the job's goal is answered with the node's guidance method, and the result is
  published to the master (``reply_to`` key, ``correlation_id`` = job id) before the job is acked.
  A node killed mid-job never acks it, so the broker hands it to another pupil.

Backend failures are reported as errors too: the master's answer is faster than waiting for this
node to recover. A model *outage* (``ModelDown``: Ollama unreachable or unavailable) also marks the
node's model down, so the job consumer takes no further job until the model answers a probe
again (shared/health.py): a node without its model must not pull jobs that other pupils could do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from pupil_node.node import PupilNode
from shared.broker import Delivery, Publisher
from shared.errors import BackendError, DecodeError, ModelDown, one_line
from shared.health import Dependency
from shared.job_metrics import PupilJobMetrics
from shared.jobs import InvalidJob, job_kind, render_goal
from shared.messages import Job, JobResult, decode, encode
from shared.topology import Topology

log = logging.getLogger(__name__)


@dataclass(eq=False)
class JobWorker:
    """Handles deliveries from the job queues of one pupil node."""

    node: PupilNode
    publisher: Publisher
    topology: Topology
    metrics: PupilJobMetrics
    # The node's model as a dependency: an outage noticed here pauses the job consumer.
    model: Dependency | None = None

    def handle(self, delivery: Delivery) -> None:
        """Do one job; raises DecodeError for a job to dead-letter (after telling the master)."""
        try:
            job = decode(delivery.body, Job)
            if job.job_kind not in self.node.config.jobs:
                raise InvalidJob(f"node {self.node.node_id} does not do {job.job_kind} jobs")
            goal = render_goal(job.job_kind, job.text, job.params)
        except DecodeError as exc:
            self.metrics.done.labels("unknown", "error").inc()
            job_id = delivery.properties.correlation_id or delivery.message_id or "unknown"
            self._send(JobResult(
                job_id=job_id[:64], job_kind="unknown", answered_by=self.node.node_id,
                error=f"job refused by {self.node.node_id}: {exc}"[:2000],
            ))  # fmt: skip
            raise
        if job.deadline <= datetime.now(UTC):
            log.info("job %s (%s): deadline passed, dropped", job.job_id, job.job_kind)
            self.metrics.done.labels(job.job_kind, "expired").inc()
            return
        log.info("job %s (%s): started", job.job_id, job.job_kind)
        started = time.perf_counter()
        try:
            answer = self.node.answer_job(goal, job_kind(job.job_kind).max_tokens)
            output, error = answer.text, None
        except BackendError as exc:
            output, error = "", one_line(f"{type(exc).__name__}: {exc}")[:2000]
            if isinstance(exc, ModelDown) and self.model is not None:
                self.model.mark_down(exc)
        elapsed = time.perf_counter() - started
        self._send(JobResult(
            job_id=job.job_id, job_kind=job.job_kind, answered_by=self.node.node_id,
            model=self.node.generator.model_name, output=output, error=error, elapsed_s=elapsed,
            guidance=self.node.config.guidance.method,
        ))  # fmt: skip
        self.metrics.done.labels(job.job_kind, "ok" if error is None else "error").inc()
        self.metrics.seconds.labels(job.job_kind).observe(elapsed)
        log.info("job %s (%s): answered in %.2fs", job.job_id, job.job_kind, elapsed)

    def _send(self, result: JobResult) -> None:
        # One message id per (job, node): a result sent again after a lost ack is recognisably
        # the same result.
        self.publisher.publish(
            self.topology.reports_exchange,
            self.topology.JOB_RESULT_KEY,
            encode(result),
            f"{result.job_id}:{self.node.node_id}",
            correlation_id=result.job_id,
        )
