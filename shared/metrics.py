"""Prometheus metrics of the lesson flow and the services, for the master and the pupil nodes.

Job offloading's metrics live beside these in :mod:`shared.job_metrics`, study rounds' in
:mod:`shared.study_metrics` (same prefix, same registries).

Names follow Prometheus' conventions: the prefix ``distill_swarm_``, base units (seconds),
``_total`` on counters (prometheus-client appends it). Two families:

- ``distill_swarm_<what>``: this process's own figures (a pupil's lessons and stage latencies, the
  master's model calls and ingestion);
- ``distill_swarm_node_<what>{node=...}``: the master's re-export of every pupil's latest figures,
  taken from the reports and heartbeats it ingests, so a node behind NAT is visible without being
  scraped.

Each service builds its own metrics object with its own :class:`CollectorRegistry` (plus the
process, platform and GC collectors) instead of using the library's global default registry: two
services in one process (tests) never collide, and a process exports exactly what its object
defines.

Recording happens at the edges of the lesson flow, from data the flow already produces: the
pupil's :class:`~shared.messages.Report` (timings, loss, similarities), the reports and heartbeats
the master ingests, the consumer's ``on_rejected`` hook and its ``connected`` event. The lesson
flow itself (``pupil_node/node.py``) makes no metric calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar, get_args
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from shared import __version__
from shared.backends import Embedder, GenerationParams, TextGenerator
from shared.broker import ConsumerHooks, Delivery, Settlement
from shared.config import GuidanceMethod
from shared.errors import ReasonCode
from shared.health import Dependency
from shared.messages import NodeInfo, Report, decode

log = logging.getLogger(__name__)

# No `<name>_created` series beside every counter and histogram: Prometheus' text format turns them
# into extra gauges nobody queries. (A process-wide switch in prometheus-client: it applies to the
# job and study metrics too.)
disable_created_metrics()

PREFIX = "distill_swarm_"
NODE_PREFIX = PREFIX + "node_"

# Histogram bucket upper bounds, in seconds. LLM answers take from tens of milliseconds (a 270M
# model, a few tokens) to minutes (a CPU-bound master model or a Pi); embeddings are faster;
# adapter training is milliseconds for a few steps on a small MLP and seconds on a slow Pi.
LLM_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
EMBED_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TRAIN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

SPLITS = ("train", "eval")
# Why a message was dead-lettered, coarsely: a fixed set keeps the `reason` label bounded. The
# values are what the dashboard and alert rules (deploy/) know: never rename one.
REASON_INVALID = "invalid"  # did not decode or validate
REASON_EMBEDDING_MISMATCH = "embedding_mismatch"  # a lesson from another embedding space
REASON_HANDLER_ERROR = "handler_error"  # the handler crashed on it twice
REJECT_REASONS = (REASON_INVALID, REASON_EMBEDDING_MISMATCH, REASON_HANDLER_ERROR)
# The `reason` label of each code a message can be dead-lettered with (shared.errors).
REJECT_LABELS: dict[ReasonCode, str] = {
    ReasonCode.TOO_LARGE: REASON_INVALID,
    ReasonCode.BAD_JSON: REASON_INVALID,
    ReasonCode.INVALID_MESSAGE: REASON_INVALID,
    ReasonCode.INVALID_JOB: REASON_INVALID,
    ReasonCode.WRONG_SENDER: REASON_INVALID,
    ReasonCode.WRONG_EMBEDDING_SPACE: REASON_EMBEDDING_MISMATCH,
    ReasonCode.HANDLER_ERROR: REASON_HANDLER_ERROR,
}

# `method` label of held-out similarity: the three figures every eval report carries, then each
# guidance method measured on eval lessons. A `plain` guided answer is the plain answer again
# (same prompt, same seed), so it is not a method of its own here.
PLAIN, ADAPTER, GUIDED = "plain", "adapter", "guided"
HELDOUT_METHODS = (PLAIN, ADAPTER, GUIDED, *(m for m in get_args(GuidanceMethod) if m != PLAIN))

# Nodes beyond the master's label cap share this label. A leading underscore can never start a
# real node id (ids must start with a letter or digit), so the bucket cannot mix with a node.
OTHER_NODE = "_other"

_Metric = TypeVar("_Metric", Histogram, Gauge)


class Declare:
    """Declares metrics in one registry, named ``prefix + name``: every family of this project.

    One place spells the registry and the prefix, so a module of metrics reads as a list of
    names, help texts and labels.
    """

    def __init__(self, registry: CollectorRegistry, prefix: str = PREFIX) -> None:
        self.registry = registry
        self.prefix = prefix

    def counter(self, name: str, doc: str, *labels: str) -> Counter:
        """A counter (prometheus-client appends ``_total`` to its name)."""
        return Counter(self.prefix + name, doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, *labels: str) -> Gauge:
        """A gauge."""
        return Gauge(self.prefix + name, doc, labels, registry=self.registry)

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...], *labels: str) -> Histogram:
        """A histogram with ``buckets`` (upper bounds)."""
        return Histogram(self.prefix + name, doc, labels, buckets=buckets, registry=self.registry)


def heldout_figures(report: Report) -> dict[str, float]:
    """An eval report's similarities by `method` label; unknown method names are left out."""
    figures = {
        PLAIN: report.similarity_before,
        ADAPTER: report.similarity_adapted,
        GUIDED: report.similarity_guided,
    }
    found = {method: value for method, value in figures.items() if value is not None}
    for method, value in report.guided.items():
        if method in HELDOUT_METHODS and method != PLAIN:
            found[method] = value
    return found


class ServiceMetrics:
    """What both roles export: build info, broker connection state, dead letters."""

    def __init__(self, role: str, queues: tuple[str, ...]) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.declare = declare = Declare(self.registry)
        build_info = declare.gauge(
            "build_info",
            "Always 1; the labels say which software version and role this process runs.",
            "version",
            "role",
        )
        build_info.labels(__version__, role).set(1)
        self.broker_connected = declare.gauge(
            "broker_connected",
            "1 while this process's consumer holds an open broker connection, else 0.",
        )
        self.messages_rejected = declare.counter(
            "messages_rejected",
            "Messages dead-lettered by this process, by queue kind and reason class.",
            "queue",
            "reason",
        )
        # Every known series exists from the start at 0, so increase() sees the first rejection.
        for queue in queues:
            for reason in REJECT_REASONS:
                self.messages_rejected.labels(queue, reason)
        self.model_up = declare.gauge(
            "model_up",
            "1 while this process's model server answers; 0 during an outage, while intake is "
            "paused and the server is probed.",
            "role",
        ).labels(role)
        self.model_up.set(1)
        self.model_outages = declare.counter(
            "model_outages",
            "Outages of this process's model server: each paused intake until a probe succeeded.",
            "role",
        ).labels(role)

    def watch_model(self, model: Dependency) -> None:
        """Export ``model``'s state as model_up and count its outages."""

        def changed(up: bool, _reason: str) -> None:
            self.model_up.set(1 if up else 0)
            if not up:
                self.model_outages.inc()

        model.on_change(changed)

    def watch_connection(self, connected: threading.Event) -> None:
        """Report ``connected`` (a Consumer's event) as the broker_connected gauge."""
        self.broker_connected.set_function(lambda: 1.0 if connected.is_set() else 0.0)

    def rejected(self, queue: str, code: ReasonCode) -> None:
        """Count one message dead-lettered with ``code`` from a queue of kind ``queue``."""
        self.messages_rejected.labels(queue, REJECT_LABELS[code]).inc()


class CountRejected(ConsumerHooks):
    """Consumer hooks that count dead letters; ``kinds`` maps each queue to its `queue` label."""

    def __init__(self, metrics: ServiceMetrics, kinds: Mapping[str, str]) -> None:
        self._metrics = metrics
        self._kinds = dict(kinds)

    def on_rejected(self, delivery: Delivery, settlement: Settlement) -> None:
        self._metrics.rejected(self._kinds[delivery.queue], settlement.code)


class ReportFigures:
    """What a pupil's reports say: stage latencies, training loss, held-out similarity.

    A pupil records its own reports into unlabelled metrics named ``distill_swarm_...``; the master
    records every node's into metrics named ``distill_swarm_node_...`` labelled by node.
    """

    def __init__(self, registry: CollectorRegistry, prefix: str, labels: tuple[str, ...]) -> None:
        subject, source = ("the node", ", from its reports") if labels else ("this node", "")
        declare = Declare(registry, prefix)

        def histogram(stage: str, buckets: tuple[float, ...], what: str) -> Histogram:
            doc = f"Seconds {subject} spent on {what} per lesson{source}."
            return declare.histogram(f"{stage}_seconds", doc, buckets, *labels)

        self.generate = histogram("generate", LLM_BUCKETS_S, "plain answer generation")
        self.embed = histogram("embed", EMBED_BUCKETS_S, "embedding of answer and goal")
        self.train = histogram("train", TRAIN_BUCKETS_S, "adapter training (train lessons)")
        self.guide = histogram("guide", LLM_BUCKETS_S, "guided answers (eval lessons)")
        self.loss = declare.gauge(
            "adapter_loss",
            f"Training loss of {subject}'s answer adapter, last step of its latest train lesson"
            f"{source}.",
            *labels,
        )
        self.heldout = declare.gauge(
            "heldout_similarity",
            f"Cosine to the master's answer on {subject}'s latest eval lesson (never trained on)"
            f"{source}, "
            "by method: plain, adapter (the adapter's vector), guided (what the node says), "
            "and each guidance method measured.",
            *labels,
            "method",
        )

    def record(self, report: Report, *label_values: str) -> None:
        """Observe one report's figures; error reports carry none."""
        if report.error is not None:
            return
        timings = report.timings
        self._child(self.generate, label_values).observe(timings.generate_ms / 1000.0)
        self._child(self.embed, label_values).observe(timings.embed_ms / 1000.0)
        if report.trained:
            self._child(self.train, label_values).observe(timings.train_ms / 1000.0)
        if report.guided:
            self._child(self.guide, label_values).observe(timings.guide_ms / 1000.0)
        self.set_gauges(report, *label_values)

    def set_gauges(self, report: Report, *label_values: str) -> None:
        """Set the gauges a report carries (latest loss, held-out similarity), nothing else."""
        if report.error is not None:
            return
        if report.trained and report.losses:
            self._child(self.loss, label_values).set(report.losses[-1])
        if report.split == "eval":
            for method, value in heldout_figures(report).items():
                self.heldout.labels(*label_values, method).set(value)

    @staticmethod
    def _child(metric: _Metric, label_values: tuple[str, ...]) -> _Metric:
        # prometheus-client refuses .labels() on a metric declared without labels.
        return metric.labels(*label_values) if label_values else metric


class PupilMetrics(ServiceMetrics):
    """A pupil node's own metrics."""

    def __init__(self) -> None:
        super().__init__("pupil", queues=("lessons", "jobs"))
        self.lessons_consumed = self.declare.counter(
            "lessons_consumed",
            "Lessons this node answered, measured and journalled (new work, not replays).",
            "split",
        )
        for split in SPLITS:
            self.lessons_consumed.labels(split)
        self.lessons_replayed = self.declare.counter(
            "lessons_replayed",
            "Redelivered lessons answered again from the journal, without new work.",
        )
        self.figures = ReportFigures(self.registry, PREFIX, ())
        self.state_free_bytes = self.declare.gauge(
            "state_free_bytes",
            "Bytes free on the file system of this node's state directory (checkpoints, journal, "
            "memory). Below pupil.min_free_bytes the node takes no new lesson.",
        )

    def watch_stream(self, position: Callable[[], tuple[int, int, int]]) -> None:
        """Export ``position()`` = (offset, head, lost), read at each scrape, as the lesson stream
        gauges (docs/stream.md)."""
        offset = self.declare.gauge(
            "lesson_stream_offset", "The highest lesson stream offset this node has done."
        )
        lag = self.declare.gauge(
            "lesson_stream_lag",
            "Stream offsets between this node's and the head it last saw: an upper bound of the "
            "lessons it has still to catch up on (0 when caught up).",
        )
        lost = self.declare.gauge(
            "lesson_stream_lost",
            "Stream offsets retention dropped before this node got them (lessons it can no "
            "longer learn); the node's log and `distill-swarm status` give the range.",
        )
        offset.set_function(lambda: float(position()[0]))
        lag.set_function(lambda: float(max(0, position()[1] - position()[0])))
        lost.set_function(lambda: float(position()[2]))

    def watch_free_space(self, free_bytes: Callable[[], int]) -> None:
        """Report ``free_bytes()`` (measured at each scrape) as the state_free_bytes gauge."""
        self.state_free_bytes.set_function(lambda: float(free_bytes()))

    def record_lesson(self, report_body: bytes, replayed: bool) -> None:
        """Record one finished lesson from the encoded report the lesson flow produced."""
        if replayed:
            self.lessons_replayed.inc()
            return
        report = decode(report_body, Report)
        self.lessons_consumed.labels(report.split).inc()
        self.figures.record(report)


class NodeLabels:
    """Node ids to `node` label values: at most ``limit`` distinct ids, later ones share one label.

    Why a cap: every node costs the master about 80 series (histogram buckets included), in its
    own memory and in Prometheus. Node ids are checked by pattern, not by number, so a fleet that
    renames its nodes on every boot, or anyone holding a pupil's credentials, could otherwise grow
    both without bound. First come, first labelled, for the life of the process; the rest are
    counted under :data:`OTHER_NODE`, whose gauges hold whichever of them spoke last.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, node_id: str) -> str:
        with self._lock:
            if node_id in self._known:
                return node_id
            if len(self._known) < self._limit:
                self._known.add(node_id)
                return node_id
            return OTHER_NODE


class MasterMetrics(ServiceMetrics):
    """The master's own metrics and its re-export of every node's latest figures."""

    def __init__(self, max_nodes: int = 256) -> None:
        super().__init__("master", queues=("reports", "control", "jobs", "job_results"))
        self.node_label = NodeLabels(max_nodes)
        declare, per_node = self.declare, Declare(self.registry, NODE_PREFIX)
        self.lessons_published = declare.counter(
            "lessons_published", "Lessons published (confirmed by the broker)."
        )
        self.taught = declare.counter(
            "teach_requests",
            "Prompts sent with `distill-swarm teach`, answered by outcome: published, "
            "already_published (nothing new sent), refused (an eval prompt's text), failed.",
            "outcome",
        )
        self.generate_seconds = declare.histogram(
            "generate_seconds", "Seconds the master model took per answer.", LLM_BUCKETS_S
        )
        self.embed_seconds = declare.histogram(
            "embed_seconds",
            "Seconds the master's embedder took per call (cache hits make no call).",
            EMBED_BUCKETS_S,
        )
        self.reports_ingested = declare.counter(
            "reports_ingested",
            "New reports stored, by node and result (ok, or error: the node could not do it).",
            "node",
            "result",
        )
        self.reports_duplicate = declare.counter(
            "reports_duplicate",
            "Reports received again for a (lesson, node) already stored (at-least-once delivery).",
            "node",
        )
        self.node_last_seen = per_node.gauge(
            "last_seen_timestamp_seconds",
            "Unix time the master last received anything from the node.",
            "node",
        )
        self.node_online = per_node.gauge(
            "online", "1 after the node's hello or heartbeat, 0 after its goodbye.", "node"
        )
        self.node_lessons_done = per_node.gauge(
            "lessons_done", "Lessons the node has done, from its latest hello or heartbeat.", "node"
        )
        self.node_adapter_version = per_node.gauge(
            "adapter_version",
            "Train lessons in the node's adapter, from its latest hello or heartbeat.",
            "node",
        )
        self.node_lora_version = per_node.gauge(
            "lora_version",
            "The LoRA adapter version the node serves (0: its base model alone), from its latest "
            "hello or heartbeat.",
            "node",
        )
        self.node_stream_lag = per_node.gauge(
            "lesson_stream_lag",
            "Lesson stream offsets between the node's and the head it last saw, from its latest "
            "heartbeat: an upper bound of the lessons it has still to catch up on.",
            "node",
        )
        self.node_stream_lost = per_node.gauge(
            "lesson_stream_lost",
            "Lesson stream offsets retention dropped before the node got them (lessons it can no "
            "longer learn), from its latest heartbeat.",
            "node",
        )
        self.node_duplicate_messages = per_node.counter(
            "duplicate_messages",
            "Hellos and heartbeats from one process of a node id while another process of that "
            "id also spoke: two machines with one node id (a cloned SD card); alert on any rise.",
            "node",
        )
        self.figures = ReportFigures(self.registry, NODE_PREFIX, ("node",))

    def timed_generator(self, generator: TextGenerator) -> TextGenerator:
        """``generator``, recording each answer's duration in generate_seconds."""
        return _TimedGenerator(generator, self.generate_seconds)

    def timed_embedder(self, embedder: Embedder) -> Embedder:
        """``embedder``, recording each call's duration in embed_seconds."""
        return _TimedEmbedder(embedder, self.embed_seconds)

    def record_report(self, report: Report, new: bool) -> None:
        """Record one ingested report; ``new`` is False for a duplicate."""
        node = self.node_label(report.node_id)
        self.node_last_seen.labels(node).set(time.time())
        if not new:
            self.reports_duplicate.labels(node).inc()
            return
        self.reports_ingested.labels(node, "ok" if report.error is None else "error").inc()
        self.figures.record(report, node)

    def restore_node(
        self, info: NodeInfo, online: bool, last_seen_s: float, latest: list[Report]
    ) -> None:
        """Set a node's gauges from the store after a master restart.

        Only gauges move: counters and histograms describe this process, and replaying old
        reports into them would count work twice. Without this, a node that died before the
        restart would have no last-seen gauge, and the node-silent alert could never fire for it.
        """
        node = self._set_node(info, online, last_seen_s)
        for report in latest:
            self.figures.set_gauges(report, node)

    def record_duplicate(self, node_id: str) -> None:
        """Count a control message from a second process speaking for ``node_id``."""
        self.node_duplicate_messages.labels(self.node_label(node_id)).inc()

    def record_node(self, info: NodeInfo, online: bool) -> None:
        """Record a hello or heartbeat (``online``) or a goodbye."""
        self._set_node(info, online, time.time())

    def _set_node(self, info: NodeInfo, online: bool, last_seen_s: float) -> str:
        """Set the gauges a hello, heartbeat or goodbye carries; returns the node's label."""
        node = self.node_label(info.node_id)
        self.node_last_seen.labels(node).set(last_seen_s)
        self.node_online.labels(node).set(1.0 if online else 0.0)
        self.node_lessons_done.labels(node).set(info.lessons_done)
        self.node_adapter_version.labels(node).set(info.adapter_version)
        self.node_lora_version.labels(node).set(info.lora_version)
        if info.stream_offset is not None and info.stream_head is not None:
            self.node_stream_lag.labels(node).set(max(0, info.stream_head - info.stream_offset))
        if info.stream_lost_first is not None and info.stream_lost_last is not None:
            lost = info.stream_lost_last - info.stream_lost_first + 1
            self.node_stream_lost.labels(node).set(lost)
        return node


@contextmanager
def _observed(histogram: Histogram) -> Iterator[None]:
    """Observe the block's duration in ``histogram`` if it returns; a raise records nothing."""
    started = time.perf_counter()
    yield
    histogram.observe(time.perf_counter() - started)


class _TimedGenerator:
    """A TextGenerator that records how long each successful answer took."""

    def __init__(self, inner: TextGenerator, histogram: Histogram) -> None:
        self._inner = inner
        self._histogram = histogram
        self.model_name = inner.model_name

    def generate(self, prompt: str, params: GenerationParams, system: str | None = None) -> str:
        with _observed(self._histogram):
            return self._inner.generate(prompt, params, system=system)


class _TimedEmbedder:
    """An Embedder that records how long each successful call took."""

    def __init__(self, inner: Embedder, histogram: Histogram) -> None:
        self._inner = inner
        self._histogram = histogram
        self.model_name = inner.model_name
        self.dim = inner.dim

    def embed(self, texts: list[str]) -> np.ndarray:
        with _observed(self._histogram):
            return self._inner.embed(texts)


@dataclass
class MetricsServer:
    """The HTTP server behind ``/metrics``, running in a daemon thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        """The scrape URL."""
        host, port = self.server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(registry: CollectorRegistry, addr: str, port: int) -> MetricsServer | None:
    """Serve ``registry`` at ``http://addr:port/metrics`` in a daemon thread; port 0 turns it off.

    A port that cannot be bound is logged and skipped rather than raised: metrics are for watching
    the swarm, never a reason for a node to stop learning.
    """
    if port == 0:
        return None
    try:
        server, thread = start_http_server(port, addr, registry)
    except OSError as exc:
        log.error("metrics are off: cannot listen on %s:%d (%s)", addr, port, exc)
        return None
    metrics_server = MetricsServer(server, thread)
    log.info("metrics at %s", metrics_server.url)
    return metrics_server
