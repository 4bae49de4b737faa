"""Turning prompts into lessons: render, answer with the master model, embed, store.

Lesson ids are deterministic (prompt id + master model + rendered prompt), so a restarted master
finds its earlier work in the store and neither answers nor publishes a lesson twice.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace

import numpy as np

from master.prompts import PromptItem, assign_split
from master.store import Store
from shared.backends import Embedder, GenerationParams, TextGenerator
from shared.backends.templates import render_prompt
from shared.config import MasterConfig
from shared.messages import Embedding, Lesson
from shared.similarity import cosine

log = logging.getLogger(__name__)


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

    def lesson_for(self, item: PromptItem, seq: int) -> tuple[Lesson, bool]:
        """The lesson for ``item`` (made now or found in the store) and if it was published."""
        prompt = self.render(item)
        lesson_id = lesson_id_for(item, self._generator.model_name, prompt)
        stored = self._store.get_lesson(lesson_id)
        if stored is not None:
            return stored
        answer = self._answer(prompt, self._params)
        split = assign_split(item, self._config.eval_fraction, self._config.split_seed)
        lesson = Lesson(
            lesson_id=lesson_id,
            task=item.task,
            prompt=prompt,
            goal_text=item.goal_text,
            preferences=item.preferences,
            instructions=item.instructions,
            master_model=self._generator.model_name,
            master_answer=answer,
            reference=Embedding.from_array(self._embedder.model_name, self.embed(answer)),
            split=split,
        )
        ceiling = self.ceiling(prompt, answer) if split == "eval" and self._config.ceiling else None
        self._store.save_lesson(lesson, item.id, seq, ceiling)
        return lesson, False

    def _answer(self, prompt: str, params: GenerationParams) -> str:
        answer = self._generator.generate(prompt, params, system=self._config.generator.system)
        # An empty answer still teaches the pupil something (brevity) and must embed to a vector.
        return answer if answer.strip() else "(no answer)"

    def ceiling(self, prompt: str, answer: str) -> float:
        """cos between ``answer`` and a second master answer under the same decoding settings.

        Greedy decoding answers identically every time, so the ceiling is 1 by definition and no
        second answer is generated.
        """
        if self._params.temperature == 0.0:
            return 1.0
        seed = None if self._params.seed is None else self._params.seed + 1
        second = self._answer(prompt, replace(self._params, seed=seed))
        return cosine(self.embed(answer), self.embed(second))

    def embed(self, text: str) -> np.ndarray:
        """Embed through the store's cache (keyed by model + text hash)."""
        model = self._embedder.model_name
        cached = self._store.cached_embedding(model, text)
        if cached is not None:
            return cached
        vector = self._embedder.embed([text])[0]
        self._store.cache_embedding(model, text, vector)
        return vector
