"""The job dispatcher's failure paths over a real RabbitMQ, with the services in threads.

The models are deterministic stand-ins: what is tested is who answers a job and when, never a
similarity (the end-to-end tests in tests/e2e/test_job_offloading.py run the real models).
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pika.exceptions as pex
import pytest
from prometheus_client import CollectorRegistry

from distill_swarm.client import JobClient
from master.job_store import JobStore
from master.jobs import JobDispatcher, MasterAnswerer
from master.store import Store
from pupil_node.node import PupilNode
from pupil_node.service import PupilService
from shared.backends import GenerationParams
from shared.broker import connect
from shared.config import BrokerConfig, Settings
from shared.errors import BackendUnreachable, PublishNotConfirmed
from shared.job_metrics import MasterJobMetrics
from shared.messages import JobResult
from shared.topology import Topology
from tests.support.live_swarm import wait_for

pytestmark = pytest.mark.broker


class Echo:
    """Answers with the prompt's last line, or fails like an Ollama that is down."""

    def __init__(self, name: str, down: bool = False) -> None:
        self.model_name = f"test:{name}"
        self.down = down

    def generate(self, prompt: str, params: GenerationParams, system: str | None = None) -> str:
        if self.down:
            raise BackendUnreachable("Ollama at http://127.0.0.1:11434 is not answering")
        return f"{self.model_name} says: {prompt.strip().splitlines()[-1][:60]}"


class Hashing:
    """Eight-dimensional unit vectors from a text's CRC, enough for a pupil to run."""

    model_name = "test-embedder"
    dim = 8

    def embed(self, texts: list[str]) -> np.ndarray:
        rows = [np.random.default_rng(zlib.crc32(t.encode())).normal(size=8) for t in texts]
        return np.stack([r / np.linalg.norm(r) for r in rows]).astype(np.float32)


@pytest.fixture
def settings(broker_config: BrokerConfig, tmp_path: Path) -> Settings:
    return Settings.model_validate({
        "broker": broker_config.model_dump(),
        "master": {"store": tmp_path / "master.sqlite3", "jobs": {"sample_rate": 0.0}},
        "pupil": {"jobs": ["summarisation"], "metrics_port": 0, "heartbeat_interval_s": 1},
    })  # fmt: skip


@contextmanager
def master(settings: Settings) -> Iterator[JobDispatcher]:
    stop = threading.Event()
    dispatcher = JobDispatcher(
        settings,
        JobStore(Store(settings.master.store)),
        MasterAnswerer(settings, Echo("master")),
        Hashing(),
        MasterJobMetrics(CollectorRegistry(), str),
        stop,
    )
    thread = threading.Thread(target=dispatcher.run, daemon=True)
    thread.start()
    try:
        wait_for_consumer(settings, dispatcher.topology.job_submissions_queue)
        yield dispatcher
    finally:
        stop.set()
        thread.join(timeout=30)


@contextmanager
def pupil(settings: Settings, node_id: str, generator: Echo, state: Path) -> Iterator[None]:
    config = settings.pupil.model_copy(update={"state_dir": state})
    service = PupilService(settings, PupilNode(node_id, config, generator, Hashing()))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        service.stop.set()
        thread.join(timeout=30)


def wait_for_consumer(settings: Settings, queue: str) -> None:
    """Until somebody consumes ``queue`` (a job sent earlier would wait for its deadline)."""
    connection = connect(settings.broker)
    try:

        def consumed() -> bool:
            try:  # a fresh channel each time: a passive declare of a missing queue closes it
                declared = connection.channel().queue_declare(queue, passive=True)
            except pex.ChannelClosedByBroker:
                return False
            return int(declared.method.consumer_count) > 0

        wait_for(consumed, 60, f"a consumer on {queue}", poll_s=0.1)
    finally:
        connection.close()


def test_a_pupil_that_fails_hands_the_job_to_the_master_at_once(
    settings: Settings, tmp_path: Path
) -> None:
    down = Echo("pupil", down=True)
    with (
        master(settings),
        pupil(settings, "p-down", down, tmp_path / "p"),
        JobClient(settings) as client,
    ):
        wait_for_consumer(settings, Topology(settings.broker.namespace).job_queue("summarisation"))
        result = client.submit("summarisation", "The shop opens at nine.", deadline_s=60)

    assert result.answered_by == "master"
    assert result.fallback is not None
    assert result.fallback.startswith("pupil failed: p-down: BackendUnreachable")
    assert result.elapsed_s < 30, "the master should not have waited for the deadline"
    # The master's own template, ending in the kind's goal.
    assert (
        result.output
        == "test:master says: Question: Summarise in one sentence: The shop opens at nine."
    )


def test_a_working_pupil_answers_through_its_guidance(settings: Settings, tmp_path: Path) -> None:
    with (
        master(settings),
        pupil(settings, "p-ok", Echo("pupil"), tmp_path / "p"),
        JobClient(settings) as client,
    ):
        wait_for_consumer(settings, Topology(settings.broker.namespace).job_queue("summarisation"))
        result = client.submit("summarisation", "The shop opens at nine.", deadline_s=60)

    assert result.answered_by == "p-ok" and result.fallback is None
    assert result.guidance == "retrieval" and result.model == "test:pupil"
    assert "Summarise in one sentence: The shop opens at nine." in result.output


def test_submit_async_awaits_answers_without_blocking_the_loop(
    settings: Settings, tmp_path: Path
) -> None:
    async def three_at_once(client: JobClient) -> tuple[list[JobResult], int]:
        ticks = 0

        async def tick() -> None:  # runs only while the loop is free
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        texts = ["Rain tonight.", "The shop opens at nine.", "Bus 7 is late."]
        results = await asyncio.gather(
            *(client.submit_async("summarisation", t, deadline_s=60) for t in texts)
        )
        ticker.cancel()
        return list(results), ticks

    with (
        master(settings),
        pupil(settings, "p-ok", Echo("pupil"), tmp_path / "p"),
        JobClient(settings) as client,
    ):
        wait_for_consumer(settings, Topology(settings.broker.namespace).job_queue("summarisation"))
        results, ticks = asyncio.run(three_at_once(client))

    assert [r.answered_by for r in results] == ["p-ok"] * 3
    assert "Rain tonight." in results[0].output  # each answer is its own job's
    assert "Bus 7 is late." in results[2].output
    assert ticks > 0, "the event loop was blocked while waiting"


def test_without_a_master_a_submit_fails_clearly_and_the_client_keeps_working(
    settings: Settings,
) -> None:
    with JobClient(settings) as client:
        with pytest.raises(PublishNotConfirmed, match="start the master first"):
            client.submit("legal_medical", "Is this mole dangerous?", deadline_s=5)
        with master(settings):  # the same client, once a master runs
            result = client.submit("legal_medical", "Is this mole dangerous?", deadline_s=5)
    assert result.answered_by == "master" and result.fallback == "critical"


def test_a_restarted_master_answers_the_jobs_the_old_one_left_open(settings: Settings) -> None:
    # No pupil does translation here: the job waits for its deadline, the master dies meanwhile,
    # and the new master, finding the job open and overdue, answers the still-waiting submitter.
    with JobClient(settings) as client:
        with master(settings) as first:
            future = client.submit_future(
                "translation", {"text": "Good night", "language": "German"}, deadline_s=3
            )
            wait_for(lambda: first.store.open_jobs() != [], 30, "the job to be stored")
        assert not future.done()
        time.sleep(3.5)  # the deadline passes while no master runs
        with master(settings):
            result = future.result(timeout=60)

    assert result.answered_by == "master"
    assert result.fallback == "deadline: no pupil answered in time"
    assert result.elapsed_s >= 3.0
