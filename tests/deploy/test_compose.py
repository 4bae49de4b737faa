"""docker-compose.yml through ``docker-compose config``, checked without a Docker engine.

Debian's docker-compose 1.29 needs no engine for ``config``; it runs with a ``.env`` made from
``.env.example``. Outside CI a missing ``docker-compose`` skips these tests; under ``CI=true`` it
fails them. The rabbitmq service's definitions are checked in test_rabbitmq_definitions.py, the
master's image in test_dockerfile.py.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml

from shared.config import load_settings
from tests.support.deploy_files import (
    DEFINITIONS,
    ENV_EXAMPLE,
    PLACEHOLDER,
    RABBITMQ_CONF,
    ROOT,
    VHOST,
    entrypoint_default,
    env_example,
    raw_compose,
    run_compose_config,
)

SERVICES = {"rabbitmq", "ollama", "ollama-pull", "master", "prometheus", "grafana"}


def _compose_variables() -> set[str]:
    """Every variable docker-compose.yml interpolates (``$$`` is an escaped ``$``)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(key)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            text = node.replace("$$", "")
            found.update(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))

    walk(raw_compose())
    return found


def _port_pairs(ports: list[Any]) -> set[tuple[str, int, int]]:
    """(host ip, published, target) of each port, from either syntax compose prints."""
    pairs = set()
    for port in ports:
        if isinstance(port, dict):
            pairs.add((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
        else:
            parts = str(port).split("/")[0].split(":")
            host_ip = parts[0] if len(parts) == 3 else ""
            pairs.add((host_ip, int(parts[-2]), int(parts[-1])))
    return pairs


# -- docker-compose config --------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    env_file = tmp_path_factory.mktemp("compose") / ".env"
    shutil.copy(ENV_EXAMPLE, env_file)
    result = run_compose_config(env_file)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def compose(compose_output: str) -> dict[str, Any]:
    data = yaml.safe_load(compose_output)
    assert isinstance(data, dict)
    return data


def test_compose_config_has_the_server_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == SERVICES
    assert set(compose["volumes"]) == {
        "rabbitmq-data",
        "ollama-models",
        "master-data",
        "prometheus-data",
        "grafana-data",
    }


def test_long_running_services_have_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    rabbit = services["rabbitmq"]["healthcheck"]["test"]
    assert rabbit[0] == "CMD" and rabbit[1] == "rabbitmq-diagnostics"
    assert {"ping", "check_port_connectivity"} & set(rabbit)
    assert services["ollama"]["healthcheck"]["test"] == ["CMD", "ollama", "list"]
    for name in ("rabbitmq", "ollama"):
        check = services[name]["healthcheck"]
        assert check["interval"] and check["timeout"] and int(check["retries"]) >= 3


def test_start_order_waits_for_healthy_broker_and_pulled_models(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["master"]["depends_on"] == {
        "rabbitmq": {"condition": "service_healthy"},
        "ollama": {"condition": "service_healthy"},
        "ollama-pull": {"condition": "service_completed_successfully"},
    }
    assert services["ollama-pull"]["depends_on"] == {"ollama": {"condition": "service_healthy"}}
    assert services["ollama-pull"]["restart"] == "no"
    assert services["master"]["restart"] == "unless-stopped"


def test_no_guest_credentials_anywhere(compose_output: str) -> None:
    for name, text in (
        ("docker compose config", compose_output),
        (".env.example", ENV_EXAMPLE.read_text()),
        ("definitions.json", DEFINITIONS.read_text()),
    ):
        assert "guest" not in text.lower(), f"'guest' appears in {name}"


def test_rabbitmq_service(compose: dict[str, Any]) -> None:
    rabbit = compose["services"]["rabbitmq"]
    assert rabbit["image"] == "rabbitmq:3.13-management"
    assert rabbit["hostname"] == "rabbitmq"
    ports = _port_pairs(rabbit["ports"])
    assert {(p, t) for _, p, t in ports} == {(5672, 5672), (15672, 15672)}
    # The image's default-user variables would be silently ignored next to load_definitions.
    assert not any(key.startswith("RABBITMQ_DEFAULT_") for key in rabbit["environment"])
    mounts = {volume.split(":")[1]: volume for volume in rabbit["volumes"]}
    assert mounts["/var/lib/rabbitmq"].startswith("rabbitmq-data:")
    template = entrypoint_default("DEFINITIONS_TEMPLATE")
    assert mounts[template].startswith(f"{DEFINITIONS}:") and mounts[template].endswith(":ro")
    conf_mounts = [v for k, v in mounts.items() if k.startswith("/etc/rabbitmq/conf.d/")]
    assert len(conf_mounts) == 1 and conf_mounts[0].startswith(f"{RABBITMQ_CONF}:")
    rendered = entrypoint_default("DEFINITIONS_RENDERED")
    assert str(Path(rendered).parent) in rabbit["tmpfs"]


def test_ollama_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["ollama"]["image"].startswith("ollama/ollama")
    assert services["ollama-pull"]["image"] == services["ollama"]["image"]
    assert "ollama-models:/root/.ollama:rw" in services["ollama"]["volumes"]
    pull = services["ollama-pull"]
    assert pull["environment"] == {
        "OLLAMA_HOST": "ollama:11434",
        "MASTER_MODEL": "qwen3",
        "EMBED_MODEL": "mxbai-embed-large",
    }
    script = " ".join(pull["command"])
    assert "ollama pull" in script
    assert "MASTER_MODEL" in script and "EMBED_MODEL" in script


def test_master_environment_is_a_valid_configuration(compose: dict[str, Any]) -> None:
    master = compose["services"]["master"]
    assert master["build"] == {"context": str(ROOT), "dockerfile": "deploy/Dockerfile"}
    env = {key: str(value) for key, value in master["environment"].items()}
    example = env_example()

    settings = load_settings(env=env)
    params = pika.URLParameters(settings.broker.url)
    assert (params.host, params.port, params.virtual_host) == ("rabbitmq", 5672, VHOST)
    credentials = params.credentials
    assert isinstance(credentials, pika.PlainCredentials)
    assert credentials.username == example["RABBITMQ_MASTER_USER"]
    assert credentials.password == example["RABBITMQ_MASTER_PASSWORD"]

    cfg = settings.master
    assert (cfg.generator.kind, cfg.generator.model) == ("ollama", "qwen3")
    assert (cfg.embedder.kind, cfg.embedder.model) == ("ollama", "mxbai-embed-large")
    assert cfg.generator.url == cfg.embedder.url == "http://ollama:11434"
    assert cfg.prompts == Path("/prompts/prompts.jsonl")
    assert cfg.store == Path("/data/master.sqlite3")
    assert cfg.expect_nodes == int(example["EXPECT_NODES"])

    volumes = master["volumes"]
    assert "master-data:/data:rw" in volumes
    assert f"{ROOT / 'prompts'}:/prompts:ro" in volumes


def test_compose_refuses_to_run_without_credentials(tmp_path: Path) -> None:
    empty = tmp_path / ".env"
    empty.write_text("")
    result = run_compose_config(empty)
    assert result.returncode != 0
    assert "RABBITMQ_" in result.stderr


def test_env_example_defines_every_variable() -> None:
    example = env_example()
    used = _compose_variables() | set(PLACEHOLDER.findall(DEFINITIONS.read_text()))
    assert used - set(example) == set(), "variables missing from .env.example"
    assert set(example) - used == set(), ".env.example holds variables nothing uses"
    for key, value in example.items():
        if key.endswith("_PASSWORD"):
            # Still the example: the rabbitmq entrypoint refuses it until it is changed.
            assert "change-me" in value
            assert re.fullmatch(r"[A-Za-z0-9._~-]+", value), f"{key} is not URL-safe"
