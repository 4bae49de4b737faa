"""A fast, deterministic text and embedding backend that exists only for benchmarking.

Benchmarks of the framework (broker path, per-lesson overhead, scale) must not be dominated by
model time, so these stand in for the models: they satisfy the same protocols as the real
backends (``shared.backends.TextGenerator`` / ``Embedder``) and cost microseconds.

- :class:`EchoGenerator` answers with the first words of the prompt, so answers differ per prompt
  and the same prompt always gives the same answer.
- :class:`HashingEmbedder` maps each word to a fixed pseudo-random direction (feature hashing) and
  sums them, so similar texts get similar unit vectors: similarities are not all 0 or 1, and the
  adapter has a real (if meaningless) mapping to learn.

Never use these for a similarity figure: they are not models.
"""

from __future__ import annotations

import zlib

import numpy as np

from shared.backends import GenerationParams

DEFAULT_DIM = 384
ANSWER_WORDS = 40


class EchoGenerator:
    """Answers with (up to) the first ``ANSWER_WORDS`` words of the prompt."""

    model_name = "bench:echo"

    def generate(self, prompt: str, params: GenerationParams, system: str | None = None) -> str:
        """The prompt's first words, bounded by ``params.max_tokens``."""
        words = prompt.split()[: min(ANSWER_WORDS, params.max_tokens)]
        return " ".join(words) or "(empty)"

    def chat(self, messages: list[dict[str, str]], params: GenerationParams) -> str:
        """The last user turn's first words (what ``tests/support/fake_ollama.py`` calls)."""
        turns = [m.get("content", "") for m in messages if m.get("role") == "user"]
        return self.generate(turns[-1] if turns else "", params)


class HashingEmbedder:
    """Bag-of-words feature hashing into ``dim`` dimensions, L2-normalised."""

    def __init__(self, dim: int = DEFAULT_DIM, model_name: str = "all-minilm-l6-v2") -> None:
        # The model name is the real embedder's on purpose: lessons made by a master with this
        # backend pass a pupil's embedding-space check exactly as real ones do.
        self.dim = dim
        self.model_name = model_name
        self._cache: dict[int, np.ndarray] = {}

    def _direction(self, word: str) -> np.ndarray:
        key = zlib.crc32(word.lower().encode())
        vector = self._cache.get(key)
        if vector is None:
            vector = np.random.default_rng(key).standard_normal(self.dim).astype(np.float32)
            self._cache[key] = vector
        return vector

    def embed(self, texts: list[str]) -> np.ndarray:
        """One unit vector per text, shape ``(len(texts), dim)``, float32."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.split() or ["(empty)"]:
                out[row] += self._direction(word)
            norm = float(np.linalg.norm(out[row]))
            if norm > 0:
                out[row] /= norm
        return out
