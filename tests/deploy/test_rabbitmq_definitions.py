"""The broker's pre-declared definitions, checked without a Docker engine.

- The rabbitmq service's entrypoint, which fills ``deploy/rabbitmq/definitions.json`` from the
  environment, run for real with the image's entrypoint replaced by a recorder.
- ``deploy/rabbitmq/definitions.json`` against what ``shared.topology`` declares: the broker
  answers a declaration that differs from a pre-declared queue with PRECONDITION_FAILED.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
from pika.adapters.blocking_connection import BlockingChannel

from shared.broker.stub import StubChannel
from shared.config import BrokerConfig, LessonsConfig, MasterJobsConfig
from shared.topology import Topology
from tests.support.deploy_files import (
    DEFINITIONS,
    PLACEHOLDER,
    RABBITMQ_CONF,
    VHOST,
    definitions,
    entrypoint_default,
    rabbitmq_entrypoint,
)

# -- the rabbitmq entrypoint: definitions.json filled from the environment --------------------


def _run_rabbitmq_entrypoint(tmp_path: Path, **credentials: str) -> tuple[int, str, Path, Path]:
    """Run the entrypoint with the image's docker-entrypoint.sh replaced by a recorder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "handed-over"
    fake = bin_dir / "docker-entrypoint.sh"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\n')
    fake.chmod(0o755)
    (bin_dir / "python3").symlink_to(sys.executable)
    rendered = tmp_path / "run" / "definitions.json"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "DEFINITIONS_TEMPLATE": str(DEFINITIONS),
        "DEFINITIONS_RENDERED": str(rendered),
        **credentials,
    }
    result = subprocess.run(
        rabbitmq_entrypoint(), capture_output=True, text=True, env=env, timeout=60, check=False
    )
    return result.returncode, result.stderr, rendered, record


GOOD_CREDENTIALS = {
    "RABBITMQ_ADMIN_USER": "ops",
    "RABBITMQ_ADMIN_PASSWORD": "s3cret-admin",
    "RABBITMQ_MASTER_USER": "teacher",
    # JSON-special characters must come out escaped, not break the file.
    "RABBITMQ_MASTER_PASSWORD": 'q"uo\\te',
}


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs /bin/bash")
def test_rabbitmq_entrypoint_fills_the_definitions(tmp_path: Path) -> None:
    rc, stderr, rendered, record = _run_rabbitmq_entrypoint(tmp_path, **GOOD_CREDENTIALS)
    assert rc == 0, stderr
    assert record.read_text().split() == ["rabbitmq-server"]
    assert stat.S_IMODE(rendered.stat().st_mode) == 0o600
    text = rendered.read_text()
    assert "${" not in text
    filled = json.loads(text)
    users = {user["name"]: user for user in filled["users"]}
    assert users["ops"]["password"] == "s3cret-admin"
    assert users["ops"]["tags"] == ["administrator"]
    assert users["teacher"]["password"] == 'q"uo\\te'
    assert users["teacher"]["tags"] == []
    assert {(p["user"], p["vhost"]) for p in filled["permissions"]} == {
        ("ops", VHOST),
        ("teacher", VHOST),
    }
    template = definitions()
    for key in ("vhosts", "exchanges", "queues", "bindings"):
        assert filled[key] == template[key]


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs /bin/bash")
@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"RABBITMQ_MASTER_PASSWORD": ""}, "RABBITMQ_MASTER_PASSWORD is not set"),
        ({"RABBITMQ_ADMIN_PASSWORD": "change-me-admin-password"}, "RABBITMQ_ADMIN_PASSWORD"),
        ({"RABBITMQ_MASTER_USER": "ops"}, "must differ"),
    ],
)
def test_rabbitmq_entrypoint_refuses_bad_credentials(
    tmp_path: Path, change: dict[str, str], complaint: str
) -> None:
    rc, stderr, rendered, record = _run_rabbitmq_entrypoint(
        tmp_path, **{**GOOD_CREDENTIALS, **change}
    )
    assert rc != 0
    assert complaint in stderr
    assert not record.exists(), "RabbitMQ must not start with bad credentials"
    assert not rendered.exists()


def test_rabbitmq_conf_loads_the_filled_definitions() -> None:
    settings = {}
    for line in RABBITMQ_CONF.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    assert settings["load_definitions"] == entrypoint_default("DEFINITIONS_RENDERED")
    assert int(settings["consumer_timeout"]) == 30 * 60 * 1000


# -- definitions.json against shared.topology -------------------------------------------------


def _default_topology() -> Topology:
    broker = BrokerConfig()
    assert broker.namespace == VHOST, "definitions.json is written for the `swarm` namespace"
    # With the default jobs policy: one queue per offloadable kind is part of the topology; with
    # the default lesson transport, the lesson stream.
    return Topology(
        broker.namespace, broker.quorum_queues, MasterJobsConfig().offloaded, LessonsConfig()
    )


def _declared_by_definitions() -> StubChannel:
    """The definitions' exchanges/queues/bindings in the stub channel's shape."""
    defs = definitions()
    assert [vhost["name"] for vhost in defs["vhosts"]] == [VHOST]
    seen = StubChannel()
    for x in defs.get("exchanges", []):
        assert x["vhost"] == VHOST
        seen.exchanges[x["name"]] = {
            "type": x["type"],
            "durable": x["durable"],
            "auto_delete": x["auto_delete"],
            "internal": x.get("internal", False),
            "arguments": x.get("arguments", {}),
        }
    for q in defs.get("queues", []):
        assert q["vhost"] == VHOST
        seen.queues[q["name"]] = {
            "durable": q["durable"],
            "exclusive": False,
            "auto_delete": q["auto_delete"],
            "arguments": q.get("arguments", {}),
        }
    for b in defs.get("bindings", []):
        assert b["vhost"] == VHOST and b["destination_type"] == "queue"
        arguments = json.dumps(b.get("arguments", {}), sort_keys=True)
        seen.bindings.add((b["source"], b["destination"], b["routing_key"], arguments))
    return seen


def test_predeclared_topology_matches_what_the_master_declares() -> None:
    master = StubChannel()
    _default_topology().declare_master(cast(BlockingChannel, master))
    defs = _declared_by_definitions()
    assert defs.exchanges == master.exchanges
    assert defs.queues == master.queues
    assert defs.bindings == master.bindings
    # The master's two queues are quorum queues; the dead-letter queue stays classic.
    topology = _default_topology()
    for queue in (topology.reports_queue, topology.control_queue):
        assert defs.queues[queue]["arguments"]["x-queue-type"] == "quorum"
    assert "x-queue-type" not in defs.queues[topology.dead_queue]["arguments"]


def test_predeclared_topology_agrees_with_what_a_pupil_declares() -> None:
    pupil = StubChannel()
    _default_topology().declare_pupil(cast(BlockingChannel, pupil), "pi-7")
    defs = _declared_by_definitions()
    for name, props in pupil.exchanges.items():
        assert defs.exchanges[name] == props
    for name, props in pupil.queues.items():
        if name in defs.queues:
            assert defs.queues[name] == props


def test_definitions_users_come_from_the_environment() -> None:
    defs = definitions()
    names = [user["name"] for user in defs["users"]]
    assert names == ["${RABBITMQ_ADMIN_USER}", "${RABBITMQ_MASTER_USER}"]
    for user in defs["users"]:
        assert PLACEHOLDER.fullmatch(user["password"]), "no literal password in definitions"
        assert "password_hash" not in user
    assert {p["user"] for p in defs["permissions"]} == set(names)
    assert {p["vhost"] for p in defs["permissions"]} == {VHOST}
