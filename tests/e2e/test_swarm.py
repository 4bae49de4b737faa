"""End to end: a master and two pupils as separate OS processes over a real RabbitMQ.

Uses the embedded models with short answers, so the whole test takes a minute or two on 2 cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from distill_swarm.processes import stop_processes
from master.exam import ExamStore
from master.store import Store
from shared.checkpoint import load_checkpoint
from shared.config import BrokerConfig

pytestmark = [pytest.mark.e2e, pytest.mark.models, pytest.mark.broker]

PROMPTS = Path(__file__).with_name("prompts.jsonl")
NODES = ("pupil-1", "pupil-2")
RUN_TIMEOUT_S = 600


def write_config(path: Path, broker: BrokerConfig) -> Path:
    path.write_text(
        f"""
[broker]
url = "{broker.url}"
namespace = "{broker.namespace}"
[master.generator]
max_tokens = 24
threads = 1
[pupil]
heartbeat_interval_s = 1
[pupil.generator]
temperature = 0.8
max_tokens = 24
threads = 1
[pupil.adapter]
steps_per_lesson = 4
batch_size = 8
"""
    )
    return path


class Swarm:
    """Starts `distill-swarm` processes and makes sure none outlives the test."""

    def __init__(self, workdir: Path, config: Path) -> None:
        self.workdir = workdir
        self.config = config
        self.store = workdir / "master.sqlite3"
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_SWARM__")}
        env.pop("AMQP_URL", None)  # the config file names the test's broker
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "distill_swarm", *args, "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.processes.append(proc)
        return proc

    def pupil(self, node: str) -> subprocess.Popen[bytes]:
        return self.spawn(
            node, "pupil", "run", "--node-id", node, "--state-dir", str(self.workdir / node)
        )

    def master(self) -> subprocess.Popen[bytes]:
        return self.spawn(
            "master",
            "master",
            "run",
            "--prompts",
            str(PROMPTS),
            "--store",
            str(self.store),
            "--expect-nodes",
            str(len(NODES)),
            "--exit-when-done",
            "--timeout-s",
            str(RUN_TIMEOUT_S),
        )

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]

    def terminate(self, proc: subprocess.Popen[bytes]) -> int:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=60)

    def close(self) -> None:
        stop_processes(self.processes, sig=signal.SIGKILL)


@pytest.fixture
def swarm(tmp_path: Path, broker_config: BrokerConfig) -> Iterator[Swarm]:
    s = Swarm(tmp_path, write_config(tmp_path / "swarm.toml", broker_config))
    yield s
    s.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_master_and_two_pupils_learn_end_to_end(swarm: Swarm) -> None:
    pupils = [swarm.pupil(node) for node in NODES]
    master = swarm.master()
    assert master.wait(timeout=RUN_TIMEOUT_S + 60) == 0, swarm.log("master")
    for node, proc in zip(NODES, pupils, strict=True):
        assert swarm.terminate(proc) == 0, swarm.log(node)

    store = Store(swarm.store)
    lessons = store.published_lesson_ids()
    assert len(lessons) == 6

    # Every lesson reported by both nodes, and exactly once on the wire.
    counts = store.delivery_counts()
    assert set(counts) == {(lesson, node) for lesson in lessons for node in NODES}
    assert set(counts.values()) == {1}

    train_ids = {lid for lid in lessons if store.get_lesson(lid)[0].split == "train"}  # type: ignore[index]
    eval_ids = set(lessons) - train_ids
    assert len(eval_ids) == 2
    for node in NODES:
        reports = {r.lesson_id: r for r in store.reports(node)}
        assert all(r.error is None and r.pupil_answer for r in reports.values())
        # Eval lessons are measured, never trained on.
        for lid in eval_ids:
            assert not reports[lid].trained and reports[lid].losses == []
            assert reports[lid].similarity_before is not None
            assert reports[lid].similarity_adapted is not None
        for lid in train_ids:
            assert reports[lid].trained and len(reports[lid].losses) == 4

        # The checkpoint exists, reloads, and holds only train lessons.
        trainer = load_checkpoint(swarm.workdir / node / "adapter.safetensors")
        assert trainer.version == len(train_ids)
        assert set(trainer.replay.export()[2]) == train_ids

    # The curriculum ended with an exam: every node answered every eval lesson again, by every
    # method, and learned nothing from it (its training report count is unchanged above).
    exams = ExamStore(store)
    exam = exams.latest()
    assert exam is not None and set(exam.lesson_ids) == eval_ids
    answered = {(r.lesson_id, r.node_id): r for r in exams.reports(exam.exam_id)}
    assert set(answered) == {(lid, node) for lid in eval_ids for node in NODES}
    for report in answered.values():
        assert report.exam_id == exam.exam_id and not report.trained
        assert report.similarity_before is not None and report.guided

    # A restarted master resumes from its store without publishing again, and a restarted
    # pupil reloads its adapter and says so in its hello.
    resumed = swarm.spawn(
        "master-2", "master", "run", "--prompts", str(PROMPTS), "--store", str(swarm.store)
    )
    restarted_at = datetime.now(UTC).isoformat()
    restarted = swarm.pupil(NODES[0])

    def hello_from_the_restarted_pupil() -> bool:
        # The old process is gone (its goodbye sets "offline"), so "online" and seen after the
        # restart can only come from the new process's hello.
        row = Store(swarm.store).node_status()[0]
        return row.state == "online" and row.last_seen >= restarted_at

    wait_until(hello_from_the_restarted_pupil, 120, "the restarted pupil's hello")
    assert Store(swarm.store).node_info(NODES[0]).adapter_version == len(train_ids)  # type: ignore[union-attr]
    assert swarm.terminate(restarted) == 0, swarm.log(NODES[0])
    assert swarm.terminate(resumed) == 0, swarm.log("master-2")
    assert Store(swarm.store).published_lesson_ids() == lessons
    assert set(Store(swarm.store).delivery_counts().values()) == {1}

    status = subprocess.run(
        [sys.executable, "-m", "distill_swarm", "status", "--store", str(swarm.store)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {line.split()[0]: line.split() for line in status.splitlines()[2:4]}
    assert set(rows) == set(NODES)
    for cells in rows.values():
        assert cells[4] == "6"  # lessons done
        assert cells[9] == "2"  # eval lessons behind the similarity means
