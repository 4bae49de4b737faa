"""Name resolution faults: the broker's host name stops resolving, as on a Pi whose WiFi lost DNS.

The pupil runs in its own mount namespace (``unshare -m``) with a private ``/etc/hosts``
bind-mounted over the machine's, so the scenario can make ``broker.test`` resolve or not without
touching the machine's own name resolution. The file is rewritten in place (same inode), which
the bind mount sees at once; glibc reads ``/etc/hosts`` on every lookup.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from distill_swarm.local_broker import LocalBroker
from shared.cli_support import ExitCode
from tests.faults.harness import RUN_TIMEOUT_S, START_TIMEOUT_S, Swarm, wait_until
from tests.faults.lessons import publish_lesson, synthetic_lesson
from tests.faults.process_faults import NODE
from tests.faults.result import FaultResult, tally
from tests.faults.wiretap import WireTap

BROKER_HOST = "broker.test"
# A name under .invalid never resolves anywhere (RFC 6761): the pupil's very first connection.
NOWHERE_HOST = "broker.nowhere.invalid"
DNS_LESSONS = 4
# How long the name stays unresolvable while the pupil's broker connection is gone: several
# reconnect attempts at the fault config's 1 s backoff cap.
DNS_DOWN_S = 6.0
UNREACHABLE = "cannot reach RabbitMQ"


def can_isolate_hosts() -> bool:
    """True if this machine lets us give one process its own /etc/hosts (root, mount namespaces)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount --bind /etc/hosts /etc/hosts"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def _hosts_wrapper(hosts: Path) -> list[str]:
    # `exec "$@"`: the pupil is the wrapper's process itself, so signals reach it directly.
    script = f'mount --bind {hosts} /etc/hosts && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, "pupil-with-private-hosts"]


def _resolve(hosts: Path, on: bool) -> None:
    # Written in place, never replaced by rename: the bind mount follows the inode.
    with hosts.open("r+") as handle:
        handle.truncate(0)
        handle.write("127.0.0.1 localhost\n" + (f"127.0.0.1 {BROKER_HOST}\n" if on else ""))


def _url_via(broker: LocalBroker, host: str) -> str:
    return f"amqp://guest:guest@{host}:{broker.port}/%2F"


def _start_pupil(swarm: Swarm, name: str, url: str, hosts: Path, attempts: int) -> None:
    swarm.node_ids.add(NODE)
    swarm.start(
        name,
        "pupil",
        "run",
        "--node-id",
        NODE,
        "--state-dir",
        str(swarm.state_dir(NODE)),
        env={
            "DISTILL_SWARM__BROKER__URL": url,
            "DISTILL_SWARM__BROKER__CONNECT_ATTEMPTS": str(attempts),
        },
        wrap=_hosts_wrapper(hosts),
    )


def broker_name_unresolvable(broker: LocalBroker, workdir: Path) -> FaultResult:
    """DNS fails at start (a clean exit 3, one ``error:`` line) and while running (the pupil waits).

    1. A pupil whose broker host does not resolve exits with the broker's exit code and one
       ``error:`` line, no traceback.
    2. A running pupil loses its connection (``close_all_connections``) while its broker's name
       stops resolving; lessons are published meanwhile. It must keep trying, not die, and work
       through them once the name resolves again.
    """
    with Swarm(broker, workdir) as swarm:
        hosts = workdir / "hosts"
        hosts.write_text("")
        _resolve(hosts, on=True)

        _start_pupil(swarm, "pupil-no-dns", _url_via(broker, NOWHERE_HOST), hosts, attempts=2)
        start_exit = swarm.wait("pupil-no-dns", START_TIMEOUT_S)
        start_log = swarm.log("pupil-no-dns")

        tap = WireTap(swarm.broker_config).install()
        publisher = swarm.play_master()
        _start_pupil(swarm, NODE, _url_via(broker, BROKER_HOST), hosts, attempts=10)
        swarm.wait_for_log(NODE, r"consuming")
        lessons = [synthetic_lesson(200 + n) for n in range(DNS_LESSONS)]
        publish_lesson(publisher, swarm.topology, lessons[0])
        wait_until(
            lambda: tap.poll().report_pairs({NODE}), RUN_TIMEOUT_S, "the first lesson's report"
        )

        _resolve(hosts, on=False)
        closed = broker.ctl("close_all_connections", "DNS fault scenario")
        assert closed.returncode == 0, closed.stderr
        swarm.wait_for_log(NODE, UNREACHABLE)
        for lesson in lessons[1:]:
            publish_lesson(publisher, swarm.topology, lesson)
        time.sleep(DNS_DOWN_S)
        survived_outage = swarm.running(NODE)
        failed_attempts = swarm.log(NODE).count(UNREACHABLE)

        _resolve(hosts, on=True)
        back = tap.now()
        wait_until(
            lambda: len(set(tap.poll().report_pairs({NODE}))) == DNS_LESSONS,
            RUN_TIMEOUT_S,
            "every lesson reported after DNS came back",
        )
        pupil_log = swarm.log(NODE)
        pupil_exit = swarm.kill(NODE, signal.SIGTERM)
        return tally(
            "broker host name unresolvable",
            tap,
            DNS_LESSONS,
            {NODE},
            tap.recovery_s(back, NODE),
            only={lesson.lesson_id for lesson in lessons},
            state_dirs=[swarm.state_dir(NODE)],
            start_exit=start_exit,
            start_error_lines=re.findall(r"^error: .*$", start_log, re.M),
            start_log=start_log,
            survived_outage=survived_outage,
            failed_attempts=failed_attempts,
            pupil_exit=pupil_exit,
            pupil_log=pupil_log,
            expected_start_exit=int(ExitCode.BROKER),
        )
