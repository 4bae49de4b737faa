"""Shared fixtures: a real RabbitMQ for every broker test, each test in its own namespace.

Broker, in order of preference: a RabbitMQ testcontainer when a Docker engine answers and holds
the image; else ``AMQP_URL``; else the local broker at 127.0.0.1:5672. Outside CI an unreachable
broker skips the broker tests; under ``CI=true`` it fails them, so a broken CI machine can never
look green.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pika
import pytest

from shared.config import DEFAULT_AMQP_URL, BrokerConfig
from shared.namespace import delete_namespace

# Tests name their pupils from this list, so teardown can delete those queues too.
TEST_NODE_IDS = ("a", "b", "pupil-1", "pupil-2")

# Session fixtures shared across test directories: a live master + pupil, and Prometheus on them.
pytest_plugins = ["tests.support.live_swarm"]


RABBITMQ_IMAGE = "rabbitmq:3.13-management"


def _docker_engine_has_rabbitmq() -> bool:
    """A Docker engine answers and already holds the RabbitMQ image.

    Holds, not can pull: on a machine that reaches no image registry (CI here, whose engine only
    runs the compose test's locally built images, scripts/docker-engine) a pull would fail every
    broker test instead of falling back to the local broker.
    """
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.images.get(RABBITMQ_IMAGE)
        return True
    except Exception:
        return False


def _reachable(url: str) -> str | None:
    """None if a broker answers at url, else the reason."""
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        connection.close()
        return None
    except Exception as exc:
        return repr(exc)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """The URL of a real, running RabbitMQ."""
    if not os.environ.get("AMQP_URL") and _docker_engine_has_rabbitmq():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer(RABBITMQ_IMAGE) as container:
            params = container.get_connection_params()
            yield f"amqp://guest:guest@{params.host}:{params.port}/%2F"
        return
    url = os.environ.get("AMQP_URL") or DEFAULT_AMQP_URL
    problem = _reachable(url)
    if problem is not None:
        message = f"no RabbitMQ at {url}: {problem}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (under CI=true a missing broker is a failure)")
        pytest.skip(message)
    yield url


@pytest.fixture
def namespace() -> str:
    """A fresh topology namespace, so tests never see each other's messages."""
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
def broker_config(amqp_url: str, namespace: str) -> Iterator[BrokerConfig]:
    """Broker settings for one test; its exchanges and queues are deleted afterwards."""
    config = BrokerConfig(url=amqp_url, namespace=namespace, connect_attempts=3, max_backoff_s=1.0)
    yield config
    delete_namespace(config, TEST_NODE_IDS)
