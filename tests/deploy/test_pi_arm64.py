"""The Pi path for real: ``deploy/pupil/install.sh`` in an arm64 Debian with systemd as PID 1.

``scripts/pi-arm64`` boots a debootstrapped arm64 bookworm (what 64-bit Raspberry Pi OS is) with
``systemd-nspawn -b`` under qemu user-mode emulation; it shares the host's network. On the host
this test runs a private RabbitMQ with the management plugin, an Ollama stand-in
(``tests/support/fake_ollama.py``, the embedded models behind Ollama's HTTP API) and the master.
Inside the container it does what docs/deployment.md tells an operator to do, and checks what
they would see:

1. ``distill-swarm node add`` (on the host) writes the node's password file; ``install.sh`` runs
   as root in the container with it, from a wheel of this checkout and an aarch64 wheelhouse
   downloaded on the host (the container has no route to PyPI's TLS chain; that is also how an
   air-gapped Pi installs). The service is active and connected with its own broker user.
2. The master teaches lessons; the node completes them (the master's store says so).
3. ``systemctl kill -s KILL``: systemd starts the node again by itself and it reconnects.
4. A reboot of the container: the service comes back at boot with its state (adapter version,
   stream offset, lessons done) and learns the next lessons without redoing the old ones.
5. ``uninstall.sh --purge`` leaves nothing behind: no unit, files, user or group.

Install time and RSS under emulation are printed (``-s`` shows them) and written to
``pi-arm64-figures.json`` in the test's temporary directory.

Slow (tens of minutes under emulation) and needs root, so it runs on demand only:
``DISTILL_SWARM_PI_ARM64=1 python -m pytest tests/deploy/test_pi_arm64.py -s``. Without that
variable it is skipped; with it, a machine that cannot run it (``scripts/pi-arm64 check``) skips
it outside CI and fails it under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from distill_swarm.local_broker import LocalBroker
from tests.support.live_swarm import free_port, under_ci
from tests.support.private_broker import add_admin, require_rabbitmq_server
from tests.support.wheel import build_wheel

pytestmark = [pytest.mark.pi_arm64, pytest.mark.broker, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "pi-arm64"
ENABLE_VAR = "DISTILL_SWARM_PI_ARM64"
SERVICE = "distill-swarm-pupil"
NODE_ID = "pi-arm64"
VHOST = "swarm"
ADMIN, ADMIN_PASSWORD = "admin", "admin-secret-5d21"
GENERATOR_MODEL, EMBEDDER_MODEL = "gemma3:270m", "all-minilm"
# Generous: everything inside the container runs under qemu, on a 2-core machine.
INSTALL_TIMEOUT_S = 3600
LESSONS_TIMEOUT_S = 1800
RESTART_TIMEOUT_S = 600
CONNECT_TIMEOUT_S = 900
# Lessons of each master run (train only: no exam round to wait for).
FIRST = [
    {"id": "pi-sum", "goal_text": "Summarise: the shop opens at nine.", "split": "train"},
    {"id": "pi-tr", "goal_text": "Translate into French: 'thank you'.", "split": "train"},
]
AFTER_REBOOT = [
    {"id": "pi-route", "goal_text": "Billing or support? 'My card was charged twice.'"},
]
# Paths that change on a booted system whatever is installed (logs, systemd's own state, the
# backups useradd/userdel keep of the account files, the files this test copied in).
CHURN = re.compile(
    r"^/(var/log|var/lib/systemd|var/cache|var/tmp|tmp|root|etc/(passwd|group|shadow|gshadow)-$)"
)
ACCOUNT_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")


def run(*args: str, timeout_s: float = 600, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout_s, check=False, **kwargs
    )


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(3)


@dataclass
class Pi:
    """The container and what runs beside it on the host."""

    dir: Path
    work: Path
    broker: LocalBroker
    ollama_url: str
    figures: dict[str, Any] = field(default_factory=dict)
    tree_before: set[str] = field(default_factory=set)
    accounts_before: dict[str, str] = field(default_factory=dict)

    @property
    def console(self) -> Path:
        return self.work / "console.log"

    def sh(self, command: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
        """``bash -c command`` as root inside the container."""
        return run(str(SCRIPT), "exec", str(self.dir), "bash", "-c", command, timeout_s=timeout_s)

    def out(self, command: str, timeout_s: float = 600) -> str:
        result = self.sh(command, timeout_s)
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
        return result.stdout.strip()

    def journal(self) -> str:
        """The service's log lines of this boot."""
        return self.sh(f"journalctl -b -u {SERVICE} -o cat --no-pager").stdout

    def main_pid(self) -> int:
        return int(self.out(f"systemctl show -p MainPID --value {SERVICE}"))

    def active(self) -> bool:
        return self.sh(f"systemctl is-active {SERVICE}").stdout.strip() == "active"

    def rss_kib(self) -> dict[str, int]:
        """The service's current and peak RSS (VmRSS, VmHWM), in KiB, from /proc."""
        status = self.out(f"cat /proc/{self.main_pid()}/status")
        return {
            key: int(value.split()[0])
            for key, value in (line.split(":", 1) for line in status.splitlines())
            if key in ("VmRSS", "VmHWM")
        }

    def tree(self) -> set[str]:
        """Every path on the container's root file system (not /proc, /sys, /dev, /run)."""
        listing = self.out("find / -xdev -mindepth 1 2>/dev/null || true", timeout_s=600)
        return {path for path in listing.splitlines() if not CHURN.match(path)}

    def accounts(self) -> dict[str, str]:
        return {path: self.out(f"cat {path}") for path in ACCOUNT_FILES}


def master(
    pi: Pi, store: Path, prompts: list[dict[str, str]], name: str
) -> subprocess.Popen[bytes]:
    """``distill-swarm master run --exit-when-done`` on the host, as the broker's admin."""
    prompt_file = pi.work / f"{name}.jsonl"
    prompt_file.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_SWARM__")}
    env.update(
        {
            "AMQP_URL": f"amqp://{ADMIN}:{ADMIN_PASSWORD}@127.0.0.1:{pi.broker.port}/{VHOST}",
            "DISTILL_SWARM__MASTER__METRICS_PORT": str(free_port()),
            "DISTILL_SWARM__MASTER__EVAL_FRACTION": "0",
            "DISTILL_SWARM__MASTER__EXAM": "false",
            "DISTILL_SWARM__MASTER__CEILING": "false",
            # The node may take a long time to install and start under emulation.
            "DISTILL_SWARM__MASTER__EXPECT_NODES_TIMEOUT_S": str(INSTALL_TIMEOUT_S),
            "DISTILL_SWARM__MASTER__GENERATOR__MAX_TOKENS": "16",
        }
    )
    for part, model in (("GENERATOR", GENERATOR_MODEL), ("EMBEDDER", EMBEDDER_MODEL)):
        prefix = f"DISTILL_SWARM__MASTER__{part}__"
        env.update(
            {prefix + "KIND": "ollama", prefix + "MODEL": model, prefix + "URL": pi.ollama_url}
        )
    log = (pi.work / f"{name}.log").open("ab")
    return subprocess.Popen(
        [
            sys.executable, "-m", "distill_swarm", "master", "run", "--prompts", str(prompt_file),
            "--store", str(store), "--expect-nodes", "1", "--exit-when-done",
            "--timeout-s", str(INSTALL_TIMEOUT_S + LESSONS_TIMEOUT_S),
        ],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=pi.work,
    )  # fmt: skip


def node_status(store: Path) -> dict[str, Any]:
    result = run(sys.executable, "-m", "distill_swarm", "status", "--store", str(store), "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["node_id"]: row for row in json.loads(result.stdout)}
    return dict(rows[NODE_ID])


def finish(process: subprocess.Popen[bytes], log: Path) -> None:
    try:
        code = process.wait(timeout=INSTALL_TIMEOUT_S + LESSONS_TIMEOUT_S + 120)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert code == 0, log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def prepared() -> None:
    if os.environ.get(ENABLE_VAR) != "1":
        pytest.skip(f"slow (tens of minutes under qemu): set {ENABLE_VAR}=1 to run it")
    require_rabbitmq_server("rabbitmq_management")
    prepare = run(str(SCRIPT), "prepare", timeout_s=3600)
    check = run(str(SCRIPT), "check")
    if prepare.returncode != 0 or check.returncode != 0:
        reason = (prepare.stderr + check.stderr).strip().splitlines()[-1:]
        message = f"scripts/pi-arm64 cannot run here: {' '.join(reason)}"
        if under_ci():
            pytest.fail(f"{message}; under CI=true this is a failure")
        pytest.skip(message)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout."""
    return build_wheel(tmp_path_factory.mktemp("pi-wheel"))


@pytest.fixture(scope="module")
def ollama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Ollama stand-in on the host's 127.0.0.1, warmed up; its URL."""
    port = free_port()
    log = (tmp_path_factory.mktemp("pi-ollama") / "ollama.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "tests.support.fake_ollama", "--port", str(port),
            "--model", f"{GENERATOR_MODEL}=generate", "--model", f"{EMBEDDER_MODEL}=embed",
        ],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                    return True
            except OSError:
                return False

        wait_until(answers, 300, "the Ollama stand-in")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def pi(
    prepared: None, wheel: Path, ollama: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pi]:
    """A booted container, a private broker with the swarm's vhost and admin; stopped after."""
    paths = dict(line.split("=", 1) for line in run(str(SCRIPT), "paths").stdout.split())
    work = tmp_path_factory.mktemp("pi-arm64")
    root = work / "root"
    result = run(str(SCRIPT), "new", str(root), timeout_s=600)
    assert result.returncode == 0, result.stderr
    # What a user copies to the Pi: the installer (scp -r deploy/pupil), a wheel of the project.
    shutil.copytree(ROOT / "deploy" / "pupil", root / "root" / "pupil")
    shutil.copy(wheel, root / "root" / wheel.name)
    with LocalBroker(management=True) as broker:
        add_admin(broker, VHOST, ADMIN, ADMIN_PASSWORD)
        pi = Pi(root, work, broker, ollama)
        booted = run(
            str(SCRIPT), "boot", str(root), str(pi.console), f"--bind-ro={paths['WHEELS']}:/wheels",
            timeout_s=900,
        )  # fmt: skip
        try:
            assert booted.returncode == 0, booted.stderr + pi.console.read_text(errors="replace")
            yield pi
        finally:
            run(str(SCRIPT), "stop", str(root), timeout_s=300)
            (work / "pi-arm64-figures.json").write_text(json.dumps(pi.figures, indent=2) + "\n")
            print(f"\npi-arm64 figures: {json.dumps(pi.figures)}")
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def store(pi: Pi) -> Path:
    return pi.work / "master.sqlite3"


def test_install_starts_the_service_as_its_own_broker_user(
    pi: Pi, wheel: Path, store: Path
) -> None:
    pi.tree_before = pi.tree()
    pi.accounts_before = pi.accounts()
    password_file = pi.work / f"{NODE_ID}.password"
    added = run(
        sys.executable, "-m", "distill_swarm", "node", "add", NODE_ID,
        "--admin-url", str(pi.broker.management_url), "--admin-user", ADMIN,
        "--admin-password", ADMIN_PASSWORD, "--broker-url", f"amqp://127.0.0.1:{pi.broker.port}",
        "--password-file", str(password_file),
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    shutil.copy(password_file, pi.dir / "root" / password_file.name)
    # The command `node add` printed, with what this machine needs on top: a port of its own
    # for the node's metrics, the wheel and wheelhouse as the source, small lessons.
    (printed,) = [line for line in added.stdout.splitlines() if "install.sh" in line]
    command = printed.replace("sudo pupil/install.sh", "/root/pupil/install.sh")
    settings = {
        "PUPIL__METRICS_PORT": free_port(),
        "PUPIL__HEARTBEAT_INTERVAL_S": 5,
        "PUPIL__GENERATOR__MAX_TOKENS": 16,
        "PUPIL__ADAPTER__STEPS_PER_LESSON": 2,
        "PUPIL__ADAPTER__BATCH_SIZE": 4,
        "PUPIL__GUIDANCE__METHOD": "retrieval",
        "PUPIL__GENERATOR__TIMEOUT_S": 600,
        "PUPIL__EMBEDDER__TIMEOUT_S": 600,
    }
    command += "".join(f" --env DISTILL_SWARM__{key}={value}" for key, value in settings.items())
    command += (
        f" --ollama-model {GENERATOR_MODEL} --embed-model {EMBEDDER_MODEL}"
        f" --ollama-url {pi.ollama_url} --source /root/{wheel.name}"
        " --pip-args '--no-index --find-links /wheels'"
    )
    # The master first: it declares the swarm's exchanges and job queues, which a node user
    # may only check, and then waits for the node before it publishes.
    first = master(pi, store, FIRST, "master-1")
    started = time.monotonic()
    installed = pi.sh(command, timeout_s=INSTALL_TIMEOUT_S)
    pi.figures["install_s"] = round(time.monotonic() - started)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    pi.figures["venv_mb"] = int(pi.out("du -sm /opt/distill-swarm/venv").split()[0])

    assert pi.out(f"systemctl is-enabled {SERVICE}") == "enabled"
    assert pi.active(), pi.journal()
    assert pi.out("stat -c %a /etc/distill-swarm/pupil.env") == "600"
    assert pi.out(f"stat -c %U /proc/{pi.main_pid()}") == "distill-swarm"
    started = time.monotonic()
    wait_until(lambda: "consuming" in pi.journal(), CONNECT_TIMEOUT_S, "the node to connect")
    pi.figures["first_start_to_consuming_s"] = round(time.monotonic() - started)
    # Connected as its own user: the broker lists a connection of that user.
    users = pi.broker.ctl("list_connections", "user", timeout_s=60).stdout
    assert NODE_ID in users.split(), users
    finish(first, pi.work / "master-1.log")


def test_completes_lessons(pi: Pi, store: Path) -> None:
    status = node_status(store)
    assert status["lessons_done"] == len(FIRST), status
    assert status["errors"] == 0, status
    pi.figures["rss_after_lessons_kib"] = pi.rss_kib()


def test_restarts_after_sigkill(pi: Pi) -> None:
    before = pi.main_pid()
    restarts = int(pi.out(f"systemctl show -p NRestarts --value {SERVICE}"))
    connects = pi.journal().count("consuming")
    assert pi.sh(f"systemctl kill -s KILL {SERVICE}").returncode == 0
    wait_until(
        lambda: pi.active() and pi.main_pid() not in (0, before),
        RESTART_TIMEOUT_S,
        "systemd to start the node again",
    )
    wait_until(
        lambda: pi.journal().count("consuming") > connects, CONNECT_TIMEOUT_S, "it to reconnect"
    )
    assert int(pi.out(f"systemctl show -p NRestarts --value {SERVICE}")) == restarts + 1


def test_survives_a_reboot_with_its_state(pi: Pi, store: Path) -> None:
    before = node_status(store)
    adapter = re.findall(r"adapter v(\d+)", pi.journal())[-1:]
    assert adapter and adapter != ["0"], "no trained adapter before the reboot"
    state_files = pi.out("ls /var/lib/distill-swarm")
    started = time.monotonic()
    result = run(str(SCRIPT), "reboot", str(pi.dir), str(pi.console), timeout_s=1200)
    assert result.returncode == 0, result.stderr
    pi.figures["reboot_s"] = round(time.monotonic() - started)
    # Enabled: started at boot, by systemd, with nobody asking.
    wait_until(pi.active, RESTART_TIMEOUT_S, "the service after the reboot")
    wait_until(lambda: "consuming" in pi.journal(), CONNECT_TIMEOUT_S, "it to reconnect")
    assert pi.out("ls /var/lib/distill-swarm") == state_files
    # The journal of this boot only (journalctl -b): the adapter it trained before the reboot.
    assert re.findall(r"adapter v(\d+)", pi.journal())[-1:] == adapter

    second = master(pi, store, AFTER_REBOOT, "master-2")
    finish(second, pi.work / "master-2.log")
    after = node_status(store)
    # The new lesson is learned, none of the old ones again: the stream offset came through.
    assert after["lessons_done"] == before["lessons_done"] + len(AFTER_REBOOT), (before, after)
    assert after["errors"] == 0, after
    assert after["stream_offset"] > before["stream_offset"], (before, after)
    pi.figures["rss_after_reboot_kib"] = pi.rss_kib()


def test_uninstall_purge_leaves_nothing_behind(pi: Pi) -> None:
    result = pi.sh("/root/pupil/uninstall.sh --purge", timeout_s=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert pi.sh(f"systemctl cat {SERVICE}").returncode != 0
    assert pi.sh("getent passwd distill-swarm").returncode == 2
    assert pi.sh("getent group distill-swarm").returncode == 2
    assert pi.sh("pgrep -f /opt/distill-swarm").returncode == 1
    assert pi.accounts() == pi.accounts_before
    left = sorted(pi.tree() - pi.tree_before)
    assert left == [], left
