"""A private, throwaway RabbitMQ node for the demo (and tests) when none is running.

It gets its own node name, AMQP and distribution ports, data directory, Erlang cookie and an
empty plugin list, so it never collides with a system broker, and it is stopped and deleted when
the ``with`` block ends. Tests may opt in to the management plugin (HTTP API on a free loopback
port) and to a TLS listener beside the plain one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from distill_swarm.processes import stop_processes
from shared.errors import BrokerError

# Debian puts the real scripts here; /usr/sbin/rabbitmq-server would `su` to the rabbitmq user,
# who cannot write our temporary directory.
RABBITMQ_BIN_DIRS = (Path("/usr/lib/rabbitmq/bin"), Path("/usr/local/lib/rabbitmq/bin"))
START_TIMEOUT_S = 90.0


def free_port() -> int:
    """A TCP port nobody listens on right now (best effort)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True if something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def find_rabbitmq_server() -> Path | None:
    """The rabbitmq-server script to run directly, if this machine has one."""
    for directory in RABBITMQ_BIN_DIRS:
        candidate = directory / "rabbitmq-server"
        if candidate.is_file():
            return candidate
    found = shutil.which("rabbitmq-server")
    return Path(found) if found else None


class LocalBroker:
    """``with LocalBroker() as broker: broker.url`` runs a private RabbitMQ node.

    ``management=True`` enables the management plugin at ``management_url``; ``tls=(ca, cert,
    key)`` (PEM files) adds an amqps listener at ``tls_url``. Both are off by default.
    ``extra_config`` is appended to ``rabbitmq.conf``; ``advanced_config`` (Erlang terms, e.g.
    ``[{rabbit, [{channel_tick_interval, 500}]}].``) becomes ``advanced.config``, for the few
    settings ``rabbitmq.conf`` cannot express. Neither is written unless given.
    """

    def __init__(
        self,
        extra_config: str = "",
        management: bool = False,
        tls: tuple[Path, Path, Path] | None = None,
        advanced_config: str = "",
    ) -> None:
        server = find_rabbitmq_server()
        if server is None:
            raise BrokerError(
                "no RabbitMQ answers and no rabbitmq-server binary is installed: "
                "`apt-get install rabbitmq-server` or set AMQP_URL to a running broker"
            )
        self._server = server
        self._extra_config = extra_config
        self._advanced_config = advanced_config
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"distill{os.getpid()}x{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.management_port = free_port() if management else None
        self.management_url = f"http://127.0.0.1:{self.management_port}" if management else None
        self._tls = tls
        self.tls_port = free_port() if tls else None
        self.tls_url = f"amqps://guest:guest@127.0.0.1:{self.tls_port}/%2F" if tls else None
        self._dir = Path(tempfile.mkdtemp(prefix="distill-swarm-rabbit-"))
        self._process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """The environment that points RabbitMQ's scripts at this node."""
        advanced = (
            {"RABBITMQ_ADVANCED_CONFIG_FILE": str(self._dir / "advanced.config")}
            if self._advanced_config
            else {}
        )
        return {
            **os.environ,
            "HOME": str(self._dir),  # its own Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self._dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self._dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self._dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self._dir / "rabbitmq.conf"),
            "RABBITMQ_PID_FILE": str(self._dir / "rabbit.pid"),
            **advanced,
        }

    def ctl(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run rabbitmqctl against this node."""
        ctl = self._server.with_name("rabbitmqctl")
        return subprocess.run(
            [str(ctl), "-n", self.node, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def _config(self) -> str:
        lines = [f"listeners.tcp.default = 127.0.0.1:{self.port}", "loopback_users = none"]
        if self.management_port is not None:
            lines += [
                "management.tcp.ip = 127.0.0.1",
                f"management.tcp.port = {self.management_port}",
            ]
        if self._tls is not None:
            ca, cert, key = self._tls
            # verify_peer with fail_if_no_peer_cert = false: a client certificate is checked
            # against the CA when one is sent, and not required otherwise.
            lines += [
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {ca}",
                f"ssl_options.certfile = {cert}",
                f"ssl_options.keyfile = {key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        return "\n".join(lines) + "\n" + self._extra_config

    def _ports(self) -> list[int]:
        optional = (self.management_port, self.tls_port)
        return [self.port, *(port for port in optional if port is not None)]

    def start(self) -> None:
        """Start the node and wait until every listener it was asked for accepts connections."""
        plugins = "rabbitmq_management" if self.management_port is not None else ""
        (self._dir / "enabled_plugins").write_text(f"[{plugins}].\n")
        (self._dir / "rabbitmq.conf").write_text(self._config())
        if self._advanced_config:
            (self._dir / "advanced.config").write_text(self._advanced_config)
        log_file = (self._dir / "server.log").open("wb")
        self._process = subprocess.Popen(
            [str(self._server)],
            env=self.env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(port_open("127.0.0.1", port) for port in self._ports()):
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = (self._dir / "server.log").read_text(errors="replace")[-800:]
                self.stop()
                raise BrokerError(f"private RabbitMQ did not start: {tail.strip()}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the node and delete its files."""
        if self._process is not None and self._process.poll() is None:
            self.ctl("stop", timeout_s=60)
            stop_processes([self._process], sig=None)
        self._process = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
