"""The pupil's lesson flow on the embedded models: train once, never on eval, survive restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest

from pupil_node.node import PupilNode
from shared.backends import Embedder, TextGenerator, build_embedder, build_generator
from shared.config import PupilConfig
from shared.errors import DecodeError, EmbeddingMismatch
from shared.messages import Embedding, Lesson, Report, decode, encode

pytestmark = pytest.mark.models

MASTER_ANSWER = "Answer: Paris.\nReason: It is the capital of France.\nTip: Visit in spring."


@pytest.fixture(scope="module")
def models() -> tuple[TextGenerator, Embedder]:
    return build_generator("embedded", "gemma3-270m", n_threads=2), build_embedder(
        "embedded", "all-minilm-l6-v2"
    )


def make_node(tmp_path: Path, models: tuple[TextGenerator, Embedder]) -> PupilNode:
    config = PupilConfig.model_validate(
        {
            "state_dir": tmp_path / "state",
            "generator": {"max_tokens": 8, "temperature": 0.8},
            "adapter": {"steps_per_lesson": 3, "batch_size": 4},
        }
    )
    return PupilNode("a", config, *models)


def lesson_body(
    embedder: Embedder, lesson_id: str, split: Literal["train", "eval"], model: str | None = None
) -> bytes:
    lesson = Lesson(
        lesson_id=lesson_id,
        task="qa",
        prompt="What is the capital of France?",
        goal_text="What is the capital of France?",
        master_model="m",
        master_answer=MASTER_ANSWER,
        reference=Embedding.from_array(
            model or embedder.model_name, embedder.embed([MASTER_ANSWER])[0]
        ),
        split=split,
    )
    return encode(lesson)


def report_of(body: bytes) -> Report:
    report = decode(body, Report)
    return report


def test_a_redelivered_lesson_is_not_trained_twice(
    tmp_path: Path, models: tuple[TextGenerator, Embedder]
) -> None:
    node = make_node(tmp_path, models)
    body = lesson_body(models[1], "l1", "train")
    first = node.process(body)
    again = node.process(body)
    assert not first.replayed and again.replayed
    # Not confirmed yet: the same report goes out again; the master dedupes.
    assert again.report == first.report and not again.reported
    node.mark_reported("l1")
    # Confirmed: the redelivery is only acked, nothing goes on the wire again.
    assert node.process(body).reported
    assert node.trainer.version == 1
    report = report_of(first.report)
    assert report.trained and len(report.losses) == 3
    assert report.similarity_before is not None and -1 <= report.similarity_before <= 1


def test_a_crash_between_checkpoint_and_journal_does_not_train_twice(
    tmp_path: Path, models: tuple[TextGenerator, Embedder]
) -> None:
    node = make_node(tmp_path, models)
    body = lesson_body(models[1], "l1", "train")
    node.process(body)
    node.close()
    (tmp_path / "state" / "journal.sqlite3").unlink()  # as if we died before journalling
    restarted = make_node(tmp_path, models)
    assert restarted.trainer.version == 1  # the adapter came back from its checkpoint
    outcome = restarted.process(body)
    report = report_of(outcome.report)
    assert restarted.trainer.version == 1
    assert report.trained and report.losses == []


def test_eval_lessons_are_measured_but_never_learned(
    tmp_path: Path, models: tuple[TextGenerator, Embedder]
) -> None:
    node = make_node(tmp_path, models)
    report = report_of(node.process(lesson_body(models[1], "e1", "eval")).report)
    assert not report.trained and report.losses == []
    assert report.similarity_adapted is not None
    assert node.trainer.version == 0 and len(node.trainer.replay) == 0
    assert not (tmp_path / "state" / "adapter.safetensors").exists()


def test_a_lesson_from_another_embedding_space_is_refused(
    tmp_path: Path, models: tuple[TextGenerator, Embedder]
) -> None:
    node = make_node(tmp_path, models)
    with pytest.raises(EmbeddingMismatch, match="expects all-minilm-l6-v2") as info:
        node.process(lesson_body(models[1], "x1", "train", model="mxbai-embed-large"))
    assert isinstance(info.value, DecodeError)  # so the consumer dead-letters it
    assert node.trainer.version == 0


def test_eval_prompts_never_enter_replay_memory_or_training(
    tmp_path: Path, models: tuple[TextGenerator, Embedder]
) -> None:
    node = make_node(tmp_path, models)
    embedder = models[1]
    train_ids = ["t1", "t2", "t3"]
    for lesson_id in train_ids[:2]:
        node.process(lesson_body(embedder, lesson_id, "train"))
    # Retrieval and best-of-K run on the eval lesson, with the memory holding the train lessons.
    evaluated = report_of(node.process(lesson_body(embedder, "e1", "eval")).report)
    node.process(lesson_body(embedder, "t3", "train"))
    node.process(lesson_body(embedder, "e2", "eval"))

    assert set(evaluated.guided) == {"best_of_k", "retrieval"}
    assert set(evaluated.guided_answers) == {"best_of_k", "retrieval"}
    assert evaluated.similarity_guided == evaluated.guided["retrieval"]  # the node's method
    for trainer in (node.trainer, node.prompt_trainer):
        assert trainer.replay.export()[2] == train_ids
        assert trainer.version == 3
    assert node.memory.lesson_ids() == train_ids
    # The LoRA study rounds read the same memory: they never see an eval lesson either.
    assert [lesson.lesson_id for lesson in node.study_lessons(100)] == train_ids
    # ...and after a restart, from the files on disk.
    node.close()
    again = make_node(tmp_path, models)
    assert again.memory.lesson_ids() == train_ids
    assert again.prompt_trainer.replay.export()[2] == train_ids
