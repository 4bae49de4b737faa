"""Running `distill-swarm` processes for fault scenarios, and watching what they do.

A :class:`Swarm` owns one namespace on a private broker, a work directory with one config file,
and every process it starts; :meth:`Swarm.close` kills whatever is still running and deletes the
namespace. Each process writes its own log file (``<name>.log``), so a restarted process gets a
new name and its log can be read apart from its predecessor's.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from distill_swarm.local_broker import LocalBroker
from distill_swarm.processes import stop_processes
from shared.broker import Publisher, connect
from shared.config import BrokerConfig
from shared.errors import BrokerError
from shared.namespace import delete_namespace
from shared.topology import Topology
from tests.faults.wiretap import WireTap

ROOT = Path(__file__).resolve().parents[2]
# Six prompts, four train and two eval: small enough for 2 cores, big enough to fault mid-run.
PROMPTS = ROOT / "tests" / "e2e" / "prompts.jsonl"
POLL_S = 0.05
# Generous: on 2 shared cores a process loads its models in 5-30 s.
START_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 300.0

T = TypeVar("T")


def fault_config(broker: BrokerConfig) -> str:
    """The TOML every process of a scenario reads: tiny generations, fast reconnects.

    The pupils answer ``plain`` and measure no guided methods on eval lessons, so every lesson
    costs one short generation; ``max_backoff_s = 1`` keeps recovery after a broker restart
    short (production keeps the 30 s default). A scenario changes a setting for one process
    through its environment (``DISTILL_SWARM__SECTION__FIELD``), which overrides this file.
    """
    return f"""
[broker]
url = "{broker.url}"
namespace = "{broker.namespace}"
max_backoff_s = 1.0
connect_attempts = 10

# These scenarios watch per-node queues (their depth, what a restart leaves in them); the
# lesson stream's faults (SIGKILL mid-catch-up, retention) are in
# tests/integration/test_lesson_stream.py.
[lessons]
transport = "queues"

[master]
metrics_port = 0
# No end-of-run exam: it sends the eval lessons again, which the wire tap would count as
# duplicated lessons; the exam has its own end-to-end test (tests/e2e/test_swarm.py).
exam = false
expect_nodes_timeout_s = 120

[master.generator]
max_tokens = 12
threads = 1

[pupil]
heartbeat_interval_s = 1
metrics_port = 0

[pupil.generator]
temperature = 0.8
max_tokens = 12
threads = 1

[pupil.adapter]
steps_per_lesson = 4
batch_size = 8

[pupil.guidance]
method = "plain"
eval_methods = []
"""


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str) -> T:
    """Poll until ``predicate()`` is truthy and return it; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(POLL_S)
    return result


def finished(swarm: Swarm, tap: WireTap, name: str) -> bool:
    """True once process ``name`` exited; reads the wire tap on the way, for its timestamps."""
    tap.poll()
    return not swarm.running(name)


class Swarm:
    """Processes of one scenario: a namespace, a config file, logs, and clean-up."""

    def __init__(self, broker: LocalBroker, workdir: Path) -> None:
        self.broker = broker
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.broker_config = BrokerConfig(
            url=broker.url, namespace=f"f{secrets.token_hex(4)}", max_backoff_s=1.0
        )
        self.topology = Topology(self.broker_config.namespace)
        self.config = workdir / "swarm.toml"
        self.config.write_text(fault_config(self.broker_config))
        self.store_path = workdir / "master.sqlite3"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.node_ids: set[str] = set()
        self._publishers: list[Publisher] = []

    # -- processes --------------------------------------------------------------------------

    def start(
        self,
        name: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        wrap: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """Run ``distill-swarm <args> --config <ours>``, logging to ``<workdir>/<name>.log``.

        ``cwd``: the process's working directory (default: the repository root). ``wrap``: a
        command line the process runs under (e.g. ``unshare`` with a private /etc/hosts).
        """
        assert name not in self.processes, f"process name {name} is taken: name restarts apart"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_SWARM__")}
        environ.pop("AMQP_URL", None)  # the config file names the scenario's broker
        environ.update({"PYTHONUNBUFFERED": "1", **(env or {})})
        with (self.workdir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [*wrap, sys.executable, "-m", "distill_swarm", *args, "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environ,
                cwd=cwd or ROOT,
            )
        self.processes[name] = proc
        return proc

    def pupil(
        self, node_id: str, name: str | None = None, env: Mapping[str, str] | None = None
    ) -> str:
        """Start a pupil; returns its process name (``node_id`` unless given)."""
        name = name or node_id
        self.node_ids.add(node_id)
        state = str(self.state_dir(node_id))
        self.start(name, "pupil", "run", "--node-id", node_id, "--state-dir", state, env=env)
        return name

    def master(self, name: str = "master", *extra: str) -> str:
        """Start a master over the scenario's prompt set and store; returns its process name."""
        args = ("master", "run", "--prompts", str(PROMPTS), "--store", str(self.store_path))
        self.start(name, *args, *extra)
        return name

    def state_dir(self, node_id: str) -> Path:
        """Where pupil ``node_id`` keeps its checkpoints and journal."""
        return self.workdir / node_id

    def log(self, name: str) -> str:
        """Everything process ``name`` has logged so far."""
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def wait_for_log(self, name: str, pattern: str, timeout_s: float = START_TIMEOUT_S) -> str:
        """Wait until ``name``'s log matches ``pattern``; returns the match. Fails fast on exit."""

        def found() -> str:
            match = re.search(pattern, self.log(name))
            if match is None and self.processes[name].poll() is not None:
                raise AssertionError(
                    f"{name} exited while waiting for {pattern!r}:\n{self.tail(name)}"
                )
            return match.group(0) if match else ""

        return wait_until(found, timeout_s, f"{pattern!r} in {name}'s log")

    def tail(self, name: str, chars: int = 3000) -> str:
        """The end of ``name``'s log, for assertion messages."""
        return self.log(name)[-chars:]

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> int:
        """Send ``sig`` and wait for the process to end; returns its exit code."""
        proc = self.processes[name]
        proc.send_signal(sig)
        return proc.wait(timeout=90)

    def wait(self, name: str, timeout_s: float = RUN_TIMEOUT_S) -> int:
        """Wait for process ``name`` to exit by itself; returns its exit code."""
        return self.processes[name].wait(timeout=timeout_s)

    def running(self, name: str) -> bool:
        """True while process ``name`` has not exited."""
        return self.processes[name].poll() is None

    def play_master(self) -> Publisher:
        """Stand in for the master: declare its queues (so reports are routable) and return a
        confirming publisher for lessons."""
        connection = connect(self.broker_config)
        try:
            self.topology.declare_master(connection.channel())
        finally:
            connection.close()
        publisher = Publisher(self.broker_config, self.topology.declare_master)
        self._publishers.append(publisher)
        return publisher

    def close(self) -> None:
        """Kill what still runs and delete the scenario's namespace."""
        for publisher in self._publishers:
            publisher.close()
        stop_processes(self.processes.values(), sig=signal.SIGKILL)
        delete_namespace(
            self.broker_config.model_copy(update={"connect_attempts": 3}),
            sorted(self.node_ids),
            WireTap.queues(self.topology.namespace),
        )

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the master's store, read-only while the master writes it ---------------------------------

    def query(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        """Rows of ``sql`` on the master's store ([] while it does not exist yet)."""
        if not self.store_path.exists():
            return []
        db = sqlite3.connect(f"file:{self.store_path}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []  # the master has not created its tables yet
        finally:
            db.close()

    def published(self) -> list[str]:
        """Lesson ids the master marked published, in publishing order."""
        rows = self.query(
            "SELECT lesson_id FROM lessons WHERE published_at IS NOT NULL ORDER BY published_at"
        )
        return [str(r[0]) for r in rows]

    def saved_unpublished(self) -> list[str]:
        """Lesson ids the master saved but had not marked published."""
        rows = self.query("SELECT lesson_id FROM lessons WHERE published_at IS NULL")
        return [str(r[0]) for r in rows]

    def accepts_connections(self) -> bool:
        """True if the broker takes an AMQP connection right now (one attempt)."""
        try:
            connect(self.broker_config.model_copy(update={"connect_attempts": 1})).close()
        except BrokerError:
            return False
        return True

    def queue_counts(self, queue: str) -> tuple[int, int]:
        """(ready, unacknowledged) messages in ``queue``, as the broker itself counts them."""
        listing = self.broker.ctl(
            "list_queues", "-q", "name", "messages_ready", "messages_unacknowledged"
        )
        for line in listing.stdout.splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[0] == queue:
                return int(fields[1]), int(fields[2])
        raise AssertionError(f"no queue {queue} in {listing.stdout!r} {listing.stderr!r}")

    def queue_depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting unacked ones)."""
        connection = connect(self.broker_config)
        try:
            result = connection.channel().queue_declare(queue, passive=True)
            return int(result.method.message_count)
        finally:
            connection.close()
