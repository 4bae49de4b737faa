"""The master's intake on the stub broker: reports and control messages, stored and counted.

What durability means here: a report is acked only once the batch it was written in is
committed, and a message the master refuses is dead-lettered with a code the metrics count.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from master.service import MasterService
from master.store import WriteBatch
from pupil_node.service import PupilService
from shared.messages import Report, encode
from shared.topology import REASON_HEADER
from tests.support.stub_swarm import StubSwarm, prompts, stub


def rejected(master: MasterService, queue: str, reason: str) -> float | None:
    return master.metrics.registry.get_sample_value(
        "distill_swarm_messages_rejected_total", {"queue": queue, "reason": reason}
    )


def taught(swarm: StubSwarm, lessons: int = 3) -> tuple[MasterService, PupilService]:
    """A master that published ``lessons`` train lessons to one pupil, pi-1, who heard them."""
    master = swarm.master(prompts(lessons))
    pupil = swarm.pupil("pi-1")
    lessons_in = stub(pupil.lesson_consumer())  # declares the pupil's queue, as `pupil run` does
    master.publish_lessons()
    assert lessons_in.drain() == lessons
    return master, pupil


def test_reports_are_stored_once_and_acked_in_one_batch(tmp_path: Path) -> None:
    swarm = StubSwarm(tmp_path)
    master, pupil = taught(swarm)
    intake = stub(master.report_consumer())
    acks_before = len([f for f in swarm.broker.channel.frames if f[0] == "ack"])
    assert intake.drain() == 3
    assert master.store.report_count() == 3
    assert master.complete() is False  # no node has said hello to this master yet
    pupil.tick()  # the first heartbeat is due at once
    intake.drain()
    assert master.complete()
    # Three reports, one multiple ack once their batch was committed; then the heartbeat's.
    acks = [f for f in swarm.broker.channel.frames if f[0] == "ack"][acks_before:]
    assert acks[0][2] is True and len(acks) == 2


def test_a_report_sent_again_is_counted_as_a_duplicate(tmp_path: Path) -> None:
    swarm = StubSwarm(tmp_path)
    master, _ = taught(swarm, lessons=1)
    (report,) = swarm.broker.queued(master.topology.reports_queue)
    swarm.broker.channel.messages[master.topology.reports_queue].append(report)
    assert stub(master.report_consumer()).drain() == 2
    assert master.store.report_count() == 1
    duplicates = master.metrics.registry.get_sample_value(
        "distill_swarm_reports_duplicate_total", {"node": "pi-1"}
    )
    assert duplicates == 1


def test_a_report_for_a_lesson_never_made_is_dead_lettered_and_counted(tmp_path: Path) -> None:
    swarm = StubSwarm(tmp_path)
    master = swarm.master([])
    intake = stub(master.report_consumer())
    forged = Report(lesson_id="nope", node_id="pi-1", split="train", pupil_model="m")
    publisher = swarm.broker.publisher()
    publisher.publish(master.topology.reports_exchange, "report", encode(forged), "m1")
    publisher.publish(master.topology.control_exchange, "hello.pi-1", b"not json", "m2")
    assert intake.drain() == 2
    dead = swarm.broker.queued(master.topology.dead_queue)
    assert [m.properties.headers[REASON_HEADER][:30] for m in dead] == [
        "report from node 'pi-1' names ",
        "not valid JSON: Expecting valu",
    ]
    assert rejected(master, "reports", "invalid") == 1
    assert rejected(master, "control", "invalid") == 1
    assert master.store.report_count() == 0


def test_a_batch_that_cannot_be_committed_is_requeued_and_stored_on_redelivery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    swarm = StubSwarm(tmp_path)
    master, _ = taught(swarm, lessons=2)
    commit = WriteBatch.commit
    failures = [OSError("disk full")]

    def commit_once_failing(self: WriteBatch) -> None:
        if failures:
            self._store._end_batch("ROLLBACK")
            raise failures.pop()
        commit(self)

    monkeypatch.setattr(WriteBatch, "commit", commit_once_failing)
    intake = stub(master.report_consumer())
    assert intake.drain() == 4  # two reports, requeued once each
    nacks = [f for f in swarm.broker.channel.frames if f[0] == "nack"]
    assert len(nacks) == 2 and all(f[2] for f in nacks)  # requeued, code not_durable
    assert master.store.report_count() == 2


def test_a_report_from_another_broker_user_is_refused_when_identities_are_checked(
    tmp_path: Path,
) -> None:
    swarm = StubSwarm(tmp_path, master_fields={"verify_node_identity": True})
    master, _ = taught(swarm, lessons=1)
    assert stub(master.report_consumer()).drain() == 1
    (dead,) = swarm.broker.queued(master.topology.dead_queue)
    assert dead.properties.headers[REASON_HEADER] == (
        "message claims node 'pi-1' but was published by broker user 'guest'"
    )
    assert rejected(master, "reports", "invalid") == 1
    assert master.store.report_count() == 0
