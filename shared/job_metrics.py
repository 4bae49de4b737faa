"""Prometheus metrics of job offloading, for the master and for a pupil.

Kept beside :mod:`shared.metrics` (same prefix, same registries) so the lesson metrics module does
not grow a second subject. The ``kind`` label is bounded by the job catalogue (``shared.jobs``),
``node`` by the master's node-label cap, ``by`` is ``pupil`` or ``master``, and ``reason`` is a
:class:`~shared.jobs.Fallback` code.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.jobs import Fallback
from shared.metrics import LLM_BUCKETS_S, PREFIX

JOB_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
AGREEMENT_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
# Why the master answered a job: a critical kind, nobody answered in time, a pupil said it failed.
FALLBACK_REASONS = tuple(code.value for code in Fallback)


class MasterJobMetrics:
    """The master's job figures: submitted, answered by whom, fallbacks, latency, agreement."""

    def __init__(self, registry: CollectorRegistry, node_label: Callable[[str], str]) -> None:
        self.node_label = node_label
        self.submitted = Counter(
            PREFIX + "jobs_submitted", "Jobs accepted from submitters, by kind.", ["kind"],
            registry=registry,
        )  # fmt: skip
        self.answered = Counter(
            PREFIX + "jobs_answered",
            "Jobs answered to their submitter, by kind, by whom (pupil or master) and result.",
            ["kind", "by", "result"],
            registry=registry,
        )
        self.node_answered = Counter(
            PREFIX + "node_jobs_answered",
            "Jobs a pupil answered first (its answer went to the submitter), by node and kind.",
            ["node", "kind"],
            registry=registry,
        )
        self.fallbacks = Counter(
            PREFIX + "job_fallbacks",
            "Jobs the master answered itself, by kind and reason (critical, deadline, "
            "pupil_failed, unroutable).",
            ["kind", "reason"],
            registry=registry,
        )
        self.late = Counter(
            PREFIX + "job_results_late",
            "Pupil results that arrived after the job was answered (by the master, or another "
            "pupil after a redelivery).",
            ["kind"],
            registry=registry,
        )
        self.seconds = Histogram(
            PREFIX + "job_seconds",
            "Seconds from submission to answer, by kind and by whom.",
            ["kind", "by"],
            buckets=JOB_BUCKETS_S,
            registry=registry,
        )
        self.agreement = Histogram(
            PREFIX + "job_agreement",
            "Sampled offloaded jobs: cosine between the pupil's and the master's answer "
            "embeddings, by kind and node.",
            ["kind", "node"],
            buckets=AGREEMENT_BUCKETS,
            registry=registry,
        )
        self.open = Gauge(
            PREFIX + "jobs_open", "Jobs accepted but not answered yet.", registry=registry
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
        self.done = Counter(
            PREFIX + "pupil_jobs",
            "Jobs this node took from a job queue, by kind and result (ok, error, expired).",
            ["kind", "result"],
            registry=registry,
        )
        self.seconds = Histogram(
            PREFIX + "pupil_job_seconds",
            "Seconds this node spent answering one job, by kind.",
            ["kind"],
            buckets=LLM_BUCKETS_S,
            registry=registry,
        )
