"""Turning prompts into lessons: render, answer with the master model, embed, store.

Lesson ids are deterministic (prompt id + master model + rendered prompt), so a restarted master
finds its earlier work in the store and neither answers nor publishes a lesson twice.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace

import numpy as np

from master.prompts import PromptItem, assign_split
from master.store import Store
from shared.backends import Embedder, GenerationParams, TextGenerator
from shared.backends.templates import render_prompt
from shared.config import MasterConfig
from shared.messages import Embedding, Lesson, Split
from shared.similarity import cosine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Made:
    """A lesson made and not yet stored: its ceiling, and embeddings the cache lacks."""

    lesson: Lesson
    ceiling: float | None
    new_vectors: dict[str, np.ndarray]


def lesson_id_for(item: PromptItem, master_model: str, prompt: str) -> str:
    """A stable id: the same prompt answered by the same model is the same lesson."""
    key = f"{item.id}\x00{master_model}\x00{prompt}".encode()
    return hashlib.sha256(key).hexdigest()[:32]


class Teacher:
    """Makes lessons from prompt items with the master's generator and embedder."""

    def __init__(
        self, config: MasterConfig, generator: TextGenerator, embedder: Embedder, store: Store
    ) -> None:
        self._config = config
        self._generator = generator
        self._embedder = embedder
        self._store = store
        gen = config.generator
        self._params = GenerationParams(
            temperature=gen.temperature, top_p=gen.top_p, max_tokens=gen.max_tokens, seed=gen.seed
        )
        store.set_meta("master_model", generator.model_name)
        store.set_meta("master_decoding", self.decoding())

    def decoding(self) -> str:
        """The master's decoding settings, which the ceiling figure depends on."""
        p = self._params
        return (
            f"temperature={p.temperature} top_p={p.top_p} max_tokens={p.max_tokens} seed={p.seed}"
        )

    def render(self, item: PromptItem) -> str:
        """The prompt exactly as the master model sees it."""
        return render_prompt(
            self._config.generator.template, item.goal_text, item.preferences, item.instructions
        )

    def lesson_id(self, item: PromptItem) -> str:
        """The id of ``item``'s lesson, made or not."""
        return lesson_id_for(item, self._generator.model_name, self.render(item))

    def split(self, item: PromptItem) -> Split:
        """The split ``item``'s lesson has (or will have)."""
        return assign_split(item, self._config.eval_fraction, self._config.split_seed)

    def lesson_for(
        self, item: PromptItem, seq: int, answer: str | None = None
    ) -> tuple[Lesson, bool]:
        """The lesson for ``item`` (made now or found in the store) and if it was published.

        ``answer``: the master's answer when it has one already (a job it answered itself);
        otherwise the master model answers now.
        """
        found = self.find(item)
        if found is not None:
            return found
        made = self.make(item, answer)
        self.save(made, item, seq)
        return made.lesson, False

    def find(self, item: PromptItem) -> tuple[Lesson, bool] | None:
        """``item``'s lesson if the store has it, and whether it was published."""
        return self._store.get_lesson(self.lesson_id(item))

    def make(self, item: PromptItem, answer: str | None = None) -> Made:
        """Answer, embed and measure ``item``'s lesson, writing nothing.

        Thread-safe, and meant for the master's pool of answers in flight
        (``master.generate_in_flight``): it only reads the store, so the pool's threads never
        wait on one another for SQLite's write lock; :meth:`save` writes on one thread.
        """
        prompt = self.render(item)
        lesson_id = lesson_id_for(item, self._generator.model_name, prompt)
        if answer is None or not answer.strip():
            answer = self._answer(prompt, self._params)
        split = self.split(item)
        new_vectors: dict[str, np.ndarray] = {}
        reference = self._embed(answer, new_vectors)
        lesson = Lesson(
            lesson_id=lesson_id,
            task=item.task,
            prompt=prompt,
            goal_text=item.goal_text,
            preferences=item.preferences,
            instructions=item.instructions,
            master_model=self._generator.model_name,
            master_answer=answer,
            reference=Embedding.from_array(self._embedder.model_name, reference),
            split=split,
        )
        ceiling = None
        if split == "eval" and self._config.ceiling:
            ceiling = self._ceiling(prompt, answer, new_vectors)
        return Made(lesson, ceiling, new_vectors)

    def save(self, made: Made, item: PromptItem, seq: int) -> None:
        """Store a lesson :meth:`make` made (before it is published), and its new embeddings."""
        for text, vector in made.new_vectors.items():
            self._store.cache_embedding(self._embedder.model_name, text, vector)
        self._store.save_lesson(made.lesson, item.id, seq, made.ceiling)

    def _answer(self, prompt: str, params: GenerationParams) -> str:
        answer = self._generator.generate(prompt, params, system=self._config.generator.system)
        # An empty answer still teaches the pupil something (brevity) and must embed to a vector.
        return answer if answer.strip() else "(no answer)"

    def _ceiling(self, prompt: str, answer: str, new_vectors: dict[str, np.ndarray]) -> float:
        """cos between ``answer`` and a second master answer under the same decoding settings.

        Greedy decoding answers identically every time, so the ceiling is 1 by definition and no
        second answer is generated.
        """
        if self._params.temperature == 0.0:
            return 1.0
        seed = None if self._params.seed is None else self._params.seed + 1
        second = self._answer(prompt, replace(self._params, seed=seed))
        return cosine(self._embed(answer, new_vectors), self._embed(second, new_vectors))

    def _embed(self, text: str, new_vectors: dict[str, np.ndarray]) -> np.ndarray:
        """Embed from the cache, or with the model, adding what is new to ``new_vectors``."""
        if text in new_vectors:
            return new_vectors[text]
        cached = self._store.cached_embedding(self._embedder.model_name, text)
        if cached is not None:
            return cached
        vector = new_vectors[text] = self._embedder.embed([text])[0]
        return vector
