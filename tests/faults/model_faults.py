"""The model server goes away: an Ollama outage while the master teaches and the pupil learns.

Master and pupil both run the ``ollama`` backends against one Ollama stand-in
(``tests/support/fake_ollama.py``) running as its own process. Once the master has published its
first lesson, that process is killed (connections are then refused, as with a stopped
``ollama serve``), kept down for :data:`OUTAGE_S`, and started again on the same port.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from distill_swarm.local_broker import LocalBroker, free_port
from shared.checkpoint import load_checkpoint
from tests.faults.harness import (
    PROMPTS,
    ROOT,
    RUN_TIMEOUT_S,
    START_TIMEOUT_S,
    Swarm,
    finished,
    wait_until,
)
from tests.faults.process_faults import LESSONS, NODE
from tests.faults.result import FaultResult, tally
from tests.faults.wiretap import WireTap

# How long the model server stays down. Long enough for several failed probes (0.5 s, 1 s, 2 s,
# 4 s, ... apart) and for the heartbeat saying "model down" to reach the master's store.
OUTAGE_S = 8.0
GENERATOR_MODEL = "gemma3:270m"
EMBEDDER_MODEL = "all-minilm"


class OllamaProcess:
    """The Ollama stand-in as a process of its own, stoppable and restartable on one port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start serving and wait until it answers."""
        self.starts += 1
        with (self.workdir / f"ollama-{self.starts}.log").open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    sys.executable, "-m", "tests.support.fake_ollama", "--port", str(self.port),
                    "--model", f"{GENERATOR_MODEL}=generate", "--model", f"{EMBEDDER_MODEL}=embed",
                ],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
        wait_until(self.answers, START_TIMEOUT_S, "the Ollama stand-in to answer")

    def answers(self) -> bool:
        """True if the server answers ``GET /api/version`` right now."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/version", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL it, like a crashed or stopped server: its port then refuses connections."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=30)

    def env(self) -> dict[str, str]:
        """Environment that points a master's and a pupil's backends at this server."""
        env: dict[str, str] = {}
        for role in ("MASTER", "PUPIL"):
            for part, model in (("GENERATOR", GENERATOR_MODEL), ("EMBEDDER", EMBEDDER_MODEL)):
                prefix = f"DISTILL_SWARM__{role}__{part}__"
                env.update({prefix + "KIND": "ollama", prefix + "MODEL": model})
                env[prefix + "URL"] = self.url
        return env


def model_metrics(url: str) -> dict[str, float]:
    """The pupil's model_up gauge and model_outages counter, from its live /metrics page."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("distill_swarm_model_up", "distill_swarm_model_outages_total"):
                found[sample.name] = sample.value
    return found


def model_server_outage(broker: LocalBroker, workdir: Path) -> FaultResult:
    """Kill the model server after the first lesson is published; restart it after OUTAGE_S."""
    with Swarm(broker, workdir) as swarm:
        ollama = OllamaProcess(workdir)
        try:
            ollama.start()
            return _run(swarm, ollama)
        finally:
            ollama.kill()


def _run(swarm: Swarm, ollama: OllamaProcess) -> FaultResult:
    tap = WireTap(swarm.broker_config).install()
    metrics_port = free_port()
    env = {**ollama.env(), "DISTILL_SWARM__PUPIL__METRICS_PORT": str(metrics_port)}
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    swarm.pupil(NODE, env=env)
    swarm.wait_for_log(NODE, r"consuming")
    swarm.start(
        "master", "master", "run", "--prompts", str(PROMPTS), "--store", str(swarm.store_path),
        "--expect-nodes", "1", "--exit-when-done", "--timeout-s", str(int(RUN_TIMEOUT_S)),
        env=env,
    )  # fmt: skip
    wait_until(lambda: swarm.published(), START_TIMEOUT_S, "the first published lesson")
    ollama.kill()
    published_at_stop = len(swarm.published())
    # During the outage: what the master's store says about the node, and the pupil's gauge.
    node_states: set[str] = set()
    model_up_during: set[float] = set()
    outage_ends = time.monotonic() + OUTAGE_S
    while time.monotonic() < outage_ends:
        tap.poll()
        node_states.update(str(r[0]) for r in swarm.query("SELECT state FROM nodes"))
        with contextlib.suppress(OSError):  # the pupil's metrics page may be slow to answer
            model_up_during.add(model_metrics(metrics_url).get("distill_swarm_model_up", -1.0))
        time.sleep(0.2)
    reports_during = len(set(tap.poll().report_pairs({NODE})))
    ollama.start()
    back = tap.now()
    wait_until(lambda: finished(swarm, tap, "master"), RUN_TIMEOUT_S, "the master to finish")
    after = model_metrics(metrics_url)
    states_after = {str(r[0]) for r in swarm.query("SELECT state FROM nodes")}
    pupil_exit = swarm.kill(NODE, signal.SIGTERM)
    tap.poll()
    train = [str(r[0]) for r in swarm.query("SELECT lesson_id FROM lessons WHERE split='train'")]
    adapter_path = swarm.state_dir(NODE) / "adapter.safetensors"
    adapter = load_checkpoint(adapter_path) if adapter_path.exists() else None
    learned = adapter.replay.export()[2] if adapter is not None else []
    pupil_log, master_log = swarm.log(NODE), swarm.log("master")
    result = tally(
        f"model server down {OUTAGE_S:g} s",
        tap,
        LESSONS,
        {NODE},
        tap.recovery_s(back, NODE),
        published_at_stop=published_at_stop,
        reports_during_outage=reports_during,
        node_states_during=sorted(node_states),
        node_states_after=sorted(states_after),
        model_up_during=sorted(model_up_during),
        model_metrics_after=after,
        dead_letters=swarm.queue_depth(swarm.topology.dead_queue),
        train_lessons=sorted(train),
        adapter_version=None if adapter is None else adapter.version,
        adapter_lessons=sorted(set(learned)),
        # Trainings beyond one per train lesson (the adapter's version counts every training).
        trained_twice=None if adapter is None else adapter.version - len(set(learned)),
        pupil_said_down="model down:" in pupil_log,
        pupil_said_back="model back after" in pupil_log,
        master_said_down="master model down:" in master_log,
        master_log=master_log,
        pupil_log=pupil_log,
        master_exit=swarm.processes["master"].returncode,
        pupil_exit=pupil_exit,
    )
    result.trained_twice = result.evidence["trained_twice"]
    return result
