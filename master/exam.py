"""The exam: eval lessons sent again, answered by what every node serves now.

Eval lessons arrive interleaved with training, so the online figures mix answers a node gave
before and after it studied. An exam measures the *final* skill: the master sends every eval
lesson of the run again, each with an ``exam_id``; every node answers them with its current
model by every method (plain base, guided, LoRA) and learns nothing from them. ``eval`` then
reports the online and the exam figures apart, each labelled.

Exam reports live in their own table of the master's store, keyed by (exam, lesson, node), so an
exam never overwrites a lesson's first report and two exams never mix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from master.store import Store
from shared.broker import Publisher
from shared.messages import Lesson, Report, encode, new_id, utc_now
from shared.topology import Topology

EXAM_SCHEMA = """
CREATE TABLE IF NOT EXISTS exams (
    exam_id TEXT PRIMARY KEY,
    started_at TEXT NOT NULL,
    lesson_ids TEXT NOT NULL          -- the eval lessons sent, space-separated, in order
);
CREATE TABLE IF NOT EXISTS exam_reports (
    exam_id TEXT NOT NULL,
    lesson_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    body TEXT NOT NULL,
    received_at TEXT NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (exam_id, lesson_id, node_id)
);
"""


@dataclass(frozen=True)
class Exam:
    """One exam: its id, when it started and the eval lessons it sent."""

    exam_id: str
    started_at: str
    lesson_ids: tuple[str, ...]


class ExamStore:
    """Exams and their reports, in the master's SQLite file (a sibling of :class:`Store`)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        store.connection().executescript(EXAM_SCHEMA)

    def start(self, lesson_ids: Sequence[str], exam_id: str | None = None) -> Exam:
        """Record a new exam of ``lesson_ids``; the id defaults to the start time."""
        now = datetime.now(UTC)
        exam = Exam(
            exam_id or f"exam-{now:%Y%m%dT%H%M%S}-{new_id()[:6]}",
            now.isoformat(),
            tuple(lesson_ids),
        )
        with self._store.transaction() as db:
            db.execute(
                "INSERT INTO exams VALUES (?, ?, ?)",
                (exam.exam_id, exam.started_at, " ".join(exam.lesson_ids)),
            )
        return exam

    def get(self, exam_id: str) -> Exam | None:
        """The exam with this id, or None."""
        row = (
            self._store.connection()
            .execute("SELECT * FROM exams WHERE exam_id=?", (exam_id,))
            .fetchone()
        )
        return None if row is None else _exam(row)

    def latest(self) -> Exam | None:
        """The exam started last, or None if there was none."""
        row = (
            self._store.connection()
            .execute("SELECT * FROM exams ORDER BY started_at DESC, rowid DESC LIMIT 1")
            .fetchone()
        )
        return None if row is None else _exam(row)

    def add_report(self, report: Report) -> bool:
        """Store an exam report; False if it came before (a redelivery)."""
        assert report.exam_id is not None, "only exam reports go here"
        now = datetime.now(UTC).isoformat()
        row = (report.exam_id, report.lesson_id, report.node_id, report.model_dump_json(), now)
        with self._store.transaction() as db:
            cursor = db.execute(
                "INSERT INTO exam_reports VALUES (?, ?, ?, ?, ?, 1) "
                "ON CONFLICT (exam_id, lesson_id, node_id) DO UPDATE SET "
                "deliveries = deliveries + 1 RETURNING deliveries",
                row,
            )
            (deliveries,) = cursor.fetchone()
            return bool(deliveries == 1)

    def reports(self, exam_id: str) -> list[Report]:
        """Every report of one exam, oldest first."""
        rows = self._store.connection().execute(
            "SELECT body FROM exam_reports WHERE exam_id=? ORDER BY received_at, rowid",
            (exam_id,),
        )
        return [Report.model_validate_json(r["body"]) for r in rows]

    def answered(self, exam_id: str, node_ids: Sequence[str]) -> tuple[int, int]:
        """(wanted, have): exam lessons x ``node_ids``, and how many of those pairs reported."""
        exam = self.get(exam_id)
        if exam is None or not node_ids:
            return 0, 0
        marks = ",".join("?" * len(node_ids))
        (have,) = (
            self._store.connection()
            .execute(
                f"SELECT COUNT(*) FROM exam_reports WHERE exam_id=? AND node_id IN ({marks})",
                (exam_id, *node_ids),
            )
            .fetchone()
        )
        return len(exam.lesson_ids) * len(node_ids), int(have)


def _exam(row: object) -> Exam:
    return Exam(row["exam_id"], row["started_at"], tuple(row["lesson_ids"].split()))  # type: ignore[index]


def eval_lessons(store: Store, lesson_ids: Sequence[str] | None = None) -> list[Lesson]:
    """The published eval lessons (of ``lesson_ids``, or of the whole store), in order."""
    ids = store.published_lesson_ids() if lesson_ids is None else list(lesson_ids)
    lessons = []
    for lesson_id in ids:
        stored = store.get_lesson(lesson_id)
        if stored is not None and stored[1] and stored[0].split == "eval":
            lessons.append(stored[0])
    return lessons


def publish_exam(
    store: Store,
    exams: ExamStore,
    publisher: Publisher,
    topology: Topology,
    lesson_ids: Sequence[str] | None = None,
) -> Exam:
    """Send every published eval lesson (of ``lesson_ids``) again as one exam; returns it.

    Raises ValueError when there is no published eval lesson to examine.
    """
    lessons = eval_lessons(store, lesson_ids)
    if not lessons:
        raise ValueError("no published eval lesson to examine")
    exam = exams.start([lesson.lesson_id for lesson in lessons])
    for lesson in lessons:
        sent = lesson.model_copy(
            update={"exam_id": exam.exam_id, "message_id": new_id(), "created_at": utc_now()}
        )
        publisher.publish(topology.lessons_exchange, "", encode(sent), sent.message_id)
    return exam
