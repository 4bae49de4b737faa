"""The pupil's lesson memory stays within its bounds: texts kept, searchable vectors in a ring."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from pupil_node.memory import LessonMemory

DIM = 8


def vec(n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(size=DIM).astype(np.float32)


def fill(memory: LessonMemory, count: int) -> None:
    for n in range(count):
        memory.add(f"l{n:02d}", f"goal {n}", f"answer {n}", vec(n))


def test_the_memory_keeps_the_newest_texts_and_searches_the_newest_vectors(
    tmp_path: Path,
) -> None:
    memory = LessonMemory(tmp_path / "memory.sqlite3", DIM, max_lessons=8, searchable_lessons=4)
    fill(memory, 20)
    assert memory.stored() == 8
    assert memory.lesson_ids() == ["l16", "l17", "l18", "l19"]
    # Each searchable lesson is found by its own goal vector, with its own texts.
    for n in range(16, 20):
        (best,) = memory.nearest(vec(n), 1)
        assert (best.lesson_id, best.goal_text, best.master_answer) == (
            f"l{n}",
            f"goal {n}",
            f"answer {n}",
        )
        assert best.similarity > 0.999
    assert all(e.lesson_id >= "l16" for e in memory.nearest(vec(3), 4))
    memory.add("l19", "goal 19", "answer 19", vec(19))  # idempotent
    assert len(memory) == 4
    memory.close()
    db = sqlite3.connect(tmp_path / "memory.sqlite3")
    texts = db.execute("SELECT lesson_id FROM lessons ORDER BY rowid").fetchall()
    vectors = db.execute("SELECT lesson_id FROM vectors ORDER BY rowid").fetchall()
    db.close()
    assert texts == [(f"l{n}",) for n in range(12, 20)]
    assert vectors == [(f"l{n}",) for n in range(16, 20)]
    # Reopened: the same searchable set, oldest first.
    again = LessonMemory(tmp_path / "memory.sqlite3", DIM, max_lessons=8, searchable_lessons=4)
    assert again.lesson_ids() == ["l16", "l17", "l18", "l19"]
    again.close()


def test_lowering_the_bounds_applies_them_at_open(tmp_path: Path) -> None:
    memory = LessonMemory(tmp_path / "memory.sqlite3", DIM)
    fill(memory, 12)
    assert (memory.stored(), len(memory)) == (12, 12)
    memory.close()
    memory = LessonMemory(tmp_path / "memory.sqlite3", DIM, max_lessons=5, searchable_lessons=2)
    assert (memory.stored(), memory.lesson_ids()) == (5, ["l10", "l11"])
    memory.add("l12", "goal 12", "answer 12", vec(12))
    assert (memory.stored(), memory.lesson_ids()) == (5, ["l11", "l12"])
    memory.close()


def test_the_file_stops_growing_once_the_bounds_are_reached(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    dim = 384  # vectors dominate a row, as on a node
    memory = LessonMemory(path, dim, max_lessons=300, searchable_lessons=100)
    rng = np.random.default_rng(0)
    sizes = []
    for n in range(1200):
        memory.add(f"lesson-{n:05d}", "goal " * 40, "answer " * 60, rng.normal(size=dim))
        if n + 1 in (600, 1200):
            memory._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            sizes.append(path.stat().st_size)
    memory.close()
    # Freed space is reused: twice the lessons past the bounds, the same file.
    assert sizes[1] <= sizes[0] * 1.05, sizes


def test_a_memory_from_before_retention_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    db = sqlite3.connect(path)  # the layout older releases wrote: vectors in the lessons table
    db.execute(
        "CREATE TABLE lessons (lesson_id TEXT PRIMARY KEY, goal_text TEXT NOT NULL, "
        "master_answer TEXT NOT NULL, goal_vec BLOB NOT NULL)"
    )
    for n in range(6):
        unit = vec(n) / np.linalg.norm(vec(n))
        db.execute(
            "INSERT INTO lessons VALUES (?, ?, ?, ?)",
            (f"l{n:02d}", f"goal {n}", f"answer {n}", unit.astype(np.float32).tobytes()),
        )
    db.commit()
    db.close()
    memory = LessonMemory(path, DIM, max_lessons=5, searchable_lessons=3)
    assert (memory.stored(), memory.lesson_ids()) == (5, ["l03", "l04", "l05"])
    assert memory.nearest(vec(4), 1)[0].lesson_id == "l04"
    memory.close()
