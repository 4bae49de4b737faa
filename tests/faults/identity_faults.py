"""Faults of identity and membership (issue 11): who a node is, and who could get which lesson.

- two processes with one node id (a cloned SD card): the broker refuses the second one the
  node's lesson queue, it exits with code 6, and the master says `duplicate`;
- a pupil that joins after the lessons went out: it never gets them, `status` says which it
  missed, and a restarted master with ``--exit-when-done`` does not wait for it;
- reports that lie (another node's name, a lesson that does not exist, the wrong split), sent
  with a real node's own broker user and with the master's: dead-lettered with a reason, while
  the real pupil's reports, and an honest error report, are stored.

Each runs real `distill-swarm` processes on a private broker, like the other fault scenarios.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from distill_swarm.local_broker import LocalBroker, free_port
from pupil_node.node import CHECKPOINT_NAME
from shared.broker import Publisher
from shared.checkpoint import load_checkpoint
from shared.messages import Lesson, Report, Split, encode
from tests.faults.harness import PROMPTS, ROOT, RUN_TIMEOUT_S, START_TIMEOUT_S, Swarm, wait_until
from tests.faults.input_faults import _dead_letters
from tests.faults.process_faults import LESSONS, NODE
from tests.faults.result import FaultResult, tally
from tests.faults.wiretap import WireTap

CLONE = "clone"  # process name of the second process with NODE's id
# The clone gives up this soon (production: pupil.queue_in_use_wait_s, 150 s): its own
# predecessor cannot be in the way here, and the scenario should not wait minutes.
CLONE_WAIT_S = 3
LATE = "pupil-2"  # the late joiner (one of tests/conftest.py's TEST_NODE_IDS)
# The lesson consumer's "consuming" line (the job consumer logs one too, for its job queues).
LESSONS_CONSUMING = r"consuming \S+\.pupil\."
DUPLICATES = "distill_swarm_node_duplicate_messages_total"
WINDOW_SETTING = "DISTILL_SWARM__MASTER__DUPLICATE_WINDOW_S"
EXIT_NODE_ID_IN_USE = 6  # shared.cli_support.ExitCode.NODE_ID_IN_USE
# The scenario is about the curriculum: the exam a master holds at the end of a run (which goes
# to every node present, late joiners included) would add reports of the same lessons on the wire.
NO_EXAM = {"DISTILL_SWARM__MASTER__EXAM": "false"}
# The vhost of a private broker, where `node add` creates the scenario's per-node users.
VHOST = "/"


def status_json(swarm: Swarm, env: dict[str, str] | None = None) -> dict[str, dict[str, object]]:
    """`distill-swarm status --json` on the scenario's store, by node id."""
    result = subprocess.run(
        [sys.executable, "-m", "distill_swarm", "status", "--json", "--store",
         str(swarm.store_path), "--config", str(swarm.config)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {row["node_id"]: row for row in json.loads(result.stdout)}


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample on a live /metrics page (0 if absent)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def extra_trainings(state_dirs: list[Path]) -> int:
    """Trainings beyond one per lesson, over the answer adapters in ``state_dirs``.

    A checkpoint's version counts every training and its replay buffer names the lesson of each
    (the scenarios train far fewer lessons than the buffer holds).
    """
    extra = 0
    for state_dir in state_dirs:
        path = state_dir / CHECKPOINT_NAME
        if path.exists():
            adapter = load_checkpoint(path)
            extra += adapter.version - len(set(adapter.replay.export()[2]))
    return extra


def _master(swarm: Swarm, name: str, *extra: str, env: dict[str, str] | None = None) -> None:
    args = ("master", "run", "--prompts", str(PROMPTS), "--store", str(swarm.store_path))
    swarm.start(name, *args, *extra, env=env)


def duplicate_node_id(broker: LocalBroker, workdir: Path) -> FaultResult:
    """A second process starts with a running pupil's node id, before any lesson is out.

    It stands for a second Pi from a cloned SD card: its own state directory, the same id. The
    master's queues exist already (the test declares them), so both processes' hellos and
    heartbeats wait for the master in the order they were sent.
    """
    with Swarm(broker, workdir) as swarm:
        tap = WireTap(swarm.broker_config).install()
        swarm.play_master()
        swarm.pupil(NODE)
        swarm.wait_for_log(NODE, LESSONS_CONSUMING)
        clone_dir = workdir / "clone-state"
        swarm.start(
            CLONE, "pupil", "run", "--node-id", NODE, "--state-dir", str(clone_dir),
            env={"DISTILL_SWARM__PUPIL__QUEUE_IN_USE_WAIT_S": str(CLONE_WAIT_S)},
        )  # fmt: skip
        # Refused (and retrying), or, without the exclusive consumer, consuming NODE's queue.
        swarm.wait_for_log(CLONE, rf"in use by another consumer|{LESSONS_CONSUMING}")
        port = free_port()
        _master(swarm, "master", "--expect-nodes", "1",
                env={"DISTILL_SWARM__MASTER__METRICS_PORT": str(port)})  # fmt: skip
        wait_until(
            lambda: len(set(tap.poll().report_pairs({NODE}))) == LESSONS,
            RUN_TIMEOUT_S,
            "every lesson reported",
        )
        duplicates = metric(f"http://127.0.0.1:{port}/metrics", DUPLICATES, node=NODE)
        # A window of an hour: whether `status` says so, not when it stops saying so (the clone
        # spoke last when the master started, a slow run's reports later).
        status = status_json(swarm, {WINDOW_SETTING: "3600"})[NODE]
        clone_exit = swarm.processes[CLONE].poll()
        if clone_exit is None:
            swarm.kill(CLONE)  # still running: it was never refused
        master_exit = swarm.kill("master", signal.SIGTERM)
        pupil_exit = swarm.kill(NODE, signal.SIGTERM)
        tap.poll()
        clone_log = swarm.log(CLONE)
        result = tally(
            "two pupils, one node id",
            tap,
            LESSONS,
            {NODE},
            None,
            clone_exit=clone_exit,
            clone_error=[line for line in clone_log.splitlines() if line.startswith("error:")],
            clone_started=len(re.findall(r"lesson \w{8} \(\w+\): started", clone_log)),
            pupil_started=len(re.findall(r"lesson \w{8} \(\w+\): started", swarm.log(NODE))),
            duplicate_messages=duplicates,
            master_warned="duplicate node id 'pupil-1'" in swarm.log("master"),
            status_state=status["state"],
            master_exit=master_exit,
            pupil_exit=pupil_exit,
        )
        # Both machines' adapters: a lesson learned by each counts as trained twice.
        result.trained_twice = extra_trainings([swarm.state_dir(NODE), clone_dir]) + len(
            _common_lessons(swarm.state_dir(NODE), clone_dir)
        )
        return result


def late_joiner(broker: LocalBroker, workdir: Path) -> FaultResult:
    """A run completes with one pupil; a second pupil joins; the master is restarted.

    The restarted master (``--exit-when-done``) finds every lesson published already, and must
    not wait for the newcomer, which never got them: its queue did not exist when they went out.
    """
    with Swarm(broker, workdir) as swarm:
        tap = WireTap(swarm.broker_config).install()
        swarm.pupil(NODE)
        swarm.wait_for_log(NODE, LESSONS_CONSUMING)
        done = ("--exit-when-done", "--timeout-s", str(int(RUN_TIMEOUT_S)))
        _master(swarm, "master", "--expect-nodes", "1", *done, env=NO_EXAM)
        first_exit = swarm.wait("master")
        swarm.pupil(LATE)
        swarm.wait_for_log(LATE, LESSONS_CONSUMING)
        # Without the fix it waits for LATE's reports until this timeout, then fails.
        _master(swarm, "master-2", "--expect-nodes", "2", "--exit-when-done",
                "--timeout-s", str(int(START_TIMEOUT_S)), env=NO_EXAM)  # fmt: skip
        second_exit = swarm.wait("master-2", RUN_TIMEOUT_S + START_TIMEOUT_S)
        status = status_json(swarm)
        late_backlog = swarm.queue_depth(swarm.topology.pupil_queue(LATE))
        pupil_exit = swarm.kill(NODE, signal.SIGTERM)
        late_exit = swarm.kill(LATE, signal.SIGTERM)
        tap.poll()
        result = tally(
            "late joiner, master restarted",
            tap,
            LESSONS,
            {NODE},
            None,
            published=swarm.published(),
            first_master_exit=first_exit,
            second_master_exit=second_exit,
            second_master_log=swarm.log("master-2"),
            missed={node: row["missed"] for node, row in status.items()},
            late_reports=len(tap.report_pairs({LATE})),
            late_backlog=late_backlog,
            pupil_exit=pupil_exit,
            late_exit=late_exit,
        )
        result.trained_twice = extra_trainings([swarm.state_dir(NODE), swarm.state_dir(LATE)])
        return result


def _common_lessons(first: Path, second: Path) -> set[str]:
    """Lessons in both answer adapters (each machine trained on them)."""
    held = []
    for state_dir in (first, second):
        path = state_dir / CHECKPOINT_NAME
        held.append(set(load_checkpoint(path).replay.export()[2]) if path.exists() else set())
    return held[0] & held[1]


def node_add(broker: LocalBroker, swarm: Swarm, name: str) -> str:
    """`distill-swarm node add NAME` for the scenario's namespace; returns the node's AMQP URL."""
    assert broker.management_url is not None
    result = subprocess.run(
        [sys.executable, "-m", "distill_swarm", "node", "add", name, "--vhost", VHOST,
         "--namespace", swarm.topology.namespace, "--admin-url", broker.management_url,
         "--admin-user", "guest", "--admin-password", "guest",
         "--broker-url", f"amqp://127.0.0.1:{broker.port}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (url,) = [line for line in result.stdout.splitlines() if line.startswith("AMQP_URL=")]
    return url.removeprefix("AMQP_URL=")


def forged_reports(broker: LocalBroker, workdir: Path) -> FaultResult:
    """A real pupil learns as its own broker user; another node's user, and the master's, then
    send reports that lie. The master runs with its default settings (no identity setting).

    Needs a broker with the management plugin (``node add`` uses its HTTP API). The fault
    table's figures are the real pupil's, counted before the forgeries go out (a forged report
    naming the pupil would otherwise count as a duplicate of its report on the wire).
    """
    with Swarm(broker, workdir) as swarm:
        tap = WireTap(swarm.broker_config).install()
        swarm.play_master()  # the exchanges and the master's queues, as the master declares them
        try:
            pupil_url = node_add(broker, swarm, NODE)
            forger_url = node_add(broker, swarm, LATE)
            own_user = {
                "DISTILL_SWARM__BROKER__URL": pupil_url,
                "DISTILL_SWARM__BROKER__DECLARE_EXCHANGES": "false",
                "DISTILL_SWARM__PUPIL__JOBS": "",  # lessons only: jobs are not this scenario's
            }
            swarm.pupil(NODE, env=own_user)
            swarm.wait_for_log(NODE, LESSONS_CONSUMING)
            _master(swarm, "master", "--expect-nodes", "1")
            wait_until(
                lambda: len(set(tap.poll().report_pairs({NODE}))) == LESSONS,
                RUN_TIMEOUT_S,
                "every lesson reported",
            )
            result = tally("forged reports (per-node users)", tap, LESSONS, {NODE}, None)
            result.trained_twice = extra_trainings([swarm.state_dir(NODE)])
            forged, honest = _send_forgeries(swarm, forger_url)

            def settled() -> bool:
                rows = swarm.query("SELECT COUNT(*) FROM reports WHERE node_id = ?", LATE)
                stored = int(str(rows[0][0])) if rows else 0
                return swarm.queue_depth(swarm.topology.dead_queue) >= len(forged) and (
                    stored >= len(honest)
                )

            wait_until(settled, RUN_TIMEOUT_S, "the forged reports dead-lettered")
            dead = _dead_letters(swarm, swarm.topology.dead_queue)
            stored = swarm.query("SELECT lesson_id, node_id, split, error FROM reports")
            result.evidence.update(
                forged=forged,
                honest=honest,
                dead={message_id: reason for message_id, (reason, _) in dead.items()},
                stored=[tuple(None if v is None else str(v) for v in row) for row in stored],
                published=swarm.published(),
                master_exit=swarm.kill("master", signal.SIGTERM),
                pupil_exit=swarm.kill(NODE, signal.SIGTERM),
            )
            return result
        finally:
            for name in (NODE, LATE):
                broker.ctl("delete_user", name)  # the next run on this broker adds them again


def _send_forgeries(swarm: Swarm, forger_url: str) -> tuple[dict[str, str], dict[str, str]]:
    """Publish the lying reports and one honest error report; returns (forged, honest), each
    message id -> the lesson id it names."""

    def by_split() -> dict[str, Lesson]:
        # A read of the store can fail while the master writes it (Swarm.query then says []).
        found: dict[str, Lesson] = {}
        for (body,) in swarm.query("SELECT body FROM lessons WHERE published_at IS NOT NULL"):
            lesson = Lesson.model_validate_json(str(body))
            found.setdefault(lesson.split, lesson)
        return found if len(found) == 2 else {}

    lessons = wait_until(by_split, START_TIMEOUT_S, "a train and an eval lesson in the store")
    train, held_out = lessons["train"], lessons["eval"]

    def perfect(node: str, lesson_id: str, split: Split, **fields: Any) -> Report:
        return Report(
            lesson_id=lesson_id, node_id=node, split=split, pupil_model="forged",
            pupil_answer=held_out.master_answer, similarity_before=1.0, similarity_adapted=1.0,
            similarity_guided=1.0, **fields,
        )  # fmt: skip

    as_node = {
        # pupil-2's own broker user, speaking for pupil-1 on a real eval lesson
        "forged-other-node": perfect(NODE, held_out.lesson_id, "eval"),
        # its own name, a lesson nobody published
        "forged-unknown-lesson": perfect(LATE, "no-such-lesson", "eval"),
        # its own name, a real eval lesson claimed as trained on
        "forged-split": perfect(LATE, held_out.lesson_id, "train", trained=True, losses=[0.0]),
        # honest: a refusal of a real lesson, as a node in another embedding space sends it
        "honest-error": Report(
            lesson_id=train.lesson_id,
            node_id=LATE,
            split="train",
            pupil_model="other",
            error="lesson is embedded with another model",
        ),
    }
    as_master = {
        # The master's own user (the one local development shares): what it claims about who
        # sent it is not checked, but the lesson and the split still are.
        "forged-dev-unknown-lesson": perfect(NODE, "no-such-lesson-either", "train"),
        "forged-dev-split": perfect(NODE, train.lesson_id, "eval"),
    }
    node_config = swarm.broker_config.model_copy(
        update={"url": forger_url, "declare_exchanges": False}
    )
    for config, batch in ((node_config, as_node), (swarm.broker_config, as_master)):
        publisher = Publisher(config)
        try:
            for message_id, report in batch.items():
                publisher.publish(
                    swarm.topology.reports_exchange,
                    swarm.topology.REPORT_KEY,
                    encode(report),
                    message_id,
                )
        finally:
            publisher.close()
    everything = {**as_node, **as_master}
    forged = {k: r.lesson_id for k, r in everything.items() if k.startswith("forged")}
    honest = {k: r.lesson_id for k, r in everything.items() if k.startswith("honest")}
    return forged, honest
