"""Helpers for tests that run their own throwaway RabbitMQ node (distill_swarm.local_broker).

A missing rabbitmq-server (or plugin) skips such tests outside CI and fails them under CI=true,
so a broken CI machine can never look green.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from distill_swarm.local_broker import LocalBroker, find_rabbitmq_server


def skip_or_fail(reason: str) -> None:
    """Skip the test, or fail it under CI=true."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (under CI=true this is a failure)")
    pytest.skip(reason)


def plugin_installed(server: Path, plugin: str) -> bool:
    """True if ``plugin`` ships with the RabbitMQ whose rabbitmq-server script is ``server``.

    Debian: /usr/lib/rabbitmq/bin/rabbitmq-server and
    /usr/lib/rabbitmq/lib/rabbitmq_server-<version>/plugins/<plugin>-<version>[.ez].
    """
    root = server.resolve().parent.parent
    return any(root.glob(f"lib/rabbitmq_server-*/plugins/{plugin}-*")) or any(
        root.glob(f"plugins/{plugin}-*")
    )


def require_rabbitmq_server(*plugins: str) -> None:
    """Skip (or fail under CI) unless rabbitmq-server and every named plugin are installed."""
    server = find_rabbitmq_server()
    if server is None:
        skip_or_fail("rabbitmq-server is not installed")
        return
    for plugin in plugins:
        if not plugin_installed(server, plugin):
            skip_or_fail(f"the RabbitMQ plugin {plugin} is not installed next to {server}")


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll until ``predicate()`` is true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def add_admin(broker: LocalBroker, vhost: str, user: str, password: str) -> None:
    """A vhost on a private broker and an administrator with every permission on it (what an
    operator has before `distill-swarm node add`)."""
    for args in (
        ("add_vhost", vhost),
        ("add_user", user, password),
        ("set_user_tags", user, "administrator"),
        ("set_permissions", "-p", vhost, user, ".*", ".*", ".*"),
    ):
        result = broker.ctl(*args)
        assert result.returncode == 0, result.stderr
