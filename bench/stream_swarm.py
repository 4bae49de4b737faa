"""A master's side and pupils on the lesson stream, on a real broker, with the fast backends.

Used by bench/late_joiner.py and tests/integration/test_lesson_stream.py (the tests use
bench/fast_backend.py the same way). The "master" here only declares the topology and publishes
lessons (the lesson flow of a real master is tested elsewhere); the pupils are the real
:class:`PupilService` + :class:`PupilNode`, either in this process (:meth:`StreamSwarm.pupil`)
or in their own (``python -m bench.stream_swarm``), which a test can SIGKILL.
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench.fast_backend import EchoGenerator, HashingEmbedder
from pupil_node.node import JOURNAL_NAME, PupilNode
from pupil_node.service import PupilService
from shared.backends import GenerationParams
from shared.broker import Publisher, connect
from shared.config import BrokerConfig, LessonsConfig, PupilConfig, Settings
from shared.messages import Embedding, Lesson, Report, decode, encode
from shared.topology import Topology

ROOT = Path(__file__).resolve().parents[1]
DIM = 16  # small embeddings: the adapters train in milliseconds


def lesson(index: int, split: Literal["train", "eval"] = "train") -> Lesson:
    """Lesson number ``index``: a distinct prompt, answered and embedded by the fast backends."""
    goal = f"Say something about topic {index}"
    answer = f"Topic {index} is about the number {index} and its neighbours"
    vector = HashingEmbedder(DIM).embed([answer])[0]
    return Lesson(
        lesson_id=f"lesson-{index:05d}",
        task="qa",
        prompt=goal,
        goal_text=goal,
        master_model="bench:echo",
        master_answer=answer,
        reference=Embedding.from_array(HashingEmbedder(DIM).model_name, vector),
        split=split,
    )


class SlowGenerator(EchoGenerator):
    """The echo generator, taking ``delay_s`` per answer: a catch-up long enough to interrupt."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def generate(self, prompt: str, params: GenerationParams, system: str | None = None) -> str:
        time.sleep(self.delay_s)
        return super().generate(prompt, params, system)


def settings(
    broker: BrokerConfig, node_id: str, state_dir: Path, lessons: LessonsConfig
) -> Settings:
    """A pupil's settings: fast heartbeats, plain answers, no metrics port."""
    return Settings(
        broker=broker,
        lessons=lessons,
        pupil=PupilConfig.model_validate(
            {
                "node_id": node_id,
                "state_dir": state_dir,
                "metrics_port": 0,
                "min_free_bytes": 0,
                "heartbeat_interval_s": 1,
                "jobs": [],  # lessons only: no job queues to check or declare
                "guidance": {"method": "plain", "eval_methods": []},
                "adapter": {"steps_per_lesson": 2, "batch_size": 4},
            }
        ),
    )


def make_service(
    broker: BrokerConfig,
    node_id: str,
    state_dir: Path,
    lessons: LessonsConfig,
    delay_s: float = 0.0,
    stop: threading.Event | None = None,
) -> PupilService:
    """The real pupil service with the fast backends."""
    config = settings(broker, node_id, state_dir, lessons)
    generator = SlowGenerator(delay_s) if delay_s else EchoGenerator()
    node = PupilNode(node_id, config.pupil, generator, HashingEmbedder(DIM))
    return PupilService(config, node, stop=stop)


@dataclass
class StreamSwarm:
    """A namespace on a real broker: the master's topology, its publisher, pupils, reports."""

    broker: BrokerConfig
    root: Path
    lessons: LessonsConfig = field(default_factory=LessonsConfig)
    threads: list[tuple[threading.Event, threading.Thread]] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def topology(self) -> Topology:
        """The master's topology (it declares the stream when ``lessons`` says so)."""
        return Topology(self.broker.namespace, lessons=self.lessons)

    def declare(self) -> None:
        """Declare what the master declares (the stream too, with transport "stream")."""
        connection = connect(self.broker)
        try:
            self.topology.declare_master(connection.channel())
        finally:
            connection.close()

    def publish(self, lessons: list[Lesson]) -> None:
        """Publish ``lessons`` to the lessons fanout, each confirmed, in order."""
        publisher = Publisher(self.broker, self.topology.declare_master)
        try:
            for item in lessons:
                publisher.publish(self.topology.lessons_exchange, "", encode(item), item.lesson_id)
        finally:
            publisher.close()

    def state_dir(self, node_id: str) -> Path:
        """The node's state directory under ``root``."""
        return self.root / node_id

    def pupil(self, node_id: str, lessons: LessonsConfig | None = None) -> PupilService:
        """Start a pupil in a thread of this process; :meth:`close` stops it."""
        stop = threading.Event()
        service = make_service(
            self.broker, node_id, self.state_dir(node_id), lessons or self.lessons, stop=stop
        )
        thread = threading.Thread(target=service.run, name=f"pupil-{node_id}", daemon=True)
        thread.start()
        self.threads.append((stop, thread))
        return service

    def stop_pupils(self) -> None:
        """Stop the pupils started in this process, cleanly."""
        for stop, thread in self.threads:
            stop.set()
            thread.join(timeout=60)
        self.threads.clear()

    def spawn(
        self, node_id: str, delay_s: float = 0.0, log: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a pupil in its own process (``python -m bench.stream_swarm``)."""
        args = [
            sys.executable, "-m", "bench.stream_swarm", "--url", self.broker.url,
            "--namespace", self.broker.namespace, "--node-id", node_id,
            "--state-dir", str(self.state_dir(node_id)), "--delay-s", str(delay_s),
            "--segment-bytes", str(self.lessons.stream_segment_bytes),
            "--max-bytes", str(self.lessons.stream_max_bytes),
        ]  # fmt: skip
        out = (log or self.root / f"{node_id}.log").open("ab")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.processes.append(proc)
        return proc

    def journal(self, node_id: str) -> list[tuple[str, int | None]]:
        """The node's journal, (lesson id, stream offset), in the order the lessons were done."""
        path = self.state_dir(node_id) / JOURNAL_NAME
        if not path.exists():
            return []  # the node has not opened its state yet
        db = sqlite3.connect(path)
        try:
            rows = db.execute("SELECT lesson_id, stream_offset FROM done ORDER BY rowid").fetchall()
        except sqlite3.OperationalError:
            return []  # the node is creating its journal right now
        finally:
            db.close()
        return [(str(r[0]), None if r[1] is None else int(r[1])) for r in rows]

    def reports(self) -> list[Report]:
        """Every report waiting in the master's reports queue (consumed: each is read once)."""
        connection = connect(self.broker)
        out: list[Report] = []
        try:
            channel = connection.channel()
            while True:
                method, _props, body = channel.basic_get(self.topology.reports_queue, auto_ack=True)
                if method is None:
                    return out
                out.append(decode(body, Report))
        finally:
            connection.close()

    def close(self) -> None:
        """Stop every pupil, in threads and processes."""
        self.stop_pupils()
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def wait_until(predicate: Callable[[], Any], timeout_s: float = 60.0, what: str = "it") -> Any:
    """Poll ``predicate`` until truthy; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)
    return result


def main() -> None:
    """Run one pupil until SIGTERM/SIGKILL (the process a test kills)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--segment-bytes", type=int, required=True)
    parser.add_argument("--max-bytes", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    broker = BrokerConfig(url=args.url, namespace=args.namespace, max_backoff_s=1.0)
    lessons = LessonsConfig(
        stream_segment_bytes=args.segment_bytes, stream_max_bytes=args.max_bytes
    )
    make_service(broker, args.node_id, args.state_dir, lessons, args.delay_s).run()


if __name__ == "__main__":
    main()
