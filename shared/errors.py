"""The project's own exceptions.

Library exceptions (pika, ollama, httpx, llama.cpp, safetensors) are translated into these at the
boundary, so callers handle one hierarchy and every message a user sees says what was wrong and
what to do about it.
"""

from __future__ import annotations

import re

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``), safe for a log line or a header.

    Error reasons can quote attacker-controlled input (a field name, a key): a newline there must
    not forge a second log record or break the one-line promise of the dead-letter reason.
    """
    return _CONTROL_CHARS.sub(lambda m: repr(m.group())[1:-1], text)


class DistillSwarmError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(DistillSwarmError):
    """A configuration file, environment variable or CLI option is invalid."""


class DecodeError(DistillSwarmError):
    """A message on the wire could not be decoded or failed validation.

    The consumer dead-letters such a message with ``str(error)`` as the reason and moves on.
    """


class EmbeddingMismatch(DecodeError):
    """A lesson's embedding was made by another model or has another dimension than ours."""


class BrokerError(DistillSwarmError):
    """Talking to RabbitMQ failed."""


class ConnectionClosed(BrokerError):
    """The broker connection is gone; the caller may reconnect."""


class PublishNotConfirmed(BrokerError):
    """The broker did not confirm a publish (nacked or unroutable)."""


class BackendError(DistillSwarmError):
    """A text-generation or embedding backend failed."""


class DependencyDown(DistillSwarmError):
    """Something the work needs is down (an outage), so the work cannot be done *now*.

    Not a poison message: the message is fine and will succeed once the dependency is back. A
    consumer that pauses on such a dependency (:class:`shared.health.Dependency`) keeps the
    message, stops taking more, and retries it after a probe of the dependency succeeds.
    """


class ModelDown(BackendError, DependencyDown):
    """The model server is down or unavailable: an outage of the model, not a bad request."""


class BackendUnreachable(ModelDown):
    """The model server (e.g. Ollama) did not answer at its URL."""


class BackendUnavailable(ModelDown):
    """The model server answered, but only that it cannot serve now (HTTP 502/503/504)."""


class ModelNotFound(BackendError):
    """The model server answered but does not have the requested model."""


class CheckpointError(DistillSwarmError):
    """An adapter checkpoint is missing, corrupt, or does not fit the adapter."""


class StateDirInUse(DistillSwarmError):
    """Another running process holds the pupil's state directory (its lock)."""


class QueueInUse(DistillSwarmError):
    """Another consumer holds a queue this process must consume alone (an exclusive consumer)."""


class NodeIdInUse(QueueInUse):
    """Another process consumes this node's lesson queue: two machines run with one node id."""
