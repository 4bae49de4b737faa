"""Guided answers: ways a pupil's alignment changes what it actually says.

- ``plain``: the pupil's own answer with its own template: the baseline.
- ``best_of_k``: sample K candidates and keep the one whose embedding is closest to the
  prompt adapter's prediction of the master's answer embedding. The prediction is made from
  the *prompt*, never from a candidate, so no candidate wins by construction (DESIGN.md's trap).
- ``retrieval``: put the master's answers to the nearest lessons this node trained on into the
  prompt as worked examples.
- ``retrieval+best_of_k``: both: K candidates from the retrieval prompt, reranked.
- ``lora``: the plain prompt, answered by the node's own model *with its served LoRA adapter*
  (what study rounds taught it; docs/lora.md): one sample, no examples, no reranking.
- ``lora+retrieval``: the retrieval prompt, answered with the LoRA adapter.

Every other method answers with the base model, so ``plain`` stays the baseline the node started
from. The ``lora`` methods need a served adapter: :meth:`Guide.answer` falls back to the base
model when there is none (a job must still be answered), and :attr:`Answer.method` then names
the method that really ran.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from pupil_node.memory import LessonMemory
from shared.backends import Embedder, GenerationParams, TextGenerator
from shared.backends.templates import render_prompt
from shared.config import GeneratorConfig, GuidanceConfig

# Candidates are sampled with seeds offset from the plain answer's, so the plain answer (the
# baseline) is never among them and best-of-K is compared with an independent sample.
CANDIDATE_SEED_OFFSET = 1_000


@dataclass(frozen=True)
class Goal:
    """What a guided answer is for: the goal and its rendering inputs."""

    goal_text: str
    preferences: Sequence[str] = ()
    instructions: Sequence[str] = ()


@dataclass(frozen=True)
class Answer:
    """A guided answer, its embedding, and how it was made."""

    method: str
    text: str
    vector: np.ndarray
    examples: tuple[str, ...] = ()  # lesson ids of retrieval examples, for audit and tests


@dataclass(eq=False)
class Guide:
    """Produces answers by any guidance method for one pupil."""

    config: GuidanceConfig
    generator_config: GeneratorConfig
    generator: TextGenerator
    embedder: Embedder
    params: GenerationParams
    memory: LessonMemory
    predict_master: Callable[[np.ndarray], np.ndarray]
    # The base model with the served LoRA adapter, or None before the first promotion.
    served: Callable[[], TextGenerator | None] = lambda: None

    def limited(self, max_tokens: int) -> Guide:
        """The same guide with answers capped at ``max_tokens`` (a job kind's cap)."""
        return replace(
            self, params=replace(self.params, max_tokens=min(max_tokens, self.params.max_tokens))
        )

    def prompt(self, goal: Goal, examples: Sequence[tuple[str, str]] = ()) -> str:
        """The pupil's prompt for ``goal``, with optional worked examples."""
        return render_prompt(
            self.generator_config.template,
            goal.goal_text,
            goal.preferences,
            goal.instructions,
            examples=examples,
        )

    def generate(
        self,
        prompt: str,
        params: GenerationParams | None = None,
        generator: TextGenerator | None = None,
    ) -> str:
        """One answer from the pupil's base model (or from ``generator``, e.g. the LoRA one)."""
        return (generator or self.generator).generate(
            prompt, params or self.params, system=self.generator_config.system
        )

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embeddings of answers; an empty answer embeds as a single space."""
        return self.embedder.embed([t or " " for t in texts])

    def answer(self, method: str, goal: Goal, goal_vec: np.ndarray) -> Answer:
        """Answer ``goal`` by ``method``; ``goal_vec`` is the embedding of its goal text."""
        examples: tuple[str, ...] = ()
        prompt = self.prompt(goal)
        generator: TextGenerator | None = None
        if method.startswith("lora"):
            generator = self.served()
            rest = method.removeprefix("lora").removeprefix("+") or "plain"
            if generator is None:
                method = rest  # no adapter served yet: the base model answers, and says so
        else:
            rest = method
        if rest.startswith("retrieval"):
            nearest = self.memory.nearest(goal_vec, self.config.examples)
            limit = self.config.example_chars
            prompt = self.prompt(
                goal, [(e.goal_text, e.master_answer[:limit].strip()) for e in nearest]
            )
            examples = tuple(e.lesson_id for e in nearest)
        if rest.endswith("best_of_k"):
            text, vector = self.best_of_k(prompt, goal_vec)
        elif rest in ("plain", "retrieval"):
            text = self.generate(prompt, generator=generator)
            vector = self.embed([text])[0]
        else:
            raise ValueError(f"unknown guidance method {method!r}")
        return Answer(method, text, vector, examples)

    def best_of_k(self, prompt: str, goal_vec: np.ndarray) -> tuple[str, np.ndarray]:
        """Sample K answers; keep the one closest to the predicted master answer embedding."""
        base = self.params.seed
        candidates = []
        for i in range(self.config.k):
            seed = None if base is None else base + CANDIDATE_SEED_OFFSET + i
            candidates.append(self.generate(prompt, replace(self.params, seed=seed)))
        vectors = self.embed(candidates)
        target = self.predict_master(goal_vec)
        scores = vectors @ (target / max(float(np.linalg.norm(target)), 1e-12))
        best = int(np.argmax(scores))
        return candidates[best], vectors[best]
