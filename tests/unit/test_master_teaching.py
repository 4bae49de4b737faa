"""Teaching at any time, jobs that become lessons, and parallel lesson making, on the stub broker.

Over the wire (real broker, real processes): tests/e2e/test_teach.py.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.fast_backend import EchoGenerator
from master.access import pupil_permissions
from master.job_store import JobRow
from master.prompts import PromptItem
from master.service import MasterService
from master.teacher import lesson_id_for
from shared.backends import GenerationParams
from shared.messages import Lesson, Teach, TeachResult, decode, encode
from shared.topology import REASON_HEADER, Topology
from tests.support.stub_swarm import StubSwarm, prompts, stub

REPLY_QUEUE = "reply"


def setup(swarm: StubSwarm, master: MasterService) -> None:
    """An observer queue on the lessons exchange (as a pupil's) and a submitter's reply queue."""
    master.topology.declare_all(swarm.broker.channel, ("a",))
    swarm.broker.channel.queue_declare(REPLY_QUEUE)


def send(swarm: StubSwarm, master: MasterService, message: Teach | bytes) -> None:
    body = message if isinstance(message, bytes) else encode(message)
    message_id = "bad" if isinstance(message, bytes) else message.message_id
    swarm.broker.publisher().publish(
        master.topology.teach_exchange,
        master.topology.TEACH_KEY,
        body,
        message_id,
        reply_to=REPLY_QUEUE,
        correlation_id=message_id,
    )


def published(swarm: StubSwarm, master: MasterService) -> list[Lesson]:
    return [decode(m.body, Lesson) for m in swarm.broker.queued(master.topology.pupil_queue("a"))]


def replies(swarm: StubSwarm) -> list[TeachResult]:
    return [decode(m.body, TeachResult) for m in swarm.broker.queued(REPLY_QUEUE)]


def item_of(teach: Teach) -> PromptItem:
    return PromptItem(id=teach.prompt_id, goal_text=teach.goal_text, split=teach.split)


def teach_round(swarm: StubSwarm, master: MasterService) -> None:
    """What the master's threads do: take the requests in, then answer what is pending."""
    stub(master.report_consumer()).drain()
    publisher = master._lesson_publisher()
    while master.teach_pending(publisher):
        pass


def test_a_taught_prompt_is_published_once_and_taught_again_says_so(tmp_path: Path) -> None:
    swarm = StubSwarm(tmp_path)
    master = swarm.master([])
    setup(swarm, master)
    first = Teach(prompt_id="p1", goal_text="Explain what DNS does", split="train")
    send(swarm, master, first)
    teach_round(swarm, master)
    (lesson,) = published(swarm, master)
    assert lesson.lesson_id == master.teacher.lesson_id(item_of(first))
    assert [(r.prompt_id, r.outcome, r.lesson_id) for r in replies(swarm)] == [
        ("p1", "published", lesson.lesson_id)
    ]
    # Teaching the same prompt again: nothing new on the wire, and the answer says why.
    send(swarm, master, Teach(prompt_id="p1", goal_text="Explain what DNS does", split="train"))
    teach_round(swarm, master)
    assert len(published(swarm, master)) == 1
    last = replies(swarm)[-1]
    assert (last.outcome, last.lesson_id) == ("already_published", lesson.lesson_id)
    assert master.store.get_lesson(lesson.lesson_id) == (lesson, True)


def test_a_redelivered_request_is_answered_again_without_a_second_lesson(tmp_path: Path) -> None:
    swarm = StubSwarm(tmp_path)
    master = swarm.master([])
    setup(swarm, master)
    request = Teach(prompt_id="p1", goal_text="Name three prime numbers")
    send(swarm, master, request)
    teach_round(swarm, master)
    send(swarm, master, request)  # the same message again (at-least-once)
    teach_round(swarm, master)
    assert len(published(swarm, master)) == 1
    assert [r.outcome for r in replies(swarm)] == ["published", "published"]


def test_an_invalid_teach_message_is_dead_lettered_and_the_master_goes_on(tmp_path: Path) -> None:
    swarm = StubSwarm(tmp_path)
    master = swarm.master([])
    setup(swarm, master)
    send(swarm, master, b'{"kind": "teach", "prompt_id": "p1"}')
    send(swarm, master, Teach(prompt_id="p2", goal_text="Say hello"))
    teach_round(swarm, master)
    (dead,) = swarm.broker.queued(master.topology.dead_queue)
    assert dead.properties.headers[REASON_HEADER].startswith("invalid message: goal_text")
    rejected = master.metrics.registry.get_sample_value(
        "distill_swarm_messages_rejected_total", {"queue": "teach", "reason": "invalid"}
    )
    assert rejected == 1
    assert [(r.prompt_id, r.outcome) for r in replies(swarm)] == [
        ("unknown", "refused"),
        ("p2", "published"),
    ]
    assert len(published(swarm, master)) == 1


def test_an_eval_prompts_text_is_never_taught_as_train(tmp_path: Path) -> None:
    swarm = StubSwarm(tmp_path)
    held_out = prompts(1, "eval")[0]
    master = swarm.master([held_out])
    setup(swarm, master)
    master.publish_lessons()
    # The same text, whitespace and case aside, under another id and the train split.
    text = "  " + held_out.goal_text.upper() + " "
    send(swarm, master, Teach(prompt_id="sneaky", goal_text=text, split="train"))
    teach_round(swarm, master)
    assert [lesson.split for lesson in published(swarm, master)] == ["eval"]
    (reply,) = replies(swarm)
    assert (reply.outcome, reply.lesson_id) == ("refused", None)


class Slow(EchoGenerator):
    """Answers after a delay that falls with the prompt's number, and counts calls at once."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self._lock = threading.Lock()

    def generate(self, prompt: str, params: GenerationParams, system: str | None = None) -> str:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        number = int(re.findall(r"topic (\d+)", prompt)[0])
        time.sleep(0.05 * (8 - number % 8) / 8)  # later prompts finish first
        with self._lock:
            self.now -= 1
        return super().generate(prompt, params, system)


def test_lessons_are_made_in_parallel_and_published_in_prompt_order(tmp_path: Path) -> None:
    swarm = StubSwarm(tmp_path, master_fields={"generate_in_flight": 4})
    items = prompts(16)
    master = swarm.master(items)
    slow = Slow()
    master.teacher._generator = slow
    setup(swarm, master)
    master.publish_lessons()
    lessons = published(swarm, master)
    expected = [lesson_id_for(i, "bench:echo", master.teacher.render(i)) for i in items]
    assert [lesson.lesson_id for lesson in lessons] == expected
    assert master.lesson_ids == expected
    assert slow.most == 4


def test_a_job_the_master_answered_becomes_a_train_lesson_unless_its_text_is_eval(
    tmp_path: Path,
) -> None:
    held_out = prompts(1, "eval")[0]
    swarm = StubSwarm(tmp_path, master_fields={"jobs": {"to_lessons": ["legal_medical"]}})
    master = swarm.master([held_out])
    setup(swarm, master)
    master.publish_lessons()
    master._job_answered(job("j1", "legal_medical", "Is it safe to mix these two pills?"), "No.")
    master._job_answered(job("j2", "legal_medical", held_out.goal_text), "Yes.")
    master._job_answered(job("j3", "summarisation", "A long text to summarise."), "Short.")
    teach_round(swarm, master)
    lessons = published(swarm, master)
    assert [(lesson.split, lesson.task) for lesson in lessons] == [
        ("eval", "general"),
        ("train", "legal_medical"),
    ]
    assert lessons[1].master_answer == "No."  # the job's answer, not a second generation
    assert "Is it safe to mix these two pills?" in lessons[1].goal_text
    counts = master.teach_store.counts("job")
    assert counts == {("legal_medical", "published"): 1}
    refused = master.metrics.registry.get_sample_value(
        "distill_swarm_job_lessons_total", {"kind": "legal_medical", "outcome": "refused"}
    )
    assert refused == 1


def job(job_id: str, kind: str, text: str) -> JobRow:
    now = datetime.now(UTC)
    return JobRow(
        job_id=job_id, kind=kind, text=text, params={}, submitted_at=now,
        deadline=now + timedelta(seconds=30), state="done", reply_to=None, correlation_id=None,
        answered_by="master", fallback=None, fallback_code=None, output=None, error=None,
        elapsed_s=None, agreement=None, result=None,
    )  # fmt: skip


def test_a_nodes_user_can_neither_teach_nor_read_teach_requests() -> None:
    topology = Topology("swarm")
    permissions = pupil_permissions(topology, "pi-7")
    for name in (topology.teach_exchange, topology.teach_queue):
        assert not re.match(permissions.write, name)
        assert not re.match(permissions.read, name)
        assert not re.match(permissions.configure, name)


def test_a_master_run_without_prompts_keeps_serving_and_teaches(tmp_path: Path) -> None:
    swarm = StubSwarm(tmp_path)
    master = swarm.master([])
    setup(swarm, master)
    thread = threading.Thread(target=master.run, daemon=True)
    thread.start()
    try:
        assert master.publishing_done.wait(10)  # an empty prompt set: nothing to publish
        send(swarm, master, Teach(prompt_id="late", goal_text="Taught after the start"))
        deadline = time.monotonic() + 10
        while not published(swarm, master) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [lesson.goal_text for lesson in published(swarm, master)] == [
            "Taught after the start"
        ]
        assert thread.is_alive()  # still serving
    finally:
        master.stop.set()
        thread.join(timeout=10)
    assert master.failure is None
