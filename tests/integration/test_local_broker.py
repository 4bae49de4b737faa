"""The demo's private RabbitMQ: starts on its own port, works, and leaves nothing behind."""

from __future__ import annotations

import os

import pytest

from distill_swarm.local_broker import LocalBroker, find_rabbitmq_server, port_open
from shared.broker import connect
from shared.config import BrokerConfig
from shared.topology import Topology

pytestmark = pytest.mark.broker


def test_private_broker_serves_and_cleans_up() -> None:
    if find_rabbitmq_server() is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("rabbitmq-server is not installed on the CI machine")
        pytest.skip("rabbitmq-server is not installed")
    broker = LocalBroker()
    with broker:
        assert broker.port != 5672
        connection = connect(BrokerConfig(url=broker.url, connect_attempts=3))
        try:
            Topology("demo").declare_all(connection.channel(), ("pupil-1",))
        finally:
            connection.close()
    assert not port_open("127.0.0.1", broker.port)
