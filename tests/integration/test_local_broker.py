"""The demo's private RabbitMQ: starts on its own port, works, and leaves nothing behind."""

from __future__ import annotations

import pytest

from distill_swarm.local_broker import LocalBroker, port_open
from shared.broker import connect
from shared.config import BrokerConfig
from shared.topology import Topology
from tests.support.private_broker import require_rabbitmq_server

pytestmark = pytest.mark.broker


def test_private_broker_serves_and_cleans_up() -> None:
    require_rabbitmq_server()
    broker = LocalBroker()
    with broker:
        assert broker.port != 5672
        connection = connect(BrokerConfig(url=broker.url, connect_attempts=3))
        try:
            Topology("demo").declare_all(connection.channel(), ("pupil-1",))
        finally:
            connection.close()
    assert not port_open("127.0.0.1", broker.port)
