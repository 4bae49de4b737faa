"""The pupil's journal: finished lessons, and whether the broker confirmed their reports."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pupil_node.journal import Entry, Journal


def test_a_lesson_is_reported_only_once_marked(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    assert journal.entry("l1") is None
    journal.record("l1", b"report")
    assert journal.entry("l1") == Entry(b"report", reported=False)
    journal.mark_reported("l1")
    assert journal.entry("l1") == Entry(b"report", reported=True)
    assert journal.count() == 1
    journal.close()
    assert Journal(tmp_path / "journal.sqlite3").entry("l1") == Entry(b"report", reported=True)


def test_a_journal_from_before_the_reported_column_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE done (lesson_id TEXT PRIMARY KEY, report BLOB NOT NULL, done_at TEXT)")
    db.execute("INSERT INTO done VALUES ('old', x'7b7d', '2026-01-01T00:00:00+00:00')")
    db.commit()
    db.close()
    journal = Journal(path)
    # An old entry counts as not confirmed: a redelivery re-sends its report, as it always did.
    assert journal.entry("old") == Entry(b"{}", reported=False)
    journal.record("new", b"r")
    journal.mark_reported("new")
    assert journal.entry("new") == Entry(b"r", reported=True)
