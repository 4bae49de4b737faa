"""The Ollama backends through the real ``ollama`` client over HTTP, and the embedded models.

The server is ``FakeOllama`` on a local port, answering with the embedded models, so what is
exercised is our code, the official client and real HTTP; only the server is a stand-in.
Generations stay short: the machine has two cores.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import numpy as np
import pytest

from shared.backends import (
    Embedder,
    GenerationParams,
    TextGenerator,
    build_embedder,
    build_generator,
)
from shared.backends.embedded import EmbeddedGenerator
from shared.backends.ollama import OllamaEmbedder, OllamaGenerator, strip_thinking
from shared.errors import BackendError, BackendUnreachable, ConfigError, ModelNotFound
from tests.support.fake_ollama import FakeOllama

pytestmark = pytest.mark.models

GEN_MODEL = "gemma3:270m"
EMBED_MODEL = "all-minilm"
SHORT = GenerationParams(max_tokens=16)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOllama]:
    with FakeOllama(models={GEN_MODEL: "generate", EMBED_MODEL: "embed"}) as fake:
        yield fake


@pytest.fixture(scope="module")
def embedder(server: FakeOllama) -> OllamaEmbedder:
    return OllamaEmbedder(EMBED_MODEL, url=server.url)


@pytest.fixture
def closed_port_url() -> str:
    # Bind then close: nothing listens on the port afterwards, so connecting is refused.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_generation_returns_text(server: FakeOllama) -> None:
    generator = build_generator("ollama", GEN_MODEL, url=server.url)
    assert isinstance(generator, TextGenerator)
    assert generator.model_name == f"ollama:{GEN_MODEL}"
    answer = generator.generate("Name one primary colour.", SHORT, system="Answer in one word.")
    assert answer.strip()


def test_seeded_sampling_is_reproducible_over_http(server: FakeOllama) -> None:
    generator = OllamaGenerator(GEN_MODEL, url=server.url)
    params = GenerationParams(temperature=1.0, max_tokens=12, seed=42)
    prompt = "Invent a name for a cat."
    assert generator.generate(prompt, params) == generator.generate(prompt, params)


def test_embeddings_are_unit_rows_of_the_models_dimension(embedder: OllamaEmbedder) -> None:
    assert isinstance(embedder, Embedder)
    assert embedder.model_name == EMBED_MODEL
    assert embedder.dim == 384
    vectors = embedder.embed(["one", "two", "three"])
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)


def test_similar_texts_score_higher_than_unrelated_ones(embedder: OllamaEmbedder) -> None:
    cat, kitten, bonds = embedder.embed(
        [
            "The cat sat on the mat.",
            "A kitten was resting on the rug.",
            "Government bond yields rose after the central bank meeting.",
        ]
    )
    assert float(cat @ kitten) > float(cat @ bonds) + 0.2


def test_unreachable_server_names_url_and_model(closed_port_url: str) -> None:
    generator = OllamaGenerator(GEN_MODEL, url=closed_port_url)
    with pytest.raises(BackendUnreachable) as caught:
        generator.generate("hello", SHORT)
    message = str(caught.value)
    assert closed_port_url in message and GEN_MODEL in message
    assert "ollama serve" in message and "\n" not in message


def test_unreachable_server_fails_embedder_construction(closed_port_url: str) -> None:
    with pytest.raises(BackendUnreachable, match=re.escape(closed_port_url)):
        build_embedder("ollama", EMBED_MODEL, url=closed_port_url)


def test_unknown_model_is_named_and_not_retried(server: FakeOllama) -> None:
    before = len(server.requests)
    with pytest.raises(ModelNotFound) as caught:
        OllamaGenerator("no-such-model", url=server.url).generate("hello", SHORT)
    assert "'no-such-model'" in str(caught.value)
    assert "ollama pull no-such-model" in str(caught.value)
    assert server.url in str(caught.value)
    assert len(server.requests) == before + 1


def test_unknown_embedding_model_fails_at_construction(server: FakeOllama) -> None:
    with pytest.raises(ModelNotFound, match="no-such-embedder"):
        OllamaEmbedder("no-such-embedder", url=server.url)


def test_transient_server_errors_are_retried(server: FakeOllama, embedder: OllamaEmbedder) -> None:
    server.fail_next(2, status=503)
    before = len(server.requests)
    assert embedder.embed(["still works"]).shape == (1, 384)
    assert len(server.requests) == before + 3


def test_persistent_server_errors_give_up(server: FakeOllama, embedder: OllamaEmbedder) -> None:
    server.fail_next(3, status=500)
    with pytest.raises(BackendError, match="HTTP 500") as caught:
        embedder.embed(["fails"])
    assert not isinstance(caught.value, (BackendUnreachable, ModelNotFound))


def test_unknown_backend_kind_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="ollama, embedded"):
        build_generator("docker", GEN_MODEL)


def test_embedded_generator_with_fixed_seed_is_reproducible() -> None:
    generator = build_generator("embedded", "gemma3-270m")
    assert generator.model_name == "embedded:gemma3-270m"
    params = GenerationParams(temperature=0.9, max_tokens=16, seed=7)
    prompt = "Write a short sentence about rivers."
    first = generator.generate(prompt, params)
    assert first
    assert generator.generate(prompt, params) == first


def test_embedded_generator_rejects_unknown_model() -> None:
    with pytest.raises(ModelNotFound, match="llama-70b"):
        EmbeddedGenerator("llama-70b")


def test_embedded_embedder_matches_the_wire_contract() -> None:
    embedder = build_embedder("embedded", "all-minilm-l6-v2")
    assert (embedder.model_name, embedder.dim) == ("all-minilm-l6-v2", 384)
    vectors = embedder.embed(["a", "b"])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_thinking_blocks_are_stripped() -> None:
    assert strip_thinking("<think>\nhmm, blue?\n</think>\n\nBlue.") == "Blue."
    assert strip_thinking("<think>cut off while still thinking") == ""
    assert strip_thinking("No thinking here.") == "No thinking here."
