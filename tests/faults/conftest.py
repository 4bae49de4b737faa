"""Private RabbitMQ nodes for the fault tests: one plain, one with a lowered consumer_timeout,
one with the management plugin (per-node users made by `distill-swarm node add`).

Session-scoped, so the scenarios share one start-up per kind, and a kind no selected test uses
never starts. Without rabbitmq-server the tests skip, or fail under CI=true.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from distill_swarm.local_broker import LocalBroker
from tests.faults.scenarios import start_broker
from tests.support.private_broker import require_rabbitmq_server


@pytest.fixture(scope="session")
def fault_broker() -> Iterator[LocalBroker]:
    """A private broker with default settings; scenarios may stop and start it."""
    require_rabbitmq_server()
    with start_broker("plain") as broker:
        yield broker


@pytest.fixture(scope="session")
def timeout_broker() -> Iterator[LocalBroker]:
    """A private broker that closes channels holding a delivery unacked for over a second."""
    require_rabbitmq_server()
    with start_broker("timeout") as broker:
        yield broker


@pytest.fixture(scope="session")
def management_broker() -> Iterator[LocalBroker]:
    """A private broker with the management plugin, so `distill-swarm node add` can make users."""
    require_rabbitmq_server("rabbitmq_management")
    with start_broker("management") as broker:
        yield broker
