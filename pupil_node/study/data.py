"""Training examples from lessons: the pupil's own prompt, then the master's answer.

The prompt is the exact text the pupil's runtime completes when it answers a lesson plainly (no
worked examples): the pupil template rendered for the goal, laid out by
``shared.backends.embedded.transcript`` (optional system turn, the prompt, then ``"Answer:"``),
tokenised with the model's BOS in front as llama.cpp's ``create_completion`` does. The target is
``" " + master_answer`` followed by the model's end-of-sequence token: the model continues
``"Answer:"`` with a space-led word, and learns to stop where the master stopped.

Loss is taken on the answer tokens only: prompt positions carry the label ``IGNORE`` (-100).
Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shared.backends.embedded import transcript
from shared.backends.templates import render_prompt

IGNORE = -100
TRAIN = "train"


class LessonLike(Protocol):
    """What a study round needs of a lesson (``shared.messages.Lesson`` has all of it)."""

    @property
    def lesson_id(self) -> str: ...
    @property
    def goal_text(self) -> str: ...
    @property
    def preferences(self) -> Sequence[str]: ...
    @property
    def instructions(self) -> Sequence[str]: ...
    @property
    def master_answer(self) -> str: ...
    @property
    def split(self) -> str: ...


@dataclass(frozen=True)
class StudyLesson:
    """A lesson reduced to what study needs (for benchmarks, files and tests)."""

    lesson_id: str
    goal_text: str
    master_answer: str
    split: str = TRAIN
    preferences: tuple[str, ...] = ()
    instructions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Example:
    """One tokenised lesson: ``labels`` is ``IGNORE`` on prompt positions."""

    lesson_id: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def answer_tokens(self) -> int:
        """How many positions carry loss."""
        return sum(1 for label in self.labels if label != IGNORE)

    @property
    def prompt_len(self) -> int:
        """How many leading tokens are prompt."""
        return len(self.labels) - self.answer_tokens


def pupil_prompt(lesson: LessonLike, template: str = "pupil.j2", system: str | None = None) -> str:
    """The text the embedded runtime completes when the pupil answers ``lesson`` plainly."""
    rendered = render_prompt(template, lesson.goal_text, lesson.preferences, lesson.instructions)
    messages = [{"role": "user", "content": rendered}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return transcript(messages)


def train_lessons(lessons: Iterable[LessonLike]) -> list[LessonLike]:
    """The train lessons, by id, once each (eval lessons never reach study)."""
    by_id: dict[str, LessonLike] = {}
    for lesson in lessons:
        if lesson.split == TRAIN:
            by_id.setdefault(lesson.lesson_id, lesson)
    return [by_id[k] for k in sorted(by_id)]


def _unit_hash(lesson_id: str, salt: str = "study-validation") -> float:
    digest = hashlib.sha256(f"{salt}:{lesson_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_validation(
    lessons: Sequence[LessonLike], fraction: float
) -> tuple[list[LessonLike], list[LessonLike]]:
    """(study, validation) slices of train lessons, decided by a hash of each lesson id.

    A lesson's side never depends on which other lessons exist, so a lesson a past round trained
    on never becomes validation later. With at least two lessons and none hashing under
    ``fraction``, the lowest-hashing one validates (it can only move to the study side later).
    """
    lessons = train_lessons(lessons)
    validation = [lesson for lesson in lessons if _unit_hash(lesson.lesson_id) < fraction]
    if not validation and fraction > 0 and len(lessons) >= 2:
        validation = [min(lessons, key=lambda lesson: _unit_hash(lesson.lesson_id))]
    chosen = {lesson.lesson_id for lesson in validation}
    return [lesson for lesson in lessons if lesson.lesson_id not in chosen], validation


def build_example(
    lesson: LessonLike,
    tokenizer: Any,
    *,
    max_len: int,
    template: str = "pupil.j2",
    system: str | None = None,
    min_answer_tokens: int = 4,
) -> Example | None:
    """Tokenise one lesson, or None when its prompt leaves no room for the answer.

    Too long an example loses the end of its answer (and so its end-of-sequence token); the
    prompt is never cut, since a cut prompt is not one the runtime would ever see.
    """
    prompt_ids = list(tokenizer(pupil_prompt(lesson, template, system))["input_ids"])
    if tokenizer.bos_token_id is not None and prompt_ids[:1] != [tokenizer.bos_token_id]:
        prompt_ids.insert(0, tokenizer.bos_token_id)
    answer_ids = list(
        tokenizer(" " + lesson.master_answer.strip(), add_special_tokens=False)["input_ids"]
    )
    answer_ids.append(tokenizer.eos_token_id)
    room = max_len - len(prompt_ids)
    if room < min(min_answer_tokens, len(answer_ids)):
        return None
    answer_ids = answer_ids[:room]
    return Example(
        lesson_id=lesson.lesson_id,
        input_ids=tuple(prompt_ids + answer_ids),
        labels=tuple([IGNORE] * len(prompt_ids) + answer_ids),
    )


def build_examples(
    lessons: Iterable[LessonLike],
    tokenizer: Any,
    *,
    max_len: int,
    template: str = "pupil.j2",
    system: str | None = None,
) -> list[Example]:
    """``build_example`` over train lessons, skipping those that do not fit."""
    examples = []
    for lesson in train_lessons(lessons):
        example = build_example(
            lesson, tokenizer, max_len=max_len, template=template, system=system
        )
        if example is not None:
            examples.append(example)
    return examples


def batches(examples: Sequence[Example], batch_size: int, seed: int) -> list[list[Example]]:
    """One epoch of batches in a shuffled order that depends only on ``seed`` and the ids."""
    order = sorted(examples, key=lambda e: e.lesson_id)
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(
    batch: Sequence[Example], pad_id: int
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Right-padded ``(input_ids, attention_mask, labels)`` lists for one batch."""
    width = max(len(e.input_ids) for e in batch)
    ids, mask, labels = [], [], []
    for e in batch:
        pad = width - len(e.input_ids)
        ids.append([*e.input_ids, *([pad_id] * pad)])
        mask.append([1] * len(e.input_ids) + [0] * pad)
        labels.append([*e.labels, *([IGNORE] * pad)])
    return ids, mask, labels
