"""A live swarm and a real Prometheus scraping it, shared by the observability tests.

``live_swarm`` (session scope) runs a master and one pupil as separate ``distill-swarm``
processes on the real broker and the embedded models, each serving ``/metrics`` on a free port,
teaches three tiny lessons (two train, one eval), then sends one undecodable lesson and one
undecodable report so both services have dead-lettered something. ``live_prometheus`` starts the
Debian ``prometheus`` binary with ``deploy/prometheus/prometheus.yml`` (targets rewritten to those
ports, the pupil added as a job) and the real ``deploy/prometheus/alerts.yml``.

Both fixtures are registered for every test through ``pytest_plugins`` in ``tests/conftest.py``,
so the processes start once per session however many test files use them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from distill_swarm.processes import stop_processes
from shared.broker import connect
from shared.config import BrokerConfig
from shared.namespace import delete_namespace
from shared.topology import Topology

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERT_RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
MASTER_JOB = "distill-swarm-master"
PUPIL_JOB = "distill-swarm-pupil"
NODE_ID = "pupil-1"  # one of tests/conftest.py's TEST_NODE_IDS
LESSONS = 3
STARTUP_TIMEOUT_S = 600
PROMPTS = [
    {"id": "m-sum", "goal_text": "Summarise: the shop opens at nine.", "split": "train"},
    {"id": "m-tr", "goal_text": "Translate into French: 'thank you'.", "split": "train"},
    {
        "id": "m-route",
        "goal_text": "Billing or support? 'My card was charged twice.'",
        "split": "eval",
    },
]


def under_ci() -> bool:
    """True when running under CI=true, where a missing tool is a failure, not a skip."""
    return os.environ.get("CI", "").lower() == "true"


def require_binary(name: str, package: str) -> str:
    """The path of ``name``; outside CI skip the test if it is missing, under CI fail it."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed (apt-get install {package})"
        if under_ci():
            pytest.fail(f"{message}; under CI=true this is a failure")
        pytest.skip(message)
    return found


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout_s: float = 5.0) -> str:
    """The body of a GET request."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return str(response.read().decode())


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page by (name, labels); histograms give _bucket/_sum/_count."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# The series names each metric type is exported as (the family name is what HELP/TYPE declare).
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def exported_series(text: str) -> set[str]:
    """Series names a /metrics page exports, or declares (HELP/TYPE) before its first sample.

    A labelled metric has no sample until its first label set is used (a duplicate report, say),
    but its declaration is on the page: it exists, under the names its type gives its series.
    """
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        names.update(family.name + suffix for suffix in SERIES_SUFFIXES.get(family.type, ("",)))
    return names


def exported_metrics(text: str) -> set[str]:
    """Metric names as documented: counters with ``_total``, histograms by their base name."""
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(text)
    }


def sample(text: str, name: str, **labels: str) -> float | None:
    """One sample's value, or None if the page does not have it."""
    return samples(text).get((name, frozenset(labels.items())))


def wait_for(
    predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 1.0
) -> None:
    """Poll until ``predicate`` holds; raise AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


@dataclass
class LiveSwarm:
    """A running master and pupil; their /metrics URLs and where their logs are."""

    workdir: Path
    broker: BrokerConfig
    master_url: str
    pupil_url: str
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_SWARM__")}
        env.pop("AMQP_URL", None)  # the config file names the test's broker
        log = (self.workdir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "distill_swarm", *args, "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    @property
    def config(self) -> Path:
        return self.workdir / "swarm.toml"

    def logs(self) -> str:
        """The tail of every process's log, for assertion messages."""
        return "\n".join(
            f"--- {name} ---\n" + (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
            for name in self.processes
        )

    def alive(self) -> bool:
        dead = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
        if dead:
            raise AssertionError(f"processes exited early: {dead}\n{self.logs()}")
        return True

    def send_garbage(self) -> None:
        """One undecodable lesson for the pupil and one undecodable report for the master."""
        topology = Topology(self.broker.namespace)
        connection = connect(self.broker)
        try:
            channel = connection.channel()
            props = pika.BasicProperties(message_id="garbage", delivery_mode=2)
            channel.basic_publish(topology.lessons_exchange, "", b"not json", props)
            channel.basic_publish(topology.reports_exchange, topology.REPORT_KEY, b"[1]", props)
        finally:
            connection.close()

    def master_metrics(self) -> str:
        return http_get(self.master_url)

    def pupil_metrics(self) -> str:
        return http_get(self.pupil_url)

    def stop(self) -> None:
        stop_processes(self.processes.values(), timeout_s=60)


def _config(broker: BrokerConfig, master_port: int, pupil_port: int) -> str:
    # Tiny generations and one guidance method keep the whole session fixture under a minute.
    return f"""
[broker]
url = "{broker.url}"
namespace = "{broker.namespace}"
connect_attempts = 5
max_backoff_s = 2.0
[master]
metrics_port = {master_port}
metrics_addr = "127.0.0.1"
[master.generator]
max_tokens = 16
threads = 1
[pupil]
heartbeat_interval_s = 1
metrics_port = {pupil_port}
metrics_addr = "127.0.0.1"
[pupil.generator]
temperature = 0.8
max_tokens = 16
threads = 1
[pupil.adapter]
steps_per_lesson = 2
batch_size = 4
[pupil.guidance]
method = "retrieval"
eval_methods = ["retrieval"]
examples = 1
"""


@pytest.fixture(scope="session")
def live_swarm(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSwarm]:
    """A master and a pupil as real processes that have done three lessons."""
    workdir = tmp_path_factory.mktemp("live-swarm")
    broker = BrokerConfig(url=amqp_url, namespace=f"t{secrets.token_hex(4)}")
    master_port, pupil_port = free_port(), free_port()
    swarm = LiveSwarm(
        workdir,
        broker,
        master_url=f"http://127.0.0.1:{master_port}/metrics",
        pupil_url=f"http://127.0.0.1:{pupil_port}/metrics",
    )
    swarm.config.write_text(_config(broker, master_port, pupil_port))
    prompts = workdir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    try:
        swarm.spawn("pupil", "pupil", "run", "--node-id", NODE_ID, "--state-dir", str(workdir))
        swarm.spawn(
            "master",
            "master",
            "run",
            "--prompts",
            str(prompts),
            "--store",
            str(workdir / "master.sqlite3"),
            "--expect-nodes",
            "1",
        )

        def reported(n: int) -> Callable[[], bool]:
            def check() -> bool:
                swarm.alive()
                try:
                    text = swarm.master_metrics()
                except OSError:
                    return False
                done = sample(
                    text, "distill_swarm_reports_ingested_total", node=NODE_ID, result="ok"
                )
                return (done or 0) >= n

            return check

        wait_for(reported(LESSONS), STARTUP_TIMEOUT_S, f"{LESSONS} reports on the master")
        swarm.send_garbage()

        def both_dead_lettered() -> bool:
            swarm.alive()
            pupil = sample(
                swarm.pupil_metrics(),
                "distill_swarm_messages_rejected_total",
                queue="lessons",
                reason="invalid",
            )
            master = sample(
                swarm.master_metrics(),
                "distill_swarm_messages_rejected_total",
                queue="reports",
                reason="invalid",
            )
            return (pupil or 0) >= 1 and (master or 0) >= 1

        wait_for(both_dead_lettered, 60, "the garbage to be dead-lettered")
        yield swarm
    finally:
        swarm.stop()
        delete_namespace(broker, (NODE_ID,))


@dataclass
class LivePrometheus:
    """A real Prometheus process and its HTTP API."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        body = json.loads(http_get(f"{self.url}/api/v1/{path}{query}", timeout_s=10))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result


def prometheus_config(
    prometheus_port: int, master_port: int, pupil_port: int, interval_s: int = 1
) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the test's targets and a short interval."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    interval = f"{interval_s}s"
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    config["rule_files"] = [str(ALERT_RULES)]
    targets = {
        "prometheus": f"127.0.0.1:{prometheus_port}",
        MASTER_JOB: f"127.0.0.1:{master_port}",
    }
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(targets), "deploy/prometheus/prometheus.yml has other jobs now"
    for name, job in jobs.items():
        job["static_configs"] = [{"targets": [targets[name]]}]
    config["scrape_configs"].append(
        {"job_name": PUPIL_JOB, "static_configs": [{"targets": [f"127.0.0.1:{pupil_port}"]}]}
    )
    return config


@pytest.fixture(scope="session")
def live_prometheus(
    live_swarm: LiveSwarm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LivePrometheus]:
    """Prometheus scraping the live swarm every second, with the stack's alert rules."""
    binary = require_binary("prometheus", "prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    port = free_port()

    def port_of(url: str) -> int:
        return int(urllib.parse.urlsplit(url).port or 0)

    config = prometheus_config(port, port_of(live_swarm.master_url), port_of(live_swarm.pupil_url))
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    log = workdir / "prometheus.log"
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    prometheus = LivePrometheus(f"http://127.0.0.1:{port}", process, log)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"prometheus exited: {log.read_text()[-3000:]}")
        try:
            http_get(f"{prometheus.url}/-/ready")
            return True
        except OSError:
            return False

    try:
        wait_for(ready, 60, "prometheus to be ready", poll_s=0.2)
        yield prometheus
    finally:
        stop_processes([process])
