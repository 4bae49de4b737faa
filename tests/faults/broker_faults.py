"""Faults of the broker: RabbitMQ stopped and started mid-run; a node slower than its timeout.

Both run on private RabbitMQ nodes (:class:`distill_swarm.local_broker.LocalBroker`), never the
machine's own broker: stopping it, or lowering its ``consumer_timeout``, disturbs nobody else.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

from distill_swarm.local_broker import LocalBroker
from shared.checkpoint import load_checkpoint
from tests.faults.harness import RUN_TIMEOUT_S, START_TIMEOUT_S, Swarm, finished, wait_until
from tests.faults.lessons import publish_lesson, synthetic_lesson
from tests.faults.process_faults import LESSONS, NODE, start_pupil_then_master
from tests.faults.result import FaultResult, tally
from tests.faults.wiretap import Moment, WireTap

BROKER_DOWN_S = 5.0
# The broker closes a channel whose delivery stays unacked this long (RabbitMQ's default is
# 30 min). It checks once per channel tick (60 s by default), so the tick is lowered as well;
# only advanced.config can set it.
CONSUMER_TIMEOUT_MS = 1000
TIMEOUT_CONFIG = f"consumer_timeout = {CONSUMER_TIMEOUT_MS}\n"
TIMEOUT_ADVANCED_CONFIG = "[{rabbit, [{channel_tick_interval, 250}]}].\n"
# Two adapters x this many steps make a train lesson last about 3 s on 2 shared cores: several
# times the timeout, which stands for a Pi taking longer than 30 minutes.
SLOW_STEPS_PER_LESSON = 1500
SLOW_LESSONS = 2
CHANNEL_CLOSED = re.compile(r"closed the consumer channel.*PRECONDITION_FAILED")
# A log record's time and whether it says the consumer lost, or has again, its channel.
LOG_EVENT = re.compile(
    r"^(\S+ \S+) \w+ shared\.broker: (lost the broker connection|consuming)", re.M
)


def broker_restarted(broker: LocalBroker, workdir: Path) -> FaultResult:
    """`rabbitmqctl stop_app`, wait, `start_app`, once the first lesson is out; nothing restarts.

    The master is held (SIGSTOP) from the first lesson until the broker is down, so the restart
    always lands mid-curriculum: rabbitmqctl takes seconds to start (an Erlang VM), and on a
    busy machine the six lessons were once all answered before it stopped anything. The master
    then finds its connection gone with lessons still to publish, and the pupil loses its own
    between lessons or in one. The test checks that reports did arrive after the restart.
    """
    with Swarm(broker, workdir) as swarm:
        tap = WireTap(swarm.broker_config).install()
        start_pupil_then_master(
            swarm, tap, "--exit-when-done", "--timeout-s", str(int(RUN_TIMEOUT_S))
        )
        wait_until(lambda: tap.poll().lesson_ids(), START_TIMEOUT_S, "a first lesson")
        master = swarm.processes["master"]
        master.send_signal(signal.SIGSTOP)
        try:
            stopped = broker.ctl("stop_app")
        finally:
            master.send_signal(signal.SIGCONT)
        assert stopped.returncode == 0, stopped.stderr
        time.sleep(BROKER_DOWN_S)
        back = _start_app(broker, swarm, tap)
        wait_until(lambda: finished(swarm, tap, "master"), RUN_TIMEOUT_S, "the master to finish")
        pupil_survived = swarm.running(NODE)
        pupil_exit = swarm.kill(NODE, signal.SIGTERM)
        tap.poll()
        return tally(
            "broker stop_app / start_app",
            tap,
            LESSONS,
            {NODE},
            tap.recovery_s(back, NODE),
            state_dirs=[swarm.state_dir(NODE)],
            master_exit=swarm.processes["master"].returncode,
            pupil_survived=pupil_survived,
            pupil_exit=pupil_exit,
            master_log=swarm.log("master"),
            pupil_log=swarm.log(NODE),
            stored_reports=len(swarm.query("SELECT 1 FROM reports")),
        )


def _start_app(broker: LocalBroker, swarm: Swarm, tap: WireTap) -> Moment:
    """`rabbitmqctl start_app`; returns the moment the broker accepted connections again.

    Not the moment rabbitmqctl returns: the broker is up, and the services back on it, a while
    before the command-line tool has finished.
    """
    result: list[subprocess.CompletedProcess[str]] = []
    ctl = threading.Thread(target=lambda: result.append(broker.ctl("start_app")))
    ctl.start()
    back_at = wait_until(
        lambda: swarm.accepts_connections() and time.monotonic(), START_TIMEOUT_S, "the broker"
    )
    # Reports published before the stop are still in the tap: read them now, as "before".
    back = Moment(back_at, len(tap.poll().reports))
    ctl.join()
    assert result and result[0].returncode == 0, result
    return back


def slower_than_consumer_timeout(timeout_broker: LocalBroker, workdir: Path) -> FaultResult:
    """Train lessons that take longer than the broker's ``consumer_timeout``.

    ``timeout_broker`` must run with :data:`TIMEOUT_CONFIG` and :data:`TIMEOUT_ADVANCED_CONFIG`.
    The test plays the master (two synthetic train lessons), so no master model is loaded.
    """
    with Swarm(timeout_broker, workdir) as swarm:
        tap = WireTap(swarm.broker_config).install()
        publisher = swarm.play_master()
        steps = {"DISTILL_SWARM__PUPIL__ADAPTER__STEPS_PER_LESSON": str(SLOW_STEPS_PER_LESSON)}
        swarm.pupil(NODE, env=steps)
        swarm.wait_for_log(NODE, r"consuming")
        lessons = [synthetic_lesson(n) for n in range(SLOW_LESSONS)]
        for lesson in lessons:
            publish_lesson(publisher, swarm.topology, lesson)
        swarm.wait_for_log(NODE, CHANNEL_CLOSED.pattern)
        closed = tap.now()
        queue = swarm.topology.pupil_queue(NODE)

        def settled() -> bool:
            reported = len(set(tap.poll().report_pairs({NODE}))) == SLOW_LESSONS
            return reported and swarm.queue_counts(queue) == (0, 0)

        wait_until(settled, RUN_TIMEOUT_S, "every slow lesson to be reported and acked")
        log = swarm.log(NODE)
        pupil_exit = swarm.kill(NODE, signal.SIGTERM)
        return tally(
            f"slower than consumer_timeout ({CONSUMER_TIMEOUT_MS} ms)",
            tap,
            SLOW_LESSONS,
            {NODE},
            tap.recovery_s(closed, NODE),
            state_dirs=[swarm.state_dir(NODE)],
            channel_closures=len(CHANNEL_CLOSED.findall(log)),
            longest_reconnect_s=_longest_reconnect_s(log),
            acked_from_journal=log.count("its report was confirmed, acking"),
            started=len(re.findall(r"\(train\): started", log)),
            adapter_version=load_checkpoint(swarm.state_dir(NODE) / "adapter.safetensors").version,
            pupil_exit=pupil_exit,
        )


def _longest_reconnect_s(log: str) -> float | None:
    """The longest time from losing the consumer's channel to consuming again, from the log."""
    gaps, lost_at = [], None
    for stamp, event in LOG_EVENT.findall(log):
        at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if event == "consuming" and lost_at is not None:
            gaps.append(at - lost_at)
            lost_at = None
        elif event != "consuming":
            lost_at = at
    return round(max(gaps), 3) if gaps else None
