"""The pupil's systemd unit and its installer, checked without touching the real system.

- ``deploy/pupil/distill-swarm-pupil.service`` passes ``systemd-analyze verify`` (from Debian's
  ``systemd`` package; outside CI the test is skipped when it is missing, under ``CI=true`` it
  fails) and keeps its restart policy and sandboxing.
- ``deploy/pupil/install.sh --root DIR --no-systemctl`` writes the unit, the env file and a
  virtualenv under DIR, and ``uninstall.sh --root DIR`` removes them.

To stay fast and offline, the installer is given a wheel of this checkout and
``--pip-args "--no-deps --no-index"``: it installs the project into the new virtualenv but none of
its dependencies (torch alone is hundreds of MB). The test then points that virtualenv at this
test run's own site-packages (a ``.pth`` file) to show that the installed ``distill-swarm`` runs.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pytest

from shared.cli_support import ExitCode
from shared.config import load_settings
from tests.support.live_swarm import require_binary
from tests.support.wheel import build_wheel

ROOT = Path(__file__).resolve().parents[2]
PUPIL_DIR = ROOT / "deploy" / "pupil"
UNIT = PUPIL_DIR / "distill-swarm-pupil.service"
INSTALL = PUPIL_DIR / "install.sh"
UNINSTALL = PUPIL_DIR / "uninstall.sh"
SYSTEM_UNITS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))

INSTALLED_UNIT = Path("etc/systemd/system/distill-swarm-pupil.service")
ENV_FILE = Path("etc/distill-swarm/pupil.env")
VENV = Path("opt/distill-swarm/venv")
STATE_DIR = Path("var/lib/distill-swarm")
# Characters a password may hold that a URL must encode.
PASSWORD = "s3cr#t p@ss:/%"
SETTINGS = {
    "--broker-url": "amqps://broker.example:5671/swarm",
    "--node-id": "pi-7",
    "--user": "pupil-pi-7",
    "--ollama-model": "qwen3:0.6b",
    "--embed-model": "mxbai-embed-large",
    "--ollama-url": "http://127.0.0.1:11434",
}


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key`` -> every value it is given (systemd allows a key several times), all sections."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as systemd's EnvironmentFile= reads these (unquoted) values."""
    return dict(
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line and not line.startswith("#")
    )


@dataclass
class Installed:
    root: Path
    stdout: str


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def run_script(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, timeout=600, check=False
    )


def install(root: Path, wheel: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    password_file = root.parent / f"{root.name}.password"
    password_file.write_text(PASSWORD + "\n")
    settings = [part for flag, value in SETTINGS.items() for part in (flag, value)]
    return run_script(
        INSTALL,
        "--root",
        str(root),
        "--no-systemctl",
        *settings,
        "--password-file",
        str(password_file),
        "--source",
        str(wheel),
        "--pip-args",
        "--no-deps --no-index",
        "--python",
        sys.executable,
        *extra,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Installed:
    root = tmp_path_factory.mktemp("root")
    result = install(root, wheel, "--env", "DISTILL_SWARM__PUPIL__METRICS_ADDR=0.0.0.0")
    assert result.returncode == 0, result.stderr
    return Installed(root, result.stdout)


@pytest.fixture(scope="module")
def systemd_root(installed: Installed) -> Iterator[Path]:
    """The install root plus the system's own units, so verify finds sysinit.target & co."""
    require_binary("systemd-analyze", "systemd")
    units = next((d for d in SYSTEM_UNITS if d.is_dir()), None)
    assert units is not None, "systemd is installed but its unit directory is not there"
    target = installed.root / "usr" / "lib" / "systemd" / "system"
    shutil.copytree(units, target, symlinks=True)
    yield installed.root
    shutil.rmtree(installed.root / "usr")


# -- the unit -----------------------------------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(systemd_root: Path) -> None:
    # --root: the unit's ExecStart must exist as an executable inside the installed tree.
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={systemd_root}", INSTALLED_UNIT.name],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == result.stderr.strip() == "", "verify printed warnings"


def test_unit_is_sandboxed(systemd_root: Path) -> None:
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            f"--root={systemd_root}",
            INSTALLED_UNIT.name,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    # 0 is fully locked down, 10 is not at all; the node needs the network and its state dir.
    assert float(match.group(1)) <= 2.5, result.stdout


def test_unit_restart_policy_and_paths() -> None:
    unit = unit_settings(UNIT.read_text())
    assert unit["User"] == unit["Group"] == ["distill-swarm"]
    assert unit["ExecStart"] == ["/opt/distill-swarm/venv/bin/distill-swarm pupil run"]
    assert unit["EnvironmentFile"] == ["/etc/distill-swarm/pupil.env"]
    assert unit["StateDirectory"] == ["distill-swarm"]
    assert unit["ReadWritePaths"] == ["/var/lib/distill-swarm"]
    assert "DISTILL_SWARM__PUPIL__STATE_DIR=/var/lib/distill-swarm" in unit["Environment"]
    assert unit["Restart"] == ["on-failure"]
    assert 5 <= int(unit["RestartSec"][0].rstrip("s")) <= 120
    # Bad input is never fixed by a restart; a broker or model server that is down may be.
    prevented = set(unit["RestartPreventExitStatus"][0].split())
    assert str(int(ExitCode.BAD_INPUT)) in prevented
    # Nor is a second machine with this node id (the broker refuses it the node's queue).
    assert str(int(ExitCode.NODE_ID_IN_USE)) in prevented
    assert {str(int(ExitCode.BROKER)), str(int(ExitCode.BACKEND))}.isdisjoint(prevented)
    # Longer than the consumer's 60 s wait for the lesson in hand, so a stop is clean.
    assert int(unit["TimeoutStopSec"][0].rstrip("s")) > 60
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert unit[key] == [value], key
    assert unit["WantedBy"] == ["multi-user.target"]


# -- install.sh ---------------------------------------------------------------------------------


def test_install_writes_unit_env_file_and_virtualenv(installed: Installed, wheel: Path) -> None:
    root = installed.root
    assert (root / INSTALLED_UNIT).read_text() == UNIT.read_text()
    assert (root / STATE_DIR).is_dir()
    # Only the pupil extra is asked for.
    assert f"{wheel}[pupil]" in installed.stdout

    env_file = root / ENV_FILE
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    env = read_env_file(env_file)
    assert env["DISTILL_SWARM__PUPIL__METRICS_ADDR"] == "0.0.0.0"
    settings = load_settings(env=env)
    assert settings.pupil.node_id == "pi-7"
    assert (settings.pupil.generator.kind, settings.pupil.generator.model) == (
        "ollama",
        "qwen3:0.6b",
    )
    assert (settings.pupil.embedder.kind, settings.pupil.embedder.model) == (
        "ollama",
        "mxbai-embed-large",
    )
    assert settings.pupil.generator.url == settings.pupil.embedder.url == "http://127.0.0.1:11434"
    params = pika.URLParameters(settings.broker.url)
    assert (params.host, params.port, params.virtual_host) == ("broker.example", 5671, "swarm")
    assert params.ssl_options is not None
    assert isinstance(params.credentials, pika.PlainCredentials)
    assert (params.credentials.username, params.credentials.password) == ("pupil-pi-7", PASSWORD)

    # The installed entry point runs (its dependencies borrowed from this test run).
    venv = root / VENV
    entry_point = venv / "bin" / "distill-swarm"
    assert os.access(entry_point, os.X_OK)
    (purelib,) = venv.glob("lib/python3*/site-packages")
    (purelib / "zz-test-dependencies.pth").write_text(site.getsitepackages()[0] + "\n")
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_SWARM__")}
    result = subprocess.run(
        [str(entry_point), "pupil", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=clean_env,
    )
    assert result.returncode == 0, result.stderr
    assert "--node-id" in result.stdout


def test_running_install_again_keeps_the_settings(installed: Installed, wheel: Path) -> None:
    before = (installed.root / ENV_FILE).read_text()
    result = run_script(
        INSTALL,
        "--root",
        str(installed.root),
        "--source",
        str(wheel),
        "--pip-args",
        "--no-deps --no-index",
        "--python",
        sys.executable,
    )
    assert result.returncode == 0, result.stderr
    assert "keeping the settings" in result.stdout
    assert (installed.root / ENV_FILE).read_text() == before


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"--node-id": "no spaces"}, "--node-id"),
        ({"--broker-url": "amqp://pi-7:secret@broker.example/swarm"}, "must not hold credentials"),
        ({"--broker-url": "http://broker.example/"}, "--broker-url must look like"),
        ({"--ollama-model": 'qwen"3'}, "--ollama-model"),
    ],
)
def test_install_refuses_bad_input_and_writes_nothing(
    tmp_path: Path, wheel: Path, change: dict[str, str], complaint: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    original = dict(SETTINGS)
    SETTINGS.update(change)
    try:
        result = install(root, wheel)
    finally:
        SETTINGS.clear()
        SETTINGS.update(original)
    assert result.returncode == 2, result.stdout + result.stderr
    assert complaint in result.stderr
    assert list(root.iterdir()) == []


def test_uninstall_removes_what_install_made(tmp_path: Path, wheel: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    assert install(root, wheel).returncode == 0
    (root / STATE_DIR / "adapter.safetensors").write_bytes(b"trained")

    result = run_script(UNINSTALL, "--root", str(root))
    assert result.returncode == 0, result.stderr
    for path in (INSTALLED_UNIT, ENV_FILE, VENV, VENV.parent):
        assert not (root / path).exists(), path
    # The trained adapter outlives an uninstall unless asked otherwise.
    assert (root / STATE_DIR / "adapter.safetensors").exists()

    result = run_script(UNINSTALL, "--root", str(root), "--purge")
    assert result.returncode == 0, result.stderr
    assert not (root / STATE_DIR).exists()
