"""The project's own exceptions.

Library exceptions (pika, ollama, httpx, llama.cpp, safetensors) are translated into these at the
boundary, so callers handle one hierarchy and every message a user sees says what was wrong and
what to do about it.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import ClassVar

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``), safe for a log line or a header.

    Error reasons can quote attacker-controlled input (a field name, a key): a newline there must
    not forge a second log record or break the one-line promise of the dead-letter reason.
    """
    return _CONTROL_CHARS.sub(lambda m: repr(m.group())[1:-1], text)


class ReasonCode(StrEnum):
    """Why a consumer settled a message as it did: stable codes for metrics, logs and tests.

    The human text beside a code (the dead-letter reason header, a log line) may be reworded at
    will; a code may not, since Prometheus labels and alert rules are derived from it.
    """

    DONE = "done"  # the handler did its work: acked
    # Dead-lettered: the message itself is wrong, and will be wrong on every redelivery.
    TOO_LARGE = "too_large"  # over MAX_MESSAGE_BYTES, refused before it is parsed
    BAD_JSON = "bad_json"  # not JSON at all
    INVALID_MESSAGE = "invalid_message"  # JSON, but not a valid message of the expected kind
    INVALID_JOB = "invalid_job"  # a valid job message whose kind or payload cannot be done
    WRONG_SENDER = "wrong_sender"  # names a node other than the broker user that sent it
    WRONG_EMBEDDING_SPACE = "wrong_embedding_space"  # a lesson for another embedding model
    # Requeued after a backoff: the message is fine, something it needs is not (yet).
    RETRY_LATER = "retry_later"  # the handler raised Requeue
    UNROUTABLE = "unroutable"  # what the handler published found no queue (no master yet)
    BROKER_ERROR = "broker_error"  # the handler's own broker traffic failed
    DEPENDENCY_DOWN = "dependency_down"  # an outage of something this consumer does not probe
    MODEL_DOWN = "model_down"  # the model server is down (held, not requeued, where probed)
    NOT_DURABLE = "not_durable"  # the handler's pending writes could not be committed
    # Requeued once, dead-lettered on the redelivery: a bug, or a message that triggers one.
    HANDLER_ERROR = "handler_error"


# The codes a message can be dead-lettered with (anything else is acked or requeued).
DEAD_LETTER_CODES = frozenset(
    (
        ReasonCode.TOO_LARGE,
        ReasonCode.BAD_JSON,
        ReasonCode.INVALID_MESSAGE,
        ReasonCode.INVALID_JOB,
        ReasonCode.WRONG_SENDER,
        ReasonCode.WRONG_EMBEDDING_SPACE,
        ReasonCode.HANDLER_ERROR,
    )
)


class DistillSwarmError(Exception):
    """Base class of every error this project raises on purpose.

    ``code`` is the reason a consumer settles a message with when its handler raises this.
    """

    code: ClassVar[ReasonCode] = ReasonCode.HANDLER_ERROR


class ConfigError(DistillSwarmError):
    """A configuration file, environment variable or CLI option is invalid."""


class DecodeError(DistillSwarmError):
    """A message on the wire could not be decoded or failed validation.

    The consumer dead-letters such a message with ``str(error)`` as the reason and moves on.
    """

    code = ReasonCode.INVALID_MESSAGE


class NotJson(DecodeError):
    """A message body that is not JSON (or not a JSON object) at all."""

    code = ReasonCode.BAD_JSON


class WrongSender(DecodeError):
    """A message that names a node other than the broker user who published it."""

    code = ReasonCode.WRONG_SENDER


class EmbeddingMismatch(DecodeError):
    """A lesson's embedding was made by another model or has another dimension than ours."""

    code = ReasonCode.WRONG_EMBEDDING_SPACE


class BrokerError(DistillSwarmError):
    """Talking to RabbitMQ failed."""

    code = ReasonCode.BROKER_ERROR


class ConnectionClosed(BrokerError):
    """The broker connection is gone; the caller may reconnect."""


class PublishNotConfirmed(BrokerError):
    """The broker did not confirm a publish (nacked or unroutable)."""

    code = ReasonCode.UNROUTABLE


class BackendError(DistillSwarmError):
    """A text-generation or embedding backend failed."""


class DependencyDown(DistillSwarmError):
    """Something the work needs is down (an outage), so the work cannot be done *now*.

    Not a poison message: the message is fine and will succeed once the dependency is back. A
    consumer that pauses on such a dependency (:class:`shared.health.Dependency`) keeps the
    message, stops taking more, and retries it after a probe of the dependency succeeds.
    """

    code = ReasonCode.DEPENDENCY_DOWN


class ModelDown(BackendError, DependencyDown):
    """The model server is down or unavailable: an outage of the model, not a bad request."""

    code = ReasonCode.MODEL_DOWN


class BackendUnreachable(ModelDown):
    """The model server (e.g. Ollama) did not answer at its URL."""


class BackendUnavailable(ModelDown):
    """The model server answered, but only that it cannot serve now (HTTP 502/503/504)."""


class ModelNotFound(BackendError):
    """The model server answered but does not have the requested model."""


class ModelNotPulled(ModelNotFound, ModelDown):
    """A model server (Ollama) answers but has not got the model yet: it may be pulled any time.

    An outage, not a bad message: consumers hold the lesson and probe until the model is there,
    so a node started before its `ollama pull` finished loses no lesson to the dead letters.
    """


class CheckpointError(DistillSwarmError):
    """An adapter checkpoint is missing, corrupt, or does not fit the adapter."""


class StateDirInUse(DistillSwarmError):
    """Another running process holds the pupil's state directory (its lock)."""


class QueueInUse(DistillSwarmError):
    """Another consumer holds a queue this process must consume alone (an exclusive consumer)."""


class NodeIdInUse(QueueInUse):
    """Another process consumes this node's lesson queue: two machines run with one node id."""
