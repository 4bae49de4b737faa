"""The master's store: idempotent writes, the embedding cache, and honest status figures."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from master.store import Store
from shared.messages import Embedding, Lesson, NodeInfo, Report


def lesson(lesson_id: str, split: Literal["train", "eval"] = "train") -> Lesson:
    return Lesson(
        lesson_id=lesson_id,
        task="t",
        prompt="p",
        goal_text="g",
        master_model="m",
        master_answer="a",
        reference=Embedding(model="e", dim=2, values=[1.0, 0.0]),
        split=split,
    )


def report(
    lesson_id: str, node: str, split: Literal["train", "eval"], before: float, adapted: float
) -> Report:
    trained = split == "train"
    return Report(
        lesson_id=lesson_id,
        node_id=node,
        split=split,
        pupil_model="p",
        similarity_before=before,
        similarity_adapted=adapted,
        trained=trained,
        losses=[0.5, 0.25] if trained else [],
        adapter_version=1 if trained else 0,
    )


def info(node: str) -> NodeInfo:
    return NodeInfo(
        node_id=node, software_version="1", pupil_model="p", embedding_model="e", embedding_dim=2
    )


def test_a_redelivered_report_is_counted_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    first = report("l1", "a", "eval", 0.5, 0.6)
    assert store.add_report(first) is True
    assert store.add_report(first) is False
    # The same lesson from another node is a different report.
    assert store.add_report(report("l1", "b", "eval", 0.4, 0.5)) is True
    assert store.report_count() == 2
    assert store.reported_pairs(["l1"], ["a"]) == 1


def test_lessons_are_saved_once_and_remember_publication(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    original = lesson("l1")
    store.save_lesson(original, "p1", 0)
    store.save_lesson(lesson("l1"), "p1", 0)  # a second save keeps the first
    stored = store.get_lesson("l1")
    assert stored is not None and stored[1] is False
    store.mark_published("l1")
    assert store.get_lesson("l1") == (original, True)
    assert store.published_lesson_ids() == ["l1"]


def test_embedding_cache_is_keyed_by_model_and_text(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    vector = np.arange(4, dtype=np.float32)
    store.cache_embedding("m1", "hello", vector)
    np.testing.assert_array_equal(store.cached_embedding("m1", "hello"), vector)
    assert store.cached_embedding("m2", "hello") is None
    assert store.cached_embedding("m1", "hello!") is None


def test_status_means_use_eval_lessons_only(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    store.touch_node(info("a"), "online")
    store.add_report(report("t1", "a", "train", 0.1, 0.99))  # training fit must not count
    store.add_report(report("e1", "a", "eval", 0.5, 0.7))
    store.add_report(report("e2", "a", "eval", 0.7, 0.9))
    (row,) = Store(path).node_status()  # a second reader sees the writer's data
    assert row.lessons_done == 3
    assert row.eval_lessons == 2
    assert row.mean_before == 0.6
    assert row.mean_adapted is not None and abs(row.mean_adapted - 0.8) < 1e-9
    assert row.latest_loss == 0.25


def test_a_write_batch_is_invisible_until_committed_and_each_message_stays_atomic(
    tmp_path: Path,
) -> None:
    writer, reader = Store(tmp_path / "m.sqlite3"), Store(tmp_path / "m.sqlite3")
    batch = writer.write_batch()
    with batch.message():
        assert writer.add_report(report("l1", "a", "eval", 0.5, 0.6))
    with batch.message():
        assert writer.add_report(report("l2", "a", "eval", 0.5, 0.6))
    with batch.message():  # a redelivery inside the batch, seen as one
        assert not writer.add_report(report("l1", "a", "eval", 0.5, 0.6))
    with pytest.raises(sqlite3.IntegrityError), batch.message():
        writer.add_report(report("l9", "a", "eval", 0.5, 0.6))
        writer.add_report(report("l3", "a", "eval", 0.5, 0.6).model_copy(update={"split": None}))
    assert reader.report_count() == 0  # another connection sees nothing before the commit
    batch.commit()
    assert reader.report_count() == 2  # the failed message rolled back alone, l9 with it
    assert reader.delivery_counts()[("l1", "a")] == 2
    batch.commit()  # nothing pending: a no-op
    assert writer.add_report(report("l4", "a", "eval", 0.5, 0.6)) and reader.report_count() == 3


def test_a_batch_whose_only_message_failed_frees_the_write_lock_at_once(tmp_path: Path) -> None:
    writer, other = Store(tmp_path / "m.sqlite3"), Store(tmp_path / "m.sqlite3")
    with pytest.raises(ValueError), writer.write_batch().message():
        writer.add_report(report("l1", "a", "eval", 0.5, 0.6))
        raise ValueError("refused after a write")
    assert other.add_report(report("l2", "a", "eval", 0.5, 0.6))  # no wait for a lock
    assert other.report_count() == 1
