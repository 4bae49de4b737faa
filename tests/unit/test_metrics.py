"""Metrics: what each report, heartbeat and dead letter does to the exported figures."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from master.service import restore_metrics
from master.store import Store
from pupil_node.node import PupilNode
from shared.backends import GenerationParams
from shared.broker import Action, settlement_for
from shared.errors import DEAD_LETTER_CODES, DecodeError, EmbeddingMismatch, ReasonCode
from shared.messages import Embedding, Lesson, NodeInfo, Report, Timings, decode, encode
from shared.metrics import (
    HELDOUT_METHODS,
    OTHER_NODE,
    REASON_EMBEDDING_MISMATCH,
    REASON_HANDLER_ERROR,
    REASON_INVALID,
    REJECT_LABELS,
    REJECT_REASONS,
    MasterMetrics,
    PupilMetrics,
    serve,
)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def train_report(node: str = "pi-7", lesson: str = "l1") -> Report:
    return Report(
        lesson_id=lesson,
        node_id=node,
        split="train",
        pupil_model="ollama:phi4-mini",
        pupil_answer="a",
        similarity_before=0.5,
        similarity_adapted=0.6,
        losses=[0.4, 0.2],
        timings=Timings(generate_ms=1500, embed_ms=20, train_ms=3),
        adapter_version=1,
        trained=True,
    )


def eval_report(node: str = "pi-7", lesson: str = "l2") -> Report:
    return Report(
        lesson_id=lesson,
        node_id=node,
        split="eval",
        pupil_model="ollama:phi4-mini",
        pupil_answer="a",
        similarity_before=0.5,
        similarity_adapted=0.55,
        similarity_guided=0.7,
        guided={"retrieval": 0.7, "best_of_k": 0.65, "plain": 0.5, "made-up": 0.9},
        timings=Timings(generate_ms=1000, embed_ms=10, guide_ms=4000),
    )


def node_info(node: str = "pi-7", lessons: int = 3) -> NodeInfo:
    return NodeInfo(
        node_id=node,
        software_version="0.1.0",
        pupil_model="ollama:phi4-mini",
        embedding_model="mxbai-embed-large",
        embedding_dim=1024,
        adapter_version=2,
        lessons_done=lessons,
    )


# -- dead-letter reasons ----------------------------------------------------------------------


def test_every_dead_letter_code_has_a_label_the_dashboard_knows() -> None:
    assert set(REJECT_LABELS) == DEAD_LETTER_CODES
    assert set(REJECT_LABELS.values()) == set(REJECT_REASONS)
    assert REJECT_REASONS == ("invalid", "embedding_mismatch", "handler_error")  # deploy/ uses them


def label_of(exc: Exception) -> str:
    """The `reason` label a consumer's dead letter of a handler raising ``exc`` counts under."""
    settlement = settlement_for(exc, redelivered=True)
    assert settlement.action is Action.DEAD_LETTER
    return REJECT_LABELS[settlement.code]


def test_reason_labels_come_from_the_codes_the_flow_raises() -> None:
    # A handler that crashed twice.
    assert label_of(ValueError("boom")) == REASON_HANDLER_ERROR

    # The node's reason for a lesson from another embedding space.
    lesson = Lesson(
        lesson_id="l1",
        task="qa",
        prompt="p",
        goal_text="g",
        master_model="m",
        master_answer="a",
        reference=Embedding.from_array("other-model", np.ones(4, dtype=np.float32)),
        split="train",
    )
    stub = SimpleNamespace(reference_model="all-minilm-l6-v2", reference_dim=384, node_id="a")
    with pytest.raises(EmbeddingMismatch) as mismatch:
        PupilNode.check(cast(PupilNode, stub), lesson)
    assert label_of(mismatch.value) == REASON_EMBEDDING_MISMATCH

    # Anything that failed to decode, whatever its text says.
    with pytest.raises(DecodeError) as not_json:
        decode(b"not json")
    assert not_json.value.code is ReasonCode.BAD_JSON
    assert label_of(not_json.value) == REASON_INVALID
    with pytest.raises(DecodeError) as invalid:
        decode(b'{"kind": "lesson"}')
    assert invalid.value.code is ReasonCode.INVALID_MESSAGE
    assert label_of(DecodeError("handler failed: is embedded with")) == REASON_INVALID


def test_every_rejection_series_exists_from_the_start() -> None:
    metrics = PupilMetrics()
    name = "distill_swarm_messages_rejected_total"
    for reason in (REASON_INVALID, REASON_EMBEDDING_MISMATCH, REASON_HANDLER_ERROR):
        assert value(metrics.registry, name, queue="lessons", reason=reason) == 0
    metrics.rejected("lessons", ReasonCode.HANDLER_ERROR)
    assert value(metrics.registry, name, queue="lessons", reason=REASON_HANDLER_ERROR) == 1


# -- a pupil's own figures --------------------------------------------------------------------


def test_pupil_records_a_train_lesson_from_its_report() -> None:
    metrics = PupilMetrics()
    metrics.record_lesson(encode(train_report()), replayed=False)
    r = metrics.registry
    assert value(r, "distill_swarm_lessons_consumed_total", split="train") == 1
    assert value(r, "distill_swarm_lessons_consumed_total", split="eval") == 0
    assert value(r, "distill_swarm_generate_seconds_sum") == pytest.approx(1.5)
    assert value(r, "distill_swarm_generate_seconds_bucket", le="2.5") == 1
    assert value(r, "distill_swarm_generate_seconds_bucket", le="1.0") == 0
    # Training in milliseconds lands in a bucket of its own, not in the first one.
    assert value(r, "distill_swarm_train_seconds_bucket", le="0.0025") == 0
    assert value(r, "distill_swarm_train_seconds_bucket", le="0.005") == 1
    assert value(r, "distill_swarm_adapter_loss") == pytest.approx(0.2)
    # Train lessons are not held out: no similarity from them.
    assert value(r, "distill_swarm_heldout_similarity", method="plain") is None
    assert value(r, "distill_swarm_guide_seconds_count") == 0


def test_pupil_records_held_out_similarity_per_method_from_an_eval_lesson() -> None:
    metrics = PupilMetrics()
    metrics.record_lesson(encode(eval_report()), replayed=False)
    r = metrics.registry
    figures = {
        method: value(r, "distill_swarm_heldout_similarity", method=method)
        for method in HELDOUT_METHODS
    }
    assert figures == {
        "plain": 0.5,
        "adapter": 0.55,
        "guided": 0.7,
        "best_of_k": 0.65,
        "retrieval": 0.7,
        "retrieval+best_of_k": None,
        "lora": None,  # no LoRA was served when this lesson was answered
        "lora+retrieval": None,
    }
    # A method name nobody knows does not become a label value.
    assert value(r, "distill_swarm_heldout_similarity", method="made-up") is None
    assert value(r, "distill_swarm_guide_seconds_sum") == pytest.approx(4.0)
    assert value(r, "distill_swarm_train_seconds_count") == 0


def test_a_replayed_lesson_is_not_counted_as_new_work() -> None:
    metrics = PupilMetrics()
    metrics.record_lesson(encode(train_report()), replayed=True)
    r = metrics.registry
    assert value(r, "distill_swarm_lessons_replayed_total") == 1
    assert value(r, "distill_swarm_lessons_consumed_total", split="train") == 0
    assert value(r, "distill_swarm_generate_seconds_count") == 0


# -- the master ---------------------------------------------------------------------------------


def test_master_reexports_each_nodes_latest_figures() -> None:
    metrics = MasterMetrics()
    metrics.record_node(node_info("pi-7", lessons=3), online=True)
    metrics.record_report(train_report("pi-7"), new=True)
    metrics.record_report(eval_report("pi-7"), new=True)
    metrics.record_report(eval_report("pi-7"), new=False)
    r = metrics.registry
    assert value(r, "distill_swarm_reports_ingested_total", node="pi-7", result="ok") == 2
    assert value(r, "distill_swarm_reports_duplicate_total", node="pi-7") == 1
    assert value(r, "distill_swarm_node_adapter_loss", node="pi-7") == pytest.approx(0.2)
    assert value(r, "distill_swarm_node_heldout_similarity", node="pi-7", method="guided") == 0.7
    assert value(r, "distill_swarm_node_lessons_done", node="pi-7") == 3
    assert value(r, "distill_swarm_node_adapter_version", node="pi-7") == 2
    assert value(r, "distill_swarm_node_online", node="pi-7") == 1
    assert value(r, "distill_swarm_node_generate_seconds_count", node="pi-7") == 2
    assert (value(r, "distill_swarm_node_last_seen_timestamp_seconds", node="pi-7") or 0) > 0

    metrics.record_node(node_info("pi-7"), online=False)
    assert value(r, "distill_swarm_node_online", node="pi-7") == 0


def test_an_error_report_is_counted_but_carries_no_figures() -> None:
    metrics = MasterMetrics()
    refusal = Report(lesson_id="l1", node_id="pi-7", split="train", pupil_model="m", error="no")
    metrics.record_report(refusal, new=True)
    r = metrics.registry
    assert value(r, "distill_swarm_reports_ingested_total", node="pi-7", result="error") == 1
    assert value(r, "distill_swarm_node_generate_seconds_count", node="pi-7") is None


def test_node_labels_are_capped_and_the_rest_share_one_bucket() -> None:
    metrics = MasterMetrics(max_nodes=2)
    for node in ("a", "b", "c", "d", "a"):
        metrics.record_report(train_report(node, lesson=f"l-{node}"), new=True)
    r = metrics.registry
    assert value(r, "distill_swarm_reports_ingested_total", node="a", result="ok") == 2
    assert value(r, "distill_swarm_reports_ingested_total", node="b", result="ok") == 1
    assert value(r, "distill_swarm_reports_ingested_total", node=OTHER_NODE, result="ok") == 2
    assert value(r, "distill_swarm_reports_ingested_total", node="c", result="ok") is None


def test_master_times_its_own_model_calls() -> None:
    class Generator:
        model_name = "fake:gen"

        def generate(self, prompt: str, params: GenerationParams, system: str | None = None) -> str:
            return prompt.upper()

    class Embedder:
        model_name = "fake-embed"
        dim = 2

        def embed(self, texts: list[str]) -> np.ndarray:
            return np.ones((len(texts), 2), dtype=np.float32)

    metrics = MasterMetrics()
    generator = metrics.timed_generator(Generator())
    embedder = metrics.timed_embedder(Embedder())
    assert generator.generate("hi", GenerationParams()) == "HI"
    assert (generator.model_name, embedder.model_name, embedder.dim) == (
        "fake:gen",
        "fake-embed",
        2,
    )
    assert embedder.embed(["a", "b"]).shape == (2, 2)
    assert value(metrics.registry, "distill_swarm_generate_seconds_count") == 1
    assert value(metrics.registry, "distill_swarm_embed_seconds_count") == 1


# -- serving ------------------------------------------------------------------------------------


def test_two_services_in_one_process_serve_their_own_metrics() -> None:
    master, pupil = MasterMetrics(), PupilMetrics()
    servers = [serve(m.registry, "127.0.0.1", _free_port()) for m in (master, pupil)]
    try:
        texts = []
        for server in servers:
            assert server is not None
            with urllib.request.urlopen(server.url, timeout=5) as response:
                texts.append(response.read().decode())
        assert 'distill_swarm_build_info{role="master"' in texts[0]
        assert "distill_swarm_reports_ingested_total" not in texts[1]
        assert 'distill_swarm_build_info{role="pupil"' in texts[1]
        assert "process_cpu_seconds_total" in texts[1]
    finally:
        for server in servers:
            if server is not None:
                server.close()


def test_port_zero_is_off_and_a_taken_port_is_logged_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = PupilMetrics()
    assert serve(metrics.registry, "127.0.0.1", 0) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve(metrics.registry, "127.0.0.1", taken.getsockname()[1]) is None
    assert "metrics are off" in caplog.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_restarted_master_re_exports_every_known_node_from_its_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "master.sqlite3")
    info = NodeInfo(node_id="pi-7", software_version="1", pupil_model="p", embedding_model="e",
                    embedding_dim=2, adapter_version=3, lessons_done=5)  # fmt: skip
    store.touch_node(info, "offline")
    store.add_report(
        Report(lesson_id="t1", node_id="pi-7", split="train", pupil_model="p", trained=True,
               losses=[0.5, 0.125], adapter_version=3)
    )  # fmt: skip
    store.add_report(
        Report(lesson_id="e1", node_id="pi-7", split="eval", pupil_model="p",
               similarity_before=0.25, similarity_adapted=0.5, guided={"retrieval": 0.75})
    )  # fmt: skip
    metrics = MasterMetrics()
    restore_metrics(store, metrics)
    r = metrics.registry
    last_seen = value(r, "distill_swarm_node_last_seen_timestamp_seconds", node="pi-7")
    assert last_seen is not None and abs(last_seen - time.time()) < 60
    assert value(r, "distill_swarm_node_online", node="pi-7") == 0.0
    assert value(r, "distill_swarm_node_adapter_version", node="pi-7") == 3
    assert value(r, "distill_swarm_node_adapter_loss", node="pi-7") == 0.125
    heldout = "distill_swarm_node_heldout_similarity"
    assert value(r, heldout, node="pi-7", method="retrieval") == 0.75
    assert value(r, heldout, node="pi-7", method="plain") == 0.25
    # Only gauges: nothing was counted again.
    assert value(r, "distill_swarm_reports_ingested_total", node="pi-7", result="ok") is None
