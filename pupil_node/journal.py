"""The pupil's journal of finished lessons, so a redelivered lesson is never trained on twice.

A lesson is journalled after its checkpoint is written and before its report is published: if
the node dies after journalling, the redelivered lesson's stored report is sent again (the master
ignores the duplicate); if it dies between checkpoint and journal, the checkpoint's
``last_lesson_id`` tells the node the training already happened.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path


class Journal:
    """A small SQLite table: lesson_id -> encoded report."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection used from the consumer's worker thread only.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS done (lesson_id TEXT PRIMARY KEY, report BLOB NOT NULL, "
            "done_at TEXT NOT NULL)"
        )

    def report_for(self, lesson_id: str) -> bytes | None:
        """The encoded report of a finished lesson, or None."""
        row = self._db.execute("SELECT report FROM done WHERE lesson_id=?", (lesson_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def record(self, lesson_id: str, report: bytes) -> None:
        """Mark a lesson finished (durably: SQLite commits before this returns)."""
        self._db.execute(
            "INSERT OR REPLACE INTO done VALUES (?, ?, ?)",
            (lesson_id, report, datetime.now(UTC).isoformat()),
        )

    def count(self) -> int:
        """How many lessons this node has finished."""
        return int(self._db.execute("SELECT COUNT(*) FROM done").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        self._db.close()
