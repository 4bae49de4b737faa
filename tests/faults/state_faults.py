"""Faults of a pupil's state directory: two nodes started from one directory, and a long run.

- ``two_pupils_one_directory``: nodes ``a`` and ``b`` started from one working directory with the
  default ``--state-dir``, a second process for ``b`` on top, a real master teaching both. Each
  node must get its own state (and learn and report every lesson), the second ``b`` must refuse
  to start, and a node started on another node's directory must refuse too.
- ``long_run_bounded_state``: one pupil learns more lessons than its (lowered) retention bounds;
  its journal and memory must stay within them while it still dedupes a redelivered lesson and
  counts every lesson it did.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
from collections import Counter
from pathlib import Path

from distill_swarm.local_broker import LocalBroker
from shared.checkpoint import load_checkpoint
from shared.messages import encode
from tests.faults.harness import RUN_TIMEOUT_S, START_TIMEOUT_S, Swarm, wait_until
from tests.faults.lessons import publish_lesson, synthetic_lesson
from tests.faults.process_faults import LESSONS
from tests.faults.result import FaultResult, tally
from tests.faults.wiretap import WireTap

NODES = ("a", "b")  # from tests/conftest.py's TEST_NODE_IDS, so teardown deletes their queues
TRAINED = re.compile(r"lesson (\w{8}) \(train\): before=")
ALREADY_DONE = "already done"
# The long run: lessons learned, and the retention bounds it runs under (env overrides).
LONG_RUN_LESSONS = 24
LONG_RUN_RETENTION = {
    "journal_max_lessons": 10,
    "memory_max_lessons": 8,
    "retrieval_max_lessons": 4,
}


def _run_pupil(
    swarm: Swarm, name: str, node_id: str, *extra: str, env: dict[str, str], cwd: Path
) -> str:
    # Swarm.pupil always names a state dir; these scenarios need the default one.
    swarm.node_ids.add(node_id)
    swarm.start(name, "pupil", "run", "--node-id", node_id, *extra, env=env, cwd=cwd)
    return name


def _trained_twice(swarm: Swarm, state_of: dict[str, Path]) -> int:
    """Trainings beyond the first of one train lesson into one state directory.

    ``state_of`` maps a process name to the state directory it used; two processes sharing a
    directory that both train a lesson count as training it twice (one adapter file, two
    trainings written into it).
    """
    per_dir: Counter[tuple[str, str]] = Counter()
    for name, state in state_of.items():
        for prefix in TRAINED.findall(swarm.log(name)):
            per_dir[(str(state.resolve()), prefix)] += 1
    return sum(n - 1 for n in per_dir.values())


def two_pupils_one_directory(broker: LocalBroker, workdir: Path) -> FaultResult:
    """Start pupils a and b from one directory, default state dirs; a second b; a wrong owner."""
    with Swarm(broker, workdir) as swarm:
        cwd, home = workdir / "cwd", workdir / "home"
        cwd.mkdir(parents=True)
        # The default state dir lives under $HOME/.local/state when XDG_STATE_HOME is empty.
        env = {"HOME": str(home), "XDG_STATE_HOME": ""}
        tap = WireTap(swarm.broker_config).install()
        for node in NODES:
            _run_pupil(swarm, node, node, env=env, cwd=cwd)
        for node in NODES:
            swarm.wait_for_log(node, r"consuming")
        # A second process for b, as a user who forgot the first one would start it.
        _run_pupil(swarm, "b-again", "b", env=env, cwd=cwd)
        second_exit = _exit_or_none(swarm, "b-again")
        # No --exit-when-done: a node that skips lessons would keep such a master waiting. The
        # run is over when every lesson is published and both nodes' queues are empty, nothing
        # unacked: a report is published (and confirmed) before its lesson is acked.
        swarm.master("master", "--expect-nodes", "2")
        wait_until(lambda: len(swarm.published()) == LESSONS, RUN_TIMEOUT_S, "every lesson")
        wait_until(
            lambda: all(swarm.queue_counts(swarm.topology.pupil_queue(n)) == (0, 0) for n in NODES),
            RUN_TIMEOUT_S,
            "both nodes to work through their lessons",
        )
        exits = {node: swarm.kill(node, signal.SIGTERM) for node in NODES}
        if swarm.running("b-again"):  # before the fix it started, and shared b's queue
            swarm.kill("b-again", signal.SIGTERM)
        master_exit = swarm.kill("master", signal.SIGTERM)
        tap.poll()

        expected_dirs = {
            n: home / ".local" / "state" / "distill-swarm" / "pupil" / n for n in NODES
        }
        old_default = cwd / "distill-swarm-pupil"
        # Where each process really kept its state: its own dir if it made one, else the old
        # shared default.
        state_of = {
            name: expected_dirs[node] if expected_dirs[node].is_dir() else old_default
            for name, node in (("a", "a"), ("b", "b"), ("b-again", "b"))
        }
        # b's directory is free now: node a must not be able to take it.
        _run_pupil(swarm, "a-on-b", "a", "--state-dir", str(state_of["b"]), env=env, cwd=cwd)
        wrong_owner_exit = _exit_or_none(swarm, "a-on-b")
        if wrong_owner_exit is None:
            swarm.kill("a-on-b", signal.SIGTERM)
        train = {
            str(r[0]) for r in swarm.query("SELECT lesson_id FROM lessons WHERE split='train'")
        }
        adapters = {}
        for node in NODES:
            path = state_of[node] / "adapter.safetensors"
            if path.exists():
                checkpoint = load_checkpoint(path)
                adapters[node] = (checkpoint.version, sorted(set(checkpoint.replay.export()[2])))
        result = tally(
            "two pupils, one directory",
            tap,
            LESSONS,
            set(NODES),
            None,
            trained_twice=_trained_twice(swarm, state_of),
            state_dir_of={proc: str(where) for proc, where in state_of.items()},
            per_node_dirs=all(d.is_dir() for d in expected_dirs.values()),
            old_default_used=old_default.exists(),
            owners={n: _owner(expected_dirs[n]) for n in NODES},
            already_done={n: swarm.log(n).count(ALREADY_DONE) for n in NODES},
            second_exit=second_exit,
            second_log=swarm.log("b-again"),
            wrong_owner_exit=wrong_owner_exit,
            wrong_owner_log=swarm.log("a-on-b"),
            train_lessons=sorted(train),
            adapters=adapters,
            pupil_exits=exits,
            master_exit=master_exit,
        )
        result.trained_twice = result.evidence["trained_twice"]
        return result


def long_run_bounded_state(broker: LocalBroker, workdir: Path) -> FaultResult:
    """One pupil learns more lessons than its retention bounds; then one lesson comes again."""
    with Swarm(broker, workdir) as swarm:
        node = "pupil-1"
        env = {
            f"DISTILL_SWARM__PUPIL__RETENTION__{key.upper()}": str(value)
            for key, value in LONG_RUN_RETENTION.items()
        }
        tap = WireTap(swarm.broker_config).install()
        publisher = swarm.play_master()
        swarm.pupil(node, env=env)
        swarm.wait_for_log(node, r"consuming")
        lessons = [synthetic_lesson(300 + n) for n in range(LONG_RUN_LESSONS)]
        for lesson in lessons:
            publish_lesson(publisher, swarm.topology, lesson)
        wait_until(
            lambda: len(set(tap.poll().report_pairs({node}))) == LONG_RUN_LESSONS,
            RUN_TIMEOUT_S,
            "every report",
        )
        # The newest lesson again, straight into the node's queue (the default exchange), as the
        # broker redelivers it after a lost ack: not a second publish on the lessons fanout.
        publisher.publish(
            "", swarm.topology.pupil_queue(node), encode(lessons[-1]), lessons[-1].lesson_id
        )
        swarm.wait_for_log(
            node, rf"lesson {lessons[-1].lesson_id[:8]} already done", START_TIMEOUT_S
        )
        pupil_exit = swarm.kill(node, signal.SIGTERM)
        tap.poll()
        state = swarm.state_dir(node)
        journal = _rows(
            state / "journal.sqlite3",
            "SELECT COUNT(*), COALESCE(SUM(length(report)), 0), "
            "COALESCE(SUM(reported_at IS NULL), 0) FROM done",
        )[0]
        pruned = _rows(state / "journal.sqlite3", "SELECT value FROM meta WHERE key='pruned'")
        memory_rows = _rows(state / "memory.sqlite3", "SELECT COUNT(*) FROM lessons")[0][0]
        memory_vectors = _rows(state / "memory.sqlite3", "SELECT COUNT(*) FROM vectors")[0][0]
        adapter = load_checkpoint(state / "adapter.safetensors")
        result = tally(
            f"long run past retention ({LONG_RUN_LESSONS} lessons)",
            tap,
            LONG_RUN_LESSONS,
            {node},
            None,
            trained_twice=_trained_twice(swarm, {node: state}),
            journal_rows=int(journal[0]),
            journal_report_bytes=int(journal[1]),
            journal_unconfirmed=int(journal[2]),
            journal_lessons_done=int(journal[0]) + (int(pruned[0][0]) if pruned else 0),
            memory_rows=memory_rows,
            memory_vectors=memory_vectors,
            adapter_version=adapter.version,
            file_bytes={p.name: p.stat().st_size for p in sorted(state.glob("*.sqlite3"))},
            pupil_exit=pupil_exit,
        )
        result.trained_twice = result.evidence["trained_twice"]
        return result


def _exit_or_none(swarm: Swarm, name: str) -> int | None:
    """The exit code once ``name`` exits, or None if it is still serving after it started up."""

    def settled() -> bool:
        return not swarm.running(name) or "consuming" in swarm.log(name)

    wait_until(settled, START_TIMEOUT_S, f"{name} to exit or start consuming")
    return swarm.processes[name].poll()


def _owner(state: Path) -> str | None:
    path = state / "node.json"
    if not path.exists():
        return None
    return str(json.loads(path.read_text()).get("node_id"))


def _rows(path: Path, sql: str) -> list[tuple[int, ...]]:
    """Rows of ``sql`` (counts and sums) on a node's SQLite file, opened read-only."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return [(0, 0, 0)]  # a table this version does not have (before the fix: no meta)
    finally:
        db.close()
