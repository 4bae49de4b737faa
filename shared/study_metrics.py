"""Prometheus metrics of a pupil's LoRA study rounds (docs/lora.md).

Kept beside :mod:`shared.metrics` (same prefix, the pupil's registry) as the job metrics are. The
``outcome`` label is one of :data:`OUTCOMES`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from shared.metrics import Declare

# A round takes minutes to tens of minutes on a Pi.
ROUND_BUCKETS_S = (30, 60, 120, 300, 600, 900, 1800, 3600, 7200)
# promoted: better on validation, now served; rejected: not better, the served one stays;
# failed: the round's process failed or timed out.
OUTCOMES = ("promoted", "rejected", "failed")


class StudyMetrics:
    """The served LoRA version and what each study round did."""

    def __init__(self, registry: CollectorRegistry) -> None:
        declare = Declare(registry)
        self.lora_version = declare.gauge(
            "lora_version", "The LoRA adapter version this node serves (0: the base model alone)."
        )
        self.rounds = declare.counter(
            "study_rounds", "LoRA study rounds, by outcome (promoted, rejected, failed).", "outcome"
        )
        for outcome in OUTCOMES:
            self.rounds.labels(outcome)
        self.round_seconds = declare.histogram(
            "study_round_seconds",
            "Wall-clock seconds of a study round (model load, training, validation, export).",
            ROUND_BUCKETS_S,
        )
        self.val_loss = declare.gauge(
            "study_val_loss",
            "Mean answer-token loss on the validation slice of train lessons, of the served "
            "adapter (or base) and of the last round's candidate.",
            "adapter",
        )
        self.peak_rss = declare.gauge(
            "study_peak_rss_bytes", "Peak resident memory of the last study round's process."
        )
        self.studying = declare.gauge("studying", "1 while a study round runs in the background.")
