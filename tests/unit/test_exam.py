"""The exam: stored apart from the online reports, reported apart by `eval`, never mixed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from master.evaluation import load
from master.exam import ExamStore, eval_lessons
from master.store import Store
from shared.errors import DecodeError
from shared.messages import Lesson, Report, decode, encode
from tests.unit.test_evaluation import eval_report, lesson, run_cli, train_report


def exam_report(lesson_id: str, node: str, exam_id: str, lora: float) -> Report:
    report = eval_report(lesson_id, node, 9, 0.4, 0.3, {"lora": lora})
    return report.model_copy(update={"exam_id": exam_id, "lora_version": 2})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    db = Store(tmp_path / "master.sqlite3")
    for n, split in enumerate(["train", "eval", "eval", "train"]):
        db.save_lesson(lesson(f"l{n}", split), f"p{n}", n)  # type: ignore[arg-type]
        db.mark_published(f"l{n}")
    db.add_report(train_report("l0", "a", 1, [0.5, 0.4]))
    db.add_report(eval_report("l1", "a", 1, 0.4, 0.3, {"lora": 0.45}))
    db.add_report(eval_report("l2", "a", 1, 0.5, 0.3, {"lora": 0.55}))
    return db


def test_an_exam_sends_the_published_eval_lessons_only(store: Store) -> None:
    assert [x.lesson_id for x in eval_lessons(store)] == ["l1", "l2"]
    exam = ExamStore(store).start(["l1", "l2"])
    assert ExamStore(store).latest() == exam


def test_exam_reports_never_overwrite_the_online_ones(store: Store) -> None:
    exams = ExamStore(store)
    exam = exams.start(["l1", "l2"])
    assert exams.add_report(exam_report("l1", "a", exam.exam_id, 0.9))
    assert not exams.add_report(exam_report("l1", "a", exam.exam_id, 0.9))  # a redelivery
    assert exams.add_report(exam_report("l2", "a", exam.exam_id, 0.8))
    assert exams.answered(exam.exam_id, ["a"]) == (2, 2)
    assert exams.answered(exam.exam_id, ["a", "b"]) == (4, 2)

    online = {s.method: s.similarity for s in load(store).samples if s.lesson_id == "l1"}
    examined = load(store, exams.reports(exam.exam_id))
    final = {s.method: s.similarity for s in examined.samples if s.lesson_id == "l1"}
    assert online["lora"] == pytest.approx(0.45) and final["lora"] == pytest.approx(0.9)
    assert len(examined.samples) == 2 * 3  # plain, adapter-vector, lora for each lesson
    assert examined.losses == load(store).losses  # training curves are the run's, exam or not


def test_an_exam_lesson_is_an_eval_lesson_with_its_own_work_id() -> None:
    raw = json.loads(encode(lesson("l1", "eval")))
    raw["exam_id"] = "exam-1"
    examined = decode(json.dumps(raw).encode(), Lesson)
    assert isinstance(examined, Lesson)
    assert examined.work_id == "l1@exam-1" and lesson("l1", "eval").work_id == "l1"
    raw = json.loads(encode(lesson("l0", "train")))
    raw["exam_id"] = "exam-1"
    with pytest.raises(DecodeError, match="exam lesson must be an eval lesson"):
        decode(json.dumps(raw).encode(), Lesson)


def test_eval_prints_the_online_and_the_exam_tables_apart(store: Store) -> None:
    exams = ExamStore(store)
    exam = exams.start(["l1", "l2"])
    for lesson_id, sim in (("l1", 0.9), ("l2", 0.8)):
        exams.add_report(exam_report(lesson_id, "a", exam.exam_id, sim))
    result = run_cli("eval", "--store", str(store.path), "--bootstrap", "200")
    assert result.returncode == 0, result.stderr
    online, _, final = result.stdout.partition("^ online")
    assert "0.5000" in online and f"exam {exam.exam_id}" in final
    assert "0.8500" in final  # the exam's lora mean, in the exam's table only
    assert "0.8500" not in online
    as_json = json.loads(
        run_cli("eval", "--store", str(store.path), "--json", "--bootstrap", "200").stdout
    )
    assert as_json["phase"] == "online" and as_json["exam"]["exam_id"] == exam.exam_id
    assert (store.path.parent / "eval" / "exam.json").is_file()
    skipped = run_cli("eval", "--store", str(store.path), "--exam", "none", "--bootstrap", "200")
    assert "exam" not in skipped.stdout.replace("exam.", "")
