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
    # A confirmed report is never sent again: its body is dropped, the lesson stays done.
    assert journal.entry("l1") == Entry(b"", reported=True)
    assert journal.count() == 1
    journal.close()
    assert Journal(tmp_path / "journal.sqlite3").entry("l1") == Entry(b"", reported=True)


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
    assert journal.entry("new") == Entry(b"", reported=True)


def test_the_journal_keeps_the_newest_ids_and_every_unconfirmed_entry(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3", max_lessons=10)
    journal.record("unconfirmed", b"report")  # its report must still go out: never pruned
    for n in range(30):
        journal.record(f"l{n}", b"report")
        journal.mark_reported(f"l{n}")
    assert journal.entry("unconfirmed") == Entry(b"report", reported=False)
    assert journal.entry("l19") is None  # out of the window
    assert journal.entry("l20") == Entry(b"", reported=True)  # the oldest of the newest 10
    assert len(journal) == 11
    assert journal.count() == 31  # lessons done, pruned ones included
    journal.close()
    assert Journal(tmp_path / "journal.sqlite3", max_lessons=10).count() == 31


def test_a_journal_from_before_retention_is_trimmed_and_compacted_at_open(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path, max_lessons=100_000)
    for n in range(600):
        journal.record(f"lesson-{n:04d}", b"x" * 4000)
    journal.close()
    db = sqlite3.connect(path)  # as an old node left them: every report confirmed, body kept
    db.execute("UPDATE done SET reported_at='2026-01-01T00:00:00+00:00'")
    db.commit()
    db.close()
    grown = path.stat().st_size
    journal = Journal(path, max_lessons=100)
    assert (len(journal), journal.count()) == (100, 600)
    assert journal.entry("lesson-0599") == Entry(b"", reported=True)
    journal.close()
    assert path.stat().st_size < grown / 4


def test_a_new_reader_of_the_stream_starts_at_first(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.record("from-a-queue", b"report")  # done from a per-node queue: no offset
    assert journal.resume_offset() is None and journal.offset is None


def test_the_stream_offset_is_journalled_with_the_lesson(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.record("l1", b"r1", offset=7)
    journal.mark_reported("l1")
    journal.advance(9)  # a replay or a skip moves it on as well
    journal.advance(8)  # never back
    assert journal.offset == 9 and journal.resume_offset() == 10
    journal.close()
    reopened = Journal(path)
    assert reopened.offset == 9 and reopened.resume_offset() == 10


def test_a_node_resumes_at_the_lesson_whose_report_is_unconfirmed(tmp_path: Path) -> None:
    # Killed between journal and confirm: the lesson comes again and its report goes out again.
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.record("l1", b"r1", offset=3)
    journal.mark_reported("l1")
    journal.record("l2", b"r2", offset=4)
    assert journal.resume_offset() == 4
    journal.mark_reported("l2")
    assert journal.resume_offset() == 5


def test_offsets_are_forgotten_when_the_stream_starts_over(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.record("l1", b"r1", offset=500)
    journal.forget_offsets()
    assert journal.offset is None and journal.resume_offset() is None
    assert journal.entry("l1") is not None  # still done: a redelivery is only acked
    journal.record("l2", b"r2", offset=0)
    assert journal.resume_offset() == 0  # l2's report is not confirmed yet
