"""Every fault scenario, in the order the test suite and ``bench/faults.py`` run them.

A scenario is a driver ``run(broker, workdir) -> FaultResult`` and the kind of private broker it
needs: ``plain`` (defaults; one node can serve every such scenario in turn), ``timeout`` (a
lowered ``consumer_timeout``) or ``management`` (the management plugin, for `node add`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from distill_swarm.local_broker import LocalBroker
from tests.faults.broker_faults import (
    TIMEOUT_ADVANCED_CONFIG,
    TIMEOUT_CONFIG,
    broker_restarted,
    slower_than_consumer_timeout,
)
from tests.faults.disk_faults import state_disk_full
from tests.faults.dns_faults import broker_name_unresolvable
from tests.faults.identity_faults import duplicate_node_id, forged_reports, late_joiner
from tests.faults.input_faults import bad_input, corrupt_checkpoint
from tests.faults.model_faults import model_server_outage
from tests.faults.process_faults import (
    master_killed_mid_run,
    pupil_killed_mid_lesson,
    pupil_offline_backlog,
)
from tests.faults.result import FaultResult
from tests.faults.state_faults import long_run_bounded_state, two_pupils_one_directory

BrokerKind = Literal["plain", "timeout", "management"]


@dataclass(frozen=True)
class Scenario:
    """One fault scenario: its driver and the broker it runs on."""

    key: str
    run: Callable[[LocalBroker, Path], FaultResult]
    broker: BrokerKind = "plain"


SCENARIOS = (
    Scenario("pupil-kill", pupil_killed_mid_lesson),
    Scenario("broker-restart", broker_restarted),
    Scenario("master-kill", master_killed_mid_run),
    Scenario("pupil-offline", pupil_offline_backlog),
    Scenario("consumer-timeout", slower_than_consumer_timeout, "timeout"),
    Scenario("bad-input", bad_input),
    Scenario("corrupt-checkpoint", corrupt_checkpoint),
    Scenario("disk-full", state_disk_full),
    Scenario("duplicate-node-id", duplicate_node_id),
    Scenario("late-joiner", late_joiner),
    Scenario("forged-reports", forged_reports, "management"),
    Scenario("model-down", model_server_outage),
    Scenario("dns-lost", broker_name_unresolvable),
    Scenario("shared-state-dir", two_pupils_one_directory),
    Scenario("long-run-retention", long_run_bounded_state),
)


def start_broker(kind: BrokerKind) -> LocalBroker:
    """A private RabbitMQ node of the given kind, not started yet (use it as a context manager)."""
    if kind == "timeout":
        return LocalBroker(TIMEOUT_CONFIG, advanced_config=TIMEOUT_ADVANCED_CONFIG)
    if kind == "management":
        return LocalBroker(management=True)
    return LocalBroker()


@contextmanager
def private_brokers(kinds: set[BrokerKind]) -> Iterator[dict[BrokerKind, LocalBroker]]:
    """One running private broker per kind, stopped and deleted afterwards."""
    with ExitStack() as stack:
        yield {kind: stack.enter_context(start_broker(kind)) for kind in sorted(kinds)}
