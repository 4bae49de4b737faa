"""The pupil's memory of lessons it trained on, for retrieval guidance.

Only ``train`` lessons are ever written here (the node's flow guarantees it and a test proves it),
so an eval prompt can never be answered with its own master answer as an "example".

Retention (docs/decisions.md, section 25): the newest ``max_lessons`` train lessons
keep their goal and master answer on disk (oldest dropped first); the newest
``searchable_lessons`` of them are searched, and only their goal vectors are kept, on disk and in
RAM (a ring: adding the next one past the bound replaces the oldest in place).

Vectors have their own table: deleting the oldest rows of a table empties whole pages, which
SQLite reuses, whereas blanking a column of old rows leaves holes in their pages that it never
fills (measured: the file kept growing at the full 4.2 KB per lesson). ``lessons.goal_vec`` is
kept, empty, so a memory file stays readable by older code; a file from before is migrated.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pupil_node.journal import compact_if_mostly_free, transaction


@dataclass(frozen=True)
class Example:
    """A past lesson: the goal, the master's answer, and how close its goal is to the query."""

    lesson_id: str
    goal_text: str
    master_answer: str
    similarity: float


class LessonMemory:
    """SQLite-backed (lesson -> goal, master answer, goal embedding), searched by cosine."""

    def __init__(
        self, path: Path, dim: int, max_lessons: int = 100_000, searchable_lessons: int = 10_000
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self.max_lessons = max_lessons
        # Never more searchable lessons than stored ones: a vector without its text is useless.
        self.searchable_lessons = min(searchable_lessons, max_lessons)
        # Written by the lesson worker, read by the job worker too: the lock serialises both.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS lessons (lesson_id TEXT PRIMARY KEY, goal_text TEXT NOT "
            "NULL, master_answer TEXT NOT NULL, goal_vec BLOB NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS vectors "
            "(lesson_id TEXT PRIMARY KEY, goal_vec BLOB NOT NULL)"
        )
        # The searchable lessons: slot -> id and slot -> unit goal vector. Slots fill in order;
        # once all are taken, ``_oldest`` is the slot the next lesson overwrites.
        self._ids: list[str] = []
        self._slots: dict[str, int] = {}
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._oldest = 0
        self._load()

    def _load(self) -> None:
        # Apply the bounds first: a memory from before retention, or from larger settings.
        with transaction(self._db):
            migrated = self._db.execute(
                "INSERT OR IGNORE INTO vectors SELECT lesson_id, goal_vec FROM lessons "
                "WHERE length(goal_vec) > 0 ORDER BY rowid"
            ).rowcount
            if migrated:
                self._db.execute("UPDATE lessons SET goal_vec=X'' WHERE length(goal_vec) > 0")
            self._prune()
            self._db.execute(
                "DELETE FROM vectors WHERE rowid NOT IN "
                "(SELECT rowid FROM vectors ORDER BY rowid DESC LIMIT ?) "
                "OR lesson_id NOT IN (SELECT lesson_id FROM lessons)",
                (self.searchable_lessons,),
            )
        if migrated:
            self._db.execute("VACUUM")  # the blanked vectors left holes only a rewrite removes
        else:
            compact_if_mostly_free(self._db)
        rows = self._db.execute("SELECT lesson_id, goal_vec FROM vectors ORDER BY rowid").fetchall()
        self._ids = [r[0] for r in rows]
        self._slots = {lesson_id: slot for slot, lesson_id in enumerate(self._ids)}
        if rows:
            self._vectors = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])

    def _prune(self) -> None:
        # Rowids only grow (rows are inserted, never replaced, and only old ones are deleted):
        # "older than the newest max_lessons" is one range delete.
        newest = self._db.execute("SELECT MAX(rowid) FROM lessons").fetchone()[0]
        if newest is not None and newest > self.max_lessons:
            self._db.execute("DELETE FROM lessons WHERE rowid <= ?", (newest - self.max_lessons,))

    def __len__(self) -> int:
        """How many lessons retrieval searches (at most ``searchable_lessons``)."""
        return len(self._ids)

    def __contains__(self, lesson_id: object) -> bool:
        return lesson_id in self._slots

    def stored(self) -> int:
        """How many lessons' goal and master answer are on disk (at most ``max_lessons``)."""
        return int(self._db.execute("SELECT COUNT(*) FROM lessons").fetchone()[0])

    def recent(self, limit: int) -> list[tuple[str, str, str]]:
        """The newest ``limit`` stored lessons as (lesson_id, goal_text, master_answer), oldest
        first: what a LoRA study round trains on (pupil_node/study)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT lesson_id, goal_text, master_answer FROM lessons "
                "ORDER BY rowid DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [(str(r[0]), str(r[1]), str(r[2])) for r in reversed(rows)]

    def lesson_ids(self) -> list[str]:
        """Every searchable lesson id, oldest first."""
        return self._ids[self._oldest :] + self._ids[: self._oldest]

    def add(self, lesson_id: str, goal_text: str, master_answer: str, goal_vec: np.ndarray) -> None:
        """Remember a trained lesson (idempotent); forget the oldest past the bounds."""
        vec = _unit(np.asarray(goal_vec, dtype=np.float32).reshape(self.dim))
        with self._lock:
            if lesson_id in self._slots:
                return
            full = len(self._ids) >= self.searchable_lessons
            evicted = self._ids[self._oldest] if full else None
            with transaction(self._db):
                inserted = self._db.execute(
                    "INSERT OR IGNORE INTO lessons VALUES (?, ?, ?, X'')",
                    (lesson_id, goal_text, master_answer),
                ).rowcount
                if not inserted:  # stored, but no longer searchable: it stays that way
                    return
                self._db.execute("INSERT INTO vectors VALUES (?, ?)", (lesson_id, vec.tobytes()))
                if evicted is not None:
                    self._db.execute("DELETE FROM vectors WHERE lesson_id=?", (evicted,))
                self._prune()
            # Committed: now the in-RAM index follows.
            if evicted is None:
                slot = len(self._ids)
                if slot == len(self._vectors):
                    self._grow()
                self._ids.append(lesson_id)
            else:
                slot = self._oldest
                del self._slots[evicted]
                self._ids[slot] = lesson_id
                self._oldest = (slot + 1) % self.searchable_lessons
            self._slots[lesson_id] = slot
            self._vectors[slot] = vec

    def _grow(self) -> None:
        # Doubling (up to the bound): adding stays O(1) amortised instead of copying every row.
        rows = min(self.searchable_lessons, max(16, 2 * len(self._vectors)))
        grown = np.zeros((rows, self.dim), dtype=np.float32)
        grown[: len(self._ids)] = self._vectors[: len(self._ids)]
        self._vectors = grown

    def nearest(self, goal_vec: np.ndarray, n: int) -> list[Example]:
        """The ``n`` searchable lessons whose goals are most similar to ``goal_vec``."""
        query = _unit(np.asarray(goal_vec, dtype=np.float32).reshape(self.dim))
        with self._lock:
            if not self._ids:
                return []
            sims = self._vectors[: len(self._ids)] @ query
            order = np.argsort(-sims)[:n]
            out = []
            for i in order:
                goal, answer = self._db.execute(
                    "SELECT goal_text, master_answer FROM lessons WHERE lesson_id=?",
                    (self._ids[i],),
                ).fetchone()
                out.append(Example(self._ids[i], goal, answer, float(sims[i])))
            return out

    def close(self) -> None:
        """Close the database."""
        self._db.close()


def _unit(vec: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vec))
    return vec if norm == 0.0 else vec / norm
