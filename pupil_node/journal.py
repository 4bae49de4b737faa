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

Retention (docs/decisions.md, section 25): a confirmed report is never sent again, so
its body is dropped when the confirm is noted; the ids of the newest ``max_lessons`` finished
lessons are kept (their redelivery is only acked), older confirmed entries are pruned, and an
unconfirmed entry is never pruned. ``meta`` holds what outlives the rows (the pruned count, so
``count()`` stays the node's lifetime total, and the stream offset).

The lesson stream (docs/stream.md): an entry records the stream offset its lesson came at, and
``meta.stream_offset`` the highest offset done, in the same transaction as the entry (one
commit, one fsync). A node resumes at :meth:`Journal.resume_offset`: after the highest offset
done, or at the lowest one whose report the broker has not confirmed, so a crash between journal
and confirm sends that report again (the redelivered lesson finds its entry) and a crash anywhere
else replays at most the lessons in flight, which the journal absorbs.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
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

    def __init__(self, path: Path, max_lessons: int = 100_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_lessons = max_lessons
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
        if "stream_offset" not in columns:
            # A journal from the per-node queues: its entries came at no offset (NULL).
            self._db.execute("ALTER TABLE done ADD COLUMN stream_offset INTEGER")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value NOT NULL)")
        # A journal from before retention (or after max_lessons was lowered): drop what the
        # window no longer needs now, and give the space back once.
        with transaction(self._db):
            self._db.execute(
                "UPDATE done SET report=X'' WHERE reported_at IS NOT NULL AND length(report) > 0"
            )
            self._prune()
        compact_if_mostly_free(self._db)
        self.path = path
        # Read by the keepalive thread for heartbeats; written on the worker thread.
        self.offset = self._stored_offset(self._db)

    def entry(self, lesson_id: str) -> Entry | None:
        """The finished lesson's report and whether it was confirmed, or None if not done."""
        row = self._db.execute(
            "SELECT report, reported_at FROM done WHERE lesson_id=?", (lesson_id,)
        ).fetchone()
        return None if row is None else Entry(bytes(row[0]), row[1] is not None)

    def record(self, lesson_id: str, report: bytes, offset: int | None = None) -> None:
        """Mark a lesson finished (durably: SQLite commits before this returns), with the stream
        offset it came at, if any: entry and offset are one transaction."""
        with transaction(self._db):
            self._db.execute(
                "INSERT OR REPLACE INTO done (lesson_id, report, done_at, reported_at, "
                "stream_offset) VALUES (?, ?, ?, NULL, ?)",
                (lesson_id, report, _now(), offset),
            )
            if offset is not None:
                self._store_offset(offset)
        if offset is not None:
            self.offset = max(offset, self.offset if self.offset is not None else offset)

    def advance(self, offset: int) -> None:
        """Note that the lesson at stream ``offset`` needs no more work (a replay, a skip)."""
        if self.offset is not None and offset <= self.offset:
            return
        with transaction(self._db):
            self._store_offset(offset)
        self.offset = offset

    def _store_offset(self, offset: int) -> None:
        self._db.execute(
            "INSERT INTO meta VALUES ('stream_offset', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
            (offset,),
        )

    @staticmethod
    def _stored_offset(db: sqlite3.Connection) -> int | None:
        row = db.execute("SELECT value FROM meta WHERE key='stream_offset'").fetchone()
        return None if row is None else int(row[0])

    def forget_offsets(self) -> None:
        """Forget every stream offset: the stream was declared again and its offsets restarted.

        The entries stay (a lesson done is still done); only where they sat is gone. Safe from
        any thread: it writes on a connection of its own.
        """
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            with transaction(db):
                db.execute("DELETE FROM meta WHERE key='stream_offset'")
                db.execute("UPDATE done SET stream_offset = NULL")
        finally:
            db.close()
        self.offset = None

    def resume_offset(self) -> int | None:
        """Where the node resumes the stream: None if it never read it (start at "first").

        Safe from any thread: it reads on a connection of its own (WAL: a consistent snapshot).
        """
        db = sqlite3.connect(self.path)
        try:
            done = self._stored_offset(db)
            if done is None:
                return None
            unconfirmed = db.execute(
                "SELECT MIN(stream_offset) FROM done WHERE reported_at IS NULL"
            ).fetchone()[0]
        finally:
            db.close()
        return done + 1 if unconfirmed is None else min(done + 1, int(unconfirmed))

    def mark_reported(self, lesson_id: str) -> None:
        """Record that the broker confirmed the lesson's report, and prune the journal.

        The report's body goes: a confirmed report is never sent again (a redelivery is only
        acked), and the master's store holds it.
        """
        with transaction(self._db):
            self._db.execute(
                "UPDATE done SET reported_at=?, report=X'' "
                "WHERE lesson_id=? AND reported_at IS NULL",
                (_now(), lesson_id),
            )
            self._prune()

    def _prune(self) -> None:
        # Rowids grow with every record (INSERT OR REPLACE gives a replaced row a new one, and only
        # old rows are deleted), so "older than the newest max_lessons" is a rowid bound: one
        # range delete, not a sort of the table.
        newest = self._db.execute("SELECT MAX(rowid) FROM done").fetchone()[0]
        if newest is None or newest <= self.max_lessons:
            return
        pruned = self._db.execute(
            "DELETE FROM done WHERE rowid <= ? AND reported_at IS NOT NULL",
            (newest - self.max_lessons,),
        ).rowcount
        if pruned:
            self._db.execute(
                "INSERT INTO meta VALUES ('pruned', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                (pruned,),
            )

    def __len__(self) -> int:
        """How many entries the journal holds now (at most ``max_lessons`` plus unconfirmed)."""
        return int(self._db.execute("SELECT COUNT(*) FROM done").fetchone()[0])

    def count(self) -> int:
        """How many lessons this node has finished, pruned entries included."""
        row = self._db.execute("SELECT value FROM meta WHERE key='pruned'").fetchone()
        return len(self) + (0 if row is None else int(row[0]))

    def close(self) -> None:
        """Close the database."""
        self._db.close()


def _now() -> str:
    return datetime.now(UTC).isoformat()


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One SQLite transaction on an autocommit connection: committed, or rolled back on error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def compact_if_mostly_free(db: sqlite3.Connection, min_bytes: int = 1 << 20) -> None:
    """VACUUM ``db`` if more than half of a file over ``min_bytes`` is free pages.

    SQLite reuses freed pages but never returns them, so a file once grown large (a journal from
    before retention) would stay large; in steady state the freed pages are reused and this
    never runs. Called at open only: VACUUM rewrites the file.
    """
    pages = int(db.execute("PRAGMA page_count").fetchone()[0])
    free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
    page_bytes = int(db.execute("PRAGMA page_size").fetchone()[0])
    if pages * page_bytes > min_bytes and free * 2 > pages:
        db.execute("VACUUM")
