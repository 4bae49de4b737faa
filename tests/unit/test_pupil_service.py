"""A pupil's lesson flow on the stub broker: answer, train, report; refuse, replay, never twice.

The whole round trip runs in memory: the master publishes, the pupil's lesson consumer drains
its queue, the master's report consumer drains the reports.
"""

from __future__ import annotations

from pathlib import Path

from bench.fast_backend import HashingEmbedder
from shared.messages import Report, decode
from shared.topology import REASON_HEADER
from tests.support.stub_swarm import DIM, StubSwarm, prompts, stub


def test_every_lesson_is_answered_trained_on_and_reported_to_the_master(tmp_path: Path) -> None:
    swarm = StubSwarm(tmp_path)
    master = swarm.master(prompts(4) + prompts(2, "eval"))
    pupil = swarm.pupil("pi-1")
    lessons = stub(pupil.lesson_consumer())
    master.publish_lessons()
    assert lessons.drain() == 6
    reports = [decode(m.body, Report) for m in swarm.broker.queued(master.topology.reports_queue)]
    assert sorted(r.split for r in reports) == ["eval"] * 2 + ["train"] * 4
    assert all(r.trained == (r.split == "train") and r.error is None for r in reports)
    assert pupil.node.trainer.version == 4  # one version per train lesson, none for eval
    assert pupil.node.journal.count() == 6
    assert stub(master.report_consumer()).drain() == 6
    assert master.store.report_count() == 6


def test_a_redelivered_lesson_is_only_acked_once_its_report_was_confirmed(tmp_path: Path) -> None:
    swarm = StubSwarm(tmp_path)
    master = swarm.master(prompts(1))
    pupil = swarm.pupil("pi-1")
    lessons = stub(pupil.lesson_consumer())
    master.publish_lessons()
    queue = pupil.topology.pupil_queue("pi-1")
    (lesson,) = swarm.broker.queued(queue)
    assert lessons.drain() == 1
    swarm.broker.channel.messages[queue].append(lesson)  # the broker hands it out again
    assert lessons.drain() == 1
    assert len(swarm.broker.queued(master.topology.reports_queue)) == 1  # no second report
    assert pupil.node.trainer.version == 1  # and no second training step
    assert pupil.metrics.registry.get_sample_value("distill_swarm_lessons_replayed_total") == 1


def test_a_lesson_from_another_embedding_space_is_refused_and_the_master_told(
    tmp_path: Path,
) -> None:
    swarm = StubSwarm(tmp_path)
    master = swarm.master(prompts(1))
    pupil = swarm.pupil("pi-1", embedder=HashingEmbedder(DIM, model_name="mxbai-embed-large"))
    lessons = stub(pupil.lesson_consumer())
    master.publish_lessons()
    assert lessons.drain() == 1
    (dead,) = swarm.broker.queued(master.topology.dead_queue)
    assert "is embedded with all-minilm-l6-v2" in dead.properties.headers[REASON_HEADER]
    rejected = pupil.metrics.registry.get_sample_value(
        "distill_swarm_messages_rejected_total",
        {"queue": "lessons", "reason": "embedding_mismatch"},
    )
    assert rejected == 1
    (refusal,) = swarm.broker.queued(master.topology.reports_queue)
    assert decode(refusal.body, Report).error is not None
    assert pupil.node.journal.count() == 0


def test_a_lesson_that_is_not_json_is_dead_lettered_unseen_by_the_flow(tmp_path: Path) -> None:
    swarm = StubSwarm(tmp_path)
    pupil = swarm.pupil("pi-1")
    lessons = stub(pupil.lesson_consumer())
    swarm.broker.publisher().publish(pupil.topology.lessons_exchange, "", b"\xff", "m1")
    assert lessons.drain() == 1
    (dead,) = swarm.broker.queued(pupil.topology.dead_queue)
    assert dead.properties.headers[REASON_HEADER].startswith("not valid JSON")
    assert pupil.node.journal.count() == 0
