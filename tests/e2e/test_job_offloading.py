"""Job offloading end to end: a master and two pupils as OS processes, real broker, real models.

One swarm serves the whole module (loading three embedded models is the slow part). The pupils do
every offloadable kind except ``translation``, so a translation job can only be answered by the
master once its deadline passes. The kill test runs last: it leaves one pupil dead.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pika
import pika.exceptions as pex
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from distill_swarm.client import JobClient
from distill_swarm.processes import stop_processes
from master.job_store import JobStore
from master.store import Store
from shared.broker import connect
from shared.config import BrokerConfig, Settings
from shared.jobs import OFFLOADABLE
from shared.messages import JobResult, decode
from shared.namespace import delete_namespace
from shared.topology import REASON_HEADER, Topology
from tests.support.live_swarm import free_port, http_get, sample, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.models, pytest.mark.broker]

NODES = ("pupil-1", "pupil-2")
PUPIL_KINDS = [k for k in OFFLOADABLE if k != "translation"]
STARTUP_TIMEOUT_S = 300
ANSWER_TIMEOUT_S = 180
TEXTS = [
    "The library will open on Sundays from March, staffed by volunteers.",
    "A new bus line links the airport with the old town every ten minutes.",
    "The bakery on Main Street now sells gluten-free bread on Fridays.",
    "Heavy rain is expected tonight; the river path will be closed until noon.",
    "The school choir won the regional contest with a medley of folk songs.",
    "Parking fees in the centre rise by ten percent from next month.",
    "The museum adds a hall of old maps, open to visitors from June.",
    "A farmers' market will take place in the square every Saturday morning.",
]


class JobSwarm:
    """A master and two pupils with their config, store and logs in one directory."""

    def __init__(self, workdir: Path, broker: BrokerConfig) -> None:
        self.workdir = workdir
        self.broker = broker
        self.store = workdir / "master.sqlite3"
        self.metrics_port = free_port()
        self.config = workdir / "swarm.toml"
        self.config.write_text(f"""
[broker]
url = "{broker.url}"
namespace = "{broker.namespace}"
[master]
store = "{self.store}"
metrics_port = {self.metrics_port}
[master.generator]
max_tokens = 16
threads = 1
[master.jobs]
sample_rate = 1.0
[pupil]
heartbeat_interval_s = 1
metrics_port = 0
jobs = {json.dumps(PUPIL_KINDS)}
[pupil.generator]
max_tokens = 16
threads = 1
""")
        self.settings = Settings(broker=broker)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_SWARM__")}
        clean.pop("AMQP_URL", None)
        log = (self.workdir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "distill_swarm", *args, "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**clean, **(env or {})},
        )

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.log(n)[-2500:]}" for n in self.processes)

    def jobs(self) -> JobStore:
        return JobStore(Store(self.store))

    def close(self) -> None:
        stop_processes(self.processes.values(), timeout_s=60)


@pytest.fixture(scope="module")
def swarm(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobSwarm]:
    broker = BrokerConfig(
        url=amqp_url, namespace=f"j{secrets.token_hex(4)}", connect_attempts=3, max_backoff_s=1.0
    )
    s = JobSwarm(tmp_path_factory.mktemp("jobs"), broker)
    try:
        s.spawn("master", "master", "run")
        wait_for(lambda: "consuming" in s.log("master"), STARTUP_TIMEOUT_S, "the master")
        for node in NODES:
            s.spawn(node, "pupil", "run", "--node-id", node, "--state-dir", str(s.workdir / node))
        for node in NODES:
            wait_for(
                lambda node=node: ".jobs.summarisation" in s.log(node),  # type: ignore[misc]
                STARTUP_TIMEOUT_S,
                f"{node} consuming its job queues",
            )
        yield s
    finally:
        s.close()
        delete_namespace(broker, NODES)


def _results(futures: list[Future[JobResult]], swarm: JobSwarm) -> list[JobResult]:
    try:
        return [f.result(timeout=ANSWER_TIMEOUT_S) for f in futures]
    except TimeoutError:
        raise AssertionError(f"a job got no answer\n{swarm.logs()}") from None


def test_two_pupils_share_a_burst_and_the_master_samples_agreement(swarm: JobSwarm) -> None:
    with JobClient(swarm.settings) as client:
        futures = [client.submit_future("summarisation", t, deadline_s=120) for t in TEXTS]
        results = _results(futures, swarm)

    assert all(r.error is None and r.output for r in results), results
    by = {r.answered_by for r in results}
    assert by == set(NODES), f"both pupils should have done some of the burst, got {by}"
    assert all(r.fallback is None for r in results)

    # One job of each of two kinds: a pupil holds one job at a time across its kinds, so the
    # second job goes to the idle pupil instead of waiting behind the first on a busy one.
    with JobClient(swarm.settings) as client:
        pair = [
            client.submit_future("keyword_tagging", TEXTS[0], deadline_s=120),
            client.submit_future("hypothesis_summarisation", TEXTS[1], deadline_s=120),
        ]
        mixed = _results(pair, swarm)
    assert {r.answered_by for r in mixed} == set(NODES), mixed

    # Quality: every offloaded job is sampled (sample_rate 1.0), and the master exports it.
    def sampled() -> bool:
        return {node for _, node, _, _ in swarm.jobs().agreement()} == set(NODES)

    wait_for(sampled, ANSWER_TIMEOUT_S, "agreement samples for both pupils")
    for kind, node, count, mean in swarm.jobs().agreement():
        assert kind == "summarisation" and count >= 1 and -1.0 <= mean <= 1.0, (kind, node)
    page = http_get(f"http://127.0.0.1:{swarm.metrics_port}/metrics")
    for node in NODES:
        n = sample(page, "distill_swarm_job_agreement_count", kind="summarisation", node=node)
        assert n is not None and n >= 1, node


def test_the_cli_submits_from_a_file_or_stdin_and_says_who_answered(
    swarm: JobSwarm, tmp_path: Path
) -> None:
    text = tmp_path / "query.txt"
    text.write_text("I was charged twice for my subscription.")
    base = [sys.executable, "-m", "distill_swarm", "submit", "--config", str(swarm.config)]
    from_file = subprocess.run(
        [*base, "query_routing", "--input", str(text), "-p", "routes=billing, support, sales"],
        capture_output=True, text=True, timeout=ANSWER_TIMEOUT_S,
    )  # fmt: skip
    from_stdin = subprocess.run(
        [*base, "keyword_tagging", "--json"], input="Baking sourdough bread at home",
        capture_output=True, text=True, timeout=ANSWER_TIMEOUT_S,
    )  # fmt: skip

    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout.strip()
    assert re.search(r"answered by pupil-[12] in [0-9.]+s$", from_file.stderr.strip())
    assert from_stdin.returncode == 0, from_stdin.stderr
    result = JobResult.model_validate_json(from_stdin.stdout)
    assert result.job_kind == "keyword_tagging" and result.answered_by in NODES


def test_a_critical_kind_never_reaches_a_pupil(swarm: JobSwarm) -> None:
    with JobClient(swarm.settings) as client:
        result = client.submit("legal_medical", "May I stop my medication early?", deadline_s=60)

    assert result.answered_by == "master"
    assert result.fallback == "critical"
    assert result.output
    # No queue exists for the kind, so no pupil could consume it even if configured to...
    connection = connect(swarm.broker)
    try:
        with pytest.raises(pex.ChannelClosedByBroker) as refused:
            connection.channel().queue_declare(
                Topology(swarm.broker.namespace).job_queue("legal_medical"), passive=True
            )
        assert refused.value.reply_code == 404
    finally:
        connection.close()
    # ...no pupil saw it...
    for node in NODES:
        assert result.job_id not in swarm.log(node)
        assert "legal_medical" not in swarm.log(node)
    # ...and a pupil configured for it refuses to start, with a one-line reason.
    refused_start = subprocess.run(
        [sys.executable, "-m", "distill_swarm", "pupil", "run", "--node-id", "pupil-x",
         "--config", str(swarm.config)],
        env={**os.environ, "DISTILL_SWARM__PUPIL__JOBS": "summarisation,legal_medical"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused_start.returncode == 2
    assert "legal_medical is critical" in refused_start.stderr
    assert len(refused_start.stderr.strip().splitlines()) == 1


def test_a_missed_deadline_falls_back_to_the_master_and_says_so(swarm: JobSwarm) -> None:
    started = time.monotonic()
    with JobClient(swarm.settings) as client:
        result = client.submit(
            "translation", {"text": "Good morning", "language": "French"}, deadline_s=2
        )

    assert result.answered_by == "master"
    assert result.fallback is not None and result.fallback.startswith("deadline")
    assert result.elapsed_s >= 2.0
    assert time.monotonic() - started >= 2.0
    row = swarm.jobs().get(result.job_id)
    assert row is not None and row.answered_by == "master" and row.fallback == result.fallback
    # The CLI's listing says who answered and why.
    listing = subprocess.run(
        [sys.executable, "-m", "distill_swarm", "jobs", "--store", str(swarm.store)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    line = next(ln for ln in listing.splitlines() if ln.split()[2:3] == [result.job_id[:12]])
    assert "translation" in line and "master" in line and "deadline" in line


def test_a_malformed_job_is_dead_lettered_and_the_submitter_told(swarm: JobSwarm) -> None:
    topology = Topology(swarm.broker.namespace)
    connection = connect(swarm.broker)
    try:
        channel = connection.channel()
        reply_queue = channel.queue_declare("", exclusive=True).method.queue
        fields = {"job_id": "bad-1", "job_kind": "summarisation", "text": ""}
        bad = json.dumps({"kind": "job", **fields, "deadline": "2030-01-01T00:00+00:00"}).encode()
        channel.basic_publish(
            topology.jobs_exchange,
            topology.SUBMIT_KEY,
            bad,
            pika.BasicProperties(
                message_id="bad-1", reply_to=reply_queue, correlation_id="bad-1", delivery_mode=2
            ),
        )
        reply = _get(channel, reply_queue)
        result = decode(reply[2], JobResult)
        assert isinstance(result, JobResult)
        assert reply[1].correlation_id == "bad-1"
        assert result.error is not None and result.error.startswith("job refused")
        assert "text" in result.error  # names the field that is wrong
        assert not result.output

        dead = _get(channel, topology.dead_queue)
        headers = dead[1].headers or {}
        assert dead[2] == bad
        assert headers["x-distill-swarm-queue"] == topology.job_submissions_queue
        assert "text" in headers[REASON_HEADER]
    finally:
        connection.close()
    # The master carries on: a good job right after is answered.
    with JobClient(swarm.settings) as client:
        assert client.submit("keyword_tagging", "Fixing a bike chain", deadline_s=120).output


def _get(
    channel: BlockingChannel, queue: str, timeout_s: float = 30.0
) -> tuple[object, pika.BasicProperties, bytes]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is not None and props is not None and body is not None:
            return method, props, body
        time.sleep(0.2)
    raise AssertionError(f"nothing arrived on {queue} within {timeout_s:.0f}s")


def test_killing_a_pupil_mid_job_loses_no_job(swarm: JobSwarm) -> None:
    victim, survivor = NODES[1], NODES[0]
    before = swarm.log(victim).count("): started")
    with JobClient(swarm.settings) as client:
        futures = [
            client.submit_future("hypothesis_summarisation", t, deadline_s=150) for t in TEXTS[:6]
        ]

        def victim_busy() -> bool:
            return swarm.log(victim).count("): started") > before

        wait_for(victim_busy, ANSWER_TIMEOUT_S, f"{victim} to start a job", poll_s=0.05)
        swarm.processes[victim].send_signal(signal.SIGKILL)
        swarm.processes[victim].wait(timeout=30)
        cut_short = _started_not_answered(swarm.log(victim))
        results = _results(futures, swarm)

    assert cut_short, f"{victim} was killed between jobs, not mid-job:\n{swarm.log(victim)}"
    assert len(results) == 6
    assert all(r.error is None and r.output for r in results), results
    by_id = {r.job_id: r for r in results}
    # The job the victim was doing when it died went back to the queue, and the survivor did it.
    for job_id in cut_short & by_id.keys():
        assert by_id[job_id].answered_by == survivor, by_id[job_id]
        assert by_id[job_id].fallback is None
    stored = [swarm.jobs().get(job_id) for job_id in by_id]
    assert all(row is not None and row.state == "done" for row in stored)


def _started_not_answered(log: str) -> set[str]:
    """Job ids a pupil's log says it started but never answered."""
    started, answered = set(), set()
    for line in log.splitlines():
        if "pupil_node.jobs: job " not in line:
            continue
        job_id = line.split("pupil_node.jobs: job ", 1)[1].split(" ", 1)[0]
        if line.endswith("started"):
            started.add(job_id)
        elif "answered in" in line:
            answered.add(job_id)
    return started - answered
