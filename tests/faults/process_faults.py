"""Faults of the processes themselves: a pupil or the master killed, a pupil offline for a while.

Each scenario runs a real master and pupil (``distill-swarm`` processes on the embedded models)
over the six-prompt e2e set, injects its fault, lets the swarm finish, and returns what the wire
tap, the master's store, the pupil's journal and checkpoints say.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

from distill_swarm.local_broker import LocalBroker
from shared.checkpoint import load_checkpoint
from tests.faults.harness import (
    PROMPTS,
    RUN_TIMEOUT_S,
    START_TIMEOUT_S,
    Swarm,
    finished,
    wait_until,
)
from tests.faults.result import FaultResult, tally
from tests.faults.wiretap import WireTap

NODE = "pupil-1"  # one of tests/conftest.py's TEST_NODE_IDS
LESSONS = sum(1 for line in PROMPTS.read_text().splitlines() if line.strip())
# The pupil log line that opens a lesson (pupil_node/node.py), with the lesson id's first 8 chars.
STARTED = re.compile(r"lesson (\w{8}) \(train\): started")
# How many times the kill may come too late (the lesson finished first) before giving up.
KILL_ATTEMPTS = 3
# How long a pupil stays away while lessons pile up, after the master published the last one.
OFFLINE_EXTRA_S = 2.0


def start_pupil_then_master(swarm: Swarm, tap: WireTap, *master_args: str) -> None:
    """Start the pupil, then a master that waits for it."""
    swarm.pupil(NODE)
    swarm.wait_for_log(NODE, r"consuming")
    swarm.master("master", "--expect-nodes", "1", *master_args)
    tap.poll()


def _exit_when_done() -> tuple[str, ...]:
    return ("--exit-when-done", "--timeout-s", str(int(RUN_TIMEOUT_S)))


def _journalled(swarm: Swarm, prefix: str) -> bool:
    path = swarm.state_dir(NODE) / "journal.sqlite3"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT COUNT(*) FROM done WHERE lesson_id LIKE ?", (prefix + "%",))
        return bool(row.fetchone()[0])
    finally:
        db.close()


def _kill_at_start_of_train_lesson(swarm: Swarm, name: str, nth: int) -> str:
    """SIGKILL process ``name`` the moment its log says its ``nth`` train lesson started.

    Returns that lesson's id prefix. Polls the log every 5 ms: a train lesson takes a generation,
    an embedding, two trainings and two fsynced checkpoints (about a second here), so the kill
    lands inside it; the caller checks the journal to be sure.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        started = STARTED.findall(swarm.log(name))
        if len(started) >= nth:
            swarm.kill(name)
            return str(started[nth - 1])
        assert swarm.running(name), f"{name} exited early:\n{swarm.tail(name)}"
        assert time.monotonic() < deadline, f"no train lesson {nth} in {name}'s log"
        time.sleep(0.005)


def pupil_killed_mid_lesson(broker: LocalBroker, workdir: Path) -> FaultResult:
    """SIGKILL a pupil in the middle of a train lesson, restart it, let the run finish.

    The kill is timed from the pupil's own log ("lesson X (train): started") rather than by a
    test hook in the pupil: production code stays free of fault switches. If the lesson outran
    the kill (it is in the journal), the restarted pupil is killed again at its next train lesson.
    """
    with Swarm(broker, workdir) as swarm:
        tap = WireTap(swarm.broker_config).install()
        start_pupil_then_master(swarm, tap, *_exit_when_done())
        name, nth, killed, attempts = NODE, 2, "", 0  # the 2nd train lesson: a checkpoint exists
        while not killed:
            attempts += 1
            prefix = _kill_at_start_of_train_lesson(swarm, name, nth)
            name, nth = f"{NODE}-restart{attempts}", 1
            if not _journalled(swarm, prefix):
                killed = prefix  # cut short: the kill landed inside the lesson
            assert attempts < KILL_ATTEMPTS or killed, "every kill came after the lesson ended"
            checkpoint_at_kill = _version(swarm.state_dir(NODE) / "adapter.safetensors")
            restarted = tap.now()
            swarm.pupil(NODE, name=name)
        wait_until(lambda: finished(swarm, tap, "master"), RUN_TIMEOUT_S, "the master to finish")
        pupil_exit = swarm.kill(name, signal.SIGTERM)
        tap.poll()
        logs = "".join(swarm.log(n) for n in swarm.processes)
        counts = {
            pair: n
            for pair, n in _delivery_counts(swarm).items()
            if pair[1] == NODE  # the store's count of report deliveries per (lesson, node)
        }
        train = [
            str(r[0]) for r in swarm.query("SELECT lesson_id FROM lessons WHERE split='train'")
        ]
        adapter = load_checkpoint(swarm.state_dir(NODE) / "adapter.safetensors")
        prompt_adapter = load_checkpoint(swarm.state_dir(NODE) / "prompt_adapter.safetensors")
        return tally(
            "pupil SIGKILLed mid-lesson",
            tap,
            LESSONS,
            {NODE},
            tap.recovery_s(restarted, NODE),
            state_dirs=[swarm.state_dir(NODE)],
            killed_lesson=killed,
            kill_attempts=attempts,
            started_count=len(re.findall(rf"lesson {killed} \(train\): started", logs)),
            checkpoint_version_at_kill=checkpoint_at_kill,
            delivery_counts=counts,
            train_lessons=sorted(train),
            adapter_version=adapter.version,
            adapter_lessons=sorted(set(adapter.replay.export()[2])),
            prompt_adapter_version=prompt_adapter.version,
            master_exit=swarm.processes["master"].returncode,
            pupil_exit=pupil_exit,
        )


def master_killed_mid_run(broker: LocalBroker, workdir: Path) -> FaultResult:
    """SIGKILL the master once it has published two lessons; restart it on the same store."""
    with Swarm(broker, workdir) as swarm:
        tap = WireTap(swarm.broker_config).install()
        start_pupil_then_master(swarm, tap, *_exit_when_done())
        wait_until(lambda: len(swarm.published()) >= 2, START_TIMEOUT_S, "two published lessons")
        swarm.kill("master")
        published_at_kill = swarm.published()
        unpublished_at_kill = swarm.saved_unpublished()
        reports_at_kill = len(swarm.query("SELECT 1 FROM reports"))
        restarted_wall = datetime.now(UTC).isoformat()
        restarted_at = time.monotonic()  # the store, not the tap, shows the master's recovery
        swarm.master("master-2", "--expect-nodes", "1", *_exit_when_done())
        first_ingest: list[float] = []

        def done() -> bool:
            if not first_ingest and swarm.query(
                "SELECT 1 FROM reports WHERE received_at >= ? LIMIT 1", restarted_wall
            ):
                first_ingest.append(time.monotonic())
            return finished(swarm, tap, "master-2")

        wait_until(done, RUN_TIMEOUT_S, "the restarted master to finish")
        pupil_exit = swarm.kill(NODE, signal.SIGTERM)
        tap.poll()
        return tally(
            "master SIGKILLed mid-run",
            tap,
            LESSONS,
            {NODE},
            round(first_ingest[0] - restarted_at, 1) if first_ingest else None,
            state_dirs=[swarm.state_dir(NODE)],
            published_at_kill=published_at_kill,
            unpublished_at_kill=unpublished_at_kill,
            reports_at_kill=reports_at_kill,
            stored_reports=len(swarm.query("SELECT 1 FROM reports")),
            delivery_counts=_delivery_counts(swarm),
            published_after=swarm.published(),
            master_exit=swarm.processes["master-2"].returncode,
            pupil_exit=pupil_exit,
        )


def pupil_offline_backlog(broker: LocalBroker, workdir: Path) -> FaultResult:
    """Stop a pupil after its first report; the master publishes the rest; the pupil comes back."""
    with Swarm(broker, workdir) as swarm:
        tap = WireTap(swarm.broker_config).install()
        start_pupil_then_master(
            swarm, tap
        )  # the master serves until stopped: the pupil is away for a while
        wait_until(lambda: tap.poll().report_pairs({NODE}), START_TIMEOUT_S, "a first report")
        stop_exit = swarm.kill(NODE, signal.SIGTERM)
        wait_until(lambda: len(swarm.published()) == LESSONS, RUN_TIMEOUT_S, "every lesson")
        time.sleep(OFFLINE_EXTRA_S)
        backlog = swarm.queue_depth(swarm.topology.pupil_queue(NODE))
        returned = tap.now()
        swarm.pupil(NODE, name=f"{NODE}-back")
        wait_until(
            lambda: len(set(tap.poll().report_pairs({NODE}))) == LESSONS,
            RUN_TIMEOUT_S,
            "the backlog to be worked through",
        )
        pupil_exit = swarm.kill(f"{NODE}-back", signal.SIGTERM)
        master_exit = swarm.kill("master", signal.SIGTERM)
        tap.poll()
        return tally(
            "pupil offline, backlog",
            tap,
            LESSONS,
            {NODE},
            tap.recovery_s(returned, NODE),
            state_dirs=[swarm.state_dir(NODE)],
            backlog=backlog,
            publish_order=_first_seen(tap.lesson_ids()),
            report_order=_first_seen([lesson for lesson, _ in tap.report_pairs({NODE})]),
            stop_exit=stop_exit,
            pupil_exit=pupil_exit,
            master_exit=master_exit,
        )


def _delivery_counts(swarm: Swarm) -> dict[tuple[str, str], int]:
    rows = swarm.query("SELECT lesson_id, node_id, deliveries FROM reports")
    return {(str(lesson), str(node)): int(str(n)) for lesson, node, n in rows}


def _first_seen(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def _version(path: Path) -> int | None:
    return load_checkpoint(path).version if path.exists() else None
