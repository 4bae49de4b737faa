"""Guided answers on the embedded models: best-of-K picks by the prediction, retrieval shows
the master's answers to the nearest trained lessons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pupil_node.guidance import Goal, Guide
from pupil_node.memory import LessonMemory
from shared.backends import (
    Embedder,
    GenerationParams,
    TextGenerator,
    build_embedder,
    build_generator,
)
from shared.config import GeneratorConfig, GuidanceConfig

pytestmark = pytest.mark.models


class Recording:
    """A generator wrapper that remembers every prompt and answer."""

    def __init__(self, inner: TextGenerator) -> None:
        self.inner = inner
        self.model_name = inner.model_name
        self.calls: list[tuple[str, str]] = []

    def generate(self, prompt: str, params: GenerationParams, system: str | None = None) -> str:
        text = self.inner.generate(prompt, params, system)
        self.calls.append((prompt, text))
        return text


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return build_embedder("embedded", "all-minilm-l6-v2")


@pytest.fixture(scope="module")
def generator() -> TextGenerator:
    return build_generator("embedded", "gemma3-270m", n_threads=2)


def make_guide(
    tmp_path: Path, generator: TextGenerator, embedder: Embedder, target: np.ndarray
) -> tuple[Guide, Recording, LessonMemory]:
    recording = Recording(generator)
    memory = LessonMemory(tmp_path / "memory.sqlite3", embedder.dim)
    guide = Guide(
        GuidanceConfig(k=3, examples=2),
        GeneratorConfig(max_tokens=12, temperature=0.9),
        recording,
        embedder,
        GenerationParams(temperature=0.9, max_tokens=12, seed=5),
        memory,
        lambda _goal_vec: target,
    )
    return guide, recording, memory


def test_best_of_k_keeps_the_candidate_closest_to_the_prediction(
    tmp_path: Path, generator: TextGenerator, embedder: Embedder
) -> None:
    target = embedder.embed(["Paris is the capital of France."])[0]
    guide, recording, _ = make_guide(tmp_path, generator, embedder, target)
    goal = Goal("What is the capital of France?")
    answer = guide.answer("best_of_k", goal, embedder.embed([goal.goal_text])[0])
    candidates = [text for _, text in recording.calls]
    assert len(candidates) == 3
    scores = embedder.embed([c or " " for c in candidates]) @ target
    assert answer.text == candidates[int(np.argmax(scores))]


def test_retrieval_shows_the_nearest_trained_lessons(
    tmp_path: Path, generator: TextGenerator, embedder: Embedder
) -> None:
    guide, recording, memory = make_guide(tmp_path, generator, embedder, np.zeros(embedder.dim))
    lessons = {
        "fr": ("Translate into French: 'Good night.'", "Answer: Bonne nuit."),
        "es": ("Translate into Spanish: 'Good night.'", "Answer: Buenas noches."),
        "score": ("Score 1-10 the answer 'Rome is in Spain.'", "Answer: 1. Rome is in Italy."),
    }
    for lesson_id, (goal_text, master_answer) in lessons.items():
        memory.add(lesson_id, goal_text, master_answer, embedder.embed([goal_text])[0])
    goal = Goal("Translate into French: 'Good morning.'")
    answer = guide.answer("retrieval", goal, embedder.embed([goal.goal_text])[0])
    assert set(answer.examples) == {"fr", "es"}
    (prompt, text) = recording.calls[-1]
    assert "Answer: Bonne nuit." in prompt and "Buenas noches" in prompt
    assert "Rome" not in prompt
    assert prompt.rstrip().endswith("Translate into French: 'Good morning.'")
    assert answer.text == text
