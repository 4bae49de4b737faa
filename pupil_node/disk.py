"""When the pupil cannot write its own state: a full (or read-only, or failing) state disk.

Writing the node's state can fail for reasons that have nothing to do with the lesson in hand: the
disk is full (``ENOSPC``; SQLite's "database or disk is full"), read-only, or failing (``EIO``).
The lesson is fine and will succeed once the disk is, so it must not be dead-lettered the way a
lesson that crashes the handler twice is: :class:`StateWriteFailed` is an outage
(:class:`~shared.errors.DependencyDown`) of the state disk. The pupil's lesson consumer pauses on
it (:class:`~shared.health.Dependency`): the lesson in hand waits unacked, no new one is taken,
and a prober asks the disk for room (:meth:`pupil_node.node.PupilNode.probe_state_disk`) until
it has some; a consumer that does not pause on it requeues the lesson after a backoff
(docs/decisions.md, "A full disk loses nothing and trains nothing twice").
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.errors import DependencyDown

# SQLite's primary result codes for a write the storage refused: full, I/O error, read-only, or
# a file it could not open (a journal or WAL it could not create). Extended codes (e.g.
# SQLITE_IOERR_WRITE) carry the primary code in their low byte.
_SQLITE_CODES = frozenset(
    (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN)
)


class StateWriteFailed(DependencyDown):
    """The node cannot write its state directory now; the lesson waits, it is not dead-lettered."""


def is_storage_failure(exc: BaseException) -> bool:
    """True if ``exc``, or an exception it was raised from or while handling, is a refused write.

    A refused write is an :class:`OSError` (a checkpoint's write, fsync or rename) or an SQLite
    error with a storage result code. The chain is followed because a wrapper can hide the
    cause: :class:`~shared.errors.CheckpointError` is raised *from* the OSError, and a ROLLBACK
    that fails after SQLite already rolled back on a full disk is raised *while handling* the
    SQLITE_FULL error.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            return True
        code = getattr(current, "sqlite_errorcode", None)
        if isinstance(current, sqlite3.Error) and code is not None and code & 0xFF in _SQLITE_CODES:
            return True
        current = current.__cause__ or current.__context__
    return False


@contextmanager
def state_write(what: str) -> Iterator[None]:
    """Turn a storage failure inside the block into :class:`StateWriteFailed`.

    ``what`` completes "could not ..." in the message (e.g. ``"journal lesson 1a2b"``). Any
    other exception passes through unchanged.
    """
    try:
        yield
    except StateWriteFailed:
        raise
    except Exception as exc:
        if not is_storage_failure(exc):
            raise
        raise StateWriteFailed(
            f"could not {what}: {exc}; the lesson waits until the state directory can be "
            "written again"
        ) from exc


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the file system holding ``path``."""
    return shutil.disk_usage(path).free
