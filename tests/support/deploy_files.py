"""The deployment files the tests under tests/deploy read, and small readers for them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
RABBITMQ_CONF = ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf"
VHOST = "swarm"
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def env_example() -> dict[str, str]:
    """.env.example's KEY=VALUE lines."""
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def raw_compose() -> dict[str, Any]:
    """docker-compose.yml as written, before compose interpolates it."""
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def rabbitmq_entrypoint() -> list[str]:
    """The rabbitmq service's entrypoint as the container receives it."""
    entrypoint = raw_compose()["services"]["rabbitmq"]["entrypoint"]
    assert isinstance(entrypoint, list)
    return [str(part).replace("$$", "$") for part in entrypoint]


def entrypoint_default(name: str) -> str:
    """The default path the entrypoint script uses for DEFINITIONS_TEMPLATE/_RENDERED."""
    script = rabbitmq_entrypoint()[-1]
    match = re.search(rf'os\.environ\.get\("{name}", "([^"]+)"\)', script)
    assert match, f"the rabbitmq entrypoint does not read {name}"
    return match.group(1)


def definitions() -> dict[str, Any]:
    """deploy/rabbitmq/definitions.json, placeholders unfilled."""
    data = json.loads(DEFINITIONS.read_text())
    assert isinstance(data, dict)
    return data


def compose_bin() -> str:
    """The docker-compose binary; skips the test without one (outside CI, else fails it)."""
    found = shutil.which("docker-compose")
    if found is None:
        message = "docker-compose is not installed (apt-get install docker-compose)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; under CI=true this is a failure")
        pytest.skip(message)
    return found


def run_compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` on docker-compose.yml with ``env_file`` as its ``.env``."""
    # The shell's environment overrides .env in compose: drop anything that could leak in.
    keep = {
        key: value
        for key, value in os.environ.items()
        if key not in env_example() and not key.startswith("COMPOSE_")
    }
    return subprocess.run(
        [
            compose_bin(),
            "--project-directory",
            str(ROOT),
            "--file",
            str(COMPOSE_FILE),
            "--env-file",
            str(env_file),
            "config",
        ],
        capture_output=True,
        text=True,
        env=keep,
        timeout=120,
        check=False,
    )
