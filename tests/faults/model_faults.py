"""The model server goes away: an Ollama outage while the master teaches and the pupil learns.

Master and pupil both run the ``ollama`` backends against one Ollama stand-in
(``tests/support/fake_ollama.py``) running as its own process. Once the master has published its
first lesson, that process is killed (connections are then refused, as with a stopped
``ollama serve``), kept down for :data:`OUTAGE_S`, and started again on the same port.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from distill_swarm.local_broker import LocalBroker, free_port
from shared.broker import connect
from shared.checkpoint import load_checkpoint
from shared.messages import Job, JobResult, decode, encode
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
# Jobs sent while the model is down, after the one that finds out: one waits in the paused
# consumer (the prefetch window), the rest in the shared queue.
JOBS_WHILE_DOWN = 3
# How long the test watches a paused job consumer take nothing (not a timing assertion: it only
# gives a consumer that would wrongly take jobs the time to do so).
PAUSED_WATCH_S = 4.0
JOB_KIND = "keyword_tagging"
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

    def start(self, warm: bool = False) -> None:
        """Start serving and wait until it answers; ``warm`` also loads both models first.

        Warming the first start keeps model loading (a minute on a busy machine) out of the
        services' start-up probes; a restart is left cold, as a restarted Ollama is.
        """
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
        if warm:
            for path, body in (
                ("/api/embed", {"model": EMBEDDER_MODEL, "input": ["warm up"]}),
                ("/api/chat", {"model": GENERATOR_MODEL, "stream": False,
                               "messages": [{"role": "user", "content": "hi"}],
                               "options": {"num_predict": 1}}),
            ):  # fmt: skip
                request = urllib.request.Request(
                    self.url + path, json.dumps(body).encode(), method="POST"
                )
                with urllib.request.urlopen(request, timeout=START_TIMEOUT_S):
                    pass

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
                # The first call after the restart loads the model, slowly on a busy machine.
                env[prefix + "TIMEOUT_S"] = str(int(START_TIMEOUT_S))
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
            ollama.start(warm=True)
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
    back, back_wall = tap.now(), datetime.now()  # local time, as the logs write it
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
        # From the server answering again to the pupil resuming intake: the probe backoff's part
        # of the recovery (the rest is the restarted server loading its models, and the lesson).
        resumed_s=_resumed_s(pupil_log, back_wall),
        master_said_down="master model down:" in master_log,
        master_log=master_log,
        pupil_log=pupil_log,
        master_exit=swarm.processes["master"].returncode,
        pupil_exit=pupil_exit,
    )
    result.trained_twice = result.evidence["trained_twice"]
    return result


def jobs_while_model_down(broker: LocalBroker, workdir: Path) -> dict[str, Any]:
    """A pupil's job consumer during a model-server outage, with the test playing the master.

    The first job after the kill finds the model down (and is answered with an error, so the
    master can answer it at once); the jobs sent after it must wait for the model, not fail.
    """
    with Swarm(broker, workdir) as swarm:
        ollama = OllamaProcess(workdir)
        try:
            ollama.start(warm=True)
            publisher = swarm.play_master()
            swarm.pupil(NODE, env={**ollama.env(), "DISTILL_SWARM__PUPIL__JOBS": JOB_KIND})
            swarm.wait_for_log(NODE, rf"consuming .*jobs\.{JOB_KIND}")
            ollama.kill()
            results: dict[str, JobResult] = {}

            def send(job_id: str) -> None:
                deadline = datetime.now(UTC) + timedelta(seconds=RUN_TIMEOUT_S)
                job = Job(job_id=job_id, job_kind=JOB_KIND, text="Fixing a bike chain",
                          deadline=deadline)  # fmt: skip
                publisher.publish(
                    swarm.topology.jobs_exchange, JOB_KIND, encode(job), job_id,
                    reply_to=swarm.topology.JOB_RESULT_KEY, correlation_id=job_id,
                )  # fmt: skip

            def collect() -> dict[str, JobResult]:
                for body in _drain(swarm, swarm.topology.job_results_queue):
                    result = decode(body, JobResult)
                    results.setdefault(result.job_id, result)
                return results

            send("first")
            # Its error result is sent after the node marked its model down.
            wait_until(lambda: "first" in collect(), START_TIMEOUT_S, "the first job's result")
            for n in range(JOBS_WHILE_DOWN):
                send(f"later-{n}")
            time.sleep(PAUSED_WATCH_S)
            during = sorted(collect())
            queue_while_down = swarm.queue_counts(swarm.topology.job_queue(JOB_KIND))
            ollama.start()
            wait_until(
                lambda: len(collect()) == 1 + JOBS_WHILE_DOWN, RUN_TIMEOUT_S, "every job's result"
            )
            pupil_exit = swarm.kill(NODE, signal.SIGTERM)
            return {
                "results": results,
                "answered_during_outage": during,
                "queue_while_down": queue_while_down,
                "pupil_log": swarm.log(NODE),
                "pupil_exit": pupil_exit,
            }
        finally:
            ollama.kill()


def _resumed_s(log: str, since: datetime) -> float | None:
    match = re.search(r"^(\S+ \S+) WARNING shared\.health: model back after", log, re.M)
    if match is None:
        return None
    resumed = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
    return round((resumed - since).total_seconds(), 1)


def _drain(swarm: Swarm, queue: str) -> list[bytes]:
    connection = connect(swarm.broker_config)
    bodies: list[bytes] = []
    try:
        channel = connection.channel()
        while True:
            method, _props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return bodies
            bodies.append(body)
    finally:
        connection.close()
