"""The study scheduler's promise to the exam: it is answered by the node's *final* model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pupil_node.study.round import StudySettings
from pupil_node.study.scheduler import StudyScheduler
from pupil_node.study.versions import AdapterStore
from shared.config import StudyConfig


def scheduler(tmp_path: Path) -> StudyScheduler:
    return StudyScheduler(
        StudyConfig(every_lessons=2),
        AdapterStore(tmp_path / "lora"),
        lambda _n: [],
        StudySettings(),
        lambda _version: None,
    )


def test_an_exam_waits_for_the_round_that_the_last_lessons_make_due(tmp_path: Path) -> None:
    study = scheduler(tmp_path)
    events: list[str] = []

    def rounds() -> None:
        # Round 1 runs; the curriculum's last lessons arrive meanwhile, so round 2 is due the
        # moment round 1 ends, and starts a little later (the thread wakes up).
        study._not_studying.clear()
        study.lesson_done(trained=True)
        study.lesson_done(trained=True)
        time.sleep(0.3)
        events.append("round 1 done")
        study._not_studying.set()
        time.sleep(0.3)
        study._not_studying.clear()
        events.append("round 2 started")
        with study._lock:
            study._new_train_lessons = 0
        time.sleep(0.3)
        events.append("round 2 done")
        study._not_studying.set()

    worker = threading.Thread(target=rounds)
    worker.start()
    time.sleep(0.1)
    assert study.wait_for_round(timeout_s=30)
    events.append("exam answered")
    worker.join()
    assert events == ["round 1 done", "round 2 started", "round 2 done", "exam answered"]


def test_an_exam_waits_for_nothing_when_no_round_runs_or_is_due(tmp_path: Path) -> None:
    study = scheduler(tmp_path)
    study.lesson_done(trained=True)  # one new lesson: not due (every_lessons=2)
    assert study.wait_for_round(timeout_s=0.01)
