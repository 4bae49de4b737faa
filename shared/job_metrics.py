"""Prometheus metrics of job offloading, for the master and for a pupil.

Kept beside :mod:`shared.metrics` (same prefix, same registries) so the lesson metrics module does
not grow a second subject. The ``kind`` label is bounded by the job catalogue (``shared.jobs``),
``node`` by the master's node-label cap, ``by`` is ``pupil`` or ``master``, and ``reason`` is a
:class:`~shared.jobs.Fallback` code.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry

from shared.jobs import Fallback
from shared.metrics import LLM_BUCKETS_S, Declare

JOB_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
AGREEMENT_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
# Why the master answered a job: a critical kind, nobody answered in time, a pupil said it failed.
FALLBACK_REASONS = tuple(code.value for code in Fallback)


class MasterJobMetrics:
    """The master's job figures: submitted, answered by whom, fallbacks, latency, agreement."""

    def __init__(self, registry: CollectorRegistry, node_label: Callable[[str], str]) -> None:
        self.node_label = node_label
        declare = Declare(registry)
        self.submitted = declare.counter(
            "jobs_submitted", "Jobs accepted from submitters, by kind.", "kind"
        )
        self.answered = declare.counter(
            "jobs_answered",
            "Jobs answered to their submitter, by kind, by whom (pupil or master) and result.",
            "kind",
            "by",
            "result",
        )
        self.node_answered = declare.counter(
            "node_jobs_answered",
            "Jobs a pupil answered first (its answer went to the submitter), by node and kind.",
            "node",
            "kind",
        )
        self.fallbacks = declare.counter(
            "job_fallbacks",
            "Jobs the master answered itself, by kind and reason (critical, deadline, "
            "pupil_failed, unroutable).",
            "kind",
            "reason",
        )
        self.late = declare.counter(
            "job_results_late",
            "Pupil results that arrived after the job was answered (by the master, or another "
            "pupil after a redelivery).",
            "kind",
        )
        self.seconds = declare.histogram(
            "job_seconds",
            "Seconds from submission to answer, by kind and by whom.",
            JOB_BUCKETS_S,
            "kind",
            "by",
        )
        self.agreement = declare.histogram(
            "job_agreement",
            "Sampled offloaded jobs: cosine between the pupil's and the master's answer "
            "embeddings, by kind and node.",
            AGREEMENT_BUCKETS,
            "kind",
            "node",
        )
        self.open = declare.gauge("jobs_open", "Jobs accepted but not answered yet.")
        self.lessons = declare.counter(
            "job_lessons",
            "Jobs the master answered itself, made into train lessons (master.jobs.to_lessons), "
            "by kind and outcome: published, already_published (the same text before), refused "
            "(an eval prompt's text), failed.",
            "kind",
            "outcome",
        )

    def record_answer(self, kind: str, answered_by: str, ok: bool, seconds: float) -> None:
        """Count one answer sent to a submitter (``answered_by`` is a node id or ``master``)."""
        by = "master" if answered_by == "master" else "pupil"
        self.answered.labels(kind, by, "ok" if ok else "error").inc()
        self.seconds.labels(kind, by).observe(seconds)
        if by == "pupil":
            self.node_answered.labels(self.node_label(answered_by), kind).inc()


class PupilJobMetrics:
    """A pupil's own job figures."""

    def __init__(self, registry: CollectorRegistry) -> None:
        declare = Declare(registry)
        self.done = declare.counter(
            "pupil_jobs",
            "Jobs this node took from a job queue, by kind and result (ok, error, expired).",
            "kind",
            "result",
        )
        self.seconds = declare.histogram(
            "pupil_job_seconds",
            "Seconds this node spent answering one job, by kind.",
            LLM_BUCKETS_S,
            "kind",
        )
