"""Model backends: the text-generation and embedding protocols, and a factory for each.

Two kinds of backend implement them:
- ``ollama``: a model served by Ollama, through the official client (the production default);
- ``embedded``: a model shipped inside a PyPI package and run in this process, needing no server
  and no network (the local demo, the tests, and Pis without an Ollama daemon).

Implementations are imported inside the factories, so a node that only uses ``ollama`` never
imports llama.cpp, torch or sentence-transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from shared.errors import ConfigError

if TYPE_CHECKING:
    import numpy

    from shared.config import EmbedderConfig, GeneratorConfig

KINDS = ("ollama", "embedded")


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings for one generation.

    ``seed`` makes sampling reproducible when ``temperature > 0``; ``None`` lets the backend
    choose. ``max_tokens`` bounds the length of the answer, not of the prompt.
    """

    temperature: float = 0.0
    top_p: float = 0.95
    max_tokens: int = 128
    seed: int | None = None


@runtime_checkable
class TextGenerator(Protocol):
    """Something that answers a prompt with text."""

    model_name: str
    """Backend kind and model, e.g. ``"ollama:qwen3"`` or ``"embedded:gemma3-270m"``."""

    def generate(self, prompt: str, params: GenerationParams, system: str | None = None) -> str:
        """Return the model's answer to ``prompt`` (one user turn after an optional system one).

        Raises:
            BackendError: or one of its subclasses, whatever went wrong underneath.
        """
        ...


@runtime_checkable
class Embedder(Protocol):
    """Something that turns texts into unit-length vectors."""

    model_name: str
    """The name that travels on the wire with each embedding, e.g. ``"all-minilm-l6-v2"``."""

    dim: int
    """Length of each embedding vector."""

    def embed(self, texts: list[str]) -> numpy.ndarray:
        """Return a float32 array of shape ``(len(texts), dim)`` with L2-normalised rows.

        Raises:
            BackendError: or one of its subclasses, whatever went wrong underneath.
        """
        ...


def build_generator(
    kind: str,
    model: str,
    *,
    url: str | None = None,
    timeout_s: float = 120.0,
    n_threads: int | None = None,
) -> TextGenerator:
    """Build a text generator.

    Args:
        kind: ``"ollama"`` or ``"embedded"``.
        model: the model, e.g. ``"qwen3"`` for Ollama, ``"gemma3-270m"`` (or a ``.gguf`` path)
            for embedded.
        url: the Ollama server (default ``$OLLAMA_HOST`` or ``http://127.0.0.1:11434``);
            ignored by ``embedded``.
        timeout_s: per-request timeout for Ollama; ignored by ``embedded``.
        n_threads: CPU threads for ``embedded`` (default: all cores); ignored by ``ollama``.

    Raises:
        ConfigError: ``kind`` is not one of the known kinds.
        ModelNotFound: ``embedded`` was asked for a model it does not ship.
    """
    _check_kind(kind)
    if kind == "ollama":
        from shared.backends.ollama import OllamaGenerator

        return OllamaGenerator(model, url=url, timeout_s=timeout_s)
    from shared.backends.embedded import EmbeddedGenerator

    return EmbeddedGenerator(model, n_threads=n_threads)


def build_embedder(
    kind: str, model: str, *, url: str | None = None, timeout_s: float = 60.0
) -> Embedder:
    """Build an embedder.

    Args:
        kind: ``"ollama"`` or ``"embedded"``.
        model: e.g. ``"mxbai-embed-large"`` for Ollama, ``"all-minilm-l6-v2"`` for embedded.
        url: the Ollama server (default ``$OLLAMA_HOST`` or ``http://127.0.0.1:11434``);
            ignored by ``embedded``.
        timeout_s: per-request timeout for Ollama; ignored by ``embedded``.

    Raises:
        ConfigError: ``kind`` is not one of the known kinds.
        BackendUnreachable, ModelNotFound: the Ollama embedder probes its model on construction.
        ModelNotFound: ``embedded`` was asked for a model it does not ship.
    """
    _check_kind(kind)
    if kind == "ollama":
        from shared.backends.ollama import OllamaEmbedder

        return OllamaEmbedder(model, url=url, timeout_s=timeout_s)
    from shared.backends.embedded import EmbeddedEmbedder

    return EmbeddedEmbedder(model)


def generator_from(config: GeneratorConfig) -> TextGenerator:
    """The generator a ``[*.generator]`` config section describes."""
    return build_generator(
        config.kind, config.model, url=config.url, timeout_s=config.timeout_s,
        n_threads=config.threads,
    )  # fmt: skip


def embedder_from(config: EmbedderConfig) -> Embedder:
    """The embedder an ``[*.embedder]`` config section describes."""
    return build_embedder(config.kind, config.model, url=config.url, timeout_s=config.timeout_s)


def probe(*backends: object) -> None:
    """Raise ModelDown unless every backend's model server answers (one cheap request each).

    Backends without a ``probe`` method (the embedded ones) run in this process: they cannot be
    "down" like a server, so they pass. An error from an embedded model is a plain BackendError,
    which the consumers treat as a failure of that message, never as an outage to wait out.
    """
    for backend in backends:
        check = getattr(backend, "probe", None)
        if callable(check):
            check()


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown model backend kind '{kind}'; use one of: {', '.join(KINDS)}")


__all__ = [
    "KINDS",
    "Embedder",
    "GenerationParams",
    "TextGenerator",
    "build_embedder",
    "build_generator",
    "embedder_from",
    "generator_from",
    "probe",
]
