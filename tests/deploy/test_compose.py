"""The server stack's deployment files, checked without a Docker engine.

- ``docker-compose.yml`` through ``docker-compose config`` (Debian's docker-compose 1.29 needs no
  engine for it), with a ``.env`` made from ``.env.example``. Outside CI a missing
  ``docker-compose`` skips those tests; under ``CI=true`` it fails them.
- The rabbitmq service's entrypoint, which fills ``deploy/rabbitmq/definitions.json`` from the
  environment, run for real with the image's entrypoint replaced by a recorder.
- ``deploy/rabbitmq/definitions.json`` against what ``shared.topology`` declares: the broker
  answers a declaration that differs from a pre-declared queue with PRECONDITION_FAILED.
- ``deploy/Dockerfile`` and ``.dockerignore``, statically.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pika
import pytest
import yaml
from pika.adapters.blocking_connection import BlockingChannel

from shared.config import BrokerConfig, MasterJobsConfig, load_settings
from shared.topology import Topology

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
RABBITMQ_CONF = ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf"
PYPROJECT = ROOT / "pyproject.toml"

SERVICES = {"rabbitmq", "ollama", "ollama-pull", "master", "prometheus", "grafana"}
TORCH_PIN = "torch==2.13.0"
VHOST = "swarm"
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


# -- helpers ----------------------------------------------------------------------------------


def _env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


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

    walk(_raw_compose())
    return found


def _compose_bin() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        message = "docker-compose is not installed (apt-get install docker-compose)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; under CI=true this is a failure")
        pytest.skip(message)
    return found


def _run_compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    # The shell's environment overrides .env in compose: drop anything that could leak in.
    keep = {
        key: value
        for key, value in os.environ.items()
        if key not in _env_example() and not key.startswith("COMPOSE_")
    }
    return subprocess.run(
        [
            _compose_bin(),
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


def _raw_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def _rabbitmq_entrypoint() -> list[str]:
    """The rabbitmq service's entrypoint as the container receives it."""
    entrypoint = _raw_compose()["services"]["rabbitmq"]["entrypoint"]
    assert isinstance(entrypoint, list)
    return [str(part).replace("$$", "$") for part in entrypoint]


def _entrypoint_default(name: str) -> str:
    """The default path the entrypoint script uses for DEFINITIONS_TEMPLATE/_RENDERED."""
    script = _rabbitmq_entrypoint()[-1]
    match = re.search(rf'os\.environ\.get\("{name}", "([^"]+)"\)', script)
    assert match, f"the rabbitmq entrypoint does not read {name}"
    return match.group(1)


def _definitions() -> dict[str, Any]:
    data = json.loads(DEFINITIONS.read_text())
    assert isinstance(data, dict)
    return data


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
    result = _run_compose_config(env_file)
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
    template = _entrypoint_default("DEFINITIONS_TEMPLATE")
    assert mounts[template].startswith(f"{DEFINITIONS}:") and mounts[template].endswith(":ro")
    conf_mounts = [v for k, v in mounts.items() if k.startswith("/etc/rabbitmq/conf.d/")]
    assert len(conf_mounts) == 1 and conf_mounts[0].startswith(f"{RABBITMQ_CONF}:")
    rendered = _entrypoint_default("DEFINITIONS_RENDERED")
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
    example = _env_example()

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
    result = _run_compose_config(empty)
    assert result.returncode != 0
    assert "RABBITMQ_" in result.stderr


def test_env_example_defines_every_variable() -> None:
    example = _env_example()
    used = _compose_variables() | set(PLACEHOLDER.findall(DEFINITIONS.read_text()))
    assert used - set(example) == set(), "variables missing from .env.example"
    assert set(example) - used == set(), ".env.example holds variables nothing uses"
    for key, value in example.items():
        if key.endswith("_PASSWORD"):
            # Still the example: the rabbitmq entrypoint refuses it until it is changed.
            assert "change-me" in value
            assert re.fullmatch(r"[A-Za-z0-9._~-]+", value), f"{key} is not URL-safe"


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
        _rabbitmq_entrypoint(), capture_output=True, text=True, env=env, timeout=60, check=False
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
    template = _definitions()
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
    assert settings["load_definitions"] == _entrypoint_default("DEFINITIONS_RENDERED")
    assert int(settings["consumer_timeout"]) == 30 * 60 * 1000


# -- definitions.json against shared.topology -------------------------------------------------


def _bind(method: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Arguments of a call as pika's own BlockingChannel method would receive them."""
    bound = inspect.signature(method).bind(None, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


class RecordingChannel:
    """Stands in for a pika channel and records what a Topology declares."""

    def __init__(self) -> None:
        self.exchanges: dict[str, dict[str, Any]] = {}
        self.queues: dict[str, dict[str, Any]] = {}
        self.bindings: set[tuple[str, str, str, str]] = set()

    @staticmethod
    def _record(table: dict[str, dict[str, Any]], name: str, props: dict[str, Any]) -> None:
        # Redeclaring with other properties is what the broker answers with PRECONDITION_FAILED.
        assert table.setdefault(name, props) == props, f"{name} declared two different ways"

    def exchange_declare(self, *args: Any, **kwargs: Any) -> None:
        a = _bind(BlockingChannel.exchange_declare, args, kwargs)
        assert not a["passive"]
        kind = a["exchange_type"]
        self._record(
            self.exchanges,
            a["exchange"],
            {
                "type": str(getattr(kind, "value", kind)),
                "durable": a["durable"],
                "auto_delete": a["auto_delete"],
                "internal": a["internal"],
                "arguments": dict(a["arguments"] or {}),
            },
        )

    def queue_declare(self, *args: Any, **kwargs: Any) -> None:
        a = _bind(BlockingChannel.queue_declare, args, kwargs)
        assert not a["passive"]
        self._record(
            self.queues,
            a["queue"],
            {
                "durable": a["durable"],
                "exclusive": a["exclusive"],
                "auto_delete": a["auto_delete"],
                "arguments": dict(a["arguments"] or {}),
            },
        )

    def queue_bind(self, *args: Any, **kwargs: Any) -> None:
        a = _bind(BlockingChannel.queue_bind, args, kwargs)
        # pika binds with the queue's name when no routing key is given.
        key = a["queue"] if a["routing_key"] is None else a["routing_key"]
        arguments = json.dumps(a["arguments"] or {}, sort_keys=True)
        self.bindings.add((a["exchange"], a["queue"], key, arguments))


def _default_topology() -> Topology:
    broker = BrokerConfig()
    assert broker.namespace == VHOST, "definitions.json is written for the `swarm` namespace"
    # With the default jobs policy: one queue per offloadable kind is part of the topology.
    return Topology(broker.namespace, broker.quorum_queues, MasterJobsConfig().offloaded)


def _declared_by_definitions() -> RecordingChannel:
    """The definitions' exchanges/queues/bindings in the recorder's shape."""
    defs = _definitions()
    assert [vhost["name"] for vhost in defs["vhosts"]] == [VHOST]
    seen = RecordingChannel()
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
    master = RecordingChannel()
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
    pupil = RecordingChannel()
    _default_topology().declare_pupil(cast(BlockingChannel, pupil), "pi-7")
    defs = _declared_by_definitions()
    for name, props in pupil.exchanges.items():
        assert defs.exchanges[name] == props
    for name, props in pupil.queues.items():
        if name in defs.queues:
            assert defs.queues[name] == props


def test_definitions_users_come_from_the_environment() -> None:
    defs = _definitions()
    names = [user["name"] for user in defs["users"]]
    assert names == ["${RABBITMQ_ADMIN_USER}", "${RABBITMQ_MASTER_USER}"]
    for user in defs["users"]:
        assert PLACEHOLDER.fullmatch(user["password"]), "no literal password in definitions"
        assert "password_hash" not in user
    assert {p["user"] for p in defs["permissions"]} == set(names)
    assert {p["vhost"] for p in defs["permissions"]} == {VHOST}


# -- the master image -------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, no comments."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation line"
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def test_dockerfile_installs_exactly_the_pinned_torch() -> None:
    text = DOCKERFILE.read_text()
    assert TORCH_PIN in text
    assert ("ARG", f'TORCH_SPEC="{TORCH_PIN}"') in _instructions()
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    assert TORCH_PIN in dependencies, "pyproject.toml and the Dockerfile pin different torch"


def test_dockerfile_uses_pypi_only_and_the_master_extra() -> None:
    runs = [args for word, args in _instructions() if word in {"RUN", "ARG", "ENV"}]
    joined = "\n".join(runs)
    for forbidden in ("--index-url", "--extra-index-url", "--find-links", " -i ", "://"):
        assert forbidden not in joined, f"{forbidden!r}: the build may use PyPI only"
    assert any('pip install ".[master]"' in run for run in runs)
    assert "embedded" not in joined


def test_dockerfile_runs_as_a_non_root_user() -> None:
    stage = _final_stage()
    assert stage[0] == ("FROM", "python:3.11-slim")
    users = [args for word, args in stage if word == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    bases = [args.split(" ")[0] for word, args in _instructions() if word == "FROM"]
    assert set(bases) == {"python:3.11-slim"}


def test_dockerfile_entrypoint_workdir_and_data_volume() -> None:
    stage = _final_stage()

    def last(word: str) -> str:
        return [args for w, args in stage if w == word][-1]

    assert json.loads(last("ENTRYPOINT")) == ["distill-swarm"]
    assert json.loads(last("CMD")) == ["master", "run"]
    assert last("WORKDIR") == "/app"
    assert json.loads(last("VOLUME")) == ["/data"]
    env = " ".join(args for w, args in stage if w == "ENV")
    assert "DISTILL_SWARM__MASTER__STORE=/data/master.sqlite3" in env
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert "distill-swarm" in scripts


def test_dockerignore_keeps_secrets_and_clutter_out_but_the_package_in() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for required in (".git", ".venv", "runs", ".env", "**/__pycache__", ".mypy_cache"):
        assert required in patterns, f".dockerignore should exclude {required}"
    needed = ["pyproject.toml", "README.md", "shared", "master", "pupil_node", "distill_swarm"]
    for path in needed:
        hits = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatch(path, p)]
        assert not hits, f".dockerignore drops {path}, which the image build needs"
