"""The monitoring half of the server stack, checked without a Docker engine.

- ``docker-compose.yml``'s prometheus and grafana services and the master's metrics endpoint, as
  ``docker-compose config`` renders them (see test_compose.py for how it is run);
- ``deploy/prometheus/``: ``promtool check`` on the config and rules, and ``promtool test rules``
  on the alerts with synthetic series (outside CI skipped without promtool, which ships in
  Debian's ``prometheus`` package; under ``CI=true`` a failure);
- ``deploy/grafana/``: the provisioned data source, the dashboard provider and the dashboard fit
  together and fit the paths compose mounts them at.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.config import load_settings
from tests.support.deploy_files import ENV_EXAMPLE, raw_compose, run_compose_config
from tests.support.live_swarm import require_binary

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "distill-swarm.json"
DATASOURCE = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER = GRAFANA_DIR / "provisioning" / "dashboards" / "distill-swarm.yml"


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    env_file = tmp_path_factory.mktemp("compose") / ".env"
    env_file.write_text(ENV_EXAMPLE.read_text())
    result = run_compose_config(env_file)
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert isinstance(data, dict)
    services: dict[str, Any] = data["services"]
    return services


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (or volume name) of a service's volumes."""
    found = {}
    for volume in service["volumes"]:
        host, container, *_ = volume.split(":")
        found[container] = host
    return found


# -- compose ----------------------------------------------------------------------------------


def test_start_order_and_health(services: dict[str, Any]) -> None:
    # Prometheus waits for the master to be started, not healthy: it must run to see it down.
    assert services["prometheus"]["depends_on"] == {"master": {"condition": "service_started"}}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    for name, path in (
        ("master", ":9464/metrics"),
        ("prometheus", ":9090/-/ready"),
        ("grafana", ":3000/api/health"),
    ):
        check = services[name]["healthcheck"]
        assert any(path in part for part in check["test"]), name
        assert check["interval"] and check["timeout"] and int(check["retries"]) >= 3
        assert services[name]["restart"] == "unless-stopped"


def test_master_serves_metrics_where_prometheus_scrapes(services: dict[str, Any]) -> None:
    master = services["master"]
    settings = load_settings(env={k: str(v) for k, v in master["environment"].items()})
    assert settings.master.metrics_addr == "0.0.0.0"
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    (target,) = jobs["distill-swarm-master"]["static_configs"][0]["targets"]
    assert target == f"master:{settings.master.metrics_port}"
    assert str(settings.master.metrics_port) in " ".join(master["healthcheck"]["test"])
    # Reachable on the compose network only: the metrics port is not published on the host.
    assert "ports" not in master


def test_prometheus_and_grafana_mount_their_config(services: dict[str, Any]) -> None:
    prometheus = mounts(services["prometheus"])
    assert prometheus["/etc/prometheus"] == str(PROMETHEUS_DIR)
    assert prometheus["/prometheus"] == "prometheus-data"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]

    grafana = mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == str(GRAFANA_DIR / "provisioning")
    assert grafana["/var/lib/grafana"] == "grafana-data"
    provider = yaml.safe_load(PROVIDER.read_text())["providers"][0]
    dashboards_at = provider["options"]["path"]
    assert grafana[dashboards_at] == str(DASHBOARD.parent)
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_at}/{DASHBOARD.name}"


def test_uis_are_on_loopback_and_grafana_password_comes_from_env(
    services: dict[str, Any],
) -> None:
    for name, port in (("prometheus", 9090), ("grafana", 3000)):
        (published,) = services[name]["ports"]
        host_ip = published["host_ip"] if isinstance(published, dict) else published.split(":")[0]
        assert host_ip == "127.0.0.1", name
        assert str(port) in str(published)
    env = services["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "change-me-grafana-password"  # from .env.example
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"


def _run_grafana_entrypoint(tmp_path: Path, password: str) -> subprocess.CompletedProcess[str]:
    """The grafana service's entrypoint with the image's /run.sh replaced by a recorder."""
    entrypoint = [
        str(p).replace("$$", "$") for p in raw_compose()["services"]["grafana"]["entrypoint"]
    ]
    record = tmp_path / "started"
    fake = tmp_path / "run.sh"
    fake.write_text(f"#!/bin/sh\ntouch {record}\n")
    fake.chmod(0o755)
    assert "exec /run.sh" in entrypoint[-1]
    entrypoint[-1] = entrypoint[-1].replace("exec /run.sh", f"exec {fake}")
    env = {"PATH": os.environ.get("PATH", ""), "GF_SECURITY_ADMIN_PASSWORD": password}
    return subprocess.run(entrypoint, capture_output=True, text=True, env=env, timeout=30)


@pytest.mark.parametrize("password", ["", "change-me-grafana-password"])
def test_grafana_refuses_the_example_password(tmp_path: Path, password: str) -> None:
    result = _run_grafana_entrypoint(tmp_path, password)
    assert result.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in result.stderr
    assert not (tmp_path / "started").exists()


def test_grafana_starts_with_a_real_password(tmp_path: Path) -> None:
    result = _run_grafana_entrypoint(tmp_path, "a-real-password")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "started").exists()


# -- Prometheus config and alert rules --------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = require_binary("promtool", "prometheus")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_config_and_the_rules() -> None:
    for args in (
        ("check", "config", str(PROMETHEUS_DIR / "prometheus.yml")),
        ("check", "rules", str(PROMETHEUS_DIR / "alerts.yml")),
    ):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


ALERT_TESTS = Path(__file__).with_name("prometheus_alerts_test.yml")


def test_alerts_fire_when_they_should() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


# -- Grafana provisioning ---------------------------------------------------------------------


def test_dashboard_panels_use_the_provisioned_data_source() -> None:
    (source,) = yaml.safe_load(DATASOURCE.read_text())["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        assert panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for ref in [panel.get("datasource")] + [
            t.get("datasource") for t in panel.get("targets", [])
        ]:
            if isinstance(ref, dict):
                assert ref == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == source["uid"]
