"""The pupil's memory of lessons it trained on, for retrieval guidance.

Only ``train`` lessons are ever written here (the node's flow guarantees it and a test proves it),
so an eval prompt can never be answered with its own master answer as an "example".
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Example:
    """A past lesson: the goal, the master's answer, and how close its goal is to the query."""

    lesson_id: str
    goal_text: str
    master_answer: str
    similarity: float


class LessonMemory:
    """SQLite-backed (lesson -> goal, master answer, goal embedding), searched by cosine."""

    def __init__(self, path: Path, dim: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        # Written by the lesson worker, read by the job worker too: the lock serialises both.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS lessons (lesson_id TEXT PRIMARY KEY, goal_text TEXT NOT "
            "NULL, master_answer TEXT NOT NULL, goal_vec BLOB NOT NULL)"
        )
        self._ids: list[str] = []
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._load()

    def _load(self) -> None:
        rows = self._db.execute("SELECT lesson_id, goal_vec FROM lessons ORDER BY rowid").fetchall()
        self._ids = [r[0] for r in rows]
        if rows:
            self._vectors = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, lesson_id: object) -> bool:
        return lesson_id in self._ids

    def lesson_ids(self) -> list[str]:
        """Every remembered lesson id, oldest first."""
        return list(self._ids)

    def add(self, lesson_id: str, goal_text: str, master_answer: str, goal_vec: np.ndarray) -> None:
        """Remember a trained lesson (idempotent)."""
        vec = _unit(np.asarray(goal_vec, dtype=np.float32).reshape(self.dim))
        with self._lock:
            if lesson_id in self._ids:
                return
            self._db.execute(
                "INSERT OR IGNORE INTO lessons VALUES (?, ?, ?, ?)",
                (lesson_id, goal_text, master_answer, vec.tobytes()),
            )
            self._ids.append(lesson_id)
            self._vectors = np.vstack([self._vectors, vec[None, :]])

    def nearest(self, goal_vec: np.ndarray, n: int) -> list[Example]:
        """The ``n`` remembered lessons whose goals are most similar to ``goal_vec``."""
        query = _unit(np.asarray(goal_vec, dtype=np.float32).reshape(self.dim))
        with self._lock:
            if not self._ids:
                return []
            sims = self._vectors @ query
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
