"""The pupil's state directory: where it is by default, which node owns it, one process at a time.

A pupil's state (adapter checkpoints, lesson journal, lesson memory) belongs to one node id and
one running process (docs/decisions.md, section 24):
- the default directory is per node: ``$XDG_STATE_HOME/distill-swarm/pupil/<node_id>``
  (``~/.local/state/...`` when ``XDG_STATE_HOME`` is unset), so two nodes started from one
  directory never share a journal;
- ``node.json`` in the directory records the node id that owns it; another node id is refused;
  a directory from before owner files (state but no ``node.json``) is adopted by the first node
  that opens it, with a log line;
- ``lock`` in the directory is held with ``flock`` for the life of the process: a second process
  on the same directory is refused. The kernel drops the lock when the process ends, however it
  ends (SIGKILL, power loss of a local disk), so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from shared.errors import ConfigError, StateDirInUse

log = logging.getLogger(__name__)

OWNER_NAME = "node.json"
LOCK_NAME = "lock"
# The owner file's own format: bump it only if a reader must tell an old file from a new one.
OWNER_FORMAT = 1
# What `pupil run` used for every node before state dirs were per node (relative to its cwd).
OLD_DEFAULT = Path("distill-swarm-pupil")


def default_state_dir(node_id: str, env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/distill-swarm/pupil/<node_id>``, or under ``~/.local/state``.

    The XDG base-directory spec says a relative ``XDG_STATE_HOME`` is invalid and must be
    ignored: it would move with the working directory, the very sharing this default avoids.
    """
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "distill-swarm" / "pupil" / node_id


def resolve_state_dir(configured: Path | None, node_id: str) -> Path:
    """The state directory to use: ``pupil.state_dir`` if set, else the per-node default."""
    return Path(configured) if configured is not None else default_state_dir(node_id)


class NodeState:
    """An opened state directory: owned by ``node_id`` and locked until :meth:`close`."""

    def __init__(self, path: Path, node_id: str, lock_fd: int) -> None:
        self.path = path
        self.node_id = node_id
        self._lock_fd: int | None = lock_fd

    @classmethod
    def open(cls, path: Path, node_id: str) -> NodeState:
        """Create (if needed), lock and claim ``path`` for ``node_id``.

        Raises :class:`StateDirInUse` if another process holds the directory, and
        :class:`ConfigError` if it belongs to another node id or its owner file is unreadable.
        """
        try:
            path.mkdir(parents=True, exist_ok=True)
            # The lock first: two processes claiming one new directory for different ids must
            # not both find it unowned.
            fd = _lock(path)
        except OSError as exc:  # not writable, not a directory...: a setting to fix
            raise ConfigError(f"state dir {path} cannot be used: {exc}") from None
        try:
            _claim(path, node_id)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"state dir {path} cannot be used: {exc}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, node_id, fd)

    def close(self) -> None:
        """Release the lock (idempotent)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the only descriptor releases the flock
            self._lock_fd = None

    def __del__(self) -> None:
        # A node whose construction failed half-way (a bad checkpoint) never gets close():
        # the lock must not outlive the object inside a long-lived process (tests, benches).
        self.close()


def _lock(path: Path) -> int:
    lock_path = path / LOCK_NAME
    # os.open descriptors are not inherited by child processes (PEP 446): a subprocess of the
    # node can never keep the lock alive after the node is gone.
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirInUse(
            f"state dir {path} is in use by another pupil process (pid {holder}); "
            "each running node needs its own --state-dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    # The holder's pid, only for the message above: the flock, not this number, is the lock.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _claim(path: Path, node_id: str) -> None:
    owner_path = path / OWNER_NAME
    if owner_path.exists():
        owner = _read_owner(owner_path)
        if owner != node_id:
            raise ConfigError(
                f"state dir {path} belongs to node '{owner}', not '{node_id}': give node "
                f"'{node_id}' its own --state-dir (or run it as --node-id {owner})"
            )
        return
    leftovers = sorted(p.name for p in path.iterdir() if p.name not in {LOCK_NAME, OWNER_NAME})
    if leftovers:
        log.warning(
            "state dir %s has no %s (it predates owner files) and holds %s: node %s adopts it",
            path,
            OWNER_NAME,
            ", ".join(leftovers),
            node_id,
        )
    else:
        log.info("new state dir %s for node %s", path, node_id)
    _write_atomically(
        owner_path,
        json.dumps(
            {
                "format": OWNER_FORMAT,
                "node_id": node_id,
                "created_at": datetime.now(UTC).isoformat(),
            }
        ).encode()
        + b"\n",
    )


def _read_owner(owner_path: Path) -> str:
    try:
        data = json.loads(owner_path.read_bytes())
        owner = data["node_id"]
        if not isinstance(owner, str) or not owner:
            raise ValueError("node_id is not a non-empty string")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"state dir {owner_path.parent}: {OWNER_NAME} is unreadable ({exc}); it should hold "
            f'{{"node_id": "<id>"}}: fix it, or move the directory away'
        ) from None
    return owner


def _write_atomically(path: Path, data: bytes) -> None:
    # Write, fsync, rename, fsync the directory: a crash leaves the old file or the whole new one.
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
