"""Jobs on the stub broker: the master offloads, a pupil answers, the submitter gets one answer.

The dispatcher's intake and a pupil's job consumer are the services' own; the master's own
answers (fallbacks) are its master worker's, run here by hand.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from master.service import MasterService
from shared.broker.stub import StubBroker
from shared.jobs import Fallback
from shared.messages import Job, JobResult, decode, encode
from shared.topology import REASON_HEADER, Topology
from tests.support.stub_swarm import StubSwarm, stub

REPLY = "submitter.replies"


def submit(broker: StubBroker, topology: Topology, job: Job | bytes, job_id: str = "j-1") -> None:
    """Publish a job as a submitter does: ``reply_to`` its own queue, correlated by job id."""
    broker.channel.queue_declare(REPLY)
    body = job if isinstance(job, bytes) else encode(job)
    broker.publisher().publish(
        topology.jobs_exchange,
        topology.SUBMIT_KEY,
        body,
        job_id,
        reply_to=REPLY,
        correlation_id=job_id,
    )


def summary_job(job_id: str = "j-1", kind: str = "summarisation") -> Job:
    deadline = datetime.now(UTC) + timedelta(minutes=5)
    return Job(job_id=job_id, job_kind=kind, text="The bridge closes in May.", deadline=deadline)


def replies(broker: StubBroker) -> list[JobResult]:
    return [decode(m.body, JobResult) for m in broker.queued(REPLY)]


def master_answers(master: MasterService, broker: StubBroker, job_id: str = "j-1") -> JobResult:
    """What the master worker does with a job handed to the master: the submitter's answer."""
    master.jobs._answer(job_id)
    (result,) = replies(broker)
    assert result.answered_by == "master"
    return result


def fallbacks(master: MasterService, kind: str, reason: str) -> float | None:
    return master.metrics.registry.get_sample_value(
        "distill_swarm_job_fallbacks_total", {"kind": kind, "reason": reason}
    )


def test_an_offloaded_job_is_answered_by_the_pupil_that_took_it(tmp_path: Path) -> None:
    swarm = StubSwarm(tmp_path)
    master = swarm.master([])
    intake = stub(master.jobs.consumer())
    pupil = swarm.pupil("pi-1", jobs=["summarisation"])
    jobs = stub(pupil.job_consumer())
    submit(swarm.broker, master.topology, summary_job())
    assert intake.drain() == 1  # stored and offloaded to the summarisation queue
    assert jobs.drain() == 1  # the pupil answers and acks it
    assert intake.drain() == 1  # the pupil's result
    (result,) = replies(swarm.broker)
    assert result.answered_by == "pi-1" and result.error is None and result.fallback is None
    row = master.jobs.store.get("j-1")
    assert row is not None and row.state == "done" and row.fallback_code is None


def test_a_pupil_that_fails_hands_the_job_to_the_master_labelled_pupil_failed(
    tmp_path: Path,
) -> None:
    swarm = StubSwarm(tmp_path)
    master = swarm.master([])
    intake = stub(master.jobs.consumer())
    submit(swarm.broker, master.topology, summary_job())
    intake.drain()
    failed = JobResult(job_id="j-1", job_kind="summarisation", answered_by="pi-1", error="boom")
    swarm.broker.publisher().publish(
        master.topology.reports_exchange, master.topology.JOB_RESULT_KEY, encode(failed), "r1"
    )
    assert intake.drain() == 1
    row = master.jobs.store.get("j-1")
    assert row is not None and row.state == "master"
    assert row.fallback_code is Fallback.PUPIL_FAILED  # the label, whatever the text says
    result = master_answers(master, swarm.broker)
    assert result.fallback == "pupil failed: pi-1: boom"
    assert fallbacks(master, "summarisation", "pupil_failed") == 1


def test_a_critical_job_never_leaves_the_master(tmp_path: Path) -> None:
    swarm = StubSwarm(tmp_path)
    master = swarm.master([])
    intake = stub(master.jobs.consumer())
    submit(swarm.broker, master.topology, summary_job(kind="legal_medical"))
    assert intake.drain() == 1
    offloaded = [f for f in swarm.broker.channel.frames if f[:2] == ("publish", "stub.jobs")]
    assert len(offloaded) == 1  # the submission itself, never a copy for the pupils
    assert master_answers(master, swarm.broker).fallback == "critical"
    assert fallbacks(master, "legal_medical", "critical") == 1


def test_an_invalid_job_is_dead_lettered_and_its_submitter_told(tmp_path: Path) -> None:
    swarm = StubSwarm(tmp_path)
    master = swarm.master([])
    intake = stub(master.jobs.consumer())
    submit(swarm.broker, master.topology, summary_job(kind="translation"))  # no language
    assert intake.drain() == 1
    (dead,) = swarm.broker.queued(master.topology.dead_queue)
    assert "language" in dead.properties.headers[REASON_HEADER]
    (result,) = replies(swarm.broker)
    assert result.error is not None and result.error.startswith("job refused:")
    rejected = master.metrics.registry.get_sample_value(
        "distill_swarm_messages_rejected_total", {"queue": "jobs", "reason": "invalid"}
    )
    assert rejected == 1
