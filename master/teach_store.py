"""Lesson requests in the master's SQLite store: taught prompts and jobs that become lessons.

A request is stored (and its message acked) before the master answers it, so a master that
stops with requests pending answers them after its restart. A request moves once:

    pending --(lesson published, or found published already)--> done
    pending --(refused: eval text as a train lesson / the model failed)--> done

``outcome`` says which (a :data:`~shared.messages.TeachOutcome`). Beside them, ``eval_texts``
holds every eval prompt's goal text (normalised, hashed): nothing whose text is there becomes a
train lesson, so no eval prompt's text is ever trained on under another id (docs/jobs.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from master.prompts import PromptItem
from master.store import Store
from shared.messages import TeachOutcome

Source = Literal["teach", "job"]

TEACH_SCHEMA = """
CREATE TABLE IF NOT EXISTS lesson_requests (
    request_id TEXT PRIMARY KEY,     -- the Teach message id, or job:<job id>
    source TEXT NOT NULL,            -- teach (distill-swarm teach) or job (a job's master answer)
    kind TEXT NOT NULL,              -- the job kind, or the prompt's task
    item TEXT NOT NULL,              -- the PromptItem, JSON
    answer TEXT,                     -- the master's answer when it has one already (a job's)
    reply_to TEXT,
    correlation_id TEXT,
    received_at TEXT NOT NULL,
    state TEXT NOT NULL,             -- pending, done
    outcome TEXT,                    -- published, already_published, refused, failed
    lesson_id TEXT,
    detail TEXT,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS eval_texts (
    text_sha256 TEXT PRIMARY KEY     -- sha256 of an eval prompt's normalised goal text
);
"""


@dataclass(frozen=True)
class LessonRequest:
    """One stored request."""

    request_id: str
    source: Source
    kind: str
    item: PromptItem
    answer: str | None
    reply_to: str | None
    correlation_id: str | None
    state: str
    outcome: TeachOutcome | None
    lesson_id: str | None
    detail: str | None


def normalise(text: str) -> str:
    """``text`` as eval texts are compared: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def _text_key(text: str) -> str:
    return hashlib.sha256(normalise(text).encode()).hexdigest()


class TeachStore:
    """The lesson-request tables of a master :class:`Store` (same file, per-thread connections)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        store.connection().executescript(TEACH_SCHEMA)

    def add(
        self,
        request_id: str,
        source: Source,
        item: PromptItem,
        answer: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> bool:
        """Store a pending request; False if its id is known already (a redelivery)."""
        with self._store.transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO lesson_requests (request_id, source, kind, item, answer, "
                "reply_to, correlation_id, received_at, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
                (
                    request_id,
                    source,
                    item.task,
                    item.model_dump_json(),
                    answer,
                    reply_to,
                    correlation_id,
                    _now(),
                ),
            )
            return cursor.rowcount == 1

    def finish(
        self, request_id: str, outcome: TeachOutcome, lesson_id: str | None, detail: str = ""
    ) -> None:
        """Record what became of a pending request."""
        with self._store.transaction() as db:
            db.execute(
                "UPDATE lesson_requests SET state='done', outcome=?, lesson_id=?, detail=?, "
                "finished_at=? WHERE request_id=? AND state='pending'",
                (outcome, lesson_id, detail, _now(), request_id),
            )

    def get(self, request_id: str) -> LessonRequest | None:
        """One request, or None."""
        rows = self._select("WHERE request_id=?", (request_id,))
        return rows[0] if rows else None

    def pending(self, limit: int = 1000) -> list[LessonRequest]:
        """Requests not answered yet, oldest first."""
        return self._select("WHERE state='pending' ORDER BY rowid LIMIT ?", (limit,))

    def counts(self, source: Source) -> dict[tuple[str, str], int]:
        """(kind, outcome or 'pending') -> how many requests of ``source``."""
        rows = (
            self._store.connection()
            .execute(
                "SELECT kind, COALESCE(outcome, 'pending') AS outcome, COUNT(*) AS n "
                "FROM lesson_requests WHERE source=? GROUP BY kind, outcome ORDER BY kind",
                (source,),
            )
            .fetchall()
        )
        return {(r["kind"], r["outcome"]): int(r["n"]) for r in rows}

    def next_seq(self) -> int:
        """A lesson sequence number after every stored lesson's (taught lessons come last)."""
        row = self._store.connection().execute("SELECT MAX(seq) FROM lessons").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    # -- eval texts --------------------------------------------------------------------------

    def add_eval_texts(self, texts: list[str]) -> None:
        """Remember eval prompts' goal texts (idempotent)."""
        if not texts:
            return
        with self._store.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO eval_texts VALUES (?)", [(_text_key(t),) for t in texts]
            )

    def add_stored_eval_lessons(self) -> None:
        """Remember the goal text of every eval lesson in the store (a store from before)."""
        rows = self._store.connection().execute(
            "SELECT json_extract(body, '$.goal_text') AS goal FROM lessons WHERE split='eval'"
        )
        self.add_eval_texts([str(r["goal"]) for r in rows if r["goal"] is not None])

    def is_eval_text(self, *texts: str) -> bool:
        """True if any of ``texts`` is, once normalised, the goal text of an eval prompt."""
        db = self._store.connection()
        return any(
            db.execute("SELECT 1 FROM eval_texts WHERE text_sha256=?", (_text_key(t),)).fetchone()
            for t in texts
        )

    def _select(self, tail: str, params: tuple[object, ...]) -> list[LessonRequest]:
        rows = (
            self._store.connection()
            .execute("SELECT * FROM lesson_requests " + tail, params)
            .fetchall()
        )
        return [
            LessonRequest(
                request_id=r["request_id"],
                source=r["source"],
                kind=r["kind"],
                item=PromptItem.model_validate_json(r["item"]),
                answer=r["answer"],
                reply_to=r["reply_to"],
                correlation_id=r["correlation_id"],
                state=r["state"],
                outcome=r["outcome"],
                lesson_id=r["lesson_id"],
                detail=r["detail"],
            )
            for r in rows
        ]


def _now() -> str:
    return datetime.now(UTC).isoformat()
