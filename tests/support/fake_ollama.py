"""A small local stand-in for an Ollama server, backed by the embedded models.

It speaks enough of Ollama's HTTP API for the official ``ollama`` client: ``POST /api/chat``,
``/api/generate``, ``/api/embed`` and the legacy ``/api/embeddings``, plus ``GET /api/tags``,
``/api/version`` and ``/``. Answers are never streamed token by token: a streaming request gets
one NDJSON line holding the whole answer, which the client accepts. Errors look like Ollama's
(``{"error": "..."}`` with the same status codes), so the client raises what it would raise
against the real thing.

Usage::

    with FakeOllama(models={"gemma3:270m": "generate", "all-minilm": "embed"}) as server:
        client = ollama.Client(host=server.url)

or ``python -m tests.support.fake_ollama --port 11434`` for manual use.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from shared.backends import GenerationParams
from shared.errors import BackendError

log = logging.getLogger(__name__)

DEFAULT_MODELS = {"gemma3:270m": "generate", "all-minilm": "embed"}
MODEL_KINDS = ("generate", "embed")
# Ollama's defaults, except that "no limit" (-1) becomes a bound the 2048-token context can hold.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.9
UNBOUNDED_NUM_PREDICT = 256

T = TypeVar("T")


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class FakeOllama:
    """A threaded HTTP server on 127.0.0.1 that answers like Ollama for the given models.

    Args:
        models: model name -> ``"generate"`` or ``"embed"``. Names without a tag also answer to
            ``name:latest``, as in Ollama. Any other name gets HTTP 404.
        port: 0 picks a free port.
    """

    def __init__(
        self, models: Mapping[str, str] | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        chosen = dict(DEFAULT_MODELS if models is None else models)
        unknown = {kind for kind in chosen.values() if kind not in MODEL_KINDS}
        if unknown:
            raise ValueError(f"model kinds must be among {MODEL_KINDS}, not {sorted(unknown)}")
        self.models = {_canonical(name): kind for name, kind in chosen.items()}
        self.requests: list[str] = []
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.fake = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL to give the ``ollama`` client, e.g. ``http://127.0.0.1:40123``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeOllama:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (for manual use)."""
        try:
            self._httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self._httpd.server_close()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next ``count`` API requests with HTTP ``status``, as an overloaded server."""
        with self._lock:
            self._failures.extend([status] * count)

    def __enter__(self) -> FakeOllama:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def handle(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Answer one API request; raise ``_HTTPError`` for an Ollama-style error reply."""
        with self._lock:
            self.requests.append(path)
            status = self._failures.pop(0) if self._failures else None
        if status is not None:
            raise _HTTPError(status, "injected failure")
        if path == "/api/chat":
            return self._chat(body)
        if path == "/api/generate":
            return self._generate(body)
        if path == "/api/embed":
            return self._embed(body)
        if path == "/api/embeddings":
            return self._embeddings(body)
        raise _HTTPError(404, "404 page not found")

    def _model(self, body: dict[str, Any], kind: str, action: str) -> str:
        name = body.get("model")
        if not name:
            raise _HTTPError(400, "model is required")
        found = self.models.get(_canonical(name))
        if found is None:
            raise _HTTPError(404, f'model "{name}" not found, try pulling it first')
        if found != kind:
            raise _HTTPError(400, f'"{name}" does not support {action}')
        if body.get("think") is True:
            raise _HTTPError(400, f'"{name}" does not support thinking')
        return str(name)

    def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        model = self._model(body, "generate", "chat")
        messages = [
            {"role": str(m["role"]), "content": str(m.get("content") or "")}
            for m in body.get("messages", [])
        ]
        text = _run(lambda: _generator().chat(messages, _params(body.get("options"))))
        return {**_stamp(model), "message": {"role": "assistant", "content": text}}

    def _generate(self, body: dict[str, Any]) -> dict[str, Any]:
        model = self._model(body, "generate", "generate")
        system = body.get("system")
        prompt = str(body.get("prompt", ""))
        text = _run(lambda: _generator().generate(prompt, _params(body.get("options")), system))
        return {**_stamp(model), "response": text}

    def _embed(self, body: dict[str, Any]) -> dict[str, Any]:
        model = self._model(body, "embed", "embeddings")
        texts = body.get("input", [])
        texts = [texts] if isinstance(texts, str) else list(texts)
        vectors = _run(lambda: _embedder().embed([str(t) for t in texts]))
        return {**_stamp(model), "embeddings": vectors.tolist()}

    def _embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        self._model(body, "embed", "embeddings")
        vectors = _run(lambda: _embedder().embed([str(body.get("prompt", ""))]))
        return {"embedding": vectors[0].tolist()}


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeOllama/1"

    def do_GET(self) -> None:
        fake: FakeOllama = self.server.fake  # type: ignore[attr-defined]
        if self.path == "/api/tags":
            names = sorted(fake.models)
            self._reply(200, {"models": [{"name": n, "model": n} for n in names]})
        elif self.path == "/api/version":
            self._reply(200, {"version": "0.0.0-fake"})
        elif self.path == "/":
            self._reply(200, "Ollama is running")
        else:
            self._reply(404, {"error": "404 page not found"})

    def do_HEAD(self) -> None:
        self._reply(200, "")

    def do_POST(self) -> None:
        fake: FakeOllama = self.server.fake  # type: ignore[attr-defined]
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise _HTTPError(400, "invalid request body")
            answer = fake.handle(self.path, body)
        except json.JSONDecodeError:
            self._reply(400, {"error": "invalid JSON in request body"})
        except _HTTPError as e:
            self._reply(e.status, {"error": str(e)})
        else:
            # Ollama streams unless told not to; one line with the whole answer is a valid stream.
            self._reply(200, answer, ndjson=body.get("stream", True) is not False)

    def _reply(self, status: int, payload: object, *, ndjson: bool = False) -> None:
        if isinstance(payload, str):
            data, kind = payload.encode(), "text/plain; charset=utf-8"
        else:
            data = json.dumps(payload).encode() + (b"\n" if ndjson else b"")
            kind = "application/x-ndjson" if ndjson else "application/json; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def _canonical(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _params(options: Mapping[str, Any] | None) -> GenerationParams:
    options = options or {}
    num_predict = int(options.get("num_predict", -1))
    seed = options.get("seed")
    return GenerationParams(
        temperature=float(options.get("temperature", DEFAULT_TEMPERATURE)),
        top_p=float(options.get("top_p", DEFAULT_TOP_P)),
        max_tokens=num_predict if num_predict > 0 else UNBOUNDED_NUM_PREDICT,
        seed=None if seed is None else int(seed),
    )


def _stamp(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": datetime.now(UTC).isoformat(),
        "done": True,
        "done_reason": "stop",
    }


def _run(work: Callable[[], T]) -> T:
    """Run a model call, turning a backend failure into Ollama's HTTP 500."""
    started = time.monotonic()
    try:
        return work()
    except BackendError as e:
        raise _HTTPError(500, str(e)) from None
    finally:
        log.debug("model call took %.2f s", time.monotonic() - started)


def _generator() -> Any:
    # Imported and loaded on first use: a server that only answers 404s needs no model.
    from shared.backends.embedded import EmbeddedGenerator

    return EmbeddedGenerator()


def _embedder() -> Any:
    from shared.backends.embedded import EmbeddedEmbedder

    return EmbeddedEmbedder()


def main(argv: list[str] | None = None) -> None:
    """Run a fake Ollama server in the foreground until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument(
        "--model",
        action="append",
        metavar="NAME=KIND",
        help=f"a model to serve, KIND one of {MODEL_KINDS} (default: {DEFAULT_MODELS})",
    )
    args = parser.parse_args(argv)
    models = dict(spec.split("=", 1) for spec in args.model) if args.model else None
    logging.basicConfig(level=logging.INFO)
    server = FakeOllama(models, host=args.host, port=args.port)
    print(f"fake Ollama at {server.url} serving {server.models}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
