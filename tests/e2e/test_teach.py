"""Teaching a running master over the broker, and jobs that become lessons: real processes.

One master process (embedded models, no prompt set of train lessons: one eval prompt only)
serves the module. Instead of a pupil, the test binds a queue of its own to the lessons exchange,
as a pupil's queue is, and reads exactly what the master published. `distill-swarm teach` runs
as a process of its own, as an operator would run it.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from distill_swarm.client import JobClient
from distill_swarm.processes import stop_processes
from distill_swarm.teach import teach
from master.prompts import PromptItem
from master.store import Store
from master.teach_store import TeachStore
from shared.broker import connect
from shared.config import BrokerConfig, Settings
from shared.messages import Lesson, decode
from shared.namespace import delete_namespace
from shared.topology import REASON_HEADER, Topology
from tests.support.live_swarm import free_port, http_get, sample, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.models, pytest.mark.broker]

OBSERVER = "a"  # one of tests/conftest.py's TEST_NODE_IDS: its queue is deleted afterwards
STARTUP_TIMEOUT_S = 300
ANSWER_TIMEOUT_S = 180
HELD_OUT = "Can I take ibuprofen together with my blood pressure tablets?"


class TeachingMaster:
    """A master process, its config and store, and the queue that sees what it publishes."""

    def __init__(self, workdir: Path, broker: BrokerConfig) -> None:
        self.workdir = workdir
        self.broker = broker
        self.store = workdir / "master.sqlite3"
        self.metrics_port = free_port()
        prompts = workdir / "held-out.jsonl"
        prompts.write_text(json.dumps({"id": "held", "goal_text": HELD_OUT, "split": "eval"}))
        self.config = workdir / "swarm.toml"
        self.config.write_text(f"""
[broker]
url = "{broker.url}"
namespace = "{broker.namespace}"
[master]
store = "{self.store}"
prompts = "{prompts}"
metrics_port = {self.metrics_port}
generate_in_flight = 2
[master.generator]
max_tokens = 12
threads = 1
[master.jobs]
sample_rate = 0.0
to_lessons = ["legal_medical"]
""")
        self.settings = Settings(broker=broker)
        self.topology = Topology(broker.namespace)
        self.seen: list[Lesson] = []
        self.process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_SWARM__")}
        clean.pop("AMQP_URL", None)
        return clean

    def start(self) -> None:
        connection = connect(self.broker)
        self.topology.declare_all(connection.channel(), (OBSERVER,))
        connection.close()
        log = (self.workdir / "master.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "distill_swarm", "master", "run", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
        )

    def log(self) -> str:
        return (self.workdir / "master.log").read_text(errors="replace")

    def teach_cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "distill_swarm", "teach", *args, "--config", str(self.config)],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=ANSWER_TIMEOUT_S + 60,
            check=False,
        )

    def published(self) -> list[Lesson]:
        """Every lesson the master published so far (read off the observer queue)."""
        connection = connect(self.broker)
        try:
            channel = connection.channel()
            while True:
                method, _, body = channel.basic_get(
                    self.topology.pupil_queue(OBSERVER), auto_ack=True
                )
                if method is None:
                    return list(self.seen)
                self.seen.append(decode(body, Lesson))
        finally:
            connection.close()

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")


@pytest.fixture(scope="module")
def master(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeachingMaster]:
    broker = BrokerConfig(
        url=amqp_url, namespace=f"te{secrets.token_hex(4)}", connect_attempts=3, max_backoff_s=1.0
    )
    m = TeachingMaster(tmp_path_factory.mktemp("teach"), broker)
    try:
        m.start()
        wait_for(lambda: len(m.published()) == 1, STARTUP_TIMEOUT_S, f"the eval lesson\n{m.log()}")
        yield m
    finally:
        if m.process is not None:
            stop_processes([m.process], timeout_s=60)
        delete_namespace(broker, (OBSERVER,))


def test_teach_publishes_each_prompt_once_and_says_so_the_second_time(
    master: TeachingMaster, tmp_path: Path
) -> None:
    prompts = tmp_path / "new.jsonl"
    prompts.write_text(
        '{"id": "dns", "goal_text": "Explain in one sentence what DNS does.", "split": "train"}\n'
        '{"id": "tcp", "goal_text": "What does TCP add on top of IP?", "split": "train"}\n'
    )
    first = master.teach_cli(str(prompts))
    assert first.returncode == 0, first.stderr + master.log()[-3000:]
    rows = [line.split("\t") for line in first.stdout.splitlines()]
    assert sorted((r[0], r[1]) for r in rows) == [("dns", "published"), ("tcp", "published")]
    wait_for(lambda: len(master.published()) == 3, 30, "the two taught lessons")
    taught = {lesson.goal_text: lesson for lesson in master.seen[1:]}
    assert set(taught) == {
        "Explain in one sentence what DNS does.",
        "What does TCP add on top of IP?",
    }
    assert {r[2].split()[0] for r in rows} == {lesson.lesson_id for lesson in taught.values()}
    # Again, from stdin this time: the same lessons, nothing new published, and it says so.
    again = master.teach_cli("-", stdin=prompts.read_text())
    assert again.returncode == 0, again.stderr
    assert sorted(line.split("\t")[1] for line in again.stdout.splitlines()) == [
        "already_published",
        "already_published",
    ]
    assert "2 already published" in again.stderr
    assert len(master.published()) == 3


def test_the_python_client_teaches_too(master: TeachingMaster) -> None:
    item = PromptItem(id="udp", goal_text="When would you pick UDP over TCP?", split="train")
    (result,) = teach(master.settings, [item], timeout_s=ANSWER_TIMEOUT_S)
    assert (result.prompt_id, result.outcome, result.split) == ("udp", "published", "train")
    wait_for(
        lambda: result.lesson_id in {lesson.lesson_id for lesson in master.published()},
        30,
        "the lesson on the wire",
    )


def test_bad_teach_input_is_one_clear_line_and_a_non_zero_exit(
    master: TeachingMaster, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "ok", "goal_text": "fine"}\n{"id": "x", "goal_text": \n')
    result = master.teach_cli(str(broken))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {broken}: line 2 is not valid JSON: Expecting value"
    ]
    missing = master.teach_cli("-", stdin='{"id": "x", "task": "qa"}\n')
    assert missing.returncode == 2
    assert missing.stderr.strip() == "error: stdin: item 1, field 'goal_text': Field required"


def test_an_invalid_teach_message_is_dead_lettered_and_the_master_keeps_teaching(
    master: TeachingMaster,
) -> None:
    connection = connect(master.broker)
    try:
        channel = connection.channel()
        channel.basic_publish(
            master.topology.teach_exchange,
            master.topology.TEACH_KEY,
            b'{"kind": "teach", "prompt_id": "p", "goal_text": ""}',
            pika.BasicProperties(message_id="bad-teach", delivery_mode=2),
        )

        reasons: list[str] = []

        def dead_lettered() -> bool:
            method, props, _ = channel.basic_get(master.topology.dead_queue, auto_ack=True)
            if method is not None:
                reasons.append(str(props.headers[REASON_HEADER]))
            return bool(reasons)

        wait_for(dead_lettered, 60, "the dead letter")
    finally:
        connection.close()
    assert reasons == ["invalid message: goal_text: String should have at least 1 character"]
    assert master.process is not None and master.process.poll() is None
    assert (
        sample(
            master.metrics(),
            "distill_swarm_messages_rejected_total",
            queue="teach",
            reason="invalid",
        )
        == 1.0
    )
    ok = master.teach_cli("-", stdin='{"id": "arp", "goal_text": "What is ARP for?"}\n')
    assert ok.returncode == 0 and "published" in ok.stdout, ok.stderr


def test_a_jobs_master_answer_becomes_a_lesson_but_never_an_eval_prompts_text(
    master: TeachingMaster,
) -> None:
    before = {lesson.lesson_id for lesson in master.published()}
    with JobClient(master.settings) as client:
        taught = client.submit("legal_medical", "May I stop my antibiotics early?", deadline_s=60)
        held = client.submit("legal_medical", HELD_OUT, deadline_s=60)
    assert taught.answered_by == held.answered_by == "master"
    wait_for(
        lambda: any(x.task == "legal_medical" for x in master.published()), 60, "the job lesson"
    )
    new = [lesson for lesson in master.published() if lesson.lesson_id not in before]
    (lesson,) = [lesson for lesson in new if lesson.task == "legal_medical"]
    assert lesson.split == "train"
    assert "May I stop my antibiotics early?" in lesson.goal_text
    assert lesson.master_answer == taught.output
    assert all(HELD_OUT not in lesson.goal_text for lesson in new)
    counts = TeachStore(Store(master.store)).counts("job")
    assert counts == {("legal_medical", "published"): 1}
    page = master.metrics()
    assert (
        sample(page, "distill_swarm_job_lessons_total", kind="legal_medical", outcome="refused")
        == 1.0
    )
    assert (
        sample(page, "distill_swarm_job_lessons_total", kind="legal_medical", outcome="published")
        == 1.0
    )
