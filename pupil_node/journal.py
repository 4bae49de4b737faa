"""The pupil's journal of finished lessons, so a redelivered lesson is never trained on twice.

A lesson is journalled after its checkpoint is written and before its report is published, and
marked *reported* once the broker confirmed the report:
- if the node dies after journalling but before the confirm, the redelivered lesson's stored
  report is sent again (the master counts a (lesson, node) pair once);
- if the report was confirmed, a redelivery (the ack was lost: a crash, a broker restart, a channel
  closed for ``consumer_timeout``) is only acked: the broker already holds the report, and sending
  it again would only put a duplicate on the wire;
- if the node dies between checkpoint and journal, the checkpoint's ``last_lesson_id`` tells the
  node the training already happened.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    """One finished lesson: its encoded report and whether the broker confirmed that report."""

    report: bytes
    reported: bool


class Journal:
    """A small SQLite table: lesson_id -> encoded report, and when the report was confirmed."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection used from the consumer's worker thread only.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS done (lesson_id TEXT PRIMARY KEY, report BLOB NOT NULL, "
            "done_at TEXT NOT NULL, reported_at TEXT)"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(done)")}
        if "reported_at" not in columns:
            # A journal written before reports were marked: its lessons count as not confirmed,
            # so a redelivery re-sends the report, as it always did.
            self._db.execute("ALTER TABLE done ADD COLUMN reported_at TEXT")

    def entry(self, lesson_id: str) -> Entry | None:
        """The finished lesson's report and whether it was confirmed, or None if not done."""
        row = self._db.execute(
            "SELECT report, reported_at FROM done WHERE lesson_id=?", (lesson_id,)
        ).fetchone()
        return None if row is None else Entry(bytes(row[0]), row[1] is not None)

    def record(self, lesson_id: str, report: bytes) -> None:
        """Mark a lesson finished (durably: SQLite commits before this returns)."""
        self._db.execute(
            "INSERT OR REPLACE INTO done VALUES (?, ?, ?, NULL)",
            (lesson_id, report, _now()),
        )

    def mark_reported(self, lesson_id: str) -> None:
        """Record that the broker confirmed the lesson's report."""
        self._db.execute(
            "UPDATE done SET reported_at=? WHERE lesson_id=? AND reported_at IS NULL",
            (_now(), lesson_id),
        )

    def count(self) -> int:
        """How many lessons this node has finished."""
        return int(self._db.execute("SELECT COUNT(*) FROM done").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        self._db.close()


def _now() -> str:
    return datetime.now(UTC).isoformat()
