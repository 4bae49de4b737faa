"""Backends served by Ollama, through the official ``ollama`` client.

Every call goes through one retry loop: transient failures (connection refused or reset, HTTP 429
and 5xx) are retried a bounded number of times with exponential backoff and jitter; a missing
model (HTTP 404) and other client errors are not. Library exceptions never leak: they become
``BackendUnreachable``, ``BackendUnavailable`` or ``ModelNotPulled`` (all ``ModelDown``: an outage,
which consumers wait out instead of dead-lettering the message: a server restarting or a model
still being pulled loses no lesson) or ``BackendError``, each one line naming the URL and the
model. ``probe()`` asks the server, once, whether it is back and has the model.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import ollama

from shared.backends import GenerationParams
from shared.errors import BackendError, BackendUnavailable, BackendUnreachable, ModelNotPulled

log = logging.getLogger(__name__)

DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"
MAX_ATTEMPTS = 3
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 4.0
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# Statuses that say "the server cannot serve now" (overloaded, a proxy without its upstream)
# rather than "this request failed": after the retries they are an outage (ModelDown), not a
# poison message. A 500 stays a plain BackendError: it may be this very request that breaks it.
UNAVAILABLE_STATUS = frozenset({429, 502, 503, 504})
# Embedded once at construction to learn the model's dimension (see OllamaEmbedder).
DIM_PROBE_TEXT = "dimension probe"
# Ollama 0.5.5 replaced the Modelfile text of ``POST /api/create`` with fields (``from``,
# ``adapters``, ...) and stopped reading the text; older servers read only the text.
STRUCTURED_CREATE_SINCE = (0, 5, 5)
# Hex digits of the adapter's sha256 in a LoRA model's name: unique enough among one node's
# versions and the nodes sharing a server.
ADAPTER_DIGEST_CHARS = 12

# Older clients have no ``think`` argument; newer servers accept ``think=False`` for any model.
_CLIENT_HAS_THINK = "think" in inspect.signature(ollama.Client.chat).parameters
# Thinking models may still emit a reasoning block; an unclosed one means the answer was cut off
# while still thinking, so all of it goes.
_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)

T = TypeVar("T")


def resolve_url(url: str | None) -> str:
    """Return the Ollama URL to use: ``url``, else ``$OLLAMA_HOST``, else the local default."""
    chosen = url or os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_URL
    if "://" not in chosen:
        chosen = "http://" + chosen
    return chosen.rstrip("/")


def strip_thinking(text: str) -> str:
    """Remove any ``<think>...</think>`` block from a model's answer."""
    return _THINK_BLOCK.sub("", text).strip()


class _OllamaConnection:
    """One ``ollama.Client`` plus the retry loop and error translation shared by both backends."""

    def __init__(self, url: str | None, timeout_s: float) -> None:
        self.url = resolve_url(url)
        self.timeout_s = timeout_s
        self.client = ollama.Client(host=self.url, timeout=timeout_s)

    def call(self, model: str, request: Callable[[], T]) -> T:
        """Run ``request``, retrying transient failures, translating the rest."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return request()
            except ollama.ResponseError as e:
                self._raise_unless_retryable(model, e, attempt)
                reason = f"HTTP {e.status_code}: {e.error}"
            except (ConnectionError, httpx.ConnectTimeout) as e:
                reason = _one_line(e.__context__ or e)
                if attempt == MAX_ATTEMPTS:
                    raise self._unreachable(model, reason) from None
            except httpx.TimeoutException:
                # The server took the request but the model is slow: retrying would only triple
                # the wait.
                raise BackendError(
                    f"Ollama at {self.url} did not answer within {self.timeout_s:g} s "
                    f"for model '{model}'; raise the timeout or use a smaller model"
                ) from None
            except httpx.TransportError as e:
                reason = _one_line(e)
                if attempt == MAX_ATTEMPTS:
                    raise self._unreachable(model, reason) from None
            delay_s = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
            delay_s *= random.uniform(0.5, 1.0)  # jitter, so nodes do not retry in lockstep
            log.warning(
                "Ollama at %s, model '%s': %s; retry %d/%d in %.1f s",
                self.url,
                model,
                reason,
                attempt,
                MAX_ATTEMPTS - 1,
                delay_s,
            )
            time.sleep(delay_s)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _raise_unless_retryable(self, model: str, e: ollama.ResponseError, attempt: int) -> None:
        if e.status_code == 404 and "not found" in str(e.error):
            raise self._not_pulled(model) from None
        if e.status_code in UNAVAILABLE_STATUS and attempt == MAX_ATTEMPTS:
            raise BackendUnavailable(
                f"Ollama at {self.url} cannot serve model '{model}' now: "
                f"{_one_line(e.error)} (HTTP {e.status_code})"
            ) from None
        if e.status_code not in RETRYABLE_STATUS or attempt == MAX_ATTEMPTS:
            raise BackendError(
                f"Ollama at {self.url} failed for model '{model}': "
                f"{_one_line(e.error)} (HTTP {e.status_code})"
            ) from None

    def probe(self, model: str) -> None:
        """Ask the server once (``GET /api/tags``, no retries) whether it answers with ``model``.

        Raises BackendUnreachable or BackendUnavailable while it is down, ModelNotPulled while it
        is up without the model; returns when it is up with it. Cheap on purpose: it runs every
        few seconds during an outage and loads no model.
        """
        try:
            listed = self.client.list()
        except ollama.ResponseError as e:
            if e.status_code in UNAVAILABLE_STATUS or e.status_code >= 500:
                raise BackendUnavailable(
                    f"Ollama at {self.url} (model '{model}') answered HTTP {e.status_code}: "
                    f"{_one_line(e.error)}"
                ) from None
            return
        except (ConnectionError, httpx.TransportError) as e:
            raise self._unreachable(model, _one_line(e.__context__ or e)) from None
        if _tagged(model) not in {_tagged(m.model or "") for m in listed.models}:
            raise self._not_pulled(model)

    def server_version(self, model: str) -> tuple[int, ...]:
        """The server's version as numbers (``"0.5.4-ipexllm-20250407"`` -> ``(0, 5, 4)``)."""
        response = self.call(model, lambda: self._http_get("/api/version"))
        found = re.match(r"(\d+)\.(\d+)\.(\d+)", str(response.get("version", "")))
        return tuple(int(part) for part in found.groups()) if found else (0, 0, 0)

    def create_from_modelfile(self, model: str, name: str, modelfile: str) -> None:
        """``POST /api/create`` the way servers before 0.5.5 take it: the Modelfile's text."""
        body = {"model": name, "modelfile": modelfile, "stream": False}
        self.call(model, lambda: self._http_post("/api/create", body))

    def _http_get(self, path: str) -> dict[str, Any]:
        return _json_or_raise(httpx.get(self.url + path, timeout=self.timeout_s))

    def _http_post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return _json_or_raise(httpx.post(self.url + path, json=body, timeout=self.timeout_s))

    def _not_pulled(self, model: str) -> ModelNotPulled:
        return ModelNotPulled(
            f"Ollama at {self.url} has no model '{model}'; run `ollama pull {model}` "
            "(lessons wait until it is there)"
        )

    def _unreachable(self, model: str, reason: str) -> BackendUnreachable:
        return BackendUnreachable(
            f"cannot reach Ollama at {self.url} (model '{model}'): {reason}; "
            "is `ollama serve` running?"
        )


class OllamaGenerator:
    """Text generation with an Ollama chat model (``/api/chat``, not streamed)."""

    def __init__(self, model: str, *, url: str | None = None, timeout_s: float = 120.0) -> None:
        """Prepare a generator; nothing is sent until the first ``generate``."""
        self.model = model
        self.model_name = f"ollama:{model}"
        self._conn = _OllamaConnection(url, timeout_s)

    @property
    def url(self) -> str:
        """The Ollama server this generator talks to."""
        return self._conn.url

    def generate(self, prompt: str, params: GenerationParams, system: str | None = None) -> str:
        """Return the model's answer to ``prompt``, without any thinking block."""
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        options: dict[str, Any] = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "num_predict": params.max_tokens,
        }
        if params.seed is not None:
            options["seed"] = params.seed
        extra: dict[str, Any] = {"think": False} if _CLIENT_HAS_THINK else {}
        response = self._conn.call(
            self.model,
            lambda: self._conn.client.chat(
                model=self.model, messages=messages, options=options, stream=False, **extra
            ),
        )
        return strip_thinking(response.message.content or "")

    def probe(self) -> None:
        """Raise ModelDown unless the Ollama server answers (one cheap request, no retries)."""
        self._conn.probe(self.model)

    def with_lora(self, path: Path, label: str) -> OllamaGenerator:
        """A generator for a node-local Ollama model: this model plus the LoRA GGUF at ``path``.

        The adapter is uploaded as a blob and a model ``<base>-<label>-<digest>`` is created
        ``FROM`` this one with it as ``ADAPTER`` (Ollama's create API: fields since 0.5.5, a
        Modelfile before), then used like any other model. The base model stays as it is. The
        adapter's digest in the name keeps nodes that share one server (each with its own
        ``lora-v1``) from replacing each other's model. Raises BackendError if the server
        refuses the adapter.
        """
        conn = self._conn
        digest = conn.call(self.model, lambda: conn.client.create_blob(path))
        short = digest.removeprefix("sha256:")[:ADAPTER_DIGEST_CHARS]
        name = f"{self.model.split(':', 1)[0]}-{label}-{short}"
        if conn.server_version(self.model) >= STRUCTURED_CREATE_SINCE:
            conn.call(
                self.model,
                lambda: conn.client.create(
                    model=name, from_=self.model, adapters={path.name: digest}, stream=False
                ),
            )
        else:
            conn.create_from_modelfile(self.model, name, f"FROM {self.model}\nADAPTER @{digest}\n")
        return OllamaGenerator(name, url=conn.url, timeout_s=conn.timeout_s)

    def close_lora(self) -> None:
        """Nothing to free here: the node-local model stays on the server for rollback."""

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._conn.client.close()


class OllamaEmbedder:
    """Embeddings from an Ollama embedding model (``/api/embed``).

    The dimension is learnt by embedding a probe string at construction, so a missing model or
    an unreachable server fails at startup rather than on the first lesson, and ``dim`` is a
    plain attribute.
    """

    def __init__(self, model: str, *, url: str | None = None, timeout_s: float = 60.0) -> None:
        """Connect and probe the model for its dimension.

        Raises:
            BackendUnreachable: the server does not answer.
            ModelNotPulled: the server does not have ``model`` (yet).
        """
        self.model_name = model
        self._conn = _OllamaConnection(url, timeout_s)
        self.dim = self._embed_raw([DIM_PROBE_TEXT]).shape[1]

    @property
    def url(self) -> str:
        """The Ollama server this embedder talks to."""
        return self._conn.url

    def embed(self, texts: list[str]) -> np.ndarray:
        """Return float32 embeddings of shape ``(len(texts), dim)`` with unit-length rows."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._embed_raw(texts)
        if vectors.shape != (len(texts), self.dim):
            raise BackendError(
                f"Ollama at {self.url} returned embeddings of shape {vectors.shape} for "
                f"{len(texts)} texts from model '{self.model_name}'; expected dim {self.dim}"
            )
        return _normalise_rows(vectors)

    def probe(self) -> None:
        """Raise ModelDown unless the Ollama server answers (one cheap request, no retries)."""
        self._conn.probe(self.model_name)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._conn.client.close()

    def _embed_raw(self, texts: list[str]) -> np.ndarray:
        response = self._conn.call(
            self.model_name, lambda: self._conn.client.embed(model=self.model_name, input=texts)
        )
        vectors = np.asarray(response.embeddings, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts) or vectors.shape[1] == 0:
            raise BackendError(
                f"Ollama at {self.url} returned no usable embeddings from model "
                f"'{self.model_name}' (shape {vectors.shape}); is it an embedding model?"
            )
        return vectors


def _normalise_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # An all-zero row stays zero rather than becoming NaN.
    return (vectors / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)


def _tagged(model: str) -> str:
    """A model name as Ollama lists it: ``all-minilm`` is ``all-minilm:latest``."""
    return model if ":" in model else f"{model}:latest"


def _json_or_raise(response: httpx.Response) -> dict[str, Any]:
    """A plain httpx reply as the ollama client would give it: JSON, or a ResponseError."""
    try:
        payload = response.json()
    except ValueError:
        payload = {"error": response.text}
    if response.status_code >= 400:
        raise ollama.ResponseError(str(payload.get("error", payload)), response.status_code)
    return payload if isinstance(payload, dict) else {}


def _one_line(error: object) -> str:
    return " ".join(str(error).split()) or type(error).__name__
