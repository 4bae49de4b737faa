"""The regexes `distill-swarm node add` grants match exactly the names a pupil needs.

RabbitMQ matches permissions with PCRE-style regexes; for these patterns (anchors, alternation,
escaped dots) Python's `re` behaves the same. The over-the-wire proof is
tests/integration/test_access.py.
"""

from __future__ import annotations

import re

import pytest

from master.access import node_url, pupil_permissions
from shared.errors import ConfigError
from shared.topology import Topology

TOPOLOGY = Topology("swarm")
PERMS = pupil_permissions(TOPOLOGY, "pi.7")
ALL_NAMES = {
    "swarm.pupil.pi.7", "swarm.pupil.pi.8", "swarm.pupil.pi.77", "swarm.pupil.piX7",
    "swarm.lessons", "swarm.jobs", "swarm.reports", "swarm.control", "swarm.dead",
    "swarm.master.reports", "swarm.master.control", "other.pupil.pi.7", "swarmXreports",
    "swarm.jobs.summarisation", "swarm.jobs.translation", "swarm.jobs.legal_medical",
    "swarm.jobs.complex_reasoning", "swarm.jobs.summarisationX", "swarm.master.jobs",
    "swarm.master.job-results",
}  # fmt: skip


def allowed(pattern: str) -> set[str]:
    return {name for name in ALL_NAMES if re.search(pattern, name)}


def test_configure_covers_only_the_nodes_own_queue() -> None:
    assert allowed(PERMS.configure) == {"swarm.pupil.pi.7"}


def test_write_covers_its_queue_reports_control_and_dead_letters() -> None:
    expected = {"swarm.pupil.pi.7", "swarm.reports", "swarm.control", "swarm.dead"}
    assert allowed(PERMS.write) == expected


def test_read_covers_its_queue_the_lessons_and_offloadable_job_queues_only() -> None:
    # Critical kinds and the master's own job queues stay out of reach.
    assert allowed(PERMS.read) == {
        "swarm.pupil.pi.7",
        "swarm.lessons",
        "swarm.jobs.summarisation",
        "swarm.jobs.translation",
    }


def test_the_node_url_carries_encoded_credentials_and_the_vhost() -> None:
    url = node_url("amqps://broker.example:5671", "pi-7", "p@ss/w", "swarm")
    assert url == "amqps://pi-7:p%40ss%2Fw@broker.example:5671/swarm"
    assert node_url("amqp://h", "a", "b", "/").endswith("@h/%2F")


@pytest.mark.parametrize("base", ["http://h:5672", "amqp://u:p@h:5672", "amqp://"])
def test_a_broker_url_with_credentials_or_another_scheme_is_refused(base: str) -> None:
    with pytest.raises(ConfigError, match="--broker-url"):
        node_url(base, "pi-7", "pw", "swarm")
