"""Telling a full state disk from a bug, on a real tmpfs (pupil_node/disk.py, checkpoints)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pupil_node.disk import StateWriteFailed, is_storage_failure, state_write
from shared.adapter import AdapterTrainer
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.errors import CheckpointError, DependencyDown
from tests.support.tmpfs import fill, require_tmpfs, small_tmpfs

DIM = 8


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    require_tmpfs()
    with small_tmpfs(tmp_path / "disk", "256k") as path:
        yield path


def trained(*lesson_ids: str) -> AdapterTrainer:
    trainer = AdapterTrainer(DIM, hidden_dim=4)
    rng = np.random.default_rng(0)
    for lesson_id in lesson_ids:
        x, y = rng.normal(size=(2, DIM)).astype(np.float32)
        trainer.learn(lesson_id, x, y, steps=1, batch_size=2)
    return trainer


def test_a_checkpoint_the_disk_refuses_is_a_storage_failure(disk: Path) -> None:
    path = disk / "adapter.safetensors"
    save_checkpoint(trained("a"), path)
    fill(disk)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(trained("a", "b"), path)
    assert is_storage_failure(caught.value)
    assert load_checkpoint(path).version == 1  # the file on disk is the last good one


def test_sqlite_on_a_full_disk_is_a_storage_failure_even_behind_a_failed_rollback(
    disk: Path,
) -> None:
    db = sqlite3.connect(disk / "j.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x BLOB)")
    fill(disk)
    # SQLite rolls the transaction back itself on SQLITE_FULL, so an explicit ROLLBACK fails
    # with a plain "no transaction is active" error that hides the real one.
    with pytest.raises(sqlite3.OperationalError, match="no transaction") as caught:
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?)", (b"x" * 8000,))
            db.execute("COMMIT")
        except sqlite3.Error:
            db.execute("ROLLBACK")
    assert is_storage_failure(caught.value)
    with pytest.raises(StateWriteFailed) as wrapped, state_write("journal lesson x"):
        db.execute("INSERT INTO t VALUES (?)", (b"x" * 8000,))
    assert isinstance(wrapped.value, DependencyDown)  # an outage: the consumer waits it out
    db.close()


def test_other_errors_are_not_storage_failures() -> None:
    assert not is_storage_failure(ValueError("a bug"))
    assert not is_storage_failure(sqlite3.OperationalError("no such table: t"))
    with pytest.raises(KeyError), state_write("journal lesson x"):
        raise KeyError("a bug stays a bug")


def test_a_checkpoint_carries_the_lessons_its_node_had_not_journalled(tmp_path: Path) -> None:
    trainer = trained("a", "b", "c")
    trainer.forget_pending(["a"])
    path = tmp_path / "adapter.safetensors"
    save_checkpoint(trainer, path)
    restored = load_checkpoint(path)
    assert restored.pending_lesson_ids == ["b", "c"]
    assert restored.holds("b") and not restored.holds("a")
