"""A delivery, and what a consumer does with it: ack, requeue or dead-letter, with a reason code.

A handler returns a :class:`Settlement` (or None, which means "ack") or raises; the consumer maps
what it raised to a settlement by the exception's :class:`~shared.errors.ReasonCode`
(:func:`settlement_for`). An ack may carry the handler's :class:`PendingWrites`: the consumer
commits them before it sends the ack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import pika

from shared.errors import DEAD_LETTER_CODES, DistillSwarmError, ReasonCode


@dataclass
class Delivery:
    """One message handed to a handler.

    ``generation`` counts the consumer's channels: a delivery can be settled only on the channel
    it came on, so one from an earlier generation is left for the broker to redeliver.
    """

    queue: str
    body: bytes
    message_id: str | None
    headers: dict[str, Any]
    redelivered: bool
    delivery_tag: int
    generation: int
    properties: pika.BasicProperties = field(repr=False)


class Action(Enum):
    """What happens to the message at the broker."""

    ACK = "ack"
    REQUEUE = "requeue"  # nack with requeue: it is delivered again
    DEAD_LETTER = "dead_letter"  # republished to <ns>.dead with the reason, then acked


class PendingWrites(Protocol):
    """Writes a handler made but did not commit: the consumer commits them before the ack.

    ``commit`` runs on the consumer's worker thread (the thread that ran the handler), once per
    hand-over of settlements however many of them carry the same pending writes.
    """

    def commit(self) -> None:
        """Make the writes durable; raising turns the acks that carry them into requeues."""


@dataclass(frozen=True)
class Settlement:
    """A message's fate: an action, a stable reason code, and the human text of the reason."""

    action: Action
    code: ReasonCode
    text: str = ""
    pending: PendingWrites | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.action is Action.DEAD_LETTER and self.code not in DEAD_LETTER_CODES:
            raise ValueError(f"{self.code} is not a reason to dead-letter a message")

    @classmethod
    def ack(cls, pending: PendingWrites | None = None) -> Settlement:
        """Done; with ``pending``, acked only once those writes are committed."""
        return cls(Action.ACK, ReasonCode.DONE, pending=pending)

    @classmethod
    def requeue(cls, code: ReasonCode, text: str) -> Settlement:
        """Deliver it again later (after the consumer's backoff)."""
        return cls(Action.REQUEUE, code, text)

    @classmethod
    def dead_letter(cls, code: ReasonCode, text: str) -> Settlement:
        """Never deliver it again: it goes to the dead-letter queue with ``text`` as reason."""
        return cls(Action.DEAD_LETTER, code, text)


class Requeue(DistillSwarmError):
    """Raised by a handler that could not do its work now but may later (e.g. Ollama down)."""

    code = ReasonCode.RETRY_LATER


Handler = Callable[[Delivery], Settlement | None]


def settlement_for(exc: Exception, redelivered: bool) -> Settlement:
    """The settlement of a handler that raised ``exc``, by the exception's reason code.

    A dead-letter code (a bad message) dead-letters it; a handler error (a bug, or a message that
    triggers one) requeues it once and dead-letters it on the redelivery, so one poison message
    cannot make a crash loop; any other code (an outage, a broker error) requeues it.
    """
    code = exc.code if isinstance(exc, DistillSwarmError) else ReasonCode.HANDLER_ERROR
    if code is ReasonCode.HANDLER_ERROR:
        text = f"handler failed: {type(exc).__name__}: {exc}"
        return Settlement.dead_letter(code, text) if redelivered else Settlement.requeue(code, text)
    if code in DEAD_LETTER_CODES:
        return Settlement.dead_letter(code, str(exc))
    return Settlement.requeue(code, str(exc))
